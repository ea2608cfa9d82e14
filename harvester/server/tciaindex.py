"""A metadata-only archive for ``harvester serve``'s API, built from the IDC index (TCIA's shape).

The index is the ``idc_index`` table of the PyPI package ``idc-index-data`` (the ``idc`` extra:
``pip install 'harvester[idc]'``), or any parquet file with its columns. Its TCIA-sourced
original rows (``source_DOI`` starting with ``10.7937``, no ``analysis_result_id``: about 492,000
series in 141 collections) become getSeries rows with their real UIDs, descriptions, modalities,
dates, counts and sizes, so the planner can be measured against the real shape of TCIA (NLST
alone is one getSeries answer of about 205,000 rows). It is a benchmark backend: no file is
behind a row, and every download endpoint is refused (HTTP 400, ``Archive.download_refusal``).

Memory: only the columns used are read, the table is kept as Arrow columns sorted by collection,
and a collection's records (an ordinary :class:`Archive`, with its indexes) are built when it is
first asked for and kept for the last ``KEPT_COLLECTIONS`` collections only. ``getCollectionValues``
and its siblings are answered from the columns (``distinct_of``), never by building every record.

Served with ``python -m harvester.server.tciaindex [INDEX] [--port P] [--faults SPEC]``; the first
line of stdout is the v4 base URL, as ``harvester serve`` prints it.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from harvester.errors import UsageError
from harvester.server.archive import (
    PATIENT_FIELDS,
    SERIES_FILTERS,
    STUDY_FIELDS,
    Archive,
    SeriesRecord,
    compact_row,
    fold_case,
    wire_json,
    wire_row,
)
from harvester.server.faults import FaultSpec
from harvester.server.serve import run_until_signalled, start_server

#: Read from the index (anything else it holds is never loaded).
COLUMNS = ("collection_id", "analysis_result_id", "source_DOI", "PatientID", "SeriesInstanceUID",
           "StudyInstanceUID", "PatientAge", "PatientSex", "StudyDate", "StudyDescription", "BodyPartExamined",
           "Modality", "Manufacturer", "ManufacturerModelName", "SeriesDate", "SeriesDescription", "SeriesNumber",
           "instanceCount", "license_short_name", "series_size_MB")
TCIA_DOI_PREFIX = "10.7937"
#: Collections whose records stay built (NLST's 205,000 records are a few hundred MB).
KEPT_COLLECTIONS = 2
REFUSAL = ("this archive serves metadata only (an index of TCIA's series, for planning); "
           "no file is behind its rows: plan with it, download from a real archive")
#: getSeries parameter -> the index column holding it.
_FILTER_COLUMNS = {"PatientID": "PatientID", "StudyInstanceUID": "StudyInstanceUID",
                   "SeriesInstanceUID": "SeriesInstanceUID", "Modality": "Modality",
                   "BodyPartExamined": "BodyPartExamined", "Manufacturer": "Manufacturer",
                   "ManufacturerModelName": "ManufacturerModelName"}


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("the TCIA index backend needs pyarrow",
                         hint="install the idc extra: pip install 'harvester[idc]'") from None
    return pc, pq


def default_index() -> Path:
    """The packaged index (``idc-index-data``). Raises ``UsageError`` when it is not installed."""
    try:
        import idc_index_data
    except ImportError:
        raise UsageError("the IDC index is not installed",
                         hint="install the idc extra (pip install 'harvester[idc]'), or give the parquet file") from None
    path = idc_index_data.IDC_INDEX_PARQUET_FILEPATH
    if path is None:
        raise UsageError("the idc-index-data package has no idc_index.parquet")
    return Path(path)


def _collection_names(index: Path) -> dict[str, str]:
    """collection_id -> TCIA's collection_name, from a ``collections_index.parquet`` beside the index."""
    beside = index.with_name("collections_index.parquet")
    if not beside.is_file():
        return {}
    _, pq = _pyarrow()
    table = pq.read_table(str(beside), columns=["collection_id", "collection_name"])
    return {cid: name for cid, name in zip(table.column("collection_id").to_pylist(),
                                           table.column("collection_name").to_pylist())
            if isinstance(cid, str) and isinstance(name, str) and name.strip()}


def _number_text(value: Any) -> Any:
    text = str(value or "").strip()
    return int(text) if text.isdigit() and len(text) < 18 else text


def nbia_records(columns: Mapping[str, list[Any]], collection: str) -> list[SeriesRecord]:
    """The index's rows of one collection (as columns) as the archive's records: getSeries rows
    in NBIA's columns, and one shared getPatient and getPatientStudy row per patient and study;
    no instances."""
    out: list[SeriesRecord] = []
    patients: dict[str, dict[str, Any]] = {}
    studies: dict[str, dict[str, Any]] = {}
    names = list(columns)
    for values in zip(*columns.values()):
        r = dict(zip(names, values))
        size_mb, doi = r["series_size_MB"], r["source_DOI"]
        pid, study_uid = r["PatientID"], r["StudyInstanceUID"]
        fields = {
            "SeriesInstanceUID": r["SeriesInstanceUID"], "StudyInstanceUID": study_uid,
            "Modality": r["Modality"], "SeriesDate": r["SeriesDate"],
            "SeriesDescription": r["SeriesDescription"], "BodyPartExamined": r["BodyPartExamined"],
            "SeriesNumber": _number_text(r["SeriesNumber"]), "Collection": collection,
            "PatientID": pid, "PatientSex": r["PatientSex"], "PatientAge": r["PatientAge"],
            "Manufacturer": r["Manufacturer"], "ManufacturerModelName": r["ManufacturerModelName"],
            "ImageCount": r["instanceCount"],
            "LicenseName": r["license_short_name"],
            "DataDescriptionURI": f"https://doi.org/{doi}" if doi else None,
            # series_size_MB is SUM(instance_size)/1e6 in the package's SQL
            "FileSize": round(size_mb * 1_000_000) if isinstance(size_mb, (int, float)) else None,
            "StudyDesc": r["StudyDescription"], "StudyDate": r["StudyDate"],
        }
        row = {k: v for k, v in fields.items() if v not in (None, "")}
        patient = patients.get(pid)
        if patient is None:
            patient = patients[pid] = compact_row({"PatientId": pid, "PatientSex": r["PatientSex"],
                                                   "Collection": collection}, PATIENT_FIELDS)
        study = studies.get(study_uid)
        if study is None:
            study = studies[study_uid] = compact_row(
                {"StudyInstanceUID": study_uid, "StudyDate": r["StudyDate"], "StudyDescription": r["StudyDescription"],
                 "PatientAge": r["PatientAge"], "PatientID": pid, "PatientSex": r["PatientSex"],
                 "Collection": collection}, STUDY_FIELDS)
        out.append(SeriesRecord(row=row, patient=patient, study=study, instances=[], license_text=""))
    return out


class TciaIndexArchive(Archive):
    """The TCIA-sourced original series of an IDC index, served metadata only.

    Raises ``UsageError`` (from ``load``) for a file that is not a readable parquet index.
    """

    download_refusal = REFUSAL

    def __init__(self, table: Any, names: Mapping[str, str]) -> None:
        # Invariant: ``table`` is sorted by collection_id, so a collection is one zero-copy slice.
        self._table = table
        self._slices: dict[str, tuple[str, int, int]] = {}   # folded name -> (name, offset, length)
        ids = table.column("collection_id").to_pylist()
        start = 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[start]:
                name = names.get(ids[start]) or ids[start]
                self._slices[fold_case(name)] = (name, start, i - start)
                start = i
        self._built: OrderedDict[str, list[SeriesRecord]] = OrderedDict()

    @classmethod
    def load(cls, index: Path) -> TciaIndexArchive:
        pc, pq = _pyarrow()
        try:
            pf = pq.ParquetFile(str(index))
            missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                raise UsageError(f"{index}: not an IDC index (no column {', '.join(missing)})")
            table = pf.read(columns=list(COLUMNS))
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError... for a bad file
            raise UsageError(f"{index}: not a readable parquet file ({type(exc).__name__})") from None
        analysis = table.column("analysis_result_id")
        original = pc.or_(pc.is_null(analysis), pc.equal(analysis, ""))
        tcia = pc.fill_null(pc.starts_with(table.column("source_DOI"), TCIA_DOI_PREFIX), False)
        table = table.filter(pc.and_(pc.fill_null(original, True), tcia))
        table = table.sort_by([("collection_id", "ascending"), ("SeriesInstanceUID", "ascending")])
        return cls(table.combine_chunks(), _collection_names(index))

    # ------------------------------------------------------------ the Archive interface
    def __len__(self) -> int:
        return self._table.num_rows

    def collections(self) -> list[str]:
        return sorted((name for name, _, _ in self._slices.values()), key=lambda v: (fold_case(v), v))

    def records(self) -> list[SeriesRecord]:
        return [rec for key in self._slices for rec in self._collection(key).records()]

    def select(self, filters: Mapping[str, str]) -> list[SeriesRecord]:
        """As ``Archive.select``: the series matching every filter, compared as NBIA compares."""
        wanted = {name: (fold_case(value) if SERIES_FILTERS[name] else str(value))  # KeyError as Archive
                  for name, value in filters.items() if value not in (None, "")}
        collection = wanted.pop("Collection", None)
        keys = ([collection] if collection in self._slices else []) if collection is not None \
            else self._keys_matching(wanted)
        hits: list[SeriesRecord] = []
        for key in keys:
            records = self._collection(key)
            hits.extend(records if not wanted else (rec for rec in records if _matches(rec.row, wanted)))
        return hits

    def distinct_of(self, field_name: str, filters: Mapping[str, str]) -> list[str]:
        if field_name == "Collection" and not any(filters.values()):
            return self.collections()
        return super().distinct_of(field_name, filters)

    def released_after(self, day: dt.date, within: list[SeriesRecord] | None = None) -> list[SeriesRecord]:
        return []  # the index has no release dates

    def studies_of(self, records: Iterable[SeriesRecord]) -> list[dict[str, Any]]:
        """getPatientStudy rows; SeriesCount counts the study's series in the whole index."""
        seen: dict[tuple[str, str], dict[str, Any]] = {}
        counts: dict[str, Counter[str]] = {}
        for rec in records:
            collection = fold_case(rec.row.get("Collection", ""))
            key = (collection, str(rec.row.get("StudyInstanceUID", "")))
            if key in seen:
                continue
            if collection not in counts:
                counts[collection] = Counter(str(r.row.get("StudyInstanceUID", ""))
                                             for r in self._collection(collection))
            seen[key] = compact_row({**rec.study, "SeriesCount": counts[collection][key[1]]}, STUDY_FIELDS)
        return list(seen.values())

    def get(self, series_uid: str) -> SeriesRecord | None:
        hits = self.select({"SeriesInstanceUID": series_uid})
        return hits[0] if hits else None

    def find_instance(self, sop_uid: str) -> None:
        return None

    def row_json(self, rec: SeriesRecord, *, style: str = "v4", numbers_as_strings: bool = False) -> str:
        return wire_json(wire_row(rec.row, style=style, numbers_as_strings=numbers_as_strings))  # (not cached)

    # ------------------------------------------------------------ helpers
    def _keys_matching(self, wanted: Mapping[str, str]) -> list[str]:
        """The collections holding a row of an exact-match filter (a UID), or all of them."""
        pc, _ = _pyarrow()
        for name in ("SeriesInstanceUID", "StudyInstanceUID"):
            if name in wanted:
                column = self._table.column(_FILTER_COLUMNS[name])
                positions = pc.indices_nonzero(pc.fill_null(pc.equal(column, wanted[name]), False)).to_pylist()
                return [key for key, (_, offset, length) in self._slices.items()
                        if any(offset <= p < offset + length for p in positions)]
        return list(self._slices)

    def _collection(self, key: str) -> list[SeriesRecord]:
        """The records of a collection (by its folded name), built on first use."""
        records = self._built.get(key)
        if records is not None:
            self._built.move_to_end(key)
            return records
        name, offset, length = self._slices[key]
        records = nbia_records(self._table.slice(offset, length).to_pydict(), name)
        self._built[key] = records
        while len(self._built) > KEPT_COLLECTIONS:
            self._built.popitem(last=False)
        return records


def _matches(row: Mapping[str, Any], wanted: Mapping[str, str]) -> bool:
    for name, value in wanted.items():
        have = row.get(name)
        if have is None or (fold_case(have) if SERIES_FILTERS[name] else str(have)) != value:
            return False
    return True


async def _serve(archive: Archive, args: argparse.Namespace) -> None:
    faults = FaultSpec.parse(args.faults) if args.faults else None
    runner, base_url = await start_server(archive, args.host, args.port, faults)
    await run_until_signalled(runner, base_url, f"serving {len(archive)} indexed series (metadata only) at {base_url}")


def main(argv: list[str] | None = None) -> int:
    """``python -m harvester.server.tciaindex [INDEX] [--host H] [--port P] [--faults SPEC]``."""
    parser = argparse.ArgumentParser(prog="python -m harvester.server.tciaindex",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("index", nargs="?", type=Path, help="the idc_index parquet (default: idc-index-data's)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--faults", metavar="SPEC", help="as harvester serve's, e.g. latency=20ms")
    args = parser.parse_args(argv)
    try:
        if args.faults:
            try:
                FaultSpec.parse(args.faults)
            except ValueError as err:
                raise UsageError(f"--faults: {err}") from None
        archive = TciaIndexArchive.load(args.index or default_index())
    except UsageError as err:
        print(f"harvester: error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        return 2
    try:
        asyncio.run(_serve(archive, args))
    except OSError as err:
        print(f"harvester: error: cannot listen on {args.host}:{args.port}: {err.strerror or err}",
              file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
