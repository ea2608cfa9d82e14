"""The seam between the engine and an archive: where bytes come from.

An archive type (``source/nbia/``, ``source/dicomweb/``) implements ``Source``. The engine and
the operations only ever call these methods, so a new archive is one new package, not a fork
of the engine (httpx's transports, rclone's backends).

Abilities only some archives have are protocols of their own (rclone's ``fs/features.go``),
checked with ``isinstance`` against these ``runtime_checkable`` classes, never with ``hasattr``:

* ``SingleInstanceFetch``: one instance by its SOPInstanceUID (NBIA's getSingleImage), poured
  into an ``InstanceTarget`` as it arrives; repair refetches the whole series from a source
  without it.
* ``UpdateFeed``: the series released or updated since a time (NBIA's getUpdatedSeries); sync
  then relies on counts and sizes alone.
* ``PlanInto``: the planner writes its tasks into a store as it makes them (a harvest's plan:
  ``harvester.store.plan``), so the plan is never one list in memory; a source without it plans
  into a list, which the caller then stores.
* ``DownloadSlots``: the source holds the engine's download limiter only while bytes move, so
  that verifying never keeps a connection slot (the engine holds it for the whole series
  otherwise), and one of the engine's ``ConnectionController`` connections for each body it
  streams.

A source moves bytes; the store checks them. The engine hands ``fetch_series`` a ``Sinks``
(``harvester.store.sink.StoreSinks``), and the source pours what arrives into the sink it opens
there: a series ZIP as a stream (``SeriesZipSink``), or instances one by one
(``InstanceWriter``), or whole instances several at once, kept across attempts
(``ParallelInstanceWriter``). So no source imports the store, and every archive's bytes pass the same
checks (count, sizes, MD5, CRC, DICOM header, series UID) as they arrive.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import anyio

from harvester.concurrency import ConnectionController
from harvester.errors import classify_os_error
from harvester.models import AnnotationFile, Plan, SeriesTask, TaskStore, UnpackedSeries, VerifiedFile
from harvester.query import Query
from harvester.rate import RateLimiter


class SeriesZipSink(Protocol):
    """One series ZIP, verified and unpacked into its staging folder as its bytes arrive.

    ``feed``/``flush``/``close`` raise the series' classified errors (``IntegrityError``,
    ``UnsafeArchiveError``, ``IncompleteSeriesError``, ``OversizeDownloadError``, the disk's
    ``DiskFullError``/``OutputNotWritableError``); a sink that raised, or was ``discard``-ed (for
    an attempt that failed elsewhere), has removed the staging folder it made."""

    async def feed(self, chunk: bytes) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> UnpackedSeries: ...

    def discard(self) -> None: ...


class AnnotationSink(Protocol):
    """The annotation files of a getDCMImage ZIP, streamed beside the series' verified files:
    as ``SeriesZipSink``, but ``close`` gives the ``AnnotationFile``s; one that raised or was
    discarded has removed the files it wrote."""

    async def feed(self, chunk: bytes) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> list[AnnotationFile]: ...

    def discard(self) -> None: ...


class InstanceWriter(Protocol):
    """Instances of one series that arrive one after another (blocking: call it from a worker
    thread): ``start``, ``write`` its bytes, ``end`` checks it and names it after its
    SOPInstanceUID. Raises ``IntegrityError`` for an instance that is not what was announced and
    the disk's errors; ``abort`` closes an instance left open by an error."""

    series_uid: str
    files: list[VerifiedFile]

    @property
    def count(self) -> int: ...

    def start(self) -> None: ...

    def write(self, data: bytes | memoryview) -> None: ...

    def end(self) -> VerifiedFile: ...

    def abort(self) -> None: ...


class InstanceUpload(Protocol):
    """One instance of a ``ParallelInstanceWriter`` as its bytes arrive (blocking: call it from a
    worker thread): ``write_all`` writes pieces at once (never the whole instance in memory),
    ``commit`` checks it (the archive's MD5, or ``""``; DICOM of the series, the instance asked
    for) and keeps it; ``abandon`` removes what was written (safe after anything). Raises
    ``IntegrityError`` and the disk's errors."""

    def write_all(self, pieces: Sequence[bytes]) -> None: ...

    def commit(self, archive_md5: str) -> VerifiedFile: ...

    def abandon(self) -> None: ...


class InstanceTarget(Protocol):
    """Where a single-instance fetch pours one instance's bytes as they arrive, so that it is
    never held whole (blocking: call it from a worker thread): ``restart`` before each attempt
    (what an earlier attempt wrote is dropped), then ``write_all`` for each batch of pieces.
    Raises the disk's errors."""

    def restart(self) -> None: ...

    def write_all(self, pieces: Sequence[bytes]) -> None: ...


class RepairTarget(InstanceTarget, Protocol):
    """An ``InstanceTarget`` that is a new file beside the one it repairs (``Sinks.repair_file``):
    ``close`` fsyncs and closes it and gives its MD5; ``abandon`` removes it (safe after
    anything)."""

    @property
    def path(self) -> Path: ...

    def close(self) -> str: ...

    def abandon(self) -> None: ...


class ParallelInstanceWriter(Protocol):
    """Instances of one series, several at once, from any thread (blocking: call it from
    worker threads): ``staged`` gives an instance a previous attempt kept (checked again), or
    None; ``open`` starts one streamed in (``InstanceUpload``), ``write`` checks and keeps one
    held whole; ``finish`` checks the series (count, sizes) and leaves its files in staging.
    Raises ``IntegrityError``/``IncompleteSeriesError`` and the disk's errors; the instances
    verified so far outlive a failure, for the next attempt."""

    def staged(self, sop_uid: str, archive_md5: str) -> VerifiedFile | None: ...

    def open(self, sop_uid: str) -> InstanceUpload: ...

    def write(self, sop_uid: str, data: bytes, archive_md5: str) -> VerifiedFile: ...

    def finish(self) -> UnpackedSeries: ...


class Sinks(Protocol):
    """Where a source puts the bytes it moves (the store's ``StoreSinks``), given by the engine."""

    def series_zip(self, task: SeriesTask, staging: Path, *, max_repairs: int) -> SeriesZipSink:
        """A fresh sink for one attempt at ``task``'s ZIP, unpacking into ``staging``."""
        ...

    def annotations_zip(self, task: SeriesTask, staging: Path, *, taken: Sequence[str]) -> AnnotationSink:
        """A fresh sink for one attempt at ``task``'s annotated ZIP, writing its annotation files
        into ``staging`` beside the series' files (``taken``: their names)."""
        ...

    def instances(self, task: SeriesTask, staging: Path, *, max_instances: int, what: str = "instance",
                  sender: str = "the archive") -> InstanceWriter:
        """A writer for ``task``'s instances into ``staging`` (created, or emptied, by the caller)."""
        ...

    def parallel_instances(self, task: SeriesTask, staging: Path, *, names: dict[str, str]) -> ParallelInstanceWriter:
        """A writer for ``task``'s instances fetched one by one (``names``: SOPInstanceUID -> the
        name its ZIP entry would have), ``staging`` made by its ``finish``."""
        ...

    def repair_file(self, folder: Path, name: str) -> RepairTarget:
        """A new file ``folder/name`` (an earlier one of that name is replaced) for one instance
        refetched alone (``SingleInstanceFetch.fetch_instance``)."""
        ...


@runtime_checkable
class Source(Protocol):
    """One archive. Implementations raise the classified errors of ``harvester.errors``."""

    #: the archive type harvest.json records (``"nbia"``, ``"dicomweb"``: ``config.SOURCES``)
    kind: str

    #: HTTP requests sent and request-level retries so far (for summaries and benchmarks)
    requests: int
    retries: int
    #: called before each request-level retry with the error (``str`` is one line, no secrets)
    on_retry: Callable[[BaseException], None] | None

    async def plan(self, query: Query, *, details: bool = True) -> Plan:
        """Expand a query into the exact list of series tasks; listed series the archive does not
        give go to ``Plan.unavailable`` (``config.strict``: ``UnknownSelectionError``).

        ``details=False``: only the series and their sizes are wanted (``harvester plan``); a
        source may then skip the study and patient records layouts and the manifest use.
        """
        ...

    async def fetch_series(self, task: SeriesTask, *, partial: Path, staging: Path,
                           on_bytes: Callable[[int], None], rate: RateLimiter | None,
                           sinks: Sinks) -> UnpackedSeries:
        """Download one series and leave its verified files in ``staging`` (created), poured
        through a sink of ``sinks`` as the bytes arrive.

        ``partial`` is a scratch file the source may use for a download no sink takes (NBIA's
        getDCMImage annotations). Raises
        ``SeriesError`` subclasses (retry the series later / give up), request errors, or
        ``FatalError``. The caller removes ``partial`` and ``staging`` on failure.
        """
        ...


@runtime_checkable
class SingleInstanceFetch(Protocol):
    """A source that can fetch one instance alone."""

    async def fetch_instance(self, task: SeriesTask, sop_uid: str, into: InstanceTarget) -> int:
        """Pour the bytes of instance ``sop_uid`` of ``task``'s series, as the archive stores it,
        into ``into`` as they arrive (never the whole instance in memory, whatever its size);
        returns how many there were. The caller checks MD5 and header. Raises the request
        errors of ``harvester.errors`` and ``into``'s."""
        ...


@runtime_checkable
class UpdateFeed(Protocol):
    """A source that can say which series changed since the last sync."""

    async def updated_since(self, last_sync: str | None) -> set[str]:
        """SeriesInstanceUIDs released or updated since ``last_sync`` (harvest.json's ISO time;
        empty when None or unreadable). Raises request errors."""
        ...


@runtime_checkable
class PlanInto(Protocol):
    """A source whose planner hands its tasks to a ``TaskStore`` as it makes them."""

    async def plan_into(self, query: Query, tasks: TaskStore, *, details: bool = True) -> Plan:
        """``Source.plan``, with every task added to ``tasks`` in the plan's order instead of
        kept: the Plan returned has no ``tasks`` and ``stored`` is ``tasks``. Raises as ``plan``."""
        ...


@runtime_checkable
class DownloadSlots(Protocol):
    """A source that holds the engine's download limiter only while bytes move, and a connection
    of ``connections`` (``harvester.concurrency``) for each body it streams."""

    download_limiter: anyio.CapacityLimiter | None
    connections: ConnectionController | None


class ClientBackedSource:
    """Mixin for sources whose request counters and retry hook live on ``self.client``."""

    client: Any

    @property
    def requests(self) -> int:
        return int(self.client.requests)

    @property
    def retries(self) -> int:
        return int(self.client.retries)

    @property
    def on_retry(self) -> Callable[[BaseException], None] | None:
        return self.client.on_retry  # type: ignore[no-any-return]

    @on_retry.setter
    def on_retry(self, fn: Callable[[BaseException], None] | None) -> None:
        self.client.on_retry = fn


def fresh_staging(path: Path) -> None:
    """An empty staging folder at ``path`` (what an earlier attempt left there removed), for a
    source that hands its files to the sink one by one; raises classify_os_error's error."""
    if path.exists():
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise classify_os_error(exc, f"staging folder {path.name}") from None
