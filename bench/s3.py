"""Scenario g's S3 side: a synthetic archive laid out as an IDC bucket, its index, and two
S3-compatible servers on loopback, each in its own process (so its CPU is not the client's).

* ``bucket_objects`` maps the archive to ``s3://idc-open-data/<crdc_series_uuid>/<uuid>.dcm``
  (one object per instance, the files' exact bytes), ``write_index`` writes the ``idc_index``
  parquet harvester plans from (the real column names and types).
* ``MotoS3``: moto's S3 in server mode (``python -m moto.server``), seeded over HTTP with
  boto3; what the tests run against. moto is pure Python: its GETs bound what a client can reach.
* ``StaticS3``: this file run as a script, an aiohttp server that answers ListObjectsV2 and GET
  (sendfile from the archive's files, the MD5 as ETag) and nothing else: close to the ceiling of
  a loopback S3, so the clients' figures are theirs, not the server's. It counts requests and
  bytes sent (``/_stats``).
* ``StaticS3(..., faults="latency=30ms,total_rate=100MiB")``: a link like a user's to IDC's S3
  (``harvester.server.faults.FaultSpec`` syntax; only ``latency`` and ``total_rate`` are taken):
  ``latency`` is slept before the response headers of every request (listings and GETs), and
  ``total_rate`` caps all response bodies together (one token bucket shared by every connection,
  GET bodies sent in chunks of at most 64 KiB, each booked on the bucket before it is written).
  Without faults the server takes the uncapped path above (sendfile), unchanged.

    python bench/s3.py OBJECTS.json [FAULTS]   # serve: prints the base URL, then serves until killed
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from harness import stop_process

BUCKET = "idc-open-data"


@dataclass(frozen=True)
class BucketObject:
    key: str
    path: str
    size: int
    md5: str


def _uuid(text: str) -> str:
    return str(uuid.UUID(bytes=hashlib.md5(text.encode()).digest(), version=4))


def series_prefix(series_uid: str) -> str:
    """The series' ``crdc_series_uuid`` (derived from its UID, so every run names it alike)."""
    return _uuid("series/" + series_uid)


def bucket_objects(archive: Any) -> list[BucketObject]:
    """One object per instance of every series of ``archive``, keys sorted (as S3 lists them)."""
    out = [BucketObject(f"{series_prefix(rec.uid)}/{_uuid(rec.uid + '/' + inst.sop_uid)}.dcm", str(inst.path),
                        inst.size, inst.md5)
           for rec in archive.records() for inst in rec.instances]
    return sorted(out, key=lambda o: o.key)


def write_index(path: Path, archive: Any) -> Path:
    """The ``idc_index`` parquet of ``archive`` laid out by ``bucket_objects``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for rec in archive.records():
        prefix = series_prefix(rec.uid)
        rows.append({
            "collection_id": re.sub(r"[^0-9a-z]", "_", rec.row["Collection"].lower()), "analysis_result_id": None,
            "PatientID": rec.row["PatientID"], "StudyInstanceUID": rec.row["StudyInstanceUID"],
            "SeriesInstanceUID": rec.uid, "Modality": rec.row.get("Modality"), "aws_bucket": BUCKET,
            "crdc_series_uuid": prefix, "series_aws_url": f"s3://{BUCKET}/{prefix}/*",
            "instanceCount": len(rec.instances), "series_size_MB": rec.total_bytes / 1_000_000.,
        })
    schema = pa.schema([(c, pa.large_string()) for c in ("collection_id", "analysis_result_id", "PatientID",
                                                         "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                                                         "aws_bucket", "crdc_series_uuid", "series_aws_url")]
                       + [("instanceCount", pa.int64()), ("series_size_MB", pa.float64())])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Served:
    """A server subprocess; use as a context manager."""

    proc: subprocess.Popen[bytes] | None = None
    url = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        import psutil

        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def stats(self) -> dict[str, int] | None:
        return None

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class MotoS3(_Served):
    """moto's S3 server in its own process, the bucket created and seeded with ``objects``."""

    name = "moto"

    def __init__(self, objects: Iterable[BucketObject], log: Path | None = None) -> None:
        self.objects, self.log = list(objects), log

    def __enter__(self) -> MotoS3:
        port = _free_port()
        env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_DEFAULT_REGION="us-east-1")
        err = open(self.log, "wb") if self.log else subprocess.DEVNULL  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=err, env=env)
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=5).close()
                break
            except OSError:
                time.sleep(0.1)   # waiting for the server to listen, not timing anything
        else:
            self.__exit__()
            raise RuntimeError("moto's server did not start")
        import boto3

        client = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=BUCKET)

        def put(obj: BucketObject) -> None:
            client.put_object(Bucket=BUCKET, Key=obj.key, Body=Path(obj.path).read_bytes(), ACL="public-read")

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, self.objects))
        return self


class StaticS3(_Served):
    """``python bench/s3.py OBJECTS.json`` in its own process (see the module docstring)."""

    name = "static aiohttp S3"

    def __init__(self, objects: Iterable[BucketObject], work: Path, log: Path | None = None,
                 faults: str = "") -> None:
        self.objects, self.work, self.log, self.faults = list(objects), work, log, faults
        if faults:
            link_spec(faults)   # a bad spec fails here, not in the child
            self.name = f"static aiohttp S3, {faults}"

    def __enter__(self) -> StaticS3:
        self.work.mkdir(parents=True, exist_ok=True)
        listing = self.work / "objects.json"
        listing.write_text(json.dumps([o.__dict__ for o in self.objects]))
        err = open(self.log, "wb") if self.log else subprocess.DEVNULL  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen([sys.executable, __file__, str(listing), *([self.faults] if self.faults else [])],
                                     stdout=subprocess.PIPE, stderr=err)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("http://127.0.0.1:"):
            self.__exit__()
            raise RuntimeError(f"the static S3 server did not print its URL (got {line!r})")
        self.url = line
        return self

    def stats(self) -> dict[str, int] | None:
        with urllib.request.urlopen(self.url + "/_stats", timeout=30) as resp:
            return dict(json.loads(resp.read()))


# ---------------------------------------------------------------------------------- the static server

#: The largest body chunk booked on the total-rate bucket at once.
CHUNK = 64 * 1024
#: The FaultSpec keys the static server implements (the others would be silently ignored).
LINK_KEYS = ("latency", "total_rate")


def link_spec(text: str) -> Any:
    """``latency=30ms,total_rate=100MiB`` as a ``FaultSpec``; ``ValueError`` for a bad spec or for
    a key the static server does not implement."""
    from harvester.server.faults import FaultSpec

    spec = FaultSpec.parse(text)
    default = FaultSpec()
    other = [f for f in spec.__dataclass_fields__ if f not in (*LINK_KEYS, "seed")
             and getattr(spec, f) != getattr(default, f)]
    if other:
        raise ValueError(f"the static S3 server implements only {', '.join(LINK_KEYS)} (not {', '.join(other)})")
    return spec

def _listing_xml(objects: list[BucketObject], prefix: str, delimiter: str, start_after: str,
                 max_keys: int) -> bytes:
    keys: list[BucketObject] = []
    common: list[str] = []
    next_token = ""
    for obj in objects:
        if not obj.key.startswith(prefix) or obj.key <= start_after:
            continue
        rest = obj.key[len(prefix):]
        if delimiter and delimiter in rest:
            folder = prefix + rest.split(delimiter, 1)[0] + delimiter
            if not common or common[-1] != folder:
                common.append(folder)
            continue
        if len(keys) == max_keys:
            next_token = keys[-1].key
            break
        keys.append(obj)
    parts = ['<?xml version="1.0" encoding="UTF-8"?>'
             '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
             f"<Name>{BUCKET}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(keys)}</KeyCount>"
             f"<MaxKeys>{max_keys}</MaxKeys><IsTruncated>{'true' if next_token else 'false'}</IsTruncated>"]
    if next_token:
        parts.append(f"<NextContinuationToken>{escape(next_token)}</NextContinuationToken>")
    for obj in keys:
        parts.append(f"<Contents><Key>{escape(obj.key)}</Key><LastModified>2024-01-01T00:00:00.000Z</LastModified>"
                     f"<ETag>&quot;{obj.md5}&quot;</ETag><Size>{obj.size}</Size>"
                     "<StorageClass>STANDARD</StorageClass></Contents>")
    parts += [f"<CommonPrefixes><Prefix>{escape(c)}</Prefix></CommonPrefixes>" for c in common]
    parts.append("</ListBucketResult>")
    return "".join(parts).encode()


def serve(listing: Path, faults: str = "") -> None:
    import asyncio

    from aiohttp import web

    from harvester.server.faults import TokenBucket

    spec = link_spec(faults) if faults else None
    latency = spec.latency if spec else 0.0
    bucket_cap = TokenBucket(spec.total_rate) if spec and spec.total_rate else None
    objects = sorted((BucketObject(**o) for o in json.loads(listing.read_text())), key=lambda o: o.key)
    by_key = {o.key: o for o in objects}
    # first_request / last_byte: time.monotonic() (the system's one clock, the same in the bench's
    # process), when the first request came in and when the last body byte was written
    stats: dict[str, float] = {"requests": 0, "bytes_sent": 0, "gets": 0, "first_request": 0.0, "last_byte": 0.0}

    def arrived() -> None:
        stats["requests"] += 1
        if not stats["first_request"]:
            stats["first_request"] = time.monotonic()

    async def bucket(request: web.Request) -> web.StreamResponse:
        arrived()
        if latency:
            await asyncio.sleep(latency)
        if request.match_info["bucket"] != BUCKET:
            return web.Response(status=404, text="<Error><Code>NoSuchBucket</Code></Error>")
        q = request.query
        body = _listing_xml(objects, q.get("prefix", ""), q.get("delimiter", ""),
                            q.get("continuation-token") or q.get("start-after", ""),
                            min(1000, int(q.get("max-keys", "1000"))))
        stats["bytes_sent"] += len(body)
        if bucket_cap is not None:
            await bucket_cap.take(len(body))
        stats["last_byte"] = time.monotonic()
        return web.Response(body=body, content_type="application/xml")

    async def get(request: web.Request) -> web.StreamResponse:
        arrived()
        if latency:
            await asyncio.sleep(latency)
        obj = by_key.get(request.match_info["key"]) if request.match_info["bucket"] == BUCKET else None
        if obj is None:
            return web.Response(status=404, text="<Error><Code>NoSuchKey</Code></Error>")
        stats["gets"] += 1
        if request.method == "GET":
            stats["bytes_sent"] += obj.size
        headers = {"ETag": f'"{obj.md5}"', "Content-Type": "application/dicom"}
        if bucket_cap is None:
            # returned unprepared: aiohttp prepares (sends) it once, after the handler. Prepared
            # here, it was prepared again there, failed, and every connection was closed after
            # its first GET (each client then connected once per object)
            request["etag"] = headers["ETag"]   # FileResponse sets its own (mtime-size): put back
            return _TimedFile(obj.path, headers=headers)
        resp = await capped(request, obj, headers)
        stats["last_byte"] = time.monotonic()
        return resp

    class _TimedFile(web.FileResponse):
        """The object's file (sendfile); the time its last byte went out is the server's last."""

        async def prepare(self, request: web.BaseRequest) -> Any:
            writer = await super().prepare(request)
            stats["last_byte"] = time.monotonic()
            return writer

    async def capped(request: web.Request, obj: BucketObject, headers: dict[str, str]) -> web.StreamResponse:
        """The object's bytes in chunks of at most ``CHUNK``, each booked on the shared bucket
        first (the files are in the page cache: ``warm_cache`` runs before every run)."""
        assert bucket_cap is not None
        resp = web.StreamResponse(headers=headers)
        resp.content_length = obj.size
        await resp.prepare(request)
        if request.method == "GET":
            with open(obj.path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    await bucket_cap.take(len(chunk))
                    await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def report(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def s3_etag(request: web.Request, response: web.StreamResponse) -> None:
        """The object's MD5 as its ETag, as S3 sends it (``on_response_prepare`` runs after
        FileResponse has set an ETag of its own, before the headers go out)."""
        if "etag" in request:
            response.headers["ETag"] = request["etag"]

    app = web.Application()
    app.on_response_prepare.append(s3_etag)
    app.router.add_get("/_stats", report)
    app.router.add_route("*", "/{bucket}", bucket)
    app.router.add_route("*", "/{bucket}/", bucket)
    app.router.add_route("*", "/{bucket}/{key:.+}", get)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)   # listening before the URL is printed: no client can come too early
    print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    web.run_app(app, sock=sock, access_log=None, print=None)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "")
