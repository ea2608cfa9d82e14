"""Issue 19, "a harvest that says what is true": each test is named for the bullet of its "Why"
it covers, and runs the command line as a user would (a subprocess), asserting the message,
the exit code and the files left behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harvest_helpers import manifest, select_all
from harvester.server.faults import FaultSpec
from harvester.server.synthetic import SyntheticSpec
from harvester.state import HarvestState

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
FAST_FLAGS = ["--timeout", "2", "--retries", "6", "--no-progress"]


def cli(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harvester", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, stdin=subprocess.DEVNULL, cwd=cwd)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("harvester: error:")
    return lines[0]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def query(tmp_path: Path) -> Path:
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump({"select": [{"collection": "X"}]}))
    return path


# ------------------------------------------------ Why: units and checks (Deliver 7)

def test_max_rate_2MB_and_faults_rate_2MB_are_the_same_bytes_per_second() -> None:  # noqa: N802
    """`--max-rate 2MB` was 2,000,000 B/s but `--faults rate=2MB` was 2 MiB: one parser now."""
    from harvester.cli import build_config, build_parser
    args = build_parser().parse_args(["run", "q.yaml", "-o", "out", "--max-rate", "2MB"])
    assert build_config(args, {}).max_rate == FaultSpec.parse("rate=2MB").rate == 2_000_000
    args = build_parser().parse_args(["run", "q.yaml", "-o", "out", "--max-rate", "2MiB/s"])
    assert build_config(args, {}).max_rate == FaultSpec.parse("rate=2MiB").rate == 2 * 1024**2
    assert SyntheticSpec.parse("size=2kB").size == 2000 and SyntheticSpec.parse("size=2KiB").size == 2048


@pytest.mark.parametrize("value", ["2M", "2mb", "2Mb", "fast", "0"])
def test_unclear_or_impossible_max_rate_is_exit_2_with_how_to_write_it(tmp_path: Path, query: Path,
                                                                        value: str) -> None:
    line = one_line_error(cli("run", str(query), "-o", str(tmp_path / "out"), "--max-rate", value), 2)
    assert "--max-rate" in line and repr(value) in line
    if value in ("2M", "2mb", "2Mb"):
        assert "write 2MB for 2,000,000 bytes or 2MiB for 2,097,152" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,needle", [
    (["--faults", "rate=2M"], "2MiB"),
    (["--faults", "total_rate=lots"], "total_rate"),
    (["--synthetic", "size=64kb"], "64KiB"),
])
def test_demo_specs_take_the_same_units_and_fail_before_anything_starts(tmp_path: Path, args: list[str],
                                                                          needle: str) -> None:
    line = one_line_error(cli("demo", str(tmp_path / "demo"), "--cache-dir", str(tmp_path / "cache"), *args), 2)
    assert needle in line
    assert not (tmp_path / "demo").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("option,value", [
    ("--series-retries", "-1"), ("--workers", "0"), ("--connections", "-2"), ("--connections", "0"),
    ("--retries", "0"), ("--workers", "many"), ("--timeout", "0"),
])
@pytest.mark.parametrize("command", ["run", "sync"])
def test_invalid_counts_are_exit_2_and_create_nothing(tmp_path: Path, query: Path, command: str, option: str,
                                                      value: str) -> None:
    """`--series-retries -1` was accepted."""
    line = one_line_error(cli(command, str(query), "-o", str(tmp_path / "out"), option, value), 2)
    assert option in line and value in line
    assert not (tmp_path / "out").exists()


def test_series_retries_0_is_a_valid_count() -> None:
    from harvester.cli import build_config, build_parser
    args = build_parser().parse_args(["run", "q.yaml", "-o", "out", "--series-retries", "0"])
    assert build_config(args, {}).series_retries == 0


def test_lock_error_exits_3_not_the_usage_code_and_says_what_to_do(tmp_path: Path, query: Path) -> None:
    """Another harvester holds DIR: a fatal stop (3) with what to do, not bad usage (2); the other
    run's work in progress is untouched."""
    out = tmp_path / "out"
    holder = HarvestState(out)
    holder.open()
    try:
        (holder.tmp_dir / "other-run.partial").write_bytes(b"PK\x03\x04 the other run's download")
        before = tree(out)
        line = one_line_error(cli("run", str(query), "-o", str(out), "--api-url", "http://127.0.0.1:9/v4"), 3)
        assert f"another harvester is running in {out}" in line
        assert "wait for it to finish" in line and "run the same command again" in line
        assert tree(out) == before
    finally:
        holder.close()
