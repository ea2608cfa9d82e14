"""The HOSTILE collection really is hostile: its rows look normal, its metadata and ZIPs do not."""
from __future__ import annotations

import hashlib
import io
import json
import stat
import urllib.parse
import urllib.request
import zipfile

import pydicom
import pytest

from harvester.server.archive import Archive, SeriesRecord
from harvester.server.hostile import BOMB_BYTES, KINDS
from harvester.server.testing import ServerHandle


def hostile(archive: Archive) -> dict[str, SeriesRecord]:
    found = {r.hostile_kind: r for r in archive.records() if r.hostile_kind}
    assert sorted(found) == sorted(KINDS)
    return found


def download(handle: ServerHandle, rec: SeriesRecord, endpoint: str = "getImageWithMD5Hash") -> zipfile.ZipFile:
    query = urllib.parse.urlencode({"SeriesInstanceUID": rec.uid})
    with urllib.request.urlopen(f"{handle.base_url}/{endpoint}?{query}") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "application/octet-stream"
        body = resp.read()
    assert body.startswith(b"PK\x03\x04")
    return zipfile.ZipFile(io.BytesIO(body))


def get_json(handle: ServerHandle, endpoint: str, **params: str) -> list[dict[str, object]]:
    with urllib.request.urlopen(f"{handle.base_url}/{endpoint}?{urllib.parse.urlencode(params)}") as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def test_rows_look_normal_but_metadata_is_hostile(server: ServerHandle, small_archive: Archive) -> None:
    rows = get_json(server, "getSeries", Collection="HOSTILE")
    assert len(rows) == len(KINDS)
    for row in rows:
        rec = small_archive.series[str(row["SeriesInstanceUID"])]
        assert row["ImageCount"] == 3 == len(rec.instances)
        assert row["FileSize"] == sum(i.size for i in rec.instances)
        assert str(row["SeriesDescription"]).startswith(f"HOSTILE:{rec.hostile_kind} ")
    patient_ids = {str(p["PatientId"]) for p in get_json(server, "getPatient", Collection="HOSTILE")}
    assert "../../etc" in patient_ids and "CON" in patient_ids
    assert any("\x1b" in p and "\t" in p for p in patient_ids)
    texts = [str(v) for row in rows for v in row.values()]
    assert any(len(t) >= 300 for t in texts) and any("\x07" in t for t in texts)
    assert all("\x00" not in t for t in texts)
    studies = get_json(server, "getPatientStudy", Collection="HOSTILE")
    assert any(s["StudyDescription"] == "../../.." for s in studies)


def test_traversal_and_absolute_entries(server: ServerHandle, small_archive: Archive) -> None:
    kinds = hostile(small_archive)
    names = download(server, kinds["traversal"]).namelist()
    assert any(n.startswith("../") for n in names)
    names = download(server, kinds["absolute"], "getImage").namelist()
    assert any(n.startswith("/") for n in names)


def test_symlink_entry(server: ServerHandle, small_archive: Archive) -> None:
    zf = download(server, hostile(small_archive)["symlink"])
    links = [i for i in zf.infolist() if stat.S_ISLNK(i.external_attr >> 16)]
    assert len(links) == 1 and zf.read(links[0]) == b"/etc/passwd"


def test_zip_bomb_entry(server: ServerHandle, small_archive: Archive) -> None:
    zf = download(server, hostile(small_archive)["zipbomb"])
    bomb = max(zf.infolist(), key=lambda i: i.file_size)
    assert bomb.file_size == BOMB_BYTES
    assert bomb.file_size / bomb.compress_size > 500


def test_duplicate_names(server: ServerHandle, small_archive: Archive) -> None:
    names = download(server, hostile(small_archive)["duplicate"]).namelist()
    assert len(names) != len(set(names))


def test_non_dicom_entry_with_honest_md5(server: ServerHandle, small_archive: Archive) -> None:
    zf = download(server, hostile(small_archive)["nondicom"])
    dicoms = [n for n in zf.namelist() if n.endswith(".dcm")]
    listed = dict(line.split(",") for line in zf.read("md5hashes.csv").decode().split()[1:])
    assert all(hashlib.md5(zf.read(n)).hexdigest() == listed[n] for n in dicoms)
    not_dicom = [n for n in dicoms if zf.read(n)[128:132] != b"DICM"]
    assert len(not_dicom) == 1
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(io.BytesIO(zf.read(not_dicom[0])))


def test_dicom_of_another_series(server: ServerHandle, small_archive: Archive) -> None:
    rec = hostile(small_archive)["foreign"]
    zf = download(server, rec)
    series = {pydicom.dcmread(io.BytesIO(zf.read(n)), stop_before_pixels=True).SeriesInstanceUID
              for n in zf.namelist() if n.endswith(".dcm")}
    assert rec.uid in series and len(series) == 2


def test_hostile_downloads_are_counted(server: ServerHandle, small_archive: Archive) -> None:
    rec = hostile(small_archive)["traversal"]
    download(server, rec)
    assert server.stats.downloads == {rec.uid: 1}
