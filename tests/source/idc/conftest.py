"""A real S3-compatible server on loopback (moto in server mode), seeded with a synthetic
IDC-shaped bucket, a small index in the real ``idc_index`` schema, and a fault-injecting
reverse proxy in front of it (``harvester.server.faults``' vocabulary)."""
from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("moto.server")
pytest.importorskip("pyarrow")

import aiohttp  # noqa: E402
import boto3  # noqa: E402
from aiohttp import web  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

from harvester.server.dicomgen import PixelGeometry, encode_instance, make_uid, seeded_rng, series_template  # noqa: E402
from harvester.server.faults import FaultInjector, FaultSpec  # noqa: E402
from index_helpers import write_index  # noqa: E402,F401  (the tests import it from here)

BUCKET = "idc-open-data"


@dataclass
class IDCSeries:
    uid: str
    uuid: str
    collection_id: str
    row: dict[str, Any]
    objects: dict[str, bytes] = field(default_factory=dict)   # key -> bytes

    def by_sop(self) -> dict[str, bytes]:
        import pydicom
        import io
        return {str(pydicom.dcmread(io.BytesIO(b), stop_before_pixels=True).SOPInstanceUID): b
                for b in self.objects.values()}


def make_series(collection_id: str, patient: str, study_uid: str, modality: str, count: int, *, seed: int,
                series_uid: str | None = None, dicom_series_uid: str | None = None,
                pixel_bytes: int = 2048) -> IDCSeries:
    """One IDC-shaped series: ``count`` real DICOM files under ``<crdc_series_uuid>/`` and its
    index row (``dicom_series_uid``: the UID written into the files, if not the row's)."""
    uid = series_uid or make_uid("idc-series", collection_id, patient, modality, seed)
    prefix = str(uuid.UUID(bytes=hashlib.md5(uid.encode()).digest(), version=4))
    template = series_template(modality, PixelGeometry.for_size(pixel_bytes), {
        "PatientID": patient, "StudyInstanceUID": study_uid, "SeriesInstanceUID": dicom_series_uid or uid,
        "SeriesDescription": f"{modality} {seed}", "SeriesNumber": seed, "Manufacturer": "ACME",
        "BodyPartExamined": "CHEST"})
    rng = seeded_rng("idc-pixels", uid)
    objects = {}
    for n in range(1, count + 1):
        data = encode_instance(template, make_uid("idc-sop", uid, n), n, rng.randbytes(pixel_bytes))
        instance_uuid = uuid.UUID(bytes=hashlib.md5(f"{uid}/{n}".encode()).digest(), version=4)
        objects[f"{prefix}/{instance_uuid}.dcm"] = data
    row = {
        "collection_id": collection_id, "analysis_result_id": None, "PatientID": patient,
        "SeriesInstanceUID": uid, "StudyInstanceUID": study_uid, "source_DOI": "10.7937/test.idc",
        "PatientAge": "060Y", "PatientSex": "F", "StudyDate": "2001-02-03", "StudyDescription": "CHEST",
        "BodyPartExamined": "CHEST", "Modality": modality, "SOPClassUID": None, "Manufacturer": "ACME",
        "ManufacturerModelName": "Model", "SeriesDate": "2001-02-03", "SeriesDescription": f"{modality} {seed}",
        "SeriesNumber": str(seed), "license_short_name": "CC BY 4.0", "aws_bucket": BUCKET,
        "crdc_series_uuid": prefix, "series_aws_url": f"s3://{BUCKET}/{prefix}/*",
        "instanceCount": count, "series_init_idc_version": 1, "series_revised_idc_version": 1,
        # SUM(instance_size)/1e6, as the package's SQL computes it
        "series_size_MB": sum(len(b) for b in objects.values()) / 1_000_000.,
    }
    return IDCSeries(uid=uid, uuid=prefix, collection_id=collection_id, row=row, objects=objects)




@dataclass
class Moto:
    endpoint: str
    client: Any

    def put(self, series: IDCSeries, *, multipart: bool = False) -> None:
        for key, data in series.objects.items():
            if multipart:  # one part: the ETag is "<md5 of the part md5s>-1", not the object's MD5
                up = self.client.create_multipart_upload(Bucket=BUCKET, Key=key, ACL="public-read")
                part = self.client.upload_part(Bucket=BUCKET, Key=key, PartNumber=1, UploadId=up["UploadId"],
                                               Body=data)
                self.client.complete_multipart_upload(
                    Bucket=BUCKET, Key=key, UploadId=up["UploadId"],
                    MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})
            else:
                self.client.put_object(Bucket=BUCKET, Key=key, Body=data, ACL="public-read")


@pytest.fixture(scope="session")
def moto() -> Iterator[Moto]:
    """moto's S3 in server mode on a free loopback port, with the bucket created."""
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield Moto(endpoint, client)
    finally:
        server.stop()


@dataclass
class Cohort:
    series: list[IDCSeries]
    index: Path
    names: dict[str, str]

    def get(self, uid: str) -> IDCSeries:
        return next(s for s in self.series if s.uid == uid)


@pytest.fixture(scope="session")
def cohort(moto: Moto, tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    """Two collections, five series (one uploaded multipart), in the bucket and in an index."""
    alpha_study = [make_uid("study", "alpha", p) for p in ("A1", "A2")]
    beta_study = make_uid("study", "beta", "B1")
    series = [
        make_series("idc_alpha", "A1", alpha_study[0], "CT", 5, seed=1),
        make_series("idc_alpha", "A1", alpha_study[0], "MR", 3, seed=2),
        make_series("idc_alpha", "A2", alpha_study[1], "CT", 4, seed=3),
        make_series("idc_beta", "B1", beta_study, "CT", 6, seed=4),
        make_series("idc_beta", "B1", beta_study, "MR", 2, seed=5),
    ]
    for n, s in enumerate(series):
        moto.put(s, multipart=n == 4)
    names = {"idc_alpha": "IDC-Alpha", "idc_beta": "IDC-Beta"}
    index = write_index(tmp_path_factory.mktemp("idc-index") / "idc_index.parquet", [s.row for s in series], names)
    return Cohort(series, index, names)


class S3Proxy:
    """A reverse proxy in front of moto on a free loopback port, in its own thread and loop.

    Faults come from a ``FaultSpec`` decided per request by ``FaultInjector`` (path and query):
    ``error`` is S3's 500 InternalError, ``throttle`` its 503 SlowDown, ``reset`` aborts the
    connection partway through the body, ``truncate`` sends a short body under the full
    Content-Length. ``override(request)`` may answer a request itself (hostile answers);
    ``hold`` keeps the requests for one prefix waiting forever."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults = FaultInjector(None)
        self.override: Callable[[web.Request], web.StreamResponse | None] | None = None
        #: requests whose path contains this never get an answer (a run killed while it waits)
        self.hold: str | None = None
        self.requests = 0
        self.faults_fired = 0
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._released: asyncio.Event | None = None

    def set_faults(self, spec: str | None) -> None:
        self.faults.replace(FaultSpec.parse(spec) if spec else None)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.hold and self.hold in request.path_qs:
            assert self._released is not None
            await self._released.wait()   # set when the proxy stops
        if self.override is not None:
            answer = self.override(request)
            if answer is not None:
                return answer
        listing = "list-type" in request.query
        decision = self.faults.decide(request.path, request.query.items(), download=not listing)
        if decision.error_status or decision.throttle:
            self.faults_fired += 1
            code, status = ("SlowDown", 503) if decision.throttle else ("InternalError", 500)
            return web.Response(status=status, content_type="application/xml",
                                body=f"<?xml version='1.0'?><Error><Code>{code}</Code></Error>".encode())
        assert self._session is not None
        async with self._session.get(self.upstream + request.path_qs) as up:
            body = await up.read()
            headers = {k: v for k, v in up.headers.items() if k.lower() in ("etag", "content-type")}
            status = up.status
        if not (decision.reset or decision.truncate) or not body:
            return web.Response(status=status, body=body, headers=headers)
        self.faults_fired += 1
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[: int(len(body) * decision.where)])
        if request.transport is not None:
            request.transport.abort() if decision.reset else request.transport.close()
        return resp

    def __enter__(self) -> S3Proxy:
        started: Future[str] = Future()

        async def start() -> str:
            self._session = aiohttp.ClientSession(auto_decompress=False)
            self._released = asyncio.Event()
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            port = self._runner.addresses[0][1]
            return f"http://127.0.0.1:{port}"

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                started.set_result(self._loop.run_until_complete(start()))
            except BaseException as exc:  # hand it to the test's thread
                started.set_exception(exc)
                return
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="s3-proxy", daemon=True)
        self._thread.start()
        self.url = started.result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._released is not None:
                self._released.set()
            if self._runner is not None:
                await self._runner.cleanup()
            if self._session is not None:
                await self._session.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


@pytest.fixture
def proxy(moto: Moto) -> Iterator[S3Proxy]:
    with S3Proxy(moto.endpoint) as p:
        yield p
