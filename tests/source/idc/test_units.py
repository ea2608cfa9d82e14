"""Units of the IDC source without I/O: the listing parser, ETags, URLs, sizes, collection names."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harvester.config import Config
from harvester.errors import HarvesterError, PermanentRequestError, RequestError, RetryableRequestError, UsageError
from harvester.source.idc.index import _rows_at, collection_key, row_problem, series_bytes
from harvester.source.idc.s3 import S3Client, S3Object, parse_listing

NS = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


def test_listing_with_and_without_namespace_and_tokens() -> None:
    body = (f'<ListBucketResult {NS}><IsTruncated>true</IsTruncated><NextContinuationToken>tok+/=</NextContinuationToken>'
            '<Contents><Key>u/a.dcm</Key><Size>12</Size><ETag>&quot;0123456789abcdef0123456789ABCDEF&quot;</ETag>'
            "</Contents></ListBucketResult>").encode()
    objects, token = parse_listing(body, "u")
    assert objects == [S3Object("u/a.dcm", 12, "0123456789abcdef0123456789ABCDEF")] and token == "tok+/="
    assert objects[0].md5 == "0123456789abcdef0123456789abcdef"
    plain = b"<ListBucketResult><IsTruncated>false</IsTruncated><Contents><Key>k</Key><Size>1</Size></Contents></ListBucketResult>"
    assert parse_listing(plain, "u") == ([S3Object("k", 1, "")], None)


@pytest.mark.parametrize("body, error, text", [
    (b"<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>", RetryableRequestError, "no continuation"),
    (b"<html>outage</html>", RetryableRequestError, "not an S3 listing"),
    (b"not xml at all", RetryableRequestError, "not XML"),
    (b"<ListBucketResult><Contents><Key>k</Key><Size>-1</Size></Contents></ListBucketResult>", RetryableRequestError,
     "usable size"),
    (b'<!doctype x [<!ENTITY a "b">]><ListBucketResult/>', PermanentRequestError, "DOCTYPE"),
])
def test_bad_listings_are_classified(body: bytes, error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        parse_listing(body, "http://x/b")


@given(st.binary(max_size=400))
def test_any_listing_bytes_give_objects_or_a_request_error(body: bytes) -> None:
    try:
        objects, _ = parse_listing(body, "u")
    except RequestError:
        return
    assert all(o.size >= 0 for o in objects)


def test_multipart_etag_is_not_an_md5() -> None:
    assert S3Object("k", 1, "0123456789abcdef0123456789abcdef-3").md5 is None
    assert S3Object("k", 1, "W/xyz").md5 is None


@pytest.mark.anyio
async def test_urls_by_endpoint() -> None:
    async with aiohttp.ClientSession() as session:
        aws = S3Client(Config(), session)
        assert aws.url("idc-open-data", "u/a b.dcm") == "https://idc-open-data.s3.amazonaws.com/u/a%20b.dcm"
        gcs = S3Client(Config(endpoint_url="https://storage.googleapis.com"), session)
        assert gcs.url("idc-open-data-two", "", {"prefix": "u/"}) == \
            "https://storage.googleapis.com/idc-open-idc1/?prefix=u%2F"
        local = S3Client(Config(endpoint_url="http://127.0.0.1:9000/"), session)
        assert local.url("b", "k") == "http://127.0.0.1:9000/b/k"
        with pytest.raises(UsageError, match="without a path"):
            S3Client(Config(endpoint_url="http://127.0.0.1:9000/some/path"), session)


@given(st.integers(min_value=0, max_value=10**14))
def test_series_size_mb_is_exact_to_the_byte(size: int) -> None:
    """What the index stores (SUM(bytes) / 1e6 as a double) gives the bytes back exactly, up to 100 TB a series."""
    assert series_bytes(size / 1_000_000.) == size


def test_collection_keys_are_idc_ids() -> None:
    # the rule holds for every collection of idc-index-data 25.0.5's collections_index (179 of 179)
    assert collection_key("LIDC-IDRI") == "lidc_idri"
    assert collection_key("4D-Lung") == "4d_lung"
    assert collection_key("CPTAC-CCRCC") == "cptac_ccrcc"


def test_row_problems() -> None:
    good = {"SeriesInstanceUID": "1.2.3", "StudyInstanceUID": "1.2", "instanceCount": 2, "series_size_MB": 0.5,
            "crdc_series_uuid": "085e85b3-3780-47f6-8538-585bcca95336", "aws_bucket": "idc-open-data"}
    assert row_problem(good) is None
    assert "UUID" in str(row_problem({**good, "crdc_series_uuid": "../x"}))
    assert "bucket" in str(row_problem({**good, "aws_bucket": "Bad/Bucket"}))
    assert "instanceCount" in str(row_problem({**good, "instanceCount": 0}))
    assert "series_size_MB" in str(row_problem({**good, "series_size_MB": float("nan")}))
    assert "series_aws_url" in str(row_problem({**good, "aws_bucket": None,
                                                "series_aws_url": "s3://idc-open-data/other-uuid/*"}))


@settings(deadline=None)   # a loaded machine; the first call meets pyarrow cold
@given(st.lists(st.booleans(), min_size=1, max_size=40))
def test_rows_at_gives_exactly_the_picked_rows_in_order(mask: list[bool]) -> None:
    batch = pa.RecordBatch.from_pylist([{"n": i, "s": f"r{i}"} for i in range(len(mask))])
    picked = [i for i, keep in enumerate(mask) if keep]
    if picked:
        assert list(_rows_at(batch, picked)) == [{"n": i, "s": f"r{i}"} for i in picked]


def test_planning_from_the_index_does_not_import_pandas(tmp_path: Path) -> None:
    """pyarrow imports pandas (about 70 MB) for the first array it builds from a Python list;
    planning picks rows without one, so an IDC run's memory is not pandas'."""
    from .conftest import make_series, write_index

    rows = [make_series("idc_units", f"P{n}", f"1.2.826.0.9.{n}", "CT", 1, seed=n).row for n in range(3)]
    index = write_index(tmp_path / "idc_index.parquet", rows)
    for vector_rows in (10**12, 0):   # the Python cut of a small index, the pyarrow.compute cut of a large one
        code = ("import sys\nfrom pathlib import Path\nfrom harvester.source.idc import index\n"
                f"from harvester.query import query_from_dict\nindex.VECTOR_ROWS = {vector_rows}\n"
                f"found = index.select(Path({str(index)!r}), query_from_dict("
                "{'select': [{'collection': 'idc_units', 'studies': ['1.2.826.0.9.1']},"
                " {'series': [" + repr(rows[2]["SeriesInstanceUID"]) + "]}]}))\n"
                "print(len(found.rows), 'pandas' in sys.modules, 'pyarrow.compute' in sys.modules)\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.stdout.split() == ["2", "False", str(vector_rows == 0)], done.stderr


_CELLS = {"collection_id": st.sampled_from(["idc_a", "idc_b", "", None]),
          "analysis_result_id": st.sampled_from([None, "", "idc_a", "res_1"]),
          "PatientID": st.sampled_from(["P1", "p1", "P2", None]),
          "StudyInstanceUID": st.sampled_from(["1.2.3", "1.2.4", "x"]),
          "SeriesInstanceUID": st.sampled_from(["1.2.3.1", "1.2.3.2", "1.2.4.1", "bad uid"])}
_QUERIES = [[{"collection": "idc_a"}], [{"collection": "res_1"}, {"series": ["1.2.3.2"]}],
            [{"studies": ["1.2.4"]}, {"collection": "IDC-B", "modality": "CT"}], [{"patients": ["p1"]}],
            [{"series": ["1.2.3.1", "1.2.4.1"]}]]


@settings(deadline=None, max_examples=60)
@given(st.lists(st.fixed_dictionaries(_CELLS), min_size=1, max_size=30), st.sampled_from(_QUERIES))
def test_the_vectorised_cut_selects_what_the_python_cut_selects(cells: list[dict[str, Any]],
                                                                selectors: list[dict[str, Any]]) -> None:
    """The pyarrow.compute cut of a large index and the per-row Python cut give the same
    selection (rows, order, per selector, unusable rows), or the same error, whatever the rows:
    empty and missing collections, analysis results, repeated and unusable series."""
    from harvester.query import query_from_dict
    from harvester.source.idc import index

    from .conftest import make_series, write_index

    base = make_series("idc_a", "P1", "1.2.3", "CT", 1, seed=1, pixel_bytes=16).row
    with tempfile.TemporaryDirectory() as tmp:
        path = write_index(Path(tmp) / "idc_index.parquet", [{**base, **c} for c in cells])
        query = query_from_dict({"select": selectors}, origin="test")
        outcomes = []
        for vector_rows in (10**12, 0):
            index.VECTOR_ROWS, before = vector_rows, index.VECTOR_ROWS
            try:
                outcomes.append(index.select(path, query))
            except HarvesterError as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")
            finally:
                index.VECTOR_ROWS = before
    assert outcomes[0] == outcomes[1]


def test_an_index_of_unexpected_column_types_is_cut_the_python_way(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile index whose UID columns are numbers: the vectorised cut gives way to the Python
    one, which finds them unusable, never an exception of pyarrow's."""
    import pyarrow.parquet as pq

    from harvester.query import query_from_dict
    from harvester.source.idc import index

    from .conftest import make_series

    row = make_series("idc_a", "P1", "1.2.3", "CT", 1, seed=1, pixel_bytes=16).row
    table = pa.Table.from_pylist([{**row, "SeriesInstanceUID": 12, "StudyInstanceUID": 3}])
    pq.write_table(table, tmp_path / "idc_index.parquet")
    monkeypatch.setattr(index, "VECTOR_ROWS", 0)
    query = query_from_dict({"select": [{"series": ["1.2.3.1"]}, {"studies": ["1.2.3"]}, {"collection": "idc_a"}]},
                            origin="test")
    found = index.select(tmp_path / "idc_index.parquet", query)
    assert found.rows == [] and found.per_selector == [[], [], []]
