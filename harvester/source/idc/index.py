"""The IDC index: which series exist, where their objects are, how many and how large.

The index is the ``idc_index`` table of the PyPI package ``idc-index-data`` (a parquet file of
about a million rows, one per series; the extra ``harvester[idc]`` installs it with ``pyarrow``),
or any parquet file with the same columns (``--idc-index PATH``). It is read in a worker thread,
in record batches and only the columns used (``COLUMNS``), so memory is bounded by the file's
pages, never by its rows; only the rows a query selects are kept.

How selectors map to columns (the NBIA rules of ``harvester.query``: ``Selector.matches``):

* ``collection`` -> ``collection_id`` of the original data (``analysis_result_id`` empty), or an
  ``analysis_result_id`` (IDC files analysis results, such as LIDC-IDRI's 13,718 nodule SEGs and
  SRs, under the collection they analyse; TCIA publishes them as collections of their own, so
  ``collection: LIDC-IDRI`` selects the 1,308 series it selects on NBIA); a TCIA name (``LIDC-IDRI``) is accepted too: folded, and
  with every character that is not a letter or a digit made ``_`` (IDC's ids are TCIA's names
  so spelled: ``lidc_idri``), or through ``collection_name`` of a ``collections_index.parquet``
  next to the index (the package ships one). Rows carry the TCIA name as ``Collection`` when that
  file names it, so a tree harvested from IDC has NBIA's folders.
* ``patients`` -> PatientID, ``studies`` -> StudyInstanceUID, ``series`` -> SeriesInstanceUID,
  ``modality``, ``body_part``, ``manufacturer`` -> Modality, BodyPartExamined, Manufacturer.
* ``released_after``: the index has no release date: ``UsageError``.

``series_size_MB`` is ``SUM(instance_size) / 1e6`` (the package's SQL) stored as a double: the
series' bytes are ``round(series_size_MB * 1e6)``, exact to the byte for any series below
100 TB (a double holds 15 significant digits; the largest series is 195 GB). Every value is
hostile: a row whose UIDs, bucket, UUID, count or size are unusable is never planned (a listed
series with such a row is unavailable, with the reason).

Raises ``UsageError`` when pyarrow or the package is missing, or the file is not a readable
parquet file with the columns; ``UnknownSelectionError`` for a collection the index lacks.
"""
from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harvester.errors import UnknownSelectionError, UsageError
from harvester.query import UID_RE, MAX_UID_LEN, Query, Selector, fold, query_from_dict
from harvester.source.http import as_int
from harvester.source.idc.s3 import check_bucket

#: Read from the index (anything else it holds is never loaded).
COLUMNS = ("collection_id", "analysis_result_id", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "BodyPartExamined",
           "Manufacturer", "ManufacturerModelName", "SeriesDescription", "SeriesNumber", "SeriesDate", "StudyDate",
           "StudyDescription", "PatientSex", "instanceCount", "series_size_MB", "source_DOI", "crdc_series_uuid",
           "aws_bucket", "series_aws_url", "license_short_name")
#: Without these a series cannot be planned, fetched or verified.
REQUIRED = ("collection_id", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "instanceCount", "series_size_MB",
            "crdc_series_uuid")
BATCH_ROWS = 16384
#: From this many rows (IDC's index has a million) the first cut runs in pyarrow.compute (C), not
#: a Python loop per row: ``harvester plan`` of LIDC-IDRI from the real index takes 1.3 s, not
#: 2.1 (bench/RESULTS.md). Below it, pyarrow.compute is not imported (30-45 ms of start-up).
VECTOR_ROWS = 65536
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_AWS_URL_RE = re.compile(r"^s3://([^/]+)/([^/]+)/\*?$")
INSTALL_HINT = "install the index with: pip install 'harvester[idc]', or give an index file with --idc-index PATH"


def collection_key(name: str) -> str:
    """IDC's collection id for a TCIA collection name: lower case, every other character ``_``."""
    return re.sub(r"[^0-9a-z]", "_", name.lower())


@dataclass(frozen=True)
class IndexSelection:
    rows: list[dict[str, Any]]                   # getSeries-shaped rows, index order, one per UID
    per_selector: list[list[dict[str, Any]]]     # the rows each selector matched (for warnings)
    unusable: dict[str, str]                     # SeriesInstanceUID -> why its row cannot be used


def default_index() -> Path:
    """The packaged index (``idc-index-data``). Raises ``UsageError`` when it is not installed."""
    try:
        import idc_index_data
    except ImportError:
        raise UsageError("source idc needs the IDC index, which is not installed", hint=INSTALL_HINT) from None
    path = idc_index_data.IDC_INDEX_PARQUET_FILEPATH
    if path is None:
        raise UsageError("the idc-index-data package has no idc_index.parquet", hint=INSTALL_HINT)
    return Path(path)


def _pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("reading the IDC index needs pyarrow", hint=INSTALL_HINT) from None
    return pq


def _open(path: Path) -> Any:
    pq = _pyarrow()
    if not path.is_file():
        raise UsageError(f"IDC index {path}: no such file", hint="check --idc-index")
    try:
        # pre_buffer off and a read buffer: pages are read as batches go, not the whole file at once
        return pq.ParquetFile(str(path), pre_buffer=False, buffer_size=1 << 20)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError... for a bad file
        raise UsageError(f"IDC index {path}: not a readable parquet file ({type(exc).__name__})",
                         hint="give the idc_index parquet of idc-index-data, or a file with its columns") from None


def _batches(pf: Any, path: Path, columns: list[str]) -> Iterator[Any]:
    """The file's record batches (``BATCH_ROWS`` rows of ``columns``). Raises ``UsageError``."""
    try:
        yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=columns)
    except Exception as exc:  # noqa: BLE001 - a damaged page, a column of an unreadable type
        raise UsageError(f"IDC index {path}: unreadable ({type(exc).__name__}: {str(exc)[:200]})",
                         hint="give the idc_index parquet of idc-index-data, or a file with its columns") from None


def _column(batch: Any, name: str) -> list[Any]:
    return batch.column(name).to_pylist()  # type: ignore[no-any-return]


def _collections(batch: Any) -> list[Any]:
    """Each row's collection as NBIA counts it (``collection_of``)."""
    ids = _column(batch, "collection_id")
    if "analysis_result_id" not in batch.schema.names:
        return ids
    return [collection_of(c, a) for c, a in zip(ids, _column(batch, "analysis_result_id"))]


def _compute() -> Any:
    import pyarrow.compute as pc
    return pc


# pyarrow imports pandas (about 70 MB) for the first array or scalar it builds from Python
# objects (a comparison with "", fill_null(False), pa.array(list)): the vectorised cut below builds
# none. tests/source/idc/test_units.py checks it.

def _is_result(pc: Any, batch: Any) -> Any:
    """The rows whose ``analysis_result_id`` is a non-empty string (``collection_of`` takes it),
    as a boolean array without nulls; None when the batch has no such column."""
    if "analysis_result_id" not in batch.schema.names:
        return None
    return _true(pc, pc.cast(pc.binary_length(batch.column("analysis_result_id")), "bool"))


def _true(pc: Any, mask: Any) -> Any:
    """``mask`` with its nulls False (Kleene: false and null is false)."""
    return pc.and_kleene(pc.is_valid(mask), mask)


def _strings(values: Iterable[str], like: Any) -> Any:
    """An array of ``values`` in the string type of the column ``like``, from two buffers (no
    Python-object conversion). Raises ``TypeError`` for a column that is not of strings."""
    import struct

    import pyarrow as pa

    if like.type not in (pa.string(), pa.large_string()):
        raise TypeError(f"a column of {like.type}")
    data = [v.encode("utf-8") for v in values]
    offsets = [0]
    for d in data:
        offsets.append(offsets[-1] + len(d))
    code = "q" if like.type == pa.large_string() else "i"
    return pa.Array.from_buffers(like.type, len(data), [None, pa.py_buffer(struct.pack(f"<{len(offsets)}{code}", *offsets)),
                                                        pa.py_buffer(b"".join(data))])


def _distinct_collections(batch: Any, pc: Any | None) -> set[Any]:
    """The set of ``_collections(batch)``, computed in pyarrow when ``pc`` is given (falls back to
    Python for columns of an unexpected type)."""
    if pc is not None:
        try:
            ids = batch.column("collection_id")
            results = _is_result(pc, batch)
            if results is None:
                return set(pc.unique(ids).to_pylist())
            return set(pc.unique(pc.filter(ids, pc.invert(results))).to_pylist()) \
                | set(pc.unique(pc.filter(batch.column("analysis_result_id"), results)).to_pylist())
        except Exception:  # noqa: BLE001 - a hostile file's column types: the Python way below
            pass
    return set(_collections(batch))


def _collection_names(path: Path) -> dict[str, str]:
    """collection_id -> TCIA collection_name from a ``collections_index.parquet`` beside the index."""
    beside = path.with_name("collections_index.parquet")
    if not beside.is_file():
        return {}
    pf = _open(beside)
    have = set(pf.schema_arrow.names)
    if not {"collection_id", "collection_name"} <= have:
        return {}
    names: dict[str, str] = {}
    for batch in _batches(pf, beside, ["collection_id", "collection_name"]):
        for cid, name in zip(_column(batch, "collection_id"), _column(batch, "collection_name")):
            if isinstance(cid, str) and isinstance(name, str) and name.strip():
                names.setdefault(cid, name.strip())
    return names


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _uid(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_UID_LEN and bool(UID_RE.match(value))


def row_problem(raw: dict[str, Any]) -> str | None:
    """Why an index row cannot be planned, or None."""
    if not _uid(raw.get("SeriesInstanceUID")) or not _uid(raw.get("StudyInstanceUID")):
        return "its SeriesInstanceUID or StudyInstanceUID is not a DICOM UID"
    if not isinstance(raw.get("crdc_series_uuid"), str) or not _UUID_RE.match(raw["crdc_series_uuid"]):
        return "its crdc_series_uuid is not a UUID"
    count = as_int(raw.get("instanceCount"))
    if not count:
        return "its instanceCount is not a positive number"
    size = raw.get("series_size_MB")
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not math.isfinite(size) or size < 0 \
            or size > 1e8:
        return "its series_size_MB is not a usable size"
    try:
        bucket_of(raw)
    except ValueError as exc:
        return str(exc)
    return None


def bucket_of(raw: dict[str, Any]) -> str:
    """The row's bucket: ``aws_bucket``, else the bucket of ``series_aws_url``, else IDC's main one.
    Raises ``ValueError`` for a name that is not a bucket or a URL of another series."""
    bucket = raw.get("aws_bucket")
    url = raw.get("series_aws_url")
    if not bucket and isinstance(url, str):
        m = _AWS_URL_RE.match(url)
        if not m or m.group(2) != raw.get("crdc_series_uuid"):
            raise ValueError("its series_aws_url is not s3://BUCKET/<crdc_series_uuid>/")
        bucket = m.group(1)
    return check_bucket(str(bucket or "idc-open-data"))


def series_bytes(size_mb: float) -> int:
    """The exact bytes of a series from ``series_size_MB`` (see the module docstring)."""
    return round(size_mb * 1_000_000)


def collection_of(collection_id: Any, analysis_result_id: Any) -> Any:
    """The collection a row belongs to as NBIA counts it: its analysis result, else its collection."""
    return analysis_result_id or collection_id


def as_row(raw: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """A getSeries-shaped row (the keys layouts, the manifest and ``Selector.matches`` use) from a
    usable index row, with where its objects are."""
    cid = str(collection_of(raw["collection_id"], raw.get("analysis_result_id")))
    number = as_int(raw.get("SeriesNumber"))
    row: dict[str, Any] = {
        "Collection": names.get(cid, cid),
        "PatientID": str(raw["PatientID"] or ""),
        "StudyInstanceUID": raw["StudyInstanceUID"],
        "SeriesInstanceUID": raw["SeriesInstanceUID"],
        "Modality": _text(raw.get("Modality")) or "",
        "SeriesNumber": number if number is not None else _text(raw.get("SeriesNumber")),
        "SeriesDescription": _text(raw.get("SeriesDescription")),
        "SeriesDate": _text(raw.get("SeriesDate")),
        "StudyDate": _text(raw.get("StudyDate")),
        "StudyDesc": _text(raw.get("StudyDescription")),
        "BodyPartExamined": _text(raw.get("BodyPartExamined")),
        "Manufacturer": _text(raw.get("Manufacturer")),
        "ManufacturerModelName": _text(raw.get("ManufacturerModelName")),
        "ImageCount": as_int(raw["instanceCount"]),
        "FileSize": series_bytes(float(raw["series_size_MB"])),
        # where it came from: recorded with the series in harvest.json ("metadata")
        "source": "idc",
        "collection_id": str(raw["collection_id"]),
        "analysis_result_id": _text(raw.get("analysis_result_id")),
        "crdc_series_uuid": raw["crdc_series_uuid"],
        "aws_bucket": bucket_of(raw),
        "source_DOI": _text(raw.get("source_DOI")),
        "license_short_name": _text(raw.get("license_short_name")),
        "PatientSex": _text(raw.get("PatientSex")),
    }
    return {k: v for k, v in row.items() if v is not None}


def _resolve_collections(query: Query, ids: Iterable[str], names: dict[str, str]) -> dict[str, str]:
    """Each selector's collection -> its collection_id. Raises ``UnknownSelectionError``."""
    by_key: dict[str, str] = {}
    for cid in ids:
        by_key.setdefault(fold(cid), cid)
        by_key.setdefault(fold(collection_key(cid)), cid)
        if cid in names:
            by_key.setdefault(fold(names[cid]), cid)
    resolved: dict[str, str] = {}
    for sel in query.selectors:
        if not sel.collection or sel.collection in resolved:
            continue
        cid = by_key.get(fold(sel.collection)) or by_key.get(fold(collection_key(sel.collection)))
        if cid is None:
            shown = {k.lower(): (names.get(v) or v) for k, v in by_key.items()}
            close = difflib.get_close_matches(sel.collection.lower(), list(shown), n=3, cutoff=0.6)
            suggestion = f"; did you mean {', '.join(dict.fromkeys(shown[c] for c in close))}?" if close else ""
            raise UnknownSelectionError(f"{sel.origin}: the IDC index has no collection {sel.collection!r}{suggestion}")
        resolved[sel.collection] = cid
    return resolved


def select(path: Path, query: Query) -> IndexSelection:
    """The rows of ``path`` each selector of ``query`` matches (blocking: run it in a thread).

    Raises ``UsageError`` (see the module docstring) and ``UnknownSelectionError``."""
    for sel in query.selectors:
        if sel.released_after is not None:
            raise UsageError(f"{sel.origin}: released_after has no IDC equivalent",
                             hint="the IDC index records no release date; remove the key")
    pf = _open(path)
    pc = _compute() if (pf.metadata.num_rows or 0) >= VECTOR_ROWS else None
    have = set(pf.schema_arrow.names)
    missing = [c for c in REQUIRED if c not in have]
    if missing:
        raise UsageError(f"IDC index {path}: no column {', '.join(missing)}",
                         hint="give the idc_index parquet of idc-index-data, or a file with its columns")
    columns = [c for c in COLUMNS if c in have]
    names = _collection_names(path)
    ids: set[str] = set()
    if any(sel.collection for sel in query.selectors):
        for batch in _batches(pf, path, [c for c in ("collection_id", "analysis_result_id") if c in have]):
            ids.update(c for c in _distinct_collections(batch, pc) if isinstance(c, str))
    wanted_ids = _resolve_collections(query, ids, names)
    series_wanted = {uid for sel in query.selectors for uid in sel.series}
    series_sets = [frozenset(sel.series) for sel in query.selectors]   # a cart may list 10,000 UIDs
    rows: dict[str, dict[str, Any]] = {}
    per_selector: list[list[dict[str, Any]]] = [[] for _ in query.selectors]
    unusable: dict[str, str] = {}
    value_sets: dict[tuple[str, str], Any] = {}   # the vectorised cut's, built once for every batch
    for batch in _batches(pf, path, columns):
        picked = _picked(batch, query, wanted_ids, series_wanted, pc, value_sets)
        if not picked:
            continue
        # only the rows picked become Python objects: a batch of 16,384 rows usually gives none
        for raw in _rows_at(batch, picked):
            uid = raw.get("SeriesInstanceUID")
            problem = row_problem(raw)
            if problem is not None:
                if isinstance(uid, str) and uid in series_wanted:
                    unusable.setdefault(uid, f"the IDC index row is unusable: {problem}")
                continue
            if uid in rows:
                continue  # the index repeats a series: the first row stands
            row = as_row(raw, names)
            hit = False
            for n, sel in enumerate(query.selectors):
                if _matches(sel, series_sets[n], raw, row, wanted_ids):
                    per_selector[n].append(row)
                    hit = True
            if hit:
                rows[uid] = row
    return IndexSelection(rows=list(rows.values()), per_selector=per_selector, unusable=unusable)


#: ``harvester query --source idc getSeries Key=Value ...``: the NBIA parameters the index
#: answers, and the selector key each one is (so the selection rules are the planner's).
GETSERIES_PARAMS = {"Collection": "collection", "PatientID": "patients", "StudyInstanceUID": "studies",
                    "SeriesInstanceUID": "series", "Modality": "modality", "BodyPartExamined": "body_part",
                    "Manufacturer": "manufacturer"}
_LIST_KEYS = ("patients", "studies", "series")


def query_series(path: Path, params: dict[str, str]) -> list[dict[str, Any]]:
    """getSeries answered from the index at ``path``: the rows the NBIA parameters ``params``
    select, in index order (blocking). Raises ``UsageError`` for no parameter or one the index
    cannot answer (and as ``select`` does), ``UnknownSelectionError`` for an unknown collection."""
    unknown = sorted(set(params) - set(GETSERIES_PARAMS))
    if unknown or not params:
        raise UsageError(f"getSeries from the IDC index takes {', '.join(GETSERIES_PARAMS)}"
                         + (f", not {unknown[0]!r}" if unknown else ": give at least one"),
                         hint="e.g. harvester query getSeries Collection=LIDC-IDRI Modality=CT --source idc")
    selector = {GETSERIES_PARAMS[k]: [v] if GETSERIES_PARAMS[k] in _LIST_KEYS else v for k, v in params.items()}
    return select(path, query_from_dict({"select": [selector]}, origin="getSeries")).rows


def _rows_at(batch: Any, picked: list[int]) -> Iterator[dict[str, Any]]:
    """The rows numbered ``picked`` (ascending, not empty), as dicts, from a zero-copy slice per
    run of consecutive rows. Not ``batch.take(picked)``: pyarrow imports pandas to build an array
    from a Python list, which made an IDC run's peak RSS about 70 MB above NBIA's."""
    start = end = picked[0]
    for n in picked[1:]:
        if n != end + 1:
            yield from batch.slice(start, end - start + 1).to_pylist()
            start = n
        end = n
    yield from batch.slice(start, end - start + 1).to_pylist()


def _picked(batch: Any, query: Query, wanted_ids: dict[str, str], series_wanted: set[str],
            pc: Any | None, value_sets: dict[tuple[str, str], Any]) -> list[int]:
    """``_candidates`` as a list: computed in pyarrow when ``pc`` is given and no selector cuts
    by patient alone (PatientID is folded in Python), else (and for columns of an unexpected
    type) by ``_candidates``."""
    if pc is not None and not any(sel.patients for sel in query.selectors if not sel.collection and not sel.series):
        try:
            return _vector_candidates(pc, batch, query, set(wanted_ids.values()), series_wanted, value_sets)
        except Exception:  # noqa: BLE001 - a hostile file's column types: the Python way below
            pass
    return list(_candidates(batch, query, wanted_ids, series_wanted))


def _vector_candidates(pc: Any, batch: Any, query: Query, ids: set[str], series_wanted: set[str],
                       value_sets: dict[tuple[str, str], Any]) -> list[int]:
    """The rows ``_candidates`` yields (without a patient cut), by pyarrow.compute; each
    column's value set is built once (``value_sets``: a cart may list 10,000 UIDs)."""
    def among(column: str, values: set[str]) -> Any:
        data = batch.column(column)
        key = (column, str(data.type))
        if key not in value_sets:
            value_sets[key] = _strings(sorted(values), data)
        return _true(pc, pc.is_in(data, value_set=value_sets[key]))

    free = [sel for sel in query.selectors if not sel.collection and not sel.series]
    studies = {s for sel in free for s in sel.studies}
    masks = []
    if ids:
        results = _is_result(pc, batch)
        by_id = among("collection_id", ids)
        masks.append(by_id if results is None
                     else pc.or_(pc.and_(pc.invert(results), by_id), pc.and_(results, among("analysis_result_id", ids))))
    if series_wanted:
        masks.append(among("SeriesInstanceUID", series_wanted))
    if studies:
        masks.append(among("StudyInstanceUID", studies))
    if not masks:
        return []
    mask = masks[0]
    for more in masks[1:]:
        mask = pc.or_(mask, more)
    return [int(i) for i in pc.indices_nonzero(mask).to_pylist()]


def _candidates(batch: Any, query: Query, wanted_ids: dict[str, str], series_wanted: set[str]) -> Iterator[int]:
    """Row numbers of a batch that some selector may match: a cheap first cut on the exact
    columns (collection_id, UIDs) and the folded PatientID; ``_matches`` decides."""
    ids = set(wanted_ids.values())
    free = [sel for sel in query.selectors if not sel.collection and not sel.series]
    patients = {fold(p) for sel in free for p in sel.patients}
    studies = {s for sel in free for s in sel.studies}
    cuts: list[tuple[list[Any], Any]] = []
    if ids:
        cuts.append((_collections(batch), lambda v: v in ids))
    if series_wanted:
        cuts.append((_column(batch, "SeriesInstanceUID"), lambda v: v in series_wanted))
    if studies:
        cuts.append((_column(batch, "StudyInstanceUID"), lambda v: v in studies))
    if patients:
        cuts.append((_column(batch, "PatientID"), lambda v: fold(v if v is not None else "") in patients))
    for i in range(batch.num_rows):
        if any(test(values[i]) for values, test in cuts):
            yield i


def _matches(sel: Selector, series: frozenset[str], raw: dict[str, Any], row: dict[str, Any],
             wanted_ids: dict[str, str]) -> bool:
    if sel.series:
        return row["SeriesInstanceUID"] in series
    if sel.collection and collection_of(raw["collection_id"], raw.get("analysis_result_id")) \
            != wanted_ids.get(sel.collection):
        return False
    # the collection is settled above (by id or TCIA name): a row without one passes that test
    return sel.matches({**row, "Collection": None})
