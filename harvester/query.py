"""Query manifests: parse and validate what the user wants into a ``Query``.

Accepted inputs (``load_query`` picks by extension):

* a query manifest in YAML (``.yaml``/``.yml``) or JSON (``.json``): ``select`` (a union of
  selectors), optional ``exclude``, ``limit``, ``api``, ``layout``;
* a TCIA portal cart (``.tcia``): a Java-properties header, then one SeriesInstanceUID per line
  after ``ListOfSeriesToDownload=`` (keys are parsed; header lines are never counted);
* a CSV or text list of series UIDs (``.csv``/``.txt``): a ``SeriesInstanceUID``, ``Series UID``
  or ``Series Instance UID`` column, or one UID per line.

A selector names a collection, patients alone, studies alone, or a list of series; the metadata
filters (``modality``, ``body_part``, ``manufacturer``, ``patients``) and the collection compare
the way the NBIA server compares them: ``UPPER(column) = UPPER(value)`` (``fold``). Every source
checks rows with ``Selector.matches`` and ``Exclusion.excludes``, so none of them can be stricter
(or looser) than the archive it asks.

Every problem raises ``ManifestError`` naming the file and the key (or line) at fault.
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import stat
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from harvester.errors import ManifestError

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LEN = 64
MAX_INPUT_BYTES = 256 * 1024 * 1024

_SELECTOR_KEYS = {
    "collection", "modality", "body_part", "manufacturer", "patients", "studies",
    "released_after", "series", "tcia", "csv",
}
_EXCLUDE_KEYS = {"collection", "modality", "body_part", "manufacturer", "patients", "studies", "series"}
_TOP_KEYS = {"annotations", "api", "layout", "select", "exclude", "limit", "source", "url"}
_UID_COLUMNS = ("SeriesInstanceUID", "Series UID", "Series Instance UID", "SeriesUID")
#: Selector and exclusion keys -> the getSeries column each filters, compared folded (``fold``).
_FOLDED_COLUMNS = (("collection", "Collection"), ("modality", "Modality"), ("body_part", "BodyPartExamined"),
                   ("manufacturer", "Manufacturer"), ("patients", "PatientID"))


def fold(value: Any) -> str:
    """A filter value or a row's value as the NBIA server compares them: its queries match
    Collection, PatientID, Modality, BodyPartExamined, Manufacturer and ManufacturerModelName as
    ``UPPER(column) = UPPER(value)``, so ``modality: ct`` selects the CT series. UIDs are digits
    and dots and compare exactly."""
    return str(value).upper()


def _folded(values: str | tuple[str, ...] | frozenset[str] | None) -> frozenset[str]:
    if not values:
        return frozenset()
    return frozenset({fold(values)} if isinstance(values, str) else {fold(v) for v in values})


@dataclass(frozen=True)
class Selector:
    """One entry of ``select``: a metadata filter, or an explicit list of series."""

    origin: str                                  # "file.yaml: select[2]" — for messages
    collection: str | None = None
    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    manufacturer: tuple[str, ...] = ()
    patients: tuple[str, ...] = ()
    studies: tuple[str, ...] = ()
    series: tuple[str, ...] = ()
    released_after: dt.date | None = None

    @cached_property
    def _wanted(self) -> tuple[tuple[str, frozenset[str]], ...]:
        # (column, folded values) of every filter given; computed once, rows are many
        return tuple((column, _folded(getattr(self, attr))) for attr, column in _FOLDED_COLUMNS
                     if getattr(self, attr))

    def matches(self, row: dict[str, Any]) -> bool:
        """Whether a getSeries-shaped row passes every filter of this selector, compared as the
        NBIA server compares (``fold``); a row without a Collection passes the collection test
        (the source knows where it came from). ``released_after`` is the planner's to check."""
        for column, wanted in self._wanted:
            value = row.get(column)
            if column == "Collection" and value is None:
                continue
            if fold(value if value is not None else "") not in wanted:
                return False
        return not self.studies or str(row.get("StudyInstanceUID", "")) in self.studies

    def describe(self) -> str:
        """The selector as the user wrote it, on one line, for warnings: ``collection: X, modality: MR``."""
        parts = [f"collection: {self.collection}"] if self.collection else []
        for key in ("modality", "body_part", "manufacturer", "patients", "studies"):
            values = getattr(self, key)
            if len(values) == 1:
                parts.append(f"{key}: {values[0]}")
            elif values:
                shown = ", ".join(values[:3]) + (f", ... ({len(values)} in all)" if len(values) > 3 else "")
                parts.append(f"{key}: [{shown}]")
        if self.series:
            parts.append(f"series: {self.series[0]}" if len(self.series) == 1 else f"series: {len(self.series)} UIDs")
        if self.released_after:
            parts.append(f"released_after: {self.released_after.isoformat()}")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("collection", "modality", "body_part", "manufacturer", "patients", "studies", "series"):
            value = getattr(self, key)
            if value:
                out[key] = list(value) if isinstance(value, tuple) else value
        if self.released_after:
            out["released_after"] = self.released_after.isoformat()
        return out


@dataclass(frozen=True)
class Exclusion:
    """Rows matching any listed value are removed from the union."""

    collection: frozenset[str] = frozenset()
    modality: frozenset[str] = frozenset()
    body_part: frozenset[str] = frozenset()
    manufacturer: frozenset[str] = frozenset()
    patients: frozenset[str] = frozenset()
    studies: frozenset[str] = frozenset()
    series: frozenset[str] = frozenset()

    _ROW_KEYS = {
        "collection": "Collection", "modality": "Modality", "body_part": "BodyPartExamined",
        "manufacturer": "Manufacturer", "patients": "PatientID", "studies": "StudyInstanceUID",
        "series": "SeriesInstanceUID",
    }

    @cached_property
    def _unwanted(self) -> tuple[tuple[str, bool, frozenset[str]], ...]:
        # (column, folded?, values): the columns the server matches case-insensitively are
        # compared folded, as selectors are; UIDs exactly
        folded = dict(_FOLDED_COLUMNS)
        return tuple((key, attr in folded, _folded(values) if attr in folded else values)
                     for attr, key in self._ROW_KEYS.items() if (values := getattr(self, attr)))

    def excludes(self, row: dict[str, Any]) -> bool:
        for key, folded, values in self._unwanted:
            value = str(row.get(key, ""))
            if (fold(value) if folded else value) in values:
                return True
        return False

    def to_json(self) -> dict[str, list[str]]:
        return {k: sorted(getattr(self, k)) for k in self._ROW_KEYS if getattr(self, k)}


@dataclass(frozen=True)
class Query:
    selectors: tuple[Selector, ...]
    exclude: Exclusion = field(default_factory=Exclusion)
    limit: int | None = None
    api: str | None = None
    layout: str | None = None
    origin: str = "<query>"
    source: str | None = None      # "nbia" (default), "dicomweb", "idc" or "auto"
    url: str | None = None         # a DICOMweb service root (``source: dicomweb``)
    annotations: bool = False      # fetch the series' annotation files too (docs/annotations.md)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"origin": self.origin, "select": [s.to_json() for s in self.selectors]}
        if self.exclude.to_json():
            out["exclude"] = self.exclude.to_json()
        if self.limit is not None:
            out["limit"] = self.limit
        if self.annotations:
            out["annotations"] = True
        return out


# ---------------------------------------------------------------- entry points

def load_query(path: str | Path) -> Query:
    """Load a query from a manifest, a ``.tcia`` cart or a CSV/text list of series UIDs.

    Raises ``ManifestError`` for anything unreadable or invalid.
    """
    p = Path(path)
    text = _read_text(p)
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml", ".json"):
        return parse_manifest(text, origin=str(p), base_dir=p.parent)
    if suffix == ".tcia":
        uids = parse_tcia(text, origin=str(p))
        return Query(selectors=(Selector(origin=str(p), series=uids),), origin=str(p),
                     annotations=tcia_includes_annotations(text))
    if suffix in (".csv", ".txt", ".tsv"):
        uids = parse_uid_list(text, origin=str(p))
        return Query(selectors=(Selector(origin=str(p), series=uids),), origin=str(p))
    raise ManifestError(
        f"{p}: unknown query file type {suffix or '(none)'!r}",
        hint="use a .yaml/.yml/.json manifest, a .tcia cart, or a .csv/.txt list of series UIDs",
    )


def query_from_dict(data: Any, *, origin: str = "<dict>", base_dir: Path | None = None) -> Query:
    """Validate an already-parsed manifest (a dict) into a ``Query``."""
    if not isinstance(data, dict):
        raise ManifestError(f"{origin}: a query manifest must be a mapping with a 'select' list")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ManifestError(f"{origin}: unknown key {min(unknown, key=str)!r} (allowed: {', '.join(sorted(_TOP_KEYS))})")
    if "select" not in data:
        raise ManifestError(f"{origin}: missing key 'select' (a list of selectors)")
    select = data["select"]
    if isinstance(select, dict):
        select = [select]
    if not isinstance(select, list) or not select:
        raise ManifestError(f"{origin}: 'select' must be a non-empty list of selectors")
    selectors = tuple(
        _parse_selector(item, f"{origin}: select[{i}]", base_dir or Path(".")) for i, item in enumerate(select)
    )
    exclude = _parse_exclude(data.get("exclude"), f"{origin}: exclude")
    limit = data.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ManifestError(f"{origin}: limit: expected a positive whole number, got {limit!r}")
    api = data.get("api")
    if api is not None and (not isinstance(api, str) or not re.match(r"^https?://", api)):
        raise ManifestError(f"{origin}: api: expected an http(s) URL ending in the version, e.g. .../services/v4")
    layout = data.get("layout")
    if layout is not None and not isinstance(layout, str):
        raise ManifestError(f"{origin}: layout: expected a string")
    source = data.get("source")
    if source is not None and source not in ("nbia", "dicomweb", "idc", "auto"):
        raise ManifestError(f"{origin}: source: expected nbia, dicomweb, idc or auto, got {source!r}")
    url = data.get("url")
    if url is not None and (not isinstance(url, str) or not re.match(r"^https?://", url)):
        raise ManifestError(f"{origin}: url: expected the http(s) root of a DICOMweb service")
    annotations = data.get("annotations", False)
    if not isinstance(annotations, bool):
        raise ManifestError(f"{origin}: annotations: expected true or false, got {annotations!r}")
    return Query(selectors=selectors, exclude=exclude, limit=limit, api=api, layout=layout, origin=origin,
                 source=source, url=url, annotations=annotations)


def parse_manifest(text: str, *, origin: str, base_dir: Path) -> Query:
    if origin.lower().endswith(".json"):
        yaml_error: type[Exception] = ValueError
        load: Any = json.loads
    else:
        import yaml   # here, not at the top: every command starts about 25 ms sooner without it

        yaml_error, load = yaml.YAMLError, yaml.safe_load
    try:
        data = load(text)
    except (yaml_error, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}"
        elif isinstance(exc, json.JSONDecodeError):
            where = f" at line {exc.lineno}"
        raise ManifestError(f"{origin}: not valid YAML/JSON{where}") from None
    return query_from_dict(data, origin=origin, base_dir=base_dir)


def parse_tcia(text: str, *, origin: str) -> tuple[str, ...]:
    """Parse a TCIA cart: properties up to ``ListOfSeriesToDownload=``, then UIDs one per line."""
    lines = text.lstrip("\ufeff").splitlines()
    start = None
    for i, line in enumerate(lines):
        key, sep, value = line.partition("=")
        if sep and key.strip() == "ListOfSeriesToDownload":
            # Some writers put the first UID on the same line; keeping it at index i keeps the
            # line numbers in messages equal to the file's.
            lines[i] = value
            start = i
            break
    if start is None:
        raise ManifestError(f"{origin}: not a TCIA cart: no 'ListOfSeriesToDownload=' line")
    uids: list[str] = []
    for lineno, raw in enumerate(lines[start:], start=start + 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        _check_uid(line, f"{origin}: line {lineno}")
        uids.append(line)
    if not uids:
        raise ManifestError(f"{origin}: the cart lists no series after 'ListOfSeriesToDownload='")
    return tuple(dict.fromkeys(uids))


def tcia_includes_annotations(text: str) -> bool:
    """Whether a TCIA cart's header says ``includeAnnotation=true`` (Java's Boolean.valueOf:
    ``true`` in any case, anything else false). Only the lines before the UID list count."""
    for line in text.lstrip("\ufeff").splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key.strip() == "ListOfSeriesToDownload":
            break
        if key.strip() == "includeAnnotation":
            return value.strip().lower() == "true"
    return False


def parse_uid_list(text: str, *, origin: str) -> tuple[str, ...]:
    """Parse a CSV with a series-UID column, or plain text with one UID per line."""
    sample = text.lstrip("\ufeff")
    # newline="" lets csv see \r, \n and \r\n line ends alike; line_num is the file's line number.
    reader = csv.reader(io.StringIO(sample, newline=""),
                        delimiter="\t" if origin.lower().endswith(".tsv") else ",")
    numbered: list[tuple[int, list[str]]] = []
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                numbered.append((reader.line_num, row))
    except csv.Error as exc:
        raise ManifestError(f"{origin}: line {reader.line_num}: not readable as CSV ({exc})") from None
    if not numbered:
        raise ManifestError(f"{origin}: no series UIDs found")
    header = [c.strip() for c in numbered[0][1]]
    column = next((header.index(c) for c in _UID_COLUMNS if c in header), None)
    uids: list[str] = []
    if column is not None:
        for lineno, row in numbered[1:]:
            if column >= len(row) or not row[column].strip():
                continue
            uid = row[column].strip()
            _check_uid(uid, f"{origin}: line {lineno}, column {header[column]!r}")
            uids.append(uid)
    else:
        if len(header) > 1 or not UID_RE.match(header[0]):
            raise ManifestError(
                f"{origin}: no series UID column (expected one of {', '.join(_UID_COLUMNS)}, or one UID per line)"
            )
        for lineno, row in numbered:
            if len(row) != 1:
                raise ManifestError(f"{origin}: line {lineno}: expected one UID per line")
            uid = row[0].strip()
            _check_uid(uid, f"{origin}: line {lineno}")
            uids.append(uid)
    if not uids:
        raise ManifestError(f"{origin}: no series UIDs found")
    return tuple(dict.fromkeys(uids))


# ---------------------------------------------------------------- helpers

def _read_text(p: Path) -> str:
    try:
        info = p.stat()
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(info.st_mode):
            # /dev/zero never ends and a FIFO blocks: only a regular file can be a query file
            raise ManifestError(f"{p}: not a regular file, expected a query file")
        if info.st_size > MAX_INPUT_BYTES:
            raise ManifestError(f"{p}: file is larger than {MAX_INPUT_BYTES // 2**20} MiB")
        data = p.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{p}: no such file", hint="check the path") from None
    except IsADirectoryError:
        raise ManifestError(f"{p}: is a directory, expected a query file") from None
    except OSError as exc:
        raise ManifestError(f"{p}: cannot read: {exc.strerror}") from None
    except ValueError:  # a NUL in the path
        raise ManifestError(f"{str(p)!r}: not a usable file name") from None
    if b"\x00" in data:
        raise ManifestError(f"{p}: binary file (contains NUL bytes), expected text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ManifestError(f"{p}: not UTF-8 text") from None


def _check_uid(uid: str, where: str) -> None:
    if len(uid) > MAX_UID_LEN or not UID_RE.match(uid):
        shown = uid if len(uid) <= 80 else uid[:77] + "..."
        raise ManifestError(f"{where}: {shown!r} is not a DICOM UID (digits and dots, at most 64 characters)")


def _strings(value: Any, where: str, *, uids: bool = False) -> tuple[str, ...]:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, list) and value:
        items = value
    else:
        raise ManifestError(f"{where}: expected a string or a non-empty list of strings")
    out: list[str] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ManifestError(f"{where}: expected strings, got {type(item).__name__}")
        text = str(item).strip()
        if not text or any(ord(ch) < 32 for ch in text) or len(text) > 1024:
            raise ManifestError(f"{where}: {text[:40]!r} is empty, too long or contains control characters")
        if uids:
            _check_uid(text, where)
        out.append(text)
    return tuple(dict.fromkeys(out))


def _date(value: Any, where: str) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ManifestError(f"{where}: expected a date as YYYY-MM-DD, got {value!r}")


def _parse_selector(item: Any, where: str, base_dir: Path) -> Selector:
    if not isinstance(item, dict):
        raise ManifestError(f"{where}: expected a mapping such as {{collection: NAME}}")
    unknown = set(item) - _SELECTOR_KEYS
    if unknown:
        raise ManifestError(f"{where}: unknown key {min(unknown, key=str)!r} (allowed: {', '.join(sorted(_SELECTOR_KEYS))})")
    file_keys = [k for k in ("series", "tcia", "csv") if k in item]
    if len(file_keys) > 1 or (file_keys and "collection" in item):
        raise ManifestError(f"{where}: use one of collection, series, tcia or csv per selector")
    if "tcia" in item or "csv" in item:
        key = "tcia" if "tcia" in item else "csv"
        if len(item) != 1:
            raise ManifestError(f"{where}: '{key}' takes no other keys in the same selector")
        ref = item[key]
        if not isinstance(ref, str) or not ref.strip():
            raise ManifestError(f"{where}.{key}: expected a file path")
        path = Path(ref) if Path(ref).is_absolute() else base_dir / ref
        try:
            text = _read_text(path)
            uids = parse_tcia(text, origin=str(path)) if key == "tcia" else parse_uid_list(text, origin=str(path))
        except ManifestError as exc:  # name the manifest and key as well as the referenced file
            raise ManifestError(f"{where}.{key}: {exc}", hint=exc.hint) from None
        return Selector(origin=f"{where} ({path})", series=uids)
    if "series" in item:
        if len(item) != 1:
            raise ManifestError(f"{where}: 'series' takes no other keys in the same selector")
        return Selector(origin=where, series=_strings(item["series"], f"{where}.series", uids=True))
    if "collection" not in item and "patients" not in item and "studies" not in item:
        # patients or studies alone are enough: getSeries (and QIDO-RS) take PatientID alone, or
        # StudyInstanceUID alone, and a DICOMweb PACS has no collections at all
        raise ManifestError(f"{where}: missing 'collection' (or give patients or studies alone, or use series/tcia/csv)")
    collection = None
    if "collection" in item:
        names = _strings(item["collection"], f"{where}.collection")
        if len(names) != 1:
            raise ManifestError(f"{where}.collection: one collection per selector (add another selector for more)")
        collection = names[0]
    return Selector(
        origin=where,
        collection=collection,
        modality=_strings(item["modality"], f"{where}.modality") if "modality" in item else (),
        body_part=_strings(item["body_part"], f"{where}.body_part") if "body_part" in item else (),
        manufacturer=_strings(item["manufacturer"], f"{where}.manufacturer") if "manufacturer" in item else (),
        patients=_strings(item["patients"], f"{where}.patients") if "patients" in item else (),
        studies=_strings(item["studies"], f"{where}.studies", uids=True) if "studies" in item else (),
        released_after=_date(item["released_after"], f"{where}.released_after") if "released_after" in item else None,
    )


def _parse_exclude(value: Any, where: str) -> Exclusion:
    if value is None:
        return Exclusion()
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: expected a mapping such as {{modality: [SEG]}}")
    unknown = set(value) - _EXCLUDE_KEYS
    if unknown:
        raise ManifestError(f"{where}: unknown key {min(unknown, key=str)!r} (allowed: {', '.join(sorted(_EXCLUDE_KEYS))})")
    return Exclusion(**{k: frozenset(_strings(v, f"{where}.{k}")) for k, v in value.items()})
