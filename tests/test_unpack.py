"""harvester.unpack: series ZIPs built here from real DICOM files (pydicom's CT_small.dcm and
re-saved copies of it) are verified and unpacked, or rejected with the error that says what to
do next; hostile ZIPs write nothing at all."""
from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import warnings
import zipfile
from pathlib import Path

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from harvester.config import Limits
from harvester.errors import (
    IncompleteSeriesError,
    IntegrityError,
    PermanentSeriesError,
    SeriesError,
    UnsafeArchiveError,
    should_retry_series,
)
from harvester.unpack import (
    LICENSE_NAME,
    MD5_NAME,
    Repair,
    UnpackedSeries,
    VerifiedFile,
    check_entry_name,
    parse_md5_csv,
    read_dicom_ids,
    verify_and_unpack,
)

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
CT_BYTES = CT_SMALL.read_bytes()
_ORIGINAL = pydicom.dcmread(CT_SMALL)
SERIES_UID = str(_ORIGINAL.SeriesInstanceUID)
CT_SOP = str(_ORIGINAL.SOPInstanceUID)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
OTHER_SERIES_UID = "1.2.826.0.1.3680043.8.498.99"
LICENSE_TEXT = "Creative Commons Attribution 4.0 International License\n"


def resaved(sop_uid: str, series_uid: str | None = None) -> bytes:
    """CT_small.dcm re-saved with another SOPInstanceUID (and optionally another series)."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    if series_uid is not None:
        ds.SeriesInstanceUID = series_uid
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


SOPS = [CT_SOP, "1.2.826.0.1.3680043.8.498.1001", "1.2.826.0.1.3680043.8.498.1002"]
INSTANCES = {
    "1-1.dcm": CT_BYTES,
    "1-2.dcm": resaved(SOPS[1]),
    "1-3.dcm": resaved(SOPS[2]),
}
SERIES_BYTES = sum(len(b) for b in INSTANCES.values())


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def build_zip(path: Path, entries: dict[str, bytes] | list[tuple[str | zipfile.ZipInfo, bytes]], *,
              license: bool = True, md5_rows: dict[str, str] | None = None, with_md5: bool = True,
              compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A ZIP as NBIA sends it: LICENSE first, the DICOM entries, md5hashes.csv last."""
    items = list(entries.items()) if isinstance(entries, dict) else list(entries)
    if md5_rows is None:
        md5_rows = {}
        for name, data in items:
            base = (name.filename if isinstance(name, zipfile.ZipInfo) else name).replace("\\", "/").split("/")[-1]
            md5_rows[base] = md5(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # zipfile warns about duplicate names on purpose here
        with zipfile.ZipFile(path, "w", compression) as zf:
            if license:
                zf.writestr(LICENSE_NAME, LICENSE_TEXT)
            for name, data in items:
                zf.writestr(name, data)
            if with_md5:
                zf.writestr(MD5_NAME, "Filename,MD5Hash\n" + "".join(f"{n},{d}\n" for n, d in md5_rows.items()))
    return path


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its content (None for folders), to prove nothing else was written."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            full = os.path.join(dirpath, f)
            out[os.path.relpath(full, root)] = None if os.path.islink(full) else Path(full).read_bytes()
    return out


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path


def unpack(zip_path: Path, staging: Path, *, image_count: int | None = len(INSTANCES),
           file_size: int | None = SERIES_BYTES, limits: Limits = Limits(), max_repairs: int = 0,
           series_uid: str = SERIES_UID) -> UnpackedSeries:
    return verify_and_unpack(zip_path, staging, series_uid=series_uid, image_count=image_count,
                             file_size=file_size, limits=limits, max_repairs=max_repairs)


def staging_of(work: Path) -> Path:
    return work / "out" / ".harvester" / "tmp" / "abc.staging"


# ---------------------------------------------------------------- a good series

def test_copies_are_one_series_of_distinct_instances() -> None:
    ids = set()
    for data in INSTANCES.values():
        ds = pydicom.dcmread(io.BytesIO(data))
        assert str(ds.SeriesInstanceUID) == SERIES_UID
        ids.add(str(ds.SOPInstanceUID))
    assert ids == set(SOPS)


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_good_series_unpacks_byte_identically(work: Path, compression: int) -> None:
    zip_path = build_zip(work / "s.zip.partial", INSTANCES, compression=compression)
    staging = staging_of(work)
    result = unpack(zip_path, staging)
    assert result.license_text == LICENSE_TEXT
    assert result.repairs == []
    assert sorted(p.name for p in staging.iterdir()) == sorted(INSTANCES)     # no LICENSE, no md5hashes.csv
    for name, data in INSTANCES.items():
        assert (staging / name).read_bytes() == data
    by_name = {f.name: f for f in result.files}
    assert [f.name for f in result.files] == list(INSTANCES)
    for name, sop in zip(INSTANCES, SOPS):
        assert by_name[name] == VerifiedFile(name=name, size=len(INSTANCES[name]), md5=md5(INSTANCES[name]),
                                             sop_uid=sop, sop_class_uid=CT_IMAGE_STORAGE)


def test_nbia_default_names_md5_in_any_order_upper_case_and_no_license(work: Path) -> None:
    entries = {f"{i:08d}.dcm": data for i, data in enumerate(INSTANCES.values(), start=1)}
    rows = {name: md5(data).upper() for name, data in reversed(list(entries.items()))}
    zip_path = build_zip(work / "s.zip", entries, license=False, md5_rows=rows)
    result = unpack(zip_path, staging_of(work))
    assert result.license_text is None
    assert sorted(f.name for f in result.files) == ["00000001.dcm", "00000002.dcm", "00000003.dcm"]
    assert all(f.md5 == md5(entries[f.name]) for f in result.files)


def test_unknown_counts_are_not_checked(work: Path) -> None:
    zip_path = build_zip(work / "s.zip", INSTANCES)
    result = unpack(zip_path, staging_of(work), image_count=None, file_size=None)
    assert len(result.files) == 3


def test_directory_entries_are_ignored_and_subfolders_flattened(work: Path) -> None:
    entries: list[tuple[str | zipfile.ZipInfo, bytes]] = [("series/", b"")]
    entries += [(f"series/{name}", data) for name, data in INSTANCES.items()]
    zip_path = build_zip(work / "s.zip", entries)
    staging = staging_of(work)
    unpack(zip_path, staging)
    assert sorted(p.name for p in staging.iterdir()) == sorted(INSTANCES)


# ---------------------------------------------------------------- truncated series

def test_fewer_entries_than_image_count(work: Path) -> None:
    two = dict(list(INSTANCES.items())[:2])
    zip_path = build_zip(work / "s.zip", two)
    with pytest.raises(IncompleteSeriesError) as info:
        unpack(zip_path, staging_of(work), file_size=None)
    assert "2 of 3" in str(info.value)
    assert info.value.series_uid == SERIES_UID
    assert should_retry_series(info.value)
    assert not staging_of(work).exists()


def test_fewer_bytes_than_file_size(work: Path) -> None:
    zip_path = build_zip(work / "s.zip", INSTANCES)
    with pytest.raises(IncompleteSeriesError) as info:
        unpack(zip_path, staging_of(work), file_size=SERIES_BYTES + 1)
    assert f"{SERIES_BYTES} of {SERIES_BYTES + 1}" in str(info.value)
    assert not staging_of(work).exists()


def test_truncated_instance_with_right_count(work: Path) -> None:
    entries = dict(INSTANCES, **{"1-3.dcm": INSTANCES["1-3.dcm"][:-100]})
    zip_path = build_zip(work / "s.zip", entries)
    with pytest.raises(IncompleteSeriesError):
        unpack(zip_path, staging_of(work))


def test_more_entries_than_announced(work: Path) -> None:
    """More files than announced is not a truncated series (issue 14): it is another answer."""
    zip_path = build_zip(work / "s.zip", INSTANCES)
    with pytest.raises(IntegrityError, match="more than the 2 the archive announced: not the announced series") as err:
        unpack(zip_path, staging_of(work), image_count=2, file_size=None)
    assert not isinstance(err.value, IncompleteSeriesError) and "truncated" not in err.value.one_line()


# ---------------------------------------------------------------- MD5, DICOM and series checks

def corrupt_pixels(data: bytes) -> bytes:
    """Flip the last byte: in the pixel data, so the header still parses."""
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def test_md5_mismatch(work: Path) -> None:
    rows = {name: md5(data) for name, data in INSTANCES.items()}
    entries = dict(INSTANCES, **{"1-2.dcm": corrupt_pixels(INSTANCES["1-2.dcm"])})
    zip_path = build_zip(work / "s.zip", entries, md5_rows=rows)
    with pytest.raises(IntegrityError) as info:
        unpack(zip_path, staging_of(work))
    assert "1-2.dcm" in str(info.value) and "MD5" in str(info.value)
    assert info.value.series_uid == SERIES_UID


def test_md5_mismatch_is_returned_as_a_repair_when_the_header_parses(work: Path) -> None:
    rows = {name: md5(data) for name, data in INSTANCES.items()}
    entries = dict(INSTANCES, **{"1-2.dcm": corrupt_pixels(INSTANCES["1-2.dcm"])})
    zip_path = build_zip(work / "s.zip", entries, md5_rows=rows)
    result = unpack(zip_path, staging_of(work), max_repairs=1)
    assert result.repairs == [Repair(name="1-2.dcm", sop_uid=SOPS[1], md5=md5(INSTANCES["1-2.dcm"]))]
    (entry,) = [f for f in result.files if f.name == "1-2.dcm"]
    assert entry.md5 == md5(INSTANCES["1-2.dcm"])        # the expected MD5, for the refetch to meet
    assert len(result.files) == 3


def test_more_mismatches_than_max_repairs(work: Path) -> None:
    rows = {name: md5(data) for name, data in INSTANCES.items()}
    entries = {name: corrupt_pixels(data) for name, data in INSTANCES.items()}
    zip_path = build_zip(work / "s.zip", entries, md5_rows=rows)
    with pytest.raises(IntegrityError):
        unpack(zip_path, staging_of(work), max_repairs=2)


def test_md5_mismatch_with_a_broken_header_cannot_be_repaired(work: Path) -> None:
    rows = {name: md5(data) for name, data in INSTANCES.items()}
    broken = INSTANCES["1-2.dcm"].replace(b"DICM", b"XXXX", 1)
    zip_path = build_zip(work / "s.zip", dict(INSTANCES, **{"1-2.dcm": broken}), md5_rows=rows)
    with pytest.raises(IntegrityError):
        unpack(zip_path, staging_of(work), max_repairs=3)


def test_md5_mismatch_of_another_series_cannot_be_repaired(work: Path) -> None:
    rows = {name: md5(data) for name, data in INSTANCES.items()}
    foreign = resaved(SOPS[1], OTHER_SERIES_UID)
    zip_path = build_zip(work / "s.zip", dict(INSTANCES, **{"1-2.dcm": foreign}), md5_rows=rows)
    with pytest.raises(IntegrityError):
        unpack(zip_path, staging_of(work), max_repairs=3, file_size=None)


def test_missing_md5hashes_csv(work: Path) -> None:
    zip_path = build_zip(work / "s.zip", INSTANCES, with_md5=False)
    with pytest.raises(IntegrityError) as info:
        unpack(zip_path, staging_of(work))
    assert MD5_NAME in str(info.value)


def test_file_missing_from_md5hashes_csv(work: Path) -> None:
    rows = {name: md5(data) for name, data in INSTANCES.items() if name != "1-3.dcm"}
    zip_path = build_zip(work / "s.zip", INSTANCES, md5_rows=rows)
    with pytest.raises(IntegrityError) as info:
        unpack(zip_path, staging_of(work))
    assert "1-3.dcm" in str(info.value)


def test_unreadable_md5hashes_csv(work: Path) -> None:
    with zipfile.ZipFile(work / "s.zip", "w") as zf:
        for name, data in INSTANCES.items():
            zf.writestr(name, data)
        zf.writestr(MD5_NAME, b"Filename,MD5Hash\n\xff\xfe\xfa,zz\n")
    with pytest.raises(IntegrityError):
        unpack(work / "s.zip", staging_of(work))


def test_parse_md5_csv() -> None:
    text = "\ufeffFilename,MD5Hash\r\n1-1.dcm, ABCDEF \r\n,x\r\n1-2.dcm,\r\n\r\n1-3.dcm,0123\r\n"
    # an empty MD5 is kept as "" (the archive has none recorded): listed, verified without MD5
    assert parse_md5_csv(text.encode("utf-8")) == {"1-1.dcm": "abcdef", "1-2.dcm": "", "1-3.dcm": "0123"}
    assert parse_md5_csv(b"") == {}


@pytest.mark.parametrize("content", [
    b"<html>Service Unavailable</html>" * 100,
    b"",
    b"\x00" * 128 + b"DICM",                   # a preamble and nothing else: no series, no instance
    CT_BYTES[:140],
    CT_BYTES.replace(b"\x08\x00\x18\x00UI", b"\x08\x00\x18\x00ZZ", 1),
])
def test_non_dicom_entry(work: Path, content: bytes) -> None:
    entries = dict(INSTANCES, **{"1-3.dcm": content})
    zip_path = build_zip(work / "s.zip", entries)
    with pytest.raises(IntegrityError) as info:
        unpack(zip_path, staging_of(work), file_size=None)
    assert "1-3.dcm" in str(info.value)


def test_dicom_of_another_series(work: Path) -> None:
    foreign = resaved("1.2.826.0.1.3680043.8.498.1003", OTHER_SERIES_UID)
    entries = dict(INSTANCES, **{"1-3.dcm": foreign})
    zip_path = build_zip(work / "s.zip", entries)
    with pytest.raises(IntegrityError) as info:
        unpack(zip_path, staging_of(work), file_size=None)
    assert OTHER_SERIES_UID in str(info.value)


def test_repeated_instance(work: Path) -> None:
    entries = dict(INSTANCES, **{"1-3.dcm": INSTANCES["1-1.dcm"]})
    zip_path = build_zip(work / "s.zip", entries)
    with pytest.raises(IntegrityError) as info:
        unpack(zip_path, staging_of(work), file_size=None)
    assert CT_SOP in str(info.value)


# ---------------------------------------------------------------- not a ZIP, corrupt ZIP

@pytest.mark.parametrize("content", [
    b"",
    b"<html><body>503 Service Unavailable</body></html>",
    b"PK\x03\x04" + b"\x00" * 100,
    CT_BYTES,
])
def test_not_a_zip(work: Path, content: bytes) -> None:
    path = work / "s.zip"
    path.write_bytes(content)
    with pytest.raises(IntegrityError) as info:
        unpack(path, staging_of(work))
    assert info.value.series_uid == SERIES_UID


def test_zip_cut_short(work: Path) -> None:
    data = build_zip(work / "s.zip", INSTANCES).read_bytes()
    (work / "s.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError):
        unpack(work / "s.zip", staging_of(work))


def entry_data_offset(data: bytes, name: str) -> int:
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(name)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize("where", [0.1, 0.5, 0.95])
def test_corrupt_entry_bytes(work: Path, compression: int, where: float) -> None:
    """A flipped byte inside an entry: a bad CRC (stored) or a broken deflate stream."""
    path = build_zip(work / "s.zip", INSTANCES, compression=compression)
    data = bytearray(path.read_bytes())
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("1-2.dcm")
    offset = entry_data_offset(bytes(data), "1-2.dcm") + int(info.compress_size * where)
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        unpack(path, staging_of(work))


def test_broken_deflate_stream(work: Path) -> None:
    """zlib itself fails (not only the CRC): the first block header names the reserved block type 3."""
    path = build_zip(work / "s.zip", INSTANCES, compression=zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    data[entry_data_offset(bytes(data), "1-2.dcm")] = 0b111        # BFINAL=1, BTYPE=11
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as info:
        unpack(path, staging_of(work))
    assert "1-2.dcm" in str(info.value)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_bad_crc(work: Path, compression: int) -> None:
    path = build_zip(work / "s.zip", INSTANCES, compression=compression)
    data = bytearray(path.read_bytes())
    data[entry_data_offset(bytes(data), "1-1.dcm") + 2000] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as info:
        unpack(path, staging_of(work))
    assert "1-1.dcm" in str(info.value)


def patch_entry_header(data: bytes, name: str, *, flag_bits: int | None = None, method: int | None = None) -> bytes:
    """Set the general-purpose flags or compression method of ``name`` in both of its headers."""
    out = bytearray(data)
    zf = zipfile.ZipFile(io.BytesIO(data))
    local = zf.getinfo(name).header_offset
    central = zf.start_dir
    while True:      # walk the central directory: signature, fixed 46 bytes, name, extra, comment
        assert data[central: central + 4] == b"PK\x01\x02"
        n, m, k = struct.unpack("<HHH", data[central + 28: central + 34])
        if data[central + 46: central + 46 + n] == name.encode():
            break
        central += 46 + n + m + k
    if flag_bits is not None:
        out[local + 6: local + 8] = struct.pack("<H", flag_bits)
        out[central + 8: central + 10] = struct.pack("<H", flag_bits)
    if method is not None:
        out[local + 8: local + 10] = struct.pack("<H", method)
        out[central + 10: central + 12] = struct.pack("<H", method)
    return bytes(out)


def test_central_header_asking_for_an_unknown_zip_version(work: Path) -> None:
    """Found by the ZIP fuzz: zipfile refuses a "version needed" above 6.3 with NotImplementedError."""
    path = build_zip(work / "s.zip", INSTANCES)
    data = bytearray(path.read_bytes())
    central = zipfile.ZipFile(io.BytesIO(bytes(data))).start_dir
    data[central + 6: central + 8] = struct.pack("<H", 75)
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="not a readable ZIP"):
        unpack(path, staging_of(work))
    assert not staging_of(work).exists()


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize("method", [6, 12, 14, 97])       # implode, bzip2 (over other bytes), lzma, wavpack
def test_unsupported_or_mislabelled_compression(work: Path, method: int, compression: int) -> None:
    path = build_zip(work / "s.zip", INSTANCES, compression=compression)
    path.write_bytes(patch_entry_header(path.read_bytes(), "1-2.dcm", method=method))
    with pytest.raises(SeriesError) as info:       # IntegrityError, or a plain SeriesError for bzip2's OSError
        unpack(path, staging_of(work))
    assert should_retry_series(info.value)


# ---------------------------------------------------------------- DICOM headers that are not quite DICOM

def test_read_dicom_ids_of_a_real_file() -> None:
    assert read_dicom_ids(CT_SMALL) == (SERIES_UID, CT_SOP, CT_IMAGE_STORAGE)


@pytest.mark.parametrize("data", [
    b"",
    b"\x00" * 128,
    CT_BYTES.replace(b"\x08\x00\x18\x00UI", b"\x08\x00\x18\x00ZZ", 1),     # an unknown VR
    CT_BYTES.replace(b"\x08\x00\x16\x00UI", b"\x08\x00\x16\x00\x55\xa0", 1),
])
def test_read_dicom_ids_of_broken_files(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    with pytest.raises(IntegrityError):
        read_dicom_ids(path)


@settings(max_examples=200, deadline=None)
@given(st.integers(132, 1400), st.lists(st.tuples(st.integers(132, 1399), st.integers(0, 255)), max_size=6),
       st.binary(max_size=64))
def test_read_dicom_ids_never_raises_anything_but_integrity_error(tmp_path_factory: pytest.TempPathFactory,
                                                                   cut: int, flips: list, tail: bytes) -> None:
    data = bytearray(CT_BYTES[:cut] + tail)
    for where, value in flips:
        if where < len(data):
            data[where] = value
    path = tmp_path_factory.mktemp("dcm") / "x.dcm"
    path.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = read_dicom_ids(path)
        except IntegrityError:
            return
    assert isinstance(result, tuple) and all(isinstance(v, str) for v in result)


# ---------------------------------------------------------------- hostile archives: nothing written

def assert_rejected_without_writing(work: Path, zip_path: Path, *, file_size: int | None = SERIES_BYTES,
                                    limits: Limits = Limits(), image_count: int | None = len(INSTANCES)) -> str:
    before = tree(work)
    staging = staging_of(work)
    with pytest.raises(UnsafeArchiveError) as info:
        unpack(zip_path, staging, file_size=file_size, limits=limits, image_count=image_count)
    assert isinstance(info.value, PermanentSeriesError) and not should_retry_series(info.value)
    assert tree(work) == before            # not a byte, not a folder, anywhere under tmp_path
    assert not staging.exists()
    return str(info.value)


@pytest.mark.parametrize("name", [
    "../evil.dcm",
    "../../evil.dcm",
    "a/../../evil.dcm",
    "..\\evil.dcm",
    "a\\..\\..\\evil.dcm",
    "/abs/evil.dcm",
    "/evil.dcm",
    "C:\\evil.dcm",
    "C:/evil.dcm",
    "C:evil.dcm",
    "\\\\server\\share\\evil.dcm",
    "\\evil.dcm",
    "..",
])
def test_path_traversal_and_absolute_names(work: Path, name: str) -> None:
    entries = list(INSTANCES.items()) + [(name, CT_BYTES)]
    zip_path = build_zip(work / "s.zip", entries)
    assert_rejected_without_writing(work, zip_path, file_size=None, image_count=None)
    assert not (work / "evil.dcm").exists() and not (work / "out" / "evil.dcm").exists()


def test_an_entry_with_an_empty_name_is_refused_not_a_traceback(work: Path) -> None:
    """zipfile's ZipInfo.is_dir() indexes the name: an empty one raised IndexError (found by the
    ZIP fuzz test); it is refused as any unsafe name is."""
    entries = list(INSTANCES.items()) + [(zipfile.ZipInfo(""), CT_BYTES)]
    zip_path = build_zip(work / "s.zip", entries)
    assert_rejected_without_writing(work, zip_path, file_size=None, image_count=None)


@pytest.mark.parametrize("name", ["../evil.dcm", "/abs/evil.dcm", "C:\\evil.dcm", "", "a\x00b", "x/../../y"])
def test_check_entry_name_rejects(name: str) -> None:
    with pytest.raises(UnsafeArchiveError):
        check_entry_name(name)


@pytest.mark.parametrize("name", ["1-001.dcm", "00000001.dcm", "sub/dir/x.dcm", "a..b.dcm", "..x.dcm"])
def test_check_entry_name_accepts(name: str) -> None:
    check_entry_name(name)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("Az09._-/\\:\x00 C"), max_size=12))
def test_check_entry_name_fast_path_agrees_with_the_full_check(name: str) -> None:
    """Plain names skip pathlib: every name gets the verdict of the full POSIX and Windows check."""
    from harvester.unpack import _check_any_entry_name

    def verdict(check: object) -> bool:
        try:
            check(name)  # type: ignore[operator]
        except UnsafeArchiveError:
            return False
        return True

    assert verdict(check_entry_name) == verdict(_check_any_entry_name)


def test_symlink_entry(work: Path) -> None:
    link = zipfile.ZipInfo("1-4.dcm")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    link.create_system = 3
    entries: list[tuple[str | zipfile.ZipInfo, bytes]] = list(INSTANCES.items()) + [(link, b"/etc/passwd")]
    zip_path = build_zip(work / "s.zip", entries)
    message = assert_rejected_without_writing(work, zip_path, file_size=None, image_count=None)
    assert "link" in message


@pytest.mark.parametrize("names", [
    ["1-1.dcm", "1-1.dcm"],
    ["a/1-1.dcm", "b/1-1.dcm"],
    ["1-1.dcm", "1-1.DCM"],
    ["LICENSE", "sub/LICENSE"],
    [MD5_NAME, "x/" + MD5_NAME],
])
def test_duplicate_names(work: Path, names: list[str]) -> None:
    entries = [(name, data) for name, data in zip(names, [INSTANCES["1-1.dcm"], INSTANCES["1-2.dcm"]])]
    entries.append(("1-3.dcm", INSTANCES["1-3.dcm"]))
    zip_path = build_zip(work / "s.zip", entries)
    message = assert_rejected_without_writing(work, zip_path, file_size=None, image_count=None)
    assert "repeats" in message


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_encrypted_entry(work: Path, compression: int) -> None:
    path = build_zip(work / "s.zip", INSTANCES, compression=compression)
    path.write_bytes(patch_entry_header(path.read_bytes(), "1-2.dcm", flag_bits=0x1))
    message = assert_rejected_without_writing(work, path)
    assert "encrypted" in message


def test_empty_md5_row_is_verified_without_md5_and_said_so(work: Path) -> None:
    rows = {name: md5(data) for name, data in INSTANCES.items()} | {"1-2.dcm": ""}
    result = unpack(build_zip(work / "s.zip", INSTANCES, md5_rows=rows), staging_of(work))
    assert {f.name: f.md5_checked for f in result.files} == {"1-1.dcm": True, "1-2.dcm": False, "1-3.dcm": True}
    assert result.without_md5 == 1
    assert all(f.md5 == md5(INSTANCES[f.name]) for f in result.files)  # what arrived, computed


def test_empty_md5_row_still_checks_the_crc(work: Path) -> None:
    rows = {name: md5(data) for name, data in INSTANCES.items()} | {"1-2.dcm": ""}
    path = build_zip(work / "s.zip", INSTANCES, md5_rows=rows, compression=zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    data[entry_data_offset(bytes(data), "1-2.dcm") + 2000] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="1-2.dcm"):
        unpack(path, staging_of(work))


def test_empty_md5_row_still_checks_the_dicom(work: Path) -> None:
    entries = dict(INSTANCES) | {"1-2.dcm": resaved(SOPS[1], OTHER_SERIES_UID)}
    rows = {name: md5(data) for name, data in entries.items()} | {"1-2.dcm": ""}
    with pytest.raises(IntegrityError, match="belongs to series"):
        unpack(build_zip(work / "s.zip", entries, md5_rows=rows), staging_of(work),
               file_size=sum(map(len, entries.values())))


def _bomb_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(LICENSE_NAME, LICENSE_TEXT)
        for name, data in INSTANCES.items():
            zf.writestr(name, data)
        with zf.open("1-4.dcm", "w") as out:
            block = b"\x00" * (1 << 20)
            for _ in range(50):                   # 50 MB of zeros: ~50 KB deflated
                out.write(block)
        zf.writestr(MD5_NAME, "Filename,MD5Hash\n")
    assert path.stat().st_size < 1 << 20
    return path


def test_zip_bomb_past_the_announced_size(work: Path) -> None:
    # No ratio limit any more (real SEG data deflates at over 800:1): the bomb is caught because
    # it expands past the size the archive announced for the series.
    message = assert_rejected_without_writing(work, _bomb_zip(work / "bomb.zip"), image_count=None)
    assert "announced size" in message


def test_zip_bomb_of_unknown_series_size_meets_the_per_entry_cap(work: Path) -> None:
    message = assert_rejected_without_writing(work, _bomb_zip(work / "bomb.zip"), file_size=None, image_count=None,
                                              limits=Limits(max_entry_bytes=32 << 20))
    assert "limit" in message and "1-4.dcm" in message


def mostly_zero_instance(sop_uid: str, pixel_bytes: int = 12 << 20) -> bytes:
    """CT_small.dcm re-saved with a mask of zeros (one small square set) as its pixel data, like
    a binary segmentation: it deflates at over 800:1."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.Rows, ds.Columns = pixel_bytes // 2 // 512, 512
    mask = bytearray(pixel_bytes)
    mask[4096:4160] = b"\x01" * 64
    ds.PixelData = bytes(mask)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_entries_deflated_at_over_800_to_1_are_real_data(work: Path) -> None:
    # The old ratio limit (200:1) refused these forever; they are within the announced size.
    masks = {"1-1.dcm": mostly_zero_instance(SOPS[1]), "1-2.dcm": mostly_zero_instance(SOPS[2])}
    path = build_zip(work / "seg.zip", masks)
    with zipfile.ZipFile(path) as zf:
        assert all(zf.getinfo(n).file_size > 800 * zf.getinfo(n).compress_size for n in masks)
    result = unpack(path, staging_of(work), image_count=2, file_size=sum(map(len, masks.values())))
    assert {f.name: (staging_of(work) / f.name).read_bytes() for f in result.files} == masks


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_zip_expanding_beyond_the_announced_size(work: Path, compression: int) -> None:
    # Incompressible, so not a bomb by any ratio: the series' byte budget (announced + 10% + 16 MiB) catches it.
    big = os.urandom(17 << 20)
    entries = list(INSTANCES.items()) + [("1-4.dcm", big)]
    path = build_zip(work / "s.zip", entries, compression=compression)
    message = assert_rejected_without_writing(work, path, file_size=SERIES_BYTES)
    assert "announced size" in message


def test_entry_larger_than_the_per_file_limit(work: Path) -> None:
    path = build_zip(work / "s.zip", INSTANCES)
    message = assert_rejected_without_writing(work, path, limits=Limits(max_entry_bytes=len(CT_BYTES) - 1))
    assert "expands to" in message


def test_too_many_entries(work: Path) -> None:
    path = build_zip(work / "s.zip", INSTANCES)
    assert_rejected_without_writing(work, path, limits=Limits(max_entries=4))


def test_hostile_entry_after_good_ones_writes_nothing(work: Path) -> None:
    # The whole archive is checked before the first byte is written.
    entries = list(INSTANCES.items()) + [("../../../evil.dcm", CT_BYTES)]
    path = build_zip(work / "s.zip", entries)
    assert_rejected_without_writing(work, path, file_size=None, image_count=None)


def test_nothing_outside_staging_on_integrity_failure(work: Path) -> None:
    foreign = resaved("1.2.826.0.1.3680043.8.498.1003", OTHER_SERIES_UID)
    path = build_zip(work / "s.zip", dict(INSTANCES, **{"1-3.dcm": foreign}))
    before = tree(work)
    staging = staging_of(work)
    with pytest.raises(IntegrityError):
        unpack(path, staging, file_size=None)
    after = tree(work)
    rel = os.path.relpath(staging, work)
    new = {p for p in after if p not in before}
    assert all(p == rel or p.startswith(rel + os.sep) or rel.startswith(p + os.sep) for p in new), new
