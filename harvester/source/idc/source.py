"""Imaging Data Commons' public buckets as a ``Source``: plan from the IDC index, fetch each
series' instances with anonymous S3 GETs.

Plan: ``harvester.source.idc.index.select`` (in a worker thread) finds the rows each selector
matches, by the rules every source shares (``Selector.matches``, ``Exclusion.excludes``); the
union is de-duplicated, excluded, ordered and limited as the NBIA planner does. A listed series
the index lacks (or whose row is unusable) goes to ``Plan.unavailable`` (``config.strict``:
``UnknownSelectionError``).

Fetch, per series (``fetch_series``):

1. ListObjectsV2 of ``s3://<aws_bucket>/<crdc_series_uuid>/`` (every page; bounded by
   ``Limits.max_entries``). Every key must be the prefix plus one plain file name, else
   ``UnsafeArchiveError`` (nothing is fetched). The listing must hold exactly ``instanceCount``
   objects and ``round(series_size_MB * 1e6)`` bytes: more is ``IntegrityError`` (not the
   announced series), fewer ``IncompleteSeriesError``; both before any GET.
2. Up to ``OBJECTS_IN_FLIGHT`` GETs at once, each with request-level retries, streamed into a
   new file in ``staging`` while its MD5 is computed, bounded by the size listed (a longer body
   is ``IntegrityError``, a shorter one is retried).
3. Each file: its MD5 against the ETag where the ETag is one (a multipart ETag, ``...-N``, is
   not: the file is then recorded with ``md5_source: computed``), its DICOM header read
   (``read_dicom_ids``) and its SeriesInstanceUID the task's, its SOPInstanceUID new in the
   series; it is then named ``<SOPInstanceUID>.dcm``. Any failure is ``IntegrityError``.

The source's figures (count, bytes, bucket, UUID, DOI) are kept in the series' row, so
harvest.json records where each series came from (``metadata.source: idc``).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from harvester.config import Config
from harvester.errors import (
    IncompleteSeriesError,
    IntegrityError,
    RetryableRequestError,
    UnsafeArchiveError,
    classify_os_error,
)
from harvester.models import Plan, SeriesTask, UnavailableSeries
from harvester.selection import empty_selector_warnings, gather_limited, refuse_unavailable
from harvester.store.layout import name_key, safe_component
from harvester.query import Query
from harvester.source.base import ClientBackedSource, Sinks
from harvester.source.http import BodyGuard, as_int, redact_url
from harvester.source.idc import index as idc_index
from harvester.source.idc.s3 import S3Client, S3Object
from harvester.models import UnpackedSeries, VerifiedFile
from harvester.unpack import read_dicom_ids

#: Objects of one series fetched at once (each is its own S3 object: no per-connection cap).
OBJECTS_IN_FLIGHT = 8
#: The head of a file kept for the DICOM header walk (``read_dicom_ids``).
HEAD_BYTES = 256 * 1024
NO_SERIES = "the IDC index has no such series"
UNKNOWN_UID_HINT = ("the series may not be in IDC (restricted, NLST, or newer than the index); check the UIDs, "
                    "or leave out --strict to harvest the rest")


class IDCSource(ClientBackedSource):
    """IDC's buckets as a ``Source`` (see the module docstring)."""

    def __init__(self, config: Config, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.client = S3Client(config, session)

    # ------------------------------------------------------------ plan
    async def plan(self, query: Query, *, details: bool = True) -> Plan:
        """The index's rows for ``query`` (``details`` changes nothing: the index has them all).
        Raises ``UsageError`` for an index that cannot be read, ``UnknownSelectionError`` for an
        unknown collection (and, with ``config.strict``, for listed series the index lacks)."""
        path = Path(self.config.idc_index) if self.config.idc_index else idc_index.default_index()
        found = await anyio.to_thread.run_sync(idc_index.select, path, query)
        rows = {r["SeriesInstanceUID"]: r for r in found.rows}
        unavailable: dict[str, UnavailableSeries] = {}
        for sel in query.selectors:
            for uid in sel.series:
                if uid not in rows and uid not in unavailable:
                    unavailable[uid] = UnavailableSeries(uid, sel.origin, found.unusable.get(uid, NO_SERIES))
        if self.config.strict:
            refuse_unavailable(list(unavailable.values()), archive="the IDC index", hint=UNKNOWN_UID_HINT)
        kept = [r for r in rows.values() if not query.exclude.excludes(r)]
        ordered = sorted(kept, key=lambda r: (r["Collection"], r["PatientID"], r["StudyInstanceUID"],
                                              r["SeriesInstanceUID"]))
        if query.limit is not None:
            ordered = ordered[: query.limit]
        return Plan(tasks=[self._task(r) for r in ordered], unavailable=list(unavailable.values()),
                    warnings=empty_selector_warnings(query.selectors, found.per_selector))

    @staticmethod
    def _task(row: dict[str, Any]) -> SeriesTask:
        study = {"StudyInstanceUID": row["StudyInstanceUID"], "StudyDate": row.get("StudyDate"),
                 "StudyDescription": row.get("StudyDesc", ""), "PatientID": row["PatientID"]}
        patient = {"PatientId": row["PatientID"], "PatientSex": row.get("PatientSex", ""),
                   "Collection": row["Collection"]}
        return SeriesTask(series_uid=row["SeriesInstanceUID"], collection=row["Collection"],
                          patient_id=row["PatientID"], study_uid=row["StudyInstanceUID"],
                          modality=row.get("Modality", ""), image_count=as_int(row.get("ImageCount")),
                          file_size=as_int(row.get("FileSize")), row=row, study=study, patient=patient)

    # ------------------------------------------------------------ fetch
    async def fetch_series(self, task: SeriesTask, *, partial: Path, staging: Path,
                           on_bytes: Callable[[int], None], rate: Any, sinks: Sinks | None = None) -> UnpackedSeries:
        """List the series' prefix, check the listing, GET every object into ``staging``
        (``partial`` and ``sinks`` are not used: several objects of a series arrive at once, and
        each is written and verified by this source's own per-object check until the store's
        instance writer takes parallel instances) and verify each file; see the module docstring for what is
        raised when."""
        bucket, prefix = str(task.row["aws_bucket"]), f"{task.row['crdc_series_uuid']}/"
        objects = await self.client.list_objects(bucket, prefix, max_keys=self.config.limits.max_entries)
        self._check_listing(task, prefix, objects)
        await anyio.to_thread.run_sync(_fresh_dir, staging)
        checker = _SeriesFiles(task)

        def fetch(n: int, obj: S3Object) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                path = staging / f"{n:08d}.part"
                async for attempt in self.client.retrying():
                    with attempt:
                        md5, head = await self._get_object(task, bucket, obj, path, on_bytes, rate)
                await anyio.to_thread.run_sync(checker.accept, path, obj, md5, head)
            return run

        # the first error cancels the other GETs of the series and propagates
        await gather_limited([fetch(n, obj) for n, obj in enumerate(objects)], OBJECTS_IN_FLIGHT)
        return UnpackedSeries(files=checker.files, license_text=None, repairs=[])

    def _check_listing(self, task: SeriesTask, prefix: str, objects: list[S3Object]) -> None:
        uid = task.series_uid
        limits = self.config.limits
        for obj in objects:
            name = obj.key.removeprefix(prefix)
            if (not obj.key.startswith(prefix) or not name or name in (".", "..") or "/" in name or "\\" in name
                    or any(ord(c) < 32 for c in name)):
                raise UnsafeArchiveError(f"the listing of s3 prefix {prefix} holds the key {obj.key[:120]!r}, "
                                         "which is not a file of that prefix", series_uid=uid)
            if obj.size > limits.max_entry_bytes:
                raise UnsafeArchiveError(f"the listing says {obj.key[:120]!r} is {obj.size} bytes "
                                         f"(limit {limits.max_entry_bytes} per file)", series_uid=uid)
        count, size = len(objects), sum(o.size for o in objects)
        if task.image_count is not None and count > task.image_count:
            raise IntegrityError(f"s3 prefix {prefix} holds {count} objects, more than the {task.image_count} "
                                 "the IDC index announced: not the announced series", series_uid=uid)
        if task.image_count is not None and count < task.image_count:
            raise IncompleteSeriesError(f"s3 prefix {prefix} holds {count} of {task.image_count} objects",
                                        series_uid=uid)
        if task.file_size is not None and size > task.file_size:
            raise IntegrityError(f"s3 prefix {prefix} holds {size} bytes, more than the {task.file_size} the IDC "
                                 "index announced: not the announced series", series_uid=uid)
        if task.file_size is not None and size < task.file_size:
            raise IncompleteSeriesError(f"s3 prefix {prefix} holds {size} of {task.file_size} bytes", series_uid=uid)
        if not objects:
            raise IncompleteSeriesError(f"s3 prefix {prefix} holds no object", series_uid=uid)

    async def _get_object(self, task: SeriesTask, bucket: str, obj: S3Object, path: Path,
                          on_bytes: Callable[[int], None], rate: Any) -> tuple[str, bytes]:
        """One attempt at one object: a new file at ``path`` (an earlier attempt's is replaced),
        its MD5 and its first ``HEAD_BYTES``. Raises ``IntegrityError`` for a body longer than
        listed, ``RetryableRequestError`` for a shorter one."""
        shown = redact_url(self.client.url(bucket, obj.key))

        def too_long(total: int) -> IntegrityError:
            return IntegrityError(f"{shown} sent more than the {obj.size} bytes listed", series_uid=task.series_uid)

        guard = BodyGuard(self.config, shown, max_bytes=obj.size, too_big=too_long)
        md5 = hashlib.md5()
        head = bytearray()
        # the body's pieces as they arrive, written in one worker-thread call per chunk_size
        # (a thread hop per piece cost more than the write): at most chunk_size + one piece held
        pending: list[bytes] = []
        held = 0
        fd = await anyio.to_thread.run_sync(_create, path)
        try:
            async with self.client.open_object(bucket, obj.key) as resp:
                async for chunk in resp.content.iter_chunked(self.config.chunk_size):
                    guard.feed(len(chunk))
                    ours = time.monotonic()
                    if rate is not None:
                        await rate.consume(len(chunk))
                    on_bytes(len(chunk))
                    if len(head) < HEAD_BYTES:
                        head += chunk[: HEAD_BYTES - len(head)]
                    pending.append(chunk)
                    held += len(chunk)
                    if held >= self.config.chunk_size:
                        await anyio.to_thread.run_sync(_write, fd, b"".join(pending), path, md5)  # hashed off the loop
                        pending.clear()
                        held = 0
                    guard.credit(time.monotonic() - ours)
            if pending:
                await anyio.to_thread.run_sync(_write, fd, b"".join(pending), path, md5)
        finally:  # (errors of the body are classified by the client: ``S3Client._get``)
            os.close(fd)
        if guard.total != obj.size:
            raise RetryableRequestError(f"{shown} sent {guard.total} of the {obj.size} bytes listed", url=shown)
        return md5.hexdigest(), bytes(head)


class _SeriesFiles:
    """The per-file checks of one series (``accept``), run in worker threads, several at once:
    the SOPInstanceUIDs, names and files seen are only touched under ``_lock``."""

    def __init__(self, task: SeriesTask) -> None:
        self.task = task
        self.files: list[VerifiedFile] = []
        self._sops: set[str] = set()
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def _error(self, message: str) -> IntegrityError:
        return IntegrityError(message, series_uid=self.task.series_uid)

    def accept(self, path: Path, obj: S3Object, md5: str, head: bytes) -> None:
        key = obj.key[-120:]
        expected = obj.md5
        if expected is not None and md5 != expected:
            raise self._error(f"{key} does not match its ETag (MD5 {md5}, expected {expected})")
        try:
            series, sop, sop_class = read_dicom_ids(path, head, whole=len(head) == obj.size)
        except IntegrityError as exc:
            raise self._error(f"{key}: {exc}") from None
        if series != self.task.series_uid:
            raise self._error(f"{key} belongs to series {series or '(none)'}, not this one")
        if not sop:
            raise self._error(f"{key} has no SOPInstanceUID")
        name = safe_component(sop, max_bytes=100) + ".dcm"
        with self._lock:
            if sop in self._sops:
                raise self._error(f"{key} repeats SOPInstanceUID {sop}")
            if name_key(name) in self._names:  # two UIDs sanitised alike: never overwrite a verified file
                raise self._error(f"{key}: SOPInstanceUID {sop!r} clashes with another's file name")
            self._sops.add(sop)
            self._names.add(name_key(name))
        try:
            os.replace(path, path.with_name(name))
        except OSError as exc:
            raise classify_os_error(exc, name) from None
        with self._lock:
            self.files.append(VerifiedFile(name=name, size=obj.size, md5=md5, sop_uid=sop, sop_class_uid=sop_class,
                                           md5_checked=expected is not None))


def _fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise classify_os_error(exc, f"staging folder {path.name}") from None


def _create(path: Path) -> int:
    """A new file at ``path`` (an earlier attempt's is removed first), never through a link."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        raise classify_os_error(exc, path.name) from None


def _write(fd: int, data: bytes, path: Path, md5: Any) -> None:
    md5.update(data)
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        raise classify_os_error(exc, path.name) from None

