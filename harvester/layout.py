"""Where each series and file goes on disk.

IDs and descriptions come from the archive and are never trusted as path components:
``safe_component`` turns any string into one harmless name (no separators, no ``..``, no
control or reserved characters, no Windows device names, bounded length). ``assign_paths``
guarantees that two series never share a folder and that no series folder lies inside another.

Layouts: ``classic``, ``descriptive`` (the NBIA Data Retriever's), ``flat``, or a template
such as ``{Collection}/{PatientID}/{StudyDate}-{StudyDescription}/{Modality}-{SeriesNumber}-{SeriesInstanceUID}``.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import re
import string
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath
from typing import Any

from harvester.errors import UsageError

MAX_COMPONENT_BYTES = 120
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                     *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
_UNSAFE_CHARS = re.compile(r'[\x00-\x1f\x7f<>:"|?*\\/]')

LAYOUTS = {
    "classic": "{Collection}/{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}",
    "flat": "{SeriesInstanceUID}",
    "descriptive": None,  # computed by descriptive_parts()
}

TEMPLATE_FIELDS = {
    "Collection", "PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "StudyID",
    "StudyDescription", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "SeriesDate",
    "Modality", "BodyPartExamined", "Manufacturer", "ManufacturerModelName", "ProtocolName", "Site",
}


def safe_component(value: Any, *, max_bytes: int = MAX_COMPONENT_BYTES) -> str:
    """One safe path component from any value.

    The result is non-empty, contains no separator, control or reserved character, is not
    ``.``/``..`` or a Windows device name, has no trailing dot or space, and is at most
    ``max_bytes`` UTF-8 bytes (a truncated name gets a short hash so it stays distinct).
    """
    raw = "" if value is None else str(value)
    text = unicodedata.normalize("NFC", raw)
    text = text.replace("/", "-").replace("\\", "-")
    text = _UNSAFE_CHARS.sub("_", text)
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else "_" for ch in text)
    text = " ".join(text.split())  # fold runs of white space
    text = text.rstrip(". ")
    if not text or set(text) <= {"."}:
        text = "_"
    # Windows ignores the extension and trailing spaces: "con .txt" is the console too.
    if text.split(".")[0].rstrip(" ").upper() in _WINDOWS_RESERVED:
        text = "_" + text
    encoded = text.encode("utf-8")
    if len(encoded) > max_bytes:
        # The digest is of the raw value: inputs that sanitise alike ("a/b", "a\\b") stay distinct.
        digest = hashlib.sha1(raw.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        cut = encoded[: max_bytes - 9].decode("utf-8", "ignore").rstrip(". ")
        text = f"{cut}~{digest}"
    return text


def name_key(name: str) -> str:
    """The one rule for "same name" of files and folders: Unicode case folding (``casefold``,
    which also folds ``ß`` to ``ss``, where ``lower`` does not). macOS and Windows treat names
    that differ only in case as one, and a tree harvested on Linux is often copied there."""
    return name.casefold()


def _nbia_date(value: Any) -> str:
    """Dates as the Data Retriever writes them: MM-DD-YYYY (input: ISO, DICOM or NBIA forms)."""
    text = "" if value is None else str(value).strip()
    for fmt, width in (("%Y-%m-%d", 10), ("%Y%m%d", 8), ("%m-%d-%Y", 10), ("%m/%d/%Y", 10)):
        try:
            return dt.datetime.strptime(text[:width], fmt).strftime("%m-%d-%Y")
        except ValueError:
            continue
    return text


def _number(value: Any) -> str:
    if value is None or value == "":
        return ""
    try:
        number = float(value)
        return str(int(number)) if number.is_integer() else str(value)
    except (TypeError, ValueError):
        return str(value)


def _join(parts: Iterable[Any]) -> str:
    return "-".join(str(p) for p in parts if p not in (None, ""))


def descriptive_parts(fields: Mapping[str, Any]) -> list[str]:
    """The NBIA Data Retriever's default layout (descriptions cut to 53 characters, '/' -> '-')."""
    study_uid = str(fields.get("StudyInstanceUID", ""))
    series_uid = str(fields.get("SeriesInstanceUID", ""))
    study = _join([
        _nbia_date(fields.get("StudyDate")),
        fields.get("StudyID") or "",
        str(fields.get("StudyDescription") or "")[:53].replace("/", "-"),
        study_uid[-5:],
    ])
    series = _join([
        _number(fields.get("SeriesNumber")),
        str(fields.get("SeriesDescription") or "")[:53].replace("/", "-"),
        series_uid[-5:],
    ])
    return [str(fields.get("Collection", "")), str(fields.get("PatientID", "")), study, series]


def check_layout(layout: str) -> str:
    """Validate a layout name or template; returns it. Raises ``UsageError``."""
    if layout in LAYOUTS:
        return layout
    if "{" not in layout:
        raise UsageError(f"unknown layout {layout!r}", hint="use classic, descriptive, flat, or a {Field}/... template")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(layout) if name is not None]
    except ValueError as exc:
        raise UsageError(f"layout template {layout!r} is malformed: {exc}") from None
    names = [name for name, _, _ in fields]
    unknown = [n for n in names if n not in TEMPLATE_FIELDS]
    if unknown:
        raise UsageError(f"layout template uses unknown field {{{unknown[0]}}}",
                         hint=f"fields: {', '.join(sorted(TEMPLATE_FIELDS))}")
    for name, spec, conv in fields:
        # Values are strings from the archive: a spec like {SeriesNumber:d} would fail for every
        # series at harvest time, and a width like {Collection:>999999999} would exhaust memory.
        if spec or conv:
            shown = f"{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}"
            raise UsageError(f"layout template field {shown} has a format spec or conversion; use plain {{{name}}}")
    if layout.startswith("/") or any(part in ("", ".", "..") for part in layout.split("/")):
        raise UsageError(f"layout template {layout!r} must be relative, without empty, '.' or '..' parts")
    return layout


def series_parts(fields: Mapping[str, Any], layout: str) -> list[str]:
    """The raw (unsanitised) path parts of a series folder."""
    if layout == "descriptive":
        return descriptive_parts(fields)
    template = LAYOUTS.get(layout) or layout
    values = {name: ("" if fields.get(name) is None else str(fields.get(name))) for name in TEMPLATE_FIELDS}
    values["SeriesNumber"] = _number(fields.get("SeriesNumber"))
    # Each template segment is formatted separately so a value can never add a separator.
    return [seg.format_map(values) for seg in template.split("/")]


#: First components the harvester keeps for itself: a series folder there would be emptied with tmp/.
RESERVED_TOP = frozenset({".harvester"})


def series_path(fields: Mapping[str, Any], layout: str) -> PurePosixPath:
    parts = [safe_component(p) for p in series_parts(fields, layout)]
    if name_key(parts[0]) in RESERVED_TOP:  # a collection named ".harvester" by a hostile archive
        parts[0] = safe_component("_" + parts[0])
    return PurePosixPath(*parts)


def assign_paths(items: Iterable[tuple[str, Mapping[str, Any]]], layout: str,
                 taken: Mapping[str, str] | None = None) -> dict[str, str]:
    """Map SeriesInstanceUID -> relative folder, unique per series and never nested in another.

    ``taken`` holds folders already recorded for series (from an earlier run): they are kept,
    so a resumed run never moves a finished series. A collision gets a suffix from the UID.
    """
    taken = dict(taken or {})
    result: dict[str, str] = {}
    used = _FolderSet(taken.values())
    for uid, fields in items:
        if uid in taken:
            result[uid] = taken[uid]
            continue
        path = series_path(fields, layout)
        # A series folder recorded by an earlier run (another layout) may be a parent of this path;
        # renaming the last part would never get out of it, so rename the part that is that folder.
        for depth in range(1, len(path.parts)):
            if used.is_folder(str(PurePosixPath(*path.parts[:depth]))):
                head = safe_component(f"{path.parts[depth - 1]}~{hashlib.sha1(uid.encode()).hexdigest()[:10]}")
                path = PurePosixPath(*path.parts[:depth - 1], head, *path.parts[depth:])
                break
        candidate = str(path)
        if used.clashes(candidate):
            suffix = hashlib.sha1(uid.encode()).hexdigest()[:10]
            candidate = str(path.with_name(safe_component(f"{path.name}~{suffix}")))
            n = 2
            while used.clashes(candidate):
                candidate = str(path.with_name(safe_component(f"{path.name}~{suffix}-{n}")))
                n += 1
        used.add(candidate)
        result[uid] = candidate
    return result


class _FolderSet:
    """Series folders in use, plus every ancestor of them, for O(depth) clash checks.

    Compared by ``name_key``: on macOS and Windows ``abc`` and ``ABC`` are one folder.
    """

    def __init__(self, folders: Iterable[str] = ()) -> None:
        self.folders: set[str] = set()
        self.ancestors: set[str] = set()
        for f in folders:
            self.add(f)

    def add(self, folder: str) -> None:
        folder = name_key(folder)
        self.folders.add(folder)
        self.ancestors.update(str(p) for p in PurePosixPath(folder).parents if str(p) != ".")

    def is_folder(self, folder: str) -> bool:
        return name_key(folder) in self.folders

    def clashes(self, candidate: str) -> bool:
        # Same folder, a folder that contains a series, or one inside a series: files would mix.
        candidate = name_key(candidate)
        if candidate in self.folders or candidate in self.ancestors:
            return True
        return any(str(p) in self.folders for p in PurePosixPath(candidate).parents)


def instance_filename(entry_name: str) -> str:
    """The file name for a ZIP entry (already checked safe by unpack): its sanitised base name."""
    return safe_component(PurePosixPath(entry_name).name)
