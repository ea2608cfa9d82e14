"""Issue 19, "a harvest that says what is true": each test is named for the bullet of its "Why"
it covers, and runs the command line as a user would (a subprocess), asserting the message,
the exit code and the files left behind."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from harvest_helpers import harvest, commits, kill_after_progress, manifest, select_all
from harvester.display import printable
from harvester.server.faults import FaultSpec
from harvester.server.synthetic import SyntheticSpec
from harvester.server.testing import serve_in_thread
from harvester.store.state import HarvestState

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


@pytest.fixture(scope="module")
def harvested(small_archive: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real harvest of every collection plus HOSTILE, whose series all fail."""
    out = tmp_path_factory.mktemp("ux") / "harvest"
    q = select_all(small_archive)
    q["select"].append({"collection": "HOSTILE"})
    with serve_in_thread(small_archive) as server:
        result = harvest(server.base_url, out, q, series_retries=0)
    assert result.failed and result.totals["complete"] > 0
    return out


@pytest.fixture(scope="module")
def complete(small_archive: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real harvest in which every series is complete."""
    out = tmp_path_factory.mktemp("ux") / "complete"
    with serve_in_thread(small_archive) as server:
        result = harvest(server.base_url, out, select_all(small_archive))
    assert result.ok
    return out


@pytest.fixture
def copy_of(harvested: Path, tmp_path: Path) -> Path:
    """A private copy of the harvest, for tests that change it."""
    dst = tmp_path / "harvest"
    shutil.copytree(harvested, dst, symlinks=True)
    return dst


@pytest.fixture
def complete_copy(complete: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "complete"
    shutil.copytree(complete, dst, symlinks=True)
    return dst


def recorded(out: Path) -> list[dict[str, Any]]:
    """harvest.json's records in the order the readers (verify, status, exports) stream them from
    the state database: first recorded first (harvest.json puts the last run's plan order first)."""
    with contextlib.closing(sqlite3.connect(out / ".harvester" / "state.db")) as db:
        seq = {uid: n for n, (uid,) in enumerate(db.execute("SELECT uid FROM series ORDER BY seq"))}
    records = manifest(out)["series"]
    assert sorted(seq) == sorted(r["SeriesInstanceUID"] for r in records)
    return sorted(records, key=lambda r: seq[r["SeriesInstanceUID"]])


def complete_uids(out: Path) -> list[str]:
    return [r["SeriesInstanceUID"] for r in recorded(out) if r["status"] == "complete"]


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


def test_commands_other_than_serve_do_not_import_the_server(tmp_path: Path) -> None:
    """serve's options import the whole NBIA server (about 40 ms of every start-up); the parser
    of any other command leaves them out, and serve still has them."""
    code = ("import sys; from harvester.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, 'harvester.server.serve' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, "run", str(tmp_path / "missing.json"), "-o", str(tmp_path / "o")],
                         capture_output=True, text=True, env=ENV, timeout=60)
    assert run.stdout.split() == ["2", "False"], run.stdout + run.stderr
    from harvester.cli import build_parser
    assert build_parser(serve="serve" in ["serve"]).parse_args(["serve", "--port", "8"]).port == 8


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


# ------------------------------------------------ Why: output files (Deliver 2)

def test_export_csv_to_dev_stdout_writes_through_and_never_replaces_it(harvested: Path) -> None:
    """`export --csv /dev/stdout` (as root) replaced /dev/stdout with a regular file."""
    assert os.path.islink("/dev/stdout") or not os.path.isfile("/dev/stdout")
    proc = cli("export", str(harvested), "--csv", "/dev/stdout")
    assert proc.returncode == 0, proc.stderr
    assert os.path.islink("/dev/stdout") or not os.path.isfile("/dev/stdout")
    rows = proc.stdout.splitlines()
    assert rows[0].startswith("SeriesInstanceUID,") and len(rows) == 1 + len(manifest(harvested)["series"])
    assert "wrote /dev/stdout" in proc.stderr  # the summary never mixes with the export


def test_export_tcia_dash_is_stdout_not_a_file_named_dash(harvested: Path, tmp_path: Path) -> None:
    """`export --tcia -` wrote a file named `-`."""
    proc = cli("export", str(harvested), "--tcia", "-", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "ListOfSeriesToDownload=" in lines
    assert lines[lines.index("ListOfSeriesToDownload=") + 1:] == complete_uids(harvested)
    assert list(tmp_path.iterdir()) == []


def test_export_csv_and_tcia_both_to_stdout_is_a_usage_error(harvested: Path, tmp_path: Path) -> None:
    line = one_line_error(cli("export", str(harvested), "--tcia", "-", "--csv", "-", cwd=tmp_path), 2)
    assert "both write to stdout" in line
    assert list(tmp_path.iterdir()) == []


def test_export_through_a_symlink_writes_its_target_and_keeps_the_link(harvested: Path, tmp_path: Path) -> None:
    """Exports replaced a symlinked target instead of writing through it."""
    real = tmp_path / "shared" / "cohort.tcia"
    real.parent.mkdir()
    real.write_text("old\n")
    link = tmp_path / "cohort.tcia"
    link.symlink_to(real)
    proc = cli("export", str(harvested), "--tcia", str(link))
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text().splitlines()[-len(complete_uids(harvested)):] == complete_uids(harvested)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort.tcia", "shared"]
    assert [p.name for p in real.parent.iterdir()] == ["cohort.tcia"]


def test_export_to_a_fifo_writes_through(harvested: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    proc = cli("export", str(harvested), "--csv", str(fifo))
    reader.join(timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert got and got[0].startswith(b"SeriesInstanceUID,")


def test_export_to_a_regular_file_is_still_atomic(harvested: Path, tmp_path: Path) -> None:
    """A regular file is replaced by a rename (a new inode), never rewritten in place: a hard
    link to the old file keeps the old bytes, and no temp file is left."""
    target = tmp_path / "series.csv"
    target.write_text("old\n")
    os.link(target, tmp_path / "old.csv")
    proc = cli("export", str(harvested), "--csv", str(target))
    assert proc.returncode == 0, proc.stderr
    assert target.read_text().startswith("SeriesInstanceUID,")
    assert (tmp_path / "old.csv").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.csv", "series.csv"]


@pytest.mark.parametrize("command,option", [
    (["export", "--csv"], "--csv"), (["export", "--tcia"], "--tcia"), (["report", "-o"], "-o")])
@pytest.mark.parametrize("where", ["missing-folder/out", "a-directory"])
def test_unwritable_output_hint_names_the_commands_own_option(harvested: Path, tmp_path: Path,
                                                              command: list[str], option: str, where: str) -> None:
    """As a normal user the hint said `(-o DIR)`, an option export lacks."""
    (tmp_path / "a-directory").mkdir()
    before = tree(harvested)
    target = tmp_path / where
    line = one_line_error(cli(command[0], str(harvested), command[1], str(target)), 3)
    assert f"cannot write {target}" in line
    assert f"{option} FILE" in line and "-o DIR" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-directory"] and not any((tmp_path / "a-directory").iterdir())
    assert tree(harvested) == before


def test_report_dash_is_stdout(harvested: Path, tmp_path: Path) -> None:
    proc = cli("report", str(harvested), "-o", "-", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("<!DOCTYPE html>") and proc.stdout.rstrip().endswith("</html>")
    assert "wrote -" in proc.stderr and list(tmp_path.iterdir()) == []
    assert not (harvested / "report.html").exists()


def test_report_default_target_in_a_harvest_never_follows_a_link_out_of_it(copy_of: Path, tmp_path: Path) -> None:
    """DIR may come from someone else: a report.html link there pointing outside is replaced,
    and what it pointed to is left alone (only a target the user names is written through)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (copy_of / "report.html").symlink_to(victim)
    proc = cli("report", str(copy_of))
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == "precious\n"
    assert not (copy_of / "report.html").is_symlink()
    assert (copy_of / "report.html").read_text().startswith("<!DOCTYPE html>")


# ------------------------------------------------ Why: verify says "all match" on an incomplete cohort (Deliver 1)

def summary_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stdout.splitlines() if " series checked: " in line]
    assert len(lines) == 1, proc.stdout
    return lines[0].split("; ", 1)[1]


def test_verify_of_a_complete_harvest_exits_0_with_the_counts(complete: Path) -> None:
    n = len(manifest(complete)["series"])
    proc = cli("verify", str(complete))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary_line(proc) == f"{n} series checked: {n} intact, 0 failed, 0 missing, 0 damaged files, 0 extra files"


def test_verify_exits_1_when_series_failed_and_names_them(harvested: Path) -> None:
    """`verify` printed "all match" and exited 0 on a harvest with failed series, so
    `verify DIR && train.py` passed on an incomplete cohort."""
    records = recorded(harvested)
    failed = [r for r in records if r["status"] != "complete"]
    before = tree(harvested)
    proc = cli("verify", str(harvested))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    n, ok = len(records), len(records) - len(failed)
    assert summary_line(proc) == (f"{n} series checked: {ok} intact, {len(failed)} failed, 0 missing, "
                                  "0 damaged files, 0 extra files")
    named = [line for line in proc.stdout.splitlines() if line.startswith("failed: ")]
    assert len(named) == len(failed)
    for rec, line in zip(failed, named):
        # server text is shown with its control characters made visible (HOSTILE's IDs hold ESC sequences)
        assert line.startswith(printable(f"failed: {rec['Collection']} {rec['PatientID']}"))
        assert rec["SeriesInstanceUID"] in line and "\x1b" not in line
    assert f"to fetch the {len(failed)} failed or missing series, run the same harvester run" in proc.stdout
    assert "all match" not in proc.stdout
    assert tree(harvested) == before  # verify only reads


def test_verify_reports_a_stray_file_in_a_series_folder(complete_copy: Path) -> None:
    """A stray file in a series folder was not reported."""
    rec = manifest(complete_copy)["series"][0]
    stray = complete_copy / rec["path"] / "notes.txt"
    stray.write_text("not DICOM")
    (complete_copy / rec["path"] / "sub").mkdir()
    (complete_copy / rec["path"] / "sub" / "x.dcm").write_bytes(b"x")
    n = len(manifest(complete_copy)["series"])
    proc = cli("verify", str(complete_copy))
    assert proc.returncode == 1
    assert summary_line(proc) == (f"{n} series checked: {n - 1} intact, 0 failed, 0 missing, 0 damaged files, "
                                  "2 extra files")
    assert f"extra: {rec['path']}/notes.txt" in proc.stdout and f"extra: {rec['path']}/sub/x.dcm" in proc.stdout
    assert stray.read_text() == "not DICOM"  # reported, never deleted


def test_verify_does_not_follow_a_symlink_in_a_series_folder(complete_copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.dcm").write_bytes(b"x")
    rec = manifest(complete_copy)["series"][0]
    (complete_copy / rec["path"] / "link").symlink_to(outside)
    proc = cli("verify", str(complete_copy))
    assert proc.returncode == 1
    assert f"extra: {rec['path']}/link" in proc.stdout and "secret.dcm" not in proc.stdout
    assert ", 1 extra file" in summary_line(proc)


def test_verify_counts_a_deleted_series_folder_as_missing_and_a_damaged_file(complete_copy: Path) -> None:
    records = manifest(complete_copy)["series"]
    shutil.rmtree(complete_copy / records[0]["path"])
    (complete_copy / records[1]["files"][0]["path"]).write_bytes(b"truncated")
    n = len(records)
    proc = cli("verify", str(complete_copy))
    assert proc.returncode == 1
    assert summary_line(proc) == (f"{n} series checked: {n - 2} intact, 0 failed, 1 missing, 1 damaged file, "
                                  "0 extra files")
    assert f"damaged: {records[1]['files'][0]['path']}: size 9" in proc.stdout
    assert "harvester verify" in proc.stdout and "--repair" in proc.stdout


def test_verify_after_kill_9_counts_what_the_run_never_finished_as_missing(server: Any, small_archive: Any,
                                                                          tmp_path: Path) -> None:
    """kill -9 mid-harvest: verify exits 1 and its counts add up to every planned series."""
    server.set_faults("latency=20ms,rate=48KiB,seed=4")  # slow enough for the kill to land mid-harvest
    q = tmp_path / "q.yaml"
    q.write_text(yaml.safe_dump(select_all(small_archive)))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "harvester", "run", str(q), "-o", str(out), "--api-url",
                             server.base_url, "--workers", "2", *FAST_FLAGS, "--quiet"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert kill_after_progress(proc, out, 0.0), "the harvest ended before it could be killed"
    planned = json.loads(cli("plan", str(q), "--api-url", server.base_url, "--json").stdout)["series"]
    committed = len(set(commits(out)))
    assert 0 < committed < planned
    proc = cli("verify", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # A commit whose folder had not been renamed into place when the kill landed is missing too
    # (the next run finishes it from staging): intact <= committed, and every other series is missing.
    m = re.fullmatch(rf"{planned} series checked: (\d+) intact, 0 failed, (\d+) missing, 0 damaged files, "
                     r"0 extra files", summary_line(proc))
    assert m, summary_line(proc)
    intact, missing = int(m.group(1)), int(m.group(2))
    assert intact <= committed and intact + missing == planned
    server.set_faults(None)
    assert cli("run", str(q), "-o", str(out), "--api-url", server.base_url, *FAST_FLAGS).returncode == 0
    proc = cli("verify", str(out))
    assert proc.returncode == 0 and summary_line(proc).startswith(f"{planned} series checked: {planned} intact, ")


# ------------------------------------------------ Why: help text and an example for every command (Deliver 8)

def subcommands() -> dict[str, Any]:
    from harvester.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(sub.choices)


@pytest.mark.parametrize("command", ["", *subcommands()])
def test_every_command_help_exits_0_with_examples_that_parse(command: str) -> None:
    """`verify`, `status`, `report`, `export`, `demo` had no example and some arguments no help."""
    import shlex

    from harvester.cli import build_parser
    proc = cli(*([command] if command else []), "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert "\nexamples:\n" in proc.stdout
    examples = proc.stdout.split("\nexamples:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    own = [line.strip() for line in examples if line.strip().startswith(f"harvester {command}".strip())]
    assert own, examples
    for line in own:
        words = shlex.split(line.split("  #", 1)[0].split("&&")[0].split("|")[0].split(">")[0])
        if "COMMAND" in words:
            continue
        args = build_parser().parse_args(words[1:])  # an example that does not parse would exit 2
        assert args.command == words[1]
    if command:
        for action in subcommands()[command]._actions:
            assert action.help, f"harvester {command}: {action.dest} has no help"


# ------------------------------------------------ Why: a rerun, the summary and what to do (Deliver 3)

def write_query(tmp_path: Path, query: dict[str, Any], name: str = "q.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(query))
    return path


def json_summary(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout   # one JSON object on stdout, nothing else
    return json.loads(lines[0])


def test_a_rerun_says_what_it_resumes_and_its_rate_counts_only_this_runs_bytes(server: Any, small_archive: Any,
                                                                              tmp_path: Path) -> None:
    """A rerun said nothing about resuming, and its progress started with the bytes already on
    disk. It now says what is complete and what is left, and its bytes and rate are this run's."""
    every = select_all(small_archive)
    first = write_query(tmp_path, {"select": every["select"][:1]}, "first.yaml")
    both = write_query(tmp_path, every, "both.yaml")
    out = tmp_path / "out"
    assert cli("run", str(first), "-o", str(out), "--api-url", server.base_url, *FAST_FLAGS).returncode == 0
    before = {r["SeriesInstanceUID"]: r["bytes"] for r in manifest(out)["series"]}
    proc = cli("run", str(both), "-o", str(out), "--api-url", server.base_url, *FAST_FLAGS, "--json")
    assert proc.returncode == 0, proc.stderr
    s = json_summary(proc)
    records = manifest(out)["series"]
    now = [r for r in records if r["SeriesInstanceUID"] not in before]
    assert s["planned"] == len(records) and s["complete"] == len(records) and s["ok"] and s["exit_code"] == 0
    assert (s["complete_now"], s["complete_before"], s["failed"], s["unavailable"]) == (len(now), len(before), 0, 0)
    from harvester.events import human_bytes
    planned_now = sum(r["metadata"]["FileSize"] for r in now)
    assert (f"resuming: {len(before)} of {len(records)} series already complete, {len(now)} to fetch, "
            f"{human_bytes(planned_now)}") in proc.stderr
    # this run's bytes: what the new series weigh on the wire, never the bytes already on disk
    assert 0 < s["received_bytes"] < sum(before.values()) + planned_now
    assert s["received_bytes"] <= 2 * planned_now
    # "seconds" is rounded to the millisecond, so a transfer of 50 ms on loopback moves the rate it
    # implies by up to 1%: the rate must lie between what the two ends of that rounding give
    low = s["received_bytes"] / (s["seconds"] + 0.0005)
    high = s["received_bytes"] / max(s["seconds"] - 0.0005, 1e-9)
    assert low - 1 <= s["rate"] <= high + 1, s
    documented = " ".join(cli("run", "--help").stdout.split())
    assert all(key in documented for key in s)   # every key of the JSON summary is in --help


def test_the_summary_adds_up_names_each_failure_and_says_to_rerun(small_archive: Any, tmp_path: Path) -> None:
    """Final messages were wrong about what happens next ("it will be fetched again" after the
    last attempt), named series by UID only, carried the whole request URL, and never said
    "rerun the same command to retry the 7 failed series"."""
    q = select_all(small_archive)
    q["select"].append({"collection": "HOSTILE"})
    path = write_query(tmp_path, q)
    out = tmp_path / "out"
    with serve_in_thread(small_archive, faults="truncate=1.0,seed=2") as failing:   # every download is cut short
        proc = cli("run", str(path), "-o", str(out), "--api-url", failing.base_url, "--series-retries", "0",
                   "--retries", "1", "--timeout", "2", "--no-progress")
    assert proc.returncode == 1, proc.stderr
    records = manifest(out)["series"]
    failed = [r for r in records if r["status"] == "failed"]
    assert failed and len(failed) == len(records)
    first = proc.stdout.splitlines()[0]
    assert first == f"{len(records)} planned, 0 complete (0 now, 0 before), {len(failed)} failed, 0 unavailable"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("  failed: ")]
    assert len(lines) == len(failed)
    by_uid = {line.split(": ", 2)[1]: line for line in lines}
    for rec in failed:
        line = by_uid[rec["SeriesInstanceUID"]]
        assert printable(f"{rec['Collection']} {rec['PatientID']}") in line
        description = rec["metadata"].get("SeriesDescription")
        if description:
            assert printable(json.dumps(description, ensure_ascii=False)) in line
    normal = [by_uid[r["SeriesInstanceUID"]] for r in failed if r["Collection"] != "HOSTILE"]
    assert normal and all(": truncated: " in line for line in normal), normal[:2]
    assert "http://" not in proc.stdout and "fetched again" not in proc.stdout + proc.stderr
    assert f"rerun the same command to retry the {len(failed)} failed series" in proc.stdout
    # (the advice holds: the same command is what retries them; another archive needs --force)
    again = cli("run", str(path), "-o", str(out), "--api-url", "http://127.0.0.1:9/v4", "--retries", "1",
                "--no-progress", "--force")
    assert again.returncode == 3


def test_a_fatal_stop_summary_names_the_reason_not_0_of_0_failed(small_archive: Any, tmp_path: Path) -> None:
    """Disk full: the summary after the fatal stop said "0/0 series complete, 18 failed" with the
    reason "failed". Its counts now add up to the plan, the series the stop left are "not
    fetched", and the error line names the reason and what to do."""
    import resource
    import signal

    path = write_query(tmp_path, select_all(small_archive))
    out = tmp_path / "out"

    def limit() -> None:  # in the child: a write past 128 KiB fails with EFBIG (disk full)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (128 * 1024, 128 * 1024))

    with serve_in_thread(small_archive) as srv:
        proc = subprocess.run([sys.executable, "-m", "harvester", "run", str(path), "-o", str(out), "--api-url",
                               srv.base_url, "--workers", "2", *FAST_FLAGS, "--json"], capture_output=True,
                              text=True, env=ENV, timeout=300, stdin=subprocess.DEVNULL, preexec_fn=limit)
    assert proc.returncode == 3, (proc.stdout[-2000:], proc.stderr[-2000:])
    s = json_summary(proc)
    planned = len(select_all(small_archive)["select"]) and s["planned"]
    assert planned > 0 and s["complete"] + s["failed"] + s["not_fetched"] == planned, s
    assert s["not_fetched"] > 0 and "disk full" in s["fatal"]
    assert all(f["detail"] != "failed" for f in s["failures"])
    text = proc.stderr
    assert f", {s['not_fetched']} not fetched (the run stopped)" in text and "0/0" not in text
    error = [line for line in text.splitlines() if line.startswith("harvester: error: ")]
    assert len(error) == 1 and "disk full" in error[0] and "run the same command again" in error[0]
    assert error[0].endswith(f"; {s['not_fetched'] + s['failed']} series left to fetch")


# ------------------------------------------------ Why: missing conventions (Deliver 8)

def test_run_dry_run_lists_what_would_be_fetched_and_writes_nothing(server: Any, small_archive: Any,
                                                                   tmp_path: Path) -> None:
    """`run --dry-run` did not exist."""
    every = select_all(small_archive)
    path = write_query(tmp_path, every)
    new = tmp_path / "new"
    proc = cli("run", str(path), "-o", str(new), "--api-url", server.base_url, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert not new.exists() and server.stats.requests.get("getImage", 0) == 0
    rows = [line for line in proc.stdout.splitlines() if not line.startswith("dry run: ")]
    planned = json.loads(cli("plan", str(path), "--api-url", server.base_url, "--json").stdout)
    assert len(rows) == planned["series"] > 0
    assert f"dry run: {planned['series']} planned, 0 already complete in {new}, {planned['series']} to fetch" \
        in proc.stdout
    # into a partly harvested DIR: what it holds is left out, and DIR is not touched
    out = tmp_path / "out"
    assert cli("run", str(write_query(tmp_path, {"select": every["select"][:1]}, "one.yaml")), "-o", str(out),
               "--api-url", server.base_url, *FAST_FLAGS).returncode == 0
    have = set(complete_uids(out))
    before = tree(out)
    proc = cli("run", str(path), "-o", str(out), "--api-url", server.base_url, "--dry-run", "--json")
    s = json_summary(proc)
    assert s["dry_run"] and s["complete_before"] == len(have) and s["to_fetch"] == planned["series"] - len(have)
    assert {x["SeriesInstanceUID"] for x in s["list"]}.isdisjoint(have) and len(s["list"]) == s["to_fetch"]
    assert tree(out) == before


def test_plan_list_and_plan_json_name_every_series(server: Any, small_archive: Any, tmp_path: Path) -> None:
    """`plan` did not list the series (`--list`, `--json` with series)."""
    path = write_query(tmp_path, select_all(small_archive))
    doc = json.loads(cli("plan", str(path), "--api-url", server.base_url, "--json").stdout)
    assert len(doc["list"]) == doc["series"] > 0
    assert sum(x["FileSize"] for x in doc["list"]) == doc["bytes"]
    assert set(doc["list"][0]) == {"SeriesInstanceUID", "Collection", "PatientID", "StudyInstanceUID", "Modality",
                                   "SeriesDescription", "ImageCount", "FileSize"}
    proc = cli("plan", str(path), "--api-url", server.base_url, "--list")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert len(lines) == doc["series"]
    for line, x in zip(lines, doc["list"]):
        assert line.startswith(printable(f"{x['Collection']}  {x['PatientID']}  {x['Modality']}  "
                                         f"{x['SeriesInstanceUID']}  "))
        assert printable(json.dumps(x["SeriesDescription"], ensure_ascii=False)) in line


def test_json_summaries_of_verify_and_sync_are_one_object_on_stdout(server: Any, small_archive: Any,
                                                                    complete_copy: Path, tmp_path: Path) -> None:
    """No `--json` summary for `run`, `verify` and `sync`."""
    n = len(manifest(complete_copy)["series"])
    v = json_summary(cli("verify", str(complete_copy), "--json"))
    assert (v["ok"], v["checked"], v["intact"], v["failed"], v["missing"], v["exit_code"]) == (True, n, n, 0, 0, 0)
    rec = manifest(complete_copy)["series"][0]
    (complete_copy / rec["files"][0]["path"]).write_bytes(b"damaged")
    proc = cli("verify", str(complete_copy), "--json")
    v = json_summary(proc)
    assert proc.returncode == 1 and not v["ok"] and v["damaged_files"] == 1 and v["exit_code"] == 1
    assert v["problems"][0].startswith(rec["files"][0]["path"])
    documented = " ".join(cli("verify", "--help").stdout.split())
    assert all(key in documented for key in v)
    assert "1 damaged file" in proc.stderr   # the words go to stderr
    path = write_query(tmp_path, select_all(small_archive))
    proc = cli("sync", str(path), "-o", str(tmp_path / "mirror"), "--api-url", server.base_url, *FAST_FLAGS, "--json")
    s = json_summary(proc)
    assert proc.returncode == 0 and s["ok"] and s["sync"]["new"] == s["planned"] == s["complete_now"] > 0
    dry = json_summary(cli("sync", str(path), "-o", str(tmp_path / "mirror"), "--api-url", server.base_url,
                           "--dry-run", "--json"))
    assert dry["dry_run"] and dry["new"] == [] and dry["unchanged"] == s["planned"]


def test_log_file_is_appended_with_timestamps_and_never_holds_the_password(small_archive: Any,
                                                                           tmp_path: Path) -> None:
    """`-v/--verbose` and `--log-file` did not exist."""
    from harvester.server.auth import ServerAuth
    password = "correct-horse-battery-staple"
    path = write_query(tmp_path, {"select": select_all(small_archive)["select"][:1]})
    log = tmp_path / "harvest.log"
    log.write_text("an earlier line\n")
    env = {**ENV, "NBIA_PW": password}
    with serve_in_thread(small_archive, faults="error=0.3,seed=11", auth=ServerAuth(users={"alice": password})) as srv:
        proc = subprocess.run([sys.executable, "-m", "harvester", "run", str(path), "-o", str(tmp_path / "out"),
                               "--api-url", srv.base_url, "--user", "alice", "--password-env", "NBIA_PW",
                               *FAST_FLAGS, "-v", "--log-file", str(log)], capture_output=True, text=True, env=env,
                              timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = log.read_text()
    assert text.startswith("an earlier line\n")   # appended
    lines = text.splitlines()[1:]
    assert lines and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", line) for line in lines), lines[:3]
    complete = [line for line in lines if " complete: " in line]
    assert len(complete) == len(manifest(tmp_path / "out")["series"])
    assert any(" retry" in line for line in lines)   # error=0.3: the retries are logged
    assert "harvester: info: complete: " in proc.stderr   # -v says it on stderr too
    import base64
    for secret in (password, base64.b64encode(f"alice:{password}".encode()).decode().rstrip("=")):
        assert secret not in text and secret not in proc.stderr + proc.stdout


def test_the_log_filter_redacts_what_any_module_logs(tmp_path: Path) -> None:
    import logging

    from harvester.cli import setup_logging
    log = tmp_path / "x.log"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        handler = setup_logging(0, log)
        logging.getLogger("harvester.somewhere").warning("GET %s?token=%s failed", "http://h/x", "abcdef123456")
        assert handler is not None
        handler.close()
    finally:
        root.handlers[:], root.level = saved
    assert "abcdef123456" not in log.read_text() and "token=***" in log.read_text()


def test_an_unwritable_log_file_is_exit_2_and_creates_nothing(tmp_path: Path, query: Path) -> None:
    line = one_line_error(cli("run", str(query), "-o", str(tmp_path / "out"), "--log-file",
                              str(tmp_path / "no" / "such" / "x.log")), 2)
    assert "--log-file" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.yaml"]


def test_query_columns_fit_a_table_in_80_columns(server: Any) -> None:
    """`query ... --format table` squeezed 26 columns into 80 (add `--columns`)."""
    cols = "PatientID,Modality,SeriesDescription"
    proc = subprocess.run([sys.executable, "-m", "harvester", "query", "getSeries", "--api-url", server.base_url,
                           "--format", "table", "--columns", cols], capture_output=True, text=True,
                          env={**ENV, "COLUMNS": "80"}, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if "PatientID" in line)
    assert header.index("PatientID") < header.index("Modality") < header.index("SeriesDescription")
    assert "SeriesInstanceUID" not in proc.stdout and all(len(line) <= 80 for line in proc.stdout.splitlines())
    rows = json.loads(cli("query", "getSeries", "--api-url", server.base_url, "--format", "json", "--columns",
                          "Modality,PatientID").stdout)
    assert rows and all(list(r) == ["Modality", "PatientID"] for r in rows)
    line = one_line_error(cli("query", "getSeries", "--api-url", server.base_url, "--columns", "Nope"), 2)
    assert "'Nope' is not a column" in line and "SeriesInstanceUID" in line


def test_markup_emoji_and_control_characters_in_archive_text_are_shown_as_sent(tmp_path: Path) -> None:
    """rich markup built from untrusted text (issue 15); escaping still let ':thumbs_up:' become
    an emoji and a server's ESC sequences reach the terminal."""
    from reliability.hostile import build_hostile, serve_hostile
    h = build_hostile(1)
    h.archive.collections = ["[red]x[/bold]", "[link=https://evil.example/]y[/link]", ":thumbs_up:", "a\x1b[2Jb"]
    with serve_hostile(h):
        proc = cli("query", "getCollectionValues", "--api-url", h.base_url, "--format", "table")
    assert proc.returncode == 0, proc.stderr
    for name in ("[red]x[/bold]", "[link=https://evil.example/]y[/link]", ":thumbs_up:", "a\\x1b[2Jb"):
        assert name in proc.stdout
    assert "👍" not in proc.stdout and "\x1b" not in proc.stdout


def test_serve_help_lists_the_synthetic_spec_keys_with_their_defaults() -> None:
    """`serve --help` did not list the synthetic spec keys."""
    from dataclasses import fields
    proc = cli("serve", "--help")
    assert proc.returncode == 0
    keys = proc.stdout.split("synthetic spec keys (key=default):\n", 1)[1].split("\n\n", 1)[0].splitlines()
    shown = dict(line.split()[0].split("=", 1) for line in keys)
    defaults = SyntheticSpec.parse(",".join(f"{k}={v}" for k, v in shown.items()))
    assert list(shown) == [f.name for f in fields(SyntheticSpec)]   # every key, in the dataclass's order
    assert defaults == SyntheticSpec()                              # and each default is the real one


def test_the_demo_example_selects_what_the_demo_archive_has(tmp_path: Path, synthetic_cache: Path) -> None:
    """The README's "Use" section was not runnable against a local `harvester serve`:
    config/lidc-ct.yaml asks for a collection the demo archive lacks; config/demo.yaml does not."""
    from harvester.server.synthetic import build_synthetic
    from harvest_helpers import REPO
    archive = build_synthetic(SyntheticSpec.parse("collections=2,patients=3,series=2,instances=8"), synthetic_cache)
    with serve_in_thread(archive) as srv:
        proc = cli("plan", str(REPO / "config" / "demo.yaml"), "--api-url", srv.base_url, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["series"] > 0


def test_workers_help_explains_in_flight_reaching_twice_workers() -> None:
    """"in flight 48" contradicted "--workers (default 24)": the help says why both are true."""
    text = " ".join(cli("run", "--help").stdout.split())
    workers = text.split("--workers N ", 1)[1].split(" --connections", 1)[0]
    assert "'in flight' can reach 2 x N" in workers and "default 24" in workers


def test_stderr_that_is_not_a_terminal_gets_periodic_status_lines(server: Any, small_archive: Any,
                                                                  tmp_path: Path) -> None:
    """A pipe or a log file showed nothing until a series ended: it gets a plain status line
    every --stats-interval seconds, and --quiet keeps only the summary."""
    server.set_faults("total_rate=128KiB,seed=5")   # seconds of transfer: several 0.2 s intervals
    path = write_query(tmp_path, select_all(small_archive))
    proc = cli("run", str(path), "-o", str(tmp_path / "out"), "--api-url", server.base_url, "--timeout", "5",
               "--stats-interval", "0.2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = [line for line in proc.stderr.splitlines() if re.match(r"[\d,]+/[\d,]+ series  ", line)]
    assert len(status) >= 2 and all(" ETA " in line and "/s  " in line for line in status), proc.stderr[-2000:]
    assert "\x1b" not in proc.stderr and all(len(line) <= 80 for line in status)
    quiet = cli("run", str(path), "-o", str(tmp_path / "again"), "--api-url", server.base_url, "--timeout", "5",
                "--stats-interval", "0.2", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout.splitlines()[0].endswith("0 failed, 0 unavailable")


# ------------------------------------------------ Why: verify --repair fetched only damaged files (Deliver 1)

def test_verify_repair_refetches_failed_and_missing_series_from_the_recorded_archive(server: Any, small_archive: Any,
                                                                                    tmp_path: Path) -> None:
    """`verify --repair` did not fetch failed or missing series. It now refetches both whole, from
    the archive harvest.json records (no --api-url given), and a second verify says all intact."""
    path = write_query(tmp_path, select_all(small_archive))
    out = tmp_path / "out"
    server.set_faults("truncate=0.5,seed=1")   # some downloads cut short: those series fail
    first = cli("run", str(path), "-o", str(out), "--api-url", server.base_url, "--series-retries", "0",
                "--retries", "1", "--timeout", "2", "--no-progress")
    assert first.returncode == 1, first.stdout + first.stderr
    records = manifest(out)["series"]
    failed = sorted(r["SeriesInstanceUID"] for r in records if r["status"] == "failed")
    complete = [r for r in records if r["status"] == "complete"]
    assert failed and len(complete) >= 2, (len(failed), len(complete))
    deleted = complete[0]
    shutil.rmtree(out / deleted["path"])
    kept = complete[1]
    kept_bytes = {f["path"]: (out / f["path"]).read_bytes() for f in kept["files"]}
    server.set_faults(None)
    repair = cli("verify", str(out), "--repair", "--no-progress")
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert "Traceback" not in repair.stdout + repair.stderr
    refetched = sorted(line.split(": ", 1)[1] for line in repair.stdout.splitlines()
                       if line.startswith("refetched series: "))
    assert refetched == sorted([*failed, deleted["SeriesInstanceUID"]])
    assert (f"0 damaged file(s), {len(failed)} failed and 1 missing series: 0 files repaired alone, "
            f"{len(failed) + 1} series refetched") in repair.stdout
    after = manifest(out)
    assert all(r["status"] == "complete" for r in after["series"]) and len(after["series"]) == len(records)
    assert after["source"]["url"] == server.base_url   # the archive it came from, still recorded
    assert all((out / f["path"]).is_file() for f in deleted["files"])
    assert {p: (out / p).read_bytes() for p in kept_bytes} == kept_bytes   # what was intact is untouched
    again = cli("verify", str(out))
    n = len(records)
    assert again.returncode == 0, again.stdout
    assert summary_line(again) == f"{n} series checked: {n} intact, 0 failed, 0 missing, 0 damaged files, 0 extra files"


# ------------------------------------------------ Why: another archive or layout merged silently (Deliver 4)

def test_a_run_into_a_harvest_of_another_archive_or_layout_is_refused_naming_both(server: Any, small_archive: Any,
                                                                                  tmp_path: Path) -> None:
    """A run into a directory harvested from another archive, or with another `--layout`,
    silently merged, rewrote `api_url` in harvest.json, or ignored the flag. It is now refused
    (exit 2, nothing changed) naming both, a rerun without --layout resumes with the recorded
    one, and --force adds to it as documented."""
    every = select_all(small_archive)
    first = write_query(tmp_path, {"select": every["select"][:1]}, "first.yaml")
    both = write_query(tmp_path, every, "both.yaml")
    out = tmp_path / "out"
    assert cli("run", str(first), "-o", str(out), "--api-url", server.base_url, "--layout", "flat",
               *FAST_FLAGS).returncode == 0
    before = tree(out)
    with serve_in_thread(small_archive, host="127.0.0.2") as other:   # another host (a port alone is not)
        line = one_line_error(cli("run", str(both), "-o", str(out), "--api-url", other.base_url, "--layout", "flat",
                                  *FAST_FLAGS), 2)
        assert f"holds a harvest of archive nbia {server.base_url}, not nbia {other.base_url}" in line
        assert "--force" in line
        assert tree(out) == before and other.stats.requests.get("getSeries", 0) == 0   # refused before planning
        line = one_line_error(cli("run", str(both), "-o", str(out), "--api-url", server.base_url, "--layout",
                                  "descriptive", *FAST_FLAGS), 2)
        assert "holds a harvest of layout flat, not descriptive" in line
        assert tree(out) == before
        # a credential in the URL is not another archive (and is never shown)
        with_user = server.base_url.replace("http://", "http://someone:s3cret@")
        proc = cli("run", str(first), "-o", str(out), "--api-url", with_user, *FAST_FLAGS)
        assert proc.returncode == 0, proc.stderr
        assert "s3cret" not in proc.stdout + proc.stderr + (out / "harvest.json").read_text()
        # no --layout: the rerun resumes with the recorded one
        proc = cli("run", str(both), "-o", str(out), "--api-url", server.base_url, *FAST_FLAGS)
        assert proc.returncode == 0, proc.stderr
        doc = manifest(out)
        assert doc["layout"] == "flat" and all("/" not in r["path"] for r in doc["series"])
        # --force: what is there is kept, harvest.json names the archive of this run
        kept = tree(out)
        proc = cli("run", str(both), "-o", str(out), "--api-url", other.base_url, "--force", *FAST_FLAGS)
        assert proc.returncode == 0, proc.stderr
        doc = manifest(out)
        assert doc["source"] == {"kind": "nbia", "url": other.base_url} and doc["layout"] == "flat"
        def series_files(t: dict[str, bytes]) -> dict[str, bytes]:
            return {p: b for p, b in t.items() if not p.startswith(".harvester") and p != "harvest.json"}
        assert series_files(tree(out)) == series_files(kept)


def test_a_plan_larger_than_the_free_space_is_refused_before_anything_is_fetched(small_archive: Any,
                                                                                 tmp_path: Path) -> None:
    """Disk full: there was no check of free space against the plan (60 MB planned, 19 MB free went
    ahead). An archive announcing more bytes than DIR's disk holds is now refused with one line,
    exit 3, nothing fetched and no directory left; --no-space-check starts anyway."""
    import dataclasses

    from harvester.server.archive import Archive

    free = shutil.disk_usage(tmp_path).free
    first = small_archive.records()[0]
    huge = Archive([dataclasses.replace(first, row={**first.row, "FileSize": 2 * free})])   # what the plan announces
    path = write_query(tmp_path, {"select": [{"series": first.uid}]})
    out = tmp_path / "out"
    with serve_in_thread(huge) as srv:
        line = one_line_error(cli("run", str(path), "-o", str(out), "--api-url", srv.base_url, *FAST_FLAGS,
                                  "--quiet"), 3)
        assert f"{out} has " in line and " free, the 1 series to fetch need " in line and "--no-space-check" in line
        assert not out.exists() and srv.stats.requests.get("getImage", 0) == 0
        proc = cli("run", str(path), "-o", str(out), "--api-url", srv.base_url, *FAST_FLAGS, "--no-space-check",
                   "--series-retries", "0")
    assert srv.stats.requests.get("getImage", 0) > 0   # it went ahead (and the series is not the one announced)
    assert proc.returncode == 1 and manifest(out)["series"][0]["status"] == "failed", proc.stderr


# ------------------------------------------------ Why: a 200,000-entry ZIP was called "truncated" (Deliver 3)

def test_a_zip_past_the_entry_limit_is_said_to_have_too_many_entries_not_truncated(tmp_path: Path,
                                                                                   synthetic_cache: Path) -> None:
    """A 200,000-entry ZIP was called "truncated". A ZIP past the entry limit (lowered here to 5
    for a series of 12, through the API as a user raising or lowering it would) now fails with
    what happened, too many entries for the limit, and nothing of it is kept."""
    from harvester import Config, harvest as harvest_api
    from harvester.config import Limits
    from harvester.events import reason_class
    from harvester.server.synthetic import build_synthetic

    archive = build_synthetic(SyntheticSpec.parse("collections=1,patients=1,studies=1,series=1,instances=12,"
                                                  "size=4KiB,seed=5"), synthetic_cache)
    out = tmp_path / "out"
    with serve_in_thread(archive) as srv:
        result = harvest_api(select_all(archive), out, config=Config(api_url=srv.base_url, series_retries=0,
                                                                        limits=Limits(max_entries=5)))
    assert not result.ok and len(result.failed) == 1
    uid, reason = result.failed[0]
    assert reason.startswith("ZIP has more entries than the limit of 5 per series (Limits.max_entries)"), reason
    assert "truncated" not in reason and "max_entries=N" in reason
    rec = manifest(out)["series"][0]
    assert rec["status"] == "failed" and reason_class(rec["error_kind"], rec["error"]) != "truncated"
    assert srv.stats.downloads == {uid: 1}   # not retried: more attempts would not make it fit
    assert [p for p in out.rglob("*.dcm")] == [] and list((out / ".harvester" / "tmp").iterdir()) == []


def test_the_command_exits_with_its_code_and_all_its_output_and_quietly_on_a_closed_pipe(
        server: Any, small_archive: Any, tmp_path: Path) -> None:
    """``python -m harvester`` ends by ``cli.exit_now`` (os._exit after atexit and a flush): its
    exit code and every byte it printed arrive, a --log-file is complete, and a reader that
    closed the pipe early (``harvester status DIR --json | head -c 1``) gets no "Exception
    ignored" or traceback on stderr, and the command's own code (a broken pipe while it writes
    is no error either: ``_dispatch``)."""
    out = tmp_path / "out"
    log = tmp_path / "h.log"
    run = subprocess.run([sys.executable, "-m", "harvester", "run", str(write_query(tmp_path, select_all(small_archive))),
                          "-o", str(out), "--api-url", server.base_url, *FAST_FLAGS, "--log-file", str(log)],
                         capture_output=True, text=True, env=ENV, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    lines = log.read_text().splitlines(keepends=True)
    assert lines and all(line.endswith("\n") for line in lines) and "complete" in lines[-1]   # flushed to the end
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}   # stdout buffered: written at exit
    whole = subprocess.run([sys.executable, "-m", "harvester", "status", str(out), "--json"],
                           capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert whole.returncode == 0, whole.stderr
    assert json.loads(whole.stdout)["totals"]["complete"] > 0    # all of it: it parses
    missing = subprocess.run([sys.executable, "-m", "harvester", "status", str(tmp_path / "nothing")],
                             capture_output=True, text=True, env=ENV, timeout=120, stdin=subprocess.DEVNULL)
    assert missing.returncode == 2 and missing.stderr.startswith("harvester: error:")
    proc = subprocess.Popen([sys.executable, "-m", "harvester", "status", str(out), "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()   # the reader is gone before the first byte
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 0 and err == "", err


def test_the_command_exits_with_an_idle_thread_pool_worker_left(tmp_path: Path) -> None:
    """``exit_now`` stops a ``ThreadPoolExecutor``'s idle worker (no daemon) as the interpreter
    does, before it joins the threads: joining it first waited forever (a ``--cluster local:N``
    run leaves Dask's offload thread so, and hung after its summary)."""
    code = ("import concurrent.futures as cf, sys; from harvester.cli import exit_now; "
            "pool = cf.ThreadPoolExecutor(1); pool.submit(print, 'ran').result(); "
            "print('done', flush=False); exit_now(3)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60,
                         stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert (run.returncode, run.stdout, run.stderr) == (3, "ran\ndone\n", "")


@pytest.mark.parametrize("count", [0, 1, 2, 3, 4, 7])
def test_plan_json_written_in_pieces_is_the_text_of_one_dumps(count):
    """``plan --json`` writes its list a batch of series at a time; the text is exactly what one
    ``json.dumps`` of the whole plan gives, for any count around the batch size."""
    from harvester.cli import json_with_list

    head = {"series": count, "bytes": None, "note": "é \"q\""}
    items = [{"SeriesInstanceUID": f"1.2.{n}", "SeriesDescription": "é"} for n in range(count)]
    pieces = list(json_with_list(head, "list", items, dict, batch=3))
    assert "".join(pieces) == json.dumps({**head, "list": items})
    assert len(pieces) == 2 + -(-count // 3)


def test_an_empty_output_directory_and_a_port_out_of_range_are_usage_errors(tmp_path: Path) -> None:
    """``-o "$OUT"`` with OUT unset harvested into the current folder; ``serve --port 99999``
    ended in a traceback (OverflowError from bind)."""
    query = tmp_path / "q.yaml"
    query.write_text("select:\n  - collection: X\n")
    for args in (["run", str(query), "-o", "", "--api-url", "http://127.0.0.1:9/v4"], ["status", ""],
                 ["verify", " "], ["serve", "--synthetic", "collections=1", "--port", "99999"],
                 ["serve", "--synthetic", "collections=1", "--port", "-1"]):
        proc = cli(*args, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr[-1500:])
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("harvester: error: "), (args, proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.yaml"]   # nothing written in the current folder


def test_an_output_option_never_writes_over_the_harvests_own_files(server: Any, small_archive: Any,
                                                                   tmp_path: Path) -> None:
    """report -o DIR/.harvester/state.db, export --csv DIR/harvest.json, --tcia on a harvested
    .dcm, --log-file inside a series folder: each wrote over the harvest and exited 0."""
    out = tmp_path / "out"
    query = write_query(tmp_path, select_all(small_archive), "all.yaml")
    assert cli("run", str(query), "-o", str(out), "--api-url", server.base_url, *FAST_FLAGS).returncode == 0
    dcm = sorted(out.rglob("*.dcm"))[0]
    before = {p: p.read_bytes() for p in [out / ".harvester" / "state.db", out / "harvest.json", dcm]}
    for args in (["report", str(out), "-o", str(out / ".harvester" / "state.db")],
                 ["export", str(out), "--csv", str(out / "harvest.json")],
                 ["export", str(out), "--tcia", str(dcm)],
                 ["export", str(out), "--jsonl", str(out / "metadata.csv")],
                 ["verify", str(out), "--log-file", str(dcm)],
                 ["run", str(query), "-o", str(out), "--api-url", server.base_url, *FAST_FLAGS,
                  "--log-file", str(dcm.parent / "run.log")]):
        assert "among the harvest's own files" in one_line_error(cli(*args), 2), args
    assert {p: p.read_bytes() for p in before} == before
    assert not (dcm.parent / "run.log").exists()
    for args in (["export", str(out), "--csv", str(out / "series.csv")], ["report", str(out), "-o", str(out / "report.html")],
                 ["verify", str(out), "--log-file", str(out / "verify.log")]):
        assert cli(*args).returncode == 0, args   # a new file directly in DIR is fine
    assert cli("verify", str(out)).returncode == 0
