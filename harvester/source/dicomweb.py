"""A DICOMweb service as a ``Source``: QIDO-RS to plan, WADO-RS to fetch (Orthanc, dcm4chee,
Google/Azure/AWS health-imaging APIs, any PACS with a DICOMweb root).

How a query maps onto QIDO-RS (``GET {root}/series``, ``{root}/studies/{uid}/series``):

* ``collection`` -> the attribute ``config.collection_attribute`` (default
  ClinicalTrialProtocolID, which TCIA-style de-identification fills with the collection name);
  ``patients`` -> PatientID, ``studies`` -> StudyInstanceUID, ``series`` -> SeriesInstanceUID,
  ``modality`` -> Modality, ``body_part`` -> BodyPartExamined, ``manufacturer`` -> Manufacturer.
  A selector of patients alone or studies alone needs no collection (a PACS has none). Single
  values of Modality and BodyPartExamined (code strings, upper case by definition) narrow the
  search on the server, upper-cased; every row is also checked locally with ``Selector.matches``
  (case-insensitive, as NBIA matches), so a server that ignores a matching key cannot widen the
  harvest. A list of series UIDs is searched ``UID_LIST_BATCH`` at a time (UID list matching),
  then UID by UID for what no list answered; a UID still without a row is listed in
  ``Plan.unavailable`` (``config.strict``: ``UnknownSelectionError``).
* ``released_after`` has no DICOMweb equivalent (archives record no release date) and raises
  ``UsageError`` rather than being silently ignored.
* ImageCount is NumberOfSeriesRelatedInstances (asked for with ``includefield``; counted from
  the series' instances when the server leaves it out). FileSize is unknown, so a series is
  verified by its instance count, SeriesInstanceUID and unique SOPInstanceUIDs instead.

Per series, WADO-RS ``GET {root}/studies/{study}/series/{series}`` with
``Accept: multipart/related; type="application/dicom"; transfer-syntax=*`` (files as stored) is
parsed as a stream by ``MultipartParser``: memory is one chunk per series in flight. The parts
feed the streaming sink (``harvester.store.sink.InstanceSink``, in a worker thread): each is
written to a new file in ``staging`` while its MD5 is computed, then checked and renamed to
``<SOPInstanceUID>.dcm``.

Who raises what:

* every request raises ``RetryableRequestError`` (after ``config.retries`` attempts, with the NBIA
  source's policy: backoff with jitter, ``Retry-After`` honoured for the whole host) for resets,
  timeouts, 5xx, 408, 429, an error page instead of a multipart body and a body cut before its
  closing boundary; ``PermanentRequestError`` for other 4xx; ``AuthError`` for 401.
* ``plan`` raises ``UnknownSelectionError`` for a collection the service does not have (and, with
  ``config.strict``, for a listed series it does not have).
* ``fetch_series`` raises ``IncompleteSeriesError`` when fewer instances arrive than QIDO
  announced, ``IntegrityError`` for a part that is not DICOM, belongs to another series, repeats
  a SOPInstanceUID or exceeds the announced count, and ``DiskFullError``/``OutputNotWritableError``.

Credentials: ``config.auth`` (user, password) as HTTP basic, or ``config.bearer_token``. They
are only ever put in request headers; messages carry URLs through ``redact_url``.
"""
from __future__ import annotations

import base64
import contextlib
import email.message
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit

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
    classify_os_error,
)
from harvester.planner import (
    Plan,
    SeriesTask,
    UnavailableSeries,
    empty_selector_warnings,
    gather_limited,
    refuse_unavailable,
    rows_by_uid,
)
from harvester.query import Query, Selector, fold
from harvester.source.base import ClientBackedSource
from harvester.redact import SECRETS
from harvester.source.http import (
    CLIENT_ERRORS,
    BodyGuard,
    RetryingClient,
    HostGate,
    as_int,
    classify_client_error,
    get_following,
    json_too_big,
    one_line,
    parse_json,
    raise_for_status,
    read_guarded,
    redact_url,
)
from harvester.store.sink import InstanceSink
from harvester.unpack import UnpackedSeries, VerifiedFile

#: QIDO-RS page size (limit=); a shorter page ends the search unless the server warns of more.
PAGE_SIZE = 500
#: An upper bound on rows per search, so a server that ignores offset cannot loop us forever.
MAX_ROWS = 1_000_000
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
QIDO_ACCEPT = "application/dicom+json, application/json"
#: The collection of a series whose collection attribute is empty (a folder name in layouts).
NO_COLLECTION = "NO-COLLECTION"
#: Series UIDs per QIDO-RS query when a list of UIDs is looked up (UID list matching, PS3.18
#: 8.3.4.1: ``SeriesInstanceUID=uid1,uid2,...``); about 2 KB of URL.
UID_LIST_BATCH = 32
#: The reason recorded for a listed series that no QIDO-RS search returns.
NO_SERIES = "the DICOMweb service has no such series (QIDO-RS answered no row)"
UNKNOWN_UID_HINT = ("check the UIDs, and that the URL is the service root (the one ending in /dicom-web or "
                    "similar); or leave out --strict to harvest the rest")

# DICOM tags as QIDO-RS names them (8 upper-case hex digits).
TAGS = {
    "PatientID": "00100020", "PatientName": "00100010", "PatientSex": "00100040",
    "StudyInstanceUID": "0020000D", "StudyDate": "00080020", "StudyID": "00200010",
    "StudyDescription": "00081030", "SeriesInstanceUID": "0020000E", "SeriesNumber": "00200011",
    "SeriesDescription": "0008103E", "SeriesDate": "00080021", "Modality": "00080060",
    "BodyPartExamined": "00180015", "Manufacturer": "00080070", "ManufacturerModelName": "00081090",
    "ProtocolName": "00181030", "NumberOfSeriesRelatedInstances": "00201209", "SOPInstanceUID": "00080018",
}
#: Asked for with includefield on every series search (servers omit most of them by default).
SERIES_FIELDS = tuple(TAGS[k] for k in (
    "PatientID", "PatientName", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyID", "StudyDescription",
    "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "SeriesDate", "Modality", "BodyPartExamined",
    "Manufacturer", "ManufacturerModelName", "ProtocolName", "NumberOfSeriesRelatedInstances"))


def dicom_tag(name: str) -> str:
    """A DICOM keyword (``ClinicalTrialProtocolID``) or tag (``00120020``, ``0012,0020``) as the
    8-hex-digit form QIDO-RS uses. Raises ``UsageError`` for anything else."""
    text = name.strip().replace(",", "").replace("(", "").replace(")", "")
    if len(text) == 8 and all(c in "0123456789abcdefABCDEF" for c in text):
        return text.upper()
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(name.strip())
    if tag is None:
        raise UsageError(f"collection attribute {name!r} is neither a DICOM keyword nor a tag",
                         hint="use a keyword such as ClinicalTrialProtocolID or a tag such as 00120020")
    return f"{tag:08X}"


def json_text(item: dict[str, Any], tag: str) -> str | None:
    """The first value of ``tag`` in a DICOM JSON object, as text; None when absent or empty.

    Defensive: any key or level may be missing or of the wrong type; person names are
    ``{"Alphabetic": ...}`` objects; numbers may arrive as numbers or strings.
    """
    element = item.get(tag)
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    if not isinstance(values, list) or not values:
        return None
    value = values[0]
    if isinstance(value, dict):  # PN
        value = value.get("Alphabetic")
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def iso_date(value: str | None) -> str | None:
    """DICOM DA (``YYYYMMDD``) as ISO ``YYYY-MM-DD``, like NBIA's rows; other text unchanged."""
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


# ---------------------------------------------------------------------------- multipart

class MultipartError(ValueError):
    """The body is not a well-formed multipart body (``MultipartParser``)."""


#: ("headers", {name: value}) | ("data", bytes) | ("end", None)
Event = tuple[str, Any]


class MultipartParser:
    """A sans-IO parser for a multipart body (RFC 2046) in constant memory.

    ``feed(chunk)`` returns events in order: ``("headers", {lower-case name: value})`` when a
    part starts, ``("data", bytes)`` for its body (any number of pieces), ``("end", None)`` when
    it ends. Memory held between calls is at most the delimiter's length (plus a part's header
    block, capped at ``max_header_bytes``), however large the parts. ``close()`` raises
    ``MultipartError`` if the closing delimiter never came (a truncated body).
    """

    def __init__(self, boundary: str, *, max_header_bytes: int = 64 * 1024) -> None:
        if not boundary or len(boundary) > 200:
            raise MultipartError("multipart boundary is empty or too long")
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        # A leading CRLF lets a body that starts with the delimiter match like any other.
        self._buf = b"\r\n"
        self._state: Literal["preamble", "after_delimiter", "headers", "body", "epilogue"] = "preamble"
        self._max_header_bytes = max_header_bytes
        self.parts = 0

    @property
    def done(self) -> bool:
        return self._state == "epilogue"

    def feed(self, data: bytes) -> list[Event]:
        if self._state == "epilogue":
            return []
        buf = self._buf + data if self._buf else bytes(data)
        events: list[Event] = []
        delimiter = self._delimiter
        keep = len(delimiter) - 1  # the longest proper prefix of the delimiter a chunk can end in
        while True:
            if self._state == "body":
                at = buf.find(delimiter)
                if at < 0:
                    if len(buf) > keep:
                        events.append(("data", buf[:-keep]))
                        buf = buf[-keep:]
                    break
                if at:
                    events.append(("data", buf[:at]))
                events.append(("end", None))
                buf = buf[at + len(delimiter):]
                self._state = "after_delimiter"
            elif self._state == "preamble":
                at = buf.find(delimiter)
                if at < 0:
                    buf = buf[-keep:]
                    break
                buf = buf[at + len(delimiter):]
                self._state = "after_delimiter"
            elif self._state == "after_delimiter":
                if len(buf) < 2:
                    break
                if buf.startswith(b"--"):
                    self._state = "epilogue"
                    buf = b""
                    break
                eol = buf.find(b"\r\n")
                if eol < 0:
                    if len(buf) > 1024:
                        raise MultipartError("garbage after a multipart delimiter")
                    break
                if buf[:eol].strip(b" \t"):
                    raise MultipartError("garbage after a multipart delimiter")
                buf = buf[eol + 2:]
                self._state = "headers"
            elif self._state == "headers":
                if buf.startswith(b"\r\n"):
                    block, buf = b"", buf[2:]
                else:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        if len(buf) > self._max_header_bytes:
                            raise MultipartError("a multipart part has an oversized header block")
                        break
                    block, buf = buf[:end], buf[end + 4:]
                events.append(("headers", _parse_part_headers(block)))
                self.parts += 1
                self._state = "body"
            else:  # epilogue
                buf = b""
                break
        self._buf = buf
        return events

    def close(self) -> None:
        if self._state != "epilogue":
            raise MultipartError("the multipart body ended before its closing delimiter")


def _parse_part_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    return headers


def multipart_boundary(content_type: str) -> tuple[str, str | None]:
    """(media type, boundary parameter or None) from a Content-Type header value."""
    msg = email.message.Message()
    msg["Content-Type"] = content_type
    boundary = msg.get_param("boundary")
    return msg.get_content_type(), boundary if isinstance(boundary, str) else None


# ---------------------------------------------------------------------------- client

class DICOMwebClient(RetryingClient):
    """QIDO-RS searches and WADO-RS series streams on one aiohttp session, with the request
    retry policy of ``NBIAClient`` (see the module docstring for what is raised)."""

    def __init__(self, config: Config, session: aiohttp.ClientSession, *,
                 on_retry: Callable[[BaseException], None] | None = None, gate: HostGate | None = None) -> None:
        self.config = config
        self.session = session
        self.root = config.api_url.rstrip("/")
        self.on_retry = on_retry
        self.gate = gate or HostGate()
        self.requests = 0
        self.retries = 0
        self._auth_header: dict[str, str] = {}
        if config.bearer_token:
            SECRETS.add(config.bearer_token)
            self._auth_header = {"Authorization": f"Bearer {config.bearer_token}"}
        elif config.auth is not None:
            SECRETS.add(config.auth.password, user=config.auth.username)
            pair = f"{config.auth.username}:{config.auth.password}".encode()
            self._auth_header = {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
        if self._auth_header and urlsplit(self.root).username is not None:
            raise UsageError("credentials were given both in the URL and as options",
                             hint="keep one: the URL's user:password@ or --user/--token-env")

    def __repr__(self) -> str:
        return f"DICOMwebClient(root={redact_url(self.root)!r})"

    @contextlib.asynccontextmanager
    async def _request(self, url: str, *, accept: str, ok: Sequence[int] = (200,)
                       ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One GET with auth, the host gate and the redirect policy (``get_following``: the
        credentials never go to another origin); failures classified, those inside the
        ``async with`` body included (no retry here): no aiohttp exception leaves unclassified."""
        await self.gate.wait()
        headers = {"Accept": accept, **self._auth_header}
        shown = redact_url(url)
        self.requests += 1
        try:
            async with get_following(self.session, url, headers=headers, config=self.config, shown=shown) as resp:
                if resp.status not in ok:
                    await raise_for_status(resp, shown, max_retry_after=self.config.max_retry_after)
                yield resp
        except CLIENT_ERRORS as exc:
            raise classify_client_error(exc, shown) from None

    # ------------------------------------------------------------ QIDO-RS
    def url(self, path: str, params: Iterable[tuple[str, str]] = ()) -> str:
        query = urlencode(list(params))
        return f"{self.root}/{path}" + (f"?{query}" if query else "")

    async def search(self, path: str, params: Sequence[tuple[str, str]],
                     key: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
        """Every row of a QIDO-RS search, paged with limit/offset; rows de-duplicated by ``key``.

        Paging stops at a page shorter than asked (unless the server sent a Warning that more
        matches exist), at a page that adds nothing new (a server ignoring offset), or at a page
        longer than asked (a server ignoring limit sent everything).
        """
        rows: dict[str, dict[str, Any]] = {}
        offset = 0
        while offset < MAX_ROWS:
            url = self.url(path, [*params, ("limit", str(PAGE_SIZE)), ("offset", str(offset))])
            page, more = await self._get_json(url)
            new = 0
            for row in page:
                k = key(row)
                if k not in rows:
                    rows[k] = row
                    new += 1
            if not page or new == 0 or len(page) > PAGE_SIZE or (len(page) < PAGE_SIZE and not more):
                break
            offset += len(page)
        return list(rows.values())

    async def _get_json(self, url: str) -> tuple[list[dict[str, Any]], bool]:
        async for attempt in self.retrying():
            with attempt:
                return await self._get_json_once(url)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _get_json_once(self, url: str) -> tuple[list[dict[str, Any]], bool]:
        shown = redact_url(url)
        async with self._request(url, accept=QIDO_ACCEPT, ok=(200, 204)) as resp:
            if resp.status == 204:  # the standard's answer to "no matches"
                return [], False
            cap = self.config.max_json_bytes
            body = await read_guarded(resp, BodyGuard(self.config, shown, max_bytes=cap,
                                                      too_big=json_too_big(shown, cap)))
            warning = " ".join(resp.headers.getall("Warning", []))
        if not body.strip():
            return [], False
        data = parse_json(body, shown)  # an outage page with HTTP 200 is a transient failure, not data
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise RetryableRequestError(f"{shown} answered JSON that is not a list", url=shown)
        return [row for row in data if isinstance(row, dict)], "299" in warning

    # ------------------------------------------------------------ WADO-RS
    def series_url(self, study_uid: str, series_uid: str) -> str:
        return f"{self.root}/studies/{quote(study_uid, safe='')}/series/{quote(series_uid, safe='')}"

    @contextlib.asynccontextmanager
    async def open_series(self, study_uid: str, series_uid: str) -> AsyncIterator[tuple[aiohttp.ClientResponse, str]]:
        """Open the WADO-RS multipart stream of one series (one attempt; the caller retries).

        Yields the response and its boundary. Raises ``RetryableRequestError`` when the body is
        not multipart/related with a boundary (an error page sent with HTTP 200).
        """
        url = self.series_url(study_uid, series_uid)
        shown = redact_url(url)
        async with self._request(url, accept=WADO_ACCEPT, ok=(200, 206)) as resp:
            media, boundary = multipart_boundary(resp.headers.get("Content-Type", ""))
            if media != "multipart/related" or not boundary:
                text = (await resp.content.read(2048)).decode("utf-8", "replace")
                raise RetryableRequestError(
                    f"{shown} sent {media} instead of multipart/related: {one_line(text) or 'no body'}", url=shown)
            yield resp, boundary


# ---------------------------------------------------------------------------- source

@dataclass
class _SearchResult:
    rows: list[dict[str, Any]]   # getSeries-like rows that passed the local checks
    raw: int                     # rows the server sent
    with_collection: int         # of which carried the collection attribute


class DICOMwebSource(ClientBackedSource):
    """A DICOMweb service as a ``Source`` (QIDO-RS plan, WADO-RS multipart fetch)."""

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
        batches = [found for found, _ in results]
        found = {row["SeriesInstanceUID"] for batch in batches for row in batch}
        unavailable: dict[str, UnavailableSeries] = {}
        for _, missing in results:
            for u in missing:
                if u.series_uid not in found:  # another selector found it
                    unavailable.setdefault(u.series_uid, u)
        if self.config.strict:
            refuse_unavailable(list(unavailable.values()), archive="the DICOMweb service", hint=UNKNOWN_UID_HINT)
        rows: dict[str, dict[str, Any]] = {}
        for batch in batches:
            for row in batch:
                uid = row["SeriesInstanceUID"]
                if uid not in rows and not query.exclude.excludes(row):
                    rows[uid] = row
        ordered = sorted(rows.values(), key=lambda r: (r["Collection"], r.get("PatientID", ""),
                                                       r.get("StudyInstanceUID", ""), r["SeriesInstanceUID"]))
        if query.limit is not None:
            ordered = ordered[: query.limit]
        await gather_limited([self._count_call(r) for r in ordered if r.get("ImageCount") is None],
                             self.config.plan_concurrency)
        return Plan(tasks=[self._task(r) for r in ordered], requests=self.requests - start_requests,
                    retries=self.retries - start_retries, unavailable=list(unavailable.values()),
                    warnings=empty_selector_warnings(query.selectors, batches))

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
        rows = [r for res in results for r in res.rows if sel.matches(r)]
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
                           on_bytes: Callable[[int], None], rate: Any) -> UnpackedSeries:
        """Stream the series' WADO-RS multipart body straight into ``staging`` (``partial`` is
        not used), with request-level retries; each attempt starts from an empty ``staging``."""
        async for attempt in self.client.retrying():
            with attempt:
                files = await self._fetch_once(task, staging, on_bytes, rate)
        if task.image_count is not None and len(files) != task.image_count:
            raise IncompleteSeriesError(f"WADO-RS sent {len(files)} of {task.image_count} instances",
                                        series_uid=task.series_uid)
        if not files:
            raise IncompleteSeriesError("WADO-RS sent no instance", series_uid=task.series_uid)
        return UnpackedSeries(files=files, license_text=None, repairs=[])

    async def _fetch_once(self, task: SeriesTask, staging: Path, on_bytes: Callable[[int], None],
                          rate: Any) -> list[VerifiedFile]:
        """One attempt: parse the body chunk by chunk; each part is hashed, written and checked
        in a worker thread. (Overlapping the two in separate tasks measured no faster: the
        kernel's socket buffer keeps receiving while a chunk is written.)"""
        await anyio.to_thread.run_sync(_fresh_dir, staging)
        limits = self.config.limits
        announced = task.image_count if task.image_count is not None else limits.max_entries
        sink = InstanceSink(staging, series_uid=task.series_uid, max_instance_bytes=limits.max_entry_bytes,
                            max_instances=min(limits.max_entries, announced), what="WADO-RS part", sender="WADO-RS")
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


def _fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise classify_os_error(exc, f"staging folder {path.name}") from None


def _start_part(sink: InstanceSink, headers: dict[str, str]) -> None:
    """A part begins: a new instance in the sink, if the part says it is DICOM."""
    sink.start()
    ctype = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
    if ctype != "application/dicom":
        raise IntegrityError(f"WADO-RS part {sink.count} is {ctype}, not application/dicom",
                             series_uid=sink.series_uid)


__all__ = ["DICOMwebSource", "DICOMwebClient", "MultipartParser", "MultipartError", "dicom_tag", "json_text",
           "multipart_boundary"]
