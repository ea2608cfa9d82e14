"""Annotation files of a series (LIDC-IDRI's radiologist reads, ``069.xml``): checked and
placed beside its DICOM files.

NBIA has no annotation-only endpoint: the v1 download endpoint the Java Data Retriever uses,
``v1/getDCMImage?SeriesInstanceUID=<uid>&IncludeAnnotation=true``, answers a ZIP of the series'
DICOM files followed by one entry per annotation file, named by its base name
(``docs/annotations.md`` has the server source). The series' verified DICOM files come from
getImage; here only the annotation entries (``.xml``) of that ZIP are kept. The ZIP is streamed
into the store's ``AnnotationZipSink`` (``harvester.store.sink``), which reads it through and
applies the checks here: ``annotation_name`` and ``check_xml``.

Every byte is hostile. ``annotation_name`` raises ``UnsafeArchiveError`` (permanent) for a
name that is not a bare safe file name; ``check_xml`` raises ``IntegrityError`` (retried) for
text that is not well-formed XML (a DTD, and so any entity declaration, is refused: no billion
laughs). The sink refuses a repeated name, too many or too large files, a broken ZIP or a CRC
mismatch, and writes nothing outside ``staging``; on any failure the caller deletes ``staging``.
"""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any
from xml.parsers import expat

from harvester.errors import IntegrityError, UnsafeArchiveError
from harvester.store.layout import safe_component

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
    """What ``stream_series_zip`` needs of a client (``config``, ``retrying``, ``series_url``,
    ``open_series``), opening the annotated download instead of getImage, so the same retrying
    streamer feeds it to its sink."""

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


def annotation_name(entry: str, series_uid: str) -> str:
    """The entry's name if it is a bare file name that is safe as it is, else refuse the series."""
    if "/" in entry or "\\" in entry or safe_component(entry) != entry:
        raise UnsafeArchiveError(f"annotation entry with an unsafe name: {entry!r}", series_uid=series_uid)
    return entry


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
