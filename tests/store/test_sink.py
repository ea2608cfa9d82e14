"""harvester.store.sink: series ZIPs (STORED, DEFLATED with data descriptors, ZIP64) fed as a
byte stream are verified and unpacked as they arrive, or refused with the error class
``verify_and_unpack`` gives for the same ZIP; a refused ZIP leaves nothing behind. The ZIPs are
built here from real DICOM files (pydicom's CT_small.dcm and re-saved copies), by zipfile and by
our server's own writer (``harvester.server.zipstream``, the real service's format)."""
from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harvester.config import Limits
from harvester.errors import (
    IncompleteSeriesError,
    IntegrityError,
    PermanentSeriesError,
    SeriesError,
    UnsafeArchiveError,
    should_retry_series,
)
from harvester.server.zipstream import bytes_entry, zip_stream
from harvester.store.sink import InstanceSink, ZipSeriesSink
from harvester.store.zipread import ZipStreamError, ZipStreamReader
from harvester.unpack import LICENSE_NAME, MD5_NAME, Repair, UnpackedSeries, VerifiedFile, verify_and_unpack

from test_unpack import (
    CT_BYTES,
    CT_IMAGE_STORAGE,
    CT_SOP,
    INSTANCES,
    LICENSE_TEXT,
    OTHER_SERIES_UID,
    SERIES_BYTES,
    SERIES_UID,
    SOPS,
    corrupt_pixels,
    md5,
    mostly_zero_instance,
    resaved,
    tree,
)

#: the ZIP forms the sink reads: zipfile's STORED (sizes in the local header), zipfile's DEFLATED
#: written to a pipe (sizes and CRC in a data descriptor, as the real service sends them), and
#: DEFLATED with ZIP64 extra fields in every local header
FORMATS = ["stored", "deflated-descriptor", "zip64"]


class _Pipe(io.RawIOBase):
    """A write-only stream that cannot seek or tell: zipfile then writes data descriptors."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.data += b
        return len(b)


def build_zip(entries: dict[str, bytes] | list[tuple[str | zipfile.ZipInfo, bytes]], fmt: str = "deflated-descriptor",
              *, license: bool = True, md5_rows: dict[str, str] | None = None, with_md5: bool = True) -> bytes:
    """A ZIP as NBIA sends it (LICENSE first, the DICOM entries, md5hashes.csv last) in ``fmt``."""
    items = list(entries.items()) if isinstance(entries, dict) else list(entries)
    if md5_rows is None:
        md5_rows = {}
        for name, data in items:
            base = (name.filename if isinstance(name, zipfile.ZipInfo) else name).replace("\\", "/").split("/")[-1]
            md5_rows[base] = md5(data)
    all_items: list[tuple[str | zipfile.ZipInfo, bytes]] = []
    if license:
        all_items.append((LICENSE_NAME, LICENSE_TEXT.encode()))
    all_items += items
    if with_md5:
        all_items.append((MD5_NAME, ("Filename,MD5Hash\n" + "".join(f"{n},{d}\n" for n, d in md5_rows.items())).encode()))
    pipe = _Pipe()
    seekable = io.BytesIO()
    target = pipe if fmt == "deflated-descriptor" else seekable
    method = zipfile.ZIP_STORED if fmt == "stored" else zipfile.ZIP_DEFLATED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # zipfile warns about duplicate names on purpose here
        with zipfile.ZipFile(target, "w", method) as zf:
            for name, data in all_items:
                info = name if isinstance(name, zipfile.ZipInfo) else zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0))
                info.compress_type = method
                if info.filename.endswith("/"):
                    zf.writestr(info, data)
                    continue
                with zf.open(info, "w", force_zip64=fmt == "zip64") as out:
                    out.write(data)
    data = bytes(pipe.data) if fmt == "deflated-descriptor" else seekable.getvalue()
    if fmt == "deflated-descriptor":
        assert all(i.flag_bits & 0x8 for i in zipfile.ZipFile(io.BytesIO(data)).infolist() if not i.is_dir())
    return data


async def _java(files: list[tuple[str, bytes]], *, fmt: str = "deflated", force_zip64: bool = False) -> bytes:
    return b"".join([piece async for piece in zip_stream([bytes_entry(n, d) for n, d in files],
                                                        zip_format=fmt, force_zip64=force_zip64)])


def java_zip(files: list[tuple[str, bytes]], *, fmt: str = "deflated", force_zip64: bool = False) -> bytes:
    """What ``harvester serve`` sends (``deflated``: the real service's format)."""
    return anyio.run(lambda: _java(files, fmt=fmt, force_zip64=force_zip64))


def nbia_files(instances: dict[str, bytes] = INSTANCES) -> list[tuple[str, bytes]]:
    rows = "Filename,MD5Hash\n" + "".join(f"{n},{md5(d)}\n" for n, d in instances.items())
    return [(LICENSE_NAME, LICENSE_TEXT.encode()), *instances.items(), (MD5_NAME, rows.encode())]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "out" / ".harvester" / "tmp").mkdir(parents=True)
    return tmp_path


def staging_of(work: Path) -> Path:
    return work / "out" / ".harvester" / "tmp" / "abc.staging"


def sink_unpack(data: bytes, staging: Path, *, image_count: int | None = len(INSTANCES),
                file_size: int | None = SERIES_BYTES, limits: Limits = Limits(), max_repairs: int = 0,
                series_uid: str = SERIES_UID, step: int = 4096) -> UnpackedSeries:
    """Feed ``data`` to a sink ``step`` bytes at a time (the blocking face) and close it."""
    sink = ZipSeriesSink(staging, series_uid=series_uid, image_count=image_count, file_size=file_size,
                         limits=limits, max_repairs=max_repairs)
    view = memoryview(data)
    for at in range(0, len(data), step):
        sink.write(view[at:at + step])  # type: ignore[arg-type]
    return sink.finish()


def old_verdict(data: bytes, tmp: Path, **kwargs: object) -> type[BaseException] | None:
    """The error class ``verify_and_unpack`` gives for the same ZIP (None: accepted)."""
    path = tmp / "old.zip"
    path.write_bytes(data)
    kwargs.pop("step", None)
    args = {"image_count": len(INSTANCES), "file_size": SERIES_BYTES, "limits": Limits(), "max_repairs": 0,
            "series_uid": SERIES_UID} | kwargs
    try:
        verify_and_unpack(path, tmp / "old.staging", **args)  # type: ignore[arg-type]
    except SeriesError as exc:
        return type(exc)
    finally:
        path.unlink()
        import shutil
        shutil.rmtree(tmp / "old.staging", ignore_errors=True)
    return None


def refused(work: Path, data: bytes, kind: type[BaseException] = SeriesError, **kwargs: object) -> BaseException:
    """The sink refuses ``data`` with ``kind``, leaves nothing anywhere, and the old unpacker
    refuses the same ZIP with the same class."""
    before = tree(work)
    with pytest.raises(kind) as info:
        sink_unpack(data, staging_of(work), **kwargs)  # type: ignore[arg-type]
    assert tree(work) == before            # not a byte, not a folder left under tmp_path
    assert not staging_of(work).exists()
    old = old_verdict(data, work, **kwargs)
    assert old is not None and issubclass(old, kind) and isinstance(info.value, old), (old, info.value)
    return info.value


# ---------------------------------------------------------------- a good series

@pytest.mark.parametrize("fmt", FORMATS)
def test_good_series_unpacks_byte_identically(work: Path, fmt: str) -> None:
    staging = staging_of(work)
    result = sink_unpack(build_zip(INSTANCES, fmt), staging)
    assert result.license_text == LICENSE_TEXT
    assert result.repairs == []
    assert sorted(p.name for p in staging.iterdir()) == sorted(INSTANCES)     # no LICENSE, no md5hashes.csv
    for name, data in INSTANCES.items():
        assert (staging / name).read_bytes() == data
    assert result.files == [VerifiedFile(name=name, size=len(data), md5=md5(data), sop_uid=sop,
                                         sop_class_uid=CT_IMAGE_STORAGE)
                            for (name, data), sop in zip(INSTANCES.items(), SOPS)]


@pytest.mark.parametrize("fmt,force_zip64", [("deflated", False), ("deflated", True), ("stored", False),
                                             ("stored", True)])
def test_what_our_server_sends_unpacks_like_verify_and_unpack(work: Path, fmt: str, force_zip64: bool) -> None:
    """The real wire format (DEFLATED, data descriptors; ZIP64 end records when forced) and the
    older STORED one: the sink's result is the one ``verify_and_unpack`` gives."""
    data = java_zip(nbia_files(), fmt=fmt, force_zip64=force_zip64)
    result = sink_unpack(data, staging_of(work), step=1000)
    (work / "s.zip").write_bytes(data)
    assert result == verify_and_unpack(work / "s.zip", work / "old", series_uid=SERIES_UID,
                                       image_count=len(INSTANCES), file_size=SERIES_BYTES, limits=Limits())


@pytest.mark.parametrize("fmt", FORMATS)
def test_nbia_default_names_md5_in_any_order_upper_case_and_no_license(work: Path, fmt: str) -> None:
    entries = {f"{i:08d}.dcm": data for i, data in enumerate(INSTANCES.values(), start=1)}
    rows = {name: md5(data).upper() for name, data in reversed(list(entries.items()))}
    result = sink_unpack(build_zip(entries, fmt, license=False, md5_rows=rows), staging_of(work))
    assert result.license_text is None
    assert sorted(f.name for f in result.files) == ["00000001.dcm", "00000002.dcm", "00000003.dcm"]
    assert all(f.md5 == md5(entries[f.name]) for f in result.files)


def test_unknown_counts_are_not_checked(work: Path) -> None:
    result = sink_unpack(build_zip(INSTANCES), staging_of(work), image_count=None, file_size=None)
    assert len(result.files) == 3


@pytest.mark.parametrize("fmt", FORMATS)
def test_directory_entries_are_ignored_and_subfolders_flattened(work: Path, fmt: str) -> None:
    entries: list[tuple[str | zipfile.ZipInfo, bytes]] = [("series/", b"")]
    entries += [(f"series/{name}", data) for name, data in INSTANCES.items()]
    staging = staging_of(work)
    sink_unpack(build_zip(entries, fmt), staging)
    assert sorted(p.name for p in staging.iterdir()) == sorted(INSTANCES)


# ---------------------------------------------------------------- truncated, or another series

@pytest.mark.parametrize("fmt", FORMATS)
def test_fewer_entries_than_image_count(work: Path, fmt: str) -> None:
    err = refused(work, build_zip(dict(list(INSTANCES.items())[:2]), fmt), IncompleteSeriesError, file_size=None)
    assert "2 of 3" in str(err) and err.series_uid == SERIES_UID and should_retry_series(err)  # type: ignore[attr-defined]


@pytest.mark.parametrize("fmt", FORMATS)
def test_fewer_bytes_than_file_size(work: Path, fmt: str) -> None:
    err = refused(work, build_zip(INSTANCES, fmt), IncompleteSeriesError, file_size=SERIES_BYTES + 1)
    assert f"{SERIES_BYTES} of {SERIES_BYTES + 1}" in str(err)


def test_truncated_instance_with_right_count(work: Path) -> None:
    entries = dict(INSTANCES, **{"1-3.dcm": INSTANCES["1-3.dcm"][:-100]})
    refused(work, build_zip(entries), IncompleteSeriesError)


@pytest.mark.parametrize("fmt", FORMATS)
def test_more_entries_than_announced(work: Path, fmt: str) -> None:
    err = refused(work, build_zip(INSTANCES, fmt), IntegrityError, image_count=2, file_size=None)
    assert "more than the 2 the archive announced: not the announced series" in str(err)
    assert not isinstance(err, IncompleteSeriesError)


# ---------------------------------------------------------------- MD5, DICOM and series checks

def _rows() -> dict[str, str]:
    return {name: md5(data) for name, data in INSTANCES.items()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_md5_mismatch(work: Path, fmt: str) -> None:
    entries = dict(INSTANCES, **{"1-2.dcm": corrupt_pixels(INSTANCES["1-2.dcm"])})
    err = refused(work, build_zip(entries, fmt, md5_rows=_rows()), IntegrityError)
    assert "1-2.dcm" in str(err) and "MD5" in str(err)


@pytest.mark.parametrize("fmt", FORMATS)
def test_md5_mismatch_is_returned_as_a_repair_when_the_header_parses(work: Path, fmt: str) -> None:
    entries = dict(INSTANCES, **{"1-2.dcm": corrupt_pixels(INSTANCES["1-2.dcm"])})
    result = sink_unpack(build_zip(entries, fmt, md5_rows=_rows()), staging_of(work), max_repairs=1)
    assert result.repairs == [Repair(name="1-2.dcm", sop_uid=SOPS[1], md5=md5(INSTANCES["1-2.dcm"]))]
    (entry,) = [f for f in result.files if f.name == "1-2.dcm"]
    assert entry.md5 == md5(INSTANCES["1-2.dcm"])        # the expected MD5, for the refetch to meet
    assert len(result.files) == 3


def test_more_mismatches_than_max_repairs(work: Path) -> None:
    entries = {name: corrupt_pixels(data) for name, data in INSTANCES.items()}
    refused(work, build_zip(entries, md5_rows=_rows()), IntegrityError, max_repairs=2)


def test_md5_mismatch_with_a_broken_header_cannot_be_repaired(work: Path) -> None:
    broken = INSTANCES["1-2.dcm"].replace(b"DICM", b"XXXX", 1)
    refused(work, build_zip(dict(INSTANCES, **{"1-2.dcm": broken}), md5_rows=_rows()), IntegrityError, max_repairs=3)


def test_md5_mismatch_of_another_series_cannot_be_repaired(work: Path) -> None:
    foreign = resaved(SOPS[1], OTHER_SERIES_UID)
    refused(work, build_zip(dict(INSTANCES, **{"1-2.dcm": foreign}), md5_rows=_rows()), IntegrityError,
            max_repairs=3, file_size=None)


def test_missing_md5hashes_csv(work: Path) -> None:
    assert MD5_NAME in str(refused(work, build_zip(INSTANCES, with_md5=False), IntegrityError))


def test_file_missing_from_md5hashes_csv(work: Path) -> None:
    rows = {name: md5(data) for name, data in INSTANCES.items() if name != "1-3.dcm"}
    assert "1-3.dcm" in str(refused(work, build_zip(INSTANCES, md5_rows=rows), IntegrityError))


def test_unreadable_md5hashes_csv(work: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in INSTANCES.items():
            zf.writestr(name, data)
        zf.writestr(MD5_NAME, b"Filename,MD5Hash\n\xff\xfe\xfa,zz\n")
    refused(work, buf.getvalue(), IntegrityError)


@pytest.mark.parametrize("content", [
    b"<html>Service Unavailable</html>" * 100,
    b"",
    b"\x00" * 128 + b"DICM",                   # a preamble and nothing else: no series, no instance
    CT_BYTES[:140],
    CT_BYTES.replace(b"\x08\x00\x18\x00UI", b"\x08\x00\x18\x00ZZ", 1),
])
def test_non_dicom_entry(work: Path, content: bytes) -> None:
    err = refused(work, build_zip(dict(INSTANCES, **{"1-3.dcm": content})), IntegrityError, file_size=None)
    assert "1-3.dcm" in str(err)


def test_dicom_of_another_series(work: Path) -> None:
    foreign = resaved("1.2.826.0.1.3680043.8.498.1003", OTHER_SERIES_UID)
    err = refused(work, build_zip(dict(INSTANCES, **{"1-3.dcm": foreign})), IntegrityError, file_size=None)
    assert OTHER_SERIES_UID in str(err)


def test_repeated_instance(work: Path) -> None:
    err = refused(work, build_zip(dict(INSTANCES, **{"1-3.dcm": INSTANCES["1-1.dcm"]})), IntegrityError,
                  file_size=None)
    assert CT_SOP in str(err)


def test_empty_md5_row_is_verified_without_md5_and_said_so(work: Path) -> None:
    rows = _rows() | {"1-2.dcm": ""}
    result = sink_unpack(build_zip(INSTANCES, md5_rows=rows), staging_of(work))
    assert {f.name: f.md5_checked for f in result.files} == {"1-1.dcm": True, "1-2.dcm": False, "1-3.dcm": True}
    assert result.without_md5 == 1
    assert all(f.md5 == md5(INSTANCES[f.name]) for f in result.files)  # what arrived, computed


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_md5_row_still_checks_the_crc(work: Path, fmt: str) -> None:
    data = bytearray(build_zip(INSTANCES, fmt, md5_rows=_rows() | {"1-2.dcm": ""}))
    data[entry_data_offset(bytes(data), "1-2.dcm") + 20] ^= 0x01
    assert "1-2.dcm" in str(refused(work, bytes(data), IntegrityError))


def test_empty_md5_row_still_checks_the_dicom(work: Path) -> None:
    entries = dict(INSTANCES) | {"1-2.dcm": resaved(SOPS[1], OTHER_SERIES_UID)}
    rows = {name: md5(data) for name, data in entries.items()} | {"1-2.dcm": ""}
    err = refused(work, build_zip(entries, md5_rows=rows), IntegrityError, file_size=sum(map(len, entries.values())))
    assert "belongs to series" in str(err)


# ---------------------------------------------------------------- not a ZIP, corrupt ZIP

@pytest.mark.parametrize("content", [
    b"",
    b"<html><body>503 Service Unavailable</body></html>",
    b"PK\x03\x04" + b"\x00" * 100,
    CT_BYTES,
])
def test_not_a_zip(work: Path, content: bytes) -> None:
    assert refused(work, content, IntegrityError).series_uid == SERIES_UID  # type: ignore[attr-defined]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("where", [0.3, 0.5, 0.9, 0.99])
def test_zip_cut_short(work: Path, fmt: str, where: float) -> None:
    data = build_zip(INSTANCES, fmt)
    refused(work, data[: int(len(data) * where)], IntegrityError)


def entry_data_offset(data: bytes, name: str) -> int:
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(name)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("where", [0.1, 0.5, 0.95])
def test_corrupt_entry_bytes(work: Path, fmt: str, where: float) -> None:
    """A flipped byte inside an entry: a bad CRC (stored) or a broken deflate stream."""
    data = bytearray(build_zip(INSTANCES, fmt))
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("1-2.dcm")
    data[entry_data_offset(bytes(data), "1-2.dcm") + int(info.compress_size * where)] ^= 0xFF
    refused(work, bytes(data), IntegrityError)


@pytest.mark.parametrize("fmt", ["deflated-descriptor", "zip64"])
def test_broken_deflate_stream(work: Path, fmt: str) -> None:
    """zlib itself fails (not only the CRC): the first block header names the reserved block type 3."""
    data = bytearray(build_zip(INSTANCES, fmt))
    data[entry_data_offset(bytes(data), "1-2.dcm")] = 0b111        # BFINAL=1, BTYPE=11
    assert "1-2.dcm" in str(refused(work, bytes(data), IntegrityError))


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_crc(work: Path, fmt: str) -> None:
    data = bytearray(build_zip(INSTANCES, fmt))
    data[entry_data_offset(bytes(data), "1-1.dcm") + 200] ^= 0x01
    assert "1-1.dcm" in str(refused(work, bytes(data), IntegrityError))


def central_offset(data: bytes, name: str) -> int:
    central = zipfile.ZipFile(io.BytesIO(data)).start_dir
    while True:      # walk the central directory: signature, fixed 46 bytes, name, extra, comment
        assert data[central: central + 4] == b"PK\x01\x02"
        n, m, k = struct.unpack("<HHH", data[central + 28: central + 34])
        if data[central + 46: central + 46 + n] == name.encode():
            return central
        central += 46 + n + m + k


def patch_entry_header(data: bytes, name: str, *, flag_bits: int | None = None, method: int | None = None) -> bytes:
    """Set the general-purpose flags or compression method of ``name`` in both of its headers."""
    out = bytearray(data)
    local = zipfile.ZipFile(io.BytesIO(data)).getinfo(name).header_offset
    central = central_offset(data, name)
    if flag_bits is not None:
        out[local + 6: local + 8] = struct.pack("<H", flag_bits)
        out[central + 8: central + 10] = struct.pack("<H", flag_bits)
    if method is not None:
        out[local + 8: local + 10] = struct.pack("<H", method)
        out[central + 10: central + 12] = struct.pack("<H", method)
    return bytes(out)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("method", [6, 12, 14, 97])       # implode, bzip2 (over other bytes), lzma, wavpack
def test_unsupported_or_mislabelled_compression(work: Path, method: int, fmt: str) -> None:
    data = patch_entry_header(build_zip(INSTANCES, fmt), "1-2.dcm", method=method)
    err = refused(work, data, SeriesError)
    assert should_retry_series(err)


# ---------------------------------------------------------------- what the stream reader adds

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tail", [b"\x00", b"PK\x03\x04", b"garbage after the end" * 10])
def test_bytes_after_the_end_record_are_refused(work: Path, fmt: str, tail: bytes) -> None:
    before = tree(work)
    with pytest.raises(IntegrityError, match="bytes follow the end of the ZIP"):
        sink_unpack(build_zip(INSTANCES, fmt) + tail, staging_of(work))
    assert tree(work) == before


def test_the_end_record_comment_is_read_but_nothing_past_it(work: Path) -> None:
    data = build_zip(INSTANCES)
    with_comment = data[:-2] + struct.pack("<H", 5) + b"hello"
    assert len(sink_unpack(with_comment, staging_of(work)).files) == 3
    with pytest.raises(IntegrityError):
        sink_unpack(with_comment + b"!", staging_of(work).with_name("other"))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("field,at,size", [("crc", 16, 4), ("compressed size", 20, 4), ("offset", 42, 4)])
def test_a_central_directory_that_disagrees_with_the_entries_is_refused(work: Path, fmt: str, field: str, at: int,
                                                                         size: int) -> None:
    data = bytearray(build_zip(INSTANCES, fmt))
    central = central_offset(bytes(data), "1-2.dcm")
    value = int.from_bytes(data[central + at: central + at + size], "little")
    if value == 0xFFFFFFFF:
        pytest.skip(f"the {field} is in the ZIP64 extra field")
    data[central + at: central + at + size] = ((value + 1) % (1 << 32)).to_bytes(size, "little")
    before = tree(work)
    with pytest.raises(IntegrityError, match="central directory"):
        sink_unpack(bytes(data), staging_of(work))
    assert tree(work) == before


def test_a_central_directory_naming_another_file_is_refused(work: Path) -> None:
    data = bytearray(build_zip(INSTANCES))
    central = central_offset(bytes(data), "1-2.dcm")
    data[central + 46: central + 46 + len("1-2.dcm")] = b"1-9.dcm"
    with pytest.raises(IntegrityError, match="central directory names"):
        sink_unpack(bytes(data), staging_of(work))


def test_an_unsafe_name_in_the_central_directory_alone_is_unsafe(work: Path) -> None:
    """The local header says ``1-2.dcm``, the central directory ``../e.dcm`` (which zipfile
    would have used): refused as unsafe, as ``verify_and_unpack`` refuses it."""
    data = bytearray(build_zip(INSTANCES))
    central = central_offset(bytes(data), "1-2.dcm")
    data[central + 46: central + 46 + len("1-2.dcm")] = b"../e.dc"
    refused(work, bytes(data), UnsafeArchiveError, file_size=None)


def test_an_end_record_that_miscounts_is_refused(work: Path) -> None:
    data = bytearray(build_zip(INSTANCES))
    end = len(data) - 22
    data[end + 10: end + 12] = struct.pack("<H", 6)
    data[end + 8: end + 10] = struct.pack("<H", 6)
    with pytest.raises(IntegrityError, match="end record"):
        sink_unpack(bytes(data), staging_of(work))


def test_stored_entries_with_data_descriptors_are_refused(work: Path) -> None:
    """zipfile writing to a pipe puts STORED sizes after the data: no streaming reader can find
    their end without guessing, so the sink says so (neither server sends these)."""
    pipe = _Pipe()
    with zipfile.ZipFile(pipe, "w", zipfile.ZIP_STORED) as zf:
        for name, data in INSTANCES.items():
            zf.writestr(name, data)
    with pytest.raises(IntegrityError, match="data descriptor"):
        sink_unpack(bytes(pipe.data), staging_of(work))
    assert not staging_of(work).exists()


def test_an_entry_longer_than_its_local_header_says_is_refused(work: Path) -> None:
    data = bytearray(build_zip(INSTANCES, "zip64"))
    local = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("1-2.dcm").header_offset
    extra = local + 30 + len("1-2.dcm")
    assert struct.unpack("<HH", data[extra:extra + 4])[0] == 1      # the ZIP64 extra field: size, csize
    size = struct.unpack("<Q", data[extra + 4:extra + 12])[0]
    data[extra + 4:extra + 12] = struct.pack("<Q", size - 1)
    with pytest.raises(IntegrityError, match="1-2.dcm"):
        sink_unpack(bytes(data), staging_of(work))


# ---------------------------------------------------------------- hostile archives: nothing left

@pytest.mark.parametrize("name", [
    "../evil.dcm", "../../evil.dcm", "a/../../evil.dcm", "..\\evil.dcm", "a\\..\\..\\evil.dcm", "/abs/evil.dcm",
    "/evil.dcm", "C:\\evil.dcm", "C:/evil.dcm", "C:evil.dcm", "\\\\server\\share\\evil.dcm", "\\evil.dcm", "..",
])
def test_path_traversal_and_absolute_names(work: Path, name: str) -> None:
    data = build_zip(list(INSTANCES.items()) + [(name, CT_BYTES)])
    err = refused(work, data, UnsafeArchiveError, file_size=None, image_count=None)
    assert isinstance(err, PermanentSeriesError) and not should_retry_series(err)
    assert not (work / "evil.dcm").exists() and not (work / "out" / "evil.dcm").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_symlink_entry(work: Path, fmt: str) -> None:
    """A link is known only from the central directory, after its bytes were written as a
    plain file (never followed): then the whole series is refused and removed."""
    link = zipfile.ZipInfo("1-4.dcm", (2020, 1, 1, 0, 0, 0))
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    link.create_system = 3
    entries: list[tuple[str | zipfile.ZipInfo, bytes]] = list(INSTANCES.items()) + [(link, b"/etc/passwd")]
    err = refused(work, build_zip(entries, fmt), UnsafeArchiveError, file_size=None, image_count=None)
    assert "link" in str(err)


@pytest.mark.parametrize("names", [
    ["1-1.dcm", "1-1.dcm"], ["a/1-1.dcm", "b/1-1.dcm"], ["1-1.dcm", "1-1.DCM"], ["LICENSE", "sub/LICENSE"],
    [MD5_NAME, "x/" + MD5_NAME],
])
def test_duplicate_names(work: Path, names: list[str]) -> None:
    entries = [(name, data) for name, data in zip(names, [INSTANCES["1-1.dcm"], INSTANCES["1-2.dcm"]])]
    entries.append(("1-3.dcm", INSTANCES["1-3.dcm"]))
    err = refused(work, build_zip(entries), UnsafeArchiveError, file_size=None, image_count=None)  # type: ignore[arg-type]
    assert "repeats" in str(err)


@pytest.mark.parametrize("fmt", FORMATS)
def test_encrypted_entry(work: Path, fmt: str) -> None:
    data = patch_entry_header(build_zip(INSTANCES, fmt), "1-2.dcm",
                              flag_bits=0x1 | (0x8 if fmt == "deflated-descriptor" else 0))
    assert "encrypted" in str(refused(work, data, UnsafeArchiveError))


def _bomb(fmt: str) -> bytes:
    entries = list(INSTANCES.items()) + [("1-4.dcm", b"\x00" * (50 << 20))]   # 50 MB of zeros: ~50 KB deflated
    data = build_zip(entries, fmt, md5_rows={})
    assert len(data) < 1 << 20
    return data


@pytest.mark.parametrize("fmt", ["deflated-descriptor", "zip64"])
def test_zip_bomb_past_the_announced_size(work: Path, fmt: str) -> None:
    # No ratio limit (real SEG data deflates at over 800:1): the bomb expands past the announced size.
    assert "announced size" in str(refused(work, _bomb(fmt), UnsafeArchiveError, image_count=None))


@pytest.mark.parametrize("fmt", ["deflated-descriptor", "zip64"])
def test_zip_bomb_of_unknown_series_size_meets_the_per_entry_cap(work: Path, fmt: str) -> None:
    err = refused(work, _bomb(fmt), UnsafeArchiveError, file_size=None, image_count=None,
                  limits=Limits(max_entry_bytes=32 << 20))
    assert "limit" in str(err) and "1-4.dcm" in str(err)


def test_a_bomb_is_stopped_before_it_is_inflated(work: Path) -> None:
    """With a data descriptor the size is unknown up front: the sink stops at the cap, not at
    the end of the entry, so no more than the cap and one output step reach the disk."""
    sink = ZipSeriesSink(staging_of(work), series_uid=SERIES_UID, image_count=None, file_size=None,
                         limits=Limits(max_entry_bytes=8 << 20))
    data = _bomb("deflated-descriptor")
    peak = 0
    with pytest.raises(UnsafeArchiveError, match="1-4.dcm"):
        for at in range(0, len(data), 1024):
            sink.write(data[at:at + 1024])
            target = staging_of(work) / "1-4.dcm"
            peak = max(peak, target.stat().st_size if target.exists() else 0)
    assert peak <= (8 << 20) + (1 << 20)
    assert not staging_of(work).exists()


def test_entries_deflated_at_over_800_to_1_are_real_data(work: Path) -> None:
    masks = {"1-1.dcm": mostly_zero_instance(SOPS[1]), "1-2.dcm": mostly_zero_instance(SOPS[2])}
    data = build_zip(masks)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert all(zf.getinfo(n).file_size > 800 * zf.getinfo(n).compress_size for n in masks)
    result = sink_unpack(data, staging_of(work), image_count=2, file_size=sum(map(len, masks.values())))
    assert {f.name: (staging_of(work) / f.name).read_bytes() for f in result.files} == masks


@pytest.mark.parametrize("fmt", FORMATS)
def test_zip_expanding_beyond_the_announced_size(work: Path, fmt: str) -> None:
    entries = list(INSTANCES.items()) + [("1-4.dcm", os.urandom(17 << 20))]   # incompressible: no ratio would catch it
    assert "announced size" in str(refused(work, build_zip(entries, fmt), UnsafeArchiveError, step=1 << 20))


@pytest.mark.parametrize("fmt", FORMATS)
def test_entry_larger_than_the_per_file_limit(work: Path, fmt: str) -> None:
    err = refused(work, build_zip(INSTANCES, fmt), UnsafeArchiveError, limits=Limits(max_entry_bytes=len(CT_BYTES) - 1))
    assert "expands to" in str(err)


@pytest.mark.parametrize("fmt", FORMATS)
def test_too_many_entries(work: Path, fmt: str) -> None:
    refused(work, build_zip(INSTANCES, fmt), UnsafeArchiveError, limits=Limits(max_entries=4))


def test_license_or_md5_list_implausibly_large(work: Path) -> None:
    fine = build_zip([(LICENSE_NAME, b"x" * (1 << 20)), *INSTANCES.items()], license=False)
    big = build_zip([(LICENSE_NAME, b"x" * ((1 << 20) + 1)), *INSTANCES.items()], license=False)
    assert len(sink_unpack(fine, work / "fine.staging", file_size=None).files) == 3
    (work / "fine.staging").rename(work / "out" / "fine")
    assert "implausibly large" in str(refused(work, big, UnsafeArchiveError, file_size=None))


def test_hostile_entry_after_good_ones_leaves_nothing(work: Path) -> None:
    # The good files were written as they arrived; the refusal removes them with their folder.
    refused(work, build_zip(list(INSTANCES.items()) + [("../../../evil.dcm", CT_BYTES)]), UnsafeArchiveError,
            file_size=None, image_count=None)


def test_a_sink_that_refused_stays_refused(work: Path) -> None:
    sink = ZipSeriesSink(staging_of(work), series_uid=SERIES_UID, image_count=3, file_size=None, limits=Limits())
    with pytest.raises(IntegrityError):
        sink.write(b"<html>no</html>")
    with pytest.raises(RuntimeError):
        sink.write(build_zip(INSTANCES))


# ---------------------------------------------------------------- the async face

@pytest.mark.anyio
async def test_feed_and_close_off_the_event_loop(work: Path) -> None:
    data = await _java(nbia_files())
    sink = ZipSeriesSink(staging_of(work), series_uid=SERIES_UID, image_count=3, file_size=SERIES_BYTES,
                         limits=Limits(), batch_bytes=3000)
    for at in range(0, len(data), 700):
        await sink.feed(data[at:at + 700])
    result = await sink.close()
    assert [f.name for f in result.files] == list(INSTANCES) and result.license_text == LICENSE_TEXT


@pytest.mark.anyio
async def test_discard_removes_what_was_written(work: Path) -> None:
    data = await _java(nbia_files())
    sink = ZipSeriesSink(staging_of(work), series_uid=SERIES_UID, image_count=3, file_size=SERIES_BYTES,
                         limits=Limits(), batch_bytes=1)
    await sink.feed(data[: len(data) // 2])
    assert any(staging_of(work).iterdir())
    sink.discard()
    assert not staging_of(work).exists()


@pytest.mark.anyio
async def test_the_staging_folder_is_made_off_the_event_loop(work: Path) -> None:
    """The first batch makes the staging folder in a worker thread, in the same hop as its
    bytes (a mkdir on a busy disk took milliseconds of the loop's time per series), and it
    exists once that feed returns, so a download in progress shows on disk and ``discard``
    removes it; bytes short of a batch cost no hop."""
    import threading

    made_in: list[threading.Thread] = []

    class Watched(ZipSeriesSink):
        def _make_staging(self) -> None:
            made_in.append(threading.current_thread())
            super()._make_staging()

    data = await _java(nbia_files())
    sink = Watched(staging_of(work), series_uid=SERIES_UID, image_count=3, file_size=SERIES_BYTES,
                   limits=Limits(), batch_bytes=100)
    await sink.feed(data[:60])
    assert not staging_of(work).exists() and not made_in
    await sink.feed(data[60:100])
    assert staging_of(work).is_dir() and made_in and made_in[0] is not threading.current_thread()
    sink.discard()
    assert not staging_of(work).exists()



@pytest.mark.anyio
async def test_a_series_costs_one_thread_hop_per_batch_and_its_close_none_more(work: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The event loop pays a thread hop per batch, and the last batch goes with the verdict:
    a series smaller than a batch is one hop (it was three: staging, the last batch, the
    verdict), one of three batches is three."""
    import harvester.store.sink as sink_module

    hops: list[object] = []
    real = anyio.to_thread.run_sync

    async def counted(func, *args, **kwargs):  # type: ignore[no-untyped-def]
        hops.append(func)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(sink_module.anyio.to_thread, "run_sync", counted)
    data = await _java(nbia_files())
    for batch_bytes, expected in ((1 << 20, 1), (len(data) // 3 + 1, 3)):
        hops.clear()
        staging = work / f"staging-{batch_bytes}"
        sink = ZipSeriesSink(staging, series_uid=SERIES_UID, image_count=3, file_size=SERIES_BYTES,
                             limits=Limits(), batch_bytes=batch_bytes)
        for at in range(0, len(data), 100):
            await sink.feed(data[at:at + 100])
        result = await sink.close()
        assert [f.name for f in result.files] == list(INSTANCES)
        assert len(hops) == expected, (batch_bytes, len(hops))

# ---------------------------------------------------------------- hypothesis

HYPO_FILES = nbia_files()
HYPO_ZIPS = {"java-deflated": java_zip(HYPO_FILES), "java-stored": java_zip(HYPO_FILES, fmt="stored"),
             "java-zip64": java_zip(HYPO_FILES, force_zip64=True),
             **{fmt: build_zip(INSTANCES, fmt) for fmt in FORMATS}}
MD5S = {md5(d) for d in INSTANCES.values()}


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@pytest.mark.parametrize("kind", sorted(HYPO_ZIPS))
def test_any_split_into_chunks_gives_the_same_files(tmp_path_factory: pytest.TempPathFactory, kind: str) -> None:
    data = HYPO_ZIPS[kind]

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(cuts=st.lists(st.integers(0, len(data)), max_size=40))
    def check(cuts: list[int]) -> None:
        staging = tmp_path_factory.mktemp("split") / "s"
        sink = ZipSeriesSink(staging, series_uid=SERIES_UID, image_count=3, file_size=SERIES_BYTES, limits=Limits())
        for piece in _split(data, cuts):
            sink.write(piece)
        result = sink.finish()
        assert {f.name: (staging / f.name).read_bytes() for f in result.files} == INSTANCES

    check()


@pytest.mark.parametrize("kind", sorted(HYPO_ZIPS))
def test_any_single_byte_corruption_is_refused_or_yields_only_verified_files(
        tmp_path_factory: pytest.TempPathFactory, kind: str) -> None:
    data = HYPO_ZIPS[kind]

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(at=st.integers(0, len(data) - 1), value=st.integers(1, 255), step=st.sampled_from([1, 97, 4096, 1 << 20]))
    def check(at: int, value: int, step: int) -> None:
        mutated = bytearray(data)
        mutated[at] ^= value
        work = tmp_path_factory.mktemp("flip")
        staging = work / "s"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = sink_unpack(bytes(mutated), staging, step=step)
        except SeriesError as exc:
            assert str(exc).strip()
            assert list(work.iterdir()) == []       # refused: nothing left
        else:
            assert {f.md5 for f in result.files} == MD5S
            assert all(md5((staging / f.name).read_bytes()) == f.md5 for f in result.files)

    check()


# ---------------------------------------------------------------- memory

def _peak(data: bytes, staging: Path, image_count: int, file_size: int) -> int:
    sink = ZipSeriesSink(staging, series_uid=SERIES_UID, image_count=image_count, file_size=file_size,
                         limits=Limits())
    view = memoryview(data)
    tracemalloc.start()
    try:
        for at in range(0, len(data), 1 << 20):
            sink.write(view[at:at + (1 << 20)])  # type: ignore[arg-type]
        result = sink.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(result.files) == image_count
    return peak


@pytest.mark.parametrize("fmt", ["deflated", "stored"])
def test_peak_memory_is_constant_in_series_size(work: Path, fmt: str) -> None:
    """A 50 MB series and a 5 MB one take the same Python memory through the sink: a few chunks
    and one output step, not the series (tracemalloc; the input is a view of bytes made before)."""
    instances = {f"1-{i:02d}.dcm": mostly_zero_instance(f"1.2.826.0.1.3680043.8.498.{2000 + i}", 5 << 20)
                 for i in range(1, 11)}
    big = {n: d for n, d in instances.items()}
    small = dict(list(instances.items())[:1])
    peaks = {}
    for label, files in (("small", small), ("big", big)):
        data = java_zip(nbia_files(files), fmt=fmt)
        peaks[label] = _peak(data, work / f"{label}.staging", len(files), sum(map(len, files.values())))
    assert sum(map(len, big.values())) > 50 * 10**6
    assert peaks["big"] < peaks["small"] + (1 << 20), peaks
    assert peaks["big"] < 6 << 20, peaks


# ---------------------------------------------------------------- the reader alone

def test_reader_reports_where_a_stream_was_cut() -> None:
    data = java_zip(nbia_files())
    reader = ZipStreamReader()
    list(reader.feed(data[:200]))
    with pytest.raises(ZipStreamError, match="cut short"):
        reader.close()


def test_reader_reads_descriptors_without_their_signature() -> None:
    """The signature of a data descriptor is optional (APPNOTE 4.3.9.3)."""
    data = bytearray(java_zip([("a.dcm", b"x" * 1000)]))
    at = data.index(b"PK\x07\x08")
    unsigned = bytes(data[:at] + data[at + 4:])
    central = unsigned.index(b"PK\x01\x02")
    end = unsigned.index(b"PK\x05\x06")
    fixed = bytearray(unsigned)
    fixed[end + 16:end + 20] = struct.pack("<I", central)
    reader = ZipStreamReader()
    out = b"".join(bytes(p) for kind, p in reader.feed(bytes(fixed)) if kind == "data")
    reader.close()
    assert out == b"x" * 1000


def test_reader_inflates_an_entry_like_the_one_before_in_one_step() -> None:
    """Entries of 64 KiB that do not compress, in the real service's format and fed whole: after
    the first, each comes out as one ``data`` event (one zlib call, one CRC, one write for the
    sink), not one per 16 KiB-and-growing piece; the bytes are the same either way."""
    files = [(f"1-{i:02d}.dcm", os.urandom(64 << 10)) for i in range(1, 11)]
    data = java_zip(files)
    reader = ZipStreamReader()
    pieces: dict[str, list[bytes]] = {}
    name = ""
    for kind, payload in reader.feed(data):
        if kind == "entry":
            name = payload.name
            pieces[name] = []
        elif kind == "data":
            pieces[name].append(bytes(payload))
    reader.close()
    assert {n: b"".join(p) for n, p in pieces.items()} == dict(files)
    assert [len(pieces[n]) for n, _ in files[1:]] == [1] * 9
    # fed in small chunks it still reads the same bytes (pieces end where the chunks do)
    reader = ZipStreamReader()
    got = b"".join(bytes(p) for at in range(0, len(data), 5000)
                   for kind, p in reader.feed(data[at:at + 5000]) if kind == "data")
    reader.close()
    assert got == b"".join(d for _, d in files)


# ---------------------------------------------------------------- instances one by one (DICOMweb)

def test_instance_sink_names_files_after_their_sop_uid(work: Path) -> None:
    staging = staging_of(work)
    staging.mkdir()
    sink = InstanceSink(staging, series_uid=SERIES_UID, max_instance_bytes=1 << 20, max_instances=3)
    for data in INSTANCES.values():
        sink.start()
        for at in range(0, len(data), 1000):
            sink.write(data[at:at + 1000])
        sink.end()
    assert {f.name: f.md5 for f in sink.files} == {f"{sop}.dcm": md5(d) for sop, d in zip(SOPS, INSTANCES.values())}
    assert sorted(p.name for p in staging.iterdir()) == sorted(f"{sop}.dcm" for sop in SOPS)


@pytest.mark.parametrize("problem", ["count", "size", "series", "repeat", "not dicom"])
def test_instance_sink_refusals(work: Path, problem: str) -> None:
    staging = staging_of(work)
    staging.mkdir()
    sink = InstanceSink(staging, series_uid=SERIES_UID, max_instance_bytes=len(CT_BYTES) + 10, max_instances=2,
                        what="WADO-RS part", sender="WADO-RS")
    parts = {"count": [CT_BYTES, resaved(SOPS[1]), resaved(SOPS[2])], "size": [CT_BYTES + b"\0" * 100],
             "series": [resaved(SOPS[1], OTHER_SERIES_UID)], "repeat": [CT_BYTES, CT_BYTES],
             "not dicom": [b"<html>no</html>"]}[problem]
    with pytest.raises(IntegrityError, match="WADO-RS"):
        for data in parts:
            sink.start()
            sink.write(data)
            sink.end()
    sink.abort()


def test_crc32_is_what_zlib_says() -> None:  # the reader's CRC is the standard one
    data = java_zip([("a.dcm", b"abc")])
    assert struct.pack("<I", zlib.crc32(b"abc")) in data


# ---------------------------------------------------------------- over HTTP: a failed attempt leaves nothing

@pytest.mark.anyio
async def test_an_attempt_reset_mid_stream_leaves_nothing_for_the_next(server, small_archive, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Our server resets the first getImage mid-stream: that attempt had written instances into
    staging; the retry finds staging gone and ends with exactly the series' files."""
    from harvester.config import Config
    from harvester.source.nbia.download import stream_series_zip
    from harvester.source.nbia import NBIAClient, make_session

    rec = [r for r in small_archive.records() if r.row["Collection"].startswith("SYN-")][0]
    await anyio.to_thread.run_sync(server.set_faults, "reset=1,seed=4")
    config = Config(api_url=server.base_url, out_dir=tmp_path, retries=3, backoff_base=0.01, progress=False)
    staging = tmp_path / "s.staging"
    started: list[int] = []            # files started, per attempt
    staging_at_open: list[bool] = []

    class Counting(ZipSeriesSink):
        def _start(self, entry):  # type: ignore[no-untyped-def]
            started[-1] += 1
            super()._start(entry)

    def open_sink() -> ZipSeriesSink:
        staging_at_open.append(staging.exists())
        started.append(0)
        if len(started) == 2:
            server.set_faults(None)  # the retry gets the whole series
        return Counting(staging, series_uid=rec.uid, image_count=len(rec.instances), file_size=rec.total_bytes,
                        limits=Limits(), batch_bytes=1)

    async with make_session(config) as session:
        result = await stream_series_zip(NBIAClient(config, session), rec.uid, None, open_sink)
    assert len(started) == 2 and started[0] >= 2, started    # LICENSE and at least one instance, then the reset
    assert staging_at_open == [False, False]                  # the reset attempt's files went with its folder
    assert sorted(p.name for p in staging.iterdir()) == sorted(f.name for f in result.files)
    assert sorted(f.md5 for f in result.files) == sorted(i.md5 for i in rec.instances)


def test_a_sink_never_removes_a_staging_folder_it_did_not_make(work: Path) -> None:
    staging = staging_of(work)
    staging.mkdir()
    (staging / "keep").write_bytes(b"not the sink's")
    with pytest.raises(SeriesError, match="staging folder"):
        sink_unpack(build_zip(INSTANCES), staging)
    assert (staging / "keep").read_bytes() == b"not the sink's"


def test_the_sinks_batches_take_at_most_sink_threads_worker_threads_at_once() -> None:
    """Many sinks flushing at once queue for ``SINK_THREADS`` worker threads (more would only take
    turns at the GIL); every batch is still handled."""
    import threading

    from harvester.store import sink as sink_mod

    release = threading.Event()
    lock = threading.Lock()
    active = [0, 0]  # now, most at once

    class Blocking(sink_mod._Batched):
        def __init__(self) -> None:
            super().__init__(batch_bytes=1)
            self.handled: list[bytes] = []

        def _write_batch(self, batch: list[bytes]) -> None:
            with lock:
                active[0] += 1
                active[1] = max(active[1], active[0])
            assert release.wait(30), "the test never let the batches go"
            with lock:
                active[0] -= 1
            self.handled.extend(batch)

    count = sink_mod.SINK_THREADS + 3
    sinks = [Blocking() for _ in range(count)]

    async def go() -> tuple[int, int]:
        limiter = sink_mod.sink_threads()
        assert sink_mod.sink_threads() is limiter
        async with anyio.create_task_group() as tg:
            for i, s in enumerate(sinks):
                tg.start_soon(s.feed, bytes([i]))
            with anyio.fail_after(30):   # until every flush is either in a thread or waiting for one
                while limiter.statistics().tasks_waiting < count - sink_mod.SINK_THREADS:
                    await anyio.sleep(0.01)
            stats = limiter.statistics()
            release.set()
        return stats.borrowed_tokens, stats.tasks_waiting

    borrowed, waiting = anyio.run(go)
    assert (borrowed, waiting) == (sink_mod.SINK_THREADS, count - sink_mod.SINK_THREADS)
    assert active[1] == sink_mod.SINK_THREADS
    assert [s.handled for s in sinks] == [[bytes([i])] for i in range(count)]
