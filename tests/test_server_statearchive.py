"""``serve DIR`` through the state database (``StateArchive``): the same answers, byte for byte,
as the in-memory archive of the same harvest, and DIR never changed by serving it."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from harvest_helpers import harvest, select_all
from harvester.server.archive import Archive, StateArchive, load_harvest_dir
from harvester.server.testing import serve_in_thread
from harvester.store.db import StateDB


@pytest.fixture(scope="module")
def harvested(tmp_path_factory: pytest.TempPathFactory, small_archive: Archive) -> tuple[Path, Path]:
    """(DIR with its state database, the same DIR without it: harvest.json only)."""
    root = tmp_path_factory.mktemp("statearchive")
    out = root / "harvest"
    with serve_in_thread(small_archive) as srv:
        assert harvest(srv.base_url, out, select_all(small_archive)).ok
    legacy = root / "legacy"
    shutil.copytree(out, legacy, symlinks=True)
    shutil.rmtree(legacy / ".harvester")
    return out, legacy


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry under ``root``: (mode, size, SHA-256 of a file's bytes)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else ""
            out[str(path.relative_to(root))] = (st.st_mode, st.st_size, digest)
    return out


def _targets(archive: Archive) -> list[str]:
    """Requests covering every endpoint the archive answers, filters in other cases too."""
    recs = [rec for rec in archive.records() if len(rec.instances) > 1]
    first, last = recs[0], recs[-1]
    row = first.row
    sop = first.instances[1].sop_uid
    targets = ["v4/getCollectionValues", "v1/getCollectionValues", "v4/getSeries", "v2/getSeries",
               "v4/getSeries?format=csv", "v4/getPatient", "v4/getPatientStudy",
               "v4/getUpdatedSeries?fromDate=01-01-1990", "v1/getUpdatedSeries?fromDate=01/01/1990",
               "v4/getUpdatedSeries?fromDate=01-01-2100"]
    for rec in (first, last):
        r = rec.row
        targets += [
            "v4/getSeries?" + urlencode({"Collection": r["Collection"].lower()}),
            "v4/getSeries?" + urlencode({"Collection": r["Collection"].upper(), "Modality": r["Modality"].lower()}),
            "v4/getSeries?" + urlencode({"PatientID": r["PatientID"].lower()}),
            "v4/getSeries?" + urlencode({"StudyInstanceUID": r["StudyInstanceUID"]}),
            "v4/getSeries?" + urlencode({"SeriesInstanceUID": rec.uid, "Collection": r["Collection"]}),
            "v4/getSeries?" + urlencode({"SeriesInstanceUID": rec.uid, "Collection": "NOT-IT"}),
            "v4/getSeries?" + urlencode({"StudyInstanceUID": r["StudyInstanceUID"].lower() + "x"}),
            "v4/getPatientStudy?" + urlencode({"PatientID": r["PatientID"]}),
            "v4/getPatientStudy?" + urlencode({"StudyInstanceUID": r["StudyInstanceUID"]}),
            "v4/getPatient?" + urlencode({"Collection": r["Collection"].swapcase()}),
            "v4/getPatientByCollectionAndModality?" + urlencode({"Collection": r["Collection"],
                                                                 "Modality": r["Modality"]}),
            "v4/getModalityValues?" + urlencode({"Collection": r["Collection"]}),
            "v4/getBodyPartValues?" + urlencode({"Collection": r["Collection"].lower()}),
            "v4/getManufacturerValues?" + urlencode({"Modality": r["Modality"]}),
            "v4/NewPatientsInCollection?" + urlencode({"Collection": r["Collection"], "fromDate": "01-01-1990"}),
            "v4/NewStudiesInPatientCollection?" + urlencode({"Collection": r["Collection"],
                                                             "PatientID": r["PatientID"], "fromDate": "01-01-1990"}),
            "v4/getSeriesSize?" + urlencode({"SeriesInstanceUID": rec.uid}),
            "v4/getSOPInstanceUIDs?" + urlencode({"SeriesInstanceUID": rec.uid}),
            "v4/getImage?" + urlencode({"SeriesInstanceUID": rec.uid, "NewFileNames": "Yes", "IncludeMD5": "yes"}),
            "v4/getImageWithMD5Hash?" + urlencode({"SeriesInstanceUID": rec.uid}),
            "v1/getDCMImage?" + urlencode({"SeriesInstanceUID": rec.uid, "MD5Verification": "true"}),
        ]
    targets += [
        "v4/getSingleImage?" + urlencode({"SeriesInstanceUID": row["SeriesInstanceUID"], "SOPInstanceUID": sop}),
        "v4/getSingleImage?" + urlencode({"SeriesInstanceUID": last.uid, "SOPInstanceUID": sop}),  # another's
        "v4/getSingleImage?" + urlencode({"SeriesInstanceUID": "1.2.404", "SOPInstanceUID": sop}),
        "v1/getMD5HashForImage?" + urlencode({"SOPInstanceUid": sop}),
        "v1/getMD5HashForImage?" + urlencode({"SOPInstanceUid": last.instances[-1].sop_uid}),
        "v1/getMD5HashForImage?" + urlencode({"SOPInstanceUid": sop + "9"}),
        "v4/getImage?" + urlencode({"SeriesInstanceUID": "1.2.404"}),
        "v4/getSeriesSize?" + urlencode({"SeriesInstanceUID": "1.2.404"}),
    ]
    return targets


def _fetch(base: str, target: str) -> tuple[int, str, bytes]:
    url = base.rsplit("/v4", 1)[0] + "/" + target
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read()


def _answers(archive: Archive, targets: list[str]) -> Iterator[tuple[str, tuple[int, str, bytes]]]:
    with serve_in_thread(archive) as srv:
        for target in targets:
            yield target, _fetch(srv.base_url, target)


def test_the_database_backend_answers_as_the_in_memory_one_and_leaves_dir_unchanged(harvested) -> None:
    out, legacy = harvested
    before = _snapshot(out)
    served = load_harvest_dir(out)
    # the reference: the in-memory archive of the same records, in the database's order (which
    # the in-memory loader of a state database kept before; harvest.json lists them in its own)
    order = {uid: n for n, (uid, _, _) in enumerate(_rows(out))}
    in_memory = Archive(sorted(load_harvest_dir(legacy).records(), key=lambda rec: order[rec.uid]))
    assert isinstance(served, StateArchive) and not isinstance(in_memory, StateArchive)
    assert served.uids() == list(in_memory.series) and len(served) == len(in_memory) > 2
    targets = _targets(in_memory)
    want = dict(_answers(in_memory, targets))
    got = dict(_answers(served, targets))
    for target in targets:
        assert got[target] == want[target], target
    assert sum(1 for status, _, body in want.values() if status == 200 and body) > len(targets) // 2
    served.close()
    assert _snapshot(out) == before      # not a byte, not a -shm or -wal file, not a timestamp's size


def test_series_whose_record_or_files_fail_are_not_listed_and_later_failures_not_served(
        harvested, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Loading checks every record and file as the in-memory loader does (a file of another
    size, a hostile record: skipped with a warning, not listed); a series whose file changes
    after loading is listed but refused by the download (``get`` checks it again)."""
    out = tmp_path / "copy"
    shutil.copytree(harvested[0], out, symlinks=True)
    db = StateDB(out / ".harvester" / "state.db")
    db.open()
    uids = [uid for uid, _, _ in db.rows()]
    grown, hostile, later = uids[0], uids[1], uids[2]
    hostile_rec = json.loads(db.get(hostile)[0])
    hostile_rec["files"][0]["path"] = "../../outside.dcm"
    db.put(hostile, hostile_rec, "a hand edit")
    later_rec = json.loads(db.get(later)[0])
    db.close()
    grown_rec = next(json.loads(raw) for uid, raw, _ in _rows(out) if uid == grown)
    with (out / grown_rec["files"][0]["path"]).open("ab") as fh:
        fh.write(b"x")
    with caplog.at_level(logging.WARNING):
        archive = load_harvest_dir(out)
    assert isinstance(archive, StateArchive)
    assert grown not in archive.uids() and hostile not in archive.uids() and later in archive.uids()
    assert grown in caplog.text and hostile in caplog.text
    assert [r.uid for r in archive.select({})] == archive.uids()
    (out / later_rec["files"][-1]["path"]).unlink()
    with serve_in_thread(archive) as srv:
        status, _, body = _fetch(srv.base_url, "v4/getImage?" + urlencode({"SeriesInstanceUID": later}))
        assert status == 400 and b"not found" in body
        status, _, body = _fetch(srv.base_url, "v4/getSeries?" + urlencode({"SeriesInstanceUID": later}))
        assert status == 200 and later.encode() in body
    archive.close()


def _rows(out: Path) -> list[tuple[str, str, str]]:
    db = StateDB(out / ".harvester" / "state.db", readonly=True)
    db.open()
    try:
        return list(db.rows())
    finally:
        db.close()
