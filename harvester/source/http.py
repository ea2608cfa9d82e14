"""HTTP plumbing shared by every source: one session, retry timing, classification of failures.

``raise_for_status`` and ``transport_error`` turn responses and aiohttp exceptions
into the classes of ``harvester.errors`` (retry the request or not); ``BackoffWait`` is the
tenacity wait (Retry-After first, else exponential backoff with full jitter); ``HostGate``
makes one Retry-After pause every request to the host. ``redact_url`` is applied to every URL
that reaches a message.
"""
from __future__ import annotations

import asyncio
import email.utils
import random
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import anyio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from harvester.config import Config
from harvester.errors import AuthError, PermanentRequestError, RetryableRequestError, should_retry_request

#: transport failures worth another attempt (resets, broken bodies, stalls)
TRANSPORT_ERRORS = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError,
                    asyncio.TimeoutError, ConnectionError)

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
_SECRET_PARAMS = {"password", "token", "access_token", "refresh_token", "client_secret"}


def redact_url(url: str) -> str:
    """The URL without user info or secret-looking query parameters, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<url>"
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    query = "&".join(
        (kv if kv.split("=", 1)[0].lower() not in _SECRET_PARAMS else kv.split("=", 1)[0] + "=***")
        for kv in parts.query.split("&") if kv
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def as_int(value: Any) -> int | None:
    """Parse counts and sizes that may arrive as int, float, "1234" or "1234.0"."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if number != number or number < 0 or number > 2**62:  # NaN, negative, absurd
        return None
    return int(number)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date); None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    if "<html" in text.lower() or "<!doctype" in text.lower():
        return "(HTML error page)"
    return text[:limit] + ("..." if len(text) > limit else "")


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
    """One session for the whole run: connection limit, separate connect/read timeouts,
    proxies from the environment (trust_env), TLS verified (aiohttp's default)."""
    connector = aiohttp.TCPConnector(limit=config.connections, limit_per_host=config.connections,
                                     enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(total=None, connect=config.connect_timeout,
                                    sock_connect=config.connect_timeout, sock_read=config.read_timeout)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=True,
                                 headers={"User-Agent": config.user_agent}, raise_for_status=False,
                                 auto_decompress=True)


def transport_error(exc: BaseException, shown: str) -> RetryableRequestError:
    """The retryable error for a transport failure of a request to ``shown`` (a redacted URL);
    a timeout is marked ``overload`` for the engine's adaptive concurrency."""
    timed_out = isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError))
    if timed_out:
        what = f"timed out (no data) waiting for {shown}"
    elif isinstance(exc, aiohttp.ClientPayloadError):
        what = f"connection broke mid-response from {shown}"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        what = f"cannot connect to {shown}"
    elif isinstance(exc, (aiohttp.ServerDisconnectedError, ConnectionResetError)):
        what = f"connection reset by {shown}"
    else:
        what = f"network error ({type(exc).__name__}) from {shown}"
    return RetryableRequestError(what, url=shown, timed_out=timed_out)


async def raise_for_status(resp: aiohttp.ClientResponse, shown: str) -> None:
    if resp.status == 200:
        return
    try:
        text = (await resp.content.read(4096)).decode("utf-8", "replace")
    except (aiohttp.ClientError, asyncio.TimeoutError):
        text = ""
    if resp.status in RETRYABLE_STATUS:
        raise RetryableRequestError(f"HTTP {resp.status} from {shown}", status=resp.status, url=shown,
                                    retry_after=parse_retry_after(resp.headers.get("Retry-After")))
    if resp.status == 401:
        raise AuthError(f"HTTP 401 from {shown}: the server wants credentials")
    raise PermanentRequestError(f"HTTP {resp.status} from {shown}: {one_line(text) or 'no message'}",
                                status=resp.status, url=shown)


class RetryingClient:
    """The request-level retry policy shared by the HTTP clients (tenacity): ``config.retries``
    attempts, ``BackoffWait``, ``should_retry_request``; before each retry the counter goes up,
    a Retry-After pauses the whole host (``gate``) and ``on_retry`` hears the error (its ``str``
    is one line without secrets)."""

    config: Config
    gate: HostGate
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
            self.gate.push(exc.retry_after)
        if self.on_retry is not None and exc is not None:
            self.on_retry(exc)
