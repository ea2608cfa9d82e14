"""``stream_series_zip`` against our NBIA server over loopback: what ``on_bytes`` hears (every
byte received, in steps of ``REPORT_BYTES`` rather than once per network read), for a download
that completes and for attempts cut off by a reset."""
from __future__ import annotations

import contextlib
import io
import zipfile
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import anyio
import pytest

from harvester.config import Config
from harvester.errors import RetryableRequestError
from harvester.server.archive import Archive, SeriesRecord
from harvester.server.synthetic import SyntheticSpec, build_synthetic
from harvester.server.testing import ServerHandle, serve_in_thread
from harvester.source.http import make_session
from harvester.source.nbia import NBIAClient
from harvester.source.nbia.download import REPORT_BYTES, stream_series_zip

#: one series of about 1.5 MB: several steps of REPORT_BYTES, many network reads
SPEC = "collections=1,patients=1,studies=1,series=1,instances=6,size=256KiB,seed=3"


@pytest.fixture(scope="module")
def archive(synthetic_cache: Path) -> Archive:
    return build_synthetic(SyntheticSpec.parse(SPEC), synthetic_cache)


class Collector:
    """A ZipTarget that keeps the bytes (no I/O: what reaches a sink is the sink tests' business)."""

    def __init__(self) -> None:
        self.data = bytearray()

    async def feed(self, chunk: bytes) -> None:
        self.data += chunk

    async def close(self) -> bytes:
        return bytes(self.data)

    def discard(self) -> None:
        self.data.clear()


def fetch(handle: ServerHandle, rec: SeriesRecord, retries: int, told: list[int]) -> bytes:
    async def go() -> bytes:
        cfg = Config(api_url=handle.base_url, retries=retries, read_timeout=10, backoff_base=0.01, backoff_max=0.02)
        async with make_session(cfg) as session:
            client = NBIAClient(cfg, session)
            return await stream_series_zip(client, rec.uid, None, Collector, on_bytes=told.append)
    return anyio.run(go)


@pytest.fixture
def served(archive: Archive) -> Iterator[tuple[ServerHandle, SeriesRecord]]:
    with serve_in_thread(archive) as handle:
        yield handle, next(iter(archive.records()))


def test_on_bytes_hears_every_byte_in_steps(served: tuple[ServerHandle, SeriesRecord]) -> None:
    handle, rec = served
    told: list[int] = []
    body = fetch(handle, rec, 1, told)
    assert sum(told) == len(body) > 4 * REPORT_BYTES
    assert all(n >= REPORT_BYTES for n in told[:-1]), told       # no event per network read
    assert len(told) <= len(body) // REPORT_BYTES + 1


def test_on_bytes_counts_the_bytes_of_attempts_cut_off(archive: Archive) -> None:
    """Every attempt is reset mid-stream: the bytes each one received are still told (the run's
    byte count and the connection controller see what the link carried)."""
    rec = next(iter(archive.records()))
    told: list[int] = []
    with serve_in_thread(archive, faults="reset=1,seed=1") as handle:
        with pytest.raises(RetryableRequestError):
            fetch(handle, rec, 3, told)
        sent = handle.stats.bytes_sent
    assert told and 0 < sum(told) <= sent


def test_a_body_that_goes_silent_times_out_and_is_retried(archive: Archive) -> None:
    """getImage's request has no idle timeout of aiohttp's: the reader's ``IdleWatch`` keeps it. A
    server that stops sending mid-body for 5 s is cut off after the 0.3 s read timeout, as a
    retryable timeout naming the URL, and every attempt's bytes are still told."""
    rec = next(iter(archive.records()))
    told: list[int] = []

    async def go(handle: ServerHandle) -> bytes:
        cfg = Config(api_url=handle.base_url, retries=2, read_timeout=0.3, backoff_base=0.01, backoff_max=0.02)
        async with make_session(cfg) as session:
            return await stream_series_zip(NBIAClient(cfg, session), rec.uid, None, Collector, on_bytes=told.append)

    with serve_in_thread(archive, faults="stall=1,stall_for=5,seed=2") as handle:
        # without the watch nothing would time out: the stall ends after 5 s and the body completes
        with pytest.raises(RetryableRequestError, match="timed out") as caught:
            anyio.run(go, handle)
        stalls = handle.stats.faults.get("stall", 0)
    assert caught.value.overload and "getImage" in str(caught.value)   # a timeout: the engine backs off
    assert stalls == 2                    # both attempts stalled, and both were cut off
    assert told and sum(told) > 0


class SlowSink(Collector):
    """A sink whose every write takes longer than the read timeout (a slow disk): our own time."""

    async def feed(self, chunk: bytes) -> None:
        await anyio.sleep(0.4)
        self.data += chunk


def test_time_on_our_side_never_counts_as_the_server_idle(served: tuple[ServerHandle, SeriesRecord]) -> None:
    """Each chunk's handling (0.4 s) outlasts the read timeout (0.3 s): the download still
    completes, in one attempt, as under aiohttp's own sock_read."""
    handle, rec = served
    cfg_chunk = 256 << 10

    async def go() -> bytes:
        cfg = Config(api_url=handle.base_url, retries=1, read_timeout=0.3, chunk_size=cfg_chunk)
        async with make_session(cfg) as session:
            return await stream_series_zip(NBIAClient(cfg, session), rec.uid, None, SlowSink,
                                           chunk_size=cfg.chunk_size)

    body = anyio.run(go)
    names = zipfile.ZipFile(io.BytesIO(body)).namelist()
    assert len(names) == len(rec.instances) + 2          # LICENSE, every instance, md5hashes.csv
    assert len(body) > 2 * cfg_chunk                      # several chunks, each slower than the timeout


class Hold:
    """A ``hold`` that records how many attempts held it, and how many hold it now."""

    def __init__(self) -> None:
        self.entered = self.active = 0

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[None]:
        self.entered += 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class Pieces:
    """An ``InstanceTarget`` in memory (the store's ``RepairFile`` writes a file): what the last
    attempt wrote, and how many attempts restarted it."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.restarts = 0

    def restart(self) -> None:
        self.restarts += 1
        self.pieces = []

    def write_all(self, pieces: Sequence[bytes]) -> None:
        self.pieces += pieces


def test_a_connection_is_held_for_each_attempt_and_never_through_a_back_off(archive: Archive) -> None:
    """Many requests fail (40% 500/503, 20% resets): the ZIP and a single instance are held (an
    engine's connection) around each attempt's body only; at every retry's back-off none is
    held, and the bytes are the archive's."""
    rec = next(iter(archive.records()))
    sop = rec.instances[0]
    zip_hold, instance_hold = Hold(), Hold()
    during_backoff: list[int] = []

    async def go(handle: ServerHandle) -> tuple[bytes, bytes]:
        cfg = Config(api_url=handle.base_url, retries=20, read_timeout=10, backoff_base=0.01, backoff_max=0.02)
        async with make_session(cfg) as session:
            client = NBIAClient(cfg, session)
            client.on_retry = lambda exc: during_backoff.append(zip_hold.active + instance_hold.active)
            body = await stream_series_zip(client, rec.uid, None, Collector, hold=zip_hold)
            target = Pieces()
            size = await client.single_image_into(rec.uid, sop.sop_uid, None, target, hold=instance_hold)
            assert size == sum(map(len, target.pieces)) and target.restarts == instance_hold.entered
            return body, b"".join(target.pieces)

    with serve_in_thread(archive, faults="error=0.4,reset=0.2,seed=3") as handle:
        body, one = anyio.run(go, handle)
        requests = dict(handle.stats.requests)
    assert requests["getImage"] >= 2 and requests["getSingleImage"] >= 2   # each was retried
    assert set(during_backoff) == {0}                                       # ... never holding
    assert zip_hold.entered == requests["getImage"] and instance_hold.entered == requests["getSingleImage"]
    assert zip_hold.entered + instance_hold.entered == len(during_backoff) + 2
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert len([n for n in zf.namelist() if n.endswith(".dcm")]) == len(rec.instances)
    assert one == sop.path.read_bytes()
