"""GET whole S3 objects over keep-alive HTTP/1.1 connections of our own: one request written,
one answer read into a buffer of the size the listing gave, nothing more.

Why not aiohttp here: an object of IDC is a few hundred KiB, and aiohttp's request machinery
(URL building, the request writer, the response parser and its stream, the timeout handles)
costs more loop-thread CPU per GET than the bytes do; the loop thread was the ceiling of a
harvest from a fast S3 server. Here a GET is one ``transport.write`` and a few
``buffer_updated`` calls that ``recv_into`` the object's own buffer (``asyncio.BufferedProtocol``).

What it handles, and what it leaves to aiohttp (``NeedsGeneralClient``: the caller sends that
request again through its aiohttp session, which knows redirects, chunked and encoded bodies):
an answer with a status and a ``Content-Length`` is read here (a 200's body, and the first
``ERROR_BODY_BYTES`` of an error's, for ``raise_for_status``); a 3xx, a chunked or encoded
body, or a 200 without ``Content-Length`` is not.

Who raises what: ``RetryableRequestError`` (through ``transport_error``) for a connection that
cannot be made, is reset, or closes mid-answer, for headers that are not HTTP/1.x or too long,
and for no byte within ``config.read_timeout``; ``BodyGuard``'s errors for a body past its
bound, the deadline or the stall rule; ``NeedsGeneralClient`` as above. A connection is reused
only after a complete answer that did not ask to close; any error or cancellation closes it.
"""
from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from multidict import CIMultiDict

from harvester.config import Config
from harvester.errors import RetryableRequestError
from harvester.source.http import BodyGuard, transport_error

#: Header bytes of one answer, at most (S3 sends well under 1 KiB).
MAX_HEAD_BYTES = 64 << 10
#: Bytes of an error answer's body kept for its message (``raise_for_status`` reads 4 KiB).
ERROR_BODY_BYTES = 4096
#: Idle connections kept per origin (beyond them a finished connection is closed).
MAX_IDLE = 256
#: Bytes of object buffers kept for the next objects (``Buffers``), at most (the IDC source keeps
#: as many as its budget of objects in memory, ``budget.OBJECT_BYTES_IN_FLIGHT``).
MAX_SPARE_BYTES = 32 << 20
_GRAIN = 64 << 10


def buffer_capacity(length: int) -> int:
    """The capacity of the buffer ``Buffers.take(length)`` gives: ``length`` rounded up to 64 KiB."""
    return -(-length // _GRAIN) * _GRAIN


class Buffers:
    """Buffers for objects' bodies, used again once the sink has written them (``give_back``):
    a fresh buffer of a few hundred KiB costs its zeroing and a page fault per 4 KiB, on the
    loop thread, for every object. Capacities are rounded up to 64 KiB; a body is a view of its
    length. Not thread-safe: the event loop's thread only."""

    def __init__(self, max_bytes: int = MAX_SPARE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._spare: dict[int, list[bytearray]] = {}
        self._held = 0

    def take(self, length: int) -> memoryview:
        capacity = buffer_capacity(length)
        spare = self._spare.get(capacity)
        if spare:
            self._held -= capacity
            return memoryview(spare.pop())[:length]
        return memoryview(bytearray(capacity))[:length]

    def give_back(self, body: memoryview) -> None:
        """``body`` (a view ``take`` gave) is read no more: its buffer may carry another object."""
        buffer = body.obj
        if isinstance(buffer, bytearray) and self._held + len(buffer) <= self.max_bytes:
            self._spare.setdefault(len(buffer), []).append(buffer)
            self._held += len(buffer)


class NeedsGeneralClient(Exception):
    """The answer is one this client does not read (see the module docstring); the connection
    is closed, nothing of the body was handed on."""


@dataclass
class Answer:
    """An answer read whole: its status, headers and body (the object, or an error's first bytes).
    ``content.read`` lets ``raise_for_status`` read it as it reads an aiohttp response."""

    status: int
    headers: CIMultiDict[str]
    body: bytearray | memoryview

    @property
    def content(self) -> Answer:
        return self

    async def read(self, n: int = -1) -> bytes:
        return bytes(self.body[:n] if n >= 0 else self.body)


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection; one request at a time (``begin``, then await ``done``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, buffers: Buffers) -> None:
        self.loop, self.buffers = loop, buffers
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.served = 0   # answers read whole on this connection
        self._scratch = bytearray(16 << 10)
        self._scratch_view = memoryview(self._scratch)
        self._reset()

    def _reset(self) -> None:
        self.done: asyncio.Future[Answer] | None = None
        self._head = bytearray()
        self._answer: Answer | None = None
        self._view: memoryview | None = None
        self._filled = 0
        self._guard: BodyGuard | None = None
        self._limit = 0
        self._keep = True
        self.got_data = False

    def begin(self, request: bytes, guard: BodyGuard, limit: int) -> asyncio.Future[Answer]:
        """Send ``request``; the future resolves to the whole answer. A 200's body beyond
        ``limit`` bytes is the guard's ``too_big``; an error's body is cut to ``ERROR_BODY_BYTES``."""
        assert self.transport is not None and self.done is None
        self.done = self.loop.create_future()
        self._guard, self._limit = guard, limit
        self.transport.write(request)
        return self.done

    def finish(self) -> bool:
        """After the answer: True if the connection may carry the next request."""
        reusable = self._keep and not self.closed and self.done is not None and self.done.done() \
            and not self.done.cancelled() and self.done.exception() is None
        self.served += 1
        self._reset()
        return reusable

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # ---------------------------------------------------------------- asyncio's side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc if exc is not None else ConnectionResetError("closed mid-answer"))

    def eof_received(self) -> bool:
        return False   # the transport closes; connection_lost fails an answer still open

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._view is not None and self._filled < len(self._view):
            return self._view[self._filled:]
        return self._scratch_view

    def buffer_updated(self, nbytes: int) -> None:
        done = self.done
        if done is None or done.done():   # bytes nobody asked for: the connection is not in step
            self.close()
            return
        try:
            if self._view is not None and self._filled < len(self._view):
                self._filled += nbytes
                if self._guard is not None:
                    self._guard.feed(nbytes)
            else:
                self.got_data = True
                self._head += self._scratch_view[:nbytes]
                if self._answer is None:
                    self._read_head()
                else:   # past the announced body: not in step any more
                    self._keep = False
            if self._answer is not None and self._view is not None and self._filled == len(self._view):
                self._view.release()
                self._view = None
                done.set_result(self._answer)
        except BaseException as exc:   # noqa: BLE001 - handed to the waiting request
            self.close()
            if not done.done():
                done.set_exception(exc)

    def _read_head(self) -> None:
        end = self._head.find(b"\r\n\r\n")
        if end > MAX_HEAD_BYTES or (end < 0 and len(self._head) > MAX_HEAD_BYTES):
            raise _BrokenAnswer("headers too long")
        if end < 0:
            return
        lines = bytes(self._head[:end]).decode("latin-1").split("\r\n")
        rest = self._head[end + 4:]
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
            raise _BrokenAnswer("a malformed status line")
        status = int(parts[1])
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _BrokenAnswer("a malformed header line")
            headers.add(name, value.strip())
        if parts[0] == "HTTP/1.0" or "close" in headers.get("Connection", "").lower():
            self._keep = False
        length_text = headers.get("Content-Length", "")
        encoded = headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
        if (300 <= status < 400 or "Transfer-Encoding" in headers or encoded or not length_text.isdigit()
                or len(headers.getall("Content-Length")) > 1):
            raise NeedsGeneralClient(f"HTTP {status}")
        length = int(length_text)
        if status == 200:
            if length > self._limit and self._guard is not None:
                raise self._guard.too_big(length)
            body: bytearray | memoryview = self.buffers.take(length)
        else:   # an error's text, for its message: kept only if short, else the connection goes
            if length > ERROR_BODY_BYTES:
                self._keep = False
            body = bytearray(min(length, ERROR_BODY_BYTES))
        self._head = bytearray()
        self._answer = Answer(status, headers, body)
        if len(rest) > len(body):
            self._keep = False
            rest = rest[:len(body)]
        body[:len(rest)] = rest
        self._filled = len(rest)
        self._view = memoryview(body)
        if self._guard is not None and rest and status == 200:
            self._guard.feed(len(rest))


class _BrokenAnswer(Exception):
    pass


class KeepAlivePool:
    """Keep-alive connections per origin, shared by every request of a run (see the module
    docstring). Not thread-safe: the event loop's thread only."""

    def __init__(self, config: Config, user_agent: str, *, spare_bytes: int = MAX_SPARE_BYTES) -> None:
        self.config = config
        self.user_agent = user_agent
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._users = 0
        self.buffers = Buffers(spare_bytes)

    async def get(self, url: str, guard: BodyGuard, limit: int, shown: str) -> Answer:
        """One GET of ``url`` (a URL this module's caller built: quoted, no userinfo). See the
        module docstring for what is raised."""
        parts = urlsplit(url)
        https = parts.scheme == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if https else 80)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        netloc = parts.netloc
        request = (f"GET {target} HTTP/1.1\r\nHost: {netloc}\r\nUser-Agent: {self.user_agent}\r\n"
                   "Accept: */*\r\n\r\n").encode("ascii")
        origin = (parts.scheme, host, port)
        idle = self._idle.setdefault(origin, [])
        while True:
            reused = bool(idle)
            conn = idle.pop() if reused else await self._connect(host, port, https, shown)
            try:
                answer = await self._exchange(conn, request, guard, limit, shown)
            except _StaleConnection:
                conn.close()
                continue   # a kept connection the server had closed before our request: a new one
            except BaseException:
                conn.close()
                raise
            if conn.finish() and len(idle) < MAX_IDLE:
                idle.append(conn)
            else:
                conn.close()
            return answer

    async def _connect(self, host: str, port: int, https: bool, shown: str) -> _Connection:
        loop = asyncio.get_running_loop()
        if https and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(loop, self.buffers), host, port,
                                                       ssl=self._ssl if https else None)
        except (OSError, TimeoutError) as exc:
            raise RetryableRequestError(f"cannot connect to {shown} ({type(exc).__name__})", url=shown,
                                        timed_out=isinstance(exc, TimeoutError)) from None
        return conn

    async def _exchange(self, conn: _Connection, request: bytes, guard: BodyGuard, limit: int,
                        shown: str) -> Answer:
        if conn.closed:
            raise _StaleConnection
        done = conn.begin(request, guard, limit)
        try:
            while True:
                # one timer per request, not one per piece: no byte for read_timeout is a stall
                seen = conn._filled, len(conn._head), conn.got_data
                finished, _ = await asyncio.wait((done,), timeout=self.config.read_timeout)
                if finished:
                    return done.result()
                if (conn._filled, len(conn._head), conn.got_data) == seen:
                    raise TimeoutError
        except (ConnectionError, TimeoutError) as exc:
            if isinstance(exc, ConnectionError) and not conn.got_data and conn.served:
                raise _StaleConnection from None
            raise transport_error(exc, shown) from None
        except _BrokenAnswer as exc:
            raise RetryableRequestError(f"{shown} sent {exc} (not a valid HTTP answer)", url=shown,
                                        hint="the server or a proxy is broken; run again later") from None
        finally:
            if not done.done():
                done.cancel()

    @contextlib.asynccontextmanager
    async def in_use(self) -> AsyncIterator[None]:
        """Around the requests of one series: when the last series in flight is done, the idle
        connections are closed (none is left open when the run ends; series that overlap share them)."""
        self._users += 1
        try:
            yield
        finally:
            self._users -= 1
            if not self._users:
                self.close()

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()


class _StaleConnection(Exception):
    pass

