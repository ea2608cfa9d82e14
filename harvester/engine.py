"""The harvest engine: a bounded pool of workers that fetch, verify, unpack and commit series.

Flow per series: ``Source.fetch_series`` moves the bytes into a sink of the store that the
engine hands it (``StoreSinks``: for NBIA the ZIP is verified (count, size, MD5, CRC, DICOM)
and unpacked as it streams, with request-level retries; single instances repaired) ->
``HarvestState.commit`` (database row, then atomic rename). A series that fails with a
retryable error is put back in the queue after a backoff (series-level retry, like rclone's
two levels); a permanent failure is recorded and the others go on; a ``FatalError`` (disk
full, bad credentials) cancels every worker and propagates, leaving only verified series
under final names.

Concurrency: ``config.workers`` downloads at most; an ``AdaptiveLimit`` lowers that
multiplicatively when the server pushes back (429/503/timeouts that are a good share of the
requests, ``harvester.concurrency.PushBackFilter``, or a series that failed on one) and raises
it additively while healthy. A source that takes the download slot itself (``download_limiter``, as NBIA does)
lets up to twice as many series be in flight, the others verifying, unpacking or committing;
otherwise a slot covers the whole attempt. Such a source also holds one connection of a
``ConnectionController`` (``harvester.concurrency``) per body it streams: the controller finds
how many connections the link takes (up to ``config.max_connections``), and the ones a series'
ZIP leaves free go to instance-level fetching. The HTTP session's pool caps every request.
"""
from __future__ import annotations

import contextlib
import functools
import math
import random
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from harvester.concurrency import ConnectionController, PushBackFilter
from harvester.config import Config
from harvester.containment import inside
from harvester.errors import (
    FatalError,
    HarvesterError,
    RequestError,
    RetryableRequestError,
    SeriesError,
    classify_os_error,
    should_retry_series,
)
from harvester.store.layout import safe_component
from harvester.store.sink import StoreSinks, prune_resume_folders
from harvester.models import AnnotatedSeries, SeriesTask, TaskStore
from harvester.events import Event, Hub
from harvester.rate import RateLimiter
from harvester.source.base import DownloadSlots, Source
from harvester.store.state import HarvestState, atomic_write, now_iso, totals_of

MANIFEST_EVERY = 30.0  # seconds between harvest.json rewrites during a run
PLAN_BATCH = 256       # tasks looked at a time (a stored plan is read in batches of this size)


@dataclass
class HarvestResult:
    out_dir: Path
    totals: dict[str, int]
    failed: list[tuple[str, str]]
    downloaded: int
    skipped: int
    bytes_received: int
    requests: int
    retries: int
    elapsed: float
    fatal: str | None = None
    #: (uid, reason) of the series a cart or list asked for that the archive did not give
    unavailable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Everything asked for is complete: nothing failed, nothing was unavailable, no fatal stop."""
        return not self.failed and not self.unavailable and self.fatal is None


class AdaptiveLimit:
    """AIMD concurrency: halve on push-back, +1 after a run of successes; within [1, maximum].

    Push-backs closer together than ``cooldown`` seconds count once (TCP's one decrease per
    round trip): a wave of 429s seen by N workers at the same moment is one signal, and must
    not collapse the limit from N to 1, which would then take N*N/2 successes to undo.
    """

    def __init__(self, maximum: int, *, cooldown: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.maximum = max(1, maximum)
        self.limiter = anyio.CapacityLimiter(self.maximum)
        self.cooldown = cooldown
        self._clock = clock
        self._healthy = 0
        self._last_push: float | None = None

    @property
    def current(self) -> int:
        return int(self.limiter.total_tokens)

    def push_back(self) -> None:
        self._healthy = 0
        now = self._clock()
        if self._last_push is not None and now - self._last_push < self.cooldown:
            return
        self._last_push = now
        self.limiter.total_tokens = max(1, math.floor(self.current / 2))

    def healthy(self) -> None:
        self._healthy += 1
        if self._healthy >= self.current and self.current < self.maximum:
            self._healthy = 0
            self.limiter.total_tokens = self.current + 1


@dataclass
class _Job:
    task: SeriesTask
    path: str
    attempts: int = 0
    errors: list[str] = field(default_factory=list)


class Engine:
    """Runs a list of ``SeriesTask``s from a ``Source`` into ``state``'s output directory."""

    def __init__(self, config: Config, source: Source, state: HarvestState, hub: Hub) -> None:
        self.config = config
        self.source = source
        self.state = state
        self.hub = hub
        self.limit = AdaptiveLimit(config.workers, cooldown=config.backoff_base)
        # A source with a ``download_limiter`` holds a slot only while bytes stream (NBIA: the
        # ZIP); the engine then keeps up to twice as many series in flight, so verifying,
        # unpacking and committing one series overlaps the next one's download and `workers`
        # connections stay busy. Other sources hold a slot for the whole attempt.
        self._slots_in_source = isinstance(source, DownloadSlots)
        ceiling = min(config.max_connections, config.connections)
        self.connections = ConnectionController(min(config.workers, ceiling), ceiling, cooldown=config.backoff_base)
        if isinstance(source, DownloadSlots):
            source.download_limiter = self.limit.limiter
            source.connections = self.connections
        self.rate = RateLimiter(config.max_rate) if config.max_rate else None
        #: the store's sinks every source pours its bytes into (verified as they arrive)
        self.sinks = StoreSinks(config.limits, config.chunk_size, resume_root=state.meta_dir / "instances")
        self._licenses: set[str] = set()
        self._rng = random.Random()
        self._refresh_failed: dict[str, str] = {}  # uid -> why a refetch failed (its old copy is kept)
        #: which overload answers are a push-back: a share of the requests, not one answer
        self.overload = PushBackFilter()
        source.on_retry = self._on_request_retry

    def _on_request_retry(self, exc: BaseException) -> None:
        # 429, 503 or a timeout: the server may be struggling; it is when such answers are a
        # good share of the requests (``PushBackFilter``), not at one among many that succeed
        if getattr(exc, "overload", False) and self.overload.overloaded(self.source.requests):
            self.limit.push_back()
            self.connections.push_back()
        self.hub.emit(Event("retry", message=str(exc)))

    async def run(self, tasks: Iterable[SeriesTask] | TaskStore, header: dict[str, Any],
                  refetch: frozenset[str] = frozenset()) -> HarvestResult:
        """Harvest ``tasks`` (a list, or a stored plan: ``harvester.store.plan``, read a batch at a
        time); complete series are skipped unless listed in ``refetch`` (their old copy stays in
        place until the new one is verified and committed)."""
        started = time.monotonic()
        header = dict(header, started=now_iso(), finished=None)
        planned = _Planned(tasks)
        order = planned.order
        # One pass over the plan, a batch at a time: each complete series is skipped; the others
        # get their folders through the state's folder database (SQLite, off the event loop, as
        # every database call), made on the first series to fetch (a run with nothing to do
        # never reads the folders taken). Only their folders stay in memory (one string each).
        paths: dict[str, str] = {}
        todo_bytes = 0
        skipped: list[tuple[str, int]] = []

        def wanted(uid: str) -> bool:     # (in a worker thread: the lookups are database reads)
            done = self.state.completed_bytes(uid)
            if done is not None and uid not in refetch:
                skipped.append((uid, done))
                return False
            return True

        with contextlib.ExitStack() as stack:
            assign: Callable[[list[tuple[str, dict[str, Any]]]], dict[str, str]] | None = None
            async for todo in planned.select(wanted):
                for uid, done in skipped:
                    self.hub.emit(Event("skip", uid, bytes=done))
                skipped.clear()
                if not todo:
                    continue
                if assign is None:
                    assign = await anyio.to_thread.run_sync(
                        stack.enter_context, self.state.path_assigner(self.config.layout))
                paths.update(await anyio.to_thread.run_sync(assign, [(t.series_uid, t.layout_fields()) for t in todo]))
                todo_bytes += sum(t.file_size or 0 for t in todo)
        self.hub.emit(Event("fetching", data={"series": len(paths), "bytes": todo_bytes}))
        await anyio.to_thread.run_sync(self.state.log_event, {"event": "run", "series": len(planned),
                                                              "todo": len(paths)})
        # a checkpoint: beyond CHECKPOINT_EXPORT_MAX_SERIES harvest.json waits for the end of the run
        await anyio.to_thread.run_sync(functools.partial(self.state.write_manifest, header, order, final=False))

        async def jobs() -> AsyncIterator[_Job]:
            async for batch in planned.select(paths.__contains__):
                for t in batch:
                    path = paths.pop(t.series_uid, None)   # once each, and let go
                    if path is not None:
                        yield _Job(t, path)

        fatal: FatalError | None = None
        todo_count = len(paths)
        try:
            await self._run_pool(jobs(), todo_count, header, order)
        except FatalError as exc:
            fatal = exc
        finally:
            header["finished"] = now_iso()
            if fatal is None and all(self.state.completed_bytes(u) is not None for u in order):
                # sync counts "what is new" from here (see harvester.operations)
                header["last_sync"] = header["started"]
            with anyio.CancelScope(shield=True):
                try:
                    totals = await anyio.to_thread.run_sync(self._checkpoint, header, order)
                except FatalError as exc:
                    # harvest.json could not be rewritten (disk full...): the database keeps every
                    # commit for the next run, but this run must not report success.
                    totals = self._totals(order)
                    fatal = fatal or exc
                except HarvesterError:
                    totals = self._totals(order)
                # instances kept for a series that is complete now (whichever way it came) or no
                # longer planned are of no use; those of the series still to do wait for a rerun
                kept = self.state.meta_dir / "instances"
                if kept.is_dir():
                    todo_uids = [u for u in order if self.state.completed_bytes(u) is None]
                    await anyio.to_thread.run_sync(prune_resume_folders, kept, todo_uids)
        self.hub.emit(Event("finish"))
        tally = self.hub.tally
        failed = [(u, (self.state.records.get(u) or {}).get("error") or "failed") for u in order
                  if self.state.completed_bytes(u) is None]
        # A refetch (sync of a changed series, repair) that failed leaves the copy already on disk
        # in place, but the user asked for a new one: a failure to report, not a success.
        failed += [(u, f"{why}; the copy already on disk is kept") for u, why in self._refresh_failed.items()
                   if self.state.complete(u) is not None]
        return HarvestResult(
            out_dir=self.state.out_dir, totals=totals, failed=failed,
            downloaded=tally.done_series, skipped=tally.skipped_series, bytes_received=tally.received_bytes,
            requests=self.source.requests, retries=tally.retries + tally.series_retries,
            elapsed=time.monotonic() - started, fatal=fatal.one_line() if fatal else None,
        )

    async def _run_pool(self, jobs: AsyncIterator[_Job], count: int, header: dict[str, Any],
                        order: Iterable[str]) -> None:
        """Run the ``count`` jobs ``jobs`` yields: fed into the queue as the workers take them
        (a plan's tasks are read a batch at a time, never all held), retries put back behind."""
        if not count:
            return
        send, receive = anyio.create_memory_object_stream[_Job](math.inf)
        pending = self.connections.unsettled = count
        in_flight = self.config.workers * (2 if self._slots_in_source else 1)
        # fresh jobs waiting in the queue, at most one per worker: a token each, given back when
        # a worker takes one (a retried job needs none: it was fed once)
        fresh = anyio.Semaphore(in_flight)
        # the first ones before any worker starts: each worker finds one waiting
        for _ in range(min(in_flight, count)):
            first = await anext(jobs, None)
            if first is None:
                break
            fresh.acquire_nowait()
            send.send_nowait(first)

        async def feed() -> None:
            async for job in jobs:
                await fresh.acquire()
                send.send_nowait(job)

        async def finished_one() -> None:
            nonlocal pending
            pending -= 1
            self.connections.unsettled = pending
            if pending == 0:
                send.close()

        async def requeue(job: _Job, delay: float) -> None:
            await anyio.sleep(delay)
            send.send_nowait(job)

        async def worker() -> None:
            async for job in receive:
                if job.attempts == 0:
                    fresh.release()
                if self._slots_in_source:
                    delay = await self._attempt(job)
                else:
                    async with self.limit.limiter:
                        delay = await self._attempt(job)
                if delay is None:
                    await finished_one()
                else:
                    tg.start_soon(requeue, job, delay)

        async def manifest_writer() -> None:
            while True:
                await anyio.sleep(MANIFEST_EVERY)
                await anyio.to_thread.run_sync(functools.partial(self._checkpoint, header, order, final=False))

        try:
            async with anyio.create_task_group() as tg:
                writer_scope = anyio.CancelScope()

                async def guarded_writer() -> None:
                    with writer_scope:
                        await manifest_writer()

                tg.start_soon(guarded_writer)
                tg.start_soon(feed)
                async with anyio.create_task_group() as workers:
                    for _ in range(min(in_flight, count)):
                        workers.start_soon(worker)
                writer_scope.cancel()
        except BaseExceptionGroup as group:
            fatal = _find(group, FatalError)
            if fatal is not None:
                raise fatal from None
            raise

    def _totals(self, order: Iterable[str]) -> dict[str, int]:
        return totals_of([self.state.records[u] for u in order if u in self.state.records])

    def _checkpoint(self, header: dict[str, Any], order: Iterable[str], *, final: bool = True) -> dict[str, int]:
        """Rewrite harvest.json (during the run only while it is small: ``HarvestState.write_manifest``)
        and record the counters (the report plots them); returns the totals."""
        totals = self.state.write_manifest(header, order, final=final)
        t = self.hub.tally
        self.state.log_event({"event": "progress", "received_bytes": t.received_bytes, "retries": t.retries
                              + t.series_retries, "done": t.done_series, "failed": t.failed_series,
                              "in_flight": t.in_flight, "limit": self.limit.current,
                              "connections": self.connections.limit})
        return totals

    def _on_bytes(self, n: int) -> None:
        self.connections.add_bytes(n)
        self.hub.emit(Event("bytes", bytes=n))

    async def _attempt(self, job: _Job) -> float | None:
        """One try at a series. Returns None when it is settled (complete or failed for good),
        or a delay after which it should be tried again."""
        task = job.task
        job.attempts += 1
        self.hub.emit(Event("start", task.series_uid))
        partial = self.state.partial_path(task.series_uid)
        staging = self.state.staging_dir(task.series_uid)
        try:
            unpacked = await self.source.fetch_series(
                task, partial=partial, staging=staging, rate=self.rate, sinks=self.sinks,
                on_bytes=self._on_bytes)
            record = self._record(job, unpacked.files)
            if isinstance(unpacked, AnnotatedSeries) and unpacked.annotations:   # beside the DICOM files
                record["annotations"] = [a.to_json(job.path) for a in unpacked.annotations]
            await anyio.to_thread.run_sync(_unlink_and_commit, partial, self.state, record, staging)
            if unpacked.license_text:
                await self._keep_license(task.collection, unpacked.license_text)
        except FatalError:
            raise
        except (SeriesError, RequestError, OSError) as exc:
            await anyio.to_thread.run_sync(_cleanup, partial, staging)
            if isinstance(exc, OSError):
                converted = classify_os_error(exc, f"series {task.series_uid}")
                if isinstance(converted, FatalError):
                    raise converted from None
            return await self._settle_failure(job, exc)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_cleanup, partial, staging)
            raise
        self.limit.healthy()
        self.hub.emit(Event("done", task.series_uid, bytes=record["bytes"], files=len(record["files"])))
        return None

    async def _settle_failure(self, job: _Job, exc: BaseException) -> float | None:
        task = job.task
        message = exc.one_line() if isinstance(exc, HarvesterError) else f"{type(exc).__name__}: {exc}"
        job.errors.append(message)
        if isinstance(exc, RetryableRequestError) and exc.status in (429, 503):
            self.limit.push_back()
            self.connections.push_back()
        if should_retry_series(exc) and job.attempts <= self.config.series_retries:
            delay = min(self.config.backoff_max, self.config.backoff_base * 2 ** job.attempts)
            delay = self._rng.uniform(delay / 2, delay)
            self.hub.emit(Event("series_retry", task.series_uid, message=message))
            return delay
        record = self._record(job, [], status="failed", error=message)
        record["error_kind"] = type(exc).__name__  # the class (harvester.errors) that says what went wrong
        if self.state.complete(task.series_uid) is not None:
            self._refresh_failed[task.series_uid] = message
        await anyio.to_thread.run_sync(self.state.fail, record)
        self.hub.emit(Event("failed", task.series_uid, message=message, data={
            "collection": task.collection, "patient": task.patient_id, "kind": record["error_kind"],
            "description": str(task.row.get("SeriesDescription") or "")}))
        return None

    def _record(self, job: _Job, files: list[Any], *, status: str = "complete", error: str | None = None
                ) -> dict[str, Any]:
        t = job.task
        ordered = sorted(files, key=lambda f: f.name)
        unchecked = sum(not f.md5_checked for f in ordered)
        return {
            "SeriesInstanceUID": t.series_uid,
            "Collection": t.collection,
            "PatientID": t.patient_id,
            "StudyInstanceUID": t.study_uid,
            "Modality": t.modality,
            "status": status,
            "path": job.path,
            "bytes": sum(f.size for f in ordered),
            "attempts": job.attempts,
            "error": error,
            "completed": now_iso() if status == "complete" else None,
            "sop_class_uid": ordered[0].sop_class_uid if ordered else "",
            # a file the archive listed without an MD5 was checked by count, size, CRC and DICOM
            # only: its md5 is what arrived, and the record says so
            "files": [{"path": f"{job.path}/{f.name}", "size": f.size, "md5": f.md5, "SOPInstanceUID": f.sop_uid,
                       **({} if f.md5_checked else {"md5_source": "computed"})}
                      for f in ordered],
            "metadata": t.row,
            "patient": t.patient,
            "study": t.study,
            **({"files_without_md5": unchecked} if unchecked else {}),
        }

    async def _keep_license(self, collection: str, text: str) -> None:
        if collection in self._licenses:
            return
        self._licenses.add(collection)
        folder = self.state.out_dir / "licenses"

        def write() -> None:
            target = inside(self.state.out_dir, f"licenses/{safe_component(collection)}.txt")  # no link on the way
            folder.mkdir(exist_ok=True)
            if not target.exists():
                atomic_write(target, text.encode("utf-8"))

        await anyio.to_thread.run_sync(write)


class _Planned:
    """The engine's view of a plan: a list, or a stored plan read a batch at a time."""

    def __init__(self, tasks: Iterable[SeriesTask] | TaskStore) -> None:
        self._stored = tasks if isinstance(tasks, TaskStore) else None
        self._tasks = [] if self._stored is not None else list(tasks)
        #: the series UIDs in order, as often as asked (streamed from a stored plan)
        self.order: Iterable[str] = self if self._stored is not None else [t.series_uid for t in self._tasks]

    def __iter__(self) -> Iterator[str]:   # ``order`` of a stored plan
        assert self._stored is not None
        return self._stored.uids()

    def __len__(self) -> int:
        return len(self._stored) if self._stored is not None else len(self._tasks)

    async def select(self, wanted: Callable[[str], bool]) -> AsyncIterator[list[SeriesTask]]:
        """The tasks ``wanted`` takes, ``PLAN_BATCH`` tasks looked at a time (``wanted`` is
        called in a worker thread; a stored plan decodes only the tasks it takes)."""
        if self._stored is None:
            for start in range(0, len(self._tasks), PLAN_BATCH):
                batch = self._tasks[start:start + PLAN_BATCH]
                yield await anyio.to_thread.run_sync(lambda: [t for t in batch if wanted(t.series_uid)])
            return
        it = self._stored.select(wanted, PLAN_BATCH)
        while (got := await anyio.to_thread.run_sync(next, it, None)) is not None:
            yield got


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _unlink_and_commit(partial: Path, state: HarvestState, record: dict[str, Any], staging: Path) -> None:
    """In a worker thread: unlinking a large file frees its blocks, which must not stall the loop."""
    _unlink(partial)
    state.commit(record, staging)


def _cleanup(partial: Path, staging: Path) -> None:
    _unlink(partial)
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)


def _find(group: BaseExceptionGroup, kind: type[BaseException]) -> Any:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _find(exc, kind)
            if found is not None:
                return found
        elif isinstance(exc, kind):
            return exc
    return None
