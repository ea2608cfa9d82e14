"""The NBIA-compatible API over real HTTP on loopback: every endpoint, its parameters, the
version differences, CSV, the ZIP layout, tokens and statistics."""
from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import re
import zipfile
from typing import Any

import aiohttp
import pydicom
import pydicom.data
import pytest

from harvester.dates import nbia_date, parse_archive_date
from harvester.server.app import entry_names, parse_from_date
from harvester.server.archive import Archive, SeriesRecord
from harvester.server.auth import ServerAuth
from harvester.server.testing import ServerHandle, serve_in_thread

pytestmark = pytest.mark.anyio


async def fetch(handle: ServerHandle, endpoint: str, params: dict[str, str] | None = None, *,
                version: str = "v4", headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.get(handle.url(endpoint, version), params=params, headers=headers) as resp:
            return resp.status, resp.headers, await resp.read()


async def fetch_json(handle: ServerHandle, endpoint: str, params: dict[str, str] | None = None,
                     **kw: Any) -> list[dict[str, Any]]:
    status, headers, body = await fetch(handle, endpoint, params, **kw)
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/json")
    data = json.loads(body)
    assert isinstance(data, list) and data, "no match is an empty body (see assert_no_match), never []"
    return data


async def assert_no_match(handle: ServerHandle, endpoint: str, params: dict[str, str] | None = None,
                          **kw: Any) -> None:
    """NBIA's answer when nothing matches: HTTP 200, typed JSON, and an empty body (not ``[]``)."""
    status, headers, body = await fetch(handle, endpoint, params, **kw)
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/json")
    assert body == b""


V4_DATE = re.compile(r"\d{2}-\d{2}-\d{4}")
V2_DATE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d+")


def syn_series(archive: Archive) -> list[SeriesRecord]:
    return [r for r in archive.records() if r.row["Collection"].startswith("SYN-")]


def no_nulls(rows: list[dict[str, Any]]) -> bool:
    return all(v is not None and v != "" for row in rows for v in row.values())


# ---------------------------------------------------------------------------- query endpoints

async def test_collection_values(server: ServerHandle) -> None:
    rows = await fetch_json(server, "getCollectionValues")
    assert rows == [{"Collection": c} for c in ("HOSTILE", "PYDICOM-SAMPLES", "SYN-BRAIN-MR", "SYN-LUNG-CT")]


async def test_value_endpoints_filter(server: ServerHandle) -> None:
    assert await fetch_json(server, "getModalityValues", {"Collection": "SYN-LUNG-CT"}) == [
        {"Modality": "CT"}, {"Modality": "MR"}]
    assert await fetch_json(server, "getModalityValues", {"Collection": "PYDICOM-SAMPLES"}) == [
        {"Modality": "CR"}, {"Modality": "CT"}, {"Modality": "MR"}]
    assert await fetch_json(server, "getBodyPartValues", {"Collection": "SYN-BRAIN-MR"}) == [
        {"BodyPartExamined": "HEAD"}]
    makers = await fetch_json(server, "getManufacturerValues", {"Collection": "SYN-LUNG-CT", "Modality": "MR"})
    assert makers and all(set(m) == {"Manufacturer"} for m in makers)
    await assert_no_match(server, "getModalityValues", {"Collection": "NO-SUCH"})


async def test_get_patient_uses_lower_case_d(server: ServerHandle, small_archive: Archive) -> None:
    rows = await fetch_json(server, "getPatient", {"Collection": "SYN-LUNG-CT"})
    assert [r["PatientId"] for r in rows] == ["SYN-LUNG-CT-0001", "SYN-LUNG-CT-0002"]
    assert all("PatientID" not in r and r["Collection"] == "SYN-LUNG-CT" for r in rows)
    everyone = await fetch_json(server, "getPatient")
    assert len(everyone) == len({(r.row["Collection"], r.row["PatientID"]) for r in small_archive.records()})
    assert no_nulls(everyone)


async def test_patient_by_collection_and_modality(server: ServerHandle) -> None:
    rows = await fetch_json(server, "getPatientByCollectionAndModality", {"Collection": "PYDICOM-SAMPLES", "Modality": "CR"})
    assert rows == [{"PatientId": "77654033"}]


async def test_patient_study_counts_series(server: ServerHandle, small_archive: Archive) -> None:
    rec = syn_series(small_archive)[0]
    rows = await fetch_json(server, "getPatientStudy", {"Collection": rec.row["Collection"], "PatientID": rec.row["PatientID"]})
    assert len(rows) == 1
    study = rows[0]
    assert study["StudyInstanceUID"] == rec.row["StudyInstanceUID"]
    assert study["PatientID"] == rec.row["PatientID"]
    assert study["SeriesCount"] == 2
    assert "/" in study["StudyDescription"] or study["StudyDescription"]
    by_uid = await fetch_json(server, "getPatientStudy", {"StudyInstanceUID": rec.row["StudyInstanceUID"]})
    assert by_uid == rows


@pytest.mark.parametrize("param", ["Collection", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                                   "BodyPartExamined", "Manufacturer", "ManufacturerModelName"])
async def test_get_series_each_filter(server: ServerHandle, small_archive: Archive, param: str) -> None:
    rec = syn_series(small_archive)[3]
    rows = await fetch_json(server, "getSeries", {param: str(rec.row[param])})
    expected = [r.uid for r in small_archive.records() if str(r.row.get(param)).upper() == str(rec.row[param]).upper()]
    assert [r["SeriesInstanceUID"] for r in rows] == expected
    assert rec.uid in expected


async def test_get_series_row_shape(server: ServerHandle, small_archive: Archive) -> None:
    rows = await fetch_json(server, "getSeries", {"Collection": "SYN-LUNG-CT", "Modality": "CT"})
    assert len(rows) == 2 and no_nulls(rows)
    row = rows[0]
    rec = small_archive.series[row["SeriesInstanceUID"]]
    assert row["ImageCount"] == len(rec.instances) == 4
    assert row["FileSize"] == sum(i.path.stat().st_size for i in rec.instances)
    for key in ("SeriesDate", "StudyDate", "DateReleased", "MaxSubmissionTimestamp"):  # v4: MM-DD-YYYY
        assert V4_DATE.fullmatch(row[key]), (key, row[key])
    for key in ("LicenseName", "LicenseURI", "DataDescriptionURI", "Site", "Manufacturer", "ManufacturerModelName",
                "SoftwareVersions", "SeriesDate", "StudyDesc"):
        assert row[key], key
    combined = await fetch_json(server, "getSeries", {"Collection": "syn-lung-ct", "PatientID": "SYN-LUNG-CT-0002"})
    assert {r["PatientID"] for r in combined} == {"SYN-LUNG-CT-0002"} and len(combined) == 2
    lower = await fetch_json(server, "getSeries", {"PatientID": "syn-lung-ct-0002"})  # UPPER(PatientID) = UPPER(?)
    assert lower == combined


# ---------------------------------------------------------------------------- the wire, byte for byte

DATE_KEYS = ("SeriesDate", "StudyDate", "DateReleased", "MaxSubmissionTimestamp")


async def test_v4_dates_are_mm_dd_yyyy(server: ServerHandle, small_archive: Archive) -> None:
    rows = await fetch_json(server, "getSeries", {"Collection": "SYN-LUNG-CT"})
    for row in rows:
        rec = small_archive.series[row["SeriesInstanceUID"]]
        for key in DATE_KEYS:
            assert row[key] == nbia_date(parse_archive_date(rec.row[key])), key
    studies = await fetch_json(server, "getPatientStudy", {"Collection": "SYN-LUNG-CT"})
    assert studies and all(V4_DATE.fullmatch(s["StudyDate"]) for s in studies)
    updated = await fetch_json(server, "getUpdatedSeries", {"fromDate": "01-01-1990"})
    assert updated and all(V4_DATE.fullmatch(r["DateReleased"]) for r in updated)


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_old_versions_send_v2_era_dates(server: ServerHandle, small_archive: Archive, version: str) -> None:
    rows = await fetch_json(server, "getSeries", {"Collection": "SYN-LUNG-CT"}, version=version)
    for row in rows:
        rec = small_archive.series[row["SeriesInstanceUID"]]
        for key in DATE_KEYS:
            assert V2_DATE.fullmatch(row[key]), (key, row[key])
            assert parse_archive_date(row[key]) == parse_archive_date(rec.row[key])
    studies = await fetch_json(server, "getPatientStudy", {"Collection": "SYN-LUNG-CT"}, version=version)
    assert studies and all(V2_DATE.fullmatch(s["StudyDate"]) for s in studies)


async def test_numbers_are_json_numbers_and_slashes_escaped(server: ServerHandle, small_archive: Archive) -> None:
    rec = syn_series(small_archive)[0]
    status, _, body = await fetch(server, "getSeries", {"SeriesInstanceUID": rec.uid})
    assert status == 200
    assert b"https:\\/\\/creativecommons.org\\/" in body and b"/" not in body.replace(b"\\/", b"")
    row = json.loads(body)[0]
    assert row["SeriesNumber"] == rec.row["SeriesNumber"] and isinstance(row["SeriesNumber"], int)
    assert row["FileSize"] == rec.total_bytes and row["ImageCount"] == len(rec.instances)
    [size] = await fetch_json(server, "getSeriesSize", {"SeriesInstanceUID": rec.uid})
    assert size == {"TotalSizeInBytes": rec.total_bytes, "ObjectCount": len(rec.instances)}
    [study] = await fetch_json(server, "getPatientStudy", {"StudyInstanceUID": rec.row["StudyInstanceUID"]})
    assert study["SeriesCount"] == 2


async def test_numbers_as_strings_mode(small_archive: Archive) -> None:
    rec = syn_series(small_archive)[0]
    with serve_in_thread(small_archive, numbers_as_strings=True) as handle:
        [row] = await fetch_json(handle, "getSeries", {"SeriesInstanceUID": rec.uid})
        [size] = await fetch_json(handle, "getSeriesSize", {"SeriesInstanceUID": rec.uid})
        [study] = await fetch_json(handle, "getPatientStudy", {"StudyInstanceUID": rec.row["StudyInstanceUID"]})
    assert (row["SeriesNumber"], row["ImageCount"]) == (str(rec.row["SeriesNumber"]), str(len(rec.instances)))
    assert row["FileSize"] == f"{rec.total_bytes}.0"
    assert size == {"TotalSizeInBytes": f"{rec.total_bytes}.0", "ObjectCount": str(len(rec.instances))}
    assert study["SeriesCount"] == "2"
    assert V4_DATE.fullmatch(row["DateReleased"])  # only the numbers change


@pytest.mark.parametrize("endpoint,params", [
    ("getCollectionValues", None),  # None: asked of an empty archive
    ("getModalityValues", {"Collection": "NO-SUCH"}),
    ("getBodyPartValues", {"Collection": "NO-SUCH"}),
    ("getManufacturerValues", {"Collection": "NO-SUCH"}),
    ("getPatient", {"Collection": "NO-SUCH"}),
    ("getPatientByCollectionAndModality", {"Collection": "SYN-LUNG-CT", "Modality": "XA"}),
    ("NewPatientsInCollection", {"Collection": "SYN-LUNG-CT", "fromDate": "01-01-2100"}),
    ("getPatientStudy", {"PatientID": "NO-SUCH"}),
    ("NewStudiesInPatientCollection", {"Collection": "NO-SUCH", "fromDate": "01-01-1990"}),
    ("getSeries", {"Collection": "SYN-LUNG-CT", "Modality": "XA"}),
    ("getUpdatedSeries", {"fromDate": "01-01-2100"}),
    ("getSeriesSize", {"SeriesInstanceUID": "1.2.3.404"}),
    ("getSOPInstanceUIDs", {"SeriesInstanceUID": "1.2.3.404"}),
])
async def test_no_match_is_an_empty_200_body(server: ServerHandle, small_archive: Archive, endpoint: str,
                                             params: dict[str, str] | None) -> None:
    if params is None:
        with serve_in_thread(Archive([])) as empty:
            await assert_no_match(empty, endpoint)
        return
    await assert_no_match(server, endpoint, params)
    if "fromDate" not in params:  # (v2 reads fromDate as DD/MM/YYYY)
        await assert_no_match(server, endpoint, params, version="v2")


@pytest.mark.parametrize("param", ["Collection", "PatientID", "Modality", "BodyPartExamined", "Manufacturer",
                                   "ManufacturerModelName"])
async def test_filters_ignore_case(server: ServerHandle, small_archive: Archive, param: str) -> None:
    rec = syn_series(small_archive)[3]
    exact = await fetch_json(server, "getSeries", {param: str(rec.row[param])})
    assert rec.uid in {r["SeriesInstanceUID"] for r in exact}
    for variant in (str(rec.row[param]).lower(), str(rec.row[param]).swapcase()):
        assert await fetch_json(server, "getSeries", {param: variant}) == exact, variant


async def test_modality_ct_returns_the_ct_series(server: ServerHandle, small_archive: Archive) -> None:
    rows = await fetch_json(server, "getSeries", {"Collection": "syn-lung-ct", "Modality": "ct"})
    expected = [r.uid for r in small_archive.records() if r.row["Collection"] == "SYN-LUNG-CT" and r.row["Modality"] == "CT"]
    assert [r["SeriesInstanceUID"] for r in rows] == expected and expected
    assert {r["Modality"] for r in rows} == {"CT"}  # the archive's spelling comes back
    assert await fetch_json(server, "getModalityValues", {"Collection": "syn-lung-ct"}) == [
        {"Modality": "CT"}, {"Modality": "MR"}]
    assert await fetch_json(server, "getBodyPartValues", {"Collection": "syn-brain-mr", "Modality": "mr"}) == [
        {"BodyPartExamined": "HEAD"}]
    patients = await fetch_json(server, "getPatientByCollectionAndModality", {"Collection": "Syn-Lung-Ct",
                                                                               "Modality": "Ct"})
    assert [p["PatientId"] for p in patients] == ["SYN-LUNG-CT-0001", "SYN-LUNG-CT-0002"]


async def test_uids_match_exactly(server: ServerHandle, small_archive: Archive) -> None:
    rec = syn_series(small_archive)[0]
    await fetch_json(server, "getSeries", {"StudyInstanceUID": rec.row["StudyInstanceUID"]})
    await assert_no_match(server, "getSeries", {"StudyInstanceUID": rec.row["StudyInstanceUID"] + " "})
    await assert_no_match(server, "getSeries", {"SeriesInstanceUID": rec.uid + ".0"})


async def test_null_fields_are_omitted(server: ServerHandle) -> None:
    rows = await fetch_json(server, "getSeries", {"Collection": "PYDICOM-SAMPLES"})
    assert no_nulls(rows)
    ct_small = [r for r in rows if r["PatientID"] == "1CT1"]
    assert ct_small and "SeriesDescription" not in ct_small[0]  # CT_small.dcm has none


async def test_unknown_parameter_is_400_on_v4(server: ServerHandle) -> None:
    status, headers, body = await fetch(server, "getSeries", {"Colection": "SYN-LUNG-CT"})
    assert status == 400 and headers["Content-Type"].startswith("text/plain")
    assert b"Invalid query parameter: Colection" in body
    status, _, body = await fetch(server, "getPatient", {"collection": "SYN-LUNG-CT"})  # case-sensitive
    assert status == 400 and b"collection" in body
    status, _, body = await fetch(server, "getCollectionValues", {"anything": "1"})
    assert status == 400


async def test_old_versions_ignore_unknown_parameters(server: ServerHandle) -> None:
    for version in ("v1", "v2"):
        rows = await fetch_json(server, "getPatient", {"collection": "SYN-LUNG-CT"}, version=version)
        assert len(rows) > 2  # the misspelt filter was ignored, not applied


async def test_missing_required_parameter(server: ServerHandle) -> None:
    for endpoint in ("getSeriesSize", "getSOPInstanceUIDs", "getImage", "getUpdatedSeries"):
        status, _, body = await fetch(server, endpoint)
        assert status == 400, endpoint
        assert b"Missing required query parameter" in body
    # NBIA-TCIA's V4_getMD5HashForImage requires nothing (it reads a parameter it does not allow)
    assert (await fetch(server, "getMD5HashForImage"))[::2] == (200, b"")


async def test_format_csv_matches_json(server: ServerHandle) -> None:
    rows = await fetch_json(server, "getSeries", {"Collection": "SYN-BRAIN-MR"})
    status, headers, body = await fetch(server, "getSeries", {"Collection": "SYN-BRAIN-MR", "format": "csv"})
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    parsed = list(csv.DictReader(io.StringIO(body.decode("utf-8"))))
    assert len(parsed) == len(rows)
    assert [p["SeriesInstanceUID"] for p in parsed] == [r["SeriesInstanceUID"] for r in rows]
    assert parsed[0]["SeriesDescription"] == rows[0]["SeriesDescription"]
    assert parsed[0]["ImageCount"] == str(rows[0]["ImageCount"])
    assert parsed[0]["DateReleased"] == rows[0]["DateReleased"] and V4_DATE.fullmatch(parsed[0]["DateReleased"])
    status, _, _ = await fetch(server, "getSeries", {"format": "xml"})
    assert status == 400
    assert (await fetch_json(server, "getSeries", {"Collection": "SYN-BRAIN-MR", "format": "json"})) == rows


def _release_day(rec: SeriesRecord) -> dt.date:
    return dt.date.fromisoformat(rec.row["DateReleased"][:10])


async def test_updated_series_date_format_per_version(server: ServerHandle, small_archive: Archive) -> None:
    days = sorted({_release_day(r) for r in small_archive.records()})
    pivot = days[len(days) // 2]
    expected = {r.uid for r in small_archive.records() if _release_day(r) > pivot}  # strictly after
    assert 0 < len(expected) < len(small_archive)
    v4 = await fetch_json(server, "getUpdatedSeries", {"fromDate": pivot.strftime("%m-%d-%Y")})
    assert {r["SeriesInstanceUID"] for r in v4} == expected
    for version in ("v1", "v2"):
        old = await fetch_json(server, "getUpdatedSeries", {"fromDate": pivot.strftime("%d/%m/%Y")}, version=version)
        assert {r["SeriesInstanceUID"] for r in old} == expected
        status, _, _ = await fetch(server, "getUpdatedSeries", {"fromDate": pivot.strftime("%m-%d-%Y")}, version=version)
        assert status == 400
    for bad in (pivot.strftime("%d/%m/%Y"), pivot.isoformat(), "13-45-2020", "yesterday"):
        status, _, body = await fetch(server, "getUpdatedSeries", {"fromDate": bad})
        assert status == 400 and b"fromDate" in body, bad


def test_from_date_parsing() -> None:
    assert parse_from_date("03-04-2021", "v4") == dt.date(2021, 3, 4)
    assert parse_from_date("03/04/2021", "v2") == dt.date(2021, 4, 3)


async def test_new_patients_and_studies(server: ServerHandle, small_archive: Archive) -> None:
    lung = [r for r in small_archive.records() if r.row["Collection"] == "SYN-LUNG-CT"]
    last = max(_release_day(r) for r in lung)
    before_last = last - dt.timedelta(days=1)
    rows = await fetch_json(server, "NewPatientsInCollection",
                            {"Collection": "SYN-LUNG-CT", "fromDate": before_last.strftime("%m-%d-%Y")})
    newest = [r for r in lung if _release_day(r) == last]
    assert [r["PatientId"] for r in rows] == sorted({r.row["PatientID"] for r in newest})
    await assert_no_match(server, "NewPatientsInCollection",
                          {"Collection": "SYN-LUNG-CT", "fromDate": last.strftime("%m-%d-%Y")})
    studies = await fetch_json(server, "NewStudiesInPatientCollection", {
        "Collection": "SYN-LUNG-CT", "PatientID": newest[0].row["PatientID"], "fromDate": "01-01-1990"})
    assert [s["StudyInstanceUID"] for s in studies] == [newest[0].row["StudyInstanceUID"]]


async def test_series_size_sop_uids_and_md5(server: ServerHandle, small_archive: Archive) -> None:
    rec = syn_series(small_archive)[1]
    size = await fetch_json(server, "getSeriesSize", {"SeriesInstanceUID": rec.uid})
    total = sum(i.path.stat().st_size for i in rec.instances)
    assert size == [{"TotalSizeInBytes": total, "ObjectCount": 4}]  # JSON numbers, as v4 sends them
    await assert_no_match(server, "getSeriesSize", {"SeriesInstanceUID": "1.2.3.404"})
    sops = await fetch_json(server, "getSOPInstanceUIDs", {"SeriesInstanceUID": rec.uid})
    assert [s["SOPInstanceUID"] for s in sops] == [i.sop_uid for i in rec.instances]
    inst = rec.instances[2]
    # as NBIA-TCIA's V4_getMD5HashForImage: only SOPInstanceUID is allowed, but the handler reads
    # SOPInstanceUid, so every v4 answer is empty; v1/v2 read SOPInstanceUid
    status, headers, body = await fetch(server, "getMD5HashForImage", {"SOPInstanceUID": inst.sop_uid})
    assert status == 200 and headers["Content-Type"].startswith("text/plain") and body == b""
    status, _, _ = await fetch(server, "getMD5HashForImage", {"SOPInstanceUid": inst.sop_uid})
    assert status == 400
    status, _, body = await fetch(server, "getMD5HashForImage", {"SOPInstanceUid": inst.sop_uid}, version="v2")
    assert status == 200 and body.decode() == hashlib.md5(inst.path.read_bytes()).hexdigest()
    status, _, body = await fetch(server, "getMD5HashForImage", {"SOPInstanceUid": "1.2.3.404"}, version="v2")
    assert status == 200 and body == b""


async def test_single_image(server: ServerHandle, small_archive: Archive) -> None:
    rec = syn_series(small_archive)[0]
    inst = rec.instances[1]
    status, headers, body = await fetch(server, "getSingleImage", {"SeriesInstanceUID": rec.uid, "SOPInstanceUID": inst.sop_uid})
    assert status == 200 and headers["Content-Type"] == "application/dicom"
    assert body == inst.path.read_bytes()
    other = syn_series(small_archive)[1]
    status, _, body = await fetch(server, "getSingleImage", {"SeriesInstanceUID": other.uid, "SOPInstanceUID": inst.sop_uid})
    assert status == 500 and b"not found" in body  # NBIA answers an instance it cannot find with 500


async def test_unknown_endpoint_and_no_listing(server: ServerHandle) -> None:
    async with aiohttp.ClientSession() as session:
        for path in ("/", "/nbia-api/services/v4/", "/nbia-api/services/v4/getNothing",
                     "/nbia-api/services/v3/getSeries", "/nbia-api/services/v4/..%2F..%2Fetc%2Fpasswd",
                     "/nbia-api/services/v4/../../../etc/passwd"):
            async with session.get(server.root_url + path) as resp:
                assert resp.status == 404, path
                assert b"root:" not in await resp.read()


# ------------------------------------------------------------------------------- ZIP downloads

async def download(handle: ServerHandle, endpoint: str, params: dict[str, str], version: str = "v4") -> tuple[Any, bytes]:
    status, headers, body = await fetch(handle, endpoint, params, version=version)
    assert status == 200, body
    return headers, body


def test_entry_names() -> None:
    assert entry_names(3, False) == ["00000001.dcm", "00000002.dcm", "00000003.dcm"]
    # padded to the digits of the instance count, as the real service does
    assert entry_names(3, True) == ["1-1.dcm", "1-2.dcm", "1-3.dcm"]
    assert entry_names(50, True)[0] == "1-01.dcm" and entry_names(50, True)[-1] == "1-50.dcm"
    assert entry_names(400, True)[0] == "1-001.dcm" and entry_names(400, True)[-1] == "1-400.dcm"
    assert entry_names(120, True)[0] == "1-001.dcm" and entry_names(120, True)[-1] == "1-120.dcm"


@pytest.mark.parametrize("endpoint,params,names,with_md5", [
    ("getImage", {}, "00000001.dcm", False),
    ("getImage", {"NewFileNames": "Yes"}, "1-1.dcm", False),
    ("getImage", {"IncludeMD5": "yes"}, "00000001.dcm", True),
    ("getImage", {"NewFileNames": "Yes", "IncludeMD5": "yes"}, "1-1.dcm", True),
    ("getImageWithMD5Hash", {}, "00000001.dcm", True),
    ("getImageWithMD5Hash", {"NewFileNames": "Yes"}, "00000001.dcm", True),  # always the plain names
])
async def test_zip_layout(server: ServerHandle, small_archive: Archive, endpoint: str, params: dict[str, str],
                          names: str, with_md5: bool) -> None:
    rec = syn_series(small_archive)[2]
    headers, body = await download(server, endpoint, {"SeriesInstanceUID": rec.uid, **params})
    assert headers["Content-Type"] == "application/octet-stream"
    assert "Content-Length" not in headers and headers.get("Transfer-Encoding") == "chunked"
    zf = zipfile.ZipFile(io.BytesIO(body))
    assert zf.testzip() is None
    listed = zf.namelist()
    if endpoint == "getImage":  # only getImage carries the LICENSE, first
        assert listed[0] == "LICENSE" and zf.read("LICENSE").decode().startswith("Creative Commons")
        listed = listed[1:]
    else:
        assert "LICENSE" not in listed
    dicoms = listed[:-1] if with_md5 else listed
    assert dicoms[0] == names and len(dicoms) == len(rec.instances)
    for name, inst in zip(dicoms, rec.instances, strict=True):
        assert zf.read(name) == inst.path.read_bytes()
        # as java.util.zip.ZipOutputStream writes: DEFLATED, data descriptor, UTF-8 names
        assert zf.getinfo(name).compress_type == zipfile.ZIP_DEFLATED
        assert zf.getinfo(name).flag_bits == 0x0808
    if with_md5:
        assert listed[-1] == "md5hashes.csv"
        table = list(csv.DictReader(io.StringIO(zf.read("md5hashes.csv").decode())))
        assert {row["Filename"]: row["MD5Hash"] for row in table} == {
            name: hashlib.md5(zf.read(name)).hexdigest() for name in dicoms}
    else:
        assert "md5hashes.csv" not in listed


async def test_zip_of_pydicom_samples_and_old_versions(server: ServerHandle, small_archive: Archive) -> None:
    rec = next(r for r in small_archive.records() if r.row["PatientID"] == "1CT1")
    with open(pydicom.data.get_testdata_file("CT_small.dcm"), "rb") as fh:
        original = fh.read()
    for version in ("v1", "v2", "v4"):
        _, body = await download(server, "getImageWithMD5Hash", {"SeriesInstanceUID": rec.uid}, version)
        zf = zipfile.ZipFile(io.BytesIO(body))
        assert zf.namelist() == ["00000001.dcm", "md5hashes.csv"]  # getImageWithMD5Hash: no LICENSE
        assert zf.read("00000001.dcm") == original


async def test_download_of_unknown_series_is_400_text_typed_json(server: ServerHandle) -> None:
    """Access denied (or no such series): HTTP 400, a plain-text message, ``Content-Type: application/json``."""
    for endpoint in ("getImage", "getImageWithMD5Hash", "getSingleImage"):
        params = {"SeriesInstanceUID": "1.2.3.404"}
        if endpoint == "getSingleImage":
            params["SOPInstanceUID"] = "1.2.3.405"
        status, headers, body = await fetch(server, endpoint, params)
        assert status == 400 and headers["Content-Type"].startswith("application/json"), endpoint
        assert b"1.2.3.404" in body and b"not authorized" in body and not body.startswith(b"PK")
        with pytest.raises(ValueError):
            json.loads(body)  # the type says JSON, the body is text: clients must not trust the type


# ------------------------------------------------------------------------------- statistics

async def test_stats_count_requests_downloads_and_bytes(server: ServerHandle, small_archive: Archive) -> None:
    rec = syn_series(small_archive)[0]
    await fetch_json(server, "getSeries")
    sizes = []
    for _ in range(2):
        _, body = await download(server, "getImage", {"SeriesInstanceUID": rec.uid})
        sizes.append(len(body))
    stats = server.stats.snapshot()
    assert stats["requests"] == {"getSeries": 1, "getImage": 2}
    assert stats["downloads"] == {rec.uid: 2}
    assert stats["bytes_sent"] == sum(sizes)
    assert stats["faults"] == {}
    async with aiohttp.ClientSession() as session:
        async with session.get(server.root_url + "/_harvester/stats") as resp:
            assert resp.status == 200
            assert (await resp.json())["downloads"] == {rec.uid: 2}


# ------------------------------------------------------------------------------- tokens

async def _token(handle: ServerHandle, form: dict[str, str], path: str = "/nbia-api/oauth/token") -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(handle.root_url + path, data=form) as resp:
            return resp.status, await resp.json()


async def test_token_endpoint_without_auth_gives_anyone_a_token(server: ServerHandle) -> None:
    for path in ("/nbia-api/oauth/token", "/nbia-api/services/oauth/token"):
        status, body = await _token(server, {"grant_type": "password", "client_id": "NBIA",
                                             "username": "nbia_guest", "password": ""}, path)
        assert status == 200
        assert set(body) >= {"access_token", "expires_in", "refresh_token", "token_type", "scope"}
    status, _ = await _token(server, {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    assert status == 200
    rows = await fetch_json(server, "getCollectionValues")  # no token needed
    assert rows


async def test_auth_requires_valid_unexpired_token(small_archive: Archive) -> None:
    now = [1000.0]
    auth = ServerAuth(users={"alice": "s3cret"}, expires_in=60, clock=lambda: now[0])
    with serve_in_thread(small_archive, auth=auth) as handle:
        status, _, body = await fetch(handle, "getCollectionValues")
        assert status == 401
        status, body_json = await _token(handle, {"grant_type": "password", "client_id": "nbia",
                                                  "username": "alice", "password": "wrong"})
        assert status == 401 and body_json["error"] == "invalid_grant"
        status, body_json = await _token(handle, {"grant_type": "password", "client_id": "nbia",
                                                  "username": "nbia_guest", "password": ""})
        assert status == 401
        status, grant = await _token(handle, {"grant_type": "password", "client_id": "nbia",
                                              "username": "alice", "password": "s3cret"})
        assert status == 200 and grant["expires_in"] == 60
        bearer = {"Authorization": f"Bearer {grant['access_token']}"}
        status, _, _ = await fetch(handle, "getCollectionValues", headers=bearer)
        assert status == 200
        status, _, _ = await fetch(handle, "getCollectionValues", headers={"Authorization": "Bearer forged"})
        assert status == 401
        now[0] += 61  # the access token expires
        status, _, _ = await fetch(handle, "getCollectionValues", headers=bearer)
        assert status == 401
        status, fresh = await _token(handle, {"grant_type": "refresh_token", "client_id": "nbia",
                                              "refresh_token": grant["refresh_token"]})
        assert status == 200
        status, _, _ = await fetch(handle, "getCollectionValues",
                                   headers={"Authorization": f"Bearer {fresh['access_token']}"})
        assert status == 200
        status, _ = await _token(handle, {"grant_type": "refresh_token", "refresh_token": grant["refresh_token"]})
        assert status == 401  # a refresh token is single-use
        status, _ = await _token(handle, {"grant_type": "client_credentials"})
        assert status == 400


def test_server_auth_repr_hides_passwords() -> None:
    assert "s3cret" not in repr(ServerAuth(users={"alice": "s3cret"}))
