"""The archive model served by ``harvester serve``: series, their instances, and fast queries.

Both backends produce an :class:`Archive`: :func:`load_harvest_dir` re-publishes a harvested
output directory (through its state database, :class:`StateArchive`, in bounded memory; from
``harvest.json`` in memory for a harvest made before the database), and
:mod:`harvester.server.synthetic` generates one.
The HTTP layer (:mod:`harvester.server.app`) only ever asks an ``Archive``; it never walks
the file system, so it cannot serve a path the backend did not vouch for.

Invariants held by every ``Archive``:

* ``series`` keys are unique SeriesInstanceUIDs, in a deterministic insertion order;
* every ``InstanceRecord.path`` is absolute and resolved (no link on the way) and was checked by
  its backend to be a regular file inside the backend's root (no ``..``, no absolute path from
  metadata, no symlink escape); it is opened at request time with
  ``harvester.containment.open_indexed``, so a file or folder swapped for a link after loading
  is refused (the download is cut short), never served;
* ``row["ImageCount"] == len(instances)`` and ``row["FileSize"] == sum(sizes)``, so what the
  query endpoints announce is exactly what the download endpoints send.
"""
from __future__ import annotations

import bisect
import contextlib
import datetime as dt
import functools
import hashlib
import json
import logging
import os
import re
import sqlite3
import stat
import threading
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from harvester.containment import open_indexed, read_bytes
from harvester.dates import nbia_date, parse_archive_date
from harvester.errors import HarvesterError, UsageError
from harvester.redact import redact
from harvester.store.db import DB_NAME, plain_name
from harvester.store.state import HarvestState, json_record, record_problem

log = logging.getLogger(__name__)

HARVEST_SCHEMA = "harvester/1"

#: getSeries columns, in the order the page lists them (also the CSV column order).
SERIES_FIELDS: tuple[str, ...] = (
    "SeriesInstanceUID", "StudyInstanceUID", "Modality", "ProtocolName", "SeriesDate",
    "SeriesDescription", "BodyPartExamined", "SeriesNumber", "AnnotationsFlag", "Collection",
    "Site", "PatientID", "PatientSex", "PatientAge", "Manufacturer", "ManufacturerModelName",
    "SoftwareVersions", "ImageCount", "MaxSubmissionTimestamp", "LicenseName", "LicenseURI",
    "DataDescriptionURI", "FileSize", "ReleasedStatus", "DateReleased", "StudyDesc", "StudyDate",
    "ThirdPartyAnalysis",
)
#: getPatient columns (note the lower-case ``d`` in ``PatientId``).
PATIENT_FIELDS: tuple[str, ...] = (
    "PatientId", "PatientName", "PatientSex", "EthnicGroup", "Collection", "Phantom",
    "SpeciesCode", "SpeciesDescription",
)
#: getPatientStudy columns.
STUDY_FIELDS: tuple[str, ...] = (
    "StudyInstanceUID", "StudyDate", "StudyDescription", "AdmittingDiagnosesDescription",
    "StudyID", "PatientAge", "PatientID", "PatientName", "PatientSex", "EthnicGroup",
    "Collection", "SeriesCount", "LongitudinalTemporalEventType",
    "LongitudinalTemporalOffsetFromEvent", "Phantom", "SpeciesCode", "SpeciesDescription",
)

#: getSeries filter parameters -> whether matching ignores case. NBIA's v4 DAO queries compare
#: ``UPPER(column) = UPPER(value)`` for these six; UIDs match exactly.
SERIES_FILTERS: dict[str, bool] = {
    "Collection": True,
    "PatientID": True,
    "StudyInstanceUID": False,
    "SeriesInstanceUID": False,
    "Modality": True,
    "BodyPartExamined": True,
    "Manufacturer": True,
    "ManufacturerModelName": True,
}

#: Query JSON fields that hold a date: ``MM-DD-YYYY`` on v4, ``YYYY-MM-DD HH:MM:SS.f`` on v1/v2.
DATE_FIELDS: frozenset[str] = frozenset({"SeriesDate", "StudyDate", "DateReleased", "MaxSubmissionTimestamp"})
#: Query JSON fields that hold a number: JSON numbers by default, strings in the proxy mode.
NUMBER_FIELDS: frozenset[str] = frozenset({"SeriesNumber", "FileSize", "TotalSizeInBytes", "ImageCount",
                                           "ObjectCount", "SeriesCount"})
#: Sizes that deployments sending strings write as Java doubles (``"1234.0"``).
_DOUBLE_FIELDS = frozenset({"FileSize", "TotalSizeInBytes"})
_V2_STAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d+$")

DEFAULT_LICENSE_NAME = "Creative Commons Attribution 4.0 International License"
DEFAULT_LICENSE_URI = "https://creativecommons.org/licenses/by/4.0/"


@dataclass(frozen=True)
class InstanceRecord:
    """One DICOM file the archive serves.

    ``crc32`` may be ``None`` when the backend did not compute it (a harvested directory
    only records MD5s); :meth:`Archive.crc32_of` computes and caches it on first use.
    """

    sop_uid: str
    path: Path
    size: int
    md5: str
    crc32: int | None
    instance_number: int


@dataclass(frozen=True)
class AnnotationRecord:
    """One annotation file of a series (an LIDC-style read, ``069.xml``), served by v1 getDCMImage."""

    name: str
    path: Path
    size: int
    crc32: int


@dataclass
class SeriesRecord:
    """One series: its getSeries row, its patient and study rows, and its files.

    ``hostile_kind`` names the attack a synthetic HOSTILE series carries (``None`` for honest
    series); ``prebuilt_zip`` is then the exact ZIP its download endpoints send verbatim.
    """

    row: dict[str, Any]
    patient: dict[str, Any]
    study: dict[str, Any]
    instances: list[InstanceRecord]
    license_text: str
    hostile_kind: str | None = None
    prebuilt_zip: Path | None = None
    annotations: tuple[AnnotationRecord, ...] = ()

    @property
    def uid(self) -> str:
        return str(self.row["SeriesInstanceUID"])

    @property
    def total_bytes(self) -> int:
        return sum(inst.size for inst in self.instances)


def compact_row(values: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """Keep ``fields`` in their canonical order and drop null or empty values, as NBIA does."""
    return {k: values[k] for k in fields if values.get(k) not in (None, "")}


def license_text_for(row: Mapping[str, Any]) -> str:
    """The LICENSE entry sent first in every ZIP, derived from the series' license columns."""
    name = row.get("LicenseName") or DEFAULT_LICENSE_NAME
    uri = row.get("LicenseURI") or DEFAULT_LICENSE_URI
    return f"{name}\n{uri}\n"


def parse_release_date(value: Any) -> dt.date | None:
    """``DateReleased`` as a date (any format the API has sent), or None if absent/unparsable."""
    return parse_archive_date(value)


def fold_case(value: Any) -> str:
    """The value as NBIA compares it in a case-insensitive filter: SQL ``UPPER``.

    The one folding of the server (indexes, lookups, sorting): ``upper`` rather than ``casefold``,
    because ``UPPER`` is what the real queries run ("ß" stays "ß" there and must not match "ss").
    """
    return str(value).upper()


def _wire_date(value: Any, style: str) -> Any:
    """A date field as the API version ``style`` (``"v4"`` or ``"v2"``) sends it; a value that
    is not a readable date (a list, from a hostile harvest.json) is passed on as it is."""
    return _wire_date_text(value, style) if isinstance(value, str) else _convert_date(value, style)


@functools.lru_cache(maxsize=1 << 16)
def _wire_date_text(value: str, style: str) -> Any:
    """:func:`_convert_date`, cached: an archive has few distinct dates and many rows, and
    parsing them was most of the cost of rendering a row."""
    return _convert_date(value, style)


def _convert_date(value: Any, style: str) -> Any:
    day = parse_archive_date(value)
    if day is None:
        return value
    if style == "v4":
        return nbia_date(day)
    if isinstance(value, str) and _V2_STAMP.match(value.strip()):
        return value.strip()  # already the v2 form: keep its time of day
    return f"{day.isoformat()} 00:00:00.0"


def _wire_number(value: Any, field_name: str, as_string: bool) -> Any:
    """A number field as a JSON number (``3000566``, ``12.5``), or as a string when ``as_string``.

    A value that is not a finite number below 10**19 (metadata of a harvested directory is
    untrusted: ``"1e999999999"`` must not become a billion-digit integer) is passed on as it is.
    """
    if isinstance(value, bool):
        return value
    out: int | float
    if isinstance(value, int):  # how both backends hold them: the common case, kept cheap
        out = value
    else:
        try:
            number = Decimal(str(value).strip())
            if not number.is_finite() or number.adjusted() > 18:  # (adjusted: no arithmetic, no overflow)
                return value
            out = int(number) if number == number.to_integral_value() else float(number)
        except (ArithmeticError, ValueError):  # decimal's InvalidOperation, Overflow, ... included
            return value
    if not as_string:
        return out
    return f"{out}.0" if isinstance(out, int) and field_name in _DOUBLE_FIELDS else str(out)


def wire_row(row: Mapping[str, Any], *, style: str = "v4", numbers_as_strings: bool = False) -> dict[str, Any]:
    """One query row as it goes on the wire: dates in the version's form, numbers as numbers
    (or strings), null and empty values left out. ``row`` is not changed."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if value is None or value == "":
            continue
        if key in DATE_FIELDS:
            value = _wire_date(value, style)
        elif key in NUMBER_FIELDS:
            value = _wire_number(value, key, numbers_as_strings)
        out[key] = value
    return out


def wire_json(value: Any) -> str:
    """Compact JSON as NBIA's Java writer sends it: UTF-8 text, ``/`` escaped as ``\\/``.

    Invariant: outside strings JSON has no ``/``, so replacing every one escapes exactly the
    slashes inside strings, and ``\\/`` is a valid JSON escape of ``/``.
    """
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).replace("/", "\\/")


class Archive:
    """An immutable set of series with the query helpers the NBIA endpoints need.

    Lookups go through indexes built once in ``__init__`` (value -> sorted series positions),
    so filtering a 20,000-series archive costs a dictionary lookup and a set intersection.

    Raises ``ValueError`` when two records share a SeriesInstanceUID.
    """

    #: Why the download endpoints are refused (HTTP 400), for a backend with no files; None serves them.
    download_refusal: str | None = None

    def __init__(self, records: Iterable[SeriesRecord]) -> None:
        self.series: dict[str, SeriesRecord] = {}
        for rec in records:
            if rec.uid in self.series:
                raise ValueError(f"duplicate SeriesInstanceUID {rec.uid}")
            self.series[rec.uid] = rec
        self._records: list[SeriesRecord] = list(self.series.values())
        # Invariant: every posting list is ascending, so results keep insertion order.
        self._index: dict[str, dict[str, list[int]]] = {f: {} for f in SERIES_FILTERS}
        self._sop: dict[str, tuple[SeriesRecord, InstanceRecord]] = {}
        self._study_series = Counter[tuple[str, str]]()
        released: list[tuple[dt.date, int]] = []
        for pos, rec in enumerate(self._records):
            for name, fold in SERIES_FILTERS.items():
                value = rec.row.get(name)
                if value is None:
                    continue
                key = fold_case(value) if fold else str(value)
                self._index[name].setdefault(key, []).append(pos)
            for inst in rec.instances:
                self._sop.setdefault(inst.sop_uid, (rec, inst))
            self._study_series[(str(rec.row.get("Collection", "")), str(rec.row.get("StudyInstanceUID", "")))] += 1
            day = parse_release_date(rec.row.get("DateReleased"))
            if day is not None:
                released.append((day, pos))
        released.sort()
        self._released_days = [day for day, _ in released]
        self._released_pos = [pos for _, pos in released]
        self._row_json: dict[tuple[str, str, bool], str] = {}
        self._crc_cache: dict[Path, int] = {}

    def __len__(self) -> int:
        return len(self._records)

    def get(self, series_uid: str) -> SeriesRecord | None:
        return self.series.get(series_uid)

    def records(self) -> list[SeriesRecord]:
        """All series, in insertion order."""
        return list(self._records)

    def select(self, filters: Mapping[str, str]) -> list[SeriesRecord]:
        """Series matching every given getSeries filter (empty values are ignored).

        Raises ``KeyError`` for a filter name that is not a getSeries parameter.
        """
        postings: list[list[int]] = []
        for name, value in filters.items():
            fold = SERIES_FILTERS[name]
            if value in (None, ""):
                continue
            key = fold_case(value) if fold else value
            hits = self._index[name].get(key)
            if not hits:
                return []
            postings.append(hits)
        if not postings:
            return list(self._records)
        postings.sort(key=len)
        if len(postings) == 1:
            return [self._records[p] for p in postings[0]]
        common = set(postings[0]).intersection(*postings[1:])
        return [self._records[p] for p in sorted(common)]

    def released_after(self, day: dt.date, within: list[SeriesRecord] | None = None) -> list[SeriesRecord]:
        """Series whose DateReleased is strictly after ``day`` (optionally among ``within``)."""
        start = bisect.bisect_right(self._released_days, day)
        positions = sorted(self._released_pos[start:])
        hits = [self._records[p] for p in positions]
        if within is None:
            return hits
        wanted = {rec.uid for rec in within}
        return [rec for rec in hits if rec.uid in wanted]

    @staticmethod
    def distinct(field_name: str, records: Iterable[SeriesRecord]) -> list[str]:
        """Distinct non-empty values of a getSeries column, sorted case-insensitively."""
        values = {str(rec.row[field_name]) for rec in records if rec.row.get(field_name) not in (None, "")}
        return sorted(values, key=lambda v: (fold_case(v), v))

    def collections(self) -> list[str]:
        return self.distinct("Collection", self._records)

    def distinct_of(self, field_name: str, filters: Mapping[str, str]) -> list[str]:
        """``distinct`` of the series matching ``filters`` (the getXValues endpoints)."""
        return self.distinct(field_name, self.select(filters))

    @staticmethod
    def patients_of(records: Iterable[SeriesRecord]) -> list[dict[str, Any]]:
        """getPatient rows for the patients of ``records``, one per (Collection, PatientID)."""
        seen: dict[tuple[str, str], dict[str, Any]] = {}
        for rec in records:
            key = (str(rec.row.get("Collection", "")), str(rec.row.get("PatientID", "")))
            if key not in seen:
                seen[key] = rec.patient
        return list(seen.values())

    def studies_of(self, records: Iterable[SeriesRecord]) -> list[dict[str, Any]]:
        """getPatientStudy rows for the studies of ``records``; SeriesCount counts the whole archive."""
        seen: dict[tuple[str, str], dict[str, Any]] = {}
        for rec in records:
            key = (str(rec.row.get("Collection", "")), str(rec.row.get("StudyInstanceUID", "")))
            if key not in seen:
                row = {**rec.study, "SeriesCount": self._study_series[key]}
                seen[key] = compact_row(row, STUDY_FIELDS)
        return list(seen.values())

    def find_instance(self, sop_uid: str) -> tuple[SeriesRecord, InstanceRecord] | None:
        return self._sop.get(sop_uid)

    def instance_in(self, rec: SeriesRecord, sop_uid: str) -> InstanceRecord | None:
        """Instance ``sop_uid`` of series ``rec`` (getSingleImage), or None: the instance
        ``find_instance`` finds, when it belongs to ``rec``."""
        found = self.find_instance(sop_uid)
        return found[1] if found is not None and found[0] is rec else None

    def row_json(self, rec: SeriesRecord, *, style: str = "v4", numbers_as_strings: bool = False) -> str:
        """The series' getSeries row as wire JSON (:func:`wire_row`), serialised once per form and cached."""
        key = (rec.uid, style, numbers_as_strings)
        text = self._row_json.get(key)
        if text is None:
            text = wire_json(wire_row(rec.row, style=style, numbers_as_strings=numbers_as_strings))
            self._row_json[key] = text
        return text

    def crc32_of(self, inst: InstanceRecord) -> int:
        """The instance's CRC-32, read from disk on first use when the backend did not record it.

        Blocking (reads the file): call it through ``asyncio.to_thread``. Raises ``OSError``.
        """
        if inst.crc32 is not None:
            return inst.crc32
        cached = self._crc_cache.get(inst.path)
        if cached is None:
            cached = file_crc32(inst.path)
            self._crc_cache[inst.path] = cached  # a dict store is atomic under the GIL
        return cached


def file_crc32(path: Path, chunk_size: int = 1 << 20) -> int:
    """CRC-32 of a whole file, read in chunks. Raises ``OSError``."""
    crc = 0
    with open(path, "rb", opener=open_indexed) as fh:
        while chunk := fh.read(chunk_size):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_md5(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 of a whole file, read in chunks. Raises ``OSError``."""
    digest = hashlib.md5()
    with open(path, "rb", opener=open_indexed) as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Backend (a): re-publish a harvested output directory
# --------------------------------------------------------------------------------------------

def resolve_inside(root: Path, relative: str) -> Path | None:
    """The absolute path of ``relative`` under ``root``, or None if it could escape ``root``.

    Refuses absolute paths (POSIX or Windows), any ``..`` component, and anything whose
    resolved location (following symlinks) is not inside ``root``. ``root`` must be resolved.
    """
    if not relative or "\x00" in relative:
        return None
    posix, windows = PurePosixPath(relative), PureWindowsPath(relative)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root:
        return None
    if ".." in posix.parts or ".." in windows.parts:
        return None
    candidate = (root / relative).resolve()
    if candidate != root and not candidate.is_relative_to(root):
        return None
    return candidate


def _derive_row(entry: Mapping[str, Any]) -> dict[str, Any]:
    meta = entry.get("metadata")
    row: dict[str, Any] = dict(meta) if isinstance(meta, Mapping) else {}
    for key in ("SeriesInstanceUID", "Collection", "PatientID", "StudyInstanceUID", "Modality"):
        if row.get(key) in (None, "") and entry.get(key) not in (None, ""):
            row[key] = entry[key]
    return row


def _derive_patient(entry: Mapping[str, Any], row: Mapping[str, Any]) -> dict[str, Any]:
    given = entry.get("patient")
    patient: dict[str, Any] = dict(given) if isinstance(given, Mapping) else {}
    patient.setdefault("PatientId", row.get("PatientID"))
    patient.setdefault("Collection", row.get("Collection"))
    for key in ("PatientName", "PatientSex"):
        if patient.get(key) in (None, "") and row.get(key) not in (None, ""):
            patient[key] = row[key]
    return compact_row(patient, PATIENT_FIELDS)


def _derive_study(entry: Mapping[str, Any], row: Mapping[str, Any]) -> dict[str, Any]:
    given = entry.get("study")
    study: dict[str, Any] = dict(given) if isinstance(given, Mapping) else {}
    defaults = {
        "StudyInstanceUID": row.get("StudyInstanceUID"),
        "PatientID": row.get("PatientID"),
        "Collection": row.get("Collection"),
        "StudyDate": row.get("StudyDate"),
        "StudyDescription": row.get("StudyDesc"),
        "PatientSex": row.get("PatientSex"),
        "PatientAge": row.get("PatientAge"),
    }
    for key, value in defaults.items():
        if study.get(key) in (None, "") and value not in (None, ""):
            study[key] = value
    return compact_row(study, STUDY_FIELDS)


def _harvest_license(root: Path, series_dir: Path | None, row: Mapping[str, Any]) -> str:
    for candidate in ([series_dir / "LICENSE"] if series_dir else []) + [root / "LICENSE"]:
        resolved = resolve_inside(root, os.path.relpath(candidate, root))
        if resolved is not None and resolved.is_file():
            try:
                return resolved.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
    return license_text_for(row)


def _harvest_series(root: Path, entry: Mapping[str, Any], *, full: bool = True) -> SeriesRecord | None:
    """One complete series of harvest.json, or None (with a warning) if it cannot be served safely.

    ``full=False`` checks the same (every path, every file's type and size) but reads no file
    and builds no instance (the record has none, and no LICENSE text): what ``StateArchive``'s
    index needs of a series; its ``get`` builds the full record when asked.
    """
    uid = entry.get("SeriesInstanceUID") or (entry.get("metadata") or {}).get("SeriesInstanceUID")
    if not isinstance(uid, str) or not uid:
        log.warning("harvest.json: skipping a series entry without SeriesInstanceUID")
        return None
    series_dir: Path | None = None
    folder = entry.get("path")
    if isinstance(folder, str) and folder:
        series_dir = resolve_inside(root, folder)
        if series_dir is None:
            log.warning("series %s: path %r escapes the harvest directory; not served", uid, folder)
            return None
    files = entry.get("files")
    if not isinstance(files, list) or not files:
        log.warning("series %s: no files listed; not served", uid)
        return None
    instances: list[InstanceRecord] = []
    count = total = 0
    # one plain name inside the folder resolved above is resolved as it is, unless it is a link
    # (then resolved in full, as any other path); a string until a record needs a Path (1 M files)
    prefix = f"{folder}/" if series_dir is not None else None
    inside = f"{series_dir}{os.sep}" if series_dir is not None else ""
    for number, item in enumerate(files, start=1):
        rel = item.get("path") if isinstance(item, Mapping) else None
        found: str | Path | None = None
        st: os.stat_result | None = None
        if prefix is not None and isinstance(rel, str) and rel.startswith(prefix) \
                and plain_name(name := rel[len(prefix):]):
            try:
                st = os.lstat(inside + name)
            except OSError as err:
                log.warning("series %s: %s: %s; series not served", uid, rel, err.strerror)
                return None
            if stat.S_ISREG(st.st_mode):
                found = inside + name
            else:
                st = None
        if found is None:
            found = resolve_inside(root, rel) if isinstance(rel, str) else None
            if found is None:
                log.warning("series %s: file path %r escapes the harvest directory; series not served", uid, rel)
                return None
            try:
                st = found.stat()
            except OSError as err:
                log.warning("series %s: %s: %s; series not served", uid, rel, err.strerror)
                return None
            if not found.is_file():
                log.warning("series %s: %s is not a regular file; series not served", uid, rel)
                return None
        assert st is not None
        size = item.get("size")
        if isinstance(size, int) and size != st.st_size:
            log.warning("series %s: %s is %d bytes, harvest.json says %d; series not served",
                        uid, rel, st.st_size, size)
            return None
        count += 1
        total += st.st_size
        if not full:
            continue
        path = Path(found)
        md5 = item.get("md5")
        if not isinstance(md5, str) or len(md5) != 32:
            md5 = file_md5(path)
        sop = item.get("SOPInstanceUID")
        instances.append(InstanceRecord(
            sop_uid=str(sop) if sop else f"{uid}.{number}",
            path=path, size=st.st_size, md5=md5.lower(), crc32=None, instance_number=number,
        ))
    row = _derive_row(entry)
    row["SeriesInstanceUID"] = uid
    row["ImageCount"] = count
    row["FileSize"] = total
    row = compact_row(row, SERIES_FIELDS)
    return SeriesRecord(
        row=row,
        patient=_derive_patient(entry, row),
        study=_derive_study(entry, row),
        instances=instances,
        license_text=_harvest_license(root, series_dir, row) if full else "",
    )


def load_harvest_dir(path: str | os.PathLike[str]) -> Archive:
    """Re-publish a harvested output directory: serve every ``status == "complete"`` series.

    The records come from the state database when DIR has one (``HarvestState.read``: read
    only, streamed one record at a time, commits harvest.json does not list yet included),
    else from ``harvest.json`` (a harvest made before the database, or sent without its
    ``.harvester``). Series whose paths would leave the directory (``..``, absolute paths,
    symlinks pointing outside), whose files are missing, or whose sizes changed are skipped
    with a warning.

    Raises :class:`harvester.errors.UsageError` when the state cannot be read, or (without a
    state database) when ``DIR/harvest.json`` is missing, is not JSON, or has another schema.
    """
    root = Path(path).resolve()
    if (root / ".harvester" / DB_NAME).exists() or (root / ".harvester" / DB_NAME).is_symlink():
        return _load_from_state(root)
    manifest = root / "harvest.json"
    try:
        text = read_bytes(manifest).decode("utf-8")   # never blocked on a FIFO
    except FileNotFoundError:
        raise UsageError(f"{root} has no harvest.json (not a harvested output directory)") from None
    except OSError as err:
        raise UsageError(f"cannot read {manifest}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{manifest} is not UTF-8 text: {err.reason}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{manifest} is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("schema") != HARVEST_SCHEMA or not isinstance(doc.get("series"), list):
        raise UsageError(f"{manifest} is not a {HARVEST_SCHEMA} manifest")
    records: list[SeriesRecord] = []
    seen: set[str] = set()
    for entry in doc["series"]:
        if not isinstance(entry, Mapping) or entry.get("status") != "complete":
            continue
        rec = _harvest_series(root, entry)
        if rec is None:
            continue
        if rec.uid in seen:
            log.warning("series %s is listed twice in harvest.json; serving the first", rec.uid)
            continue
        seen.add(rec.uid)
        records.append(rec)
    return Archive(records)


def _load_from_state(root: Path) -> Archive:
    """The archive of a harvest with a state database: a :class:`StateArchive` reading through
    it, or (an old journal holds records past the database, or harvest.json was never imported:
    versions before the database) the in-memory ``Archive`` of every record, as before."""
    state = HarvestState(root)
    try:
        state.read(listed=False, streamed=True)
        if state.db is not None and not state.records.overlay and not state.listed:
            archive = StateArchive(root, state)
            state = None   # the archive's now: it reads through it while it serves
            return archive
        records = [rec for entry in state.records.values() if isinstance(entry, Mapping)
                   and entry.get("status") == "complete" and (rec := _harvest_series(root, entry)) is not None]
    except HarvesterError as exc:
        raise UsageError(f"cannot read the harvest in {root}: {exc}", hint=exc.hint) from None
    except sqlite3.Error as exc:   # the index, in the temporary directory (full?)
        raise UsageError(f"cannot index the harvest in {root} in the temporary directory: {exc}",
                         hint="free space there, or point TMPDIR at a roomier place") from None
    finally:
        if state is not None:
            state.close()
    return Archive(records)


#: getSeries filter -> its column in ``StateArchive``'s index (``k_``: as compared; ``v_``: as sent).
_COLUMNS = {name: name.lower() for name in SERIES_FILTERS}


class _SeriesView(Mapping[str, SeriesRecord]):
    """``StateArchive.series``: uid -> record, each built when asked (``StateArchive.get``)."""

    def __init__(self, archive: StateArchive) -> None:
        self._archive = archive

    def __getitem__(self, uid: str) -> SeriesRecord:
        rec = self._archive.get(uid)
        if rec is None:
            raise KeyError(uid)
        return rec

    def __iter__(self) -> Iterator[str]:
        return iter(self._archive.uids())

    def __len__(self) -> int:
        return len(self._archive)


class StateArchive(Archive):
    """A harvested DIR served through its state database, in memory bounded whatever its size.

    Opening makes one pass over the database's records (streamed: one batch in memory) and
    checks each complete series as ``load_harvest_dir`` always has (every path resolved inside
    DIR, every file a regular file of the recorded size; hostile records skipped with a
    warning), without reading any file. What the queries need of each served series (its
    getSeries, getPatient and getPatientStudy rows, and its filter values, folded as NBIA
    compares them) goes into an index: SQLite's private temporary database (on disk in the
    temporary directory once it outgrows its page cache, deleted when closed), never into DIR,
    which is only read (the state database read-only). Queries are SQL over that index, in the
    state's order. ``get`` reads the series' record again by its UID and builds its instances
    (files checked again, missing MD5s computed, LICENSE read); the last ``KEPT`` are kept.

    Records returned by ``select`` and ``released_after`` carry their rows but no instances:
    the download endpoints go through ``get``. ``find_instance`` (getMD5HashForImage by SOP UID
    alone, v1/v2 only) scans the records, reading only those whose text holds the UID.

    Raises ``UsageError`` (from ``load_harvest_dir``) when the database cannot be read.
    """

    #: Full records (instances built) kept for the next request of the same series.
    KEPT = 64
    #: CRC-32s of files kept (an entry per file: bounded, unlike the in-memory archive's).
    KEPT_CRCS = 1 << 16

    def __init__(self, root: Path, state: HarvestState) -> None:
        assert state.db is not None
        self._root = root
        self._state = state
        self._db = state.db
        self._lock = threading.Lock()      # the index connection, the caches
        self._kept: OrderedDict[str, SeriesRecord] = OrderedDict()
        self._crcs: OrderedDict[Path, int] = OrderedDict()
        # "": a private temporary database, removed when the connection closes
        self._index = sqlite3.connect("", isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE", "cache_size=-4096"):
            self._index.execute(f"PRAGMA {pragma}")
        columns = ", ".join(f"k_{c} TEXT, v_{c} TEXT" for c in _COLUMNS.values())
        self._index.execute(f"CREATE TABLE series (pos INTEGER PRIMARY KEY, uid TEXT NOT NULL UNIQUE, {columns}, "
                            "released INTEGER, parts TEXT NOT NULL, wire TEXT NOT NULL)")
        try:
            self._fill()
        except BaseException:
            self.close()
            raise
        self._count = int(self._index.execute("SELECT count(*) FROM series").fetchone()[0])

    def _fill(self) -> None:
        """The index, from one streamed pass over the state's checked records."""
        insert = (f"INSERT OR IGNORE INTO series (uid, {', '.join(f'k_{c}, v_{c}' for c in _COLUMNS.values())}, "
                  f"released, parts, wire) VALUES ({', '.join('?' * (2 * len(_COLUMNS) + 4))})")
        batch: list[tuple[Any, ...]] = []
        self._index.execute("BEGIN")
        for _, entry in self._state.checked_items():
            if entry.get("status") != "complete":
                continue
            rec = _harvest_series(self._root, entry, full=False)
            if rec is None:
                continue
            batch.append(self._index_row(rec))
            if len(batch) >= 512:
                self._index.executemany(insert, batch)
                batch.clear()
        self._index.executemany(insert, batch)
        for column in _COLUMNS.values():
            if column != "seriesinstanceuid":   # (the UID's UNIQUE index answers it)
                self._index.execute(f"CREATE INDEX by_{column} ON series(k_{column})")
        self._index.execute("CREATE INDEX by_released ON series(released) WHERE released IS NOT NULL")
        self._index.execute("COMMIT")

    @staticmethod
    def _index_row(rec: SeriesRecord) -> tuple[Any, ...]:
        values: list[Any] = [rec.uid]
        for name, fold in SERIES_FILTERS.items():
            value = rec.row.get(name)
            values += [None, None] if value is None else [fold_case(value) if fold else str(value), str(value)]
        day = parse_release_date(rec.row.get("DateReleased"))
        return (*values, day.toordinal() if day is not None else None,
                json.dumps([rec.row, rec.patient, rec.study], ensure_ascii=False), wire_json(wire_row(rec.row)))

    def close(self) -> None:
        """Close the index (its temporary file goes with it) and the state database."""
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._index.close()
            self._state.close()

    # ------------------------------------------------------------ the Archive interface
    @property
    def series(self) -> Mapping[str, SeriesRecord]:  # type: ignore[override]
        return _SeriesView(self)

    def __len__(self) -> int:
        return self._count

    def uids(self) -> list[str]:
        """The served series' UIDs, in the state's order."""
        return [uid for (uid,) in self._query("SELECT uid FROM series ORDER BY pos")]

    def records(self) -> list[SeriesRecord]:
        """Every series with its instances (all in memory: for tests and small harvests)."""
        return [rec for uid in self.uids() if (rec := self.get(uid)) is not None]

    def get(self, series_uid: str) -> SeriesRecord | None:
        """The served series ``series_uid`` with its instances, or None (not served, or its
        record or files no longer pass the checks: then with a warning)."""
        with self._lock:
            kept = self._kept.get(series_uid)
            if kept is not None:
                self._kept.move_to_end(series_uid)
                return kept
        if not self._query("SELECT 1 FROM series WHERE uid=?", (series_uid,)):
            return None
        try:
            got = self._db.get(series_uid)
        except HarvesterError as exc:
            log.warning("series %s: %s; not served", series_uid, exc)
            return None
        entry = json_record(got[0]) if got is not None else None
        why = record_problem(entry) if entry is not None else "the record is not a JSON object"
        if why is None and entry is not None and entry.get("SeriesInstanceUID") != series_uid:
            why = "the record names another series"
        if why is not None or entry is None or entry.get("status") != "complete":
            log.warning("series %s: %s; not served", series_uid, redact(why or "no longer complete"))
            return None
        rec = _harvest_series(self._root, entry)
        if rec is not None:
            with self._lock:
                self._kept[series_uid] = rec
                while len(self._kept) > self.KEPT:
                    self._kept.popitem(last=False)
        return rec

    def select(self, filters: Mapping[str, str]) -> list[SeriesRecord]:
        """As ``Archive.select``. Raises ``KeyError`` for a filter that is not a getSeries parameter."""
        return self._records_where(*self._where(filters))

    def released_after(self, day: dt.date, within: list[SeriesRecord] | None = None) -> list[SeriesRecord]:
        hits = self._records_where("released > ?", [day.toordinal()])
        if within is None:
            return hits
        wanted = {rec.uid for rec in within}
        return [rec for rec in hits if rec.uid in wanted]

    def collections(self) -> list[str]:
        return self.distinct_of("Collection", {})

    def distinct_of(self, field_name: str, filters: Mapping[str, str]) -> list[str]:
        column = _COLUMNS.get(field_name)
        if column is None:
            return super().distinct_of(field_name, filters)
        where, args = self._where(filters)
        values = {v for (v,) in self._query(f"SELECT DISTINCT v_{column} FROM series WHERE ({where}) "
                                            f"AND v_{column} IS NOT NULL AND v_{column} <> ''", args)}
        return sorted(values, key=lambda v: (fold_case(v), v))

    def studies_of(self, records: Iterable[SeriesRecord]) -> list[dict[str, Any]]:
        """getPatientStudy rows for the studies of ``records``; SeriesCount counts the whole archive."""
        seen: dict[tuple[str, str], dict[str, Any]] = {}
        for rec in records:
            key = (str(rec.row.get("Collection", "")), str(rec.row.get("StudyInstanceUID", "")))
            if key not in seen:
                # (a missing value is NULL in the index and "" in the key, as Archive counts it)
                study = "k_studyinstanceuid=?" if key[1] else "k_studyinstanceuid IS NULL"
                (count,), = self._query(f"SELECT count(*) FROM series WHERE {study} AND coalesce(v_collection, '')=?",
                                        (key[1], key[0]) if key[1] else (key[0],))
                seen[key] = compact_row({**rec.study, "SeriesCount": count}, STUDY_FIELDS)
        return list(seen.values())

    def find_instance(self, sop_uid: str) -> tuple[SeriesRecord, InstanceRecord] | None:
        """The first served series (in order) holding instance ``sop_uid``, by a scan of the
        records that reads only those whose text holds the UID (or whose UID it extends: an
        instance without a recorded SOP UID is ``<series>.<n>``)."""
        needle = json.dumps(sop_uid, ensure_ascii=False)[1:-1]
        parent = sop_uid.rpartition(".")[0]
        try:
            for uid, raw, _ in self._db.rows():
                if (needle in raw or uid == parent) and (rec := self.get(uid)) is not None:
                    for inst in rec.instances:
                        if inst.sop_uid == sop_uid:
                            return rec, inst
        except HarvesterError as exc:
            log.warning("cannot read the state database: %s", exc)
        return None

    def instance_in(self, rec: SeriesRecord, sop_uid: str) -> InstanceRecord | None:
        return next((inst for inst in rec.instances if inst.sop_uid == sop_uid), None)

    def row_json(self, rec: SeriesRecord, *, style: str = "v4", numbers_as_strings: bool = False) -> str:
        if isinstance(rec, _IndexedSeries) and style == "v4" and not numbers_as_strings:
            return rec.wire    # the default form, made when the index was
        return wire_json(wire_row(rec.row, style=style, numbers_as_strings=numbers_as_strings))

    def crc32_of(self, inst: InstanceRecord) -> int:
        """As ``Archive.crc32_of``, with the last ``KEPT_CRCS`` kept. Raises ``OSError``."""
        if inst.crc32 is not None:
            return inst.crc32
        with self._lock:
            cached = self._crcs.get(inst.path)
        if cached is None:
            cached = file_crc32(inst.path)
            with self._lock:
                self._crcs[inst.path] = cached
                while len(self._crcs) > self.KEPT_CRCS:
                    self._crcs.popitem(last=False)
        return cached

    # ------------------------------------------------------------ helpers
    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._index.execute(sql, tuple(args)).fetchall()

    @staticmethod
    def _where(filters: Mapping[str, str]) -> tuple[str, list[Any]]:
        """The SQL condition of ``filters`` (``Archive.select``'s rules: empty values ignored).
        Raises ``KeyError`` for a filter that is not a getSeries parameter."""
        terms, args = ["1"], []
        for name, value in filters.items():
            fold = SERIES_FILTERS[name]
            if value in (None, ""):
                continue
            column = _COLUMNS[name]
            terms.append("uid=?" if column == "seriesinstanceuid" else f"k_{column}=?")
            args.append(fold_case(value) if fold else str(value))
        return " AND ".join(terms), args

    def _records_where(self, where: str, args: list[Any]) -> list[SeriesRecord]:
        rows = self._query(f"SELECT parts, wire FROM series WHERE {where} ORDER BY pos", args)
        out: list[SeriesRecord] = []
        for parts, wire in rows:
            row, patient, study = json.loads(parts)
            out.append(_IndexedSeries(row=row, patient=patient, study=study, instances=[], license_text="",
                                      wire=wire))
        return out


@dataclass
class _IndexedSeries(SeriesRecord):
    """A series as ``StateArchive``'s queries return it: rows, no instances, and its getSeries
    row in the default wire form (v4, JSON numbers), made once when the index was filled."""

    wire: str = ""


__all__ = [
    "Archive", "InstanceRecord", "SeriesRecord", "StateArchive", "load_harvest_dir", "SERIES_FIELDS",
    "PATIENT_FIELDS", "STUDY_FIELDS", "SERIES_FILTERS", "compact_row", "license_text_for",
    "resolve_inside", "file_md5", "file_crc32", "parse_release_date", "fold_case", "wire_row", "wire_json",
    "DATE_FIELDS", "NUMBER_FIELDS",
]
