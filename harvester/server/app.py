"""The NBIA-compatible HTTP API over an :class:`~harvester.server.archive.Archive` (aiohttp.web).

Routes (``{v}`` is ``v1``, ``v2`` or ``v4``)::

    GET  /nbia-api/services/{v}/<endpoint>     query and download endpoints of /work/shared/nbia-api.md
    GET  /nbia-api/services/v1/getDCMImage     a series with its annotation files (docs/annotations.md)
    POST /nbia-api/oauth/token                 password / refresh_token grants
    POST /nbia-api/services/oauth/token        the same (nbiatoolkit's location)
    GET  /_harvester/stats                     request statistics as JSON (not part of NBIA)

Behaviour that clients rely on, as the real service does it (``shared/nbia-api.md``, "The
wire, byte for byte"): JSON lists with null keys omitted and ``/`` escaped as ``\\/``;
no match is HTTP 200 with an empty body (not ``[]``); ``format=csv``; on v4 an unknown (or
wrongly cased) parameter is HTTP 400 "Invalid query parameter: X" (v1/v2 ignore unknown
parameters); Collection, PatientID, Modality, BodyPartExamined, Manufacturer and
ManufacturerModelName match case-insensitively (SQL ``UPPER``).

Per API version, decided by the URL's version segment: on v4, dates in the JSON are
``MM-DD-YYYY`` (``"05-27-2015"``) and ``fromDate`` is ``MM-DD-YYYY``; on v1/v2, dates are the
v2-era ``"2003-12-12 00:00:00.0"`` and ``fromDate`` is ``DD/MM/YYYY``. SeriesNumber, FileSize,
TotalSizeInBytes, ImageCount, ObjectCount and SeriesCount are JSON numbers, or strings with
``numbers_as_strings`` (as some deployments and proxies send them).

Download errors are HTTP 400 with a text body; access denied (an unknown or unauthorised
series) is that text typed ``application/json``, as NBIA sends it; getSingleImage of an
unknown instance is HTTP 500. ZIPs are streamed chunked, without Content-Length, in constant
memory, DEFLATED with data descriptors as Java's ZipOutputStream writes them (or STORED:
see ``DownloadWire``).

The server is read-only and only sends files the ``Archive`` vouched for; there is no static
route and no directory listing.
"""
from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import logging
import random
import zlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles
from aiohttp import web

from harvester.containment import open_indexed
from harvester.server.archive import (
    PATIENT_FIELDS,
    SERIES_FIELDS,
    SERIES_FILTERS,
    STUDY_FIELDS,
    Archive,
    InstanceRecord,
    SeriesRecord,
    wire_json,
    wire_row,
)
from harvester.server.auth import ServerAuth, TokenGrantError, TokenIssuer
from harvester.server.deflatecache import DeflateCache
from harvester.server.faults import (
    NO_FAULTS,
    FaultDecision,
    FaultInjector,
    FaultSpec,
    TokenBucket,
)
from harvester.server.stats import Stats
from harvester.server.zipstream import (
    DEFAULT_ZIP_FORMAT,
    ZIP_FORMATS,
    ZipEntry,
    ZipSourceError,
    bytes_entry,
    file_entry,
    zip_stream,
)

log = logging.getLogger(__name__)

API_PREFIX = "/nbia-api/services"
VERSIONS = ("v1", "v2", "v4")
STATS_PATH = "/_harvester/stats"
TOKEN_PATHS = ("/nbia-api/oauth/token", "/nbia-api/services/oauth/token")
#: fromDate formats: v4 uses MM-DD-YYYY; the v1/v2 getUpdatedSeries parsed DD/MM/YYYY.
DATE_FORMATS = {"v1": "%d/%m/%Y", "v2": "%d/%m/%Y", "v4": "%m-%d-%Y"}
#: How each version writes dates in its JSON (see :func:`harvester.server.archive.wire_row`).
DATE_STYLES = {"v1": "v2", "v2": "v2", "v4": "v4"}
PACED_CHUNK = 64 * 1024
FILE_CHUNK = 256 * 1024

STATS_KEY = web.AppKey("harvester_stats", Stats)
ARCHIVE_KEY = web.AppKey("harvester_archive", Archive)
FAULTS_KEY = web.AppKey("harvester_faults", FaultInjector)
TOKENS_KEY = web.AppKey("harvester_tokens", TokenIssuer)
NUMBERS_AS_STRINGS_KEY = web.AppKey("harvester_numbers_as_strings", bool)


@dataclass(frozen=True)
class DownloadWire:
    """How the download endpoints speak. ``zip_format``: one of ``ZIP_FORMATS`` (``deflated``
    as the real service writes, or the older ``stored``). ``include_md5=False`` answers
    ``IncludeMD5`` with HTTP 400, as v4 builds of May to Nov 2025 do. ``deflate_cache``
    sends each DEFLATED file entry's stream computed once (:mod:`harvester.server.deflatecache`)
    instead of compressing it per download: not a byte on the wire changes; ``None`` compresses
    every time."""

    zip_format: str = DEFAULT_ZIP_FORMAT
    include_md5: bool = True
    deflate_cache: DeflateCache | None = field(default=None, compare=False)

    def file_entry(self, name: str, path: Path, size: int, crc32: int) -> ZipEntry:
        """A file's ZIP entry, from the deflate cache when there is one (and it is used)."""
        cache = self.deflate_cache if self.zip_format == "deflated" else None
        if cache is None:
            return file_entry(name, path, size, crc32)
        return file_entry(name, path, size, crc32, deflated=lambda: cache.lookup(path, size, crc32))

    def __post_init__(self) -> None:
        if self.zip_format not in ZIP_FORMATS:
            raise ValueError(f"unknown ZIP format {self.zip_format!r} (one of {', '.join(ZIP_FORMATS)})")


WIRE_KEY = web.AppKey("harvester_wire", DownloadWire)
#: The answer of a v4 build of May to Nov 2025 to getImage with IncludeMD5 (NBIA-TCIA V4_getImage).
INCLUDE_MD5_REFUSED = ("Invalid query parameter: 'IncludeMD5'. "
                       "Allowed parameters are: [NewFileNames, SeriesInstanceUID]")


class BadRequest(Exception):
    """Answered with HTTP 400 and the message as text/plain (NBIA's way of saying no)."""


class AccessDenied(BadRequest):
    """Answered with HTTP 400 and the message as text, but typed ``application/json``, as NBIA
    answers a series that does not exist or that the user may not see."""


class InternalError(Exception):
    """Answered with HTTP 500 and the message as text/plain (NBIA's answer to an unknown instance)."""


@dataclass(frozen=True)
class QueryResult:
    """Rows of a query endpoint. ``series`` is set instead of ``rows`` for getSeries-shaped
    answers so their JSON can come from the archive's cache."""

    columns: Sequence[str]
    rows: list[dict[str, Any]] | None = None
    series: list[SeriesRecord] | None = None


Params = Mapping[str, str]
QueryFn = Callable[[Archive, Params, str], QueryResult]


@dataclass(frozen=True)
class Endpoint:
    """One NBIA endpoint: its parameters (case-sensitive), the required ones, and its kind."""

    params: frozenset[str]
    required: frozenset[str] = frozenset()
    query: QueryFn | None = None       # query endpoints: rows rendered as JSON or CSV
    download: bool = False             # ZIP endpoints (subject to truncate/corrupt/stall/rate)


# --------------------------------------------------------------------------------------------
# Query endpoints
# --------------------------------------------------------------------------------------------

def parse_from_date(value: str, version: str) -> dt.date:
    """``fromDate`` in this API version's format. Raises :class:`BadRequest`."""
    fmt = DATE_FORMATS[version]
    try:
        return dt.datetime.strptime(value, fmt).date()
    except ValueError:
        shown = fmt.replace("%m", "MM").replace("%d", "DD").replace("%Y", "YYYY")
        raise BadRequest(f"Invalid fromDate: {value} (expected {shown})") from None


def _filters(params: Params, names: Sequence[str]) -> dict[str, str]:
    return {name: params[name] for name in names if params.get(name)}


def _values(field: str, filter_names: Sequence[str]) -> QueryFn:
    def query(archive: Archive, params: Params, version: str) -> QueryResult:
        values = archive.distinct_of(field, _filters(params, filter_names))
        return QueryResult([field], rows=[{field: v} for v in values])
    return query


def _get_patient(archive: Archive, params: Params, version: str) -> QueryResult:
    records = archive.select(_filters(params, ["Collection"]))
    return QueryResult(PATIENT_FIELDS, rows=Archive.patients_of(records))


def _get_patient_by_modality(archive: Archive, params: Params, version: str) -> QueryResult:
    records = archive.select(_filters(params, ["Collection", "Modality"]))
    rows = [{"PatientId": p["PatientId"]} for p in Archive.patients_of(records) if "PatientId" in p]
    return QueryResult(["PatientId"], rows=rows)


def _new_patients(archive: Archive, params: Params, version: str) -> QueryResult:
    day = parse_from_date(params["fromDate"], version)
    records = archive.released_after(day, archive.select(_filters(params, ["Collection"])))
    return QueryResult(PATIENT_FIELDS, rows=Archive.patients_of(records))


def _get_patient_study(archive: Archive, params: Params, version: str) -> QueryResult:
    records = archive.select(_filters(params, ["Collection", "PatientID", "StudyInstanceUID"]))
    return QueryResult(STUDY_FIELDS, rows=archive.studies_of(records))


def _new_studies(archive: Archive, params: Params, version: str) -> QueryResult:
    day = parse_from_date(params["fromDate"], version)
    records = archive.released_after(day, archive.select(_filters(params, ["Collection", "PatientID"])))
    return QueryResult(STUDY_FIELDS, rows=archive.studies_of(records))


def _get_series(archive: Archive, params: Params, version: str) -> QueryResult:
    return QueryResult(SERIES_FIELDS, series=archive.select(_filters(params, list(SERIES_FILTERS))))


def _updated_series(archive: Archive, params: Params, version: str) -> QueryResult:
    return QueryResult(SERIES_FIELDS, series=archive.released_after(parse_from_date(params["fromDate"], version)))


def _series_size(archive: Archive, params: Params, version: str) -> QueryResult:
    rec = archive.get(params["SeriesInstanceUID"])
    rows = [] if rec is None else [{"TotalSizeInBytes": rec.total_bytes, "ObjectCount": len(rec.instances)}]
    return QueryResult(["TotalSizeInBytes", "ObjectCount"], rows=rows)


def _sop_uids(archive: Archive, params: Params, version: str) -> QueryResult:
    rec = archive.get(params["SeriesInstanceUID"])
    rows = [] if rec is None else [{"SOPInstanceUID": inst.sop_uid} for inst in rec.instances]
    return QueryResult(["SOPInstanceUID"], rows=rows)


_F = frozenset
ENDPOINTS: dict[str, Endpoint] = {
    "getCollectionValues": Endpoint(_F(), query=_values("Collection", [])),
    "getModalityValues": Endpoint(_F({"Collection", "BodyPartExamined"}),
                                  query=_values("Modality", ["Collection", "BodyPartExamined"])),
    "getBodyPartValues": Endpoint(_F({"Collection", "Modality"}),
                                  query=_values("BodyPartExamined", ["Collection", "Modality"])),
    "getManufacturerValues": Endpoint(_F({"Collection", "Modality", "BodyPartExamined"}),
                                      query=_values("Manufacturer", ["Collection", "Modality", "BodyPartExamined"])),
    "getPatient": Endpoint(_F({"Collection"}), query=_get_patient),
    "getPatientByCollectionAndModality": Endpoint(_F({"Collection", "Modality"}), query=_get_patient_by_modality),
    "NewPatientsInCollection": Endpoint(_F({"Collection", "fromDate"}), _F({"fromDate"}), query=_new_patients),
    "getPatientStudy": Endpoint(_F({"Collection", "PatientID", "StudyInstanceUID"}), query=_get_patient_study),
    "NewStudiesInPatientCollection": Endpoint(_F({"Collection", "PatientID", "fromDate"}), _F({"fromDate"}),
                                              query=_new_studies),
    "getSeries": Endpoint(_F(SERIES_FILTERS), query=_get_series),
    "getUpdatedSeries": Endpoint(_F({"fromDate"}), _F({"fromDate"}), query=_updated_series),
    "getSeriesSize": Endpoint(_F({"SeriesInstanceUID"}), _F({"SeriesInstanceUID"}), query=_series_size),
    "getSOPInstanceUIDs": Endpoint(_F({"SeriesInstanceUID"}), _F({"SeriesInstanceUID"}), query=_sop_uids),
    # allows SOPInstanceUID only, and reads SOPInstanceUid (``md5_for_image``)
    "getMD5HashForImage": Endpoint(_F({"SOPInstanceUID"})),
    "getImage": Endpoint(_F({"SeriesInstanceUID", "NewFileNames", "IncludeMD5"}), _F({"SeriesInstanceUID"}),
                         download=True),
    "getImageWithMD5Hash": Endpoint(_F({"SeriesInstanceUID", "NewFileNames"}), _F({"SeriesInstanceUID"}),
                                    download=True),
    "getSingleImage": Endpoint(_F({"SeriesInstanceUID", "SOPInstanceUID"}),
                               _F({"SeriesInstanceUID", "SOPInstanceUID"}), download=True),
}


def render_rows(archive: Archive, result: QueryResult, fmt: str, version: str = "v4", *,
                numbers_as_strings: bool = False) -> web.Response:
    """JSON (default) or CSV for a query result, in ``version``'s wire form (see the module doc).

    No row is HTTP 200 with an empty JSON body, as NBIA answers; CSV still has its header line.
    """
    style = DATE_STYLES[version]
    if fmt == "json":
        if result.series is not None:
            parts = [archive.row_json(rec, style=style, numbers_as_strings=numbers_as_strings)
                     for rec in result.series]
        else:
            parts = [wire_json(wire_row(row, style=style, numbers_as_strings=numbers_as_strings))
                     for row in result.rows or []]
        text = "[" + ",".join(parts) + "]" if parts else ""
        return web.Response(body=text.encode("utf-8"), content_type="application/json")
    raw = [rec.row for rec in result.series] if result.series is not None else (result.rows or [])
    rows = [wire_row(row, style=style) for row in raw]
    present = {key for row in rows for key in row}
    columns = [c for c in result.columns if c in present] + sorted(present - set(result.columns))
    if not rows:
        columns = list(result.columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return web.Response(text=buf.getvalue(), content_type="text/csv")


# --------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------

class _InjectedReset(Exception):
    """The reset fault fired: abort the connection now."""


class _FaultyWriter:
    """Writes a response body, applying bandwidth caps and the reset/stall faults.

    ``reset_at``/``stall_at`` are body offsets; a write crossing one is split there, so the
    fault happens at exactly that many bytes. Every byte written is counted in ``Stats``.
    """

    def __init__(self, resp: web.StreamResponse, stats: Stats, buckets: list[TokenBucket],
                 reset_at: int | None, stall_at: int | None, stall_for: float) -> None:
        self.resp, self.stats, self.buckets = resp, stats, buckets
        self.reset_at, self.stall_at, self.stall_for = reset_at, stall_at, stall_for
        self.sent = 0

    async def _before_piece(self) -> None:
        if self.reset_at is not None and self.sent >= self.reset_at:
            self.stats.count_fault("reset")
            raise _InjectedReset
        if self.stall_at is not None and self.sent >= self.stall_at:
            self.stall_at = None
            self.stats.count_fault("stall")
            await asyncio.sleep(self.stall_for)

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            limit = len(view)
            if self.buckets:
                limit = min(limit, PACED_CHUNK)
            for trigger in (self.reset_at, self.stall_at):
                if trigger is not None and trigger > self.sent:
                    limit = min(limit, trigger - self.sent)
            piece, view = view[:limit], view[limit:]
            await self._before_piece()
            for bucket in self.buckets:
                await bucket.take(len(piece))
            await self.resp.write(piece)
            self.sent += len(piece)
            self.stats.add_bytes(len(piece))

    async def finish(self) -> None:
        await self._before_piece()  # a reset planned at the very end still fires
        await self.resp.write_eof()


def entry_names(count: int, new_file_names: bool) -> list[str]:
    """ZIP names of a series' DICOM files: ``00000001.dcm``... or TCIA-style
    ``<acquisition>-<instance>.dcm`` zero-padded to the digits of ``count`` (``1-1.dcm`` of 3,
    ``1-01.dcm`` of 50, ``1-001.dcm`` of 400)."""
    if new_file_names:
        width = len(str(count))
        return [f"1-{i:0{width}d}.dcm" for i in range(1, count + 1)]
    return [f"{i:08d}.dcm" for i in range(1, count + 1)]


def _flipped_crc(path: Path, size: int) -> int:
    """CRC-32 of the file with its last byte inverted (blocking: run in a thread)."""
    crc, position = 0, 0
    with open(path, "rb", opener=open_indexed) as fh:
        while chunk := fh.read(1 << 20):
            end = position + len(chunk)
            if position <= size - 1 < end:
                buf = bytearray(chunk)
                buf[size - 1 - position] ^= 0xFF
                chunk = bytes(buf)
            crc = zlib.crc32(chunk, crc)
            position = end
    return crc


def md5_csv(rec: SeriesRecord, names: Sequence[str]) -> bytes:
    """md5hashes.csv as the real service writes it: LF line ends, no quoting, rows in no
    particular order (shuffled, deterministically per series); an instance without a recorded
    MD5 gets an empty one."""
    rows = [f"{name},{inst.md5}" for name, inst in zip(names, rec.instances, strict=True)]
    random.Random(rec.uid).shuffle(rows)
    return ("\n".join(["Filename,MD5Hash", *rows]) + "\n").encode("utf-8")


async def _series_entries(archive: Archive, rec: SeriesRecord, decision: FaultDecision, stats: Stats,
                          *, with_license: bool, new_file_names: bool, include_md5: bool,
                          wire: DownloadWire) -> AsyncIterator[ZipEntry]:
    """LICENSE (getImage only), the DICOM files, then md5hashes.csv for all of them.

    ``truncate`` stops after a proper subset of the files, as an error mid-stream does on the
    real service: the ZIP still ends well-formed, but without md5hashes.csv.
    """
    instances = rec.instances
    names = entry_names(len(instances), new_file_names)
    if with_license:
        yield bytes_entry("LICENSE", rec.license_text.encode("utf-8"))
    keep = len(instances)
    if decision.truncate:
        keep = min(len(instances) - 1, int(decision.pick * len(instances)))  # a proper subset
        stats.count_fault("truncate")
    corrupt_at = min(len(instances) - 1, int(decision.pick * len(instances))) if decision.corrupt else -1
    for index, (name, inst) in enumerate(zip(names[:keep], instances[:keep], strict=True)):
        if index == corrupt_at:
            stats.count_fault("corrupt")
            crc = await asyncio.to_thread(_flipped_crc, inst.path, inst.size)
            yield file_entry(name, inst.path, inst.size, crc, flip_last_byte=True)
        else:
            crc = inst.crc32 if inst.crc32 is not None else await asyncio.to_thread(archive.crc32_of, inst)
            yield wire.file_entry(name, inst.path, inst.size, crc)
    if include_md5 and not decision.truncate:
        yield bytes_entry("md5hashes.csv", md5_csv(rec, names))


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    """The file indexed at ``path``, opened now without following links (``open_indexed``):
    one swapped for a link since loading raises ``OSError``, and the download is cut short."""
    async with aiofiles.open(path, "rb", opener=open_indexed) as fh:
        while chunk := await fh.read(FILE_CHUNK):
            yield chunk


def _yes(value: str | None) -> bool:
    return (value or "").strip().lower() in ("yes", "true", "y", "1")


async def _stream_body(request: web.Request, resp: web.StreamResponse, decision: FaultDecision,
                       body: AsyncIterator[bytes], planned_size: int) -> web.StreamResponse:
    """Send ``body`` with the download faults of ``decision``; abort the connection on a reset
    fault or when the source turns out to differ from what was announced."""
    faults = request.app[FAULTS_KEY]
    stats = request.app[STATS_KEY]
    spec = faults.spec
    buckets = [b for b in (faults.connection_bucket(), faults.total_bucket) if b is not None]
    offset = max(1, int(decision.where * planned_size))
    writer = _FaultyWriter(resp, stats, buckets, offset if decision.reset else None,
                           offset if decision.stall else None, spec.stall_for)
    try:
        await resp.prepare(request)
        async for chunk in body:
            await writer.write(chunk)
        await writer.finish()
    except _InjectedReset:
        _abort(request)
    except ZipSourceError as err:
        log.error("aborting download %s: %s", request.path_qs, err)
        _abort(request)
    except ConnectionError:
        pass  # the client went away; nothing left to tell it
    except OSError as err:
        log.error("aborting download %s: %s", request.path_qs, err)
        _abort(request)
    return resp


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _download(request: web.Request, endpoint: str, params: Params, decision: FaultDecision) -> web.StreamResponse:
    stats = request.app[STATS_KEY]
    stats.body_started()  # the in-flight high-water mark (``Stats.bodies_peak``)
    try:
        return await _send_download(request, endpoint, params, decision)
    finally:
        stats.body_ended()


async def _send_download(request: web.Request, endpoint: str, params: Params,
                         decision: FaultDecision) -> web.StreamResponse:
    archive = request.app[ARCHIVE_KEY]
    stats = request.app[STATS_KEY]
    uid = params["SeriesInstanceUID"]
    if endpoint == "getImage" and "IncludeMD5" in params and not request.app[WIRE_KEY].include_md5:
        raise BadRequest(INCLUDE_MD5_REFUSED)
    if archive.download_refusal:
        raise BadRequest(archive.download_refusal)
    rec = archive.get(uid)
    if rec is None:
        raise AccessDenied(f"SeriesInstanceUID {uid} was not found or you are not authorized to access it")
    if endpoint == "getSingleImage":
        found = archive.instance_in(rec, params["SOPInstanceUID"])
        if found is None:
            raise InternalError(f"SOPInstanceUID {params['SOPInstanceUID']} was not found in series {uid}")
        inst: InstanceRecord = found
        stats.count_instance(inst.sop_uid)
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/dicom"})
        resp.content_length = inst.size
        return await _stream_body(request, resp, decision, _file_chunks(inst.path), inst.size)
    stats.count_download(uid)
    stats.download_began()
    try:
        return await _send_series(request, rec, endpoint, params, decision)
    finally:
        stats.download_ended()


async def _send_series(request: web.Request, rec: SeriesRecord, endpoint: str, params: Params,
                       decision: FaultDecision) -> web.StreamResponse:
    """The getImage/getImageWithMD5Hash answer of ``rec``: its ZIP, streamed."""
    archive = request.app[ARCHIVE_KEY]
    stats = request.app[STATS_KEY]
    uid = rec.uid
    resp = web.StreamResponse(status=200, headers={
        "Content-Type": "application/octet-stream",
        "Content-Disposition": f'attachment; filename="{uid}.zip"',
    })
    resp.enable_chunked_encoding()  # invariant: a ZIP never carries Content-Length
    if rec.prebuilt_zip is not None:  # hostile series: sent verbatim, no ZIP-level faults
        size = rec.prebuilt_zip.stat().st_size
        decision = FaultDecision(reset=decision.reset, stall=decision.stall, where=decision.where)
        return await _stream_body(request, resp, decision, _file_chunks(rec.prebuilt_zip), size)
    # getImageWithMD5Hash: no LICENSE, always 00000001.dcm names, md5hashes.csv last
    with_md5_hash = endpoint == "getImageWithMD5Hash"
    entries = _series_entries(archive, rec, decision, stats, with_license=not with_md5_hash,
                              new_file_names=not with_md5_hash and _yes(params.get("NewFileNames")),
                              include_md5=with_md5_hash or _yes(params.get("IncludeMD5")),
                              wire=request.app[WIRE_KEY])
    body = zip_stream(entries, zip_format=request.app[WIRE_KEY].zip_format)
    return await _stream_body(request, resp, decision, body, rec.total_bytes)


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------

def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", content_type="text/plain")


def _validate(version: str, spec: Endpoint, query: Mapping[str, str]) -> dict[str, str]:
    """The request's parameters (first value of each), checked per version.

    Raises :class:`BadRequest` for an unknown parameter (v4 only; names are case-sensitive),
    a missing required one, or an unsupported ``format``.
    """
    allowed = spec.params | ({"format"} if spec.query is not None else set())
    params: dict[str, str] = {}
    for key in query:
        if key not in allowed:
            if version == "v4":
                raise BadRequest(f"Invalid query parameter: {key}")
            continue
        params.setdefault(key, query[key])
    missing = sorted(name for name in spec.required if not params.get(name))
    if missing:
        raise BadRequest(f"Missing required query parameter: {missing[0]}")
    fmt = params.get("format", "json") or "json"
    if fmt.lower() not in ("json", "csv"):
        raise BadRequest(f"Invalid format: {fmt} (json or csv)")
    params["format"] = fmt.lower()
    return params


def md5_for_image(archive: Archive, sop_uid: str | None) -> web.Response:
    """getMD5HashForImage as NBIA-TCIA's handlers answer it: the MD5 of instance ``sop_uid`` (the
    parameter ``SOPInstanceUid``, which is what ``V4_getMD5HashForImage`` reads while it allows
    only ``SOPInstanceUID``: on v4 it is never there), as text; an empty body for no instance or
    an unknown one (the handler answers what its DAO found, "" when nothing)."""
    found = archive.find_instance(sop_uid) if sop_uid else None
    return web.Response(text=found[1].md5 if found is not None else "", content_type="text/plain")


def _error_page(status: int) -> web.Response:
    reason = {500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Error")
    html = (f"<!doctype html><html><head><title>HTTP Status {status} - {reason}</title></head>"
            f"<body><h1>HTTP Status {status} - {reason}</h1><hr><p>The server is temporarily "
            f"unable to service your request.</p></body></html>")
    return web.Response(status=status, text=html, content_type="text/html")


async def api_handler(request: web.Request) -> web.StreamResponse:
    """Every ``/nbia-api/services/{v}/{endpoint}`` request: faults, auth, parameters, answer."""
    version, name = request.match_info["version"], request.match_info["endpoint"]
    spec = ENDPOINTS.get(name)
    if spec is None:
        return _text(404, f"Unknown endpoint: {name}")
    stats, faults = request.app[STATS_KEY], request.app[FAULTS_KEY]
    stats.count_request(name)
    decision = faults.decide(name, request.query.items(), download=spec.download) if faults.spec.active else NO_FAULTS
    if faults.spec.latency:
        await asyncio.sleep(faults.spec.latency)
    if decision.error_status is not None:
        stats.count_fault("error")
        return _error_page(decision.error_status)
    if decision.throttle:
        stats.count_fault("throttle")
        resp = _text(429, "Too Many Requests")
        resp.headers["Retry-After"] = str(faults.spec.retry_after)
        return resp
    if decision.reset and not spec.download:
        stats.count_fault("reset")
        _abort(request)  # before answering
        return web.Response(status=500)
    tokens = request.app[TOKENS_KEY]
    if tokens.required and not tokens.check(request.headers.get("Authorization")):
        resp = _text(401, "Unauthorized: a valid bearer token is required")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="nbia", error="invalid_token"'
        return resp
    archive = request.app[ARCHIVE_KEY]
    try:
        params = _validate(version, spec, request.query)
        if spec.download:
            return await _download(request, name, params, decision)
        if name == "getMD5HashForImage":
            return md5_for_image(archive, request.query.get("SOPInstanceUid"))
        assert spec.query is not None
        return render_rows(archive, spec.query(archive, params, version), params["format"], version,
                           numbers_as_strings=request.app[NUMBERS_AS_STRINGS_KEY])
    except AccessDenied as err:
        return web.Response(status=400, text=str(err) + "\n", content_type="application/json")
    except BadRequest as err:
        return _text(400, str(err))
    except InternalError as err:
        return _text(500, str(err))


async def dcm_image_handler(request: web.Request) -> web.StreamResponse:
    """v1 ``getDCMImage`` as NBIA's ``V1_getDCMImage.java`` answers it: a ZIP of the series'
    DICOM files (TCIA-style names, no LICENSE), ``md5hashes.csv`` with ``MD5Verification=true``,
    then its annotation files with ``IncludeAnnotation=true``. Unknown parameters are ignored
    (v1); auth and statistics as for every endpoint; no download faults."""
    stats, archive = request.app[STATS_KEY], request.app[ARCHIVE_KEY]
    stats.count_request("getDCMImage")
    tokens = request.app[TOKENS_KEY]
    if tokens.required and not tokens.check(request.headers.get("Authorization")):
        return _text(401, "Unauthorized: a valid bearer token is required")
    uid = request.query.get("SeriesInstanceUID")
    if not uid:
        return _text(400, "A parameter, SeriesInstanceUID, is required for this API call.")
    if archive.download_refusal:
        return _text(400, archive.download_refusal)
    rec = archive.get(uid)
    if rec is None or rec.prebuilt_zip is not None:
        return _text(400, f"Image with given SeriesInstanceUID,{uid}, is not in public domain.")
    md5 = (request.query.get("MD5Verification") or "").lower() == "true"
    annotations = rec.annotations if (request.query.get("IncludeAnnotation") or "").lower() == "true" else ()
    wire = request.app[WIRE_KEY]

    async def entries() -> AsyncIterator[ZipEntry]:
        names = entry_names(len(rec.instances), True)
        for name, inst in zip(names, rec.instances, strict=True):
            crc = inst.crc32 if inst.crc32 is not None else await asyncio.to_thread(archive.crc32_of, inst)
            yield wire.file_entry(name, inst.path, inst.size, crc)
        if md5:
            lines = ["Filename,MD5Hash"] + [f"{n},{i.md5}" for n, i in zip(names, rec.instances, strict=True)]
            yield bytes_entry("md5hashes.csv", ("\n".join(lines) + "\n").encode("utf-8"))
        for ann in annotations:
            yield wire.file_entry(ann.name, ann.path, ann.size, ann.crc32)

    resp = web.StreamResponse(status=200, headers={
        "Content-Type": "application/octet-stream",
        "Content-Disposition": f'attachment; filename="{uid}.zip"',
    })
    resp.enable_chunked_encoding()
    planned = rec.total_bytes + sum(a.size for a in annotations)
    return await _stream_body(request, resp, NO_FAULTS, zip_stream(entries()), planned)


async def token_handler(request: web.Request) -> web.Response:
    """OAuth2 token endpoint (form POST). 400/401 with a JSON error body when refused."""
    request.app[STATS_KEY].count_request("oauth/token")
    form = await request.post()
    values = {k: str(v) for k, v in form.items() if isinstance(v, str)}
    try:
        body = request.app[TOKENS_KEY].grant(values)
    except TokenGrantError as err:
        return web.json_response({"error": err.error, "error_description": str(err)}, status=err.status)
    return web.json_response(body)


async def stats_handler(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS_KEY].snapshot())


def make_app(archive: Archive, faults: FaultSpec | FaultInjector | None = None,
             auth: ServerAuth | None = None, *, numbers_as_strings: bool = False,
             wire: DownloadWire | None = None) -> web.Application:
    """The aiohttp application serving ``archive``.

    ``faults`` may be a spec or an injector (to share one and switch it at runtime through
    ``app[FAULTS_KEY].replace(...)``); ``auth`` makes tokens mandatory; ``numbers_as_strings``
    sends the number fields of the query JSON as strings, as some deployments and proxies do;
    ``wire`` chooses the ZIP format and whether IncludeMD5 is accepted (default: as the real
    service of 2026).
    Statistics are at ``app[STATS_KEY]``.
    """
    app = web.Application()
    app[WIRE_KEY] = wire or DownloadWire()
    app[ARCHIVE_KEY] = archive
    app[NUMBERS_AS_STRINGS_KEY] = numbers_as_strings
    app[STATS_KEY] = Stats()
    app[FAULTS_KEY] = faults if isinstance(faults, FaultInjector) else FaultInjector(faults)
    app[TOKENS_KEY] = TokenIssuer(auth)
    versions = "|".join(VERSIONS)
    # before the generic route, which would answer it as an unknown endpoint
    app.router.add_get(f"{API_PREFIX}/v1/getDCMImage", dcm_image_handler, allow_head=False)
    app.router.add_get(f"{API_PREFIX}/{{version:({versions})}}/{{endpoint}}", api_handler, allow_head=False)
    for path in TOKEN_PATHS:
        app.router.add_post(path, token_handler)
    app.router.add_get(STATS_PATH, stats_handler, allow_head=False)
    return app
