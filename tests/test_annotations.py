"""Annotation files (a cart's ``includeAnnotation=true``): our server's v1 getDCMImage, the
checks of harvester.annotations, and whole harvests against the loopback server."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import urlopen

import anyio
import pytest

from harvest_helpers import harvest, manifest, test_config
from harvester.annotations import MAX_ANNOTATION_BYTES, check_xml, has_annotations
from harvester.config import Limits
from harvester.api import aharvest
from harvester.errors import IntegrityError, ManifestError, UnsafeArchiveError
from harvester.query import load_query, query_from_dict, tcia_includes_annotations
from harvester.server.app import entry_names
from harvester.server.archive import Archive
from harvester.server.synthetic import SyntheticSpec, annotation_xml, build_synthetic
from harvester.server.testing import ServerHandle, serve_in_thread
from harvester.store.sink import AnnotationZipSink

SPEC = "collections=2,patients=2,studies=1,series=2,instances=3,size=4KB,annotations=1,seed=5"


@pytest.fixture(scope="module")
def archive(synthetic_cache: Path) -> Archive:
    return build_synthetic(SyntheticSpec.parse(SPEC), synthetic_cache)


@pytest.fixture
def annotated_server(archive: Archive) -> Iterator[ServerHandle]:
    with serve_in_thread(archive) as handle:
        yield handle


def annotated(archive: Archive) -> list[str]:
    return sorted(r.uid for r in archive.records() if r.annotations)


def cart(path: Path, uids: list[str], include: str) -> Path:
    header = ("downloadServerUrl=https://nbia.cancerimagingarchive.net/nbia-download/servlet/DownloadServlet\n"
              f"includeAnnotation={include}\nnoOfrRetry=4\ndatabasketId=manifest-1.tcia\nmanifestVersion=3.0\n"
              "ListOfSeriesToDownload=\n")
    path.write_text(header + "\n".join(uids) + "\n", "utf-8")
    return path


def run_cart(server: ServerHandle, out: Path, cart_path: Path):
    return anyio.run(aharvest, load_query(cart_path), test_config(server.base_url, out))


def all_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- the synthetic archive and our server

def test_the_first_collection_has_lidc_style_annotations(archive: Archive) -> None:
    with_ann = [r for r in archive.records() if r.annotations]
    without = [r for r in archive.records() if not r.annotations]
    assert with_ann and without
    assert {r.row["Collection"] for r in with_ann} == {"SYN-LUNG-CT"}
    for rec in with_ann:
        assert rec.row["AnnotationsFlag"] is True
        (ann,) = rec.annotations
        assert ann.name.endswith(".xml") and len(ann.name) == 7        # 069.xml, 070.xml, ...
        data = ann.path.read_bytes()
        assert len(data) == ann.size and zlib.crc32(data) == ann.crc32
        assert rec.uid.encode() in data and data.startswith(b"<?xml")
        check_xml(data, ann.name)
    assert all("AnnotationsFlag" not in r.row for r in without)


def test_get_dcm_image_sends_dicom_md5_then_annotations(annotated_server: ServerHandle, archive: Archive) -> None:
    rec = archive.get(annotated(archive)[0])
    url = annotated_server.url("getDCMImage", "v1") + f"?SeriesInstanceUID={rec.uid}"
    with urlopen(url + "&IncludeAnnotation=TRUE&MD5Verification=true") as resp:
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert resp.headers["Content-Disposition"] == f'attachment; filename="{rec.uid}.zip"'
        assert resp.headers.get("Content-Length") is None
        body = resp.read()
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        names = zf.namelist()
        assert names[:-2] == entry_names(len(rec.instances), True)      # TCIA-style names, no LICENSE
        assert names[-2:] == ["md5hashes.csv", rec.annotations[0].name]
        assert zf.read(names[-1]) == rec.annotations[0].path.read_bytes()
        assert zf.read("md5hashes.csv").decode().splitlines()[0] == "Filename,MD5Hash"
    with urlopen(url) as resp:                                   # without IncludeAnnotation: DICOM only
        with zipfile.ZipFile(io.BytesIO(resp.read())) as zf:
            assert all(n.endswith(".dcm") for n in zf.namelist())
    with pytest.raises(HTTPError) as info:
        urlopen(annotated_server.url("getDCMImage", "v1") + "?SeriesInstanceUID=1.2.3")
    assert info.value.code == 400 and b"not in public domain" in info.value.read()
    assert annotated_server.stats.requests["getDCMImage"] == 3


# ---------------------------------------------------------------- harvests

def test_cart_with_include_annotation_gets_the_xml_beside_the_dicom(annotated_server: ServerHandle,
                                                                    archive: Archive, tmp_path: Path) -> None:
    uids = sorted(r.uid for r in archive.records())
    out = tmp_path / "out"
    result = run_cart(annotated_server, out, cart(tmp_path / "c.tcia", uids, "true"))
    assert result.ok, result.failed
    recs = {r["SeriesInstanceUID"]: r for r in manifest(out)["series"]}
    for uid in uids:
        rec, series = recs[uid], archive.get(uid)
        assert rec["status"] == "complete" and len(rec["files"]) == len(series.instances)
        folder = out / rec["path"]
        if series.annotations:
            ann = series.annotations[0]
            data = ann.path.read_bytes()
            assert rec["annotations"] == [{"path": f"{rec['path']}/{ann.name}", "size": len(data),
                                           "md5": hashlib.md5(data).hexdigest()}]
            assert (folder / ann.name).read_bytes() == data                 # beside the DICOM files
            assert sorted(p.name for p in folder.iterdir()) == sorted(
                [Path(f["path"]).name for f in rec["files"]] + [ann.name])
        else:
            assert "annotations" not in rec
            assert not list(folder.glob("*.xml"))
    # only the series that have annotations are asked for them
    assert annotated_server.stats.requests["getDCMImage"] == len(annotated(archive))
    assert manifest(out)["query"]["annotations"] is True

    # a rerun finds them in place and fetches nothing
    again = run_cart(annotated_server, out, cart(tmp_path / "c.tcia", uids, "true"))
    assert again.ok and again.downloaded == 0
    assert annotated_server.stats.requests["getDCMImage"] == len(annotated(archive))


def test_cart_with_include_annotation_false_gets_none(annotated_server: ServerHandle, archive: Archive,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cart(annotated_server, out, cart(tmp_path / "c.tcia", annotated(archive), "false"))
    assert result.ok
    assert annotated_server.stats.requests.get("getDCMImage", 0) == 0
    assert not [f for f in all_files(out) if f.endswith(".xml")]
    assert all("annotations" not in r for r in manifest(out)["series"])


def test_cli_run_of_a_cart_with_annotations(annotated_server: ServerHandle, archive: Archive,
                                            tmp_path: Path) -> None:
    # The command a user types with a portal cart, tcia2026 layout included.
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "harvester", "run", str(cart(tmp_path / "c.tcia", annotated(archive),
                                                                             "TRUE")),
                           "-o", str(out), "--api-url", annotated_server.base_url, "--layout", "tcia2026",
                           "--timeout", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    recs = manifest(out)["series"]
    assert len(recs) == len(annotated(archive))
    for r in recs:
        assert r["path"] == f"{r['Collection']}/{r['PatientID']}/{r['StudyInstanceUID']}/{r['SeriesInstanceUID']}"
        assert (out / r["annotations"][0]["path"]).read_bytes() == archive.get(
            r["SeriesInstanceUID"]).annotations[0].path.read_bytes()
    assert (out / "metadata" / "metadata.csv").read_bytes().count(b"\r\n") == len(recs) + 1
    assert not (out / "metadata.csv").exists()


def test_manifest_annotations_true(annotated_server: ServerHandle, archive: Archive, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = harvest(annotated_server.base_url, out, {"select": [{"collection": "SYN-LUNG-CT"}],
                                                      "annotations": True})
    assert result.ok
    recs = manifest(out)["series"]
    assert recs and all(len(r["annotations"]) == 1 for r in recs)
    for r in recs:
        assert (out / r["annotations"][0]["path"]).is_file()


def test_sync_of_a_cart_with_annotations(annotated_server: ServerHandle, archive: Archive, tmp_path: Path) -> None:
    from harvester.api import sync

    out = tmp_path / "out"
    result = sync(cart(tmp_path / "c.tcia", annotated(archive), "true"), out,
                  config=test_config(annotated_server.base_url, out))
    assert result.harvest is not None and result.harvest.ok
    recs = manifest(out)["series"]
    assert len(recs) == len(annotated(archive)) and all(len(r["annotations"]) == 1 for r in recs)
    assert annotated_server.stats.requests["getDCMImage"] == len(recs)


def test_a_lost_annotation_file_is_fetched_again(annotated_server: ServerHandle, archive: Archive,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    query = {"select": [{"collection": "SYN-LUNG-CT"}], "annotations": True}
    assert harvest(annotated_server.base_url, out, query).ok
    victim = manifest(out)["series"][0]
    (out / victim["annotations"][0]["path"]).unlink()
    result = harvest(annotated_server.base_url, out, query)
    assert result.ok and result.downloaded == 1
    assert (out / victim["annotations"][0]["path"]).is_file()


def test_hostile_annotation_name_is_refused(archive: Archive, tmp_path: Path) -> None:
    # A server that names an annotation "../x.xml": that series fails for good, nothing is
    # written outside its folder, the others are harvested.
    victim_uid = annotated(archive)[0]
    victim = archive.get(victim_uid)
    bad = dataclasses.replace(victim.annotations[0], name="../x.xml")
    hostile = Archive([dataclasses.replace(r, annotations=(bad,)) if r.uid == victim_uid else r
                       for r in archive.records()])
    out = tmp_path / "deep" / "out"
    with serve_in_thread(hostile) as server:
        result = harvest(server.base_url, out, {"select": [{"collection": "SYN-LUNG-CT"}], "annotations": True})
    assert not result.ok
    assert [uid for uid, _ in result.failed] == [victim_uid]
    assert "unsafe" in result.failed[0][1] or "climbs out" in result.failed[0][1]
    assert not any(p.name == "x.xml" for p in tmp_path.rglob("*"))
    recs = {r["SeriesInstanceUID"]: r for r in manifest(out)["series"]}
    assert recs[victim_uid]["status"] == "failed"
    assert sum(r["status"] == "complete" for r in recs.values()) == len(annotated(archive)) - 1


# ---------------------------------------------------------------- unit: harvester.annotations

def make_zip(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


GOOD = annotation_xml("1.2.3", "1.2", 1)


def unpack_annotations(zip_path: Path, staging: Path, *, series_uid: str, taken: list[str] | tuple[()] = (),
                       limits: Limits | None = None) -> list:
    """The ZIP at ``zip_path`` through the store's annotation sink, in chunks of 4 KiB as from
    the socket (its blocking face)."""
    sink = AnnotationZipSink(staging, series_uid=series_uid, taken=list(taken), file_size=None,
                             limits=limits or Limits())
    data = zip_path.read_bytes()
    for at in range(0, len(data), 4096):
        sink.write(data[at:at + 4096])
    return sink.finish()


def test_unpack_keeps_only_the_xml_entries(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    z = make_zip(tmp_path / "a.zip", [("1-1.dcm", b"DICM"), ("md5hashes.csv", b"Filename,MD5Hash\n"),
                                      ("069.xml", GOOD), ("070.XML", GOOD)])
    found = unpack_annotations(z, staging, series_uid="1.2.3", taken=["1-1.dcm"])
    assert [(a.name, a.size, a.md5) for a in found] == [
        ("069.xml", len(GOOD), hashlib.md5(GOOD).hexdigest()), ("070.XML", len(GOOD), hashlib.md5(GOOD).hexdigest())]
    assert sorted(p.name for p in staging.iterdir()) == ["069.xml", "070.XML"]


@pytest.mark.parametrize("name", ["../x.xml", "/etc/x.xml", "sub/069.xml", "a\\b.xml", "C:x.xml", "con.xml",
                                  " 069.xml", "bad:name.xml", "nul.xml"])
def test_unsafe_annotation_names_are_refused(tmp_path: Path, name: str) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    z = make_zip(tmp_path / "a.zip", [(name, GOOD)])
    with pytest.raises(UnsafeArchiveError):
        unpack_annotations(z, staging, series_uid="1.2.3")
    assert not any(p.name.endswith((".xml", ".xml ")) for p in tmp_path.rglob("*") if p.is_file() and p != z)


@pytest.mark.parametrize("entries", [
    [("069.xml", GOOD), ("069.XML", GOOD)],          # one file on macOS and Windows
    [("1-1.xml", GOOD)],                             # clashes with a DICOM file name given as taken
])
def test_repeated_annotation_names_are_refused(tmp_path: Path, entries: list) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(UnsafeArchiveError):
        unpack_annotations(make_zip(tmp_path / "a.zip", entries), staging, series_uid="1.2.3", taken=["1-1.XML"])


def test_oversized_annotation_is_refused_even_when_its_header_lies(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    big = b"<a>" + b" " * MAX_ANNOTATION_BYTES + b"</a>"
    z = make_zip(tmp_path / "a.zip", [("069.xml", big)])
    with pytest.raises(UnsafeArchiveError):
        unpack_annotations(z, staging, series_uid="1.2.3")
    # the same entry with a local and central header claiming 10 bytes
    raw = bytearray(z.read_bytes())
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = raw.find(sig)
        raw[at + offset:at + offset + 4] = (10).to_bytes(4, "little")
    z.write_bytes(bytes(raw))
    with pytest.raises((UnsafeArchiveError, IntegrityError)):
        unpack_annotations(z, staging, series_uid="1.2.3")
    assert not list(staging.iterdir())


@pytest.mark.parametrize("data", [
    b"<a><b></a>", b"", b"not xml", GOOD[:-20],
    b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xx">]><a>&x;</a>',
    b'<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]><lolz>&lol2;</lolz>',
    b'<?xml version="1.0"?><!DOCTYPE a SYSTEM "http://example.org/x.dtd"><a/>',
])
def test_annotation_must_be_well_formed_xml_without_a_dtd(tmp_path: Path, data: bytes) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(IntegrityError):
        unpack_annotations(make_zip(tmp_path / "a.zip", [("069.xml", data)]), staging, series_uid="1.2.3")


def test_a_corrupt_annotation_entry_fails_its_crc(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("069.xml", GOOD)
    raw = bytearray(z.read_bytes())
    at = raw.find(b"LidcReadMessage")
    raw[at] ^= 0x20                                      # still well-formed XML? no matter: the CRC fails
    z.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        unpack_annotations(z, staging, series_uid="1.2.3")


def test_a_refused_annotation_takes_the_ones_written_before_it_along(tmp_path: Path) -> None:
    """A sink that raised has removed the annotation files it wrote: the next attempt (or the
    caller) finds no file of the failed one (it would refuse to write over it)."""
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "1-1.dcm").write_bytes(b"DICM")         # the series' verified file stays
    z = make_zip(tmp_path / "a.zip", [("069.xml", GOOD), ("070.xml", b"<a><b></a>")])
    with pytest.raises(IntegrityError):
        unpack_annotations(z, staging, series_uid="1.2.3", taken=["1-1.dcm"])
    assert [p.name for p in staging.iterdir()] == ["1-1.dcm"]
    assert [a.name for a in unpack_annotations(make_zip(tmp_path / "b.zip", [("069.xml", GOOD)]), staging,
                                               series_uid="1.2.3", taken=["1-1.dcm"])] == ["069.xml"]


def test_an_attempt_given_up_midway_leaves_no_annotation_file(tmp_path: Path) -> None:
    """A network error after the first annotation arrived: the caller discards the sink (as
    stream_series_zip does before its next attempt), and what it wrote goes with it."""
    staging = tmp_path / "staging"
    staging.mkdir()
    data = make_zip(tmp_path / "a.zip", [("069.xml", GOOD), ("070.xml", GOOD)]).read_bytes()

    async def attempt() -> None:
        sink = AnnotationZipSink(staging, series_uid="1.2.3", taken=[], file_size=None, limits=Limits(),
                                 batch_bytes=1)
        await sink.feed(data[:data.index(b"PK\x03\x04", 4) + 50])   # 069.xml whole, then into 070.xml
        assert [p.name for p in staging.iterdir()] == ["069.xml"]
        sink.discard()

    anyio.run(attempt)
    assert not list(staging.iterdir())


def test_the_series_entries_of_the_annotated_zip_are_bounded_too(tmp_path: Path) -> None:
    """The DICOM entries are read through, not kept, but a zip bomb among them is refused, not
    inflated to its end."""
    staging = tmp_path / "staging"
    staging.mkdir()
    z = make_zip(tmp_path / "a.zip", [("1-1.dcm", bytes(50_000)), ("069.xml", GOOD)])
    with pytest.raises(UnsafeArchiveError, match="zip bomb"):
        unpack_annotations(z, staging, series_uid="1.2.3", limits=Limits(max_entry_bytes=10_000))
    assert not list(staging.iterdir())


def test_not_a_zip_is_an_integrity_error(tmp_path: Path) -> None:
    (tmp_path / "a.zip").write_bytes(b"<html>outage</html>")
    with pytest.raises(IntegrityError):
        unpack_annotations(tmp_path / "a.zip", tmp_path, series_uid="1.2.3")


@pytest.mark.parametrize("flag,expected", [(True, True), (False, False), ("Yes", True), ("yes", True),
                                           ("true", True), ("1", True), ("No", False), ("", False),
                                           (None, False), ("maybe", False)])
def test_annotations_flag(flag: object, expected: bool) -> None:
    row = {} if flag is None else {"AnnotationsFlag": flag}
    assert has_annotations(row) is expected


# ---------------------------------------------------------------- unit: the query side

@pytest.mark.parametrize("header,expected", [
    ("includeAnnotation=true\n", True), ("includeAnnotation=TRUE\r\n", True), ("includeAnnotation = true \n", True),
    ("includeAnnotation=false\n", False), ("includeAnnotation=yes\n", False), ("", False),
])
def test_tcia_include_annotation(header: str, expected: bool) -> None:
    text = f"downloadServerUrl=x\n{header}ListOfSeriesToDownload=\n1.2.3\n"
    assert tcia_includes_annotations(text) is expected
    assert tcia_includes_annotations("\ufeffincludeAnnotation=true\r\nListOfSeriesToDownload=\r\n1.2.3\r\n")
    # a line after the UID list never counts
    assert tcia_includes_annotations("ListOfSeriesToDownload=\n1.2.3\nincludeAnnotation=true\n") is False


@pytest.mark.parametrize("name,expected", [("TCIA_Notebooks__CPTAC-HNSCC-demo.tcia", True),
                                           ("derived__ACNS0332-Test-CRLF.tcia", True),
                                           ("pangyuteng__retry-2022-12-25-manifest.tcia", False)])
def test_real_carts(name: str, expected: bool) -> None:
    # real portal carts (copies of the shared real-NBIA fixtures), CRLF included
    query = load_query(Path(__file__).parent / "data" / "real-nbia" / "manifests" / name)
    assert query.annotations is expected and query.selectors[0].series


def test_manifest_annotations_key() -> None:
    q = query_from_dict({"select": [{"collection": "A"}], "annotations": True})
    assert q.annotations is True and q.to_json()["annotations"] is True
    assert query_from_dict({"select": [{"collection": "A"}]}).annotations is False
    for bad in ("yes", 1, None, [True]):
        with pytest.raises(ManifestError, match="annotations"):
            query_from_dict({"select": [{"collection": "A"}], "annotations": bad})

