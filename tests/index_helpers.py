"""A small IDC index in the real ``idc_index`` schema (pyarrow), for the tests of the IDC source
and of the TCIA-shaped server backend."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

#: The real idc_index columns this index carries, with the real types (large_string, int64, double).
STRING_COLUMNS = ("collection_id", "analysis_result_id", "PatientID", "SeriesInstanceUID", "StudyInstanceUID",
                  "source_DOI", "PatientAge", "PatientSex", "StudyDate", "StudyDescription", "BodyPartExamined",
                  "Modality", "SOPClassUID", "Manufacturer", "ManufacturerModelName", "SeriesDate",
                  "SeriesDescription", "SeriesNumber", "license_short_name", "aws_bucket", "crdc_series_uuid",
                  "series_aws_url")
INT_COLUMNS = ("instanceCount", "series_init_idc_version", "series_revised_idc_version")
FLOAT_COLUMNS = ("series_size_MB",)


def write_index(path: Path, rows: list[dict[str, Any]], names: dict[str, str] | None = None) -> Path:
    """A parquet file in the real idc_index schema (and a collections_index.parquet beside it)."""
    schema = pa.schema([(c, pa.large_string()) for c in STRING_COLUMNS] + [(c, pa.int64()) for c in INT_COLUMNS]
                       + [(c, pa.float64()) for c in FLOAT_COLUMNS])
    table = pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    if names:
        pq.write_table(pa.table({"collection_name": pa.array(list(names.values()), pa.large_string()),
                                 "collection_id": pa.array(list(names), pa.large_string())}),
                       path.with_name("collections_index.parquet"))
    return path
