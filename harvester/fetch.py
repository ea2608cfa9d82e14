"""Stream one series ZIP to a ``.partial`` file, with request-level retries.

Memory is one chunk per series in flight, whatever the series size. The body is written with
aiofiles (file I/O off the event loop). Before a byte is kept, the status and content type are
checked (``NBIAClient.open_series``) and the first bytes must carry the ZIP signature: an
outage page sent with HTTP 200 is retried, not unzipped.

Raises ``RetryableRequestError`` once the request-level retries are spent, the client's
permanent errors at once, and ``DiskFullError``/``OutputNotWritableError`` when the disk fails.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import aiofiles
import anyio

from harvester.errors import RetryableRequestError, classify_os_error
from harvester.source.nbia import NBIAClient

ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")


class RateLimiter:
    """A token bucket shared by all downloads: at most ``rate`` bytes per second in total.

    ``rate`` may be changed while running. Burst is one second's worth.
    """

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self._tokens = self.rate
        self._stamp = time.monotonic()
        self._lock = anyio.Lock()

    async def consume(self, n: int) -> None:
        async with self._lock:  # FIFO-ish fairness: one waiter refills at a time
            while True:
                now = time.monotonic()
                self._tokens = min(self.rate, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= n or self._tokens >= self.rate:
                    self._tokens -= n  # may go negative for a chunk larger than the burst
                    return
                await anyio.sleep((min(n, self.rate) - self._tokens) / self.rate)


async def fetch_series_zip(client: NBIAClient, series_uid: str, collection: str | None, dest: Path, *,
                           chunk_size: int = 1 << 20, rate: RateLimiter | None = None,
                           on_bytes: Callable[[int], None] | None = None) -> int:
    """Download the series ZIP into ``dest`` (overwritten per attempt); returns its size in bytes."""
    async for attempt in client.retrying():
        with attempt:
            return await _fetch_once(client, series_uid, collection, dest, chunk_size, rate, on_bytes)
    raise AssertionError("unreachable")  # pragma: no cover


async def _fetch_once(client: NBIAClient, series_uid: str, collection: str | None, dest: Path,
                      chunk_size: int, rate: RateLimiter | None, on_bytes: Callable[[int], None] | None) -> int:
    written = 0
    async with client.open_series(series_uid, collection) as resp:
        try:
            out = await aiofiles.open(dest, "wb")
        except OSError as exc:
            raise classify_os_error(exc, dest.name) from None
        try:
            first = True
            async for chunk in resp.content.iter_chunked(chunk_size):
                if first:
                    if not chunk.startswith(ZIP_SIGNATURES[0]) and not chunk.startswith(ZIP_SIGNATURES[1]):
                        preview = chunk[:60].decode("utf-8", "replace")
                        raise RetryableRequestError(
                            f"download of series {series_uid} is not a ZIP (starts with {preview!r})")
                    first = False
                if rate is not None:
                    await rate.consume(len(chunk))
                try:
                    await out.write(chunk)
                except OSError as exc:
                    raise classify_os_error(exc, dest.name) from None
                written += len(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
            if first:
                raise RetryableRequestError(f"download of series {series_uid} was empty")
        finally:
            try:
                await out.close()
            except OSError as exc:
                raise classify_os_error(exc, dest.name) from None
    return written
