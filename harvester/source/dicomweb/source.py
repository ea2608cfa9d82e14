"""A DICOMweb service as a ``Source``: QIDO-RS searches planned with the shared selection rules,
WADO-RS multipart bodies checked part by part as they arrive (see ``harvester.source.dicomweb.client``
for the mapping of a query onto QIDO-RS and for who raises what).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import anyio

from harvester.config import Config
from harvester.errors import (
    IncompleteSeriesError,
    IntegrityError,
    PermanentRequestError,
    RetryableRequestError,
    UnknownSelectionError,
    UsageError,
)
from harvester.models import Plan, SeriesTask, UnavailableSeries, UnpackedSeries, VerifiedFile
from harvester.query import Query, Selector, fold
from harvester.selection import empty_selector_warnings, gather_limited, matches, rows_by_uid, select_rows
from harvester.source.base import ClientBackedSource, InstanceWriter, Sinks, fresh_staging
from harvester.source.dicomweb.client import (
    NO_COLLECTION,
    NO_SERIES,
    SERIES_FIELDS,
    TAGS,
    UID_LIST_BATCH,
    UNKNOWN_UID_HINT,
    DICOMwebClient,
    MultipartError,
    MultipartParser,
    dicom_tag,
    iso_date,
    json_text,
)
from harvester.source.http import BodyGuard, as_int, redact_url

@dataclass
class _SearchResult:
    rows: list[dict[str, Any]]   # getSeries-like rows that passed the local checks
    raw: int                     # rows the server sent
    with_collection: int         # of which carried the collection attribute


class DICOMwebSource(ClientBackedSource):
    """A DICOMweb service as a ``Source`` (QIDO-RS plan, WADO-RS multipart fetch)."""

    kind = "dicomweb"

    def __init__(self, config: Config, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.client = DICOMwebClient(config, session)
        self.collection_tag = dicom_tag(config.collection_attribute)
        #: SeriesInstanceUID -> (study record, patient record), filled while searching
        self._details: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}

    # ------------------------------------------------------------ plan
    async def plan(self, query: Query, *, details: bool = True) -> Plan:
        """QIDO-RS searches for every selector (``config.plan_concurrency`` at a time), then the
        union de-duplicated by SeriesInstanceUID, exclusions, the limit and missing counts.
        Study and patient details come with the searches, so ``details`` changes nothing here."""
        start_requests, start_retries = self.requests, self.retries
        for sel in query.selectors:
            if sel.released_after is not None:
                raise UsageError(f"{sel.origin}: released_after has no DICOMweb equivalent",
                                 hint="a DICOMweb archive records no release date; remove the key")
        results = await gather_limited([self._selector_call(s) for s in query.selectors],
                                       self.config.plan_concurrency)
        selection = select_rows(query, results, strict=self.config.strict, archive="the DICOMweb service",
                                hint=UNKNOWN_UID_HINT)
        ordered = selection.rows
        await gather_limited([self._count_call(r) for r in ordered if r.get("ImageCount") is None],
                             self.config.plan_concurrency)
        return Plan(tasks=[self._task(r) for r in ordered], requests=self.requests - start_requests,
                    retries=self.retries - start_retries, unavailable=selection.unavailable,
                    warnings=empty_selector_warnings(query.selectors, selection.batches))

    def _selector_call(self, sel: Selector) -> Callable[[], Any]:
        async def run() -> tuple[list[dict[str, Any]], list[UnavailableSeries]]:
            if sel.series:
                return await self._series_by_uid(sel)
            return await self._series_by_filter(sel), []
        return run

    def _fields(self) -> list[tuple[str, str]]:
        return [("includefield", t) for t in (*SERIES_FIELDS, self.collection_tag)]

    async def _search_series(self, path: str, params: list[tuple[str, str]], collection: str | None
                             ) -> _SearchResult:
        raw = await self.client.search(path, params + self._fields(),
                                       key=lambda r: json_text(r, TAGS["SeriesInstanceUID"]) or repr(r))
        rows, with_collection = [], 0
        for item in raw:
            row = self._row(item)
            if row is None:
                continue
            self._details.setdefault(row["SeriesInstanceUID"], self._study_and_patient(item))
            if json_text(item, self.collection_tag) is not None:
                with_collection += 1
            if collection is None or fold(row["Collection"]) == fold(collection):
                rows.append(row)
        return _SearchResult(rows, len(raw), with_collection)

    async def _series_by_filter(self, sel: Selector) -> list[dict[str, Any]]:
        base = [(self.collection_tag, sel.collection)] if sel.collection else []
        for key, values in (("Modality", sel.modality), ("BodyPartExamined", sel.body_part)):
            if len(values) == 1:  # narrow on the server when one value is asked for (code strings:
                base.append((TAGS[key], fold(values[0])))  # upper case; Manufacturer may be any case)
        searches: list[tuple[str, list[tuple[str, str]]]]
        if sel.studies:
            searches = [(f"studies/{quote(s, safe='')}/series", list(base)) for s in sel.studies]
        elif sel.patients:
            searches = [("series", [*base, (TAGS["PatientID"], p)]) for p in sel.patients]
        else:
            searches = [("series", base)]
        results = await gather_limited(
            [self._search_call(path, params, sel.collection) for path, params in searches],
            self.config.plan_concurrency)
        rows = [r for res in results for r in res.rows if matches(r, sel)]
        if sel.collection and not any(res.rows for res in results):
            await self._check_collection(sel, results)
        return rows

    def _search_call(self, path: str, params: list[tuple[str, str]], collection: str | None
                     ) -> Callable[[], Any]:
        async def run() -> _SearchResult:
            return await self._search_series(path, params, collection)
        return run

    async def _check_collection(self, sel: Selector, results: list[_SearchResult]) -> None:
        """Nothing matched: tell an unknown collection (or an unusable attribute) from an empty filter."""
        attribute = self.config.collection_attribute
        if any(res.raw and not res.with_collection for res in results):
            raise UsageError(
                f"{sel.origin}: the DICOMweb service matched series but did not return {attribute}, "
                "so their collection cannot be checked",
                hint="the service may not support that attribute; choose another collection attribute")
        probe = await self._search_series("series", [(self.collection_tag, sel.collection or "")], sel.collection)
        if not probe.rows:
            raise UnknownSelectionError(
                f"{sel.origin}: the DICOMweb service has no series whose {attribute} is {sel.collection!r}",
                hint=f"the collection is matched against the DICOM attribute {attribute}; check the name")

    async def _series_by_uid(self, sel: Selector) -> tuple[list[dict[str, Any]], list[UnavailableSeries]]:
        """The rows of a list of series UIDs: ``UID_LIST_BATCH`` UIDs per query (UID list matching),
        then one query per UID that no list query answered. A service without list matching
        answers nothing or refuses (4xx) and costs one extra query per batch. Returns the rows and
        the UIDs that no query answered."""
        wanted = list(dict.fromkeys(sel.series))
        batches = [wanted[i:i + UID_LIST_BATCH] for i in range(0, len(wanted), UID_LIST_BATCH)] \
            if len(wanted) > 1 else []
        listed = await gather_limited([self._uid_list_call(b) for b in batches], self.config.plan_concurrency)
        found = {r["SeriesInstanceUID"]: r for rows in listed for r in rows}
        rest, missing = await rows_by_uid(
            [uid for uid in wanted if uid not in found], self._uid_call, self.config.plan_concurrency)
        return ([found[uid] for uid in wanted if uid in found] + rest,
                [UnavailableSeries(uid, sel.origin, NO_SERIES) for uid in missing])

    def _uid_list_call(self, uids: list[str]) -> Callable[[], Any]:
        async def run() -> list[dict[str, Any]]:
            try:
                res = await self._search_series("series", [(TAGS["SeriesInstanceUID"], ",".join(uids))], None)
            except PermanentRequestError:
                return []  # no UID list matching here: single lookups follow
            wanted = set(uids)
            return [r for r in res.rows if r["SeriesInstanceUID"] in wanted]
        return run

    def _uid_call(self, uid: str) -> Callable[[], Any]:
        async def run() -> list[dict[str, Any]]:
            res = await self._search_series("series", [(TAGS["SeriesInstanceUID"], uid)], None)
            return [r for r in res.rows if r["SeriesInstanceUID"] == uid]
        return run

    def _count_call(self, row: dict[str, Any]) -> Callable[[], Any]:
        async def run() -> None:
            path = (f"studies/{quote(row['StudyInstanceUID'], safe='')}"
                    f"/series/{quote(row['SeriesInstanceUID'], safe='')}/instances")
            instances = await self.client.search(path, [("includefield", TAGS["SOPInstanceUID"])],
                                                 key=lambda r: json_text(r, TAGS["SOPInstanceUID"]) or repr(r))
            row["ImageCount"] = len(instances) or None  # none listed: unknown, not zero
        return run

    def _row(self, item: dict[str, Any]) -> dict[str, Any] | None:
        """A getSeries-like row (the keys layouts and the manifest use) from a QIDO-RS series
        object; None without a SeriesInstanceUID and StudyInstanceUID (WADO-RS needs both)."""
        def text(key: str) -> str | None:
            return json_text(item, TAGS[key])

        series_uid, study_uid = text("SeriesInstanceUID"), text("StudyInstanceUID")
        if not series_uid or not study_uid:
            return None
        number = as_int(text("SeriesNumber"))
        row: dict[str, Any] = {
            "Collection": json_text(item, self.collection_tag) or NO_COLLECTION,
            "PatientID": text("PatientID") or "",
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": series_uid,
            "Modality": text("Modality") or "",
            "SeriesNumber": number if number is not None else text("SeriesNumber"),
            "SeriesDescription": text("SeriesDescription"),
            "SeriesDate": iso_date(text("SeriesDate")),
            "StudyDate": iso_date(text("StudyDate")),
            "StudyDesc": text("StudyDescription"),
            "BodyPartExamined": text("BodyPartExamined"),
            "Manufacturer": text("Manufacturer"),
            "ManufacturerModelName": text("ManufacturerModelName"),
            "ProtocolName": text("ProtocolName"),
            "ImageCount": as_int(text("NumberOfSeriesRelatedInstances")),
        }
        return {k: v for k, v in row.items() if v is not None or k == "ImageCount"}

    def _study_and_patient(self, item: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The study record (StudyDate, StudyID, StudyDescription: the descriptive layout's) and
        the patient record (NBIA's getPatient keys) from the same QIDO-RS object."""
        def text(key: str) -> str:
            return json_text(item, TAGS[key]) or ""

        study = {"StudyInstanceUID": text("StudyInstanceUID"), "StudyDate": iso_date(text("StudyDate")),
                 "StudyID": text("StudyID"), "StudyDescription": text("StudyDescription"),
                 "PatientID": text("PatientID"), "PatientName": text("PatientName")}
        patient = {"PatientId": text("PatientID"), "PatientName": text("PatientName"),
                   "PatientSex": text("PatientSex"),
                   "Collection": json_text(item, self.collection_tag) or NO_COLLECTION}
        return study, patient

    def _task(self, row: dict[str, Any]) -> SeriesTask:
        study, patient = self._details.get(row["SeriesInstanceUID"], (None, None))
        return SeriesTask(
            series_uid=row["SeriesInstanceUID"],
            collection=row["Collection"],
            patient_id=row.get("PatientID", ""),
            study_uid=row["StudyInstanceUID"],
            modality=row.get("Modality", ""),
            image_count=as_int(row.get("ImageCount")),
            file_size=None,  # DICOMweb announces no sizes: the instance count is verified instead
            row=row,
            study=study,
            patient=patient,
        )

    # ------------------------------------------------------------ fetch
    async def fetch_series(self, task: SeriesTask, *, partial: Path, staging: Path,
                           on_bytes: Callable[[int], None], rate: Any, sinks: Sinks) -> UnpackedSeries:
        """Stream the series' WADO-RS multipart body into an instance writer of ``sinks`` in
        ``staging`` (``partial`` is not used), with request-level retries; each attempt starts
        from an empty ``staging``."""
        async for attempt in self.client.retrying():
            with attempt:
                files = await self._fetch_once(task, staging, on_bytes, rate, sinks)
        if task.image_count is not None and len(files) != task.image_count:
            raise IncompleteSeriesError(f"WADO-RS sent {len(files)} of {task.image_count} instances",
                                        series_uid=task.series_uid)
        if not files:
            raise IncompleteSeriesError("WADO-RS sent no instance", series_uid=task.series_uid)
        return UnpackedSeries(files=files, license_text=None, repairs=[])

    async def _fetch_once(self, task: SeriesTask, staging: Path, on_bytes: Callable[[int], None],
                          rate: Any, sinks: Sinks) -> list[VerifiedFile]:
        """One attempt: parse the body chunk by chunk; each part is hashed, written and checked
        in a worker thread. (Overlapping the two in separate tasks measured no faster: the
        kernel's socket buffer keeps receiving while a chunk is written.)"""
        await anyio.to_thread.run_sync(fresh_staging, staging)
        limits = self.config.limits
        announced = task.image_count if task.image_count is not None else limits.max_entries
        sink = sinks.instances(task, staging, max_instances=min(limits.max_entries, announced),
                               what="WADO-RS part", sender="WADO-RS")
        shown = redact_url(self.client.series_url(task.study_uid, task.series_uid))
        guard = BodyGuard(self.config, shown)  # deadline and stall rule (QIDO announces no size)
        async with self.client.open_series(task.study_uid, task.series_uid) as (resp, boundary):
            try:
                parser = MultipartParser(boundary)
                async for chunk in resp.content.iter_chunked(self.config.chunk_size):
                    guard.feed(len(chunk))
                    ours = time.monotonic()  # the bandwidth cap and the disk: not the server's time
                    if rate is not None:
                        await rate.consume(len(chunk))
                    on_bytes(len(chunk))
                    for kind, payload in parser.feed(chunk):
                        if kind == "headers":
                            await anyio.to_thread.run_sync(_start_part, sink, payload)
                        elif kind == "data":
                            await anyio.to_thread.run_sync(sink.write, payload)
                        else:
                            await anyio.to_thread.run_sync(sink.end)
                    guard.credit(time.monotonic() - ours)
                parser.close()
            except MultipartError as exc:
                raise RetryableRequestError(f"{exc} ({shown})", url=shown) from None
            finally:
                sink.abort()  # synchronous: it must run even when cancelled
        return sink.files


def _start_part(sink: InstanceWriter, headers: dict[str, str]) -> None:
    """A part begins: a new instance in the sink, if the part says it is DICOM."""
    sink.start()
    ctype = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
    if ctype != "application/dicom":
        raise IntegrityError(f"WADO-RS part {sink.count} is {ctype}, not application/dicom",
                             series_uid=sink.series_uid)


__all__ = ["DICOMwebSource"]
