"""An anonymous S3 client on aiohttp: ListObjectsV2 and GET object, nothing more.

IDC's buckets are public, so no request is signed. Addressing: the default AWS endpoint
(``config.IDC_ENDPOINT_URL``) is asked virtual-hosted style (``https://BUCKET.s3.amazonaws.com/KEY``),
any other endpoint (the GCS mirror, MinIO, moto in the tests) path style (``ENDPOINT/BUCKET/KEY``);
on the GCS mirror (``GCS_ENDPOINT_URL``) the AWS bucket names of the index become GCS's.

Who raises what (the request retry policy is ``RetryingClient``'s, as for NBIA and DICOMweb):

* ``RetryableRequestError`` for resets, timeouts, 5xx (S3's ``SlowDown`` is a 503, honoured with
  its Retry-After), 408, 429, and a listing that is not the XML S3 sends (an error page with
  HTTP 200, a cut body): every attempt failed when it reaches the caller;
* ``PermanentRequestError`` for 403/404 and other 4xx (the object is not public, or gone), a
  listing larger than ``MAX_LISTING_BYTES``, with a DOCTYPE (entities are never expanded), or
  with more keys than the caller allows, and a listing that pages forever.

Every byte is hostile: keys are returned as sent and the caller checks them; sizes and ETags are
parsed defensively; messages carry URLs through ``redact_url`` (an endpoint may hold userinfo).
"""
from __future__ import annotations

import contextlib
import copy
import os
import random
import re
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import anyio
from tenacity import RetryCallState, stop_after_attempt

from harvester.config import IDC_ENDPOINT_URL, Config
from harvester.errors import PermanentRequestError, RetryableRequestError, UsageError, should_retry_request
from harvester.source.idc.budget import OBJECT_BYTES_IN_FLIGHT, ByteBudget
from harvester.source.idc.keepalive import KeepAlivePool, NeedsGeneralClient, buffer_capacity
from harvester.source.http import (
    CLIENT_ERRORS,
    BodyGuard,
    HostGate,
    RetryingClient,
    as_int,
    classify_client_error,
    env_proxy,
    get_following,
    one_line,
    raise_for_status,
    read_guarded,
    redact_url,
)

#: Google Cloud Storage mirrors IDC's buckets (its XML API answers the same requests), two of
#: them under other names; same keys, same bytes.
GCS_ENDPOINT_URL = "https://storage.googleapis.com"
GCS_BUCKETS = {"idc-open-data": "idc-open-data", "idc-open-data-two": "idc-open-idc1",
               "idc-open-data-cr": "idc-open-cr"}
#: One ListObjectsV2 page (at most 1,000 keys of up to 1 KB each, plus the envelope).
MAX_LISTING_BYTES = 4 << 20
#: Pages of one listing at most (a server that hands out continuation tokens forever).
MAX_PAGES = 1000
#: Worker threads writing objects into the sinks at once (``S3Client.writers``).
WRITER_THREADS = max(2, os.cpu_count() or 2)
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')
T = TypeVar("T")


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str     # as sent, quotes removed

    @property
    def md5(self) -> str | None:
        """The object's MD5 when its ETag is one: 32 hex digits, as S3 gives for a single-part
        upload stored plain or with SSE-S3 (IDC's buckets); a multipart ETag (``-N``) is not."""
        m = _MD5_ETAG.match(self.etag)
        return m.group(1).lower() if m else None


def check_bucket(name: str) -> str:
    """``name`` if it is a valid S3 bucket name; ``ValueError`` otherwise (it goes into a URL)."""
    if not _BUCKET_RE.match(name) or ".." in name:
        raise ValueError(f"not an S3 bucket name: {name[:80]!r}")
    return name


def parse_listing(body: bytes, shown: str) -> tuple[list[S3Object], str | None]:
    """One ListObjectsV2 page: its objects and the continuation token (None on the last page).

    Raises ``PermanentRequestError`` for a DOCTYPE (no entity is ever expanded) and
    ``RetryableRequestError`` for anything that is not a ``ListBucketResult``."""
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        raise PermanentRequestError(f"{shown} answered a listing with a DOCTYPE, which is never read", url=shown,
                                    hint="the endpoint is not an S3 service; check --endpoint-url")
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        raise RetryableRequestError(f"{shown} answered something that is not XML: "
                                    f"{one_line(body[:300].decode('utf-8', 'replace'))}", url=shown) from None
    if root.tag.removeprefix(_NS) != "ListBucketResult":
        raise RetryableRequestError(f"{shown} answered {root.tag.removeprefix(_NS)[:40]!r}, not an S3 listing",
                                    url=shown)

    def text(node: ET.Element, name: str) -> str:
        child = node.find(_NS + name)
        if child is None:
            child = node.find(name)
        return (child.text or "") if child is not None else ""

    objects = []
    for node in [*root.findall(_NS + "Contents"), *root.findall("Contents")]:
        size = as_int(text(node, "Size"))
        if size is None:
            raise RetryableRequestError(f"{shown} listed {text(node, 'Key')[:80]!r} without a usable size", url=shown)
        objects.append(S3Object(key=text(node, "Key"), size=size, etag=text(node, "ETag").strip().strip('"')))
    truncated = text(root, "IsTruncated").strip().lower() == "true"
    token = text(root, "NextContinuationToken") or None
    if truncated and not token:
        raise RetryableRequestError(f"{shown} said the listing goes on but gave no continuation token", url=shown)
    return objects, token if truncated else None


class _AfterFirst:
    """A tenacity wait for the attempts that follow one made outside tenacity: its attempt n is
    the policy's attempt n + 1 (the backoff goes on growing from where the first failure left it)."""

    def __init__(self, wait: Callable[[RetryCallState], float]) -> None:
        self.wait = wait

    def __call__(self, state: RetryCallState) -> float:
        shifted = copy.copy(state)
        shifted.attempt_number += 1
        return self.wait(shifted)


class S3Client(RetryingClient):
    """Anonymous ListObjectsV2 and GET object on one aiohttp session (see the module docstring)."""

    def __init__(self, config: Config, session: aiohttp.ClientSession, *,
                 on_retry: Callable[[BaseException], None] | None = None) -> None:
        self.config = config
        self.endpoint = config.endpoint_url.rstrip("/")
        if not re.match(r"^https?://[^/\s]+$", self.endpoint):
            raise UsageError(f"--endpoint-url {redact_url(self.endpoint)!r} is not an http(s) URL without a path",
                             hint="give the S3 service's root, e.g. https://s3.amazonaws.com")
        self.session = session
        # whole objects go over connections of our own (keepalive.py) unless the environment names
        # a proxy for the endpoint (aiohttp goes through it: ``env_proxy``) or the endpoint carries
        # userinfo (aiohttp sends it as credentials)
        #: the bytes of whole objects every series holds at once (``budget.py``); the keep-alive
        #: pool keeps as many spare buffers, so each buffer the budget admits is used again
        self.budget = ByteBudget(OBJECT_BYTES_IN_FLIGHT)
        self.keepalive = KeepAlivePool(config, str(session.headers.get("User-Agent", "harvester")),
                                       spare_bytes=self.budget.total) if (
            not env_proxy(session, self.endpoint) and urlsplit(self.endpoint).username is None) else None
        self._writers: anyio.CapacityLimiter | None = None
        self.virtual_hosted = self.endpoint == IDC_ENDPOINT_URL
        self.on_retry = on_retry
        # one generator for every object's backoff: a new random.Random() seeds itself from
        # os.urandom, ~1 ms each, and a series has hundreds of objects (RetryingClient's default)
        self._rng = random.Random()
        self.gate = HostGate()
        self.requests = 0
        self.retries = 0

    def __repr__(self) -> str:
        return f"S3Client(endpoint={redact_url(self.endpoint)!r})"

    def url(self, bucket: str, key: str = "", params: dict[str, str] | None = None) -> str:
        """The URL of ``key`` in ``bucket`` (the index's AWS name) on this endpoint."""
        if self.endpoint == GCS_ENDPOINT_URL:
            bucket = GCS_BUCKETS.get(bucket, bucket)
        query = f"?{urlencode(params)}" if params else ""
        path = quote(key, safe="/~")
        if self.virtual_hosted:
            parts = urlsplit(self.endpoint)
            return f"{parts.scheme}://{bucket}.{parts.netloc}/{path}{query}"
        return f"{self.endpoint}/{bucket}/{path}{query}"

    def shown_url(self, bucket: str, key: str, prefix: str | None = None) -> str:
        """``redact_url(self.url(bucket, key))``, from ``prefix`` (``shown_url(bucket, "")``) when
        given: redaction touches only the user info and the query, and a key goes into the path
        only, quoted, so the redacted bucket URL plus the quoted key is the same text."""
        if prefix is None:
            return redact_url(self.url(bucket, key))
        return prefix + quote(key, safe="/~")

    async def call_retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` under the request retry policy (``retrying``); its first attempt runs
        without building tenacity's machinery, which for one GET per object cost more loop CPU
        than the GET. A failure that should not be retried raises at once; one that should is
        counted, heard and waited for exactly as ``retrying`` does it (``first_failure``), and
        the remaining attempts run under ``retrying``."""
        try:
            return await call()
        except Exception as exc:   # noqa: BLE001 - classified by the policy just below
            if max(1, self.config.retries) <= 1 or not should_retry_request(exc):
                raise
            first = exc
        policy = self.retrying()
        state = RetryCallState(policy, fn=None, args=(), kwargs={})
        state.set_exception((type(first), first, first.__traceback__))
        del first
        self._before_sleep(state)
        await anyio.sleep(policy.wait(state))
        rest = policy.copy(stop=stop_after_attempt(max(1, self.config.retries) - 1), wait=_AfterFirst(policy.wait))
        async for attempt in rest:
            with attempt:
                return await call()
        raise AssertionError("unreachable")  # pragma: no cover

    @contextlib.asynccontextmanager
    async def _get(self, url: str, shown: str | None = None) -> AsyncIterator[aiohttp.ClientResponse]:
        """One GET (no retry here) with the host gate and the redirect policy; failures
        classified, those inside the ``async with`` body included. ``shown``: ``url`` redacted,
        when the caller has it already."""
        await self.gate.wait()
        shown = redact_url(url) if shown is None else shown
        self.requests += 1
        try:
            async with get_following(self.session, url, headers={}, config=self.config, shown=shown) as resp:
                if resp.status != 200:
                    await raise_for_status(resp, shown, max_retry_after=self.config.max_retry_after)
                yield resp
        except CLIENT_ERRORS as exc:
            raise classify_client_error(exc, shown) from None

    async def list_objects(self, bucket: str, prefix: str, *, max_keys: int) -> list[S3Object]:
        """Every object under ``prefix`` (ListObjectsV2, following continuation tokens), each page
        with request-level retries. Raises ``PermanentRequestError`` past ``max_keys`` objects or
        ``MAX_PAGES`` pages."""
        objects: list[S3Object] = []
        token: str | None = None
        for _ in range(MAX_PAGES):
            params = {"list-type": "2", "prefix": prefix, **({"continuation-token": token} if token else {})}
            url = self.url(bucket, "", params)
            page, token = await self._list_page(url)
            objects += page
            if len(objects) > max_keys:
                shown = redact_url(url)
                raise PermanentRequestError(f"{shown} lists more than {max_keys} objects under {prefix!r}",
                                            url=shown, hint="the listing is not the series the index announced")
            if token is None:
                return objects
        shown = redact_url(self.url(bucket, "", {"prefix": prefix}))
        raise PermanentRequestError(f"{shown}: the listing went on past {MAX_PAGES} pages", url=shown)

    async def _list_page(self, url: str) -> tuple[list[S3Object], str | None]:
        shown = redact_url(url)
        async for attempt in self.retrying():
            with attempt:
                async with self._get(url) as resp:
                    body = await read_guarded(resp, BodyGuard(self.config, shown, max_bytes=MAX_LISTING_BYTES))
                return parse_listing(body, shown)
        raise AssertionError("unreachable")  # pragma: no cover

    def in_use(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Around the GETs of one series (the keep-alive connections are closed after the last)."""
        return self.keepalive.in_use() if self.keepalive is not None else contextlib.nullcontext()

    async def read_object(self, bucket: str, key: str, guard: BodyGuard, shown: str) -> memoryview | None:
        """GET one object whole over a keep-alive connection of our own (one attempt; the caller
        retries), its body bounded by ``guard``; None when there is no such connection for this
        endpoint or the answer is one only ``open_object`` reads (a redirect, a chunked or encoded
        body): the caller asks there. Raises as ``_get`` does, and ``guard``'s errors."""
        if self.keepalive is None:
            return None
        await self.gate.wait()
        self.requests += 1
        try:
            answer = await self.keepalive.get(self.url(bucket, key), guard, guard.max_bytes or 0, shown)
        except NeedsGeneralClient:
            return None
        if answer.status != 200:
            await raise_for_status(answer, shown, max_retry_after=self.config.max_retry_after)  # type: ignore[arg-type]
        return answer.body if isinstance(answer.body, memoryview) else memoryview(answer.body)

    @staticmethod
    def held_bytes(size: int) -> int:
        """The memory an object of ``size`` bytes holds while whole (its buffer's capacity)."""
        return buffer_capacity(size)

    @property
    def writers(self) -> anyio.CapacityLimiter:
        """The worker threads that write every series' objects, ``WRITER_THREADS`` at most (made in
        the event loop on first use): hashing and writing release the GIL, so threads past the
        cores only contend for it with the loop thread, which reads every object."""
        if self._writers is None:
            self._writers = anyio.CapacityLimiter(WRITER_THREADS)
        return self._writers

    def give_back(self, body: bytes | memoryview) -> None:
        """``body`` (of ``read_object``) has been written and is read no more."""
        if self.keepalive is not None and isinstance(body, memoryview):
            self.keepalive.buffers.give_back(body)

    @contextlib.asynccontextmanager
    async def open_object(self, bucket: str, key: str, shown: str | None = None
                          ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET one object (one attempt; the caller retries and bounds the body); ``shown``: its
        URL redacted (``redact_url(self.url(bucket, key))``), when the caller has it already."""
        async with self._get(self.url(bucket, key), shown) as resp:
            yield resp
