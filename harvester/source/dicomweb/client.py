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
parsed as a stream by ``MultipartParser``: memory is one chunk per series in flight. Each part
is written to a new file in ``staging`` while its MD5 is computed, then parsed (in a thread) and
renamed to ``<SOPInstanceUID>.dcm``.

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
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit

import aiohttp

from harvester.config import Config
from harvester.errors import RetryableRequestError, UsageError
from harvester.redact import SECRETS
from harvester.source.http import (
    BodyGuard,
    HostGate,
    RetryingClient,
    StaticAuth,
    json_too_big,
    one_line,
    parse_json,
    read_guarded,
    redact_url,
    request,
)

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

    def _request(self, url: str, *, accept: str, ok: Sequence[int] = (200,)
                 ) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """One GET through ``harvester.source.http.request`` with the fixed credentials (a 401
        stands); every failure classified, no retry here."""
        return request(self, url, accept=accept, auth=StaticAuth(self._auth_header), ok=ok)

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


__all__ = ["DICOMwebClient", "MultipartParser", "MultipartError", "dicom_tag", "json_text",
           "multipart_boundary"]
