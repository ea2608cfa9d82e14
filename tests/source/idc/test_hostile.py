"""Hostile answers from the bucket and the index: each refused with a clear reason, nothing
written outside DIR, nothing already harvested lost."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import anyio
from aiohttp import web

from harvester.api import aharvest, aplan
from harvester.config import Limits
from harvester.query import query_from_dict

from .conftest import BUCKET, IDCSeries, Moto, S3Proxy, make_series, write_index
from .test_harvest import assert_bucket_identical, idc_config, run_cli


def one_series(moto: Moto, tmp_path: Path, seed: int, *, row: dict[str, Any] | None = None, put: bool = True,
               **kwargs: Any) -> tuple[IDCSeries, Path]:
    series = make_series("idc_hostile", "H1", f"1.2.826.0.1.{seed}", "CT", 3, seed=1000 + seed, **kwargs)
    if put:
        moto.put(series)
    series.row.update(row or {})
    return series, write_index(tmp_path / "index" / "idc_index.parquet", [series.row])


def harvest_one(endpoint: str, tmp_path: Path, index: Path, uid: str, **overrides: Any) -> Any:
    config = idc_config(endpoint, tmp_path / "out", index, series_retries=1, retries=2, **overrides)
    return anyio.run(aharvest, query_from_dict({"select": [{"series": [uid]}]}), config)


def failure(result: Any) -> str:
    assert not result.ok and len(result.failed) == 1, result.failed
    return str(result.failed[0][1])


def test_listing_key_that_climbs_out_is_refused(moto: Moto, tmp_path: Path) -> None:
    series, index = one_series(moto, tmp_path, 1)
    evil = f"{series.uuid}/../evil.dcm"
    moto.client.put_object(Bucket=BUCKET, Key=evil, Body=next(iter(series.objects.values())), ACL="public-read")
    result = harvest_one(moto.endpoint, tmp_path, index, series.uid)
    assert "evil.dcm" in failure(result) and "not a file of that prefix" in failure(result)
    assert not [p for p in tmp_path.rglob("*evil*")]
    assert not list((tmp_path / "out").rglob("*.dcm"))


def test_object_of_another_series_is_refused(moto: Moto, tmp_path: Path) -> None:
    series, index = one_series(moto, tmp_path, 2, dicom_series_uid="1.2.3.999")
    result = harvest_one(moto.endpoint, tmp_path, index, series.uid)
    assert "belongs to series 1.2.3.999, not this one" in failure(result)


def test_fewer_bytes_than_the_index_says_is_incomplete(moto: Moto, tmp_path: Path) -> None:
    series, _ = one_series(moto, tmp_path, 3)
    size = sum(len(b) for b in series.objects.values())
    index = write_index(tmp_path / "i2" / "idc_index.parquet",
                        [{**series.row, "series_size_MB": (size + 7) / 1_000_000.}])
    result = harvest_one(moto.endpoint, tmp_path, index, series.uid)
    assert f"holds {size} of {size + 7} bytes" in failure(result)


def test_more_objects_than_the_index_says_is_not_the_series(moto: Moto, tmp_path: Path) -> None:
    series, index = one_series(moto, tmp_path, 4, row={"instanceCount": 2})
    result = harvest_one(moto.endpoint, tmp_path, index, series.uid)
    assert "holds 3 objects, more than the 2" in failure(result)


def test_short_object_body_is_retried_then_failed(moto: Moto, proxy: S3Proxy, tmp_path: Path) -> None:
    """An object whose body is shorter than listed (a complete HTTP answer): retried, then the
    series fails naming the bytes; another object is never kept under a final name."""
    series, index = one_series(moto, tmp_path, 5)
    key = next(iter(series.objects))
    hits = []

    def short(request: web.Request) -> web.StreamResponse | None:
        if request.path.endswith(key):
            hits.append(1)
            return web.Response(body=series.objects[key][:100])
        return None

    proxy.override = short
    result = harvest_one(proxy.url, tmp_path, index, series.uid)
    assert f"sent 100 of the {len(series.objects[key])} bytes listed" in failure(result)
    assert len(hits) == 2 * 2   # retries=2 per request, two series attempts


def test_corrupt_object_fails_its_etag(moto: Moto, proxy: S3Proxy, tmp_path: Path) -> None:
    series, index = one_series(moto, tmp_path, 6)
    key = next(iter(series.objects))

    def corrupt(request: web.Request) -> web.StreamResponse | None:
        if request.path.endswith(key):
            data = bytearray(series.objects[key])
            data[-1] ^= 0xFF
            return web.Response(body=bytes(data))
        return None

    proxy.override = corrupt
    assert "does not match its ETag" in failure(harvest_one(proxy.url, tmp_path, index, series.uid))


def test_404_and_403_are_not_retried(moto: Moto, proxy: S3Proxy, tmp_path: Path) -> None:
    series, index = one_series(moto, tmp_path, 7)
    key = next(iter(series.objects))
    hits = []

    def gone(request: web.Request) -> web.StreamResponse | None:
        if request.path.endswith(key):
            hits.append(1)
            return web.Response(status=403, body=b"<Error><Code>AccessDenied</Code></Error>")
        return None

    proxy.override = gone
    reason = failure(harvest_one(proxy.url, tmp_path, index, series.uid))
    assert "HTTP 403" in reason and "AccessDenied" in reason
    assert len(hits) == 1   # a refusal is not retried, neither the request nor the series


def listing(keys: list[str], *, token: str | None = None) -> bytes:
    contents = "".join(f"<Contents><Key>{k}</Key><Size>10</Size><ETag>&quot;x&quot;</ETag></Contents>" for k in keys)
    more = f"<IsTruncated>true</IsTruncated><NextContinuationToken>{token}</NextContinuationToken>" if token else \
        "<IsTruncated>false</IsTruncated>"
    return (f'<?xml version="1.0"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">{more}'
            f"{contents}</ListBucketResult>").encode()


def test_huge_listing_is_refused(moto: Moto, proxy: S3Proxy, tmp_path: Path) -> None:
    """A listing that never ends (a new token on every page) stops at the entry limit; a page
    larger than the cap on one listing is not read to its end."""
    series, index = one_series(moto, tmp_path, 8, put=False)
    pages = []

    def endless(request: web.Request) -> web.StreamResponse | None:
        if "list-type" in request.query:
            pages.append(1)
            return web.Response(body=listing([f"{series.uuid}/{len(pages)}-{i}.dcm" for i in range(1000)],
                                             token=f"t{len(pages)}"))
        return None

    proxy.override = endless
    limits = dataclasses.replace(Limits(), max_entries=2500)
    assert "lists more than 2500 objects" in failure(harvest_one(proxy.url, tmp_path, index, series.uid,
                                                                 limits=limits))
    assert len(pages) == 3
    proxy.override = lambda request: web.Response(body=listing([f"{series.uuid}/{'x' * 900}{i}.dcm"
                                                                for i in range(6000)]))
    assert "more than 4194304 bytes" in failure(harvest_one(proxy.url, tmp_path / "2", index, series.uid))


def test_listing_with_a_doctype_is_never_parsed(moto: Moto, proxy: S3Proxy, tmp_path: Path) -> None:
    series, index = one_series(moto, tmp_path, 9, put=False)
    bomb = (b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'
            b"<ListBucketResult><Contents><Key>&b;</Key></Contents></ListBucketResult>")
    proxy.override = lambda request: web.Response(body=bomb)
    assert "DOCTYPE" in failure(harvest_one(proxy.url, tmp_path, index, series.uid))


def test_unusable_index_row_is_unavailable(moto: Moto, tmp_path: Path) -> None:
    """A row whose crdc_series_uuid would climb out of the bucket's prefix is never fetched."""
    series, index = one_series(moto, tmp_path, 10, put=False, row={"crdc_series_uuid": "../../etc",
                                                                     "series_aws_url": None})
    config = idc_config(moto.endpoint, tmp_path / "out", index)
    plan = anyio.run(lambda: aplan(query_from_dict({"select": [{"series": [series.uid]}]}), config))
    assert not plan.tasks
    assert [u.reason for u in plan.unavailable] == ["the IDC index row is unusable: its crdc_series_uuid is not a UUID"]


def test_bad_index_file_is_one_line_exit_2(tmp_path: Path) -> None:
    query = tmp_path / "q.yaml"
    query.write_text("select:\n  - collection: X\n")
    bad = tmp_path / "idc_index.parquet"
    bad.write_bytes(b"PAR1 not really")
    done = run_cli("plan", str(query), "--source", "idc", "--idc-index", str(bad))
    assert done.returncode == 2
    assert done.stderr.startswith("harvester: error: IDC index") and "not a readable parquet file" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    missing = write_index(tmp_path / "m" / "idc_index.parquet", [])
    import pyarrow.parquet as pq
    pq.write_table(pq.read_table(missing).drop_columns(["crdc_series_uuid"]), missing)
    done = run_cli("plan", str(query), "--source", "idc", "--idc-index", str(missing))
    assert done.returncode == 2 and "no column crdc_series_uuid" in done.stderr


def test_endpoint_userinfo_never_reaches_the_record(moto: Moto, proxy: S3Proxy, tmp_path: Path) -> None:
    series, index = one_series(moto, tmp_path, 11)
    query = tmp_path / "q.yaml"
    query.write_text(f"select:\n  - series: [{series.uid}]\n")
    out = tmp_path / "out"
    endpoint = proxy.url.replace("http://", "http://someone:s3cr3t-pw@")
    done = run_cli("run", str(query), "-o", str(out), "--source", "idc", "--endpoint-url", endpoint,
                   "--idc-index", str(index), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert_bucket_identical(out, type("C", (), {"get": lambda self, uid: series})(), [series.uid])  # type: ignore[arg-type]
    for path in [p for p in out.rglob("*") if p.is_file() and p.suffix != ".dcm"]:
        assert b"s3cr3t-pw" not in path.read_bytes(), path
    assert "s3cr3t-pw" not in done.stdout + done.stderr
    assert json.loads((out / "harvest.json").read_text())["api_url"] == proxy.url
    assert os.path.exists(out / "harvest.json")


def test_a_streamed_object_cut_short_fails_the_attempt_not_the_request(moto: Moto, proxy: S3Proxy, tmp_path: Path,
                                                                       monkeypatch: Any) -> None:
    """An object past WHOLE_OBJECT_BYTES goes into the sink as it arrives, so once its bytes are
    there the sink cannot take it back: a body cut short fails the series attempt (no request
    retry into a sink holding half an object), the next attempt fetches the series whole, and no
    half file is left anywhere."""
    from harvester.source.idc import source as idc_source

    monkeypatch.setattr(idc_source, "WHOLE_OBJECT_BYTES", 0)   # every object is streamed
    series, index = one_series(moto, tmp_path, 12)
    key = next(iter(series.objects))
    hits = []

    def short_once(request: web.Request) -> web.StreamResponse | None:
        if request.path.endswith(key):
            hits.append(1)
            if len(hits) == 1:
                return web.Response(body=series.objects[key][:100])
        return None

    proxy.override = short_once
    result = harvest_one(proxy.url, tmp_path, index, series.uid)
    assert result.ok, result.failed
    assert len(hits) == 2   # the cut body was not retried as a request: the series was
    out = tmp_path / "out"
    assert_bucket_identical(out, type("C", (), {"get": lambda self, uid: series})(), [series.uid])  # type: ignore[arg-type]
    assert not [p for p in tmp_path.rglob("*.part")]


def test_a_series_of_whole_and_streamed_objects_comes_out_whole(moto: Moto, tmp_path: Path, monkeypatch: Any) -> None:
    """Objects past WHOLE_OBJECT_BYTES are streamed into the sink, the others written in the
    writer's batches; in a series of both kinds they take turns at the sink (a series without a
    streamed object takes none), so every file comes out byte for byte."""
    from harvester.source.idc import source as idc_source

    small = make_series("idc_hostile", "H1", "1.2.826.0.1.40", "CT", 8, seed=1040)
    large = make_series("idc_hostile", "H1", "1.2.826.0.1.40", "CT", 8, seed=1040, series_uid=small.uid,
                        pixel_bytes=16384)
    keys = list(small.objects)   # the same keys and SOPInstanceUIDs in both: half of each
    objects = {k: (small if n % 2 else large).objects[k] for n, k in enumerate(keys)}
    series = dataclasses.replace(small, objects=objects,
                                 row=small.row | {"series_size_MB": sum(map(len, objects.values())) / 1e6})
    monkeypatch.setattr(idc_source, "WHOLE_OBJECT_BYTES", 8192)   # between the two sizes
    assert {len(b) > 8192 for b in objects.values()} == {True, False}
    moto.put(series)
    index = write_index(tmp_path / "index" / "idc_index.parquet", [series.row])
    result = harvest_one(moto.endpoint, tmp_path, index, series.uid)
    assert result.ok, result.failed
    assert_bucket_identical(tmp_path / "out", type("C", (), {"get": lambda self, uid: series})(), [series.uid])  # type: ignore[arg-type]
