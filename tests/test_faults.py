"""Injected faults: parsing, reproducible decisions, and each fault type over real HTTP."""
from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import time
import zipfile
from typing import Any

import aiohttp
import pydicom
import pytest

from harvester.server.archive import Archive, SeriesRecord
from harvester.server.faults import FaultInjector, FaultSpec, TokenBucket, parse_duration, parse_size
from harvester.server.testing import ServerHandle, serve_in_thread

pytestmark = pytest.mark.anyio


def a_series(archive: Archive, index: int = 0) -> SeriesRecord:
    return [r for r in archive.records() if r.row["Collection"].startswith("SYN-")][index]


async def get(handle: ServerHandle, endpoint: str, params: dict[str, str]) -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.get(handle.url(endpoint), params=params) as resp:
            return resp.status, resp.headers, await resp.read()


# ------------------------------------------------------------------------------- parsing

def test_parse_the_documented_example() -> None:
    spec = FaultSpec.parse("error=0.1,throttle=0.05,reset=0.05,truncate=0.05,corrupt=0.02,stall=0.01,latency=50ms,"
                           "rate=4MiB,total_rate=64MiB,seed=7,stall_for=30s,retry_after=1")
    assert (spec.error, spec.throttle, spec.reset, spec.truncate, spec.corrupt, spec.stall) == (
        0.1, 0.05, 0.05, 0.05, 0.02, 0.01)
    assert spec.latency == pytest.approx(0.05) and spec.stall_for == 30.0
    assert spec.rate == 4 * 1024**2 and spec.total_rate == 64 * 1024**2
    assert spec.seed == 7 and spec.retry_after == 1 and spec.active


def test_off_by_default() -> None:
    assert not FaultSpec().active and not FaultSpec.parse("").active and not FaultSpec.parse("seed=3").active
    injector = FaultInjector(None)
    assert injector.decide("getImage", [("SeriesInstanceUID", "1")], download=True) == injector.decide(
        "getSeries", [], download=False)


@pytest.mark.parametrize("text,needle", [("eror=0.1", "eror"), ("error=2", "error"), ("latency=fast", "latency"),
                                         ("rate=0", "rate"), ("seed=x", "seed"), ("reset", "reset")])
def test_parse_errors_name_the_key(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        FaultSpec.parse(text)


def test_units() -> None:
    assert parse_duration("250ms") == pytest.approx(0.25) and parse_duration("2") == 2.0
    # one parser for every size option (harvester.units): KB/MB/GB decimal, KiB/MiB/GiB binary
    assert parse_size("512KiB") == 512 * 1024 and parse_size("1GiB") == 1024**3
    assert parse_size("512KB") == 512_000 and parse_size("2MB/s") == 2_000_000
    with pytest.raises(ValueError):
        parse_size("4 parsecs")


# ------------------------------------------------------------------------------- decisions

REQUESTS = [("getSeries", (("Collection", c),)) for c in "ABCDEFGH"] + [("getImage", (("SeriesInstanceUID", u),))
                                                                        for u in "12345678"]


def test_decisions_depend_on_the_request_not_on_arrival_order() -> None:
    spec = FaultSpec.parse("error=0.3,throttle=0.2,reset=0.2,truncate=0.3,corrupt=0.3,stall=0.3,seed=5")
    forward, backward = FaultInjector(spec), FaultInjector(spec)
    seen_forward = {(ep, p, n): forward.decide(ep, p, download=ep == "getImage") for n in range(3) for ep, p in REQUESTS}
    seen_backward = {(ep, p, n): backward.decide(ep, p, download=ep == "getImage")
                     for n in range(3) for ep, p in reversed(REQUESTS)}
    assert seen_forward == seen_backward
    assert len({d for d in seen_forward.values()}) > 3  # not one constant decision
    reseeded = FaultInjector(FaultSpec.parse("error=0.3,throttle=0.2,reset=0.2,truncate=0.3,corrupt=0.3,stall=0.3,seed=6"))
    assert seen_forward != {(ep, p, n): reseeded.decide(ep, p, download=ep == "getImage")
                            for n in range(3) for ep, p in REQUESTS}


def test_parameter_order_does_not_matter_and_repeats_differ() -> None:
    injector = FaultInjector(FaultSpec.parse("error=0.5,seed=1"))
    twin = FaultInjector(FaultSpec.parse("error=0.5,seed=1"))
    a = [injector.decide("getSeries", [("Collection", "X"), ("Modality", "CT")], download=False) for _ in range(30)]
    b = [twin.decide("getSeries", [("Modality", "CT"), ("Collection", "X")], download=False) for _ in range(30)]
    assert a == b
    assert {d.error_status is not None for d in a} == {True, False}  # the n-th repeat is a new draw


def test_switching_one_fault_on_does_not_move_another() -> None:
    only_error = FaultInjector(FaultSpec.parse("error=0.3,seed=2"))
    error_and_stall = FaultInjector(FaultSpec.parse("error=0.3,stall=0.9,seed=2"))
    for ep, p in REQUESTS:
        x = only_error.decide(ep, p, download=True)
        y = error_and_stall.decide(ep, p, download=True)
        assert x.error_status == y.error_status


def test_replace_restarts_the_counters() -> None:
    injector = FaultInjector(FaultSpec.parse("error=0.5,seed=9"))
    first = [injector.decide("getPatient", [], download=False) for _ in range(10)]
    injector.replace(FaultSpec.parse("error=0.5,seed=9"))
    assert [injector.decide("getPatient", [], download=False) for _ in range(10)] == first


async def test_token_bucket_paces() -> None:
    bucket = TokenBucket(rate=200_000, burst=10_000)
    start = time.monotonic()
    for _ in range(5):
        await bucket.take(10_000)
    assert time.monotonic() - start >= (50_000 - 10_000) / 200_000 * 0.9


# ------------------------------------------------------------------------------- over HTTP

async def test_error_is_500_or_503_with_html(server: ServerHandle, small_archive: Archive) -> None:
    server.set_faults("error=1,seed=1")
    statuses = set()
    for i in range(8):
        status, headers, body = await get(server, "getSeries", {"Collection": f"X{i}"})
        assert status in (500, 503) and headers["Content-Type"].startswith("text/html") and b"<html>" in body
        statuses.add(status)
    assert statuses == {500, 503}
    status, _, body = await get(server, "getImage", {"SeriesInstanceUID": a_series(small_archive).uid})
    assert status in (500, 503) and not body.startswith(b"PK")
    assert server.stats.faults == {"error": 9}


async def test_throttle_is_429_with_retry_after(server: ServerHandle) -> None:
    server.set_faults("throttle=1,retry_after=3")
    status, headers, _ = await get(server, "getCollectionValues", {})
    assert status == 429 and headers["Retry-After"] == "3"
    assert server.stats.faults == {"throttle": 1}


async def test_reset_before_answering_a_query(server: ServerHandle) -> None:
    server.set_faults("reset=1")
    with pytest.raises(aiohttp.ClientError):
        await get(server, "getCollectionValues", {})
    # aiohttp's client may retry an idempotent GET once after a disconnect: every try was reset
    assert server.stats.faults == {"reset": server.stats.requests["getCollectionValues"]}


async def test_reset_mid_stream(server: ServerHandle, small_archive: Archive) -> None:
    rec = a_series(small_archive)
    server.set_faults("reset=1,seed=4")
    received = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url("getImage"), params={"SeriesInstanceUID": rec.uid}) as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_any():
                    received += chunk
    assert received.startswith(b"PK\x03\x04")
    assert 0 < len(received) < rec.total_bytes
    assert server.stats.faults == {"reset": 1}


async def test_truncate_sends_a_clean_zip_with_fewer_files(server: ServerHandle, small_archive: Archive) -> None:
    rec = a_series(small_archive)
    server.set_faults("truncate=1,seed=3")
    for _ in range(3):
        status, _, body = await get(server, "getImageWithMD5Hash", {"SeriesInstanceUID": rec.uid})
        assert status == 200
        zf = zipfile.ZipFile(io.BytesIO(body))
        assert zf.testzip() is None
        dicoms = [n for n in zf.namelist() if n.endswith(".dcm")]
        assert len(dicoms) < len(rec.instances)
        # as the real service after an error mid-stream: a well-formed ZIP without md5hashes.csv
        assert zf.namelist() == dicoms
    assert server.stats.faults == {"truncate": 3}


async def test_corrupt_flips_one_file_in_a_valid_zip(server: ServerHandle, small_archive: Archive) -> None:
    rec = a_series(small_archive, 1)
    server.set_faults("corrupt=1,seed=8")
    status, _, body = await get(server, "getImage", {"SeriesInstanceUID": rec.uid, "IncludeMD5": "yes"})
    assert status == 200
    zf = zipfile.ZipFile(io.BytesIO(body))
    assert zf.testzip() is None  # the ZIP CRCs match the bytes sent
    listed = {row["Filename"]: row["MD5Hash"] for row in csv.DictReader(io.StringIO(zf.read("md5hashes.csv").decode()))}
    bad = [n for n, md5 in listed.items() if hashlib.md5(zf.read(n)).hexdigest() != md5]
    assert len(bad) == 1
    ds = pydicom.dcmread(io.BytesIO(zf.read(bad[0])))  # still parses as DICOM
    assert ds.SeriesInstanceUID == rec.uid
    assert server.stats.faults == {"corrupt": 1}


async def test_stall_goes_quiet_mid_stream_then_continues(server: ServerHandle, small_archive: Archive) -> None:
    rec = a_series(small_archive)
    server.set_faults("stall=1,stall_for=300ms,seed=2")
    arrivals: list[tuple[float, int]] = []
    body = bytearray()
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url("getImage"), params={"SeriesInstanceUID": rec.uid}) as resp:
            async for chunk in resp.content.iter_any():
                arrivals.append((time.monotonic(), len(chunk)))
                body += chunk
    gaps = [later[0] - earlier[0] for earlier, later in zip(arrivals, arrivals[1:], strict=False)]
    assert max(gaps) >= 0.3  # bytes, then nothing for stall_for, then the rest
    assert zipfile.ZipFile(io.BytesIO(bytes(body))).testzip() is None
    assert server.stats.faults == {"stall": 1}


async def test_latency_delays_every_response(server: ServerHandle) -> None:
    server.set_faults("latency=150ms")
    start = time.monotonic()
    status, _, _ = await get(server, "getCollectionValues", {})
    assert status == 200 and time.monotonic() - start >= 0.15


async def test_per_download_rate(server: ServerHandle, small_archive: Archive) -> None:
    rec = a_series(small_archive)
    server.set_faults("rate=96KiB")
    start = time.monotonic()
    status, _, body = await get(server, "getImage", {"SeriesInstanceUID": rec.uid})
    elapsed = time.monotonic() - start
    assert status == 200
    burst = 16 * 1024
    assert elapsed >= 0.9 * (len(body) - burst) / (96 * 1024)


async def test_total_rate_is_shared(server: ServerHandle, small_archive: Archive) -> None:
    recs = [a_series(small_archive, i) for i in range(3)]
    server.set_faults("total_rate=192KiB")
    start = time.monotonic()
    results = await asyncio.gather(*(get(server, "getImage", {"SeriesInstanceUID": r.uid}) for r in recs))
    elapsed = time.monotonic() - start
    total = sum(len(body) for _, _, body in results)
    assert all(status == 200 for status, _, _ in results)
    assert elapsed >= 0.9 * (total - 3 * 16 * 1024) / (192 * 1024)


async def test_same_seed_same_faults_even_when_concurrent(server: ServerHandle) -> None:
    spec = "error=0.4,throttle=0.2,seed=7"
    requests = [("getSeries", {"Collection": f"C{i % 5}"}) for i in range(25)]

    async def run(concurrently: bool) -> dict[str, list[int]]:
        server.set_faults(spec)
        if concurrently:
            results = await asyncio.gather(*(get(server, ep, p) for ep, p in requests))
        else:
            results = [await get(server, ep, p) for ep, p in requests]
        by_key: dict[str, list[int]] = {}
        for (_, params), (status, _, _) in zip(requests, results, strict=True):
            by_key.setdefault(params["Collection"], []).append(status)
        return {k: sorted(v) for k, v in by_key.items()}

    sequential = await run(False)
    assert await run(True) == sequential
    assert {s for statuses in sequential.values() for s in statuses} >= {200, 429}
    spec = "error=0.4,throttle=0.2,seed=8"
    assert await run(False) != sequential  # another seed, other faults
    server.set_faults(None)
    status, _, _ = await get(server, "getSeries", {"Collection": "C0"})
    assert status == 200


async def test_faults_spare_tokens_and_stats(small_archive: Archive) -> None:
    with serve_in_thread(small_archive, faults="error=1") as handle:
        async with aiohttp.ClientSession() as session:
            async with session.post(handle.root_url + "/nbia-api/oauth/token",
                                    data={"grant_type": "password", "username": "nbia_guest"}) as resp:
                assert resp.status == 200
            async with session.get(handle.root_url + "/_harvester/stats") as resp:
                assert resp.status == 200
        status, _, _ = await get(handle, "getCollectionValues", {})
        assert status in (500, 503)
