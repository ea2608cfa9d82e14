"""Verify a downloaded series ZIP and unpack it safely into a staging folder.

Runs in a worker thread (``anyio.to_thread``): it reads, hashes and parses files, which must
never block the event loop. In one pass per entry it streams the bytes to disk, computes the
MD5, and parses the DICOM header.

Checks, in order (each failure raises the error named):

* it is a readable ZIP                                    -> ``IntegrityError``
* no entry is absolute, climbs with ``..``, is a symlink,
  is encrypted, repeats a name, expands past the hard cap
  per entry or the whole past the series' announced size
  (plus a margin)                                         -> ``UnsafeArchiveError`` (permanent)
* DICOM entry count and total bytes match the archive     -> ``IncompleteSeriesError``
* every entry matches its row in ``md5hashes.csv``          -> ``IntegrityError``
  (a row with an empty MD5, which the real archive sends when it has none recorded, is
  verified by count, size, CRC-32 and DICOM only, and its file says ``md5_checked=False``)
* every entry parses as DICOM of the expected series      -> ``IntegrityError``

No compression-ratio limit: the real service DEFLATEs every entry, and real segmentations
and masks deflate at 250:1 to over 800:1. Expansion is bounded by sizes instead, and a
declared size is never trusted past what it declared (``_extract``).

Nothing is written outside ``staging``; on any failure the caller deletes ``staging``.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import lzma
import os
import re
import stat
import struct
import threading
import zipfile
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from harvester.config import TOO_MANY_ENTRIES_HINT, Limits, too_many_entries
from harvester.errors import IncompleteSeriesError, IntegrityError, UnsafeArchiveError, classify_os_error
from harvester.store.layout import instance_filename, name_key
from harvester.models import Repair, UnpackedSeries, VerifiedFile

LICENSE_NAME = "LICENSE"
MD5_NAME = "md5hashes.csv"
_CHUNK = 1 << 20
_INFLATE_CHUNK = 256 << 10
# What reading a damaged or mislabelled entry raises besides BadZipFile (a broken deflate stream
# raises zlib.error, an unknown compression method NotImplementedError).
_CORRUPT_ENTRY = (zipfile.BadZipFile, EOFError, ValueError, zlib.error, lzma.LZMAError, NotImplementedError)


#: a bare name of letters, digits, ``.``, ``_`` and ``-`` not starting with a dot: one relative
#: part that is not ``..``, with no separator or drive, so ``check_entry_name`` passes it as the
#: full check would, without pathlib (it is asked twice for each of a harvest's millions of entries)
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def check_entry_name(name: str) -> None:
    """Reject names that could land outside the staging folder. Raises ``UnsafeArchiveError``."""
    if not _PLAIN_NAME.fullmatch(name):
        _check_any_entry_name(name)


def _check_any_entry_name(name: str) -> None:
    """``check_entry_name`` for any name, through pathlib (POSIX and Windows rules)."""
    if not name or "\x00" in name:
        raise UnsafeArchiveError(f"ZIP entry with an empty or NUL-containing name: {name!r}")
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(name).drive or PureWindowsPath(name).is_absolute():
        raise UnsafeArchiveError(f"ZIP entry with an absolute path: {name!r}")
    if any(part == ".." for part in posix.parts):
        raise UnsafeArchiveError(f"ZIP entry that climbs out of its folder: {name!r}")


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    mode = (info.external_attr >> 16) & 0xFFFF
    return stat.S_ISLNK(mode)


def parse_md5_csv(data: bytes) -> dict[str, str]:
    """``Filename,MD5Hash`` rows -> {file name: md5}, ``""`` for a row whose MD5 is empty (the
    archive has none recorded); raises ``IntegrityError`` when malformed."""
    try:
        text = data.decode("utf-8-sig")
        reader = csv.DictReader(io.StringIO(text))
        out = {}
        for row in reader:
            name, digest = (row.get("Filename") or "").strip(), (row.get("MD5Hash") or "").strip().lower()
            if name:
                out[name] = digest
    except (UnicodeDecodeError, csv.Error) as exc:
        raise IntegrityError(f"md5hashes.csv is unreadable: {exc}") from None
    return out


def read_dicom_ids(path: Path, head: bytes | None = None, *, whole: bool = False) -> tuple[str, str, str]:
    """(SeriesInstanceUID, SOPInstanceUID, SOPClassUID) from a DICOM header; ``IntegrityError`` if not DICOM.

    ``head``, when given, is the start of the file (``whole``: all of it), which spares reading
    the file again. A well-formed header is walked by ``header_ids`` without pydicom (a tenth of
    the cost, which dominates small instances); anything it is unsure of is left to pydicom,
    whose verdict stands.
    """
    if head is None:
        try:
            with open(path, "rb") as fh:
                head = fh.read(_HEAD_BYTES + 1)
        except OSError:
            head = b""
        whole = len(head) <= _HEAD_BYTES
    found = header_ids(head, complete=whole) if head else None
    if found is not None:
        return found
    return dicom_ids_by_pydicom(path)


_PYDICOM_LOCK = threading.Lock()


def _pydicom() -> Any:
    """pydicom, imported on first use (a third of a second of start-up that a harvest whose
    headers the fast walk reads never needs), under a lock: two worker threads importing it at
    the same moment meet its circular imports half done (ImportError)."""
    with _PYDICOM_LOCK:
        import pydicom
        import pydicom.charset  # noqa: F401

        return pydicom


def dicom_ids_by_pydicom(path: Path) -> tuple[str, str, str]:
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True,
                             specific_tags=["SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"])
        # Values are converted lazily, on first access: that can fail too, so it stays in the try.
        series = str(getattr(ds, "SeriesInstanceUID", "") or "")
        sop = str(getattr(ds, "SOPInstanceUID", "") or "")
        if not sop:
            meta = getattr(ds, "file_meta", None)
            sop = str(getattr(meta, "MediaStorageSOPInstanceUID", "") or "")
        sop_class = str(getattr(ds, "SOPClassUID", "") or "")
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: pydicom raises InvalidDicomError, but also
        # NotImplementedError (unknown VR), struct.error, BytesLengthException... all mean "not DICOM"
        raise IntegrityError(f"{path.name} is not a readable DICOM file ({type(exc).__name__})") from None
    return series, sop, sop_class


# ------------------------------------------------------------------ DICOM header walk (fast path)
#
# Invariant: header_ids returns a result only for a header it has walked completely and
# unambiguously (preamble and "DICM", a group-2 meta header, then every element of the data set
# up to the pixel data or the end of the file, nested sequences included, each with a known VR
# and a length inside the bytes), in a little-endian transfer syntax; it then returns what
# pydicom would. Anything else (big endian, deflate, an odd VR, a value pydicom would convert
# differently, a header longer than ``head``) returns None, and pydicom decides.

_HEAD_BYTES = 256 * 1024
_IMPLICIT_LE = "1.2.840.10008.1.2"
_PYDICOM_ONLY_SYNTAXES = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})  # big endian, deflated
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
                        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # float, double float, pixel data
_MEDIA_SOP, _SYNTAX = 0x00020003, 0x00020010
_CHARSET, _SOP_CLASS, _SOP, _SERIES = 0x00080005, 0x00080016, 0x00080018, 0x0020000E
#: element -> the VR it must have (explicit VR) for the walk to read it
_META_WANTED = {_MEDIA_SOP: b"UI", _SYNTAX: b"UI"}
_WANTED = {_CHARSET: b"CS", _SOP_CLASS: b"UI", _SOP: b"UI", _SERIES: b"UI"}
_U16, _U32, _U16x2 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<HH")
_EXPLICIT_HEAD, _IMPLICIT_HEAD = struct.Struct("<HH2sH"), struct.Struct("<HHI")  # tag, VR, length
_MAX_DEPTH = 16


class _Unsure(Exception):
    """The fast walk cannot vouch for this header; pydicom must decide."""


def header_ids(head: bytes, *, complete: bool) -> tuple[str, str, str] | None:
    """(SeriesInstanceUID, SOPInstanceUID, SOPClassUID) from the first bytes of a DICOM file, or
    None when only pydicom can tell. ``complete`` says ``head`` is the whole file. Never raises."""
    try:
        return _walk_file(head, complete)
    except (_Unsure, struct.error, IndexError, ValueError):
        return None


def _walk_file(head: bytes, complete: bool) -> tuple[str, str, str]:
    if len(head) < 132 or head[128:132] != b"DICM":
        raise _Unsure
    meta: dict[int, bytes] = {}
    pos = 132
    while pos + 8 <= len(head) and _U16.unpack_from(head, pos)[0] == 0x0002:
        pos = _element(head, pos, True, meta, _META_WANTED, 0)
    syntax = _ui(meta.get(_SYNTAX, b""))
    if not syntax or syntax in _PYDICOM_ONLY_SYNTAXES:
        raise _Unsure
    found: dict[int, bytes] = {}
    explicit = syntax != _IMPLICIT_LE
    end = _walk_top_explicit(head, pos, found) if explicit else _walk_dataset(head, pos, False, found, 0, top=True)
    if end is None and not complete:
        raise _Unsure  # the header goes on beyond the bytes we have
    if _CHARSET in found:
        _check_charset(found[_CHARSET])
    series, sop, sop_class = (_ui(found[t]) if t in found else "" for t in (_SERIES, _SOP, _SOP_CLASS))
    if not sop:
        sop = _ui(meta.get(_MEDIA_SOP, b""))
    return series, sop, sop_class


def _walk_dataset(buf: bytes, pos: int, explicit: bool, found: dict[int, bytes], depth: int, *,
                  top: bool = False, end: int | None = None) -> int | None:
    """Walk elements from ``pos``. At top level: returns the offset of the pixel data, or None
    at the end of ``buf``. Inside an undefined-length item: returns the offset after its
    delimiter. Inside a defined-length item: walks up to ``end``."""
    limit = len(buf) if end is None else end
    while pos < limit:
        if pos + 8 > limit:
            raise _Unsure
        group, elem = _U16x2.unpack_from(buf, pos)
        tag = group << 16 | elem
        if top and tag in _PIXEL_DATA:  # where pydicom's stop_before_pixels stops too
            return pos
        if tag == _ITEM_END and not top and end is None:
            if _U32.unpack_from(buf, pos + 4)[0] != 0:
                raise _Unsure
            return pos + 8
        if group in (0xFFFE, 0x0002):
            raise _Unsure
        pos = _element(buf, pos, explicit, found if top else {}, _WANTED, depth)
    if end is not None and pos == end:
        return pos
    if top and pos == len(buf):
        return None
    raise _Unsure


def _walk_top_explicit(buf: bytes, pos: int, found: dict[int, bytes]) -> int | None:
    """``_walk_dataset(buf, pos, True, found, 0, top=True)`` with ``_element``'s explicit-VR step
    inlined (one unpack per element, not two, and no call): the same verdict for every ``buf``
    (a test holds the two to it); it runs once per file received, on every element of its header."""
    limit = len(buf)
    head, u32 = _EXPLICIT_HEAD.unpack_from, _U32.unpack_from
    short_vrs, long_vrs, wanted, pixel_data = _SHORT_VRS, _LONG_VRS, _WANTED, _PIXEL_DATA
    while pos < limit:
        if pos + 8 > limit:
            raise _Unsure
        group, elem, vr, length = head(buf, pos)
        tag = group << 16 | elem
        if tag in pixel_data:  # where pydicom's stop_before_pixels stops too
            return pos
        if group == 0xFFFE or group == 0x0002:
            raise _Unsure
        if vr in short_vrs:
            pos += 8
        elif vr in long_vrs:
            length, pos = u32(buf, pos + 8)[0], pos + 12
            if length == _UNDEFINED:
                if vr != b"SQ" or tag in wanted:
                    raise _Unsure
                pos = _skip_sequence(buf, pos, True, 1)
                continue
        else:
            raise _Unsure
        end = pos + length
        if end > limit:
            raise _Unsure
        if tag in wanted:
            if vr != wanted[tag]:
                raise _Unsure
            found[tag] = buf[pos:end]
        elif vr == b"SQ" and length:
            _skip_items(buf, pos, end, True, 1)
        pos = end
    if pos == limit:
        return None
    raise _Unsure


def _element(buf: bytes, pos: int, explicit: bool, found: dict[int, bytes], wanted: dict[int, bytes],
             depth: int) -> int:
    """Step over one element at ``pos`` (recording it in ``found`` when wanted); returns the next offset."""
    if explicit:  # one unpack for tag, VR and the short length: the walk's cost is per element
        group, elem, vr, length = _EXPLICIT_HEAD.unpack_from(buf, pos)
        if vr in _SHORT_VRS:
            pos += 8
        elif vr in _LONG_VRS:
            length, pos = _U32.unpack_from(buf, pos + 8)[0], pos + 12
        else:
            raise _Unsure
    else:
        group, elem, length = _IMPLICIT_HEAD.unpack_from(buf, pos)
        vr = b""
        pos += 8
    tag = group << 16 | elem
    if length == _UNDEFINED:
        if (explicit and vr != b"SQ") or tag in wanted:
            raise _Unsure
        return _skip_sequence(buf, pos, explicit, depth + 1)
    if pos + length > len(buf):
        raise _Unsure
    if tag in wanted:
        if explicit and vr != wanted[tag]:
            raise _Unsure
        found[tag] = buf[pos:pos + length]
    elif explicit and vr == b"SQ" and length:
        _skip_items(buf, pos, pos + length, explicit, depth + 1)
    return pos + length


def _skip_sequence(buf: bytes, pos: int, explicit: bool, depth: int) -> int:
    """Step over the items of an undefined-length sequence; returns the offset after its delimiter."""
    if depth > _MAX_DEPTH:
        raise _Unsure
    while True:
        if pos + 8 > len(buf):
            raise _Unsure
        group, elem = _U16x2.unpack_from(buf, pos)
        tag, length = group << 16 | elem, _U32.unpack_from(buf, pos + 4)[0]
        pos += 8
        if tag == _SEQUENCE_END:
            if length != 0:
                raise _Unsure
            return pos
        if tag != _ITEM:
            raise _Unsure
        if length == _UNDEFINED:
            pos = _walk_dataset(buf, pos, explicit, {}, depth)  # type: ignore[assignment]
        else:
            if pos + length > len(buf):
                raise _Unsure
            _walk_dataset(buf, pos, explicit, {}, depth, end=pos + length)
            pos += length


def _skip_items(buf: bytes, pos: int, end: int, explicit: bool, depth: int) -> None:
    """Check the items of a defined-length sequence (``pos``..``end``)."""
    if depth > _MAX_DEPTH:
        raise _Unsure
    while pos < end:
        if pos + 8 > end:
            raise _Unsure
        group, elem = _U16x2.unpack_from(buf, pos)
        tag, length = group << 16 | elem, _U32.unpack_from(buf, pos + 4)[0]
        pos += 8
        if tag != _ITEM:
            raise _Unsure
        if length == _UNDEFINED:
            pos = _walk_dataset(buf, pos, explicit, {}, depth)  # type: ignore[assignment]
            if pos > end:
                raise _Unsure
        else:
            if pos + length > end:
                raise _Unsure
            _walk_dataset(buf, pos, explicit, {}, depth, end=pos + length)
            pos += length


#: Specific Character Set terms that pydicom 3 decodes (a test holds this to be a subset of
#: ``pydicom.charset.python_encoding``): the common ones, answered without importing pydicom
_COMMON_CHARSETS = frozenset({b"ISO_IR 6", b"ISO_IR 100", b"ISO_IR 101", b"ISO_IR 109", b"ISO_IR 110",
                              b"ISO_IR 126", b"ISO_IR 127", b"ISO_IR 138", b"ISO_IR 144", b"ISO_IR 148",
                              b"ISO_IR 166", b"ISO_IR 192", b"GB18030", b"GBK", b"ISO 2022 IR 6",
                              b"ISO 2022 IR 100", b"ISO 2022 IR 87", b"ISO 2022 IR 149"})


def _check_charset(value: bytes) -> None:
    """pydicom decodes the Specific Character Set before it converts any element, and refuses the
    file when it cannot: answer only for one term it knows (or none)."""
    term = value.rstrip(b" ")
    if term and term not in _COMMON_CHARSETS and term not in _known_charsets():
        raise _Unsure


@functools.cache
def _known_charsets() -> frozenset[bytes]:
    python_encoding = _pydicom().charset.python_encoding
    return frozenset(name.encode("ascii") for name in python_encoding if name.isascii())


_UID_CHARACTERS = frozenset(b"0123456789.")


def _ui(value: bytes) -> str:
    """A UI value as pydicom gives it (trailing NULs and spaces dropped). Only a plain UID (digits
    and dots) is answered here; pydicom's handling of anything else (whitespace, several values,
    other bytes) differs between versions, so it decides those."""
    value = value.rstrip(b"\0 ")
    if not _UID_CHARACTERS.issuperset(value):
        raise _Unsure
    return value.decode("ascii")


def verify_and_unpack(zip_path: Path, staging: Path, *, series_uid: str, image_count: int | None,
                      file_size: int | None, limits: Limits, max_repairs: int = 0) -> UnpackedSeries:
    """Verify ``zip_path`` against the archive's figures and unpack it into ``staging`` (created).

    Up to ``max_repairs`` files that fail only their MD5 are returned as ``repairs`` (their
    ``VerifiedFile`` carries the expected MD5) for the caller to refetch one by one; one more
    raises ``IntegrityError``.
    """
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, NotImplementedError) as exc:
        # NotImplementedError: a central header asks for a "zip file version" zipfile lacks
        raise IntegrityError(f"download is not a readable ZIP ({exc})", series_uid=series_uid) from None
    with zf:
        # not ZipInfo.is_dir(): it indexes the name, and an empty name (a hostile ZIP) would raise
        # IndexError; such a name is refused by the entry checks below
        infos = [i for i in zf.infolist() if not i.filename.endswith("/")]
        dicom_infos, md5_info, license_info = _classify_entries(infos, series_uid, limits, file_size)
        announced = sum(i.file_size for i in dicom_infos)
        # more files or bytes than announced is not a truncated download but another answer
        if image_count is not None and len(dicom_infos) > image_count:
            raise IntegrityError(_not_announced(f"{len(dicom_infos)} files", f"{image_count}"),
                                 series_uid=series_uid, hint=_MORE_THAN_ANNOUNCED)
        if image_count is not None and len(dicom_infos) != image_count:
            raise IncompleteSeriesError(
                f"ZIP holds {len(dicom_infos)} of {image_count} files", series_uid=series_uid)
        if file_size is not None and announced > file_size:
            raise IntegrityError(_not_announced(f"{announced} bytes", f"{file_size}"), series_uid=series_uid,
                                 hint=_MORE_THAN_ANNOUNCED)
        if file_size is not None and announced != file_size:
            raise IncompleteSeriesError(
                f"ZIP holds {announced} of {file_size} bytes", series_uid=series_uid)
        if md5_info is None:
            raise IntegrityError("ZIP has no md5hashes.csv, so its files cannot be verified", series_uid=series_uid)
        expected_md5 = parse_md5_csv(_read_small(zf, md5_info, 64 << 20))
        license_text = None
        if license_info is not None:
            license_text = _read_small(zf, license_info, 1 << 20).decode("utf-8", "replace")

        try:
            staging.mkdir(parents=True, exist_ok=False)
        except OSError as exc:
            raise classify_os_error(exc, f"staging folder {staging.name}") from None
        files: list[VerifiedFile] = []
        repairs: list[Repair] = []
        seen_sops: set[str] = set()
        for info in dicom_infos:
            entry_base = PurePosixPath(info.filename.replace("\\", "/")).name
            name = instance_filename(info.filename)
            target = staging / name
            digest, head = _extract(zf, info, target, series_uid)
            want = expected_md5.get(entry_base, expected_md5.get(info.filename))
            if want is None:
                raise IntegrityError(f"{entry_base} is not listed in md5hashes.csv", series_uid=series_uid)
            md5_checked = want != ""  # empty: no MD5 recorded; zipfile checked the CRC-32 on reading
            mismatch = md5_checked and digest != want
            if mismatch and len(repairs) >= max_repairs:
                raise IntegrityError(f"{entry_base} does not match its MD5 (got {digest}, expected {want})",
                                     series_uid=series_uid)
            got_series, sop, sop_class = read_dicom_ids(target, head, whole=len(head) == info.file_size)
            if mismatch:
                if got_series != series_uid or not sop:
                    raise IntegrityError(f"{entry_base} does not match its MD5 and cannot be repaired alone",
                                         series_uid=series_uid)
                repairs.append(Repair(name=name, sop_uid=sop, md5=want))
                digest = want
            if got_series != series_uid:
                raise IntegrityError(f"{entry_base} belongs to series {got_series or '(none)'}, not this one",
                                     series_uid=series_uid)
            if sop in seen_sops:
                raise IntegrityError(f"{entry_base} repeats SOPInstanceUID {sop}", series_uid=series_uid)
            seen_sops.add(sop)
            files.append(VerifiedFile(name=name, size=info.file_size, md5=digest, sop_uid=sop,
                                      sop_class_uid=sop_class, md5_checked=md5_checked))
    return UnpackedSeries(files=files, license_text=license_text, repairs=repairs)


_MORE_THAN_ANNOUNCED = "the archive sent more than it announced; the series is fetched again, then failed"


def _not_announced(held: str, announced: str) -> str:
    return f"ZIP holds {held}, more than the {announced} the archive announced: not the announced series"


def _classify_entries(infos: list[zipfile.ZipInfo], series_uid: str, limits: Limits, file_size: int | None
                      ) -> tuple[list[zipfile.ZipInfo], zipfile.ZipInfo | None, zipfile.ZipInfo | None]:
    if len(infos) > limits.max_entries:
        raise UnsafeArchiveError(too_many_entries(len(infos), limits.max_entries), series_uid=series_uid,
                                 hint=TOO_MANY_ENTRIES_HINT)
    names: set[str] = set()
    dicom: list[zipfile.ZipInfo] = []
    md5_info = license_info = None
    total = 0
    budget = None if file_size is None else int(file_size * (1 + limits.max_series_overhead)) + limits.series_slack_bytes
    for info in infos:
        check_entry_name(info.filename)
        if _is_symlink(info):
            raise UnsafeArchiveError(f"ZIP entry {info.filename!r} is a symbolic link", series_uid=series_uid)
        if info.flag_bits & 0x1:
            raise UnsafeArchiveError(f"ZIP entry {info.filename!r} is encrypted", series_uid=series_uid)
        base = instance_filename(info.filename)
        if name_key(base) in names:  # the same rule as for folders: one file on macOS or Windows
            raise UnsafeArchiveError(f"ZIP repeats the entry name {base!r}", series_uid=series_uid)
        names.add(name_key(base))
        if info.file_size > limits.max_entry_bytes:
            raise UnsafeArchiveError(f"ZIP entry {info.filename!r} expands to {info.file_size} bytes "
                                     f"(limit {limits.max_entry_bytes} per entry; zip bomb?)", series_uid=series_uid)
        total += info.file_size
        if budget is not None and total > budget:
            raise UnsafeArchiveError(f"ZIP expands beyond the series' announced size ({file_size} bytes): "
                                     "a zip bomb, or the archive's figures are wrong", series_uid=series_uid)
        bare = PurePosixPath(info.filename.replace("\\", "/")).name
        if bare == MD5_NAME:
            md5_info = info
        elif bare == LICENSE_NAME:
            license_info = info
        else:
            dicom.append(info)
    return dicom, md5_info, license_info


def _read_small(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> bytes:
    if info.file_size > cap:
        raise UnsafeArchiveError(f"ZIP entry {info.filename!r} is implausibly large ({info.file_size} bytes)")
    try:
        with zf.open(info) as fh:
            return fh.read(cap + 1)[:cap]
    except (*_CORRUPT_ENTRY, OSError) as exc:
        raise IntegrityError(f"ZIP entry {info.filename!r} is corrupt ({exc})") from None


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, series_uid: str) -> tuple[str, bytes]:
    """Stream one entry to ``target`` (new file, no following of links); returns its MD5 and its
    first chunk (the DICOM header is read from there rather than from the file again).

    Written with ``os.write`` on the raw descriptor: no second buffer, and hashing and writing
    release the GIL, so the event loop keeps running while a worker thread unpacks.
    """
    md5 = hashlib.md5()
    written = 0
    head = b""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        raise classify_os_error(exc, f"{target.name}") from None
    # zipfile inflates a read of n bytes holding about four buffers of n (the compressed read,
    # its unconsumed tail, their concatenation, the output): read DEFLATED entries in smaller steps
    step = _CHUNK if info.compress_type == zipfile.ZIP_STORED else _INFLATE_CHUNK
    try:
        with zf.open(info) as src:
            while True:
                chunk = src.read(step)
                if not chunk:
                    break
                written += len(chunk)
                if written > info.file_size:  # never trust the header beyond what it declared
                    raise UnsafeArchiveError(f"ZIP entry {info.filename!r} is longer than declared",
                                             series_uid=series_uid)
                if not head:  # keep the header's bytes, not a whole chunk of pixel data
                    head = chunk if len(chunk) == info.file_size else chunk[:_HEAD_BYTES]
                md5.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
    except _CORRUPT_ENTRY as exc:
        raise IntegrityError(f"ZIP entry {info.filename!r} is corrupt ({exc})", series_uid=series_uid) from None
    except OSError as exc:
        raise classify_os_error(exc, target.name) from None
    finally:
        os.close(fd)
    if written != info.file_size:
        raise IntegrityError(f"ZIP entry {info.filename!r} is shorter than declared", series_uid=series_uid)
    return md5.hexdigest(), head
