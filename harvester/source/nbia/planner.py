"""Query -> the exact list of ``SeriesTask``s, with concurrent, bounded metadata calls.

Selectors are expanded concurrently (``config.plan_concurrency`` requests in flight; a long list
of series UIDs through the collections it comes from), rows are de-duplicated by
SeriesInstanceUID, exclusions and the limit applied, and getSeriesSize is called only for rows
that lack ImageCount or FileSize. For each collection touched, getPatient and getPatientStudy
are fetched once so that layouts and the manifest have StudyID, StudyDescription and the
patient record (skipped with ``details=False``, when only totals are wanted: ``harvester plan``).

Rows are checked with ``Selector.matches`` (the server's case-insensitive comparison). A series
of a list (a cart, a CSV, ``series:``) that the archive does not have, or refuses (withdrawn,
restricted, mistyped), is not an error: it goes to ``Plan.unavailable`` with what the archive
said, and the rest is planned; ``config.strict`` keeps the refusal instead. A selector that
matches nothing is named in ``Plan.warnings``.

Raises ``UnknownSelectionError`` (a usage error) for an unknown collection, and with
``config.strict`` for unavailable series; the request errors of ``NBIAClient`` when the archive
keeps failing after retries.
"""
from __future__ import annotations

import difflib
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio

from harvester.config import NLST_COLLECTIONS
from harvester.dates import parse_archive_date
from harvester.errors import PermanentRequestError, UnknownSelectionError
from harvester.query import Query, Selector, fold
from harvester.models import Plan, SeriesTask, TaskStore, UnavailableSeries
from harvester.selection import empty_selector_warnings, first_error, gather_limited, matches, select_rows
from harvester.source.nbia.client import NBIAClient, as_int


# While this many UIDs of a list are unanswered, a collection that a lookup shows is listed whole
# (one getSeries?Collection=) rather than looked up UID by UID; see Planner._series_by_uid.
SWEEP_MIN_PENDING = 32
#: The reason recorded for a series the archive answers with no row.
NO_ROW = "the archive has no such series (getSeries answered no row): withdrawn, restricted or mistyped"
UNAVAILABLE_HINT = ("the series may be restricted, withdrawn, or on another host (NLST); check the UIDs, "
                    "or leave out --strict to harvest the rest")


def undated_warning(count: int) -> str:
    """The plan's one warning about series kept by ``released_after`` without a readable date."""
    return (f"released_after: {count} series have no readable DateReleased; they are kept "
            f"(check the archive's dates, or exclude them by UID)")


class Planner:
    """Expands a ``Query`` against an archive. One instance per plan."""

    def __init__(self, client: NBIAClient, *, concurrency: int = 8) -> None:
        self.client = client
        self.concurrency = concurrency
        #: SeriesInstanceUIDs a ``released_after`` selector kept without a readable DateReleased.
        self._undated: set[str] = set()
        # a selector's collection -> the archive's spelling of it (the server matches either;
        # requests, NLST routing and the rows' Collection use the archive's)
        self._collection_names: dict[str, str] = {}

    async def plan(self, query: Query, *, details: bool = True, into: TaskStore | None = None) -> Plan:
        """The exact plan; ``details=False`` leaves ``SeriesTask.study``/``patient`` empty and
        saves two requests per collection. With ``into``, each task goes there as it is made
        (in a worker thread; its row is then let go) and the Plan holds none (``Plan.stored``).
        Raises ``UnknownSelectionError`` for an unknown collection, and for unavailable series of
        a list when ``config.strict`` is set."""
        start_requests, start_retries = self.client.requests, self.client.retries
        await self._check_collections(query)
        results = await gather_limited([self._selector_calls(s) for s in query.selectors], self.concurrency)
        selection = select_rows(query, results, strict=self.client.config.strict, archive="the archive",
                                hint=UNAVAILABLE_HINT)
        ordered, unavailable = selection.rows, selection.unavailable
        warnings = empty_selector_warnings(query.selectors, selection.batches)
        del results, selection      # the rows are held by ``ordered`` alone from here
        await self._fill_sizes(ordered)
        studies, patients = await self._study_details(ordered) if details else ({}, {})
        undated = 0
        if into is None:
            tasks = [self._task(r, studies, patients) for r in ordered]
            undated = sum(1 for t in tasks if t.series_uid in self._undated)
        else:
            tasks = []

            def made() -> Iterator[SeriesTask]:
                nonlocal undated
                ordered.reverse()
                while ordered:   # each row is let go once its task is stored
                    task = self._task(ordered.pop(), studies, patients)
                    undated += task.series_uid in self._undated
                    yield task
            await anyio.to_thread.run_sync(into.add, made())
        return Plan(tasks=tasks, requests=self.client.requests - start_requests,
                    retries=self.client.retries - start_retries, unavailable=unavailable,
                    warnings=warnings + ([undated_warning(undated)] if undated else []), stored=into)

    # ------------------------------------------------------------ selectors
    def _selector_calls(self, sel: Selector
                        ) -> Callable[[], Awaitable[tuple[list[dict[str, Any]], list[UnavailableSeries]]]]:
        async def run() -> tuple[list[dict[str, Any]], list[UnavailableSeries]]:
            if sel.series:
                return await self._series_by_uid(sel)
            rows = await self._series_by_filter(sel)
            if sel.released_after:  # (the date filters selector rows, not UID lists)
                self._undated.update(str(r.get("SeriesInstanceUID") or "") for r in rows
                                     if parse_archive_date(r.get("DateReleased")) is None)
            return rows, []
        return run

    async def _series_by_filter(self, sel: Selector) -> list[dict[str, Any]]:
        """Collection, patients alone or studies alone (getSeries takes each without the others),
        narrowed on the server by single values and always checked locally."""
        collection = self._collection_names.get(sel.collection, sel.collection) if sel.collection else None
        base: dict[str, str] = {"Collection": collection} if collection else {}
        # Narrow on the server when a single value is asked for; always filter locally too.
        for key, values in (("Modality", sel.modality), ("BodyPartExamined", sel.body_part),
                            ("Manufacturer", sel.manufacturer)):
            if len(values) == 1:
                base[key] = values[0]
        if sel.studies:
            param_sets = [{**base, "StudyInstanceUID": s} for s in sel.studies]
        elif sel.patients:
            param_sets = [{**base, "PatientID": p} for p in sel.patients]
        else:
            param_sets = [base]
        results = await gather_limited(
            [self._getter("getSeries", p, collection) for p in param_sets], self.concurrency)
        rows = [r for batch in results for r in batch]
        if collection:
            for r in rows:
                r.setdefault("Collection", collection)
        return [r for r in rows if matches(r, sel)]

    async def _series_by_uid(self, sel: Selector) -> tuple[list[dict[str, Any]], list[UnavailableSeries]]:
        """The rows of the selector's series UIDs (a cart, a CSV, a ``series:`` list).

        NBIA has no batch lookup, so a UID costs one getSeries. A long list (a portal cart of
        thousands of series) mostly comes from a few collections: once a lookup shows a
        collection, one getSeries?Collection= lists all of it and answers every UID of the list it
        holds (the same endpoint, so the same rows). ``concurrency`` workers look UIDs up; a worker
        whose lookup shows a new collection sweeps it while ``SWEEP_MIN_PENDING`` UIDs or more are
        unanswered, and no new lookup starts until the sweeps in flight end (they may answer it).
        NLST (over 200,000 series) is never swept, so its lookups flow without pause.

        Returns the rows found, in the list's order, and the UIDs the archive answered with no
        row or refused, each with what it said.
        """
        wanted = list(dict.fromkeys(sel.series))
        found: dict[str, dict[str, Any]] = {}
        missing: dict[str, str] = {}  # uid -> the archive's reason
        swept: set[str] = set(NLST_COLLECTIONS)
        sweeps: set[anyio.Event] = set()  # sweeps in flight; lookups wait for them
        queue, wanted_set = deque(wanted), set(wanted)
        unanswered = len(wanted)

        def answer(uid: str, row: dict[str, Any] | None, reason: str = "") -> None:
            nonlocal unanswered
            if uid in found:
                return  # a lookup in flight when a sweep answered it
            unanswered -= 1
            if row is None:
                missing[uid] = reason
            else:
                found[uid] = row

        async def sweep(collection: str) -> None:
            done = anyio.Event()
            sweeps.add(done)
            try:
                for row in await self._sweep(collection)():  # refused (400): its UIDs stay with lookups
                    uid = str(row.get("SeriesInstanceUID") or "")
                    if uid in wanted_set and uid not in found:
                        row.setdefault("Collection", collection)
                        answer(uid, row)
            finally:
                sweeps.discard(done)
                done.set()

        async def worker() -> None:
            while True:
                while sweeps:
                    await next(iter(sweeps)).wait()
                while queue and queue[0] in found:
                    queue.popleft()
                if not queue:
                    return
                uid = queue.popleft()
                rows, reason = await self._lookup_series(uid)
                answer(uid, rows[0] if rows else None, reason)
                collection = str(rows[0].get("Collection") or "") if rows else ""
                if collection and collection not in swept and unanswered >= SWEEP_MIN_PENDING:
                    swept.add(collection)
                    await sweep(collection)

        try:
            async with anyio.create_task_group() as tg:
                for _ in range(max(1, self.concurrency)):
                    tg.start_soon(worker)
        except BaseExceptionGroup as group:  # surface the first real error, as gather_limited does
            raise first_error(group) from None
        # in the list's order, not in the order the lookups ended
        return ([found[uid] for uid in wanted if uid in found],
                [UnavailableSeries(uid, sel.origin, missing[uid]) for uid in wanted if uid in missing])

    def _sweep(self, collection: str) -> Callable[[], Awaitable[list[dict[str, Any]]]]:
        async def run() -> list[dict[str, Any]]:
            return await self._fetch_or_empty("getSeries", {"Collection": collection}, collection)
        return run

    async def _lookup_series(self, uid: str) -> tuple[list[dict[str, Any]], str]:
        """getSeries?SeriesInstanceUID=: the series' row, or none and what the archive said (the
        main host's answer: an NLST host that has no row either adds nothing)."""
        rows, reason = await self._series_row(uid, None)
        if not rows and self.client.config.uses_public_default:
            # NLST series live on their own host, and the main host answers 400 for them.
            for collection in sorted(NLST_COLLECTIONS):
                rows, _ = await self._series_row(uid, collection)
                if rows:
                    break
        return rows, "" if rows else reason

    async def _series_row(self, uid: str, collection: str | None) -> tuple[list[dict[str, Any]], str]:
        try:
            rows = await self.client.query("getSeries", {"SeriesInstanceUID": uid}, collection=collection)
        except PermanentRequestError as exc:
            if exc.status != 400:
                raise
            # NBIA's "no" (restricted, withdrawn, another host): the message is already one
            # line, its URL redacted and the server's text bounded (source.http.raise_for_status)
            return [], f"refused: {exc}"
        rows = [r for r in rows if str(r.get("SeriesInstanceUID")) == uid]
        return rows, "" if rows else NO_ROW

    async def _fetch_or_empty(self, endpoint: str, params: dict[str, str], collection: str | None) -> list[dict[str, Any]]:
        try:
            return await self.client.query(endpoint, params, collection=collection)
        except PermanentRequestError as exc:
            if exc.status == 400:
                return []
            raise

    def _getter(self, endpoint: str, params: dict[str, str], collection: str | None
                ) -> Callable[[], Awaitable[list[dict[str, Any]]]]:
        async def run() -> list[dict[str, Any]]:
            return await self.client.query(endpoint, params, collection=collection)
        return run

    async def _check_collections(self, query: Query) -> None:
        """Every selector's collection exists (compared folded, as the server compares); fills
        ``_collection_names`` with the archive's spelling of each."""
        wanted = {s.collection for s in query.selectors if s.collection}
        if self.client.config.uses_public_default:
            nlst = {fold(n): n for n in NLST_COLLECTIONS}  # on its own host: not listed by the main one
            self._collection_names.update({w: nlst[fold(w)] for w in wanted if fold(w) in nlst})
            wanted -= set(self._collection_names)
        if not wanted:
            return
        known = {fold(k): k for k in await self.client.collections()}
        for name in sorted(wanted):
            if fold(name) in known:
                self._collection_names[name] = known[fold(name)]
            else:
                by_lower = {k.lower(): k for k in known.values()}
                close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)
                suggestion = f"; did you mean {', '.join(by_lower[c] for c in close)}?" if close else ""
                origin = next(s.origin for s in query.selectors if s.collection == name)
                raise UnknownSelectionError(f"{origin}: unknown collection {name!r}{suggestion}")

    # ------------------------------------------------------------ enrichment
    async def _fill_sizes(self, rows: list[dict[str, Any]]) -> None:
        need = [r for r in rows if as_int(r.get("ImageCount")) is None or as_int(r.get("FileSize")) is None]

        def sizer(row: dict[str, Any]) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                count, size = await self.client.series_size(str(row["SeriesInstanceUID"]),
                                                            collection=row.get("Collection"))
                if as_int(row.get("ImageCount")) is None and count is not None:
                    row["ImageCount"] = count
                if as_int(row.get("FileSize")) is None and size is not None:
                    row["FileSize"] = size
            return run

        await gather_limited([sizer(r) for r in need], self.concurrency)

    async def _study_details(self, rows: list[dict[str, Any]]
                             ) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], dict[str, Any]]]:
        collections = sorted({str(r.get("Collection", "")) for r in rows if r.get("Collection")})
        calls = []
        for c in collections:
            calls.append(self._getter("getPatientStudy", {"Collection": c}, c))
            calls.append(self._getter("getPatient", {"Collection": c}, c))
        results = await gather_limited(calls, self.concurrency)
        studies: dict[str, dict[str, Any]] = {}
        patients: dict[tuple[str, str], dict[str, Any]] = {}
        for i, c in enumerate(collections):
            for s in results[2 * i]:
                if s.get("StudyInstanceUID"):
                    studies[str(s["StudyInstanceUID"])] = s
            for p in results[2 * i + 1]:
                pid = p.get("PatientId", p.get("PatientID"))
                if pid is not None:
                    patients[(c, str(pid))] = p
        return studies, patients

    @staticmethod
    def _task(row: dict[str, Any], studies: dict[str, dict[str, Any]],
              patients: dict[tuple[str, str], dict[str, Any]]) -> SeriesTask:
        collection = str(row.get("Collection", ""))
        patient_id = str(row.get("PatientID", ""))
        study_uid = str(row.get("StudyInstanceUID", ""))
        return SeriesTask(
            series_uid=str(row["SeriesInstanceUID"]),
            collection=collection,
            patient_id=patient_id,
            study_uid=study_uid,
            modality=str(row.get("Modality", "")),
            image_count=as_int(row.get("ImageCount")),
            file_size=as_int(row.get("FileSize")),
            row=row,
            study=studies.get(study_uid),
            patient=patients.get((collection, patient_id)),
        )
