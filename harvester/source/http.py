"""HTTP plumbing shared by every source: one session, one request path, one retry policy,
classification of failures.

``request`` is the one GET every client sends (NBIA's and DICOMweb's): auth is a strategy
(``Auth``: ``StaticAuth`` for fixed credentials, ``harvester.source.nbia.client.TokenAuth``
refreshes its token once on 401), then the host gate, the redirect policy and the status
checks; ``RetryingClient.retrying`` is the request-level retry policy around it.
``raise_for_status`` and ``classify_client_error`` turn responses and aiohttp exceptions into
the classes of ``harvester.errors`` (retry the request, retry the series, fail it, stop): no
exception of aiohttp escapes a request unclassified. ``BackoffWait`` is the tenacity wait
(Retry-After first, else exponential backoff with full jitter); ``HostGate`` makes one
Retry-After pause every request to the host, up to ``config.max_retry_after`` seconds (a longer
wait, ``inf``, ``nan`` or a date in 9999 is not honoured: the request fails with the reason and
the series is tried again later). ``get_following`` follows redirects itself: same origin only
(unless ``config.cross_origin_redirects``, and then https only; http to https on the same host
is the same server), never to another scheme, never from https to http. ``BodyGuard`` bounds
every body as it arrives: a size cap (counted after decompression), a per-request deadline and
a minimum throughput, on top of aiohttp's idle read timeout. ``parse_json`` never raises
``RecursionError``. Messages name the URL through ``redact_url`` and quote server text only
through ``harvester.redact.excerpt``.
"""
from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import math
import random
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp
import anyio
from aiohttp import http_exceptions
from aiohttp.helpers import get_env_proxy_for_url
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from yarl import URL

from harvester.config import Config
from harvester.errors import (
    AuthError,
    HarvesterError,
    PermanentRequestError,
    RetryableRequestError,
    ServerBusyError,
    should_retry_request,
)
from harvester.redact import SECRETS, excerpt, is_secret_param
from harvester.units import as_int  # noqa: F401  (re-exported: every source parses counts with it)

#: transport failures worth another attempt (resets, broken bodies, stalls)
TRANSPORT_ERRORS = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError,
                    asyncio.TimeoutError, ConnectionError)

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
REDIRECT_STATUS = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 10


def redact_url(url: str) -> str:
    """The URL without user info or secret-looking query parameters, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<url>"
    netloc = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:   # out of range or not a number: shown as given, never a traceback
        port = parts.netloc.rpartition("@")[2].rpartition(":")[2]
    if port:
        netloc += f":{port}"
    query = "&".join(
        (kv if not is_secret_param(kv.split("=", 1)[0]) else kv.split("=", 1)[0] + "=***")
        for kv in parts.query.split("&") if kv
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date); None when absent or not a number
    or date; ``math.inf`` when it cannot be honoured (``inf``, ``nan``, negative, absurd), which
    is past any cap. An HTTP date in the past is 0."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if 0 <= seconds < 1e12 else math.inf  # nan fails both comparisons
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def one_line(text: str, limit: int = 200) -> str:
    """Server text for a message: one line, bounded, redacted (``harvester.redact.excerpt``)."""
    return excerpt(text, limit)


class BackoffWait:
    """tenacity wait: the server's Retry-After when it gave one, else exponential backoff with full jitter."""

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        self.base, self.cap = base, cap
        self.rng = rng or random.Random()

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(float(retry_after), max(self.cap, 1.0) * 5)
        ceiling = min(self.cap, self.base * (2 ** (state.attempt_number - 1)))
        return self.rng.uniform(ceiling / 2, ceiling)


class HostGate:
    """A shared 'not before' time: one 429 with Retry-After pauses every request to the host."""

    def __init__(self) -> None:
        self._not_before = 0.0

    def push(self, seconds: float) -> None:
        self._not_before = max(self._not_before, time.monotonic() + seconds)

    async def wait(self) -> None:
        delay = self._not_before - time.monotonic()
        if delay > 0:
            await anyio.sleep(delay)


def make_session(config: Config) -> aiohttp.ClientSession:
    """One session for the whole run: connection limit, separate connect/read timeouts, a total
    deadline per request (``config.request_deadline``: it also bounds a server that dribbles its
    headers), proxies from the environment (``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY``, see
    ``env_proxy``), TLS verified (aiohttp's default). Registers the secrets of the configuration
    with the redactor.

    The session does not trust the environment itself (``trust_env=False``): aiohttp would then
    read ~/.netrc and the proxy variables in two worker-thread calls per request, which for a
    series of small files cost more CPU than the request. Proxies are looked up once per host
    and session instead (``env_proxy``), and ~/.netrc is not read for the archive's credentials
    (they come from the harvester's own options; a netrc entry for the API host made aiohttp
    refuse every request that carried a token)."""
    register_config_secrets(config)
    connector = aiohttp.TCPConnector(limit=config.connections, limit_per_host=config.connections,
                                     enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(total=config.request_deadline, connect=config.connect_timeout,
                                    sock_connect=config.connect_timeout, sock_read=config.read_timeout)
    session = aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                    headers={"User-Agent": config.user_agent}, raise_for_status=False,
                                    auto_decompress=True)
    _ENV_PROXIES[session] = {}
    return session


#: the sessions of ``make_session``, each with its proxies found so far: (scheme, host) -> the
#: keyword arguments of a request (``{}`` when the environment names no proxy for it)
_ENV_PROXIES: weakref.WeakKeyDictionary[aiohttp.ClientSession, dict[tuple[str, str], dict[str, Any]]] = \
    weakref.WeakKeyDictionary()


def env_proxy(session: aiohttp.ClientSession, url: URL | str) -> dict[str, Any]:
    """The proxy keyword arguments (``proxy``, its credentials in its URL) for a request of ``session`` to
    ``url``, as aiohttp's ``trust_env`` would find them (the proxy variables, ``NO_PROXY``, the
    proxy's credentials from ~/.netrc), looked up once per scheme and host and kept with the
    session; ``{}`` for a session not made by ``make_session`` (it has its own settings)."""
    found = _ENV_PROXIES.get(session)
    if found is None:
        return {}
    try:
        url = URL(url) if isinstance(url, str) else url
        key = (url.scheme, url.host or "")
    except (ValueError, TypeError):
        return {}   # aiohttp refuses the URL itself, classified where the request is sent
    kwargs = found.get(key)
    if kwargs is None:
        try:
            proxy, proxy_auth = get_env_proxy_for_url(url)
            if proxy_auth is not None:  # in the proxy's URL: ``proxy_auth`` is deprecated in aiohttp 3.14, gone in 4
                proxy = proxy.with_user(proxy_auth.login).with_password(proxy_auth.password)
                SECRETS.add(proxy_auth.password, user=proxy_auth.login)   # an error may show the proxy's URL
            kwargs = {"proxy": proxy}   # as aiohttp's trust_env passes them
        except LookupError:
            kwargs = {}
        found[key] = kwargs
    return kwargs


def register_config_secrets(config: Config) -> None:
    """Tell the redactor every secret ``config`` holds: the password, a fixed bearer token, and
    the password of a ``user:password@`` API or token URL."""
    if config.auth is not None:
        SECRETS.add(config.auth.password, user=config.auth.username)
    SECRETS.add(config.bearer_token)
    for url in (config.api_url, config.auth.token_url if config.auth else ""):
        try:
            parts = urlsplit(url)
            SECRETS.add(parts.password, user=parts.username)
            if parts.password is not None:   # what aiohttp sends: the percent-decoded pair
                SECRETS.add(unquote(parts.password), user=unquote(parts.username or ""))
        except ValueError:
            pass


def transport_error(exc: BaseException, shown: str) -> RetryableRequestError:
    """The retryable error for a transport failure of a request to ``shown`` (a redacted URL);
    a timeout is marked ``overload`` for the engine's adaptive concurrency."""
    timed_out = isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError))
    if timed_out:
        what = f"timed out (no data, or past the deadline per request) waiting for {shown}"
    elif isinstance(exc, aiohttp.ClientPayloadError) and "encoding" in str(exc).lower():
        what = f"{shown} sent a body whose Content-Encoding cannot be decoded"
    elif isinstance(exc, aiohttp.ClientPayloadError):
        what = f"connection broke mid-response from {shown}"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        what = f"cannot connect to {shown}"
    elif isinstance(exc, (aiohttp.ServerDisconnectedError, ConnectionResetError)):
        what = f"connection reset by {shown}"
    else:
        what = f"network error ({type(exc).__name__}) from {shown}"
    return RetryableRequestError(what, url=shown, timed_out=timed_out)


#: every exception a request can raise outside the classified set (``classify_client_error``)
CLIENT_ERRORS = (aiohttp.ClientError, http_exceptions.HttpProcessingError, asyncio.TimeoutError,
                 ConnectionError, UnicodeError)


def classify_client_error(exc: BaseException, shown: str) -> HarvesterError:
    """The classified error for any exception of ``CLIENT_ERRORS`` met by a request to ``shown``.

    Redirect trouble and URLs aiohttp refuses fail the request for good
    (``PermanentRequestError``); a response that breaks HTTP (headers past aiohttp's line limit,
    a malformed status line) is retried like a reset; transport failures go to
    ``transport_error``.
    """
    if isinstance(exc, aiohttp.TooManyRedirects):
        return PermanentRequestError(f"{shown} redirects in a loop (more than {MAX_REDIRECTS} redirects)",
                                     url=shown, hint="check the URL; the server's redirects go round in circles")
    if isinstance(exc, (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError, aiohttp.RedirectClientError)):
        return PermanentRequestError(f"{shown}: the server sent an unusable URL ({type(exc).__name__})", url=shown,
                                     hint="check the URL; only http and https are followed")
    if isinstance(exc, (http_exceptions.HttpProcessingError, aiohttp.ClientResponseError)) and not isinstance(
            exc, aiohttp.ClientConnectionError):
        status = getattr(exc, "status", None) or getattr(exc, "code", None)
        if "encoding" in str(exc).lower():
            return RetryableRequestError(f"{shown} sent a body whose Content-Encoding cannot be decoded", url=shown,
                                         hint="the server or a proxy is broken; run again later")
        kind = "headers too long" if "too long" in str(exc).lower() or "more than" in str(exc).lower() else (
            "a malformed response")
        return RetryableRequestError(f"{shown} sent {kind} (HTTP {status or '?'}: not a valid HTTP answer)",
                                     url=shown, hint="the server or a proxy is broken; run again later")
    if isinstance(exc, UnicodeError):
        return RetryableRequestError(f"{shown} sent text that is not valid UTF-8", url=shown)
    return transport_error(exc, shown)


def _origin(url: URL) -> tuple[str, str, int | None]:
    return (url.scheme.lower(), (url.host or "").lower(), url.port)


def _same_server(current: URL, target: URL) -> bool:
    """The same origin, or the step up from http to https on the same host (the server moving
    its own URL to TLS): credentials may follow."""
    if _origin(current) == _origin(target):
        return True
    return (current.scheme.lower() == "http" and target.scheme.lower() == "https"
            and (current.host or "").lower() == (target.host or "").lower())


def check_redirect(current: URL, location: str, *, cross_origin: bool, shown: str) -> URL:
    """The URL a redirect from ``current`` to ``location`` leads to, if the policy allows it.

    Raises ``PermanentRequestError`` for an invalid target, a scheme other than http(s), a step
    down from https to http, and (unless ``cross_origin``, which still demands https) another
    origin; the step up from http to https on the same host is the same server, and allowed."""
    try:
        target = current.join(URL(location.strip()))
        scheme = target.scheme.lower()
        host = target.host
    except (ValueError, TypeError):
        raise PermanentRequestError(f"{shown} redirects to an invalid URL", url=shown,
                                    hint="the server's redirect is broken; report it") from None
    if scheme not in ("http", "https") or not host:
        raise PermanentRequestError(f"{shown} redirects to a {scheme or 'scheme-less'}: URL, which is never followed",
                                    url=shown, hint="only http and https redirects are followed")
    if current.scheme.lower() == "https" and scheme != "https":
        raise PermanentRequestError(f"{shown} redirects from https to http, which is never followed", url=shown,
                                    hint="use the server's https URL; a downgrade would expose the data")
    if target.user is not None or target.password is not None:
        raise PermanentRequestError(f"{shown} redirects to a URL with credentials in it, which is never followed",
                                    url=shown, hint="the server's redirect is broken; report it")
    if not _same_server(current, target) and not (cross_origin and scheme == "https"):
        raise PermanentRequestError(
            f"{shown} redirects to another host ({redact_url(str(target.origin()))}), which is not followed by default",
            url=shown, hint="give that URL directly, or allow https redirects to other hosts with "
                            "--allow-cross-origin-redirects")
    return target


@contextlib.asynccontextmanager
async def get_following(session: aiohttp.ClientSession, url: str, *, headers: Mapping[str, str], config: Config,
                        shown: str, timeout: aiohttp.ClientTimeout | None = None
                        ) -> AsyncIterator[aiohttp.ClientResponse]:
    """GET ``url``, following redirects under ``check_redirect``'s policy (at most
    ``MAX_REDIRECTS``); credentials are never sent to another origin. Yields the final response.
    Raises ``PermanentRequestError`` for a refused redirect or a loop; aiohttp errors propagate.
    ``timeout`` replaces the session's for this request (``streaming_timeout``)."""
    current: URL | str = url
    sent = dict(headers)
    extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    for _ in range(MAX_REDIRECTS + 1):
        async with session.get(current, headers=sent, allow_redirects=False,
                               **env_proxy(session, current), **extra) as resp:
            location = resp.headers.get("Location")
            if resp.status not in REDIRECT_STATUS or location is None:
                yield resp
                return
            target = check_redirect(resp.url, location, cross_origin=config.cross_origin_redirects, shown=shown)
            if not _same_server(resp.url, target):
                sent = {k: v for k, v in sent.items() if k.lower() != "authorization"}
        current = target
    raise PermanentRequestError(f"{shown} redirects in a loop (more than {MAX_REDIRECTS} redirects)", url=shown,
                                hint="check the URL; the server's redirects go round in circles")


async def raise_for_status(resp: aiohttp.ClientResponse, shown: str, *, max_retry_after: float = 300.0) -> None:
    """Nothing for HTTP 200; else the classified error, with a bounded, redacted excerpt of the
    server's text. A Retry-After past ``max_retry_after`` (or unusable) raises
    ``ServerBusyError``: not retried on that wait, the series is tried again later."""
    if resp.status == 200:
        return
    try:
        text = (await resp.content.read(4096)).decode("utf-8", "replace")
    except (aiohttp.ClientError, asyncio.TimeoutError):
        text = ""
    if resp.status in RETRYABLE_STATUS:
        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        if retry_after is not None and retry_after > max_retry_after:
            wait = f"{retry_after:.0f} s" if math.isfinite(retry_after) else "an unusable time"
            raise ServerBusyError(
                f"HTTP {resp.status} from {shown} asks to wait {wait}, past the {max_retry_after:g} s cap on "
                "Retry-After (--max-retry-after)", status=resp.status, url=shown)
        raise RetryableRequestError(f"HTTP {resp.status} from {shown}", status=resp.status, url=shown,
                                    retry_after=retry_after)
    if resp.status == 401:
        raise AuthError(f"HTTP 401 from {shown}: the server wants credentials")
    raise PermanentRequestError(f"HTTP {resp.status} from {shown}: {one_line(text) or 'no message'}",
                                status=resp.status, url=shown)


class BodyGuard:
    """Bounds one response body as its (decompressed) bytes arrive; ``feed(n)`` after each chunk.

    * more than ``max_bytes`` in total: raises what ``too_big(total)`` returns;
    * past ``config.request_deadline`` seconds since ``started``: ``RetryableRequestError``;
    * fewer than ``config.stall_min_bytes`` in a window of ``config.stall_window`` seconds: a
      stall (``RetryableRequestError``, marked ``timed_out``), so a server dribbling a byte a
      second, which the idle read timeout never catches, is cut off.
    Time the reader spends on its own side is ``credit``ed back, so that ``--max-rate`` or a
    slow disk never makes a healthy server look stalled. ``clock`` is injectable for unit tests.
    """

    def __init__(self, config: Config, shown: str, *, max_bytes: int | None = None,
                 too_big: Callable[[int], HarvesterError] | None = None, started: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.shown, self.max_bytes, self.clock = shown, max_bytes, clock
        self.too_big = too_big or (lambda total: PermanentRequestError(
            f"{shown} sent more than {max_bytes} bytes, the cap on one answer", url=shown))
        self.deadline, self.window = config.request_deadline, config.stall_window
        self.min_bytes = config.stall_min_bytes
        self.started = clock() if started is None else started
        self.total = 0
        self._window_start, self._window_total = self.started, 0

    def credit(self, seconds: float) -> None:
        """Time spent on our side (the bandwidth cap, a slow disk) that is not the server's: the
        window and the deadline are pushed back by it."""
        self.started += seconds
        self._window_start += seconds

    def feed(self, n: int) -> None:
        self.total += n
        if self.max_bytes is not None and self.total > self.max_bytes:
            raise self.too_big(self.total)
        now = self.clock()
        if self.deadline is not None and now - self.started > self.deadline:
            raise RetryableRequestError(
                f"{self.shown} did not finish within the deadline of {self.deadline:g} s per request",
                url=self.shown, timed_out=True, hint="the server is too slow; raise --deadline, or run again later")
        if self.min_bytes and self.window and now - self._window_start >= self.window:
            got = self.total - self._window_total
            if got < self.min_bytes:
                raise RetryableRequestError(
                    f"{self.shown} stalled: {got} bytes in {now - self._window_start:.0f} s (the minimum is "
                    f"{self.min_bytes} bytes per {self.window:g} s)", url=self.shown, timed_out=True,
                    hint="the server is dribbling; run again later, or lower --min-rate for a very slow link")
            self._window_start, self._window_total = now, self.total


def streaming_timeout(config: Config) -> aiohttp.ClientTimeout:
    """The session's timeouts (``make_session``) without aiohttp's idle read timeout, for a body
    whose reader keeps an ``IdleWatch`` instead: aiohttp re-arms a timer on every socket read
    (a cancel and a new heap entry each time: about 4% of the event loop's time when many
    small series stream at once), the watch moves its deadline once per tenth of the timeout."""
    return aiohttp.ClientTimeout(total=config.request_deadline, connect=config.connect_timeout,
                                 sock_connect=config.connect_timeout, sock_read=None)


class IdleWatch:
    """The idle read timeout of one streamed request (``config.read_timeout``; None or 0: none),
    kept by its reader instead of by aiohttp: ``with watch:`` around the request and its body;
    ``watch.ready()`` whenever bytes arrived (the server has ``seconds`` from then for the next);
    ``watch.ours()`` around the reader's own work between reads (the bandwidth cap, the sink's
    thread hop, a slow disk: not the server's silence, never counted). Leaving the ``with``
    after the timeout raises it as ``transport_error`` does (retryable, marked ``timed_out``),
    as aiohttp's ``sock_read`` would have; a cancellation from outside passes through.

    One timer per ``seconds`` of the request, whatever its reads: the timer looks at the time of
    the last ``ready`` when it fires and sets itself again for the time due, where aiohttp
    cancels and schedules one on every socket read (about 4% of the event loop's time when many
    small series stream at once). Event-loop thread only."""

    def __init__(self, seconds: float | None, shown: str) -> None:
        self.seconds = seconds if seconds and seconds > 0 else None
        self.shown = shown
        self.scope = anyio.CancelScope()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._last = 0.0          # loop time of the last ``ready`` (or of the end of our own work)
        self._ours = 0            # nesting of ``ours`` blocks: the server is not waited for meanwhile
        self.timed_out = False

    def __enter__(self) -> IdleWatch:
        self.scope.__enter__()
        if self.seconds is not None:
            self._loop = asyncio.get_running_loop()
            self._last = self._loop.time()
            self._handle = self._loop.call_at(self._last + self.seconds, self._fire)
        return self

    def __exit__(self, *exc: Any) -> bool:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        swallowed = self.scope.__exit__(*exc)
        if self.timed_out and self.scope.cancelled_caught:
            raise transport_error(asyncio.TimeoutError(), self.shown)
        return bool(swallowed)

    def ready(self) -> None:
        """Bytes arrived: the wait for the next ones starts now."""
        if self._loop is not None:
            self._last = self._loop.time()

    @contextlib.contextmanager
    def ours(self) -> Iterator[None]:
        """The reader's own work: not counted, and the wait starts again at its end."""
        self._ours += 1
        try:
            yield
        finally:
            self._ours -= 1
            self.ready()

    def _fire(self) -> None:
        assert self._loop is not None and self.seconds is not None
        now = self._loop.time()
        due = self._last + self.seconds
        if self._ours or now < due:
            self._handle = self._loop.call_at(max(due, now + self.seconds / 10) if self._ours else due, self._fire)
            return
        self._handle = None
        self.timed_out = True
        self.scope.cancel()


async def read_guarded(resp: aiohttp.ClientResponse, guard: BodyGuard) -> bytes:
    """The whole body of ``resp`` under ``guard`` (size cap, deadline, stall rule)."""
    parts: list[bytes] = []
    async for chunk in resp.content.iter_any():
        guard.feed(len(chunk))
        parts.append(chunk)
    return b"".join(parts)


def json_too_big(shown: str, cap: int) -> Callable[[int], HarvesterError]:
    return lambda total: PermanentRequestError(
        f"{shown} answered more than {cap} bytes of JSON, the cap on one answer", url=shown,
        hint="narrow the query, or raise the cap with --max-json-bytes")


def parse_json(body: bytes, shown: str) -> Any:
    """``body`` as JSON. Raises ``RetryableRequestError`` for text that is not JSON or not UTF-8
    (an outage page sent with HTTP 200 is transient) and ``PermanentRequestError`` for JSON
    nested deeper than the parser can go (never ``RecursionError``)."""
    try:
        return json.loads(body)
    except RecursionError:
        raise PermanentRequestError(f"{shown} answered JSON nested too deep to read", url=shown,
                                    hint="the server's answer is hostile or broken; report it") from None
    except UnicodeDecodeError:
        raise RetryableRequestError(f"{shown} answered JSON that is not valid UTF-8", url=shown) from None
    except ValueError:
        raise RetryableRequestError(f"{shown} answered something that is not JSON: "
                                    f"{one_line(body[:300].decode('utf-8', 'replace'))}",
                                    url=shown) from None


class RetryingClient:
    """The request-level retry policy shared by the HTTP clients (tenacity): ``config.retries``
    attempts, ``BackoffWait``, ``should_retry_request``; before each retry the counter goes up,
    a Retry-After pauses the whole host (``gate``) and ``on_retry`` hears the error (its ``str``
    is one line without secrets)."""

    config: Config
    session: aiohttp.ClientSession
    gate: HostGate
    requests: int
    retries: int
    on_retry: Any
    _rng: random.Random | None = None

    def retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(max(1, self.config.retries)),
            wait=BackoffWait(self.config.backoff_base, self.config.backoff_max, self._rng),
            retry=retry_if_exception(should_retry_request),
            before_sleep=self._before_sleep,
            reraise=True,
        )

    def _before_sleep(self, state: RetryCallState) -> None:
        self.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RetryableRequestError) and exc.retry_after:
            self.gate.push(min(exc.retry_after, self.config.max_retry_after))
        if self.on_retry is not None and exc is not None:
            self.on_retry(exc)


class Auth(Protocol):
    """How a client proves who it is (a strategy of ``request``): the headers of a request, and
    what to do when the server answers 401."""

    async def headers(self, session: aiohttp.ClientSession) -> dict[str, str]:
        """The credential headers for the next request (may fetch or refresh a token). Raises
        ``AuthError`` or a classified request error."""
        ...

    async def rejected(self, session: aiohttp.ClientSession, sent: Mapping[str, str]) -> bool:
        """The server answered 401 to a request sent with ``sent``: True when new credentials
        are ready and the request is worth sending once more (a token refreshed), False when
        the answer stands (fixed credentials)."""
        ...


class StaticAuth:
    """Fixed credential headers (HTTP basic, a bearer token given by the user): a 401 stands."""

    def __init__(self, headers: Mapping[str, str] | None = None) -> None:
        self._headers = dict(headers or {})

    def __repr__(self) -> str:
        return f"StaticAuth({sorted(self._headers)})"  # the names, never the values

    async def headers(self, session: aiohttp.ClientSession) -> dict[str, str]:
        return dict(self._headers)

    async def rejected(self, session: aiohttp.ClientSession, sent: Mapping[str, str]) -> bool:
        return False


@contextlib.asynccontextmanager
async def request(client: RetryingClient, url: str, *, accept: str, auth: Auth,
                  ok: Sequence[int] = (200,), timeout: aiohttp.ClientTimeout | None = None
                  ) -> AsyncIterator[aiohttp.ClientResponse]:
    """One GET of ``client`` (its session, host gate, counters and config) with ``auth``'s
    headers, the redirect policy of ``get_following`` (credentials never go to another origin)
    and the status checks of ``raise_for_status`` for any status outside ``ok``. A 401 that
    ``auth.rejected`` answers True is sent once more with the new credentials; a 401 to that is
    ``AuthError``. No retry here (``RetryingClient.retrying`` is the policy around it).
    ``timeout`` replaces the session's timeouts for this request (``streaming_timeout``).

    Every failure leaves classified, those of the request sent again after a 401 and those
    raised inside the caller's ``async with`` body included: no aiohttp exception escapes.
    """
    await client.gate.wait()
    shown = redact_url(url)
    client.requests += 1
    session = client.session
    try:
        for again in (False, True):
            headers = {**(await auth.headers(session)), "Accept": accept}
            async with get_following(session, url, headers=headers, config=client.config, shown=shown,
                                     timeout=timeout) as resp:
                if resp.status == 401 and not again and await auth.rejected(session, headers):
                    continue   # new credentials: the same request once more
                if resp.status == 401 and again:
                    raise AuthError(f"the server rejected the credentials for {shown} (HTTP 401)")
                if resp.status not in ok:
                    await raise_for_status(resp, shown, max_retry_after=client.config.max_retry_after)
                yield resp
                return
    except CLIENT_ERRORS as exc:
        raise classify_client_error(exc, shown) from None
