"""The engine's throughput controls behave: adaptive concurrency shrinks under push-back and
regrows once the server is healthy, ``--max-rate`` caps the bytes taken per unit of time, and
memory does not grow with the size of a series. Behaviour only: time is virtual where a rate is
checked, and the one real-time check is a lower bound the limiter guarantees."""
from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path
from typing import Any

import anyio
import pytest

import harvester.engine as engine_module
from harvest_helpers import assert_identical, normal_series, select_all, serve_synthetic, test_config
from harvester.api import aharvest
from harvester.config import Limits
from harvester.engine import AdaptiveLimit
from harvester.rate import RateLimiter
from harvester.events import Event, Hub
from harvester.query import query_from_dict
from harvester.server.synthetic import SyntheticSpec, build_synthetic
from harvester.server.testing import serve_in_thread


def harvest(base_url: str, out: Path, query: dict[str, Any], hub: Hub, **overrides: Any) -> Any:
    config = test_config(base_url, out, **overrides)
    return anyio.run(lambda: aharvest(query_from_dict(query, origin="test"), config, hub=hub))


class VirtualClock:
    """A clock that only moves when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)
        await anyio.lowlevel.checkpoint()


# ---------------------------------------------------------------- AdaptiveLimit

def test_push_back_halves_down_to_one_and_successes_regrow_to_the_maximum() -> None:
    clock = VirtualClock()
    limit = AdaptiveLimit(8, cooldown=1.0, clock=clock)
    assert limit.current == 8
    for expected in (4, 2, 1, 1):
        limit.push_back()
        assert limit.current == expected
        clock.now += 1.0
    # additive increase: +1 after `current` successes in a row
    steps = []
    for _ in range(40):
        limit.healthy()
        steps.append(limit.current)
    assert steps[:6] == [2, 2, 3, 3, 3, 4]
    assert max(steps) == 8 and steps[-1] == 8


def test_a_burst_of_push_backs_halves_once_per_cooldown() -> None:
    """Many requests throttled at the same moment are one signal, not N: the limit must not
    collapse from 16 to 1 because 16 workers saw the same 429 wave."""
    clock = VirtualClock()
    limit = AdaptiveLimit(16, cooldown=1.0, clock=clock)
    for _ in range(16):
        limit.push_back()
    assert limit.current == 8
    clock.now += 0.5
    limit.push_back()
    assert limit.current == 8
    clock.now += 0.6
    limit.push_back()
    assert limit.current == 4


def test_a_push_back_resets_the_run_of_successes() -> None:
    clock = VirtualClock()
    limit = AdaptiveLimit(4, cooldown=1.0, clock=clock)
    limit.push_back()                      # 2
    limit.healthy()
    clock.now += 2
    limit.push_back()                      # 1
    limit.healthy()                        # one success at 1 -> 2
    assert limit.current == 2


@pytest.mark.anyio
async def test_the_capacity_follows_the_limit() -> None:
    """Lowering the limit really lowers how many run at once (anyio lets total_tokens shrink
    below the borrowed count; new borrowers wait)."""
    clock = VirtualClock()
    limit = AdaptiveLimit(4, cooldown=1.0, clock=clock)
    running, peak = 0, 0
    release = anyio.Event()

    async def job() -> None:
        nonlocal running, peak
        async with limit.limiter:
            running += 1
            peak = max(peak, running)
            await release.wait()
            running -= 1

    async with anyio.create_task_group() as tg:
        limit.push_back()  # 2
        for _ in range(6):
            tg.start_soon(job)
        await anyio.wait_all_tasks_blocked()
        assert running == 2
        release.set()
    assert peak == 2


@pytest.mark.parametrize("fault,kind,overrides", [
    ("throttle=1.0,retry_after=0,seed=3", "throttle", {}),
    ("stall=1.0,stall_for=2s,seed=3", "stall", {"read_timeout": 0.3}),  # no bytes: the client times out
])
def test_engine_cools_down_on_its_backoff_scale(server, small_archive, tmp_path, fault, kind,  # type: ignore[no-untyped-def]
                                                overrides) -> None:
    """Throttle (429) or stall (timeouts) every download until the limit has shrunk to 1, then
    lift the fault: the limit regrows to the configured maximum and every series completes."""
    seen: list[int] = []
    lifted = False
    engines: list[Any] = []
    original = engine_module.Engine.__init__

    def capture(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        engines.append(self)

    def watch(ev: Event) -> None:
        nonlocal lifted
        if ev.kind == "plan":
            server.set_faults(fault)  # planning done: push back on every download
            return
        if not engines:
            return
        current = engines[0].limit.current
        seen.append(current)
        if current == 1 and not lifted:
            lifted = True
            server.set_faults(None)

    hub = Hub()
    hub.subscribe(watch)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(engine_module.Engine, "__init__", capture)
    try:
        out = tmp_path / "out"
        result = harvest(server.base_url, out, select_all(small_archive), hub=hub, workers=4, connections=8,
                         retries=8, series_retries=8, **overrides)
    finally:
        monkey.undo()
    assert lifted, f"the limit never shrank to 1: {seen}"
    assert server.stats.faults.get(kind, 0) > 0
    after = seen[seen.index(1):]
    assert max(after) == 4, f"the limit did not regrow to the maximum: {after}"
    assert result.ok, result.failed
    assert_identical(out, small_archive, normal_series(small_archive))


# ---------------------------------------------------------------- RateLimiter (--max-rate)

@pytest.mark.anyio
async def test_rate_limiter_lets_rate_times_time_plus_one_burst_through() -> None:
    clock = VirtualClock()
    rate = 1_000_000
    limiter = RateLimiter(rate, clock=clock, sleep=clock.sleep)
    started = clock()
    total = 0
    for _ in range(160):  # 10.5 MB in 64 KiB chunks
        await limiter.consume(65536)
        total += 65536
        # at no moment more than rate * elapsed + one burst + one chunk
        assert total <= rate * (clock() - started) + rate + 65536
    elapsed = clock() - started
    assert limiter.consumed == total
    assert (total - rate) / rate <= elapsed <= (total - rate) / rate + 0.2


@pytest.mark.anyio
async def test_rate_limiter_is_shared_by_concurrent_downloads() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(500_000, clock=clock, sleep=clock.sleep)
    started = clock()

    async def download(chunks: int, size: int) -> None:
        for _ in range(chunks):
            await limiter.consume(size)

    async with anyio.create_task_group() as tg:
        for size in (16384, 65536, 200_000):
            tg.start_soon(download, 20, size)
    total = 20 * (16384 + 65536 + 200_000)
    assert limiter.consumed == total
    assert clock() - started >= (total - 500_000 - 200_000) / 500_000


@pytest.mark.anyio
async def test_a_chunk_larger_than_the_burst_still_passes_and_is_paid_for() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(100_000, clock=clock, sleep=clock.sleep)
    await limiter.consume(350_000)   # a full bucket lets it through, the bucket goes negative
    t0 = clock()
    await limiter.consume(1)         # and the next caller waits until it has refilled
    assert clock() - t0 >= 2.5


def test_max_rate_caps_a_real_harvest(server, small_archive, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every received byte goes through the limiter, and the harvest cannot beat the rate:
    a lower bound, which only a broken limiter could violate."""
    limiters: list[RateLimiter] = []

    class Recording(RateLimiter):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            limiters.append(self)

    rate = 150_000  # the DEFLATED ZIPs of the small archive come to under 400 kB
    hub = Hub()
    monkey = pytest.MonkeyPatch()
    monkey.setattr(engine_module, "RateLimiter", Recording)
    try:
        started = time.monotonic()
        result = harvest(server.base_url, tmp_path / "out", select_all(small_archive), hub=hub, max_rate=rate)
        elapsed = time.monotonic() - started
    finally:
        monkey.undo()
    assert result.ok, result.failed
    (limiter,) = limiters
    received = hub.tally.received_bytes
    assert received > 2 * rate, "the archive is too small to show the cap"
    assert limiter.consumed == received
    assert elapsed >= (received - rate) / rate * 0.95


# ---------------------------------------------------------------- memory does not grow with series size

BIG_SPEC = "collections=1,patients=1,studies=1,series=1,instances=12,size=4MiB,seed=4"


@pytest.fixture(scope="module")
def big_archive(synthetic_cache: Path) -> Any:
    return build_synthetic(SyntheticSpec.parse(BIG_SPEC), synthetic_cache)


def test_fetch_and_unpack_hold_a_few_chunks_not_the_series(big_archive: Any, synthetic_cache: Path,
                                                            tmp_path: Path) -> None:
    """A 48 MiB series is streamed into the sink and unpacked as it arrives with Python
    allocations bounded by a few chunks (tracemalloc sees aiohttp's buffers too). The server is
    its own process (``harvester serve``, the same archive), so that only the client's
    allocations are counted. What the bound holds is structural, not a matter of timing:
    aiohttp's buffer (its high water is twice the size a read asks for: half a chunk), one batch
    in the sink's thread (a chunk and one read at most), one inflated piece; it used to be twice
    the chunk in aiohttp alone, which a loaded machine filled and pushed the peak past the bound."""
    from harvester.config import Config
    from harvester.source.nbia.download import stream_series_zip
    from harvester.source.nbia import NBIAClient, make_session
    from harvester.store.sink import ZipSeriesSink

    (rec,) = big_archive.records()
    assert rec.total_bytes > 40 * 2**20
    with serve_synthetic(BIG_SPEC, synthetic_cache) as base_url:
        config = Config(api_url=base_url, out_dir=tmp_path, retries=2, progress=False)

        def sink() -> ZipSeriesSink:
            return ZipSeriesSink(tmp_path / "staging", series_uid=rec.uid, image_count=len(rec.instances),
                                 file_size=rec.total_bytes, limits=Limits(), batch_bytes=config.chunk_size)

        async def fetch() -> Any:
            async with make_session(config) as session:
                return await stream_series_zip(NBIAClient(config, session), rec.uid, None, sink,
                                               chunk_size=config.chunk_size)

        tracemalloc.start()
        try:
            unpacked = anyio.run(fetch)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert len(unpacked.files) == len(rec.instances)
    assert sum(f.size for f in unpacked.files) == rec.total_bytes
    assert peak < 6 * config.chunk_size, peak


WIDE_SPEC = "collections=1,patients=1,studies=1,series=1,instances=4,size=8MiB,seed=4"


def _task_of(rec: Any) -> Any:
    from harvester.models import SeriesTask

    return SeriesTask(series_uid=rec.uid, collection=rec.row["Collection"], patient_id="P", study_uid="S",
                      modality="CT", image_count=len(rec.instances), file_size=rec.total_bytes, row=dict(rec.row))


def _open_under(path: Path) -> list[str]:
    """The files under ``path`` this process holds open (none where /proc cannot say)."""
    held = []
    if os.path.isdir("/proc/self/fd"):
        for fd in os.listdir("/proc/self/fd"):
            try:
                held.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
    return [p for p in held if p.startswith(str(path))]


def fetch_spread(rec: Any, config: Any, tmp_path: Path) -> Any:
    """``rec``'s series through ``NBIASource.fetch_series`` (instance by instance under
    ``config``), into ``tmp_path/staging``, its verified instances kept in ``tmp_path/instances``."""
    from harvester.source.nbia import NBIAClient, make_session
    from harvester.source.nbia.source import NBIASource
    from harvester.store.sink import StoreSinks

    task = _task_of(rec)

    async def fetch() -> Any:
        async with make_session(config) as session:
            return await NBIASource(NBIAClient(config, session)).fetch_series(
                task, partial=tmp_path / "partial", staging=tmp_path / "staging", on_bytes=lambda n: None,
                rate=None, sinks=StoreSinks(Limits(), resume_root=tmp_path / "instances"))
    return anyio.run(fetch)


def test_a_series_spread_over_connections_holds_a_few_chunks_not_its_instances(synthetic_cache: Path,
                                                                             tmp_path: Path) -> None:
    """A series fetched instance by instance (getSingleImage, two at once) pours each instance
    into its file as it arrives: the client's Python allocations stay below one instance (8 MiB).
    They used to hold every instance in flight whole, and once more joined (16 MiB and up). The
    bound is structural: per stream, aiohttp's buffer (a chunk), one batch of the source's
    (``INSTANCE_BATCH_BYTES``) and one read. The server is its own process."""
    from harvester.config import Config

    (rec,) = build_synthetic(SyntheticSpec.parse(WIDE_SPEC), synthetic_cache).records()
    instance = max(i.size for i in rec.instances)
    assert instance >= 8 * 2**20
    with serve_synthetic(WIDE_SPEC, synthetic_cache) as base_url:
        config = Config(api_url=base_url, out_dir=tmp_path, retries=2, progress=False, per_instance="always",
                        instance_streams=1)
        tracemalloc.start()
        try:
            unpacked = fetch_spread(rec, config, tmp_path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert sorted((f.size, f.md5) for f in unpacked.files) == sorted((i.size, i.md5) for i in rec.instances)
    for f in unpacked.files:
        assert (tmp_path / "staging" / f.name).stat().st_size == f.size
    assert peak < instance, peak


def test_a_streamed_instance_cut_off_mid_body_is_fetched_again_and_leaves_no_part(synthetic_cache: Path,
                                                                                 tmp_path: Path) -> None:
    """Resets part-way through the 8 MiB instances (past the first batch, so each was being
    written to its file): every cut attempt's file goes, the next attempt starts afresh, and the
    series ends byte for byte the archive's with nothing left in the resume folder."""
    from harvester.config import Config

    archive = build_synthetic(SyntheticSpec.parse(WIDE_SPEC), synthetic_cache)
    (rec,) = archive.records()
    resume = tmp_path / "instances"
    with serve_in_thread(archive, faults="reset=0.5,seed=3") as handle:
        config = Config(api_url=handle.base_url, out_dir=tmp_path, retries=30, backoff_base=0.01, backoff_max=0.02,
                        progress=False, per_instance="always", instance_streams=2)
        unpacked = fetch_spread(rec, config, tmp_path)
        resets = handle.stats.faults.get("reset", 0)
    assert resets >= 2   # the faults did cut bodies
    by_md5 = {i.md5: i for i in rec.instances}
    for f in unpacked.files:
        assert (tmp_path / "staging" / f.name).read_bytes() == by_md5[f.md5].path.read_bytes()
    assert len(unpacked.files) == len(rec.instances)
    assert not resume.exists() or not any(resume.rglob("*.part"))
    assert not _open_under(tmp_path)   # and no cut attempt's file is left open


def fetch_repair(rec: Any, config: Any, folder: Path) -> tuple[int, str, Path]:
    """``rec``'s first instance refetched alone, as a repair does (``NBIASource.fetch_instance``
    into the store's ``RepairFile`` in ``folder``): its size, MD5 and file."""
    from harvester.source.nbia import NBIAClient, make_session
    from harvester.source.nbia.source import NBIASource
    from harvester.store.sink import RepairFile

    async def fetch() -> tuple[int, str, Path]:
        async with make_session(config) as session:
            fresh = RepairFile(folder, "first.dcm.repair")
            size = await NBIASource(NBIAClient(config, session)).fetch_instance(_task_of(rec), rec.instances[0].sop_uid,
                                                                                 fresh)
            return size, fresh.close(), fresh.path
    return anyio.run(fetch)


def test_a_repair_streams_its_instance_into_a_file_not_memory(synthetic_cache: Path, tmp_path: Path) -> None:
    """A single-instance refetch (a file that failed its MD5, ``verify --repair``) pours the
    instance into its file as it arrives: the client's Python allocations stay below the
    instance (8 MiB), which the refetch used to hold whole (instances of GBs exist: breast
    tomosynthesis). The server is its own process."""
    from harvester.config import Config

    (rec,) = build_synthetic(SyntheticSpec.parse(WIDE_SPEC), synthetic_cache).records()
    first = rec.instances[0]
    assert first.size >= 8 * 2**20
    with serve_synthetic(WIDE_SPEC, synthetic_cache) as base_url:
        config = Config(api_url=base_url, out_dir=tmp_path, retries=2, progress=False)
        tracemalloc.start()
        try:
            size, md5, path = fetch_repair(rec, config, tmp_path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert (size, md5) == (first.size, first.md5)
    assert path.read_bytes() == first.path.read_bytes()
    assert peak < first.size, peak


def test_a_repair_cut_off_mid_body_starts_its_file_afresh(synthetic_cache: Path, tmp_path: Path) -> None:
    """Resets part-way through the 8 MiB instance: each attempt empties the file before it
    writes, so the repair ends byte for byte the archive's, one file, none held open."""
    from harvester.config import Config

    archive = build_synthetic(SyntheticSpec.parse(WIDE_SPEC), synthetic_cache)
    (rec,) = archive.records()
    folder = tmp_path / "tmp"
    folder.mkdir()
    with serve_in_thread(archive, faults="reset=0.5,seed=3") as handle:
        config = Config(api_url=handle.base_url, out_dir=tmp_path, retries=30, backoff_base=0.01, backoff_max=0.02,
                        progress=False)
        size, md5, path = fetch_repair(rec, config, folder)
        resets = handle.stats.faults.get("reset", 0)
    assert resets >= 1   # the faults did cut bodies
    assert path.read_bytes() == rec.instances[0].path.read_bytes()
    assert (size, md5) == (rec.instances[0].size, rec.instances[0].md5)
    assert os.listdir(folder) == [path.name]
    assert not _open_under(tmp_path)


# ---------------------------------------------------------------- downloads overlap verification

def test_committing_one_series_does_not_keep_a_download_slot(server, small_archive, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With one worker, the first series' commit waits for the next download to start: that can
    only happen if the download slot was released once the bytes were in (the sink verifies as
    they arrive, so what is left after the download, repairs and the commit, holds no slot).
    Downloads never exceed the worker count."""
    import threading

    import harvester.engine as engine_module
    import harvester.source.nbia.source as source_module  # the names NBIASource calls

    active = peak = 0
    real_fetch = source_module.stream_series_zip

    async def counting_fetch(*args: Any, **kwargs: Any) -> Any:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            return await real_fetch(*args, **kwargs)
        finally:
            active -= 1

    overlapped = threading.Event()
    first = threading.Lock()
    real_commit = engine_module._unlink_and_commit

    def commit_after_the_next_download_started(*args: Any, **kwargs: Any) -> Any:
        if first.acquire(blocking=False):  # only the first series waits (in its worker thread)
            started = sum(server.stats.downloads.values())
            for _ in range(400):
                if sum(server.stats.downloads.values()) > started:
                    overlapped.set()
                    break
                threading.Event().wait(0.025)
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(source_module, "stream_series_zip", counting_fetch)
    monkeypatch.setattr(engine_module, "_unlink_and_commit", commit_after_the_next_download_started)
    result = harvest(server.base_url, tmp_path / "out", select_all(small_archive), Hub(), workers=1, connections=4)
    assert result.ok, result.failed
    assert overlapped.is_set(), "the next download waited for the previous series to be committed"
    assert peak == 1
    assert_identical(tmp_path / "out", small_archive, normal_series(small_archive))
