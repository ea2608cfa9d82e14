"""Time bounds: a Retry-After past the cap (10^9 s, inf, nan, negative, a date in 9999) is not
waited for, host-wide or not: the request fails with the reason, the series is tried again later
and then failed; a Retry-After under the cap is honoured. A server that dribbles (a byte every
quarter second, which resets the idle read timeout every time) is cut off by the stall rule, and
one that streams briskly but never ends by the per-request deadline; both with a message naming
the URL and what to do. The bounds are set small through the CLI, so no test waits long."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from harvester.config import Config
from harvester.errors import RetryableRequestError
from harvester.source.http import BodyGuard, parse_retry_after

from .hostile import assert_rerun_completes, build_hostile, cli, failed_lines, run_args, scan, serve_hostile, stream

RETRY_AFTERS = ["1000000000", "inf", "nan", "-1", "Fri, 31 Dec 9999 23:59:59 GMT"]


def retry_after(value: str):
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=429, text="slow down", headers={"Retry-After": value})
    return answer


def test_retry_after_past_the_cap_fails_the_series_with_the_reason(tmp_path: Path, figures) -> None:
    h = build_hostile(len(RETRY_AFTERS) + 1)
    for uid, value in zip(h.uids, RETRY_AFTERS):
        h.attacks[uid] = retry_after(value)
    out = tmp_path / "out"
    with serve_hostile(h):
        run = cli(*run_args(h, tmp_path, out, "--max-retry-after", "5"))
        assert run.returncode == 1, (run.stdout[-2000:], run.stderr[-2000:])
        failed = failed_lines(run)
        assert len(failed) == len(RETRY_AFTERS), run.stdout
        assert all("past the 5 s cap on Retry-After" in line for line in failed), failed
        # not retried on that wait: one request per series attempt (1 + --series-retries 1)
        assert all(h.hits[uid] == 2 for uid in h.uids[:-1]), h.hits
        scan(out, run)
        assert_rerun_completes(h, tmp_path, out)
    figures.record("issue14", family="time bounds: Retry-After past the cap", attacks=len(RETRY_AFTERS),
                   outcome="series failed with the reason, no host-wide wait; exit 1; rerun completes",
                   message=failed[0].split(": ", 2)[-1][:200])


def test_retry_after_under_the_cap_is_honoured(tmp_path: Path) -> None:
    h = build_hostile(1)
    uid = h.uids[0]
    honest = h.archive.zips[uid]

    async def once_busy(request: web.Request) -> web.Response:
        if h.hits[uid] == 1:
            return web.Response(status=429, text="busy", headers={"Retry-After": "1"})
        return web.Response(body=honest, content_type="application/octet-stream")

    h.attacks[uid] = once_busy
    out = tmp_path / "out"
    with serve_hostile(h):
        run = cli(*run_args(h, tmp_path, out, "--max-retry-after", "5"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert h.hits[uid] == 2


def dribble(h, key: str, data: bytes, every: float):
    async def answer(request: web.Request) -> web.StreamResponse:
        async def chunks():
            for i in range(len(data)):
                yield data[i:i + 1]
                await asyncio.sleep(every)
        return await stream(request, chunks(), h=h, key=key)
    return answer


def endless(h, key: str, data: bytes, size: int, every: float):
    async def answer(request: web.Request) -> web.StreamResponse:
        async def chunks():
            yield data[:4]
            while True:
                yield b"\0" * size
                await asyncio.sleep(every)
        return await stream(request, chunks(), h=h, key=key)
    return answer


@pytest.mark.parametrize("kind", ["dribble", "never-ending"])
def test_slow_server_is_cut_off_with_a_message(tmp_path: Path, kind: str, figures) -> None:
    h = build_hostile(2)
    uid = h.uids[0]
    if kind == "dribble":  # 4 bytes a second: under the 100 B/s minimum, but never idle for --timeout
        h.attacks[uid] = dribble(h, uid, h.archive.zips[uid], 0.25)
        flags = ["--min-rate", "100", "--stall-window", "1"]
        expect = "stalled"
    else:  # 40 KB/s, far above the minimum, but it never ends
        h.attacks[uid] = endless(h, uid, h.archive.zips[uid], 2048, 0.05)
        flags = ["--deadline", "1.5"]
        expect = "deadline"
    out = tmp_path / "out"
    with serve_hostile(h):
        run = cli(*run_args(h, tmp_path, out, "--retries", "1", *flags))
        assert run.returncode == 1, (run.stdout[-2000:], run.stderr[-2000:])
        failed = failed_lines(run)
        assert len(failed) == 1 and uid in failed[0] and expect in failed[0], failed
        assert "getImage?SeriesInstanceUID=" in failed[0]  # names the URL
        assert h.hits[uid] == 2  # one attempt per series attempt (--retries 1, --series-retries 1)
        scan(out, run)
        assert_rerun_completes(h, tmp_path, out)
    figures.record("issue14", family=f"time bounds: {kind} server", attacks=1,
                   outcome="cut off, series failed with the reason; exit 1; rerun completes",
                   bytes_sent=h.sent.get(uid, 0), message=failed[0].split(": ", 2)[-1][:200])


# ------------------------------------------------------------------------------ units (no I/O)

def test_parse_retry_after_marks_unusable_values_past_any_cap() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    for value in RETRY_AFTERS:
        assert parse_retry_after(value) > 1e6, value
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_body_guard_stall_and_deadline_on_a_fake_clock() -> None:
    now = [0.0]
    config = Config(stall_window=10.0, stall_min_bytes=1000, request_deadline=100.0)
    guard = BodyGuard(config, "http://x/y", clock=lambda: now[0])
    for _ in range(9):  # 999 bytes in 9 s: the window is not over yet
        now[0] += 1
        guard.feed(111)
    now[0] += 1
    guard.feed(1001)  # 1000+ in the window: fine, and a new window starts
    with pytest.raises(RetryableRequestError, match="stalled: 1 bytes in 10 s"):
        now[0] += 10
        guard.feed(1)
    brisk = BodyGuard(config, "http://x/y", clock=lambda: now[0], started=now[0])
    with pytest.raises(RetryableRequestError, match="deadline of 100 s") as err:
        for _ in range(200):
            now[0] += 1
            brisk.feed(10_000)
    assert err.value.overload  # a timeout: the engine's adaptive limit backs off


def test_time_on_our_side_is_credited_not_counted_as_a_stall() -> None:
    """The bandwidth cap or a slow disk holding the reader back is not the server stalling."""
    now = [0.0]
    config = Config(stall_window=10.0, stall_min_bytes=1000, request_deadline=30.0)
    guard = BodyGuard(config, "http://x/y", clock=lambda: now[0])
    for _ in range(20):  # 500 bytes a second of server time, each followed by 30 s of our own waiting
        now[0] += 1
        guard.feed(500)
        now[0] += 30
        guard.credit(30)
    assert guard.total == 10_000
