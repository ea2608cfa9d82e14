"""The command line as a user meets it: subprocesses, exit codes, one-line errors, kill -9."""
from __future__ import annotations

import dataclasses
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

from harvest_helpers import assert_identical, commit_records, kill_after_progress, manifest, normal_collections, normal_series, select_all
from harvester.server.archive import Archive
from harvester.server.testing import serve_in_thread

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
    # the first planning request has reached the server: DIR is open (the state is opened before
    # planning starts), and with 400 ms a request, planning goes on for seconds
    while not server.stats.requests and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
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


def test_unreadable_release_dates_are_one_warning_line(small_archive, tmp_path):
    name = normal_collections(small_archive)[0]
    recs = [r for r in small_archive.records() if r.row["Collection"] == name]
    undated = {r.uid for r in recs[:2]}
    archive = Archive([dataclasses.replace(r, row={**r.row, "DateReleased": "n/a"}) if r.uid in undated else r
                       for r in small_archive.records()])
    q = tmp_path / "q.yaml"
    q.write_text(yaml.safe_dump({"select": [{"collection": name, "released_after": "2100-01-01"}]}))
    with serve_in_thread(archive) as srv:
        planned = cli("plan", str(q), "--api-url", srv.base_url, "--json")
        ran = cli("run", str(q), "-o", str(tmp_path / "out"), "--api-url", srv.base_url, "--quiet", *FAST_FLAGS)
    assert planned.returncode == 0 and json.loads(planned.stdout)["series"] == 2, planned.stderr
    assert ran.returncode == 0, ran.stderr
    for proc in (planned, ran):
        warnings = [line for line in proc.stderr.splitlines() if line.startswith("harvester: warning:")]
        assert warnings == ["harvester: warning: released_after: 2 series have no readable DateReleased; they are "
                            "kept (check the archive's dates, or exclude them by UID)"], proc.stderr


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


def test_query_with_source_dicomweb_is_refused_in_one_line_before_any_request(server):
    """``query`` speaks NBIA's API; with --source dicomweb it must not send NBIA's endpoints to the
    DICOMweb URL (it did: getSeries went to the server as if it were NBIA)."""
    before = sum(server.stats.requests.values())
    line = assert_one_line_error(cli("query", "getSeries", "Collection=X", "--source", "dicomweb",
                                     "--api-url", server.base_url))
    assert "NBIA" in line and "--source dicomweb --list" in line
    assert sum(server.stats.requests.values()) == before


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


def write_cart(path: Path, uids: list[str]) -> Path:
    """A cart as the portal writes it (its six-line header), CRLF and all."""
    path.write_text("downloadServerUrl=https://nbia.cancerimagingarchive.net/nbia-download/servlet/DownloadServlet\r\n"
                    "includeAnnotation=true\r\nnoOfrRetry=4\r\ndatabasketId=manifest-1.tcia\r\n"
                    "manifestVersion=3.0\r\nListOfSeriesToDownload=\r\n" + "\r\n".join(uids) + "\r\n")
    return path


def test_cart_with_a_withdrawn_series_harvests_the_rest_and_exits_1(server, small_archive, tmp_path):
    """3 existing UIDs and 1 withdrawn: plan and run name it, harvest.json records it unavailable
    with the archive's answer, the 3 are harvested, exit 1; status, verify, report and export read
    the directory; a rerun looks the withdrawn one up again and downloads nothing more."""
    uids = normal_series(small_archive)[:3]
    ghost = "1.3.6.1.4.1.14519.5.2.1.999.1"
    cart = write_cart(tmp_path / "cart.tcia", [uids[0], ghost, *uids[1:]])
    api = ("--api-url", server.base_url)
    planned = cli("plan", str(cart), *api)
    assert planned.returncode == 1, planned.stderr
    assert "Traceback" not in planned.stderr
    assert "1 series unavailable" in planned.stderr and f"unavailable: {ghost}: " in planned.stderr
    assert "3 series selected" in planned.stdout
    as_json = cli("plan", str(cart), *api, "--json")
    assert as_json.returncode == 1
    data = json.loads(as_json.stdout)
    assert data["series"] == 3 and [u["SeriesInstanceUID"] for u in data["unavailable"]] == [ghost]

    out = tmp_path / "out"
    run = cli("run", str(cart), "-o", str(out), *api, *FAST_FLAGS)
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    assert "1 series unavailable" in run.stderr  # said once planned, before the downloads
    assert "0 failed, 1 unavailable" in run.stdout and f"  unavailable: {ghost}: " in run.stdout
    assert_identical(out, small_archive, uids)
    doc = manifest(out)
    recs = {r["SeriesInstanceUID"]: r for r in doc["series"]}
    assert {u for u, r in recs.items() if r["status"] == "complete"} == set(uids)
    assert recs[ghost]["status"] == "unavailable" and "no row" in recs[ghost]["error"]
    assert recs[ghost]["origin"] == str(cart) and recs[ghost]["files"] == []
    assert doc["totals"]["complete"] == 3 and doc["totals"]["unavailable"] == 1 and doc["totals"]["failed"] == 0
    assert server.stats.downloads == {u: 1 for u in uids}

    status = cli("status", str(out))
    assert status.returncode == 0 and "Traceback" not in status.stderr
    assert f"unavailable: {ghost}: " in status.stdout
    status_json = cli("status", str(out), "--json")
    assert status_json.returncode == 0 and json.loads(status_json.stdout)["totals"]["unavailable"] == 1
    verify = cli("verify", str(out))
    assert verify.returncode == 1 and "3 intact, 0 failed, 1 unavailable, 0 missing" in verify.stdout
    report = cli("report", str(out))
    assert report.returncode == 0, report.stderr
    assert ghost in (out / "report.html").read_text("utf-8")
    exported = cli("export", str(out), "--tcia", str(tmp_path / "back.tcia"), "--csv", str(tmp_path / "all.csv"))
    assert exported.returncode == 0, exported.stderr
    assert ghost not in (tmp_path / "back.tcia").read_text() and ghost in (tmp_path / "all.csv").read_text()

    lookups = server.stats.requests.get("getSeries", 0)
    again = cli("run", str(cart), "-o", str(out), *api, *FAST_FLAGS)
    assert again.returncode == 1 and "(0 now, 3 before)" in again.stdout and "1 unavailable" in again.stdout
    assert server.stats.requests.get("getSeries", 0) > lookups  # looked up again, not taken from harvest.json
    assert server.stats.downloads == {u: 1 for u in uids}
    assert manifest(out)["totals"] == doc["totals"]


REAL_CART = Path(__file__).parent / "data" / "real-nbia" / "manifests" / "TCIA_Notebooks__CPTAC-HNSCC-demo.tcia"


def test_a_real_cart_of_series_the_archive_lacks_is_recorded_not_refused(server, tmp_path):
    """A real portal cart against an archive that has none of its series: exit 1, every UID listed
    and recorded unavailable, a warning for the selector, harvest.json kept (it says what was asked)."""
    from harvester.query import load_query

    uids = load_query(REAL_CART).selectors[0].series
    out = tmp_path / "out"
    proc = cli("run", str(REAL_CART), "-o", str(out), "--api-url", server.base_url, *FAST_FLAGS)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert f"warning: selector 1 (series: {len(uids)} UIDs) matches no series" in proc.stderr
    assert f"0 failed, {len(uids)} unavailable" in proc.stdout
    assert [line.split(": ")[1] for line in proc.stdout.splitlines() if line.startswith("  unavailable: ")] == list(uids)
    doc = manifest(out)
    assert doc["totals"]["unavailable"] == len(uids) == len(doc["series"]) and doc["totals"]["complete"] == 0
    assert server.stats.downloads == {}


def test_strict_refuses_a_partial_cart_before_downloading(server, small_archive, tmp_path):
    """--strict keeps the refusal: exit 2, one line naming the UID, no getImage, no directory."""
    uids = normal_series(small_archive)[:3]
    ghost = "1.3.6.1.4.1.14519.5.2.1.999.2"
    cart = write_cart(tmp_path / "cart.tcia", [*uids, ghost])
    api = ("--api-url", server.base_url)
    line = assert_one_line_error(cli("plan", str(cart), *api, "--strict"))
    assert ghost in line and "--strict" in line
    out = tmp_path / "out"
    for command in ("run", "sync"):
        line = assert_one_line_error(cli(command, str(cart), "-o", str(out), *api, "--strict", *FAST_FLAGS))
        assert ghost in line
    assert server.stats.requests.get("getImage", 0) == 0 and server.stats.downloads == {}
    assert not out.exists()
    # the same list as a CSV, and as a `series:` list in a manifest
    listed = tmp_path / "list.csv"
    listed.write_text("SeriesInstanceUID\n" + "\n".join([*uids, ghost]) + "\n")
    manifest_file = tmp_path / "q.yaml"
    manifest_file.write_text(yaml.safe_dump({"select": [{"series": [*uids, ghost]}]}))
    for query in (listed, manifest_file):
        assert ghost in assert_one_line_error(cli("run", str(query), "-o", str(out), *api, "--strict", *FAST_FLAGS))
        assert cli("plan", str(query), *api).returncode == 1
    assert server.stats.downloads == {} and not out.exists()


def test_a_series_unavailable_once_is_harvested_when_it_appears(small_archive, tmp_path):
    """sync of a cart whose series the archive lacks: exit 1, recorded unavailable; once the archive
    serves it, the next run looks it up again, harvests it alone and exits 0."""
    from harvester.server.archive import Archive
    from harvester.server.testing import serve_in_thread

    uids = normal_series(small_archive)[:3]
    late = uids[1]
    cart = write_cart(tmp_path / "cart.tcia", uids)
    out = tmp_path / "out"
    with serve_in_thread(Archive(r for r in small_archive.records() if r.uid != late)) as before:
        dry = cli("sync", str(cart), "-o", str(out), "--api-url", before.base_url, "--dry-run", *FAST_FLAGS)
        assert dry.returncode == 1 and "dry run: 2 new" in dry.stdout and f"  unavailable: {late}: " in dry.stdout
        assert not out.exists()
        first = cli("sync", str(cart), "-o", str(out), "--api-url", before.base_url, *FAST_FLAGS)
        assert before.stats.downloads == {u: 1 for u in uids if u != late}
    assert first.returncode == 1, (first.stdout, first.stderr)
    assert "1 unavailable" in first.stdout and f"  unavailable: {late}: " in first.stdout
    assert {r["SeriesInstanceUID"]: r["status"] for r in manifest(out)["series"]}[late] == "unavailable"
    with serve_in_thread(small_archive) as after:
        second = cli("run", str(cart), "-o", str(out), "--api-url", after.base_url, *FAST_FLAGS)
        assert after.stats.downloads == {late: 1}
    assert second.returncode == 0, (second.stdout, second.stderr)
    assert "0 failed" in second.stdout and "unavailable:" not in second.stdout + second.stderr
    assert second.stdout.splitlines()[0].endswith(", 0 failed, 0 unavailable")  # counted, and none left
    doc = manifest(out)
    assert doc["totals"]["complete"] == 3 and doc["totals"]["unavailable"] == 0 and len(doc["series"]) == 3
    assert_identical(out, small_archive, uids)


def test_case_insensitive_selector_and_the_warning_for_one_matching_nothing(server, small_archive, tmp_path):
    """`modality: ct` plans what `modality: CT` plans; a selector matching nothing is named on stderr
    (plan and run) and is not an error."""
    name = normal_collections(small_archive)[0]
    modality = next(r.row["Modality"] for r in small_archive.records() if r.row["Collection"] == name)
    api = ("--api-url", server.base_url)
    totals = {}
    for value in (modality, modality.lower()):
        q = tmp_path / f"q-{value}.yaml"
        q.write_text(yaml.safe_dump({"select": [{"collection": name, "modality": value}]}))
        proc = cli("plan", str(q), *api, "--json")
        assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
        totals[value] = json.loads(proc.stdout)
    assert totals[modality] == totals[modality.lower()] and totals[modality]["series"] > 0
    q = tmp_path / "q.yaml"
    q.write_text(yaml.safe_dump({"select": [{"collection": name, "modality": modality},
                                            {"collection": name, "modality": "NOSUCH"}]}))
    warning = f"harvester: warning: selector 2 (collection: {name}, modality: NOSUCH) matches no series"
    proc = cli("plan", str(q), *api)
    assert proc.returncode == 0 and warning in proc.stderr.splitlines(), proc.stderr
    proc = cli("run", str(q), "-o", str(tmp_path / "out"), *api, *FAST_FLAGS, "--quiet")
    assert proc.returncode == 0 and warning in proc.stderr.splitlines(), proc.stderr


def test_patients_alone_through_the_cli(server, small_archive, tmp_path):
    recs = [small_archive.get(u) for u in normal_series(small_archive)]
    patient = recs[0].row["PatientID"]
    q = tmp_path / "q.yaml"
    q.write_text(f"select:\n  - patients: [{patient}]\n")
    proc = cli("run", str(q), "-o", str(tmp_path / "out"), "--api-url", server.base_url, *FAST_FLAGS)
    assert proc.returncode == 0, proc.stderr
    assert_identical(tmp_path / "out", small_archive, [r.uid for r in recs if r.row["PatientID"] == patient])


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
    return {rec["SeriesInstanceUID"] for rec in commit_records(out)
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
