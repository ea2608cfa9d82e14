"""The NBIA REST client (TCIA's search/download API), on one aiohttp ClientSession.

Follows ``shared/nbia-api.md``: parameter names are case-sensitive and v4 rejects unknown
ones, so only names from the page are ever sent. JSON rows may omit any key and send numbers
as strings; helpers here parse them defensively.

Who raises what:

* every method raises ``RetryableRequestError`` (after ``config.retries`` attempts) for resets,
  timeouts, 5xx, 408 and 429; ``PermanentRequestError`` for other 4xx (the server's text is in
  the message); ``AuthError`` when credentials are rejected even after a token refresh.
* ``open_series`` yields a response already checked for status and content type; the ZIP
  signature is checked by the caller on the first bytes (see ``harvester.source.nbia.download``). A server
  that refuses getImage's ``IncludeMD5`` with HTTP 400 (v4 builds of May to Nov 2025) is asked
  with ``getImageWithMD5Hash`` instead, at once and for every later series of this client.
"""
from __future__ import annotations

import codecs
import contextlib
import json
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
import anyio

from harvester.config import NLST_API_URL, NLST_COLLECTIONS, AuthConfig, Config
from harvester.errors import (
    AuthError,
    PermanentRequestError,
    RequestError,
    RetryableRequestError,
    UsageError,
)
from harvester.redact import SECRETS
from harvester.source.base import InstanceTarget
from harvester.source.http import (
    CLIENT_ERRORS,
    BodyGuard,
    HostGate,
    RetryingClient,
    StaticAuth,
    as_int,
    env_proxy,
    json_too_big,
    make_session,
    one_line,
    parse_json,
    parse_retry_after,
    read_guarded,
    redact_url,
    request,
    streaming_timeout,
)

QUERY_ENDPOINTS: dict[str, tuple[str, ...]] = {
    "getCollectionValues": (),
    "getModalityValues": ("Collection", "BodyPartExamined"),
    "getBodyPartValues": ("Collection", "Modality"),
    "getManufacturerValues": ("Collection", "Modality", "BodyPartExamined"),
    "getPatient": ("Collection",),
    "getPatientByCollectionAndModality": ("Collection", "Modality"),
    "NewPatientsInCollection": ("Collection", "fromDate"),
    "getPatientStudy": ("Collection", "PatientID", "StudyInstanceUID"),
    "NewStudiesInPatientCollection": ("Collection", "PatientID", "fromDate"),
    "getSeries": ("Collection", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                  "BodyPartExamined", "Manufacturer", "ManufacturerModelName"),
    "getUpdatedSeries": ("fromDate",),
    "getSeriesSize": ("SeriesInstanceUID",),
    "getSOPInstanceUIDs": ("SeriesInstanceUID",),
    # v4 allows only SOPInstanceUID (and reads SOPInstanceUid: ``NBIAClient.instance_md5``);
    # v1/v2 ignore unknown names and read SOPInstanceUid
    "getMD5HashForImage": ("SOPInstanceUID", "SOPInstanceUid"),
}
TOKEN_ANSWER_BYTES = 1 << 20  # a token answer is a few hundred bytes; a bigger one is not read on
#: bytes of one instance gathered from the network before one hop to the worker thread that
#: writes them (``single_image_into``; the source's spread instances take the same)
INSTANCE_BATCH_BYTES = 1 << 20


def _usable_token(token: str) -> bool:
    """Whether ``token`` can go back in an ``Authorization`` header: one word of visible ASCII."""
    return bool(token) and all("!" <= c <= "~" for c in token)


@dataclass
class _Token:
    access: str
    refresh: str | None
    expires_at: float


class TokenAuth:
    """OAuth password-grant bearer tokens, refreshed before expiry and once on 401.

    Tokens and the password live only in this object; nothing here logs or formats them.
    Raises ``AuthError`` when the token endpoint rejects the credentials.
    """

    def __init__(self, auth: AuthConfig) -> None:
        self._auth = auth
        self._token: _Token | None = None
        self._lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"TokenAuth(user={self._auth.username!r})"

    async def headers(self, session: aiohttp.ClientSession) -> dict[str, str]:
        """``Auth.headers``: the bearer header of a valid token (obtained or refreshed first)."""
        return await self.header(session)

    async def rejected(self, session: aiohttp.ClientSession, sent: Mapping[str, str]) -> bool:
        """``Auth.rejected``: the token sent was refused; refresh it (unless another request
        already did) and send the request once more."""
        await self.force_refresh(session, {"Authorization": sent.get("Authorization", "")})
        return True

    async def header(self, session: aiohttp.ClientSession) -> dict[str, str]:
        async with self._lock:
            if self._token is None or time.monotonic() > self._token.expires_at - 30:
                await self._obtain(session, use_refresh=self._token is not None)
            assert self._token is not None
            return {"Authorization": f"Bearer {self._token.access}"}

    async def force_refresh(self, session: aiohttp.ClientSession, rejected: dict[str, str]) -> None:
        async with self._lock:
            current = self._token and {"Authorization": f"Bearer {self._token.access}"}
            if current == rejected:  # nobody refreshed it since this request was sent
                await self._obtain(session, use_refresh=True)

    async def _obtain(self, session: aiohttp.ClientSession, *, use_refresh: bool) -> None:
        form: dict[str, str]
        if use_refresh and self._token and self._token.refresh:
            form = {"grant_type": "refresh_token", "client_id": self._auth.client_id,
                    "refresh_token": self._token.refresh}
        else:
            form = {"grant_type": "password", "client_id": self._auth.client_id,
                    "username": self._auth.username, "password": self._auth.password}
        url = redact_url(self._auth.token_url)
        try:
            # No redirects: a 307/308 would re-post the password to wherever it points.
            async with session.post(self._auth.token_url, data=form, allow_redirects=False,
                                    **env_proxy(session, self._auth.token_url)) as resp:
                if resp.status in (400, 401, 403) and form["grant_type"] == "refresh_token":
                    self._token = None
                    return await self._obtain(session, use_refresh=False)
                if resp.status in (400, 401, 403):
                    raise AuthError(f"token request to {url} was rejected (HTTP {resp.status})")
                if 300 <= resp.status < 400:
                    raise AuthError(f"token endpoint {url} redirects (HTTP {resp.status}); the password was not "
                                    "sent on", hint="give the final token URL with --token-url")
                if resp.status != 200:
                    raise RetryableRequestError(f"token request to {url} failed: HTTP {resp.status}",
                                                status=resp.status, url=url)
                body = b""
                async for chunk in resp.content.iter_any():
                    body += chunk
                    if len(body) > TOKEN_ANSWER_BYTES:
                        raise AuthError(f"token endpoint {url} answered more than {TOKEN_ANSWER_BYTES} bytes",
                                        hint="check --token-url (default: <host>/nbia-api/oauth/token)")
                try:
                    data = json.loads(body)
                except (ValueError, RecursionError):  # a login page or a proxy's answer: never show its text
                    raise AuthError(f"token endpoint {url} answered something that is not JSON",
                                    hint="check --token-url (default: <host>/nbia-api/oauth/token)") from None
        except CLIENT_ERRORS as exc:   # every transport failure of the token request, resets included
            raise RetryableRequestError(f"token request to {url} failed: {type(exc).__name__}", url=url) from None
        if not isinstance(data, dict) or not isinstance(data.get("access_token"), str):
            raise AuthError(f"token endpoint {url} answered without an access_token")
        refresh = data.get("refresh_token") if isinstance(data.get("refresh_token"), str) else None
        SECRETS.add(data["access_token"])  # a server that echoes them back is redacted too
        SECRETS.add(refresh)
        if not _usable_token(data["access_token"]):   # CR/LF or spaces would not fit in a header
            raise AuthError(f"token endpoint {url} answered an access_token that cannot be sent back",
                            hint="the token endpoint is broken or not NBIA's; check --token-url")
        if refresh is not None and not _usable_token(refresh):
            refresh = None   # log in with the password again when the token expires
        expires = as_int(data.get("expires_in")) or 3600
        self._token = _Token(data["access_token"], refresh, time.monotonic() + expires)


class NBIAClient(RetryingClient):
    """Async client for the NBIA v4 query and download endpoints.

    ``on_retry(error)`` is called before each request-level retry (the engine and progress use it).
    The session is injected, so tests and other archives swap the network without touching us.
    """

    def __init__(self, config: Config, session: aiohttp.ClientSession, *,
                 on_retry: Callable[[BaseException], None] | None = None, gate: HostGate | None = None) -> None:
        self.config = config
        self.session = session
        self.auth = TokenAuth(config.auth) if config.auth else None
        self.on_retry = on_retry
        self.gate = gate or HostGate()
        self.requests = 0
        self.retries = 0
        self._rng = random.Random()  # one per client: seeding a Random per request is not free
        #: Set once the server answered IncludeMD5 with 400; from then on getImageWithMD5Hash.
        self.include_md5_refused = False
        #: Set once getMD5HashForImage answered an empty body: the archive gives no MD5 per
        #: instance (v4 as deployed never does), so it is not asked again this run.
        self.instance_md5_absent = False
        self._md5_answered = False
        self._md5_first = anyio.Lock()  # until the first answer, one request at a time

    # ------------------------------------------------------------ routing
    def base_for(self, collection: str | None = None) -> str:
        """NLST lives on its own host; route there only when the user kept the public default."""
        if collection in NLST_COLLECTIONS and self.config.uses_public_default:
            return NLST_API_URL
        return self.config.api_url.rstrip("/")

    def url(self, endpoint: str, params: Mapping[str, str], *, collection: str | None = None) -> str:
        query = urlencode(params)
        return f"{self.base_for(collection)}/{endpoint}" + (f"?{query}" if query else "")

    # ------------------------------------------------------------ retry plumbing
    def _request(self, url: str, *, accept: str, timeout: aiohttp.ClientTimeout | None = None
                 ) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """One GET through ``harvester.source.http.request`` with this client's token (refreshed
        once on 401) or no credentials; every failure classified, no retry here."""
        return request(self, url, accept=accept, auth=self.auth or StaticAuth(), timeout=timeout)

    # ------------------------------------------------------------ queries
    async def query(self, endpoint: str, params: Mapping[str, Any] | None = None, *,
                    collection: str | None = None) -> list[dict[str, Any]]:
        """GET a JSON query endpoint; returns its rows (dicts; any key may be missing).

        Only parameter names listed for the endpoint in the API page are accepted (the
        public v4 API answers 400 to anything else; we raise ``UsageError`` before sending),
        and ``None`` values are dropped.
        """
        allowed = QUERY_ENDPOINTS.get(endpoint)
        if allowed is None:
            raise UsageError(f"unknown endpoint {endpoint!r}", hint=f"one of: {', '.join(QUERY_ENDPOINTS)}")
        clean = {k: str(v) for k, v in (params or {}).items() if v is not None and v != ""}
        bad = [k for k in clean if k not in allowed]
        if bad:
            raise UsageError(
                f"{endpoint} takes no parameter {bad[0]!r}",
                hint=f"allowed: {', '.join(allowed) or 'none'} (names are case-sensitive)")
        url = self.url(endpoint, clean, collection=collection or clean.get("Collection"))
        async for attempt in self.retrying():
            with attempt:
                return await self._get_json(url, endpoint)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _get_json(self, url: str, endpoint: str) -> list[dict[str, Any]]:
        shown = redact_url(url)
        cap = self.config.max_json_bytes
        async with self._request(url, accept="application/json") as resp:
            guard = BodyGuard(self.config, shown, max_bytes=cap, too_big=json_too_big(shown, cap))
            if endpoint == "getMD5HashForImage":
                body = await read_guarded(resp, guard)
                return [{"MD5Hash": body.decode("ascii", "replace").strip()}]
            rows = RowStream(shown)
            async for chunk in resp.content.iter_any():
                guard.feed(len(chunk))
                rows.feed(chunk)
        return rows.finish()

    async def collections(self) -> list[str]:
        rows = await self.query("getCollectionValues")
        return sorted({str(r["Collection"]) for r in rows if r.get("Collection")})

    async def series_size(self, series_uid: str, *, collection: str | None = None) -> tuple[int | None, int | None]:
        """(ObjectCount, TotalSizeInBytes) from getSeriesSize; either may be None."""
        rows = await self.query("getSeriesSize", {"SeriesInstanceUID": series_uid}, collection=collection)
        if not rows:
            return None, None
        return as_int(rows[0].get("ObjectCount")), as_int(rows[0].get("TotalSizeInBytes"))

    # ------------------------------------------------------------ downloads
    def series_url(self, series_uid: str, collection: str | None) -> str:
        """getImage with TCIA-style names and md5hashes.csv, or getImageWithMD5Hash (no LICENSE,
        ``00000001.dcm`` names) once this server refused ``IncludeMD5``."""
        if self.include_md5_refused:
            return self.url("getImageWithMD5Hash", {"SeriesInstanceUID": series_uid}, collection=collection)
        return self.url("getImage", {"SeriesInstanceUID": series_uid, "NewFileNames": "Yes",
                                     "IncludeMD5": "yes"}, collection=collection)

    @staticmethod
    def _refuses_include_md5(exc: PermanentRequestError) -> bool:
        """The 400 of a v4 build that predates IncludeMD5: "Invalid query parameter: 'IncludeMD5'..."."""
        return exc.status == 400 and "IncludeMD5" in str(exc)

    @contextlib.asynccontextmanager
    async def open_series(self, series_uid: str, collection: str | None) -> AsyncIterator[aiohttp.ClientResponse]:
        """Open the ZIP stream for one series (one attempt; the caller retries). The request has
        no idle read timeout of aiohttp's (``streaming_timeout``): the caller keeps one
        (``harvester.source.http.IdleWatch``), as ``stream_series_zip`` does.

        Raises ``RetryableRequestError`` when the body is an error page (HTML or text)
        instead of a ZIP, and the classified errors of any request.
        """
        async with contextlib.AsyncExitStack() as stack:
            try:
                resp = await stack.enter_async_context(self._open_zip(self.series_url(series_uid, collection)))
            except PermanentRequestError as exc:
                if self.include_md5_refused or not self._refuses_include_md5(exc):
                    raise
                self.include_md5_refused = True
                resp = await stack.enter_async_context(self._open_zip(self.series_url(series_uid, collection)))
            yield resp

    @contextlib.asynccontextmanager
    async def _open_zip(self, url: str) -> AsyncIterator[aiohttp.ClientResponse]:
        # without aiohttp's idle read timeout: the reader keeps it (``stream_series_zip``'s IdleWatch)
        async with self._request(url, accept="application/zip, application/octet-stream",
                                 timeout=streaming_timeout(self.config)) as resp:
            ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if ctype.startswith("text/") or ctype in ("application/json", "application/xhtml+xml"):
                text = (await resp.content.read(2048)).decode("utf-8", "replace")
                raise RetryableRequestError(
                    f"{redact_url(url)} sent {ctype} instead of a ZIP: {one_line(text)}", url=redact_url(url))
            yield resp

    def annotated_series_url(self, series_uid: str, collection: str | None) -> str:
        """v1 getDCMImage with ``IncludeAnnotation=true``: the one NBIA endpoint that serves a
        series' annotation files (docs/annotations.md). ``v1`` replaces the version at the end
        of the base URL (a base without one is used as it is)."""
        base = self.base_for(collection)
        head, _, last = base.rpartition("/")
        if head and re.fullmatch(r"v[0-9]+", last):
            base = f"{head}/v1"
        query = urlencode({"SeriesInstanceUID": series_uid, "IncludeAnnotation": "true"})
        return f"{base}/getDCMImage?{query}"

    @contextlib.asynccontextmanager
    async def open_annotated_series(self, series_uid: str, collection: str | None
                                    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Open the getDCMImage ZIP of a series with its annotation files (one attempt; the
        caller retries). Raises as ``open_series`` does."""
        async with self._open_zip(self.annotated_series_url(series_uid, collection)) as resp:
            yield resp

    async def sop_uids(self, series_uid: str, collection: str | None) -> list[str]:
        """The series' SOPInstanceUIDs (getSOPInstanceUIDs), in the archive's order, as strings;
        rows without one are dropped (the caller checks the count against the plan's)."""
        rows = await self.query("getSOPInstanceUIDs", {"SeriesInstanceUID": series_uid}, collection=collection)
        return [str(r["SOPInstanceUID"]) for r in rows if r.get("SOPInstanceUID")]

    async def instance_md5(self, sop_uid: str, collection: str | None) -> str:
        """The archive's MD5 of one instance (getMD5HashForImage), lower-case hex, or ``""`` when
        it has none. Raises ``RetryableRequestError`` for an answer that is neither.

        The v4 handler of NBIA-TCIA (``V4_getMD5HashForImage``) allows only the parameter
        ``SOPInstanceUID`` (any other is HTTP 400) but reads ``@QueryParam("SOPInstanceUid")``,
        so it answers an empty body to every request; v1/v2 ignore unknown parameters and read
        ``SOPInstanceUid``. So v4 is sent ``SOPInstanceUID``, the others ``SOPInstanceUid``, and
        after the first empty answer no instance of this run is asked again (one request, not one
        per instance): such instances are checked by count, sizes, DICOM, series and SOP UID, and
        recorded ``md5_source: computed``, as a ZIP's rows without an MD5 are."""
        if not self._md5_answered:
            async with self._md5_first:  # the instances of every series in flight would all ask at once
                if not self._md5_answered:
                    md5 = await self._instance_md5(sop_uid, collection)
                    self._md5_answered = True
                    return md5
        return "" if self.instance_md5_absent else await self._instance_md5(sop_uid, collection)

    async def _instance_md5(self, sop_uid: str, collection: str | None) -> str:
        version = self.config.api_url.rstrip("/").rsplit("/", 1)[-1]
        name = "SOPInstanceUID" if version == "v4" else "SOPInstanceUid"
        rows = await self.query("getMD5HashForImage", {name: sop_uid}, collection=collection)
        md5 = str(rows[0].get("MD5Hash", "")).strip().lower() if rows else ""
        if not md5:
            self.instance_md5_absent = True
        elif not re.fullmatch(r"[0-9a-f]{32}", md5):
            raise RetryableRequestError(f"getMD5HashForImage of {sop_uid} answered something that is not an MD5: "
                                        f"{one_line(md5[:60])}")
        return md5

    def single_image_url(self, series_uid: str, sop_uid: str, collection: str | None) -> str:
        return self.url("getSingleImage", {"SeriesInstanceUID": series_uid, "SOPInstanceUID": sop_uid},
                        collection=collection)

    def open_single_image(self, series_uid: str, sop_uid: str, collection: str | None
                          ) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """Open one instance's body (getSingleImage; one attempt, the caller retries and reads
        it under a ``BodyGuard``). Raises the classified errors of any request, those raised
        while the caller reads inside the ``async with`` included."""
        return self._request(self.single_image_url(series_uid, sop_uid, collection), accept="application/dicom")

    async def single_image_into(self, series_uid: str, sop_uid: str, collection: str | None, into: InstanceTarget,
                                *, hold: Callable[[], contextlib.AbstractAsyncContextManager[Any]] | None = None) -> int:
        """One instance via getSingleImage (to repair a single bad file), poured into ``into`` in
        worker-thread calls of ``INSTANCE_BATCH_BYTES`` as it arrives, so it is never held whole;
        each attempt ``restart``s it. Returns its size. ``hold()``, when given, is entered around
        each attempt only (a connection of the engine's), so a back-off between attempts holds
        none."""
        shown = redact_url(self.single_image_url(series_uid, sop_uid, collection))
        async for attempt in self.retrying():
            with attempt:
                async with hold() if hold is not None else contextlib.nullcontext():
                    await anyio.to_thread.run_sync(into.restart)
                    guard = BodyGuard(self.config, shown, max_bytes=self.config.limits.max_entry_bytes)
                    pending: list[bytes] = []
                    held = 0
                    async with self.open_single_image(series_uid, sop_uid, collection) as resp:
                        async for chunk in resp.content.iter_chunked(max(1, self.config.chunk_size // 2)):
                            guard.feed(len(chunk))
                            pending.append(chunk)
                            held += len(chunk)
                            if held >= INSTANCE_BATCH_BYTES:
                                ours = time.monotonic()   # the disk's time, not the server's
                                await anyio.to_thread.run_sync(into.write_all, pending)
                                pending, held = [], 0
                                guard.credit(time.monotonic() - ours)
                    await anyio.to_thread.run_sync(into.write_all, pending)
                    return guard.total
        raise AssertionError("unreachable")  # pragma: no cover


def json_rows(body: bytes, shown: str) -> list[dict[str, Any]]:
    """The rows of a whole JSON answer: an empty body or ``null`` is none, an object is one, a list
    keeps its objects. Raises ``RetryableRequestError`` for an answer that is not JSON, not UTF-8 or
    not a list, ``PermanentRequestError`` for JSON nested too deep (``parse_json``)."""
    if not body.strip():
        return []  # NBIA answers an empty body (not "[]") when nothing matches
    data = parse_json(body, shown)  # an outage page with HTTP 200 is a transient failure, not data
    if data is None:
        return []  # a JSON null: no rows, as the empty body
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise RetryableRequestError(f"{shown} answered JSON that is not a list", url=shown)
    return [row for row in data if isinstance(row, dict)]


#: Row values that are unique to their row (never shared with another, so never memoised).
_UNIQUE_FIELDS = frozenset({"SeriesInstanceUID", "SOPInstanceUID"})
_SPACE = frozenset(" \t\r\n")
_UTF8_BOM = b"\xef\xbb\xbf"
_NUMBER_CHARS = "0123456789+-.eE"


class RowStream:
    """The rows of a JSON answer, parsed as its bytes arrive (``feed``, then ``finish``).

    An answer that is a JSON array (every NBIA query answer with rows) is decoded element by
    element, so the whole text and the whole parsed list are never held at once (NLST's getSeries
    is one array of about 205,000 rows, some 130 MB of text); each object becomes a row whose
    repeated values (Collection, Modality, dates, StudyInstanceUID, ...) are one string object
    per answer instead of one per row, and whose keys are one per chunk of rows (the whole rows
    of each chunk are decoded by one call of the C scanner, whose memo shares their keys; one
    call per row cost twice as much as reading the answer whole). Anything else (an empty body, ``null``, one
    object, UTF-16, a BOM) is gathered and read whole by ``json_rows``, as before.

    Invariant: the rows and errors are those of ``json_rows`` on the whole body. A cut element is
    decoded again only once the text after its start has doubled, so a hostile giant element
    costs linear time, not quadratic. ``feed`` and ``finish`` raise as ``json_rows`` does.
    """

    def __init__(self, shown: str) -> None:
        self.shown = shown
        self.rows: list[dict[str, Any]] = []
        self._raw: list[bytes] | None = []   # the body while not yet known to be an array, or not one
        self._streaming = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogatepass")
        self._text = ""
        self._expect = "first"   # first (an element or ']'), item, next (',' or ']'), end
        self._retry_at = 0
        self._head = b""         # the first bytes, for the message of an answer that is not JSON
        self._memo: dict[str, str] = {}
        self._scan = json.JSONDecoder().raw_decode

    def feed(self, chunk: bytes) -> None:
        if len(self._head) < 300:
            self._head += chunk[:300 - len(self._head)]
        if not self._streaming:
            assert self._raw is not None
            self._raw.append(chunk)
            start = self._head.lstrip(b" \t\r\n")
            if not start or len(self._head) < 4:
                return  # (undecided: only white space so far, or too few bytes to tell UTF-16)
            if start[:1] != b"[" or self._head.startswith(_UTF8_BOM) or b"\x00" in self._head[:4]:
                return  # not an array of UTF-8 text: read whole at the end
            chunk, self._raw, self._streaming = b"".join(self._raw), None, True
            self._text = self._decode(chunk).lstrip()[1:]
        else:
            self._text += self._decode(chunk)
        self._parse(final=False)

    def finish(self) -> list[dict[str, Any]]:
        if not self._streaming:
            return json_rows(b"".join(self._raw or ()), self.shown)
        self._text += self._decode(b"", final=True)
        self._parse(final=True)
        if self._expect != "end":
            raise self._not_json()
        return self.rows

    def _decode(self, data: bytes, final: bool = False) -> str:
        try:
            return self._decoder.decode(data, final)
        except UnicodeDecodeError:
            raise RetryableRequestError(f"{self.shown} answered JSON that is not valid UTF-8", url=self.shown) from None

    def _not_json(self) -> RetryableRequestError:
        return RetryableRequestError(f"{self.shown} answered something that is not JSON: "
                                     f"{one_line(self._head.decode('utf-8', 'replace'))}", url=self.shown)

    def _parse(self, *, final: bool) -> None:
        text, pos = self._text, 0
        whole_rows = True
        while True:
            while pos < len(text) and text[pos] in _SPACE:
                pos += 1
            if pos == len(text):
                break
            if self._expect == "end":
                raise self._not_json()   # (text after the array)
            if self._expect == "next" or (self._expect == "first" and text[pos] == "]"):
                if text[pos] == "]":
                    self._expect = "end"
                elif text[pos] == "," and self._expect == "next":
                    self._expect = "item"
                else:
                    raise self._not_json()
                pos += 1
                continue
            if not final and len(text) < self._retry_at:
                break
            if whole_rows:
                pos = self._take_whole_elements(text, pos)
                if self._expect == "next":
                    continue
                whole_rows = False   # not whole rows up to the last '}': one by one from here, not tried again
            try:
                value, end = self._scan(text, pos)
            except RecursionError:
                raise PermanentRequestError(f"{self.shown} answered JSON nested too deep to read", url=self.shown,
                                            hint="the server's answer is hostile or broken; report it") from None
            except ValueError:
                if final:
                    raise self._not_json() from None
                self._retry_at = pos + 2 * (len(text) - pos) + 1
                break
            if not final and text[pos] not in '{["' and not text[end:].strip(_NUMBER_CHARS):
                self._retry_at = len(text) + 1   # a number cut at the chunk's end ("1.5e" + "+16")
                break
            if isinstance(value, dict):
                self.rows.append(self._compact(value))
            pos, self._expect = end, "next"
        # consumed text is dropped at once: what is left is at most one element, cut
        self._text, self._retry_at = text[pos:], max(0, self._retry_at - pos)

    def _take_whole_elements(self, text: str, pos: int) -> int:
        """Decode every element from ``pos`` to the text's last ``}`` with one call of the C
        scanner, as the array they would be with brackets around them; the end of text just after
        the elements; ``pos`` when they are not whole elements (that ``}`` is inside a string or
        an object, or the text is not JSON), which the element-by-element path then reads.

        One call for all the whole rows of a chunk instead of one per row: the scanner's own memo
        makes their keys one string object per call, and only the repeated values are shared
        here, in place. The rows are those the element-by-element path would give."""
        last = text.rfind("}")
        if last < pos:
            return pos
        wrapped = "[" + text[pos:last + 1] + "]"
        try:
            values, end = self._scan(wrapped, 0)
        except (ValueError, RecursionError):
            return pos
        if end != len(wrapped):   # a ']' in the text closed the array early ('{..}],[{..}'): not elements
            return pos
        memo, rows = self._memo, self.rows
        for row in values:
            if row.__class__ is dict:
                for key, value in row.items():   # (values replaced in place: the keys stay as they are)
                    if value.__class__ is str and key not in _UNIQUE_FIELDS:
                        row[key] = memo.setdefault(value, value)
                rows.append(row)
        self._expect = "next"
        return last + 1

    def _compact(self, row: dict[str, Any]) -> dict[str, Any]:
        memo = self._memo
        out: dict[str, Any] = {}
        for key, value in row.items():
            key = memo.setdefault(key, key)
            if isinstance(value, str) and key not in _UNIQUE_FIELDS:
                value = memo.setdefault(value, value)
            out[key] = value
        return out


LICENSE_FIELD_MAX = 2000  # characters of each license column kept (rows are untrusted)


def license_from_row(row: Mapping[str, Any] | None) -> str | None:
    """The license of a series from its getSeries row (LicenseName, LicenseURI), in the form of
    getImage's LICENSE entry; None when the row names neither."""
    row = row or {}
    parts = [str(row[key]).strip()[:LICENSE_FIELD_MAX] for key in ("LicenseName", "LicenseURI") if row.get(key)]
    return "".join(f"{part}\n" for part in parts if part) or None


__all__ = ["NBIAClient", "TokenAuth", "HostGate", "make_session", "redact_url", "as_int",
           "parse_retry_after", "QUERY_ENDPOINTS", "RequestError"]
