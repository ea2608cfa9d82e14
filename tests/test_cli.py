"""The command line as a user meets it: subprocesses, exit codes, one-line errors, kill -9."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harvest_helpers import assert_identical, journal_commit_records, kill_after_progress, manifest, normal_collections, normal_series, select_all

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
FAST_FLAGS = ["--timeout", "2", "--retries", "6", "--no-progress"]


def cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harvester", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or ENV, stdin=subprocess.DEVNULL)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("harvester: error:")
    return lines[0]


def write_query(tmp_path: Path, archive) -> Path:
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(select_all(archive)))
    return path


def test_help_explains_commands_and_exit_codes():
    proc = cli("--help")
    assert proc.returncode == 0
    for word in ("run", "plan", "query", "verify", "serve", "demo", "exit codes"):
        assert word in proc.stdout
    proc = cli("run", "--help")
    assert proc.returncode == 0 and "--workers" in proc.stdout and "--layout" in proc.stdout
    # the defaults it states are the ones that apply
    from harvester.config import Config
    assert f"(default {Config().workers})" in " ".join(proc.stdout.split())


@pytest.mark.parametrize("command", ["run", "sync"])
def test_run_and_sync_take_the_same_harvest_options(command):
    """A mirror job on a shared link needs the same politeness knobs as a one-off run."""
    from harvester.cli import build_config, build_parser
    args = build_parser().parse_args([command, "q.yaml", "-o", "out", "--workers", "3", "--connections", "5",
                                      "--series-retries", "1", "--max-rate", "50MB", "--layout", "flat",
                                      "--no-progress", "--quiet"])
    config = build_config(args, {})
    assert (config.workers, config.connections, config.series_retries) == (3, 5, 1)
    assert config.max_rate == 50_000_000
    assert config.layout == "flat" and not config.progress and config.quiet
    assert str(config.out_dir) == "out"


def test_no_command_is_usage_error():
    assert cli().returncode == 2


@pytest.mark.parametrize("content,suffix,needle", [
    ("select: [", ".yaml", "not valid YAML"),
    ("select:\n  - collection: X\n    colour: red\n", ".yaml", "colour"),
    ("nothing=here\n", ".tcia", "ListOfSeriesToDownload"),
    ("a,b\n1,2\n", ".csv", "no series UID column"),
    ("{}", ".json", "select"),
])
def test_malformed_inputs_exit_2_with_one_line(tmp_path, content, suffix, needle):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    line = assert_one_line_error(cli("plan", str(path), "--api-url", "http://127.0.0.1:9/nbia-api/services/v4"))
    assert needle in line and str(path) in line


@pytest.mark.parametrize("command", ["plan", "run", "sync"])
def test_unreachable_archive_says_where_and_what_to_do(tmp_path, command):
    """Nothing listens on the port: one line naming the URL, with what to do; exit 3; and no
    output directory left behind by the failed first run."""
    import socket
    with socket.socket() as sock:  # a port that was free a moment ago, and that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    q = tmp_path / "q.yaml"
    q.write_text(yaml.safe_dump({"select": [{"collection": "X"}]}))
    api = f"http://127.0.0.1:{port}/nbia-api/services/v4"
    out = ["-o", str(tmp_path / "o")] if command != "plan" else []
    line = assert_one_line_error(cli(command, str(q), *out, "--api-url", api, "--retries", "2"), code=3)
    assert f"cannot connect to {api}/" in line and "check the URL and the network" in line
    assert not (tmp_path / "o").exists()


def test_failed_first_run_leaves_no_directories_but_a_harvest_is_never_touched(server, small_archive, tmp_path):
    """Unknown collection into a fresh nested DIR: exit 2, and none of the folders it made remain.
    A failing rerun into a harvested DIR (wrong URL) leaves every file as it was."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"select": [{"collection": "NO-SUCH-COLLECTION"}]}))
    nested = tmp_path / "a" / "b" / "out"
    assert_one_line_error(cli("run", str(bad), "-o", str(nested), "--api-url", server.base_url))
    assert not (tmp_path / "a").exists()
    out = tmp_path / "out"
    q = write_query(tmp_path, small_archive)
    first = cli("run", str(q), "-o", str(out), "--api-url", server.base_url, *FAST_FLAGS)
    assert first.returncode == 0, first.stderr
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "lock"}
    assert manifest(out)["totals"]["complete"] > 0
    gone = cli("run", str(q), "-o", str(out), "--api-url", "http://127.0.0.1:9/nbia-api/services/v4",
               "--retries", "1")
    assert_one_line_error(gone, code=3)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "lock"}
    assert after == before


def test_ctrl_c_while_planning_a_first_run_leaves_no_directory(server, small_archive, tmp_path):
    server.set_faults("latency=400ms")  # planning takes a few seconds
    q = write_query(tmp_path, small_archive)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "harvester", "run", str(q), "-o", str(out), "--api-url",
                             server.base_url, *FAST_FLAGS], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (out / ".harvester" / "lock").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the run has opened DIR: now it is planning
    assert proc.poll() is None and server.stats.downloads == {}
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert server.stats.downloads == {} and not out.exists()


def test_missing_query_file(tmp_path):
    line = assert_one_line_error(cli("run", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "o")))
    assert "no such file" in line
    assert not (tmp_path / "o").exists()


def test_bad_flags_are_usage_errors(tmp_path):
    assert_one_line_error(cli("run", "q.yaml", "-o", str(tmp_path), "--workers", "0"))
    assert_one_line_error(cli("run", "q.yaml", "-o", str(tmp_path), "--layout", "{Nope}/x"))


def test_plan_json_and_table(server, small_archive, tmp_path):
    q = write_query(tmp_path, small_archive)
    proc = cli("plan", str(q), "--api-url", server.base_url, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["series"] == len(normal_series(small_archive))
    assert set(data["collections"]) == set(normal_collections(small_archive))
    proc = cli("plan", str(q), "--api-url", server.base_url)
    assert proc.returncode == 0 and "total" in proc.stdout


def test_api_url_from_environment(server, small_archive, tmp_path):
    q = write_query(tmp_path, small_archive)
    proc = cli("plan", str(q), "--json", env={**ENV, "HARVESTER_API_URL": server.base_url})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["series"] == len(normal_series(small_archive))


def test_query_command(server, small_archive):
    proc = cli("query", "getCollectionValues", "--api-url", server.base_url, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    names = {r["Collection"] for r in json.loads(proc.stdout)}
    assert set(normal_collections(small_archive)) <= names
    name = normal_collections(small_archive)[0]
    proc = cli("query", "getSeries", f"Collection={name}", "--api-url", server.base_url, "--format", "csv")
    assert proc.returncode == 0 and proc.stdout.startswith("SeriesInstanceUID") or "SeriesInstanceUID" in proc.stdout
    line = assert_one_line_error(cli("query", "getSeries", "collection=x", "--api-url", server.base_url))
    assert "collection" in line


def test_unknown_collection_exit_2(server, small_archive, tmp_path):
    q = tmp_path / "q.yaml"
    q.write_text("select:\n  - collection: NO-SUCH-THING\n")
    line = assert_one_line_error(cli("run", str(q), "-o", str(tmp_path / "o"), "--api-url", server.base_url))
    assert "NO-SUCH-THING" in line


def test_run_then_verify(server, small_archive, tmp_path):
    q = write_query(tmp_path, small_archive)
    out = tmp_path / "out"
    proc = cli("run", str(q), "-o", str(out), "--api-url", server.base_url, *FAST_FLAGS)
    assert proc.returncode == 0, proc.stderr
    assert "0 failed" in proc.stdout and "harvest.json" in proc.stdout
    assert_identical(out, small_archive, normal_series(small_archive))
    n = len(manifest(out)["series"])
    proc = cli("verify", str(out))
    assert proc.returncode == 0
    assert f"{n} series checked: {n} intact, 0 failed, 0 missing, 0 damaged files, 0 extra files" in proc.stdout
    f = out / manifest(out)["series"][0]["files"][0]["path"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    proc = cli("verify", str(out))
    assert proc.returncode == 1 and "damaged" in proc.stdout and ", 1 damaged file, " in proc.stdout


def test_failed_series_exit_1_with_reasons(server, small_archive, tmp_path):
    hostile = [r for r in small_archive.records() if getattr(r, "hostile_kind", None)]
    q = tmp_path / "q.yaml"
    q.write_text(yaml.safe_dump({"select": [{"collection": hostile[0].row["Collection"]}]}))
    proc = cli("run", str(q), "-o", str(tmp_path / "o"), "--api-url", server.base_url, "--series-retries", "0",
               *FAST_FLAGS)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    failed_lines = [line for line in proc.stdout.splitlines() if line.strip().startswith("failed:")]
    assert len(failed_lines) == len(hostile)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume(server, small_archive, tmp_path):
    """kill -9 several times during a harvest; each rerun resumes; no completed series is fetched twice."""
    server.set_faults("latency=20ms,rate=48KiB,seed=9")  # slow enough that kills land mid-harvest
    q = write_query(tmp_path, small_archive)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "harvester", "run", str(q), "-o", str(out), "--api-url", server.base_url,
            "--workers", "3", *FAST_FLAGS, "--quiet"]
    rng = random.Random(1234)
    kills = 0
    for _ in range(6):
        complete_before = _complete_on_disk(out)
        downloads_before = server.stats.downloads
        proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL)
        kills += kill_after_progress(proc, out, rng.uniform(0, 0.5))
        downloads_after = server.stats.downloads
        for uid in complete_before:
            assert downloads_after.get(uid, 0) == downloads_before.get(uid, 0), f"{uid} downloaded again"
    assert kills >= 3
    server.set_faults(None)
    complete_before = _complete_on_disk(out)
    downloads_before = server.stats.downloads
    final = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    for uid in complete_before:
        assert server.stats.downloads.get(uid, 0) == downloads_before.get(uid, 0)
    assert_identical(out, small_archive, normal_series(small_archive))


def _complete_on_disk(out: Path) -> set[str]:
    """Series the journal vouches for and whose files are all present (what a rerun must skip)."""
    return {rec["SeriesInstanceUID"] for rec in journal_commit_records(out)
            if all((out / f["path"]).exists() for f in rec["files"])}


def test_ctrl_c_leaves_only_verified_series(server, small_archive, tmp_path):
    server.set_faults("latency=20ms,rate=48KiB,seed=2")
    q = write_query(tmp_path, small_archive)
    out = tmp_path / "out"
    # two workers: the 8 series come in waves, so the interrupt after the first commit lands mid-harvest
    # (with the default 24 workers every series would start at once and end together)
    proc = subprocess.Popen([sys.executable, "-m", "harvester", "run", str(q), "-o", str(out), "--api-url",
                             server.base_url, "--workers", "2", *FAST_FLAGS], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _complete_on_disk(out):
        time.sleep(0.05)  # wait until at least one series is committed, so the interrupt lands mid-harvest
    assert proc.poll() is None, "the harvest ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert "Traceback" not in stderr and "resume" in stderr
    doc = manifest(out)
    done = [r for r in doc["series"] if r["status"] == "complete"]
    assert done and len(done) < len(normal_series(small_archive))
    for rec in done:
        for f in rec["files"]:
            assert (out / f["path"]).stat().st_size == f["size"]
    tmp = out / ".harvester" / "tmp"
    assert not any(p.suffix == ".dcm" for p in out.rglob("*") if ".harvester" not in p.parts
                   and p.resolve() not in {(out / f["path"]).resolve() for r in done for f in r["files"]})
    server.set_faults(None)
    final = cli("run", str(q), "-o", str(out), "--api-url", server.base_url, *FAST_FLAGS)
    assert final.returncode == 0
    assert_identical(out, small_archive, normal_series(small_archive))
    assert tmp.exists()
