"""``source: idc`` end to end: plan from a small index in the real schema, fetch from moto's S3
(through a fault-injecting proxy), and compare the tree with the bucket's objects."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from harvest_helpers import FAST, commits, kill_after_progress
from harvester.api import aharvest, aplan
from harvester.config import Config
from harvester.query import query_from_dict

from .conftest import Cohort, Moto, S3Proxy, write_index

REPO = Path(__file__).resolve().parents[3]


def idc_config(endpoint: str, out: Path, index: Path, **overrides: Any) -> Config:
    """FAST, but a long read timeout: no stall is injected here, and moto on a loaded machine may
    take seconds to answer (a timeout would be retried, and would change a hostile test's reason)."""
    return Config(source="idc", endpoint_url=endpoint, idc_index=index, api_url=endpoint, out_dir=out,
                  **{**FAST, "read_timeout": 60.0, **overrides})


def assert_bucket_identical(out: Path, cohort: Cohort, uids: list[str]) -> None:
    """Every series in ``uids`` is complete, its files are exactly the bucket's objects (one file
    per object, byte for byte, named by SOPInstanceUID), and no other file is in the tree."""
    doc = json.loads((out / "harvest.json").read_text())
    recs = {r["SeriesInstanceUID"]: r for r in doc["series"]}
    listed = set()
    for uid in uids:
        rec = recs[uid]
        assert rec["status"] == "complete", rec.get("error")
        assert rec["metadata"]["source"] == "idc" and rec["metadata"]["crdc_series_uuid"] == cohort.get(uid).uuid
        want = cohort.get(uid).by_sop()
        got = {f["SOPInstanceUID"]: f for f in rec["files"]}
        assert set(got) == set(want)
        for sop, data in want.items():
            path = out / got[sop]["path"]
            assert path.read_bytes() == data
            assert path.name == f"{sop}.dcm"
            listed.add(path.resolve())
    for path in out.rglob("*"):
        rel = path.relative_to(out)
        if path.is_file() and rel.parts[0] != ".harvester" and str(rel) not in ("harvest.json", "metadata.csv"):
            assert path.resolve() in listed, f"unlisted file {rel}"


def test_plan_maps_selectors_to_index_columns(cohort: Cohort, tmp_path: Path) -> None:
    """Collection by TCIA name or IDC id, modality folded, patients alone, a UID list with one
    unknown UID: the same selector rules as NBIA, and the index's exact counts and bytes."""
    config = idc_config("http://127.0.0.1:9", tmp_path, cohort.index)
    alpha_ct = [s for s in cohort.series if s.collection_id == "idc_alpha" and s.row["Modality"] == "CT"]
    plan = anyio.run(lambda: aplan(query_from_dict({"select": [{"collection": "IDC-Alpha", "modality": "ct"}]}),
                                   config))
    assert sorted(t.series_uid for t in plan.tasks) == sorted(s.uid for s in alpha_ct)
    task = next(t for t in plan.tasks if t.series_uid == alpha_ct[0].uid)
    assert task.collection == "IDC-Alpha"   # the TCIA name from collections_index, as NBIA names it
    assert task.image_count == len(alpha_ct[0].objects)
    assert task.file_size == sum(len(b) for b in alpha_ct[0].objects.values())
    # the library's options, as a notebook passes them (a path as text)
    by_id = anyio.run(lambda: aplan({"select": [{"collection": "idc_beta"}]}, source="idc",
                                    idc_index=str(cohort.index)))
    assert len(by_id.tasks) == 2
    patients = anyio.run(lambda: aplan(query_from_dict({"select": [{"patients": ["a2"]}]}), config))
    assert [t.patient_id for t in patients.tasks] == ["A2"]
    unknown = "1.2.3.4.5"
    listed = anyio.run(lambda: aplan(query_from_dict(
        {"select": [{"series": [cohort.series[3].uid, unknown]}], "exclude": {"modality": "MR"}}), config))
    assert [t.series_uid for t in listed.tasks] == [cohort.series[3].uid]
    assert [u.series_uid for u in listed.unavailable] == [unknown]


def test_unknown_collection_is_a_usage_error_with_close_names(cohort: Cohort, tmp_path: Path) -> None:
    from harvester.errors import UnknownSelectionError

    config = idc_config("http://127.0.0.1:9", tmp_path, cohort.index)
    with pytest.raises(UnknownSelectionError, match="IDC-Alpha"):
        anyio.run(lambda: aplan(query_from_dict({"select": [{"collection": "IDC-Alpah"}]}), config))


def test_harvest_with_faults_is_byte_identical(cohort: Cohort, proxy: S3Proxy, tmp_path: Path) -> None:
    """5xx, SlowDown, resets and short bodies on listings and objects: every series arrives
    whole, the multipart-uploaded one verified without an MD5 (its ETag is not one)."""
    proxy.set_faults("error=0.15,throttle=0.1,reset=0.1,truncate=0.1,seed=5")
    out = tmp_path / "out"
    config = idc_config(proxy.url, out, cohort.index, retries=10)
    query = query_from_dict({"select": [{"collection": "IDC-Alpha"}, {"collection": "idc_beta"}]})
    result = anyio.run(aharvest, query, config)
    assert result.ok, result.failed
    assert proxy.faults_fired > 0
    assert_bucket_identical(out, cohort, [s.uid for s in cohort.series])
    doc = json.loads((out / "harvest.json").read_text())
    multipart = next(r for r in doc["series"] if r["SeriesInstanceUID"] == cohort.series[4].uid)
    assert multipart["files_without_md5"] == len(cohort.series[4].objects)
    single = next(r for r in doc["series"] if r["SeriesInstanceUID"] == cohort.series[0].uid)
    assert "files_without_md5" not in single


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "harvester", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO)


def test_cli_run_source_idc_and_resume(cohort: Cohort, proxy: S3Proxy, tmp_path: Path) -> None:
    """``harvester run q.yaml --source idc --endpoint-url ... --idc-index ...`` with faults on,
    then again: the second run has nothing to fetch."""
    proxy.set_faults("error=0.05,reset=0.05,seed=2")
    query = tmp_path / "q.yaml"
    query.write_text("select:\n  - collection: IDC-Alpha\n  - collection: IDC-Beta\n    modality: CT\n")
    out = tmp_path / "out"
    args = ("run", str(query), "-o", str(out), "--source", "idc", "--endpoint-url", proxy.url,
            "--idc-index", str(cohort.index), "--no-progress", "--retries", "8")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    uids = [s.uid for s in cohort.series if s.collection_id == "idc_alpha" or s.row["Modality"] == "CT"]
    assert_bucket_identical(out, cohort, uids)
    doc = json.loads((out / "harvest.json").read_text())
    assert doc["api_url"] == proxy.url
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert "(0 now, 4 before)" in again.stdout


def test_kill_9_then_resume(cohort: Cohort, proxy: S3Proxy, tmp_path: Path) -> None:
    """kill -9 while one series' objects are held unanswered (after other commits), then the
    same command: the tree is whole and identical, and what was committed is not fetched again."""
    query = tmp_path / "q.yaml"
    query.write_text("select:\n  - collection: IDC-Alpha\n  - collection: IDC-Beta\n")
    out = tmp_path / "out"
    args = ["run", str(query), "-o", str(out), "--source", "idc", "--endpoint-url", proxy.url,
            "--idc-index", str(cohort.index), "--no-progress", "--workers", "2"]
    held = cohort.series[3]   # IDC-Beta sorts after IDC-Alpha: the alpha series commit first
    proxy.hold = held.uuid
    proc = subprocess.Popen([sys.executable, "-m", "harvester", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert kill_after_progress(proc, out, 0.2, wait=300)
    committed = commits(out)
    assert committed and held.uid not in committed
    proxy.hold = None
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({len(cohort.series) - len(committed)} now, {len(committed)} before)" in resumed.stdout
    assert_bucket_identical(out, cohort, [s.uid for s in cohort.series])


def test_analysis_results_are_collections_of_their_own(cohort: Cohort, tmp_path: Path) -> None:
    """IDC files analysis results under the collection they analyse; NBIA (TCIA) publishes them as
    collections of their own: ``collection: IDC-Alpha`` selects only the original series."""
    seg = {**cohort.series[0].row, "SeriesInstanceUID": "1.2.3.77", "analysis_result_id": "alpha_nodules",
           "Modality": "SEG", "crdc_series_uuid": "00000000-0000-4000-8000-000000000077",
           "series_aws_url": None}
    index = write_index(tmp_path / "i" / "idc_index.parquet", [s.row for s in cohort.series] + [seg], cohort.names)
    config = idc_config("http://127.0.0.1:9", tmp_path, index)
    original = anyio.run(lambda: aplan(query_from_dict({"select": [{"collection": "IDC-Alpha"}]}), config))
    assert "1.2.3.77" not in {t.series_uid for t in original.tasks} and len(original.tasks) == 3
    results = anyio.run(lambda: aplan(query_from_dict({"select": [{"collection": "Alpha-Nodules"}]}), config))
    assert [(t.series_uid, t.collection) for t in results.tasks] == [("1.2.3.77", "alpha_nodules")]


def test_cli_query_get_series_from_the_index(cohort: Cohort, tmp_path: Path) -> None:
    """``harvester query getSeries ... --source idc`` answers from the index with the planner's
    selection rules (TCIA name, folded modality); another endpoint or parameter is one clear
    usage line, exit 2, and no request is made (the endpoint is a closed port)."""
    base = ("--source", "idc", "--idc-index", str(cohort.index), "--endpoint-url", "http://127.0.0.1:9")
    found = run_cli("query", "getSeries", "Collection=IDC-Alpha", "Modality=ct", "--format", "json", *base)
    assert found.returncode == 0, found.stderr
    rows = json.loads(found.stdout)
    want = {s.uid for s in cohort.series if s.collection_id == "idc_alpha" and s.row["Modality"] == "CT"}
    assert {r["SeriesInstanceUID"] for r in rows} == want
    assert {r["ImageCount"] for r in rows} == {len(cohort.get(u).objects) for u in want}
    for args in (("getPatient", "Collection=IDC-Alpha"), ("getSeries", "ProtocolName=X"), ("getSeries",)):
        refused = run_cli("query", *args, *base)
        assert refused.returncode == 2, refused.stderr
        assert "Traceback" not in refused.stderr and "getSeries" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) <= 2, refused.stderr


def test_objects_handed_to_the_sink_in_pieces_are_byte_identical(cohort: Cohort, moto: Moto, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole object reaches the sink in ``WRITE_STEP`` pieces (hashed and written while in the
    CPU's cache): a step that divides no object's size still gives each file byte for byte, its
    MD5 held to the ETag (a piece lost or repeated would fail both)."""
    from harvester.source.idc import source as idc_source

    monkeypatch.setattr(idc_source, "WRITE_STEP", 997)
    sizes = {len(b) for s in cohort.series for b in s.objects.values()}
    assert min(sizes) > 997 * 2 and all(size % 997 for size in sizes)
    out = tmp_path / "out"
    query = query_from_dict({"select": [{"collection": "IDC-Alpha"}, {"collection": "idc_beta"}]})
    result = anyio.run(aharvest, query, idc_config(moto.endpoint, out, cohort.index))
    assert result.ok, result.failed
    assert_bucket_identical(out, cohort, [s.uid for s in cohort.series])
