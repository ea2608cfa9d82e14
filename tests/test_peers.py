"""The peer clients users would pick instead work against our server unchanged.

tcia_utils builds URLs from ``setApiUrl`` (monkeypatched to our v4 base); nbiatoolkit takes
its base from an Enum member, which we replace with any object that has ``.value``, and asks
for an OAuth token at ``<base>oauth/token`` before every call.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import types
from pathlib import Path

import pytest

from harvester.dates import parse_archive_date
from harvester.server.archive import Archive, SeriesRecord
from harvester.server.testing import ServerHandle

pytestmark = pytest.mark.peers


def normal(archive: Archive) -> list[SeriesRecord]:
    return [r for r in archive.records() if r.row["Collection"].startswith("SYN-")]


def md5s_under(root: Path) -> set[str]:
    return {hashlib.md5(p.read_bytes()).hexdigest() for p in root.rglob("*.dcm")}


@pytest.fixture
def tcia(server: ServerHandle, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    nbia = pytest.importorskip("tcia_utils.nbia")
    monkeypatch.setattr(nbia, "setApiUrl", lambda endpoint, api_url="": server.base_url + "/")
    return nbia


def test_tcia_utils_queries(tcia, server: ServerHandle, small_archive: Archive) -> None:  # type: ignore[no-untyped-def]
    assert {c["Collection"] for c in tcia.getCollections()} == set(small_archive.collections())
    rec = normal(small_archive)[0]
    rows = tcia.getSeries(collection=rec.row["Collection"], modality=rec.row["Modality"])
    assert rec.uid in [r["SeriesInstanceUID"] for r in rows]
    assert tcia.getSeriesSize(rec.uid) == [{"TotalSizeInBytes": rec.total_bytes, "ObjectCount": 4}]
    assert [s["SOPInstanceUID"] for s in tcia.getSopInstanceUids(rec.uid)] == [i.sop_uid for i in rec.instances]
    assert tcia.getPatient(collection=rec.row["Collection"])
    assert tcia.getStudy(rec.row["Collection"], patientId=rec.row["PatientID"])
    cutoff = dt.date(2022, 1, 1)
    updated = tcia.getUpdatedSeries("2022/01/01")  # tcia_utils sends MM-DD-YYYY to v4
    assert {r["SeriesInstanceUID"] for r in updated} == {
        r.uid for r in small_archive.records() if parse_archive_date(r.row["DateReleased"]) > cutoff}
    assert all(r["DateReleased"].count("-") == 2 and len(r["DateReleased"]) == 10 for r in updated)  # v4 MM-DD-YYYY


@pytest.mark.parametrize("hash_", ["", "y"])
def test_tcia_utils_download_is_byte_identical(tcia, small_archive: Archive, tmp_path: Path, hash_: str) -> None:  # type: ignore[no-untyped-def]
    recs = normal(small_archive)[:3]
    tcia.downloadSeries([r.uid for r in recs], input_type="list", path=str(tmp_path), hash=hash_)
    for rec in recs:
        folder = tmp_path / rec.uid
        files = sorted(folder.glob("*.dcm"))
        assert [f.read_bytes() for f in files] == [i.path.read_bytes() for i in rec.instances]
        # hash=y asks getImageWithMD5Hash, which (as on the real service) carries no LICENSE
        assert (folder / "LICENSE").is_file() == (hash_ == "")
        assert ((folder / "md5hashes.csv").is_file()) == (hash_ == "y")


def test_tcia_utils_single_image(tcia, small_archive: Archive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rec = normal(small_archive)[1]
    inst = rec.instances[0]
    tcia.downloadImage(rec.uid, inst.sop_uid, path=str(tmp_path))
    assert (tmp_path / rec.uid / f"{inst.sop_uid}.dcm").read_bytes() == inst.path.read_bytes()


@pytest.fixture
def nbia_client(server: ServerHandle):  # type: ignore[no-untyped-def]
    nbiatoolkit = pytest.importorskip("nbiatoolkit")
    client = nbiatoolkit.NBIAClient(log_level="ERROR")
    services = server.root_url + "/nbia-api/services/"
    client._base_url = types.SimpleNamespace(value=services)  # picklable for its process pool
    client._oauth2_client.base_url = services
    return client  # never used as a context manager: its __exit__ logs out at the real host


def test_nbiatoolkit_queries(nbia_client, server: ServerHandle, small_archive: Archive) -> None:  # type: ignore[no-untyped-def]
    endpoints = pytest.importorskip("nbiatoolkit.utils").NBIA_ENDPOINTS
    collections = nbia_client.query_api(endpoints.GET_COLLECTIONS)  # v2/getCollectionValues
    assert {c["Collection"] for c in collections} == set(small_archive.collections())
    rec = normal(small_archive)[2]
    rows = nbia_client.getSeries(Collection=rec.row["Collection"], PatientID=rec.row["PatientID"])
    assert rec.uid in {r["SeriesInstanceUID"] for r in rows}
    patients = nbia_client.getPatients(Collection=rec.row["Collection"])
    assert rec.row["PatientID"] in {p["PatientId"] for p in patients}
    new = nbia_client.getNewSeries("2022-01-01")  # nbiatoolkit sends DD/MM/YYYY to v2
    assert {r["SeriesInstanceUID"] for r in new} == {
        r.uid for r in small_archive.records() if r.row["DateReleased"][:10] > "2022-01-01"}
    assert server.stats.requests["oauth/token"] >= 1


def test_nbiatoolkit_download_is_byte_identical(nbia_client, small_archive: Archive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    recs = normal(small_archive)[:2]
    assert nbia_client.downloadSeries([r.uid for r in recs], downloadDir=str(tmp_path / "dl"))
    assert md5s_under(tmp_path / "dl") == {i.md5 for r in recs for i in r.instances}
