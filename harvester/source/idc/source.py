"""Imaging Data Commons' public buckets as a ``Source``: plan from the IDC index, fetch each
series' instances with anonymous S3 GETs.

Plan: ``harvester.source.idc.index.select`` (in a worker thread) finds the rows each selector
matches, by the rules every source shares (``Selector.matches``, ``Exclusion.excludes``); the
union is de-duplicated, excluded, ordered and limited as the NBIA planner does. A listed series
the index lacks (or whose row is unusable) goes to ``Plan.unavailable`` (``config.strict``:
``UnknownSelectionError``).

Fetch, per series (``fetch_series``):

1. ListObjectsV2 of ``s3://<aws_bucket>/<crdc_series_uuid>/`` (every page; bounded by
   ``Limits.max_entries``). Every key must be the prefix plus one plain file name, else
   ``UnsafeArchiveError`` (nothing is fetched). The listing must hold exactly ``instanceCount``
   objects and ``round(series_size_MB * 1e6)`` bytes: more is ``IntegrityError`` (not the
   announced series), fewer ``IncompleteSeriesError``; both before any GET.
2. Up to ``OBJECTS_IN_FLIGHT`` GETs at once, each with request-level retries and bounded by the
   size listed (a longer body is ``IntegrityError``, a shorter one is retried). An object up to
   ``WHOLE_OBJECT_BYTES`` is read whole, its bytes held of the run's budget (``budget.py``: every
   series together, ``OBJECT_BYTES_IN_FLIGHT``) from before its GET until it is written, and
   handed, with whatever else has arrived (up to ``BATCH_BYTES``), to the store's instance sink
   in one worker-thread call (``S3Client.writers``), in pieces of ``WRITE_STEP``; a larger one is
   streamed into the sink as it arrives, its request retried until the answer is there and a
   failure of its body failing the attempt at the series (``IncompleteSeriesError``).
3. The sink (``Sinks.instances``, the one DICOMweb's parts go through) writes each object to a new
   file in ``staging`` while hashing it, reads its DICOM header and holds its SeriesInstanceUID to
   the task's and its SOPInstanceUID new in the series, and names it ``<SOPInstanceUID>.dcm``;
   then its MD5 is held to the ETag where the ETag is one (a multipart ETag, ``...-N``, is not:
   the file is then recorded with ``md5_source: computed``). Any failure is ``IntegrityError``
   naming the object's key.

The source's figures (count, bytes, bucket, UUID, DOI) are kept in the series' row, so
harvest.json records where each series came from (``metadata.source: idc``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from anyio.abc import ObjectSendStream

from harvester.config import Config
from harvester.errors import (
    IncompleteSeriesError,
    IntegrityError,
    RetryableRequestError,
    UnsafeArchiveError,
)
from harvester.models import Plan, SeriesTask, UnavailableSeries
from harvester.selection import empty_selector_warnings, first_error, refuse_unavailable
from harvester.query import Query
from harvester.source.base import ClientBackedSource, InstanceWriter, Sinks, fresh_staging
from harvester.source.http import CLIENT_ERRORS, BodyGuard, as_int, classify_client_error
from harvester.source.idc import index as idc_index
from harvester.source.idc.budget import SeriesShare
from harvester.source.idc.s3 import S3Client, S3Object
from harvester.models import UnpackedSeries, VerifiedFile

#: Objects of one series fetched at once (each is its own S3 object: no per-connection cap).
OBJECTS_IN_FLIGHT = 8
#: Whole objects of one series that have arrived and wait for the writer, at most.
OBJECTS_WAITING = 4
#: An object up to this size is read whole (its GET retried alone) and written in a batch with
#: others; a larger one is streamed into the sink.
WHOLE_OBJECT_BYTES = 8 << 20
#: Bytes handed to the sink in one worker-thread call, at most (plus one object).
BATCH_BYTES = 4 << 20
#: An object is handed to the sink in pieces of this size: each is hashed and at once written
#: while it is in the CPU's cache (hashing the whole object, then writing it, read it from memory
#: twice: the kernel's copy into the page cache cost about a third more system time).
WRITE_STEP = 128 << 10
NO_SERIES = "the IDC index has no such series"
UNKNOWN_UID_HINT = ("the series may not be in IDC (restricted, NLST, or newer than the index); check the UIDs, "
                    "or leave out --strict to harvest the rest")


class IDCSource(ClientBackedSource):
    """IDC's buckets as a ``Source`` (see the module docstring)."""

    def __init__(self, config: Config, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.client = S3Client(config, session)

    # ------------------------------------------------------------ plan
    async def plan(self, query: Query, *, details: bool = True) -> Plan:
        """The index's rows for ``query`` (``details`` changes nothing: the index has them all).
        Raises ``UsageError`` for an index that cannot be read, ``UnknownSelectionError`` for an
        unknown collection (and, with ``config.strict``, for listed series the index lacks)."""
        path = Path(self.config.idc_index) if self.config.idc_index else idc_index.default_index()
        found = await anyio.to_thread.run_sync(idc_index.select, path, query)
        rows = {r["SeriesInstanceUID"]: r for r in found.rows}
        unavailable: dict[str, UnavailableSeries] = {}
        for sel in query.selectors:
            for uid in sel.series:
                if uid not in rows and uid not in unavailable:
                    unavailable[uid] = UnavailableSeries(uid, sel.origin, found.unusable.get(uid, NO_SERIES))
        if self.config.strict:
            refuse_unavailable(list(unavailable.values()), archive="the IDC index", hint=UNKNOWN_UID_HINT)
        kept = [r for r in rows.values() if not query.exclude.excludes(r)]
        ordered = sorted(kept, key=lambda r: (r["Collection"], r["PatientID"], r["StudyInstanceUID"],
                                              r["SeriesInstanceUID"]))
        if query.limit is not None:
            ordered = ordered[: query.limit]
        return Plan(tasks=[self._task(r) for r in ordered], unavailable=list(unavailable.values()),
                    warnings=empty_selector_warnings(query.selectors, found.per_selector))

    @staticmethod
    def _task(row: dict[str, Any]) -> SeriesTask:
        study = {"StudyInstanceUID": row["StudyInstanceUID"], "StudyDate": row.get("StudyDate"),
                 "StudyDescription": row.get("StudyDesc", ""), "PatientID": row["PatientID"]}
        patient = {"PatientId": row["PatientID"], "PatientSex": row.get("PatientSex", ""),
                   "Collection": row["Collection"]}
        return SeriesTask(series_uid=row["SeriesInstanceUID"], collection=row["Collection"],
                          patient_id=row["PatientID"], study_uid=row["StudyInstanceUID"],
                          modality=row.get("Modality", ""), image_count=as_int(row.get("ImageCount")),
                          file_size=as_int(row.get("FileSize")), row=row, study=study, patient=patient)

    # ------------------------------------------------------------ fetch
    async def fetch_series(self, task: SeriesTask, *, partial: Path, staging: Path,
                           on_bytes: Callable[[int], None], rate: Any, sinks: Sinks) -> UnpackedSeries:
        """List the series' prefix, check the listing, GET every object (``OBJECTS_IN_FLIGHT`` at
        once) and pour each into the store's instance sink (``sinks.instances``), which checks it
        as DICOM of the series and names it; ``partial`` is not used. See the module docstring
        for what is raised when."""
        bucket, prefix = str(task.row["aws_bucket"]), f"{task.row['crdc_series_uuid']}/"
        objects = await self.client.list_objects(bucket, prefix, max_keys=self.config.limits.max_entries)
        self._check_listing(task, prefix, objects)
        await anyio.to_thread.run_sync(fresh_staging, staging)
        series = _SeriesObjects(task, sinks.instances(task, staging, max_instances=len(objects), what="object",
                                                      sender=f"s3 prefix {prefix}"))
        # whole objects travel from their GETs to the one writer below: each holds its bytes of the
        # run's budget (``S3Client.budget``, every series together) from before its GET until it
        # is written; per series at most OBJECTS_IN_FLIGHT arriving, OBJECTS_WAITING waiting and
        # one batch being written
        send, receive = anyio.create_memory_object_stream[tuple[S3Object, bytes | memoryview, int]](OBJECTS_WAITING)
        # the sink takes one instance at a time: the writer's batches and a streamed object take
        # turns; a series without such an object has no turns to take (an uncontended anyio Lock
        # still yields to the loop on every acquire: a tenth of the loop thread's time)
        turn: Any = anyio.Lock() if any(o.size > WHOLE_OBJECT_BYTES for o in objects) else contextlib.nullcontext()

        pending = iter(objects)
        shown_prefix = self.client.shown_url(bucket, "")   # redacted once; keys are only quoted after it
        share = SeriesShare(self.client.budget)

        async def lane(out: ObjectSendStream[tuple[S3Object, bytes | memoryview, int]]) -> None:
            # OBJECTS_IN_FLIGHT lanes share one iterator (taking the next object never awaits):
            # one task per lane, not one per object
            async with out:
                for obj in pending:
                    if obj.size > WHOLE_OBJECT_BYTES:
                        async with turn:
                            await self._stream_object(task, bucket, obj, series, on_bytes, rate)
                        continue
                    taken = await share.take(self.client.held_bytes(obj.size))
                    body = await self.client.call_retrying(
                        functools.partial(self._read_object, task, bucket, obj, on_bytes, rate, shown_prefix))
                    await out.send((obj, body, taken))

        async def write_all() -> None:
            # one worker-thread call per batch: whatever has arrived, up to BATCH_BYTES
            async with receive:
                async for first in receive:
                    batch, held = [first], len(first[1])
                    while held < BATCH_BYTES:
                        try:
                            item = receive.receive_nowait()
                        except (anyio.WouldBlock, anyio.EndOfStream):
                            break
                        batch.append(item)
                        held += len(item[1])
                    async with turn:
                        await anyio.to_thread.run_sync(series.write_batch, batch, limiter=self.client.writers)
                    for _, body, taken in batch:   # written and checked: their buffers may carry others
                        self.client.give_back(body)
                        share.give_back(taken)
                    del batch, first, body   # not held while the next object is awaited

        try:  # the first error cancels the other GETs of the series and propagates
            # closed even when the group is cancelled before a task starts; what the series still
            # holds of the budget (objects that were waiting) goes back however it ends
            with send, receive, share.open():
                async with self.client.in_use(), anyio.create_task_group() as tg:
                    with send:
                        for _ in range(min(OBJECTS_IN_FLIGHT, len(objects))):
                            tg.start_soon(lane, send.clone())
                    tg.start_soon(write_all)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        return UnpackedSeries(files=sorted(series.files, key=lambda f: f.name), license_text=None, repairs=[])

    def _check_listing(self, task: SeriesTask, prefix: str, objects: list[S3Object]) -> None:
        uid = task.series_uid
        limits = self.config.limits
        for obj in objects:
            name = obj.key.removeprefix(prefix)
            if (not obj.key.startswith(prefix) or not name or name in (".", "..") or "/" in name or "\\" in name
                    or any(ord(c) < 32 for c in name)):
                raise UnsafeArchiveError(f"the listing of s3 prefix {prefix} holds the key {obj.key[:120]!r}, "
                                         "which is not a file of that prefix", series_uid=uid)
            if obj.size > limits.max_entry_bytes:
                raise UnsafeArchiveError(f"the listing says {obj.key[:120]!r} is {obj.size} bytes "
                                         f"(limit {limits.max_entry_bytes} per file)", series_uid=uid)
        count, size = len(objects), sum(o.size for o in objects)
        if task.image_count is not None and count > task.image_count:
            raise IntegrityError(f"s3 prefix {prefix} holds {count} objects, more than the {task.image_count} "
                                 "the IDC index announced: not the announced series", series_uid=uid)
        if task.image_count is not None and count < task.image_count:
            raise IncompleteSeriesError(f"s3 prefix {prefix} holds {count} of {task.image_count} objects",
                                        series_uid=uid)
        if task.file_size is not None and size > task.file_size:
            raise IntegrityError(f"s3 prefix {prefix} holds {size} bytes, more than the {task.file_size} the IDC "
                                 "index announced: not the announced series", series_uid=uid)
        if task.file_size is not None and size < task.file_size:
            raise IncompleteSeriesError(f"s3 prefix {prefix} holds {size} of {task.file_size} bytes", series_uid=uid)
        if not objects:
            raise IncompleteSeriesError(f"s3 prefix {prefix} holds no object", series_uid=uid)

    async def _read_object(self, task: SeriesTask, bucket: str, obj: S3Object, on_bytes: Callable[[int], None],
                           rate: Any, shown_prefix: str | None = None) -> bytes | memoryview:
        """One attempt at one object: its whole body (over ``S3Client.read_object`` when it can).
        Raises ``IntegrityError`` for a body longer than listed, ``RetryableRequestError`` for a
        shorter one. ``shown_prefix``: ``S3Client.shown_url(bucket, "")``, when the caller has it."""
        shown, guard = self._guard(task, bucket, obj, shown_prefix)
        if rate is None:   # the bandwidth cap meters pieces as they arrive: only open_object does
            whole = await self.client.read_object(bucket, obj.key, guard, shown)
            if whole is not None:
                if guard.total != obj.size:
                    raise RetryableRequestError(f"{shown} sent {guard.total} of the {obj.size} bytes listed",
                                                url=shown)
                on_bytes(guard.total)
                return whole
            shown, guard = self._guard(task, bucket, obj, shown_prefix)   # asked again through aiohttp
        pieces: list[bytes] = []
        async with self.client.open_object(bucket, obj.key, shown) as resp:
            async for chunk in resp.content.iter_chunked(self.config.chunk_size):
                await self._took(guard, chunk, None, rate)
                pieces.append(chunk)
        if guard.total != obj.size:
            raise RetryableRequestError(f"{shown} sent {guard.total} of the {obj.size} bytes listed", url=shown)
        on_bytes(guard.total)   # once an object (one progress event, not one a piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def _stream_object(self, task: SeriesTask, bucket: str, obj: S3Object, series: _SeriesObjects,
                             on_bytes: Callable[[int], None], rate: Any) -> None:
        """An object past ``WHOLE_OBJECT_BYTES``, poured into the sink as it arrives (the caller
        holds the sink's turn), in worker-thread calls of ``BATCH_BYTES``. The request is retried
        until its answer (HTTP 200) is there; a failure of the body after that is the series'
        (``IncompleteSeriesError``: the sink cannot take an instance back), and so is a body
        shorter than listed; a longer one is ``IntegrityError``."""
        async for attempt in self.client.retrying():
            with attempt:
                shown, guard = self._guard(task, bucket, obj)
                async with self.client.open_object(bucket, obj.key, shown) as resp:
                    await self._pour(task, obj, resp, series, shown, guard, on_bytes, rate)

    async def _pour(self, task: SeriesTask, obj: S3Object, resp: aiohttp.ClientResponse, series: _SeriesObjects,
                    shown: str, guard: BodyGuard, on_bytes: Callable[[int], None], rate: Any) -> None:
        def broke_off(reason: str) -> IncompleteSeriesError:
            return IncompleteSeriesError(f"{reason} (after {guard.total} of the {obj.size} bytes of the object)",
                                         series_uid=task.series_uid)

        pending: list[bytes] = []
        held = 0
        await anyio.to_thread.run_sync(series.start)
        try:
            async for chunk in resp.content.iter_chunked(self.config.chunk_size):
                await self._took(guard, chunk, on_bytes, rate)
                pending.append(chunk)
                held += len(chunk)
                if held >= BATCH_BYTES:
                    await anyio.to_thread.run_sync(series.write, pending)
                    pending, held = [], 0
            if guard.total != obj.size:
                raise broke_off(f"{shown} sent {guard.total} of the {obj.size} bytes listed")
            await anyio.to_thread.run_sync(series.end, obj, pending)
        except CLIENT_ERRORS as exc:
            series.abort()
            raise broke_off(str(classify_client_error(exc, shown))) from None
        except RetryableRequestError as exc:   # the guard's deadline or stall rule
            series.abort()
            raise broke_off(str(exc)) from None
        except BaseException:
            series.abort()
            raise

    def _guard(self, task: SeriesTask, bucket: str, obj: S3Object,
               shown_prefix: str | None = None) -> tuple[str, BodyGuard]:
        shown = self.client.shown_url(bucket, obj.key, shown_prefix)

        def too_long(total: int) -> IntegrityError:
            return IntegrityError(f"{shown} sent more than the {obj.size} bytes listed", series_uid=task.series_uid)

        return shown, BodyGuard(self.config, shown, max_bytes=obj.size, too_big=too_long)

    @staticmethod
    async def _took(guard: BodyGuard, chunk: bytes, on_bytes: Callable[[int], None] | None, rate: Any) -> None:
        """Account for one piece of a body: its bounds, the bandwidth cap, the progress (None:
        the caller reports it)."""
        guard.feed(len(chunk))
        if rate is not None:
            ours = time.monotonic()
            await rate.consume(len(chunk))
            guard.credit(time.monotonic() - ours)
        if on_bytes is not None:
            on_bytes(len(chunk))


class _SeriesObjects:
    """A series' objects poured into the store's ``InstanceSink`` (which checks each as DICOM of
    the series, new in it, and names it after its SOPInstanceUID), each then held to its ETag
    where that is an MD5. Blocking: called from worker threads, one at a time (the caller's
    turn), so the sink sees one instance after another."""

    def __init__(self, task: SeriesTask, sink: InstanceWriter) -> None:
        self.task, self.sink = task, sink
        self.files: list[VerifiedFile] = []

    def write_batch(self, batch: list[tuple[S3Object, bytes | memoryview, int]]) -> None:
        for obj, body, _ in batch:
            self.start()
            self.end(obj, [body])

    def start(self) -> None:
        self.sink.start()

    def write(self, pieces: list[bytes] | list[bytes | memoryview]) -> None:
        try:
            for piece in pieces:
                if len(piece) <= WRITE_STEP:
                    self.sink.write(piece)
                    continue
                view = memoryview(piece)
                for at in range(0, len(view), WRITE_STEP):
                    self.sink.write(view[at:at + WRITE_STEP])
        except BaseException:
            self.sink.abort()
            raise

    def end(self, obj: S3Object, pieces: list[bytes] | list[bytes | memoryview]) -> None:
        """The object's last bytes, then its checks; raises ``IntegrityError`` naming its key."""
        self.write(pieces)
        key = obj.key[-120:]
        try:
            verified = self.sink.end()
        except IntegrityError as exc:
            raise IntegrityError(f"{key}: {exc}", series_uid=self.task.series_uid) from None
        expected = obj.md5
        if expected is not None and verified.md5 != expected:
            raise IntegrityError(f"{key} does not match its ETag (MD5 {verified.md5}, expected {expected})",
                                 series_uid=self.task.series_uid)
        self.files.append(dataclasses.replace(verified, md5_checked=expected is not None))

    def abort(self) -> None:
        self.sink.abort()

