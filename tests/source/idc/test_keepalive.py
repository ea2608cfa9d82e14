"""The keep-alive GET of whole objects (``harvester.source.idc.keepalive``) against a raw TCP
server on loopback that answers with exact bytes: reuse, a kept connection the server closed,
answers it leaves to aiohttp, broken and hostile answers, and the retry policy around it."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from harvester.config import Config
from harvester.errors import IntegrityError, PermanentRequestError, RetryableRequestError
from harvester.source.http import BodyGuard, make_session
from harvester.source.idc.keepalive import Buffers, KeepAlivePool, NeedsGeneralClient
from harvester.source.idc.s3 import S3Client

pytestmark = pytest.mark.anyio
BODY = bytes(range(256)) * 1000   # 256,000 bytes: several reads


def ok(body: bytes = BODY, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nETag: \"x\"\r\n{extra}\r\n".encode() + body


class RawServer:
    """Answers each request (read up to its blank line) with ``answer(n)`` for the n-th request of
    the run; ``close_after`` closes the connection after each answer; None as an answer holds the
    request unanswered. Counts connections and requests."""

    def __init__(self, answer: Callable[[int], bytes | None], *, close_after: bool = False) -> None:
        self.answer, self.close_after = answer, close_after
        self.connections = 0
        self.requests: list[bytes] = []
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                data = self.answer(len(self.requests))
                if data is None:
                    await asyncio.Event().wait()   # never answered (the client gives up)
                    return
                writer.write(data)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[..., RawServer]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Callable[[int], bytes | None], **kw: bool) -> RawServer:
        srv = RawServer(answer, **kw)
        server = await asyncio.start_server(srv._serve, "127.0.0.1", 0)
        servers.append(server)
        srv.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return srv

    yield start  # type: ignore[misc]
    for server in servers:
        server.close()


def guard(limit: int = len(BODY), config: Config | None = None) -> BodyGuard:
    def too_long(total: int) -> IntegrityError:
        return IntegrityError(f"more than the {limit} bytes listed")
    return BodyGuard(config or Config(), "shown", max_bytes=limit, too_big=too_long)


async def get(pool: KeepAlivePool, url: str, limit: int = len(BODY)) -> bytes:
    answer = await pool.get(url + "/idc-open-data/a/b.dcm", guard(limit), limit, "shown")
    return bytes(answer.body)


async def test_objects_come_whole_over_one_kept_connection(raw: Callable[..., RawServer]) -> None:
    server = await raw(lambda n: ok())
    pool = KeepAlivePool(Config(), "harvester-test")
    async with pool.in_use():
        for _ in range(5):
            assert await get(pool, server.url) == BODY
    assert server.connections == 1 and len(server.requests) == 5
    first = server.requests[0].decode()
    assert first.startswith("GET /idc-open-data/a/b.dcm HTTP/1.1\r\n") and "User-Agent: harvester-test" in first
    assert f"Host: {server.url.removeprefix('http://')}" in first


async def test_a_kept_connection_the_server_closed_is_replaced(raw: Callable[..., RawServer]) -> None:
    """The server closes after every answer without saying so: the next request finds its kept
    connection gone before any byte came back, and goes out again on a new one (no error)."""
    server = await raw(lambda n: ok(), close_after=True)
    pool = KeepAlivePool(Config(), "t")
    async with pool.in_use():
        for _ in range(3):
            assert await get(pool, server.url) == BODY
    assert len(server.requests) == 3 and server.connections == 3


async def test_connection_close_is_honoured(raw: Callable[..., RawServer]) -> None:
    server = await raw(lambda n: ok(extra="Connection: close\r\n"))
    pool = KeepAlivePool(Config(), "t")
    async with pool.in_use():
        for _ in range(3):
            assert await get(pool, server.url) == BODY
    assert server.connections == 3


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\n\r\nhello",
], ids=["redirect", "chunked", "encoded", "no-length"])
async def test_answers_it_does_not_read_go_to_aiohttp(raw: Callable[..., RawServer], answer: bytes) -> None:
    server = await raw(lambda n: answer)
    pool = KeepAlivePool(Config(), "t")
    with pytest.raises(NeedsGeneralClient):
        await get(pool, server.url)


@pytest.mark.parametrize("answer, text", [
    (b"HTTP/2 200 OK\r\nContent-Length: 1\r\n\r\nx", "malformed status line"),
    (b"ICY 200 OK\r\n\r\n", "malformed status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 1\r\n\r\nx", "malformed header line"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * (70 << 10) + b"\r\n\r\n", "headers too long"),
])
async def test_broken_answers_are_retryable(raw: Callable[..., RawServer], answer: bytes, text: str) -> None:
    server = await raw(lambda n: answer)
    pool = KeepAlivePool(Config(), "t")
    with pytest.raises(RetryableRequestError, match=text):
        await get(pool, server.url)


async def test_a_body_cut_short_is_a_broken_connection(raw: Callable[..., RawServer]) -> None:
    server = await raw(lambda n: ok()[:-1000], close_after=True)
    pool = KeepAlivePool(Config(), "t")
    with pytest.raises(RetryableRequestError, match="reset|broke"):
        await get(pool, server.url)


async def test_a_body_longer_than_listed_is_refused_before_it_is_read(raw: Callable[..., RawServer]) -> None:
    server = await raw(lambda n: ok())
    pool = KeepAlivePool(Config(), "t")
    with pytest.raises(IntegrityError, match="more than the 1000 bytes listed"):
        await get(pool, server.url, limit=1000)


async def test_no_byte_within_the_read_timeout_is_a_timeout(raw: Callable[..., RawServer]) -> None:
    server = await raw(lambda n: None)
    pool = KeepAlivePool(Config(read_timeout=0.2), "t")
    with pytest.raises(RetryableRequestError, match="timed out") as info:
        await get(pool, server.url)
    assert info.value.overload   # a timeout, as the adaptive concurrency counts it


async def test_error_answers_are_classified_with_their_text(raw: Callable[..., RawServer]) -> None:
    """Through ``S3Client.read_object``: a 503 SlowDown with Retry-After is retryable with its
    wait, a 403 is permanent and names the server's code; a short error body keeps the connection."""
    def error(status: str, code: str, extra: str = "") -> bytes:
        body = f"<Error><Code>{code}</Code></Error>".encode()
        return f"HTTP/1.1 {status}\r\n{extra}Content-Length: {len(body)}\r\n\r\n".encode() + body

    answers = {1: error("503 Slow Down", "SlowDown", "Retry-After: 3\r\n"), 2: error("403 Forbidden", "AccessDenied")}
    server = await raw(lambda n: answers[n])
    async with aiohttp.ClientSession() as session:
        client = S3Client(Config(endpoint_url=server.url, read_timeout=10), session)
        assert client.keepalive is not None
        async with client.in_use():
            with pytest.raises(RetryableRequestError) as slow:
                await client.read_object("idc-open-data", "a/b.dcm", guard(), "shown")
            assert slow.value.retry_after == 3
            with pytest.raises(PermanentRequestError, match="HTTP 403.*AccessDenied"):
                await client.read_object("idc-open-data", "a/b.dcm", guard(), "shown")
    assert server.connections == 1 and client.requests == 2


async def test_the_first_failure_is_counted_and_gated_like_the_rest(raw: Callable[..., RawServer]) -> None:
    """``call_retrying``: a SlowDown on the first attempt is one retry, its Retry-After pauses the
    host, and the attempts in all are ``config.retries``."""
    slow = b"HTTP/1.1 503 Slow Down\r\nRetry-After: 0.01\r\nContent-Length: 0\r\n\r\n"
    server = await raw(lambda n: slow)
    heard: list[BaseException] = []
    async with aiohttp.ClientSession() as session:
        client = S3Client(Config(endpoint_url=server.url, retries=3, backoff_base=0.01, backoff_max=0.02), session,
                          on_retry=heard.append)
        async with client.in_use():
            with pytest.raises(RetryableRequestError, match="HTTP 503"):
                await client.call_retrying(lambda: client.read_object("idc-open-data", "k", guard(), "shown"))
    assert len(server.requests) == 3 and client.retries == 2 and len(heard) == 2
    assert client.gate._not_before > 0


async def test_an_endpoint_with_user_info_stays_on_aiohttp() -> None:
    async with aiohttp.ClientSession() as session:
        assert S3Client(Config(endpoint_url="http://u:pw@127.0.0.1:9"), session).keepalive is None
        assert S3Client(Config(endpoint_url="http://127.0.0.1:9"), session).keepalive is not None



async def test_a_proxy_from_the_environment_keeps_the_objects_on_aiohttp(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared session does not trust the environment (``make_session``), so the proxy
    variables are asked here: with a proxy named for the endpoint, GETs go through aiohttp
    (which sends them to the proxy); NO_PROXY for it keeps the connections of our own."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    async with make_session(Config()) as session:
        assert S3Client(Config(endpoint_url="http://10.0.0.1:9"), session).keepalive is None
    monkeypatch.setenv("NO_PROXY", "10.0.0.1")
    async with make_session(Config()) as session:
        assert S3Client(Config(endpoint_url="http://10.0.0.1:9"), session).keepalive is not None

def test_buffers_are_used_again_within_their_bound() -> None:
    buffers = Buffers(max_bytes=128 << 10)
    first = buffers.take(100_000)
    assert len(first) == 100_000
    kept = first.obj
    buffers.give_back(first)
    again = buffers.take(70_000)   # the same 128 KiB capacity
    assert again.obj is kept and len(again) == 70_000
    buffers.give_back(again)
    buffers.give_back(buffers.take(300_000))   # past the bound: not kept
    assert buffers.take(100_000).obj is kept
    assert buffers.take(100_000).obj is not kept
