"""The NBIA archive as a ``Source``: the planner for queries, getImage ZIPs for series,
getSingleImage for one instance, getUpdatedSeries for what changed.

Per series: stream the ZIP into a sink the engine gave (``stream_series_zip``, holding a
``download_limiter`` slot when the engine gave one), which verifies and unpacks it as it arrives
(the store's ``ZipSeriesSink``: no ``.partial``), or, for a large series (``per_instance``) that
one connection is slow for (``ConnectionController.slow_for``), fetch its instances several at
once into a sink that keeps each verified one for a resume (getSingleImage). When no
connection's throughput is known yet, a large series' ZIP is started and timed after its
headers (``PROBE_SECONDS``): it goes on when one connection brings the series soon enough,
else it is given up (its sink discarded) and the series is spread. Then repair up to one in ten
instances that failed only their MD5 with getSingleImage instead of refetching the whole series; with ``config.annotations``, the series' annotation files follow (getDCMImage).

Raises what ``stream_series_zip`` and the sink raise, ``IntegrityError`` when a
single-image refetch still fails its MD5 or is another instance, and the client's request errors.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from harvester.annotations import MAX_ANNOTATION_BYTES, AnnotationOpener, has_annotations
from harvester.concurrency import ConnectionController
from harvester.config import PER_INSTANCE_MIN_BYTES, PER_INSTANCE_SPARE_MIN_BYTES
from harvester.errors import IncompleteSeriesError, IntegrityError, RetryableRequestError
from harvester.models import AnnotatedSeries, Plan, Repair, SeriesTask, TaskStore, UnpackedSeries, VerifiedFile
from harvester.query import Query
from harvester.rate import RateLimiter
from harvester.source.base import ClientBackedSource, InstanceTarget, InstanceUpload, ParallelInstanceWriter, Sinks
from harvester.source.http import BodyGuard, redact_url
from harvester.source.nbia.client import INSTANCE_BATCH_BYTES, NBIAClient, license_from_row
from harvester.source.nbia.download import download_bound, stream_series_zip
from harvester.source.nbia.planner import Planner
from harvester.unpack import read_dicom_ids

#: getUpdatedSeries is asked from this long before the last sync (the archive's dates are days)
SYNC_OVERLAP = dt.timedelta(days=2)
#: a large series' ZIP is timed from its headers (see the module's docstring): after
#: ``PROBE_SECONDS`` it is given up when one connection at its pace is ``PROBE_CLEAR`` times
#: slow for the series (a per-connection cap: 4 MB/s for 1 GiB is 13 times 20 s), kept when it is
#: not slow at all; in between (a connection still opening its window, a loaded machine) it is
#: timed on, and decided at ``PROBE_MAX_SECONDS`` by ``slow_for`` alone
PROBE_SECONDS = 0.25
PROBE_MAX_SECONDS = 1.0
PROBE_CLEAR = 4.0


def per_instance(task: SeriesTask, mode: str, *, spare: bool = False) -> bool:
    """Whether ``task`` is fetched instance by instance under ``config.per_instance`` ``mode``:
    "always", "never", or "auto": a series in at least two instances (each is streamed into its
    file, whatever its size) that is large (at least ``PER_INSTANCE_MIN_BYTES``), or of at least
    ``PER_INSTANCE_SPARE_MIN_BYTES`` when connections are ``spare`` (the connection controller's
    view: the series left are fewer than the connections, so one ZIP each would leave some
    idle)."""
    if mode != "auto":
        return mode == "always"
    count, size = task.image_count or 0, task.file_size or 0
    if count < 2:
        return False
    return size >= PER_INSTANCE_MIN_BYTES or (spare and size >= PER_INSTANCE_SPARE_MIN_BYTES)


def zip_entry_names(count: int, *, tcia_names: bool) -> list[str]:
    """The names of a series' DICOM entries in getImage's ZIP, in getSOPInstanceUIDs' order:
    ``NewFileNames=Yes`` ``1-01.dcm``... zero-padded to the digits of ``count``, else (as
    getImageWithMD5Hash names them) ``00000001.dcm``... (``shared/nbia-api.md``)."""
    if tcia_names:
        width = len(str(count))
        return [f"1-{i:0{width}d}.dcm" for i in range(1, count + 1)]
    return [f"{i:08d}.dcm" for i in range(1, count + 1)]


def _write_and_commit(upload: InstanceUpload, rest: list[bytes], archive_md5: str) -> VerifiedFile:
    """The last pieces of a streamed instance, then its check (one worker-thread call)."""
    upload.write_all(rest)
    return upload.commit(archive_md5)


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The first exception of a task group's, nested groups opened."""
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first


def from_date_param(when: dt.date, api_url: str) -> str:
    """fromDate as the API version wants it: v4 MM-DD-YYYY, v1/v2 DD/MM/YYYY."""
    version = api_url.rstrip("/").rsplit("/", 1)[-1]
    return when.strftime("%d/%m/%Y") if version in ("v1", "v2") else when.strftime("%m-%d-%Y")


class NBIASource(ClientBackedSource):
    """The NBIA archive; implements ``Source``, ``DownloadSlots``, ``SingleInstanceFetch`` and
    ``UpdateFeed`` (``harvester.source.base``)."""

    kind = "nbia"

    def __init__(self, client: NBIAClient) -> None:
        self.client = client
        #: Set by the engine: held while the ZIP streams (retries included) and released before
        #: verifying and unpacking, so that work never keeps a connection slot from a download.
        self.download_limiter: anyio.CapacityLimiter | None = None
        #: Set by the engine: one of its connections is held while a body streams (a ZIP, an
        #: instance), and its view of spare connections decides ``per_instance``'s "auto".
        self.connections: ConnectionController | None = None

    async def plan(self, query: Query, *, details: bool = True) -> Plan:
        return await Planner(self.client, concurrency=self.client.config.plan_concurrency).plan(
            query, details=details)

    async def plan_into(self, query: Query, tasks: TaskStore, *, details: bool = True) -> Plan:
        return await Planner(self.client, concurrency=self.client.config.plan_concurrency).plan(
            query, details=details, into=tasks)

    async def fetch_instance(self, task: SeriesTask, sop_uid: str, into: InstanceTarget) -> int:
        """One instance via getSingleImage, poured into ``into`` as it arrives (request errors as
        the client raises them)."""
        return await self.client.single_image_into(task.series_uid, sop_uid, task.collection, into)

    async def updated_since(self, last_sync: str | None) -> set[str]:
        """Series the archive says were released or updated since ``last_sync`` (an ISO time from
        harvest.json), minus ``SYNC_OVERLAP``; empty without a readable last sync. Request
        errors propagate."""
        if not last_sync:
            return set()
        try:
            since = dt.datetime.fromisoformat(last_sync.replace("Z", "+00:00")).date() - SYNC_OVERLAP
        except ValueError:
            return set()
        rows = await self.client.query("getUpdatedSeries",
                                       {"fromDate": from_date_param(since, self.client.config.api_url)})
        return {str(r["SeriesInstanceUID"]) for r in rows if r.get("SeriesInstanceUID")}

    async def fetch_series(self, task: SeriesTask, *, partial: Path, staging: Path,
                           on_bytes: Callable[[int], None], rate: RateLimiter | None,
                           sinks: Sinks) -> UnpackedSeries:
        config = self.client.config
        max_repairs = max(1, (task.image_count or 0) // 10)
        # decided once the series may download: the series still waiting are known then
        async with self.download_limiter or contextlib.nullcontext():
            with self._series_download(task) as spare:
                spread = per_instance(task, config.per_instance, spare=spare)
                slow = self._slow_for(task) if spread and self._large(task) else True
                found: UnpackedSeries | None = None
                if not spread or slow is False:   # one connection brings it soon enough
                    found = await self._stream_zip(task, staging, on_bytes, rate, sinks, max_repairs)
                elif slow is None:           # not known yet: the ZIP, unless it proves slow
                    found = await self._stream_zip(task, staging, on_bytes, rate, sinks, max_repairs,
                                                   probe=task.file_size)
                unpacked = found if found is not None else \
                    await self._fetch_instances(task, staging, on_bytes, rate, sinks)
        if unpacked.license_text is None:  # getImageWithMD5Hash sends none: say what getSeries said
            unpacked = dataclasses.replace(unpacked, license_text=license_from_row(task.row))
        for repair in unpacked.repairs:
            await self._repair(task, staging, repair, sinks)
        if config.annotations and has_annotations(task.row):
            return await self._add_annotations(task, unpacked, staging, rate, on_bytes, sinks)
        return unpacked

    async def _repair(self, task: SeriesTask, staging: Path, repair: Repair, sinks: Sinks) -> None:
        """Refetch one file of the series that failed only its MD5 (getSingleImage), streamed
        into a file beside it, and put it in its place once it has the MD5 and is that instance
        of the series; raises ``IntegrityError`` otherwise (the series is retried)."""
        target = staging / repair.name
        fresh = await anyio.to_thread.run_sync(sinks.repair_file, staging, target.name + ".repair")
        try:
            await self.fetch_instance(task, repair.sop_uid, fresh)

            def check_and_replace() -> None:
                if fresh.close() != repair.md5:
                    raise IntegrityError(f"{repair.name} still fails its MD5 after a single-image refetch",
                                         series_uid=task.series_uid)
                series, got_sop, _ = read_dicom_ids(fresh.path)
                if series != task.series_uid or got_sop != repair.sop_uid:
                    raise IntegrityError(f"{target.name}: the single-image refetch is another instance",
                                         series_uid=task.series_uid)
                fresh.path.replace(target)

            await anyio.to_thread.run_sync(check_and_replace)
        except BaseException:
            fresh.abandon()
            raise

    def _large(self, task: SeriesTask) -> bool:
        """A series "auto" spreads for its size alone (``PER_INSTANCE_MIN_BYTES``), under a
        controller that can say whether one connection is slow for it."""
        return (self.connections is not None and self.client.config.per_instance == "auto"
                and (task.file_size or 0) >= PER_INSTANCE_MIN_BYTES)

    def _slow_for(self, task: SeriesTask) -> bool | None:
        assert self.connections is not None
        return self.connections.slow_for(task.file_size or 0)

    async def _stream_zip(self, task: SeriesTask, staging: Path, on_bytes: Callable[[int], None],
                          rate: RateLimiter | None, sinks: Sinks, max_repairs: int, *,
                          probe: int | None = None) -> UnpackedSeries | None:
        """The series as one ZIP on one connection. With ``probe`` (the series' bytes), the ZIP
        is timed from its headers (``PROBE_SECONDS`` to ``PROBE_MAX_SECONDS``): when one
        connection at that pace is slow for ``probe`` bytes (``ConnectionController.slow_for``)
        it is given up, its sink discarded, and None returned (the caller spreads the series)."""
        config = self.client.config
        connections = self.connections
        received = 0
        headers_at: float | None = None
        given_up = False

        def counted(n: int) -> None:
            nonlocal received
            received += n
            on_bytes(n)

        def headers(seconds: float) -> None:
            nonlocal headers_at, received
            if connections is not None:
                connections.observe_latency(seconds)
            headers_at, received = anyio.current_time(), 0   # a retried attempt is timed afresh

        async def zip_once() -> UnpackedSeries:
            # a connection for each attempt's body, none through a back-off
            return await stream_series_zip(
                self.client, task.series_uid, task.collection,
                lambda: sinks.series_zip(task, staging, max_repairs=max_repairs),
                chunk_size=config.chunk_size, rate=rate, on_bytes=counted if probe else on_bytes,
                max_bytes=download_bound(task.file_size, task.image_count, config.limits),
                on_latency=headers, hold=self._connection)

        if not probe or connections is None:
            return await zip_once()
        result: UnpackedSeries | None = None

        async def download() -> None:
            nonlocal result
            result = await zip_once()
            watcher.cancel()

        async def watch() -> None:
            nonlocal given_up
            with watcher:
                while True:
                    await anyio.sleep(PROBE_SECONDS / 5)
                    if headers_at is None or (elapsed := anyio.current_time() - headers_at) < PROBE_SECONDS:
                        continue
                    pace = received / elapsed if received else 1.0
                    if elapsed >= PROBE_MAX_SECONDS:
                        given_up = bool(connections.slow_for(probe, pace))
                    elif connections.slow_for(probe, pace, margin=PROBE_CLEAR):
                        given_up = True
                    elif connections.slow_for(probe, pace):
                        continue   # not clear yet: timed on
                    break
                if given_up:
                    group.cancel_scope.cancel()

        watcher = anyio.CancelScope()
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(watch)
                group.start_soon(download)
        except BaseExceptionGroup as errors:
            raise _first_error(errors) from None
        if given_up:
            return None
        if result is None:  # pragma: no cover - the download ends with a result or an error
            raise RetryableRequestError(f"download of series {task.series_uid} ended without a result")
        return result

    async def _fetch_instances(self, task: SeriesTask, staging: Path, on_bytes: Callable[[int], None],
                               rate: RateLimiter | None, sinks: Sinks) -> UnpackedSeries:
        """The series instance by instance: getSOPInstanceUIDs, then for each instance its MD5
        (getMD5HashForImage) and, unless a previous attempt kept it and it checks again, its
        bytes (getSingleImage), ``config.instance_streams`` at once, each checked and kept by
        the sink as it arrives; the files get the names the series ZIP would give them.

        Raises ``IncompleteSeriesError``/``IntegrityError`` when the archive lists fewer, more or
        repeated instances than the plan announced, what the sink raises, and request errors (the
        first one, once the instances in flight were cancelled)."""
        client = self.client
        sops = await client.sop_uids(task.series_uid, task.collection)
        if len(set(sops)) != len(sops):
            raise IntegrityError("getSOPInstanceUIDs lists an instance twice", series_uid=task.series_uid)
        if task.image_count is not None and len(sops) > task.image_count:
            raise IntegrityError(f"getSOPInstanceUIDs lists {len(sops)} instances, more than the "
                                 f"{task.image_count} announced", series_uid=task.series_uid)
        if not sops:  # never an empty series: NBIA answers an unknown one with an empty body
            raise IncompleteSeriesError("getSOPInstanceUIDs lists no instance of the series",
                                        series_uid=task.series_uid)
        if task.image_count is not None and len(sops) < task.image_count:
            raise IncompleteSeriesError(f"getSOPInstanceUIDs lists {len(sops)} of {task.image_count} instances",
                                        series_uid=task.series_uid)
        # the names getImage gives (NewFileNames=Yes), or getImageWithMD5Hash's once IncludeMD5 was refused
        names = dict(zip(sops, zip_entry_names(len(sops), tcia_names=not client.include_md5_refused), strict=True))
        writer = await anyio.to_thread.run_sync(functools.partial(sinks.parallel_instances, task, staging,
                                                                  names=names))
        queue = iter(sops)
        # 2 x instance_streams workers, each holding one of the engine's connections only while an
        # instance's bytes move: checking and fsyncing one instance overlaps the next one's
        # download, so the connections stay busy; the controller decides how many there are.

        async def fetch_some() -> None:
            for sop in queue:  # one iterator shared by the workers: each instance is taken once
                md5 = await client.instance_md5(sop, task.collection)
                if await anyio.to_thread.run_sync(writer.staged, sop, md5) is not None:
                    continue
                upload, rest = await self._stream_instance(task, sop, writer, rate, on_bytes)
                if upload is None:   # a small instance, whole in ``rest``: one worker-thread call
                    await anyio.to_thread.run_sync(writer.write, sop, b"".join(rest), md5)
                    continue
                try:
                    await anyio.to_thread.run_sync(_write_and_commit, upload, rest, md5)
                except BaseException:
                    upload.abandon()
                    raise

        try:
            async with anyio.create_task_group() as workers:  # the caller holds the download slot
                for _ in range(max(1, min(2 * client.config.instance_streams, len(sops)))):
                    workers.start_soon(fetch_some)
        except BaseExceptionGroup as group:
            raise _first_error(group) from None
        return await anyio.to_thread.run_sync(writer.finish)

    async def _stream_instance(self, task: SeriesTask, sop: str, writer: ParallelInstanceWriter,
                               rate: RateLimiter | None, on_bytes: Callable[[int], None]
                               ) -> tuple[InstanceUpload | None, list[bytes]]:
        """One instance's body (getSingleImage). Past ``INSTANCE_BATCH_BYTES`` it is poured into a
        new upload of ``writer`` as it arrives, a batch per worker-thread call, so an instance is
        never held whole, whatever its size; a smaller one is kept as it came (one thread hop for
        it, not three: most instances are well below a batch). Each attempt holds one of the
        engine's connections while its body moves (none through a back-off) and starts afresh
        (a failed attempt's upload is abandoned). Returns (the upload, or None, and the pieces
        not yet written), for the caller to write and commit."""
        client = self.client
        shown = redact_url(client.single_image_url(task.series_uid, sop, task.collection))
        limit = client.config.limits.max_entry_bytes
        async for attempt in client.retrying():
            with attempt:
                upload: InstanceUpload | None = None
                try:
                    guard = BodyGuard(client.config, shown, max_bytes=limit)
                    pending: list[bytes] = []
                    held = 0
                    async with self._connection():
                        async with client.open_single_image(task.series_uid, sop, task.collection) as resp:
                            # half a chunk per read, as the ZIP's stream (``stream_series_zip``)
                            async for chunk in resp.content.iter_chunked(max(1, client.config.chunk_size // 2)):
                                guard.feed(len(chunk))
                                ours = time.monotonic()   # our side's time (the cap, the disk)
                                if rate is not None:
                                    await rate.consume(len(chunk))
                                pending.append(chunk)
                                held += len(chunk)
                                if held >= INSTANCE_BATCH_BYTES:
                                    on_bytes(held)
                                    if upload is None:
                                        upload = await anyio.to_thread.run_sync(writer.open, sop)
                                    await anyio.to_thread.run_sync(upload.write_all, pending)
                                    pending, held = [], 0
                                guard.credit(time.monotonic() - ours)
                    if held:
                        on_bytes(held)
                except BaseException:
                    if upload is not None:
                        upload.abandon()
                    raise
                return upload, pending
        raise AssertionError("unreachable")  # pragma: no cover

    def _series_download(self, task: SeriesTask) -> contextlib.AbstractContextManager[bool]:
        """The controller's count of series downloading, giving whether connections are spare
        and ``task``'s instances worth a request each (``ConnectionController.series_download``)."""
        if self.connections is None:
            return contextlib.nullcontext(False)
        count, size = task.image_count or 0, task.file_size or 0
        return self.connections.series_download(size / count if count > 0 and size > 0 else None)

    def _connection(self) -> contextlib.AbstractAsyncContextManager[None]:
        """One of the engine's connections for a body, or none without a controller."""
        return self.connections.connection() if self.connections is not None else contextlib.nullcontext()

    async def _add_annotations(self, task: SeriesTask, unpacked: UnpackedSeries, staging: Path,
                               rate: RateLimiter | None, on_bytes: Callable[[int], None],
                               sinks: Sinks) -> AnnotatedSeries:
        """Fetch the series' annotation files (getDCMImage), streamed into the store's annotation
        sink, which places them beside its verified DICOM files in ``staging``; raises what the
        sink and the download raise."""
        # getDCMImage sends the series' images again, then its annotations: the series' own
        # bound plus room for one annotation file of the largest size accepted
        bound = download_bound(task.file_size, task.image_count, self.client.config.limits)
        bound = None if bound is None else bound + MAX_ANNOTATION_BYTES
        names = [f.name for f in unpacked.files]
        async with self.download_limiter or contextlib.nullcontext():
            found = await stream_series_zip(AnnotationOpener(self.client), task.series_uid,  # type: ignore[arg-type]
                                            task.collection, lambda: sinks.annotations_zip(task, staging, taken=names),
                                            chunk_size=self.client.config.chunk_size, rate=rate, on_bytes=on_bytes,
                                            max_bytes=bound)
        # every field of the unpacked series is carried over, whatever fields it has
        carried = {f.name: getattr(unpacked, f.name) for f in dataclasses.fields(unpacked)}
        return AnnotatedSeries(**carried, annotations=tuple(found))
