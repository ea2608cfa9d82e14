"""Time bounds: a Retry-After past the cap (10^9 s, inf, nan, negative, a date in 9999) is not
waited for, host-wide or not: the request fails with the reason, the series is tried again later
and then failed; a Retry-After under the cap is honoured. A server that dribbles (a byte every
quarter second, which resets the idle read timeout every time) is cut off by the stall rule, and
one that streams briskly but never ends by the per-request deadline; both with a message naming
the URL and what to do. The bounds are set small through the CLI, so no test waits long."""
from __future__ import annotations

import asyncio
import json
import socketserver
import threading
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
        # the summary names the request by its endpoint and series (issue 19: no whole URL there);
        # harvest.json's record keeps the whole URL
        assert "getImage" in failed[0] and "http://" not in failed[0]
        record = next(r for r in json.loads((out / "harvest.json").read_text("utf-8"))["series"]
                      if r["SeriesInstanceUID"] == uid)
        assert "getImage?SeriesInstanceUID=" in record["error"]
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


# ------------------------------------------------------------------------------ metadata and headers

def test_dribbled_getseries_is_cut_off_with_one_line(tmp_path: Path, figures) -> None:
    h = build_hostile(1)
    body = json.dumps(h.archive.series).encode() * 50

    async def slow_rows(request: web.Request) -> web.StreamResponse:
        async def chunks():
            for i in range(0, len(body), 2):
                yield body[i:i + 2]
                await asyncio.sleep(0.1)
        return await stream(request, chunks(), h=h, key="getSeries", headers={"Content-Type": "application/json"})

    h.attacks["getSeries"] = slow_rows
    out = tmp_path / "out"
    with serve_hostile(h):
        run = cli(*run_args(h, tmp_path, out, "--retries", "1", "--min-rate", "100", "--stall-window", "1"))
        assert run.returncode == 3, (run.stdout[-2000:], run.stderr[-2000:])
        lines = [line for line in run.stderr.splitlines() if line.startswith("harvester: error: ")]
        assert len(lines) == 1 and "stalled" in lines[0] and "getSeries" in lines[0], run.stderr
        scan(out, run)
        assert_rerun_completes(h, tmp_path, out)
    figures.record("issue14", family="time bounds: getSeries dribbled", attacks=1, outcome="one line, exit 3",
                   message=lines[0][:200])


class DribbledHeaders(socketserver.ThreadingTCPServer):
    """Answers every request with a status line, then one header byte every 0.1 s, forever: the
    idle read timeout is reset by each byte; only the deadline per request ends it."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.stop = threading.Event()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.recv(65536)
                try:
                    self.request.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                    while not outer.stop.wait(0.1):
                        self.request.sendall(b"a")
                except OSError:
                    pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_dribbled_headers_are_cut_off_by_the_deadline(tmp_path: Path, figures) -> None:
    server = DribbledHeaders()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        query = tmp_path / "q.yaml"
        query.write_text("select:\n  - collection: HOSTILE\n")
        url = f"http://127.0.0.1:{server.server_address[1]}/nbia-api/services/v4"
        run = cli("run", str(query), "-o", str(tmp_path / "out"), "--api-url", url, "--retries", "1",
                  "--timeout", "5", "--deadline", "1.5", "--no-progress")
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
    assert run.returncode == 3, (run.stdout[-2000:], run.stderr[-2000:])
    lines = [line for line in run.stderr.splitlines() if line.startswith("harvester: error: ")]
    assert len(lines) == 1 and "deadline" in lines[0], run.stderr
    assert "Traceback" not in run.stderr
    figures.record("issue14", family="time bounds: headers dribbled a byte at a time", attacks=1,
                   outcome="one line, exit 3", message=lines[0][:200])
