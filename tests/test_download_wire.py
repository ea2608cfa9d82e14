"""The download side of the real NBIA wire, end to end over loopback: our server sends ZIPs as
the real service does (DEFLATED, data descriptors, its headers and md5hashes.csv, a short ZIP
after an error, the IncludeMD5 refusal of 2025 builds), and the harvester takes all of it:
mostly-zero SEG series deflating at over 800:1, empty MD5 rows, the getImageWithMD5Hash
fallback, while a real zip bomb is still refused."""
from __future__ import annotations

import csv
import hashlib
import io
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harvester.config import Limits
from harvester.errors import IncompleteSeriesError
from harvester.server.app import INCLUDE_MD5_REFUSED, DownloadWire
from harvester.server.archive import Archive, SeriesRecord
from harvester.server.synthetic import SEG_PIXEL_BYTES, SyntheticSpec, build_synthetic
from harvester.server.testing import ServerHandle, serve_in_thread
from harvester.unpack import verify_and_unpack

from harvest_helpers import assert_identical, harvest, manifest, normal_series, select_all
from test_server_zipstream import parse_java_zip

#: One SYN collection with the SEG-like series, and no MD5 recorded for every series' 2nd instance.
WIRE_SPEC = "collections=1,patients=2,studies=1,series=2,instances=4,size=8KB,seg=1,missing_md5=1,seed=13"


@pytest.fixture(scope="module")
def wire_archive(synthetic_cache: Path) -> Archive:
    return build_synthetic(SyntheticSpec.parse(WIRE_SPEC), synthetic_cache)


@pytest.fixture
def wire_server(wire_archive: Archive) -> Iterator[ServerHandle]:
    with serve_in_thread(wire_archive) as handle:
        yield handle


def get(handle: ServerHandle, endpoint: str, **params: str) -> tuple[int, dict[str, str], bytes]:
    url = f"{handle.base_url}/{endpoint}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def seg_series(archive: Archive) -> SeriesRecord:
    (rec,) = [r for r in archive.records() if r.row["Modality"] == "SEG"]
    return rec


def md5_rows(zf: zipfile.ZipFile) -> dict[str, str]:
    return {row["Filename"]: row["MD5Hash"] for row in csv.DictReader(io.StringIO(zf.read("md5hashes.csv").decode()))}


# ------------------------------------------------------------------------ what the server sends

def test_served_zip_is_byte_for_byte_java_format(server: ServerHandle, small_archive: Archive) -> None:
    rec = next(r for r in small_archive.records() if r.row["Collection"].startswith("SYN-"))
    _, _, body = get(server, "getImage", SeriesInstanceUID=rec.uid, NewFileNames="Yes", IncludeMD5="yes")
    entries = parse_java_zip(body)  # every header field, data descriptor and the central directory
    names = [e["name"] for e in entries]
    assert names == ["LICENSE", *(f"1-{i}.dcm" for i in range(1, len(rec.instances) + 1)), "md5hashes.csv"]
    assert [e["data"] for e in entries[1:-1]] == [inst.path.read_bytes() for inst in rec.instances]


@pytest.mark.parametrize("endpoint", ["getImage", "getImageWithMD5Hash"])
def test_download_headers(server: ServerHandle, small_archive: Archive, endpoint: str) -> None:
    rec = next(r for r in small_archive.records() if not r.hostile_kind)
    status, headers, body = get(server, endpoint, SeriesInstanceUID=rec.uid)
    assert status == 200 and body.startswith(b"PK\x03\x04")
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Disposition"] == f'attachment; filename="{rec.uid}.zip"'
    assert headers.get("Transfer-Encoding") == "chunked" and "Content-Length" not in headers


def test_md5hashes_csv_is_lf_unquoted_and_in_no_particular_order(server: ServerHandle, small_archive: Archive) -> None:
    orders = []
    for rec in (r for r in small_archive.records() if r.row["Collection"].startswith("SYN-")):
        _, _, body = get(server, "getImage", SeriesInstanceUID=rec.uid, NewFileNames="Yes", IncludeMD5="yes")
        zf = zipfile.ZipFile(io.BytesIO(body))
        text = zf.read("md5hashes.csv")
        assert b"\r" not in text and b'"' not in text and text.endswith(b"\n")
        lines = text.decode().splitlines()
        assert lines[0] == "Filename,MD5Hash"
        dicoms = [n for n in zf.namelist() if n.endswith(".dcm")]
        names = [line.split(",")[0] for line in lines[1:]]
        assert sorted(names) == sorted(dicoms)
        assert md5_rows(zf) == {n: hashlib.md5(zf.read(n)).hexdigest() for n in dicoms}
        orders.append(names != dicoms)
        assert get(server, "getImage", SeriesInstanceUID=rec.uid, NewFileNames="Yes", IncludeMD5="yes")[2] == body
    assert any(orders)  # shuffled (deterministically: the same bytes twice), not in entry order


def test_seg_series_deflates_at_over_800_to_1(wire_server: ServerHandle, wire_archive: Archive) -> None:
    rec = seg_series(wire_archive)
    _, _, body = get(wire_server, "getImage", SeriesInstanceUID=rec.uid, NewFileNames="Yes", IncludeMD5="yes")
    zf = zipfile.ZipFile(io.BytesIO(body))
    dicoms = [i for i in zf.infolist() if i.filename.endswith(".dcm")]
    assert len(dicoms) == len(rec.instances) and rec.total_bytes > 1 << 20
    for info, inst in zip(dicoms, rec.instances, strict=True):
        assert info.file_size > SEG_PIXEL_BYTES > 1 << 20
        assert info.file_size > 800 * info.compress_size
        assert zf.read(info) == inst.path.read_bytes()


def test_truncated_stream_is_a_short_well_formed_zip_that_verifies_as_incomplete(
        server: ServerHandle, small_archive: Archive, tmp_path: Path) -> None:
    rec = next(r for r in small_archive.records() if r.row["Collection"].startswith("SYN-"))
    server.set_faults("truncate=1,seed=4")
    status, _, body = get(server, "getImage", SeriesInstanceUID=rec.uid, NewFileNames="Yes", IncludeMD5="yes")
    assert status == 200
    zf = zipfile.ZipFile(io.BytesIO(body))
    assert zf.testzip() is None and "md5hashes.csv" not in zf.namelist()
    (tmp_path / "s.zip").write_bytes(body)
    with pytest.raises(IncompleteSeriesError, match=f"of {len(rec.instances)} files"):
        verify_and_unpack(tmp_path / "s.zip", tmp_path / "staging", series_uid=rec.uid,
                          image_count=len(rec.instances), file_size=rec.total_bytes, limits=Limits())
    assert not (tmp_path / "staging").exists()


def test_truncated_series_are_never_harvested_as_complete(server: ServerHandle, small_archive: Archive,
                                                           tmp_path: Path) -> None:
    server.set_faults("truncate=1,seed=4")
    collection = sorted(r.row["Collection"] for r in small_archive.records() if r.row["Collection"].startswith("SYN-"))[0]
    result = harvest(server.base_url, tmp_path / "out", {"select": [{"collection": collection}]}, series_retries=1)
    assert result.failed and not result.ok
    assert all("files" in reason for _, reason in result.failed)
    assert not any(r["status"] == "complete" for r in manifest(tmp_path / "out")["series"])


def test_include_md5_refusing_mode(small_archive: Archive) -> None:
    rec = next(r for r in small_archive.records() if not r.hostile_kind)
    with serve_in_thread(small_archive, wire=DownloadWire(include_md5=False)) as handle:
        status, headers, body = get(handle, "getImage", SeriesInstanceUID=rec.uid, IncludeMD5="yes")
        assert status == 400 and headers["Content-Type"].startswith("text/plain")
        assert body.decode().strip() == INCLUDE_MD5_REFUSED == (
            "Invalid query parameter: 'IncludeMD5'. Allowed parameters are: [NewFileNames, SeriesInstanceUID]")
        assert get(handle, "getImage", SeriesInstanceUID=rec.uid, NewFileNames="Yes")[0] == 200
        assert get(handle, "getImageWithMD5Hash", SeriesInstanceUID=rec.uid)[0] == 200


def test_stored_mode_still_serves_and_harvests(small_archive: Archive, tmp_path: Path) -> None:
    rec = next(r for r in small_archive.records() if r.row["Collection"].startswith("SYN-"))
    with serve_in_thread(small_archive, wire=DownloadWire(zip_format="stored")) as handle:
        _, _, body = get(handle, "getImage", SeriesInstanceUID=rec.uid)
        zf = zipfile.ZipFile(io.BytesIO(body))
        assert all(i.compress_type == zipfile.ZIP_STORED and not i.flag_bits & 0x08 for i in zf.infolist())
        assert harvest(handle.base_url, tmp_path / "out", select_all(small_archive)).ok
    assert_identical(tmp_path / "out", small_archive, normal_series(small_archive))


def test_wire_options_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown ZIP format"):
        DownloadWire(zip_format="zstd")


# ------------------------------------------------------------------------ what the harvester takes

def test_harvest_with_seg_series_and_empty_md5s_is_complete_and_byte_identical(
        wire_server: ServerHandle, wire_archive: Archive, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = harvest(wire_server.base_url, out, select_all(wire_archive))
    assert result.ok, result.failed
    recs = {r["SeriesInstanceUID"]: r for r in manifest(out)["series"]}
    assert seg_series(wire_archive).uid in recs
    for series in wire_archive.records():
        rec = recs[series.uid]
        assert rec["status"] == "complete"
        by_sop = {f["SOPInstanceUID"]: f for f in rec["files"]}
        assert len(by_sop) == len(series.instances)
        for inst in series.instances:
            f = by_sop[inst.sop_uid]
            data = (out / f["path"]).read_bytes()
            assert data == inst.path.read_bytes()
            assert f["md5"] == hashlib.md5(data).hexdigest()
            # the archive had no MD5 for it: checked by count, size, CRC and DICOM, and said so
            assert f.get("md5_source") == ("computed" if inst.md5 == "" else None)
        assert rec["files_without_md5"] == sum(inst.md5 == "" for inst in series.instances) == 1


def test_empty_md5_rows_are_sent_empty(wire_server: ServerHandle, wire_archive: Archive) -> None:
    rec = next(r for r in wire_archive.records() if r.row["Modality"] != "SEG")
    _, _, body = get(wire_server, "getImageWithMD5Hash", SeriesInstanceUID=rec.uid)
    rows = md5_rows(zipfile.ZipFile(io.BytesIO(body)))
    assert rows["00000002.dcm"] == "" and all(rows[n] for n in rows if n != "00000002.dcm")


def test_client_falls_back_to_getImageWithMD5Hash_and_remembers(small_archive: Archive, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with serve_in_thread(small_archive, wire=DownloadWire(include_md5=False)) as handle:
        result = harvest(handle.base_url, out, select_all(small_archive), workers=1, connections=2)
        requests = handle.stats.requests
    assert result.ok, result.failed
    assert_identical(out, small_archive, normal_series(small_archive))
    assert requests.get("getImage") == 1  # refused once, then straight to the fallback
    assert requests.get("getImageWithMD5Hash") == len(normal_series(small_archive))
    # getImageWithMD5Hash carries no LICENSE: the license comes from the getSeries rows
    licenses = {p.name: p.read_text() for p in (out / "licenses").iterdir()}
    assert licenses and all("creativecommons.org" in text or "pydicom" in text for text in licenses.values())


def test_a_real_zip_bomb_is_still_refused(server: ServerHandle, small_archive: Archive, tmp_path: Path) -> None:
    (bomb,) = [r for r in small_archive.records() if r.hostile_kind == "zipbomb"]
    out = tmp_path / "out"
    result = harvest(server.base_url, out, {"select": [{"series": [bomb.uid]}]}, series_retries=0)
    assert dict(result.failed).keys() == {bomb.uid}
    assert "announced size" in dict(result.failed)[bomb.uid]
    assert not [p for p in out.rglob("*.dcm")]
