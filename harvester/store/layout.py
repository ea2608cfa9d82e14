"""Where each series and file goes on disk.

IDs and descriptions come from the archive and are never trusted as path components:
``safe_component`` turns any string into one harmless name (no separators, no ``..``, no
control or reserved characters, no Windows device names, bounded length). ``assign_paths``
guarantees that two series never share a folder and that no series folder lies inside another.

Layouts: ``descriptive`` (the Java NBIA Data Retriever's default, value for value), ``classic``
(the Java Retriever's other one), ``tcia2026`` (TCIA's 2026 Go Data Retriever: the classic folders,
``metadata/metadata.csv``), ``flat``, or a template such as
``{Collection}/{PatientID}/{StudyDate}-{StudyDescription}/{Modality}-{SeriesNumber}-{SeriesInstanceUID}``.
"""
from __future__ import annotations

import hashlib
import re
import string
import unicodedata
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import PurePosixPath
from typing import Any, Protocol

from harvester.dates import nbia_date, parse_archive_date
from harvester.errors import UsageError

MAX_COMPONENT_BYTES = 120
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                     *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
_UNSAFE_CHARS = re.compile(r'[\x00-\x1f\x7f<>:"|?*\\/]')

LAYOUTS = {
    "classic": "{Collection}/{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}",
    "tcia2026": "{Collection}/{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}",
    "flat": "{SeriesInstanceUID}",
    "descriptive": None,  # computed by descriptive_parts()
}
#: Layouts whose metadata.csv goes to ``metadata/metadata.csv`` (TCIA's 2026 Data Retriever), not DIR.
METADATA_IN_SUBFOLDER = {"tcia2026"}

# The NBIA server hands the Data Retriever descriptions reduced to these characters, deleting every
# other one (DownloadServletV4.cleanStr: ``replaceAll("[^a-zA-Z0-9 .-]", "")``); so "HEAD & NECK"
# becomes "HEAD  NECK" and "PET/CT" becomes "PETCT".
_NOT_RETRIEVER_CHAR = re.compile(r"[^A-Za-z0-9 .-]")
RETRIEVER_DESCRIPTION_MAX = 53

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
    # Every white space becomes one plain space, runs kept: the Data Retriever writes
    # "PETCT HEAD  NECK CA", and a name it writes that is already safe must stay as it is.
    text = "".join(" " if ch.isspace() else ch for ch in text).strip(" ")
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


def _number(value: Any) -> str:
    if value is None or value == "":
        return ""
    try:
        number = float(value)
        return str(int(number)) if number.is_integer() else str(value)
    except (TypeError, ValueError):
        return str(value)


def _absent(value: Any) -> bool:
    """The Retriever leaves a part out when its value is empty or the text ``null`` (Java's
    string of a null)."""
    return value is None or str(value) in ("", "null")


def retriever_text(value: Any) -> str:
    """A description as the NBIA server gives it to the Data Retriever: every character outside
    ``[A-Za-z0-9 .-]`` deleted (runs of spaces that leaves stay), and ``NA`` when nothing is left
    or there was no value (``cleanStr``; LIDC's empty descriptions are the ``NA-NA`` of its folders)."""
    text = "" if _absent(value) else _NOT_RETRIEVER_CHAR.sub("", str(value))
    return text or "NA"


def _retriever_description(value: Any) -> str:
    """A description part of a descriptive folder name ("" when it is left out).

    Order, as the values travel: the server reduces the text to its character set (which deletes
    ``/``, so the Retriever's own ``/`` -> ``-`` has nothing left to replace), the Retriever cuts
    it to 53 characters and drops a description that is just ``-``.
    """
    text = retriever_text(value)[:RETRIEVER_DESCRIPTION_MAX]
    return "" if text == "-" else text


def _retriever_study_id(value: Any) -> str:
    """StudyID: reduced to the server's character set like a description, but left out when there
    is none (Lung-PET-CT-Dx's ``04-25-2007-ThoraxAThoraxRoutine Adult-34834`` has no StudyID part)."""
    return "" if _absent(value) else _NOT_RETRIEVER_CHAR.sub("", str(value))


def retriever_series_number(value: Any) -> str:
    """SeriesNumber as the Retriever prints it: the database decimal, ``3000566.000000`` ("" when absent).

    A value that is not a plain number (never sent by NBIA; a hostile server might) is kept as text;
    a huge exponent is never expanded.
    """
    text = "" if value is None else str(value).strip()
    if _absent(text):
        return ""
    try:
        number = Decimal(text)
    except InvalidOperation:
        return text
    if not number.is_finite() or number.adjusted() >= 18:   # adjusted(): the exponent, no arithmetic
        return text
    return f"{number:.6f}"


def retriever_date(value: Any) -> str:
    """StudyDate as the Retriever writes it, ``MM-DD-YYYY`` ("" when absent; unreadable text is kept)."""
    text = "" if value is None else str(value).strip()
    if _absent(text):
        return ""
    day = parse_archive_date(text)
    return nbia_date(day) if day is not None else text


def _join(parts: Iterable[str]) -> str:
    return "-".join(p for p in parts if p)


def descriptive_parts(fields: Mapping[str, Any]) -> list[str]:
    """The Java NBIA Data Retriever's default layout, value for value:
    ``Collection/PatientID/<StudyDate>-<StudyID>-<StudyDescription>-<last 5 of StudyUID>/
    <SeriesNumber>-<SeriesDescription>-<last 5 of SeriesUID>``, each part left out when empty.

    The parts are raw: ``series_path`` still makes each one safe (it changes none that is already).
    """
    study_uid = "" if fields.get("StudyInstanceUID") is None else str(fields.get("StudyInstanceUID"))
    series_uid = "" if fields.get("SeriesInstanceUID") is None else str(fields.get("SeriesInstanceUID"))
    study = _join([
        retriever_date(fields.get("StudyDate")),
        _retriever_study_id(fields.get("StudyID")),
        _retriever_description(fields.get("StudyDescription")),
        study_uid[-5:],
    ])
    series = _join([
        retriever_series_number(fields.get("SeriesNumber")),
        _retriever_description(fields.get("SeriesDescription")),
        series_uid[-5:],
    ])
    return [str(fields.get("Collection", "")), str(fields.get("PatientID", "")), study, series]


def check_layout(layout: str) -> str:
    """Validate a layout name or template; returns it. Raises ``UsageError``."""
    if layout in LAYOUTS:
        return layout
    if "{" not in layout:
        raise UsageError(f"unknown layout {layout!r}",
                         hint="use descriptive, classic, tcia2026, flat, or a {Field}/... template")
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


class Folders(Protocol):
    """The series folders in use and their ancestors, compared by ``name_key`` (``_FolderSet`` in
    memory; ``store.db.FolderIndex`` in a scratch database, for plans of archive size)."""

    def add(self, folder: str) -> None: ...
    def is_folder(self, folder: str) -> bool: ...
    def clashes(self, candidate: str) -> bool: ...


def assign_paths(items: Iterable[tuple[str, Mapping[str, Any]]], layout: str,
                 taken: Mapping[str, str] | None = None, *, folders: Folders | None = None,
                 seeded: bool = False) -> dict[str, str]:
    """Map SeriesInstanceUID -> relative folder, unique per series and never nested in another.

    ``taken`` holds folders already recorded for series (from an earlier run): they are kept,
    so a resumed run never moves a finished series. A collision gets a suffix from the UID.
    ``folders`` (empty) keeps the folders in use instead of a set in memory; ``seeded``: it
    holds ``taken``'s folders and those of earlier calls already (a plan assigned a batch at a
    time, into one ``folders``).
    """
    taken = taken or {}
    result: dict[str, str] = {}
    used = folders if folders is not None else _FolderSet()
    for folder in taken.values() if not seeded else ():
        used.add(folder)
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
