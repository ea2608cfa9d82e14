"""A hand-made NBIA look-alike for hostile-input tests: it serves whatever rows and ZIP bytes a
test gives it, verbatim, where ``harvester serve`` would only ever serve a consistent archive.

Also builders for the hostile material: DICOM files carrying any SeriesInstanceUID string, and
a raw ZIP writer that lets a test lie in every header field (CRC, sizes, names, flags, method,
file type) independently of the bytes that follow.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from harvester.server.dicomgen import PixelGeometry, encode_instance, make_uid, series_template


@dataclass
class HandArchive:
    """What the hand server answers. ``series`` is the getSeries body (any JSON value: rows may
    be anything); ``zips`` maps the SeriesInstanceUID *parameter* to the getImage body."""

    series: Any = field(default_factory=list)
    zips: dict[str, bytes] = field(default_factory=dict)
    collections: list[str] | None = None
    studies: Any = field(default_factory=list)
    patients: Any = field(default_factory=list)
    sizes: dict[str, Any] = field(default_factory=dict)
    downloads: dict[str, int] = field(default_factory=dict)

    def collection_values(self) -> list[dict[str, Any]]:
        if self.collections is not None:
            return [{"Collection": c} for c in self.collections]
        rows = self.series if isinstance(self.series, list) else []
        names = {r.get("Collection") for r in rows if isinstance(r, dict) and isinstance(r.get("Collection"), str)}
        return [{"Collection": c} for c in sorted(names)]


def _json(body: Any) -> web.Response:
    return web.Response(body=json.dumps(body).encode("utf-8"), content_type="application/json")


def make_hand_app(archive: HandArchive) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        name = request.match_info["endpoint"]
        q = request.query
        if name == "getCollectionValues":
            return _json(archive.collection_values())
        if name == "getSeries":
            body = archive.series
            if isinstance(body, list) and "SeriesInstanceUID" in q:
                body = [r for r in body if isinstance(r, dict) and str(r.get("SeriesInstanceUID")) == q["SeriesInstanceUID"]]
            return _json(body)
        if name == "getPatientStudy":
            return _json(archive.studies)
        if name == "getPatient":
            return _json(archive.patients)
        if name == "getSeriesSize":
            return _json(archive.sizes.get(q.get("SeriesInstanceUID", ""), []))
        if name in ("getImage", "getImageWithMD5Hash"):
            uid = q.get("SeriesInstanceUID", "")
            archive.downloads[uid] = archive.downloads.get(uid, 0) + 1
            if uid not in archive.zips:
                return web.Response(status=400, text=f"SeriesInstanceUID {uid} was not found\n")
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(archive.zips[uid])
            await resp.write_eof()
            return resp
        return web.Response(status=400, text=f"{name} is not served here\n")

    app = web.Application()
    app.router.add_get("/nbia-api/services/v4/{endpoint}", handler)
    return app


@contextmanager
def serve_hand(archive: HandArchive) -> Iterator[str]:
    """Serve ``archive`` on 127.0.0.1 in a thread; yields the v4 base URL."""
    with serve_app(make_hand_app(archive)) as root:
        yield f"{root}/nbia-api/services/v4"


@contextmanager
def serve_app(app: web.Application) -> Iterator[str]:
    """Serve any aiohttp ``app`` on 127.0.0.1 in a thread; yields ``http://127.0.0.1:PORT``."""
    loop = asyncio.new_event_loop()
    started: Future[tuple[web.AppRunner, str]] = Future()
    stop = threading.Event()

    async def start() -> tuple[web.AppRunner, str]:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return runner, f"http://{host}:{port}"

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started.set_result(loop.run_until_complete(start()))
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            started.set_exception(err)
            return
        loop.run_forever()
        loop.run_until_complete(started.result()[0].cleanup())
        loop.close()
        stop.set()

    thread = threading.Thread(target=run, daemon=True, name="hand-server")
    thread.start()
    _, url = started.result(timeout=30)
    try:
        yield url
    finally:
        loop.call_soon_threadsafe(loop.stop)
        stop.wait(30)
        thread.join(30)


# ------------------------------------------------------------------------------ DICOM

def dicom_series(series_uid: str, count: int = 3, *, seed: str = "hand", pixels: int = 512) -> list[tuple[str, bytes]]:
    """``count`` DICOM instances whose SeriesInstanceUID element holds ``series_uid`` verbatim
    (whatever it is: the archive's rows decide what the client expects)."""
    geometry = PixelGeometry.for_size(pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about UIDs that are not UIDs: on purpose
        return _dicom_series(series_uid, count, seed, geometry, pixels)


def _dicom_series(series_uid: str, count: int, seed: str, geometry: PixelGeometry, pixels: int
                  ) -> list[tuple[str, bytes]]:
    template = series_template("CT", geometry, {
        "PatientID": "HAND", "StudyInstanceUID": make_uid("hand-study", seed),
        "SeriesInstanceUID": series_uid, "SeriesNumber": 1, "Modality": "CT",
    })
    out = []
    for n in range(1, count + 1):
        sop = make_uid("hand-sop", seed, series_uid, n)
        out.append((f"1-{n:02d}.dcm", encode_instance(template, sop, n, bytes([n % 256]) * pixels)))
    return out


def md5_csv(files: list[tuple[str, bytes]]) -> bytes:
    lines = ["Filename,MD5Hash"] + [f"{name},{hashlib.md5(data).hexdigest()}" for name, data in files]
    return ("\r\n".join(lines) + "\r\n").encode()


# ------------------------------------------------------------------------------ raw ZIP

@dataclass
class RawEntry:
    """One entry as it will be written. Unset header fields are computed honestly from ``data``;
    set ones are written as given, whatever the bytes are (that is the point)."""

    name: str | bytes
    data: bytes                          # the bytes stored (already compressed for method 8)
    method: int = 0                      # 0 stored, 8 deflate, anything else for "unknown"
    crc: int | None = None               # CRC-32 of the *uncompressed* bytes
    size: int | None = None              # uncompressed size
    plain: bytes | None = None           # the uncompressed bytes, when method 8 (for crc/size)
    flags: int = 0
    external_attr: int = (0o100644 << 16)
    local_name: str | bytes | None = None  # the name in the local header, if it must differ


def deflated(plain: bytes) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    return comp.compress(plain) + comp.flush()


def raw_zip(entries: list[RawEntry], *, central: bool = True) -> bytes:
    """A ZIP written field by field (no ZIP64, no data descriptors)."""
    out = io.BytesIO()
    records = []
    for e in entries:
        name = e.name.encode("utf-8") if isinstance(e.name, str) else e.name
        local = e.local_name if e.local_name is not None else name
        local = local.encode("utf-8") if isinstance(local, str) else local
        plain = e.plain if e.plain is not None else e.data
        crc = zlib.crc32(plain) if e.crc is None else e.crc
        size = len(plain) if e.size is None else e.size
        offset = out.tell()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, e.flags | 0x0800, e.method, 0, 0x5021, crc,
                              len(e.data), size, len(local), 0))
        out.write(local)
        out.write(e.data)
        records.append((name, e, crc, size, offset))
    if not central:
        return out.getvalue()
    start = out.tell()
    for name, e, crc, size, offset in records:
        out.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | 20, 20, e.flags | 0x0800, e.method,
                              0, 0x5021, crc, len(e.data), size, len(name), 0, 0, 0, 0, e.external_attr, offset))
        out.write(name)
    end = out.tell()
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), end - start, start, 0))
    return out.getvalue()


def honest_zip(files: list[tuple[str, bytes]], *, extra: list[RawEntry] | None = None,
               md5_files: list[tuple[str, bytes]] | None = None, license_text: bytes = b"CC BY 4.0\n") -> bytes:
    """LICENSE, the files, any ``extra`` entries, then md5hashes.csv (of ``md5_files`` or the files)."""
    entries = [RawEntry("LICENSE", license_text)] + [RawEntry(n, d) for n, d in files] + list(extra or [])
    entries.append(RawEntry("md5hashes.csv", md5_csv(md5_files if md5_files is not None else files)))
    return raw_zip(entries)
