"""The archive model and backend (a): re-publishing a harvested directory, safely."""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harvester.dates import parse_archive_date
from harvester.errors import UsageError
from harvester.server.archive import (
    Archive,
    InstanceRecord,
    SeriesRecord,
    StateArchive,
    load_harvest_dir,
    resolve_inside,
    wire_json,
    wire_row,
)
from harvester.server.testing import serve_in_thread
from harvester.store.db import StateDB

pytestmark = pytest.mark.anyio


def _files(dir_: Path, rel: str, sources: list[Path]) -> list[dict[str, Any]]:
    out = []
    for n, src in enumerate(sources, start=1):
        target = dir_ / rel / f"1-{n:02d}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        data = src.read_bytes()
        target.write_bytes(data)
        out.append({"path": f"{rel}/1-{n:02d}.dcm", "size": len(data), "md5": hashlib.md5(data).hexdigest(),
                    "SOPInstanceUID": f"sop-{rel}-{n}"})
    return out


def _entry(uid: str, rel: str, files: list[dict[str, Any]], status: str = "complete", **extra: Any) -> dict[str, Any]:
    entry = {"SeriesInstanceUID": uid, "Collection": "COLL", "PatientID": "PAT-1", "StudyInstanceUID": "1.2.3",
             "Modality": "CT", "status": status, "path": rel, "bytes": sum(f["size"] for f in files),
             "attempts": 1, "error": None, "files": files, "metadata": None, "patient": None, "study": None}
    entry.update(extra)
    return entry


@pytest.fixture(params=["harvest.json", "state.db"])
def harvested(request: pytest.FixtureRequest, tmp_path: Path,
              small_archive: Archive) -> tuple[Path, dict[str, SeriesRecord]]:
    """A hand-written harvest directory: two good series, a failed one, and four escape attempts;
    recorded in harvest.json only (a harvest made before the database: the in-memory archive),
    or in the state database too (``StateArchive``, which reads through it)."""
    root = tmp_path / "harvest"
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.dcm"
    secret.write_bytes(b"secret bytes that must never be served")
    syn = [r for r in small_archive.records() if r.row["Collection"].startswith("SYN-")]
    good, plain = syn[0], syn[1]
    series = [
        _entry(good.uid, "COLL/PAT-1/good", _files(root, "COLL/PAT-1/good", [i.path for i in good.instances]),
               metadata={**good.row, "Collection": "COLL", "PatientID": "PAT-1", "Unexpected": "dropped",
                         "AnnotationsFlag": None},
               patient={"PatientId": "PAT-1", "PatientName": "PAT^ONE", "Collection": "COLL"},
               study={"StudyInstanceUID": good.row["StudyInstanceUID"], "StudyDescription": "CHEST/ABD",
                      "PatientID": "PAT-1", "Collection": "COLL"}),
        _entry("9.9.1", "COLL/PAT-1/plain", _files(root, "COLL/PAT-1/plain", [i.path for i in plain.instances])),
        _entry("9.9.2", "COLL/PAT-1/failed", _files(root, "COLL/PAT-1/failed", [plain.instances[0].path]),
               status="failed", error="MD5 mismatch"),
        _entry("9.9.3", "COLL/dotdot", [{"path": "COLL/dotdot/../../../outside/secret.dcm", "size": 38,
                                         "md5": "0" * 32, "SOPInstanceUID": "x"}]),
        _entry("9.9.4", "COLL/abs", [{"path": str(secret), "size": 38, "md5": "0" * 32, "SOPInstanceUID": "y"}]),
        _entry("9.9.5", "../outside", [{"path": "COLL/PAT-1/plain/1-01.dcm", "size": plain.instances[0].size,
                                        "md5": plain.instances[0].md5, "SOPInstanceUID": "z"}]),
    ]
    link_dir = root / "COLL" / "link"
    link_dir.mkdir(parents=True)
    os.symlink(secret, link_dir / "1-01.dcm")
    series.append(_entry("9.9.6", "COLL/link", [{"path": "COLL/link/1-01.dcm", "size": 38, "md5": "0" * 32,
                                                  "SOPInstanceUID": "w"}]))
    doc = {"schema": "harvester/1", "api_url": "http://127.0.0.1:1/nbia-api/services/v4", "query": {},
           "started": "2024-01-01T00:00:00Z", "finished": "2024-01-01T00:01:00Z", "totals": {}, "series": series}
    (root / "harvest.json").write_text(json.dumps(doc), encoding="utf-8")
    if request.param == "state.db":
        _record_in_db(root, series)
    return root, {"good": good, "plain": plain, "backend": request.param}


def _record_in_db(root: Path, series: list[dict[str, Any]]) -> None:
    """The records in ``root/.harvester/state.db``, as a harvest made by this version holds them."""
    (root / ".harvester").mkdir(exist_ok=True)
    db = StateDB(root / ".harvester" / "state.db")
    db.open()
    try:
        for n, entry in enumerate(series, 1):
            db.put(entry["SeriesInstanceUID"], entry, f"test #{n}")
        db.set_meta("imported", True)
    finally:
        db.close()


def _load(root: Path, backend: str) -> Archive:
    archive = load_harvest_dir(root)
    assert isinstance(archive, StateArchive) == (backend == "state.db")
    return archive


def test_only_complete_series_inside_the_directory_are_served(harvested: tuple[Path, dict[str, SeriesRecord]],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    root, src = harvested
    with caplog.at_level(logging.WARNING):
        archive = _load(root, src["backend"])
    assert list(archive.series) == [src["good"].uid, "9.9.1"]
    for uid in ("9.9.3", "9.9.4", "9.9.5", "9.9.6"):
        assert uid in caplog.text
    for rec in archive.records():
        for inst in rec.instances:
            assert inst.path.is_absolute() and inst.path.is_relative_to(root.resolve())
            assert b"secret" not in inst.path.read_bytes()


def test_rows_come_from_metadata_or_are_derived(harvested: tuple[Path, dict[str, SeriesRecord]]) -> None:
    root, src = harvested
    archive = _load(root, src["backend"])
    good = archive.series[src["good"].uid]
    assert "Unexpected" not in good.row and "AnnotationsFlag" not in good.row
    assert good.row["SeriesDescription"] == src["good"].row["SeriesDescription"]
    assert good.row["ImageCount"] == 4 and good.row["FileSize"] == src["good"].total_bytes
    assert good.patient["PatientName"] == "PAT^ONE"
    derived = archive.series["9.9.1"]
    assert derived.row == {"SeriesInstanceUID": "9.9.1", "StudyInstanceUID": "1.2.3", "Modality": "CT",
                           "Collection": "COLL", "PatientID": "PAT-1", "ImageCount": 4,
                           "FileSize": src["plain"].total_bytes}
    assert derived.patient == {"PatientId": "PAT-1", "Collection": "COLL"}
    assert derived.study["StudyInstanceUID"] == "1.2.3"


async def test_round_trip_over_http(harvested: tuple[Path, dict[str, SeriesRecord]]) -> None:
    root, src = harvested
    archive = _load(root, src["backend"])
    with serve_in_thread(archive) as handle:
        async with aiohttp.ClientSession() as session:
            async with session.get(handle.url("getSeries"), params={"Collection": "COLL"}) as resp:
                rows = await resp.json()
            assert [r["SeriesInstanceUID"] for r in rows] == [src["good"].uid, "9.9.1"]
            async with session.get(handle.url("getPatientStudy"), params={"PatientID": "PAT-1"}) as resp:
                studies = await resp.json()
            assert {s["StudyInstanceUID"] for s in studies} == {src["good"].row["StudyInstanceUID"], "1.2.3"}
            for uid, original in ((src["good"].uid, src["good"]), ("9.9.1", src["plain"])):
                async with session.get(handle.url("getImageWithMD5Hash"), params={"SeriesInstanceUID": uid}) as resp:
                    assert resp.status == 200
                    zf = zipfile.ZipFile(io.BytesIO(await resp.read()))
                dicoms = [n for n in zf.namelist() if n.endswith(".dcm")]
                assert [zf.read(n) for n in dicoms] == [i.path.read_bytes() for i in original.instances]
                md5 = dict(line.split(",") for line in zf.read("md5hashes.csv").decode().split()[1:])
                assert [md5[n] for n in dicoms] == [i.md5 for i in original.instances]
            for uid in ("9.9.2", "9.9.3", "9.9.4", "9.9.5", "9.9.6"):
                async with session.get(handle.url("getImage"), params={"SeriesInstanceUID": uid}) as resp:
                    assert resp.status == 400
                    assert b"secret" not in await resp.read()


async def test_a_file_changed_after_loading_breaks_the_download_not_the_zip(
        harvested: tuple[Path, dict[str, SeriesRecord]]) -> None:
    root, src = harvested
    archive = _load(root, src["backend"])
    victim = archive.series["9.9.1"].instances[2].path
    with victim.open("ab") as fh:
        fh.write(b"grown on disk")
    with serve_in_thread(archive) as handle:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with aiohttp.ClientSession() as session:
                async with session.get(handle.url("getImage"), params={"SeriesInstanceUID": "9.9.1"}) as resp:
                    await resp.read()


def test_unusable_directories_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="harvest.json"):
        load_harvest_dir(tmp_path)
    (tmp_path / "harvest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_harvest_dir(tmp_path)
    (tmp_path / "harvest.json").write_text(json.dumps({"schema": "other/9", "series": []}), encoding="utf-8")
    with pytest.raises(UsageError, match="harvester/1"):
        load_harvest_dir(tmp_path)


def test_resolve_inside(tmp_path: Path) -> None:
    root = tmp_path.resolve()
    (root / "a").mkdir()
    assert resolve_inside(root, "a/b.dcm") == root / "a" / "b.dcm"
    for bad in ("../x", "a/../../x", "/etc/passwd", "C:\\Windows", "C:x", "\\\\server\\share", "a/..\\..\\x", "", "a\x00b"):
        assert resolve_inside(root, bad) is None, bad


@given(st.lists(st.sampled_from(["..", ".", "a", "b", "/", "\\", "c:", "~", " ", "..."]), max_size=8))
def test_resolve_inside_never_escapes(tmp_path_factory: pytest.TempPathFactory, parts: list[str]) -> None:
    root = tmp_path_factory.getbasetemp().resolve()
    resolved = resolve_inside(root, "".join(parts))
    assert resolved is None or resolved.is_relative_to(root)


def test_indexes_agree_with_brute_force_on_20000_series() -> None:
    records = []
    for i in range(20_000):
        row = {"SeriesInstanceUID": f"1.{i}", "StudyInstanceUID": f"2.{i // 3}", "Collection": f"C{i % 7}",
               "PatientID": f"P{i // 10}", "Modality": ("CT", "MR", "PT")[i % 3], "BodyPartExamined": ("CHEST", "HEAD")[i % 2],
               "Manufacturer": ("GE", "Siemens")[i % 5 == 0], "DateReleased": f"20{10 + i % 14}-01-01 00:00:00.0"}
        inst = InstanceRecord(f"3.{i}", Path(f"/nonexistent/{i}.dcm"), 10, "0" * 32, 0, 1)
        records.append(SeriesRecord(row=row, patient={"PatientId": row["PatientID"]}, study={}, instances=[inst],
                                    license_text=""))
    archive = Archive(records)
    wanted = {"Collection": "c3", "Modality": "mr", "BodyPartExamined": "HEAD"}
    brute = [r.uid for r in records if r.row["Collection"] == "C3" and r.row["Modality"] == "MR"
             and r.row["BodyPartExamined"] == "HEAD"]
    assert [r.uid for r in archive.select(wanted)] == brute and brute
    assert [r.uid for r in archive.select({"PatientID": "P42"})] == [f"1.{i}" for i in range(420, 430)]
    assert archive.select({"PatientID": "p42"}) == archive.select({"PatientID": "P42"})  # UPPER(), as NBIA
    assert archive.select({"SeriesInstanceUID": "1.42"}) == [records[42]]
    after = archive.released_after(dt.date(2022, 6, 1))
    assert [r.uid for r in after] == [r.uid for r in records if int(r.row["DateReleased"][:4]) > 2022]
    assert archive.find_instance("3.19999") == (records[-1], records[-1].instances[0])
    with pytest.raises(ValueError, match="duplicate"):
        Archive(records[:2] + records[:1])


def test_release_dates_in_every_wire_format_are_indexed() -> None:
    """A harvested directory holds DateReleased as its server sent it: v4 MM-DD-YYYY, v2 stamps, ISO."""
    dates = ["05-27-2015", "2016-03-01 00:00:00.0", "2017-01-02", "not a date"]
    records = [SeriesRecord(row={"SeriesInstanceUID": f"1.{i}", "DateReleased": d}, patient={}, study={},
                            instances=[], license_text="") for i, d in enumerate(dates)]
    archive = Archive(records)
    assert [r.uid for r in archive.released_after(dt.date(2015, 5, 26))] == ["1.0", "1.1", "1.2"]
    assert [r.uid for r in archive.released_after(dt.date(2015, 5, 27))] == ["1.1", "1.2"]  # strictly after


def test_wire_row_dates_per_version_and_numbers() -> None:
    row = {"SeriesDate": "2003-12-12", "StudyDate": "20031212", "DateReleased": "2015-05-27 13:37:05.0",
           "MaxSubmissionTimestamp": "05-27-2015", "SeriesNumber": "3000566.000000", "FileSize": 1234,
           "ImageCount": "93", "SeriesDescription": "AX T1/POST", "Site": None, "Modality": "",
           "SeriesCount": "not a number"}
    v4 = wire_row(row)
    assert v4 == {"SeriesDate": "12-12-2003", "StudyDate": "12-12-2003", "DateReleased": "05-27-2015",
                  "MaxSubmissionTimestamp": "05-27-2015", "SeriesNumber": 3000566, "FileSize": 1234,
                  "ImageCount": 93, "SeriesDescription": "AX T1/POST", "SeriesCount": "not a number"}
    v2 = wire_row(row, style="v2")
    assert (v2["SeriesDate"], v2["StudyDate"], v2["MaxSubmissionTimestamp"]) == ("2003-12-12 00:00:00.0",) * 2 + (
        "2015-05-27 00:00:00.0",)
    assert v2["DateReleased"] == "2015-05-27 13:37:05.0"  # a v2 stamp keeps its time of day
    strings = wire_row(row, numbers_as_strings=True)
    assert (strings["SeriesNumber"], strings["FileSize"], strings["ImageCount"]) == ("3000566", "1234.0", "93")
    assert wire_row({"SeriesNumber": "4.5", "FileSize": "1.2E7"}) == {"SeriesNumber": 4.5, "FileSize": 12_000_000}
    assert wire_row({"ImageCount": "NaN", "FileSize": True}) == {"ImageCount": "NaN", "FileSize": True}
    assert wire_row({"FileSize": "1e999999999"}) == {"FileSize": "1e999999999"}  # hostile: passed on, not expanded
    assert wire_row({"SeriesDate": ["2003-12-12"], "FileSize": {"a": 1}}) == {"SeriesDate": ["2003-12-12"],
                                                                            "FileSize": {"a": 1}}
    assert wire_row({"FileSize": 2**70}, numbers_as_strings=True) == {"FileSize": f"{2**70}.0"}


def test_wire_json_escapes_slashes_like_java() -> None:
    text = wire_json([{"LicenseURI": "https://creativecommons.org/licenses/by/4.0/", "N": 1}])
    assert text == '[{"LicenseURI":"https:\\/\\/creativecommons.org\\/licenses\\/by\\/4.0\\/","N":1}]'
    assert json.loads(text) == [{"LicenseURI": "https://creativecommons.org/licenses/by/4.0/", "N": 1}]


@given(st.text())
def test_wire_json_round_trips_any_text(value: str) -> None:
    assert json.loads(wire_json({"v": value})) == {"v": value}


@given(st.dates(min_value=dt.date(1900, 1, 1)), st.sampled_from(["iso", "v2", "v4", "dicom"]),
       st.sampled_from(["v2", "v4"]))
def test_wire_dates_name_the_same_day_in_every_form(day: dt.date, given_form: str, style: str) -> None:
    given_text = {"iso": day.isoformat(), "v2": f"{day.isoformat()} 00:00:00.0", "v4": day.strftime("%m-%d-%Y"),
                  "dicom": day.strftime("%Y%m%d")}[given_form]
    sent = wire_row({"StudyDate": given_text}, style=style)["StudyDate"]
    assert parse_archive_date(sent) == day
    assert sent == (day.strftime("%m-%d-%Y") if style == "v4" else f"{day.isoformat()} 00:00:00.0")
