"""One harvest across many processes and machines, on Dask distributed (``pip install 'harvester[dask]'``).

The client (``harvester run/sync --cluster``, ``aharvest(..., cluster=...)``) does what a single
process does up to the plan: it holds DIR's lock, plans into the state database and skips what
is complete. ``ClusterEngine`` then replaces the engine's worker pool: the series to fetch get
their folders here (``assign_paths``, in plan order, so the tree is the one a single process
makes), are cut into shards balanced by bytes and series (largest first into the lightest
shard; about ``SHARDS_PER_SLOT`` shards per worker thread, so a lost worker costs little), and
``Client.map`` runs one task per shard (``run_shard``), collected with ``as_completed``.

A shard task runs the ordinary ``Engine`` on its series into the shared DIR, under the same
guarantees (verified staging folder, durable record, atomic rename), with a state of its own:

* ``DIR/.harvester/shards/<run>-<n>/`` (``ShardState``): its own SQLite database, journal, lock
  and staging folder, so every SQLite file has one writer. Dask re-runs the task of a worker
  that died; the re-run opens the same folder (its recovery finishes or discards what the dead
  one left) and skips what it committed. A ``distributed.Lock`` per shard (lease-based: released
  when the worker holding it dies) and the folder's flock keep a zombie first attempt and its
  re-run from working on one shard at once.
* The client merges each finished shard into the harvest's database (``merge_shard``: the
  records are read through the shard state's checks, as every state file is), then removes it;
  shards a killed client left are merged at the start of the next run, on a cluster or not
  (``harvester.store.shards.merge_leftovers``), so ``status``, ``verify``, ``export`` and a
  later run see one harvest.
* The shard databases are in WAL mode, as every state database is (``harvester.store.db``):
  WAL's index lives in shared memory, which works only between processes of one host; a shard
  file is only ever opened by one process at a time (the lock above: the task, then the client
  once the task is over), so on a network filesystem no two hosts share it at any moment.

Politeness holds for the cluster as a whole (``ClusterSlots``, ``SharedGate``: objects handed
to the engine and the source, which are not changed):

* at most ``config.connections`` downloads in flight to the archive's host, counted by a
  lease-based ``distributed.Semaphore`` named after the host (a dead worker's leases lapse);
  each worker runs ``config.workers`` series at once within that;
* one back-off: a worker answered 429/503 (with its Retry-After, or ``backoff_base`` without
  one) publishes "not before T" in a ``distributed.Variable``; every worker waits for it before
  its next request;
* ``max_rate`` is the cluster's total, split evenly among the worker threads.

Progress: each shard sends its events in batches on a ``distributed.Queue``; the client feeds
them to its hub, so the display shows one bar for the cluster.

Raises ``UsageError`` when Dask is not installed (``pip install 'harvester[dask]'``) or the
cluster address is not one (``local:N``, ``tcp://host:port``); ``FatalError`` when the scheduler
cannot be reached.
"""
from __future__ import annotations

import contextlib
import functools
import dataclasses
import importlib
import importlib.util
import math
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import anyio

from harvester import operations
from harvester.config import Config
from harvester.engine import Engine, HarvestResult
from harvester.errors import FatalError, HarvesterError, RetryableRequestError, UsageError
from harvester.events import Event, Hub
from harvester.models import SeriesTask
from harvester.source.base import DownloadSlots, Source
from harvester.source.http import make_session
from harvester.store.layout import assign_paths
from harvester.store.shards import ShardState, merge_shard, shards_dir
from harvester.store.state import HarvestState, now_iso

DASK_HINT = "pip install 'harvester[dask]'"
#: shards per worker thread: a lost worker re-runs a small part of the harvest
SHARDS_PER_SLOT = 4
#: seconds between two batches of events a shard sends to the client
EVENT_EVERY = 0.25
#: seconds a worker trusts the shared back-off it last read before asking the scheduler again
BACKOFF_FRESH = 0.5
#: the events a shard forwards (``skip`` is the client's: it skips what the harvest holds)
FORWARDED = frozenset({"start", "bytes", "done", "failed", "retry", "series_retry"})
_LOCAL = re.compile(r"^local:([0-9]{1,4})$")


def require_dask() -> ModuleType:
    """The ``distributed`` package. Raises ``UsageError`` saying how to install it."""
    try:
        return importlib.import_module("distributed")
    except ImportError:
        raise UsageError("--cluster needs Dask distributed, which is not installed",
                         hint=DASK_HINT) from None


def parse_cluster(spec: str) -> tuple[str, int | str]:
    """``("local", N)`` for ``local:N``, ``("scheduler", address)`` for ``tcp://host:port`` (or
    ``tls://``). Raises ``UsageError`` for anything else."""
    if not isinstance(spec, str):
        raise UsageError(f"cluster={spec!r}: give 'local:N' or a scheduler address 'tcp://host:8786'")
    m = _LOCAL.match(spec)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise UsageError(f"--cluster {spec}: a local cluster needs at least 1 worker")
        return "local", n
    parts = urlsplit(spec)
    if parts.scheme in ("tcp", "tls") and parts.hostname and not parts.path.strip("/"):
        try:
            parts.port
        except ValueError:
            raise UsageError(f"--cluster {spec!r}: the port is not a number") from None
        return "scheduler", spec
    raise UsageError(f"--cluster {spec!r} is not a cluster address",
                     hint="give local:N (N processes on this machine) or a scheduler, tcp://host:8786")


@contextlib.asynccontextmanager
async def connect(spec: str, on_info: Callable[[str], None] | None = None) -> AsyncIterator[Any]:
    """An asynchronous ``distributed.Client`` on the cluster ``spec`` names (a ``LocalCluster``
    of N processes, one thread each, for ``local:N``); ``on_info`` is told the workers and the
    dashboard link. Raises ``UsageError`` (see the module) and ``FatalError`` when the
    scheduler cannot be reached."""
    distributed = require_dask()
    kind, value = parse_cluster(spec)
    async with contextlib.AsyncExitStack() as stack:
        try:
            if kind == "local":
                # a free port (8787 may be another cluster's); its pages need bokeh
                cluster = await stack.enter_async_context(distributed.LocalCluster(
                    n_workers=int(value), threads_per_worker=1, processes=True, asynchronous=True,
                    dashboard_address=":0"))
                client = await stack.enter_async_context(distributed.Client(cluster, asynchronous=True))
            else:
                client = await stack.enter_async_context(
                    distributed.Client(str(value), asynchronous=True, timeout="20s"))
        except (OSError, TimeoutError) as exc:
            raise FatalError(f"cannot reach the Dask scheduler at {spec}: {exc}",
                             hint="start it (dask scheduler), or check the address, then run again") from None
        if on_info is not None:
            workers = await client.nthreads() if hasattr(client, "nthreads") else {}
            served = client.scheduler_info().get("services", {}).get("dashboard")
            usable = kind == "scheduler" or importlib.util.find_spec("bokeh") is not None
            link = client.dashboard_link if served and usable else None
            on_info(f"Dask cluster {spec}: {len(workers)} worker(s), {sum(workers.values())} thread(s)"
                    + (f"; dashboard {link}" if link else ""))
        yield client


# ---------------------------------------------------------------- the API

async def aharvest(query: operations.QueryLike, out: str | Path | Config | None = None, *, cluster: str,
                   on_cluster: Callable[[str], None] | None = None, **kwargs: Any) -> HarvestResult:
    """``operations.aharvest`` run on ``cluster`` (``local:N`` or ``tcp://host:port``); the same
    arguments, result and errors, and those of ``connect``."""
    async with connect(cluster, on_cluster) as client:
        return await operations.aharvest(query, out, engine=_factory(client), **kwargs)


async def async_sync(query: Any, config: Config, *, cluster: str, on_cluster: Callable[[str], None] | None = None,
                     **kwargs: Any) -> operations.SyncResult:
    """``operations.async_sync`` run on ``cluster``; the same arguments and result."""
    if kwargs.get("dry_run"):
        return await operations.async_sync(query, config, **kwargs)
    async with connect(cluster, on_cluster) as client:
        return await operations.async_sync(query, config, engine=_factory(client), **kwargs)


def _factory(client: Any) -> Callable[[Config, Source, HarvestState, Hub], Engine]:
    def make(config: Config, source: Source, state: HarvestState, hub: Hub) -> Engine:
        return ClusterEngine(config, source, state, hub, client=client)
    return make


def cut_shards(tasks: list[SeriesTask], count: int) -> list[list[SeriesTask]]:
    """``tasks`` in ``count`` shards (fewer when there are fewer tasks), balanced by bytes and
    series: largest first, each into the shard with the fewest bytes (then series) so far. A
    shard keeps the plan's order."""
    count = max(1, min(count, len(tasks)))
    index = {t.series_uid: i for i, t in enumerate(tasks)}
    shards: list[list[SeriesTask]] = [[] for _ in range(count)]
    load = [(0, 0)] * count
    for task in sorted(tasks, key=lambda t: -(t.file_size or 0)):
        k = min(range(count), key=lambda i: (load[i], i))
        shards[k].append(task)
        load[k] = (load[k][0] + (task.file_size or 0), load[k][1] + 1)
    return [sorted(s, key=lambda t: index[t.series_uid]) for s in shards if s]


def host_key(url: str) -> str:
    """The archive's host and port, without credentials: what the cluster-wide limits are named by."""
    parts = urlsplit(url)
    return f"{(parts.hostname or '').lower()}:{parts.port or ''}"


# ---------------------------------------------------------------- one shard, on a worker

@dataclass
class ShardSpec:
    """What a shard task needs: its series and their folders, and the names of the cluster's
    shared objects. Pickled to the worker (the config holds the credentials the source needs)."""

    config: Config
    shard_dir: Path
    tasks: list[SeriesTask]
    paths: dict[str, str]
    header: dict[str, Any]
    refetch: frozenset[str] = frozenset()
    #: the harvest's records of the series to refetch: a new copy replaces them atomically
    seed: list[dict[str, Any]] = field(default_factory=list)
    lock: str = ""
    slots: str = ""
    host_limit: int = 1
    backoff: str = ""
    queue: str = ""

    def __repr__(self) -> str:   # what Dask logs of a failed task: never the config's URL or credentials
        return f"ShardSpec({self.shard_dir.name}, {len(self.tasks)} series)"


class ClusterSlots:
    """The engine's download slot, held cluster-wide: the worker's own ``CapacityLimiter`` (which
    ``AdaptiveLimit`` resizes through ``total_tokens``), then the shared back-off, then a lease of
    the host's ``distributed.Semaphore``."""

    def __init__(self, local: anyio.CapacityLimiter, semaphore: Any, gate: SharedGate) -> None:
        self.local = local
        self.semaphore = semaphore
        self.gate = gate

    @property
    def total_tokens(self) -> float:
        return self.local.total_tokens

    @total_tokens.setter
    def total_tokens(self, value: float) -> None:
        self.local.total_tokens = value

    async def __aenter__(self) -> None:
        await self.local.acquire()
        try:
            await self.gate.wait_shared()
            # not cancellable while the lease is asked for: a lease granted is always released
            await anyio.to_thread.run_sync(self.semaphore.acquire)
        except BaseException:
            self.local.release()
            raise

    async def __aexit__(self, *exc: Any) -> None:
        try:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.semaphore.release)
        finally:
            self.local.release()


class SharedGate:
    """A source's ``HostGate`` shared by the cluster: ``push`` (a Retry-After) pauses this worker
    and publishes "not before" (wall-clock seconds) in a ``distributed.Variable``; ``wait``
    honours both. Reads of the variable are cached ``BACKOFF_FRESH`` seconds."""

    def __init__(self, local: Any, variable: Any, cap: float) -> None:
        self.local = local
        self.variable = variable
        self.cap = cap
        self._until = 0.0
        self._read_at = -math.inf

    def push(self, seconds: float) -> None:
        self.local.push(seconds)
        self.publish(seconds)

    def publish(self, seconds: float) -> None:
        until = time.time() + seconds
        if until <= self._until:
            return
        self._until = until
        # off the event loop: the scheduler's answer must not stall this worker's downloads
        threading.Thread(target=_set_quietly, args=(self.variable, until), daemon=True).start()

    async def wait(self) -> None:
        await self.local.wait()
        await self.wait_shared()

    async def wait_shared(self) -> None:
        delay = await self.delay()
        if delay > 0:
            await anyio.sleep(delay)

    async def delay(self) -> float:
        """Seconds to wait before the next request: until the latest "not before" this worker
        published or read (at most ``cap``); 0 when none holds."""
        now = time.monotonic()
        if now - self._read_at > BACKOFF_FRESH:
            self._read_at = now
            got = await anyio.to_thread.run_sync(_get_quietly, self.variable)
            self._until = max(self._until, got)
        return max(0.0, min(self._until - time.time(), self.cap))


def _set_quietly(variable: Any, value: float) -> None:
    with contextlib.suppress(Exception):   # the back-off is advice: a scheduler gone ends the run anyway
        variable.set(value)


def _get_quietly(variable: Any) -> float:
    try:
        value = variable.get(timeout=2)
    except Exception:   # never set (a new cluster), or the scheduler is busy: no back-off known
        return 0.0
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


class _Forwarder:
    """Collects a shard's events for the client (bytes summed), sent every ``EVENT_EVERY`` s."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self.events: list[Event] = []
        self.bytes = 0

    def __call__(self, ev: Event) -> None:
        if ev.kind == "bytes":
            self.bytes += ev.bytes
        elif ev.kind in FORWARDED:
            self.events.append(ev)

    async def flush(self) -> None:
        batch = ([Event("bytes", bytes=self.bytes)] if self.bytes else []) + self.events
        self.events, self.bytes = [], 0
        if batch:
            await anyio.to_thread.run_sync(_put_quietly, self.queue, batch)

    async def run(self) -> None:
        while True:
            await anyio.sleep(EVENT_EVERY)
            await self.flush()


def _put_quietly(queue: Any, batch: list[Event]) -> None:
    with contextlib.suppress(Exception):   # progress only: the shard's state holds what counts
        queue.put(batch)


def run_shard(spec: ShardSpec) -> dict[str, Any]:
    """The Dask task of one shard (in a worker): the engine on ``spec.tasks`` into the shared
    DIR, recorded in the shard's own state. Returns counters and the fatal stop, if any."""
    distributed = require_dask()
    lock = distributed.Lock(spec.lock)
    lock.acquire()   # a zombie attempt of this shard (a worker cut off, not dead) ends first
    try:
        semaphore = distributed.Semaphore(max_leases=spec.host_limit, name=spec.slots)
        variable = distributed.Variable(spec.backoff)
        queue = distributed.Queue(spec.queue)
        return anyio.run(_run_shard, spec, semaphore, variable, queue)
    finally:
        lock.release()


async def _run_shard(spec: ShardSpec, semaphore: Any, variable: Any, queue: Any) -> dict[str, Any]:
    config = spec.config
    state = ShardState(config.out_dir, spec.shard_dir, spec.paths)
    await anyio.to_thread.run_sync(state.open)
    try:
        # Series an earlier attempt of this task committed (its worker died, or its result was
        # lost with a worker that hung): fetched in this run, so counted as downloaded, though
        # this attempt skips them. The shard's folder is this run's alone.
        earlier = sum(1 for t in spec.tasks if t.series_uid not in spec.refetch
                      and state.completed_bytes(t.series_uid) is not None)
        for rec in spec.seed:   # the copy a refetch replaces (a re-run finds its own commit instead)
            if state.records.get(rec["SeriesInstanceUID"]) is None:
                await anyio.to_thread.run_sync(state.restore, rec)
        hub = Hub()
        forward = _Forwarder(queue)
        hub.subscribe(forward)
        async with make_session(config) as session, anyio.create_task_group() as tg:
            source = operations.make_source(config, session)
            engine = Engine(config, source, state, hub)
            local_gate = getattr(getattr(source, "client", None), "gate", None)
            gate = SharedGate(local_gate if local_gate is not None else _NoGate(), variable, config.max_retry_after)
            if local_gate is not None:
                source.client.gate = gate   # type: ignore[attr-defined]
            slots = ClusterSlots(engine.limit.limiter, semaphore, gate)
            engine.limit.limiter = slots    # type: ignore[assignment]
            if isinstance(source, DownloadSlots):
                source.download_limiter = slots   # type: ignore[assignment]
            inner = source.on_retry

            def on_retry(exc: BaseException) -> None:
                if isinstance(exc, RetryableRequestError) and exc.status in (429, 503) and not exc.retry_after:
                    gate.publish(config.backoff_base)
                inner(exc)
            source.on_retry = on_retry
            tg.start_soon(forward.run)
            result = await engine.run(spec.tasks, spec.header, refetch=spec.refetch)
            tg.cancel_scope.cancel()
        await forward.flush()
        return {"downloaded": earlier + result.downloaded, "bytes": result.bytes_received, "requests": result.requests,
                "retries": result.retries, "fatal": result.fatal,
                "refresh_failed": [(u, why) for u, why in result.failed
                                   if u in spec.refetch and state.complete(u) is not None]}
    finally:
        state.close()


class _NoGate:
    def push(self, seconds: float) -> None:
        pass

    async def wait(self) -> None:
        pass


# ---------------------------------------------------------------- the client's engine

class ClusterEngine(Engine):
    """An ``Engine`` whose ``run`` sends the series to the cluster's workers in shards (see the
    module); what it returns and records is what ``Engine.run`` would."""

    def __init__(self, config: Config, source: Source, state: HarvestState, hub: Hub, *, client: Any) -> None:
        super().__init__(config, source, state, hub)
        self.client = client

    async def run(self, tasks: list[SeriesTask], header: dict[str, Any],
                  refetch: frozenset[str] = frozenset()) -> HarvestResult:
        started = time.monotonic()
        state = self.state   # shards a killed client left: merged by operations.harvest_plan
        header = dict(header, started=now_iso(), finished=None)
        order = [t.series_uid for t in tasks]
        todo: list[SeriesTask] = []
        for t in tasks:
            done = state.completed_bytes(t.series_uid)
            if done is not None and t.series_uid not in refetch:
                self.hub.emit(Event("skip", t.series_uid, bytes=done))
            else:
                todo.append(t)
        paths = assign_paths(((t.series_uid, t.layout_fields()) for t in todo), self.config.layout,
                             taken=state.taken_paths())
        self.hub.emit(Event("fetching", data={"series": len(todo), "bytes": sum(t.file_size or 0 for t in todo)}))
        await anyio.to_thread.run_sync(state.log_event, {"event": "run", "series": len(tasks), "todo": len(todo),
                                                         "cluster": True})
        # a checkpoint: beyond CHECKPOINT_EXPORT_MAX_SERIES harvest.json waits for the end of the run
        await anyio.to_thread.run_sync(functools.partial(state.write_manifest, header, order, final=False))
        counts = {"downloaded": 0, "bytes": 0, "requests": 0, "retries": 0}
        refresh_failed: dict[str, str] = {}
        fatal: str | None = None
        try:
            if todo:
                fatal = await self._run_shards(todo, paths, header, refetch, counts, refresh_failed)
        finally:
            header["finished"] = now_iso()
            if fatal is None and all(state.completed_bytes(u) is not None for u in order):
                header["last_sync"] = header["started"]
            with anyio.CancelScope(shield=True):
                try:
                    totals = await anyio.to_thread.run_sync(self._checkpoint, header, order)
                except FatalError as exc:
                    totals = self._totals(order)
                    fatal = fatal or exc.one_line()
                except HarvesterError:
                    totals = self._totals(order)
        self.hub.emit(Event("finish"))
        failed = [(u, (state.records.get(u) or {}).get("error") or "failed") for u in order
                  if state.completed_bytes(u) is None]
        # a refetch that failed (its shard said why, and that the copy on disk is kept)
        failed += [(u, why) for u, why in refresh_failed.items() if state.complete(u) is not None]
        return HarvestResult(
            out_dir=state.out_dir, totals=totals, failed=failed, downloaded=counts["downloaded"],
            skipped=self.hub.tally.skipped_series, bytes_received=counts["bytes"],
            requests=self.source.requests + counts["requests"], retries=counts["retries"],
            elapsed=time.monotonic() - started, fatal=fatal)

    async def _run_shards(self, todo: list[SeriesTask], paths: dict[str, str], header: dict[str, Any],
                          refetch: frozenset[str], counts: dict[str, int], refresh_failed: dict[str, str]
                          ) -> str | None:
        """Map the shards, feed their events to the hub, merge each as it ends; returns the first
        fatal stop a shard reported (the others are then cancelled)."""
        distributed = require_dask()
        client = self.client
        threads = max(1, sum((await client.nthreads()).values()))
        shards = cut_shards(todo, SHARDS_PER_SLOT * threads)
        run = uuid.uuid4().hex[:8]
        host = host_key(self.config.api_url)
        per_thread_rate = max(1, self.config.max_rate // threads) if self.config.max_rate else None
        config = dataclasses.replace(self.config, max_rate=per_thread_rate)
        # awaited: created on the scheduler before the first get (an asynchronous client only
        # schedules the creation, and a get that overtakes it is a KeyError)
        queue = await distributed.Queue(f"harvester-events-{run}", client=client)
        backoff = distributed.Variable(f"harvester-backoff-{host}", client=client)
        await backoff.set(0.0)   # set, so that a worker's read never waits for a first value
        root = shards_dir(self.state)
        await anyio.to_thread.run_sync(lambda: root.mkdir(exist_ok=True))
        specs = [ShardSpec(
            config=config, shard_dir=root / f"{run}-{n:04d}", tasks=shard,
            paths={t.series_uid: paths[t.series_uid] for t in shard}, header=header,
            refetch=frozenset(t.series_uid for t in shard if t.series_uid in refetch),
            seed=[rec for t in shard if t.series_uid in refetch and (rec := self.state.complete(t.series_uid))],
            lock=f"harvester-shard-{run}-{n}", slots=f"harvester-slots-{host}",
            host_limit=self.config.connections, backoff=f"harvester-backoff-{host}",
            queue=f"harvester-events-{run}") for n, shard in enumerate(shards)]
        futures = client.map(run_shard, specs, key=[f"harvester-shard-{run}-{n}" for n in range(len(specs))],
                             pure=False)
        by_key = {f.key: spec for f, spec in zip(futures, specs)}
        completed = distributed.as_completed(futures)
        # Held until merged, then released: a result the client still holds is recomputed when its
        # worker dies, and the re-run of a merged shard would fetch its series again.
        waiting = {f.key: f for f in futures}
        del futures
        fatal: str | None = None

        async def drain() -> None:
            while True:
                for batch in await queue.get(batch=True):
                    for ev in batch:
                        self.hub.emit(ev)
                await anyio.sleep(EVENT_EVERY)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain)
                async for future in completed:
                    spec = by_key[future.key]
                    try:
                        if future.status == "cancelled":   # after a fatal stop: merged as far as it went
                            raise RuntimeError("cancelled")
                        got = await future
                    except Exception as exc:   # a task Dask gave up on (KilledWorker...): merged as far as it went
                        got = {"fatal": None, "error": f"{type(exc).__name__}: {exc}"}
                        self.hub.emit(Event("warning", message=f"a shard of {len(spec.tasks)} series stopped: "
                                                               f"{got['error']}; rerun to fetch what it left"))
                    for key in counts:
                        counts[key] += int(got.get(key) or 0)
                    refresh_failed.update(dict(got.get("refresh_failed") or []))
                    if got.get("fatal") and fatal is None:
                        fatal = str(got["fatal"])
                        await client.cancel([f for f in waiting.values() if not f.done()])
                    _, why = await anyio.to_thread.run_sync(merge_shard, self.state, spec.shard_dir)
                    if why is not None:
                        self.hub.emit(Event("warning", message=f"shard {spec.shard_dir.name} left for a later "
                                                               f"run: {why}"))
                    waiting.pop(future.key, None)
                    future.release()
                for batch in await queue.get(batch=True):
                    for ev in batch:
                        self.hub.emit(ev)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await client.cancel([f for f in waiting.values() if not f.done()])
        return fatal
