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


def test_api_progress_true_draws_the_live_line_in_a_notebook(server: Any, small_archive: Any, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`progress=True` showed nothing in a notebook. In a Jupyter kernel (in_notebook) the API's
    harvest draws the live line (rich renders it as a widget there); elsewhere it stays silent."""
    import harvester
    import harvester.display
    from harvest_helpers import FAST

    options = {**FAST, "progress": True, "quiet": False}
    result = harvester.harvest(select_all(small_archive), tmp_path / "script", api_url=server.base_url, **options)
    assert result.ok and capsys.readouterr().err == ""          # a script: nothing drawn
    monkeypatch.setattr(harvester.display, "in_notebook", lambda: True)
    result = harvester.harvest(select_all(small_archive), tmp_path / "nb", api_url=server.base_url, **options)
    n = result.totals["series"]
    assert result.ok and n > 0
    assert f"{n}/{n} series" in capsys.readouterr().err        # the live line's last frame
    result = harvester.harvest(select_all(small_archive), tmp_path / "nb", api_url=server.base_url,
                               **{**options, "progress": False})
    assert result.ok and capsys.readouterr().err == ""          # progress=False: nothing


def test_plan_and_verify_show_they_are_working_on_a_terminal(server: Any, small_archive: Any,
                                                             tmp_path: Path) -> None:
    """`plan` printed nothing for 7 s and `verify` had no progress at all: on a terminal, plan
    draws a labelled planning line (gone once the table is there) and verify counts the files and
    bytes it has checked against what it will check, with an ETA; neither line is wider than the
    terminal."""
    q = tmp_path / "q.yaml"
    q.write_text(yaml.safe_dump(select_all(small_archive)))
    env = env_for("xterm-256color", 80)
    code, raw = run_in_pty(["plan", q.name, "--api-url", server.base_url], tmp_path, env, 80)
    assert code == 0 and "planning: asking the archive which series match" in ESCAPES.sub("", raw)
    assert all(len(line) <= 80 for line in screen_lines(raw))
    code, raw = run_in_pty(["run", q.name, "-o", "out", "--api-url", server.base_url, "--no-progress", "--quiet"],
                           tmp_path, env, 80)
    assert code == 0, raw[-2000:]
    files = sum(len(r["files"]) for r in manifest(tmp_path / "out")["series"])
    code, raw = run_in_pty(["verify", "out"], tmp_path, env, 80)
    lines = screen_lines(raw)
    frames = [line for line in lines if line.startswith("verify: ")]
    assert code == 0 and frames and all(len(line) <= 80 for line in frames), frames[:3]
    # the totals come from the database before the first file is read: done/total, and an ETA
    assert any(line.startswith(f"verify: {files}/{files} files  ") and " checked" in line and "ETA " in line
               for line in frames), lines[-10:]
