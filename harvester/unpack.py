"""Verify a downloaded series ZIP and unpack it safely into a staging folder.

Runs in a worker thread (``anyio.to_thread``): it reads, hashes and parses files, which must
never block the event loop. In one pass per entry it streams the bytes to disk, computes the
MD5, and parses the DICOM header.

Checks, in order (each failure raises the error named):

* it is a readable ZIP                                    -> ``IntegrityError``
* no entry is absolute, climbs with ``..``, is a symlink,
  is encrypted, repeats a name, or expands like a zip bomb -> ``UnsafeArchiveError`` (permanent)
* DICOM entry count and total bytes match the archive     -> ``IncompleteSeriesError``
* every entry matches its row in ``md5hashes.csv``          -> ``IntegrityError``
* every entry parses as DICOM of the expected series      -> ``IntegrityError``

Nothing is written outside ``staging``; on any failure the caller deletes ``staging``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import lzma
import os
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from harvester.config import Limits
from harvester.errors import IncompleteSeriesError, IntegrityError, UnsafeArchiveError, classify_os_error
from harvester.layout import instance_filename

LICENSE_NAME = "LICENSE"
MD5_NAME = "md5hashes.csv"
_CHUNK = 1 << 20
# What reading a damaged or mislabelled entry raises besides BadZipFile (a broken deflate stream
# raises zlib.error, an unknown compression method NotImplementedError).
_CORRUPT_ENTRY = (zipfile.BadZipFile, EOFError, ValueError, zlib.error, lzma.LZMAError, NotImplementedError)


@dataclass(frozen=True)
class VerifiedFile:
    name: str            # file name inside the series folder
    size: int
    md5: str
    sop_uid: str
    sop_class_uid: str = ""


@dataclass(frozen=True)
class Repair:
    """A file whose bytes failed their MD5 but whose header still names this series: it can be
    fetched alone with getSingleImage instead of refetching the whole series."""

    name: str
    sop_uid: str
    md5: str


@dataclass(frozen=True)
class UnpackedSeries:
    files: list[VerifiedFile]
    license_text: str | None
    repairs: list[Repair]


def check_entry_name(name: str) -> None:
    """Reject names that could land outside the staging folder. Raises ``UnsafeArchiveError``."""
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
    """``Filename,MD5Hash`` rows -> {file name: md5}; raises ``IntegrityError`` when malformed."""
    try:
        text = data.decode("utf-8-sig")
        reader = csv.DictReader(io.StringIO(text))
        out = {}
        for row in reader:
            name, digest = (row.get("Filename") or "").strip(), (row.get("MD5Hash") or "").strip().lower()
            if name and digest:
                out[name] = digest
    except (UnicodeDecodeError, csv.Error) as exc:
        raise IntegrityError(f"md5hashes.csv is unreadable: {exc}") from None
    return out


def read_dicom_ids(path: Path) -> tuple[str, str, str]:
    """(SeriesInstanceUID, SOPInstanceUID, SOPClassUID) from a DICOM header; ``IntegrityError`` if not DICOM."""
    import pydicom

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


def verify_and_unpack(zip_path: Path, staging: Path, *, series_uid: str, image_count: int | None,
                      file_size: int | None, limits: Limits, max_repairs: int = 0) -> UnpackedSeries:
    """Verify ``zip_path`` against the archive's figures and unpack it into ``staging`` (created).

    Up to ``max_repairs`` files that fail only their MD5 are returned as ``repairs`` (their
    ``VerifiedFile`` carries the expected MD5) for the caller to refetch one by one; one more
    raises ``IntegrityError``.
    """
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        raise IntegrityError(f"download is not a readable ZIP ({exc})", series_uid=series_uid) from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        dicom_infos, md5_info, license_info = _classify_entries(infos, series_uid, limits, file_size)
        announced = sum(i.file_size for i in dicom_infos)
        if image_count is not None and len(dicom_infos) != image_count:
            raise IncompleteSeriesError(
                f"ZIP holds {len(dicom_infos)} of {image_count} files", series_uid=series_uid)
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
            digest = _extract(zf, info, target, series_uid)
            want = expected_md5.get(entry_base) or expected_md5.get(info.filename)
            if want is None:
                raise IntegrityError(f"{entry_base} is not listed in md5hashes.csv", series_uid=series_uid)
            mismatch = digest != want
            if mismatch and len(repairs) >= max_repairs:
                raise IntegrityError(f"{entry_base} does not match its MD5 (got {digest}, expected {want})",
                                     series_uid=series_uid)
            got_series, sop, sop_class = read_dicom_ids(target)
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
                                      sop_class_uid=sop_class))
    return UnpackedSeries(files=files, license_text=license_text, repairs=repairs)


def _classify_entries(infos: list[zipfile.ZipInfo], series_uid: str, limits: Limits, file_size: int | None
                      ) -> tuple[list[zipfile.ZipInfo], zipfile.ZipInfo | None, zipfile.ZipInfo | None]:
    if len(infos) > limits.max_entries:
        raise UnsafeArchiveError(f"ZIP has {len(infos)} entries (limit {limits.max_entries})", series_uid=series_uid)
    names: set[str] = set()
    dicom: list[zipfile.ZipInfo] = []
    md5_info = license_info = None
    total = 0
    budget = None if file_size is None else int(file_size * (1 + limits.max_series_overhead)) + (16 << 20)
    for info in infos:
        check_entry_name(info.filename)
        if _is_symlink(info):
            raise UnsafeArchiveError(f"ZIP entry {info.filename!r} is a symbolic link", series_uid=series_uid)
        if info.flag_bits & 0x1:
            raise UnsafeArchiveError(f"ZIP entry {info.filename!r} is encrypted", series_uid=series_uid)
        base = instance_filename(info.filename)
        if base.lower() in names:
            raise UnsafeArchiveError(f"ZIP repeats the entry name {base!r}", series_uid=series_uid)
        names.add(base.lower())
        if info.file_size > limits.max_entry_bytes:
            raise UnsafeArchiveError(f"ZIP entry {info.filename!r} expands to {info.file_size} bytes",
                                     series_uid=series_uid)
        if info.file_size > (1 << 20) and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise UnsafeArchiveError(
                f"ZIP entry {info.filename!r} has a compression ratio of "
                f"{info.file_size // max(info.compress_size, 1)}:1 (zip bomb?)", series_uid=series_uid)
        total += info.file_size
        if budget is not None and total > budget:
            raise UnsafeArchiveError(f"ZIP expands beyond the series' announced size ({file_size} bytes)",
                                     series_uid=series_uid)
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


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, series_uid: str) -> str:
    """Stream one entry to ``target`` (new file, no following of links); returns its MD5."""
    md5 = hashlib.md5()
    written = 0
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        raise classify_os_error(exc, f"{target.name}") from None
    try:
        with os.fdopen(fd, "wb") as out, zf.open(info) as src:
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                written += len(chunk)
                if written > info.file_size:  # never trust the header beyond what it declared
                    raise UnsafeArchiveError(f"ZIP entry {info.filename!r} is longer than declared",
                                             series_uid=series_uid)
                md5.update(chunk)
                out.write(chunk)
    except _CORRUPT_ENTRY as exc:
        raise IntegrityError(f"ZIP entry {info.filename!r} is corrupt ({exc})", series_uid=series_uid) from None
    except OSError as exc:
        raise classify_os_error(exc, target.name) from None
    if written != info.file_size:
        raise IntegrityError(f"ZIP entry {info.filename!r} is shorter than declared", series_uid=series_uid)
    return md5.hexdigest()
