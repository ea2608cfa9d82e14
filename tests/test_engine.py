"""The engine against our NBIA-compatible server on loopback: real HTTP, real DICOM, real files."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from harvest_helpers import assert_identical, harvest, manifest, normal_series, select_all
from harvester.api import verify_tree

V4_DATE = re.compile(r"\d{2}-\d{2}-\d{4}")


def test_full_harvest_is_byte_identical(server, small_archive, tmp_path):
    out = tmp_path / "out"
    result = harvest(server.base_url, out, select_all(small_archive))
    uids = normal_series(small_archive)
    assert result.ok, result.failed
    assert result.downloaded == len(uids)
    assert_identical(out, small_archive, uids)
    doc = manifest(out)
    assert doc["schema"] == "harvester/1"
    assert doc["totals"]["complete"] == len(uids) and doc["totals"]["failed"] == 0
    assert doc["finished"] and doc["started"]
    # one download per series, and no extra per-series metadata calls: getSeries rows carry the sizes
    assert all(n == 1 for n in server.stats.downloads.values())
    assert server.stats.requests.get("getSeriesSize", 0) == 0
    # metadata.csv for scripts that read the Data Retriever's output
    header = (out / "metadata.csv").read_text().splitlines()[0]
    assert header.startswith("Series UID,Collection,3rd Party Analysis")


def test_rerun_downloads_nothing(server, small_archive, tmp_path):
    out = tmp_path / "out"
    assert harvest(server.base_url, out, select_all(small_archive)).ok
    before = sum(server.stats.downloads.values())
    result = harvest(server.base_url, out, select_all(small_archive))
    assert result.ok and result.downloaded == 0
    assert result.skipped == len(normal_series(small_archive))
    assert sum(server.stats.downloads.values()) == before


def test_deleted_file_is_fetched_again(server, small_archive, tmp_path):
    out = tmp_path / "out"
    assert harvest(server.base_url, out, select_all(small_archive)).ok
    victim = manifest(out)["series"][0]
    (out / victim["files"][0]["path"]).unlink()
    # A plain rerun trusts harvest.json only when the files are there: recovery drops the record.
    result = harvest(server.base_url, out, select_all(small_archive))
    assert result.ok
    assert server.stats.downloads[victim["SeriesInstanceUID"]] == 2
    assert_identical(out, small_archive, normal_series(small_archive))


FAULTS = {
    "error": "error=0.4,seed=11",
    "throttle": "throttle=0.4,retry_after=0,seed=12",
    "reset": "reset=0.4,seed=13",
    "truncate": "truncate=0.5,seed=14",
    "corrupt": "corrupt=0.5,seed=15",
    "stall": "stall=0.4,stall_for=4s,seed=16",
    "all": "error=0.15,throttle=0.1,retry_after=0,reset=0.1,truncate=0.15,corrupt=0.1,stall=0.05,stall_for=4s,"
           "latency=5ms,seed=17",
}


@pytest.mark.parametrize("kind", list(FAULTS))
def test_faults_still_end_complete_and_identical(server, small_archive, tmp_path, kind):
    server.set_faults(FAULTS[kind])
    out = tmp_path / "out"
    result = harvest(server.base_url, out, select_all(small_archive), read_timeout=1.0, series_retries=8, retries=8)
    faults = server.stats.faults
    assert sum(faults.values()) > 0, "the fault was never injected: the test would prove nothing"
    assert result.ok, result.failed
    assert_identical(out, small_archive, normal_series(small_archive))


def test_corrupt_instance_is_repaired_alone(server, small_archive, tmp_path):
    server.set_faults("corrupt=1.0,seed=5")  # every download has one bad instance
    out = tmp_path / "out"
    result = harvest(server.base_url, out, select_all(small_archive))
    assert result.ok, result.failed
    assert server.stats.requests.get("getSingleImage", 0) >= 1
    assert all(n == 1 for n in server.stats.downloads.values()), "repair must not refetch whole series"
    assert_identical(out, small_archive, normal_series(small_archive))


def test_hostile_zips_fail_alone_and_write_nothing_outside(server, small_archive, tmp_path):
    hostile = [r for r in small_archive.records() if getattr(r, "hostile_kind", None)]
    assert hostile, "the archive has no hostile series"
    out = tmp_path / "deep" / "out"
    before = set(tmp_path.rglob("*"))
    query = select_all(small_archive)
    query["select"].append({"collection": hostile[0].row["Collection"]})
    result = harvest(server.base_url, out, query, series_retries=1)
    failed = dict(result.failed)
    for rec in hostile:
        assert rec.uid in failed, f"hostile series ({rec.hostile_kind}) was accepted"
        assert failed[rec.uid], "a failure needs a reason"
    assert_identical(out, small_archive, normal_series(small_archive))
    after = set(tmp_path.rglob("*"))
    outside = [p for p in after - before if not p.resolve().is_relative_to(out.resolve())
               and p != out.parent]
    assert not outside, outside
    assert not Path("/tmp/evil.dcm").exists()
    assert result.failed and not result.ok


def test_verify_catches_a_flipped_byte(server, small_archive, tmp_path):
    out = tmp_path / "out"
    assert harvest(server.base_url, out, select_all(small_archive)).ok
    assert verify_tree(out).ok
    victim = out / manifest(out)["series"][1]["files"][0]["path"]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = verify_tree(out)
    assert not result.ok
    assert len(result.problems) == 1 and "MD5" in result.problems[0]


@pytest.mark.parametrize("layout", ["classic", "flat", "descriptive",
                                    "{Collection}/{PatientID}/{StudyDate}-{StudyDescription}/{Modality}-{SeriesNumber}"])
def test_layouts_put_every_series_in_its_own_folder(server, small_archive, tmp_path, layout):
    out = tmp_path / "out"
    result = harvest(server.base_url, out, select_all(small_archive), layout=layout)
    assert result.ok
    recs = manifest(out)["series"]
    paths = [r["path"] for r in recs]
    assert len(set(paths)) == len(paths)
    for p in paths:
        assert not any(q != p and q.startswith(p + "/") for q in paths)
        assert ".." not in Path(p).parts and not os.path.isabs(p)
    if layout == "classic":
        r = recs[0]
        assert r["path"].endswith(f"/{r['StudyInstanceUID']}/{r['SeriesInstanceUID']}")
    assert_identical(out, small_archive, normal_series(small_archive))


def test_descriptive_layout_matches_data_retriever(server, small_archive, tmp_path):
    out = tmp_path / "out"
    assert harvest(server.base_url, out, select_all(small_archive), layout="descriptive").ok
    rec = manifest(out)["series"][0]
    parts = Path(rec["path"]).parts
    assert parts[0] == rec["Collection"] and len(parts) == 4
    assert parts[2].endswith(rec["StudyInstanceUID"][-5:])
    assert parts[3].endswith(rec["SeriesInstanceUID"][-5:])
    study_date = rec["study"]["StudyDate"] if rec.get("study") else rec["metadata"]["StudyDate"]
    assert V4_DATE.fullmatch(study_date)  # as v4 sends it, and as the Data Retriever names the folder
    assert parts[2].startswith(study_date + "-")


def test_manifest_paths_are_relative_and_complete(server, small_archive, tmp_path):
    out = tmp_path / "out"
    assert harvest(server.base_url, out, select_all(small_archive)).ok
    doc = json.loads((out / "harvest.json").read_text())
    for rec in doc["series"]:
        for key in ("SeriesInstanceUID", "Collection", "PatientID", "StudyInstanceUID", "Modality", "status",
                    "path", "bytes", "attempts", "error", "files"):
            assert key in rec
        assert rec["bytes"] == sum(f["size"] for f in rec["files"])
        for f in rec["files"]:
            assert not os.path.isabs(f["path"]) and f["path"].startswith(rec["path"] + "/")
