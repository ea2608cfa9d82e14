"""The progress display as a user sees it: ``harvester run`` in a pseudo-terminal against the
in-process loopback server, at 80 columns (and narrower), and with ``TERM=dumb``.

Issue 19's "Why": at 80 columns the bar wrapped; ``TERM=dumb`` showed nothing for minutes.
What the terminal shows is read back from the pty: each line of output between line feeds and
carriage returns (a live line redraws itself with ``\\r`` and cursor moves), escape sequences
removed, must fit the terminal's width.
"""
from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import pytest
import yaml

from harvest_helpers import manifest, select_all

ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()#][0-9A-Za-z]|\x1b[=>78]")
STATUS = re.compile(r"^(?:━* )?[\d,]+/[\d,]+ series  ")


def run_in_pty(args: list[str], cwd: Path, env: dict[str, str], columns: int, timeout: float = 600) -> tuple[int, str]:
    """Run ``harvester ARGS`` with stdin, stdout and stderr on a new pty of ``columns`` columns;
    returns the exit code and everything it wrote to the terminal."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "harvester", *args], stdin=slave, stdout=slave, stderr=slave,
                            cwd=cwd, env=env, start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                proc.kill()
                pytest.fail(f"no output for {timeout} s: {b''.join(chunks)[-2000:]!r}")
            try:
                data = os.read(master, 65536)
            except OSError:   # EIO: the child closed its end of the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=60)
    finally:
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def screen_lines(raw: str) -> list[str]:
    """What the terminal shows, line by line: escape sequences removed, split at line feeds and
    carriage returns (a redraw starts over at column 0)."""
    text = ESCAPES.sub("", raw)
    return [seg for line in text.split("\n") for seg in line.split("\r")]


def env_for(term: str, columns: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES")}
    return {**env, "TERM": term, "COLUMNS": str(columns), "LINES": "24", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def query_file(small_archive: Any, tmp_path: Path) -> Path:
    q = select_all(small_archive)
    q["select"].append({"collection": "HOSTILE"})   # failures: long messages printed above the live line
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(q))
    return path


def harvest_args(server: Any, query_file: Path, *extra: str) -> list[str]:
    return ["run", query_file.name, "-o", "out", "--api-url", server.base_url, "--timeout", "5", "--retries", "2",
            "--series-retries", "0", "--workers", "2", *extra]


def test_progress_at_80_columns_never_wraps_and_ends_with_the_summary(server: Any, query_file: Path,
                                                                      tmp_path: Path) -> None:
    """At 80 columns the bar wrapped: every line the terminal shows fits 80 columns, the live
    line was drawn with its figures, and the final summary is there (counts that add up, the
    failures by name, what to do)."""
    server.set_faults("total_rate=512KiB,seed=5")   # a few live frames, not a blink
    code, raw = run_in_pty(harvest_args(server, query_file), tmp_path, env_for("xterm-256color", 80), 80)
    lines = screen_lines(raw)
    assert "Traceback" not in raw
    assert code == 1, raw[-3000:]
    wide = [line for line in lines if len(line) > 80]
    assert not wide, wide[:3]
    frames = [line for line in lines if STATUS.match(line)]
    assert frames and any(" ETA " in f and "/s" in f for f in frames), lines[-40:]
    assert any(line.startswith("━") for line in frames), "the live line has its bar at 80 columns"
    records = manifest(tmp_path / "out")["series"]
    failed = sum(r["status"] == "failed" for r in records)
    complete = len(records) - failed
    assert failed and complete
    assert f"{len(records)} planned, {complete} complete ({complete} now, 0 before), {failed} failed, " \
           "0 unavailable" in lines
    assert f"rerun the same command to retry the {failed} failed series" in lines


def test_progress_at_40_columns_degrades_without_wrapping(server: Any, query_file: Path, tmp_path: Path) -> None:
    code, raw = run_in_pty(harvest_args(server, query_file), tmp_path, env_for("xterm-256color", 40), 40)
    assert code == 1 and "Traceback" not in raw
    frames = [line for line in screen_lines(raw) if STATUS.match(line)]
    assert frames and all(len(f) <= 40 for f in frames), frames[:3]


def test_a_dumb_terminal_gets_periodic_plain_status_lines(server: Any, query_file: Path, tmp_path: Path) -> None:
    """`TERM=dumb` showed nothing for minutes: a dumb terminal gets a plain status line every
    --stats-interval seconds (series done/total, bytes, rate, ETA) and no cursor movement."""
    server.set_faults("total_rate=128KiB,seed=5")   # the transfer takes seconds: several intervals of 0.2 s
    code, raw = run_in_pty(harvest_args(server, query_file, "--stats-interval", "0.2"), tmp_path,
                           env_for("dumb", 80), 80)
    assert code == 1 and "Traceback" not in raw
    assert "\x1b[" not in raw and "\r\n" in raw and "\r" not in raw.replace("\r\n", "")
    status = [line for line in raw.split("\r\n") if STATUS.match(line)]
    assert len(status) >= 2, raw[-3000:]
    assert all(" ETA " in line and "/s" in line for line in status if "planning" not in line)
    assert all(len(line) <= 80 for line in raw.split("\r\n"))
    assert any(line.startswith("failed: ") for line in raw.split("\r\n"))
    assert "rerun the same command to retry the" in raw
