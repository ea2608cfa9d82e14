"""Annotation files of a series (LIDC-IDRI's radiologist reads, ``069.xml``): checked and
placed beside its DICOM files.

NBIA has no annotation-only endpoint: the v1 download endpoint the Java Data Retriever uses,
``v1/getDCMImage?SeriesInstanceUID=<uid>&IncludeAnnotation=true``, answers a ZIP of the series'
DICOM files followed by one entry per annotation file, named by its base name
(``docs/annotations.md`` has the server source). The series' verified DICOM files come from
getImage; here only the annotation entries (``.xml``) of that ZIP are read, everything else in
it is skipped.

Every byte is hostile. ``unpack_annotations`` raises ``UnsafeArchiveError`` (permanent) for a
name that is not a bare safe file name, a repeated name, too many or too large files, and
``IntegrityError`` (retried) for a broken ZIP, a CRC mismatch or text that is not well-formed
XML (a DTD, and so any entity declaration, is refused: no billion laughs). Nothing is written
outside ``staging``; on any failure the caller deletes ``staging``.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import zipfile
import zlib
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from xml.parsers import expat

from harvester.errors import IntegrityError, UnsafeArchiveError, classify_os_error
from harvester.store.layout import safe_component
from harvester.models import AnnotationFile
from harvester.unpack import check_entry_name

ANNOTATION_SUFFIX = ".xml"
MAX_ANNOTATION_BYTES = 64 * 1024 ** 2      # one file; LIDC's reads are tens of kilobytes
MAX_ANNOTATIONS = 1000                     # per series


def has_annotations(row: Mapping[str, Any]) -> bool:
    """Whether a getSeries row says the series has annotation files (``AnnotationsFlag``, sent
    as a JSON boolean or as ``Yes``/``true``/``1`` text)."""
    flag = row.get("AnnotationsFlag")
    if isinstance(flag, bool):
        return flag
    return str(flag).strip().lower() in ("yes", "true", "1", "y")


class AnnotationOpener:
    """What ``fetch_series_zip`` needs of a client (``config``, ``retrying``, ``series_url``,
    ``open_series``), opening the
    annotated download instead of getImage, so the same retrying streamer writes it."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.config = client.config

    def retrying(self) -> Any:
        return self.client.retrying()

    def series_url(self, series_uid: str, collection: str | None) -> str:
        return self.client.annotated_series_url(series_uid, collection)

    @contextlib.asynccontextmanager
    async def open_series(self, series_uid: str, collection: str | None) -> AsyncIterator[Any]:
        async with self.client.open_annotated_series(series_uid, collection) as resp:
            yield resp


def unpack_annotations(zip_path: Path, staging: Path, *, series_uid: str,
                       taken: Iterable[str] = ()) -> list[AnnotationFile]:
    """Check every annotation entry of the getDCMImage ZIP at ``zip_path`` and write it into
    ``staging``; ``taken`` are the names of the series' DICOM files there. Blocking: run it in a
    worker thread. Raises as the module docstring says."""
    used = {name.casefold() for name in taken}
    out: list[AnnotationFile] = []
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                check_entry_name(info.filename)
                if not info.filename.lower().endswith(ANNOTATION_SUFFIX):
                    continue        # a DICOM file or md5hashes.csv: the series' own download has them
                name = _annotation_name(info.filename, series_uid)
                if name.casefold() in used:
                    raise UnsafeArchiveError(f"annotation {name!r} repeats a file name of the series",
                                             series_uid=series_uid)
                if len(out) >= MAX_ANNOTATIONS:
                    raise UnsafeArchiveError(f"more than {MAX_ANNOTATIONS} annotation files",
                                             series_uid=series_uid)
                if info.flag_bits & 0x1:
                    raise UnsafeArchiveError(f"annotation {name!r} is encrypted", series_uid=series_uid)
                data = _read_capped(zf, info, name, series_uid)
                check_xml(data, name, series_uid)
                used.add(name.casefold())
                out.append(_write(staging / name, data, name))
    except (zipfile.BadZipFile, EOFError, ValueError, zlib.error, NotImplementedError) as exc:
        raise IntegrityError(f"the annotated download is not a readable ZIP: {exc}", series_uid=series_uid) from None
    return out


def _annotation_name(entry: str, series_uid: str) -> str:
    """The entry's name if it is a bare file name that is safe as it is, else refuse the series."""
    if "/" in entry or "\\" in entry or safe_component(entry) != entry:
        raise UnsafeArchiveError(f"annotation entry with an unsafe name: {entry!r}", series_uid=series_uid)
    return entry


def _read_capped(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, series_uid: str) -> bytes:
    """The entry's bytes, refusing more than MAX_ANNOTATION_BYTES whatever the header claims;
    zipfile checks the CRC-32 when the entry is read to its end."""
    if info.file_size > MAX_ANNOTATION_BYTES:
        raise UnsafeArchiveError(f"annotation {name!r} is larger than {MAX_ANNOTATION_BYTES} bytes",
                                 series_uid=series_uid)
    with zf.open(info) as fh:
        data = fh.read(MAX_ANNOTATION_BYTES + 1)
    if len(data) > MAX_ANNOTATION_BYTES:
        raise UnsafeArchiveError(f"annotation {name!r} expands past {MAX_ANNOTATION_BYTES} bytes",
                                 series_uid=series_uid)
    return data


class _Refused(Exception):
    pass


def check_xml(data: bytes, name: str, series_uid: str = "") -> None:
    """Raise ``IntegrityError`` unless ``data`` is one well-formed XML document without a DTD."""
    parser = expat.ParserCreate()

    def refuse(*_: Any) -> None:
        raise _Refused("a DTD or entity declaration")

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    try:
        parser.Parse(data, True)
    except _Refused as exc:
        raise IntegrityError(f"annotation {name!r} holds {exc}, which is refused", series_uid=series_uid) from None
    except expat.ExpatError as exc:
        raise IntegrityError(f"annotation {name!r} is not well-formed XML: {exc}", series_uid=series_uid) from None


def _write(target: Path, data: bytes, name: str) -> AnnotationFile:
    try:
        # O_EXCL: never through a file or link already there (the names were checked unique).
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        raise classify_os_error(exc, name) from None
    return AnnotationFile(name=PurePosixPath(target).name, size=len(data), md5=hashlib.md5(data).hexdigest())
