"""Stream one series ZIP, with request-level retries: into the streaming sink
(``stream_series_zip``: the series is verified and unpacked as it arrives, see
``harvester.store.sink``), or to a ``.partial`` file (``fetch_series_zip``).

Memory is at most about two write batches (``chunk_size``) per series in flight, whatever the
series size. Received chunks are gathered into batches of ``chunk_size`` and each batch is
written with one ``os.writev`` in a worker thread: file I/O stays off the event loop, and the
loop pays one thread hop per batch instead of one per network read. Before a byte is kept,
the status and content type are checked (``NBIAClient.open_series``) and the first bytes must
carry the ZIP signature: an outage page sent with HTTP 200 is retried, not unzipped.

Every attempt is bounded (``BodyGuard``): the per-request deadline and the stall rule of the
config, and ``max_bytes``, the size the archive announced for the series plus a margin
(``download_bound``; counted after any Content-Encoding is decoded), past which the download
stops with ``OversizeDownloadError`` and the caller removes the ``.partial`` file.

Raises ``RetryableRequestError`` once the request-level retries are spent, the client's
permanent errors at once, ``OversizeDownloadError`` (the series is retried later, then failed),
and ``DiskFullError``/``OutputNotWritableError`` when the disk fails.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from harvester.config import Limits
from harvester.errors import OversizeDownloadError, RetryableRequestError, classify_os_error
from harvester.source.http import BodyGuard, redact_url
from harvester.models import UnpackedSeries
from harvester.rate import RateLimiter
from harvester.source.base import SeriesZipSink
from harvester.source.nbia.client import NBIAClient

ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
#: ZIP bytes allowed per entry beyond its data (local header, data descriptor, central record,
#: a name of up to 255 bytes twice), plus the LICENSE and md5hashes.csv of a getImage answer
ZIP_ENTRY_OVERHEAD = 30 + 16 + 46 + 2 * 255
ZIP_FIXED_OVERHEAD = 1 << 20


def download_bound(file_size: int | None, image_count: int | None, limits: Limits) -> int | None:
    """The most ZIP bytes a series announced as ``file_size`` bytes in ``image_count`` files may
    take: deflate never grows data by more than a few bytes per block, so the DICOM bytes plus
    ``limits.max_series_overhead``, the ZIP's own records per entry and a fixed megabyte. None
    (no bound but the deadline and the disk) when the archive announced no size."""
    if not file_size or file_size <= 0:
        return None
    entries = max(image_count or 0, 0) + 2
    return int(file_size * (1 + limits.max_series_overhead)) + entries * ZIP_ENTRY_OVERHEAD + ZIP_FIXED_OVERHEAD


async def fetch_series_zip(client: NBIAClient, series_uid: str, collection: str | None, dest: Path, *,
                           chunk_size: int = 1 << 20, rate: RateLimiter | None = None,
                           on_bytes: Callable[[int], None] | None = None, max_bytes: int | None = None) -> int:
    """Download the series ZIP into ``dest`` (overwritten per attempt); returns its size in bytes.
    ``max_bytes``: see ``download_bound``."""
    async for attempt in client.retrying():
        with attempt:
            target = _PartialFile(dest, chunk_size)
            try:
                return await _fetch_once(client, series_uid, collection, target, chunk_size, rate, on_bytes,
                                         max_bytes)
            finally:
                target.close()
    raise AssertionError("unreachable")  # pragma: no cover


async def stream_series_zip(client: NBIAClient, series_uid: str, collection: str | None,
                            open_sink: Callable[[], SeriesZipSink], *, chunk_size: int = 1 << 20,
                            rate: RateLimiter | None = None, on_bytes: Callable[[int], None] | None = None,
                            max_bytes: int | None = None) -> UnpackedSeries:
    """Stream the series ZIP into a sink (``open_sink()``, a fresh one per attempt) and return
    what it verified: no ``.partial`` file. A failed attempt discards its sink, so the staging
    folder holds nothing of it. Raises what ``fetch_series_zip`` and the sink raise."""
    async for attempt in client.retrying():
        with attempt:
            sink = open_sink()
            try:
                await _fetch_once(client, series_uid, collection, sink, chunk_size, rate, on_bytes, max_bytes)
                return await sink.close()
            except BaseException:
                sink.discard()  # blocking but quick; it must run even when cancelled
                raise
    raise AssertionError("unreachable")  # pragma: no cover


async def _fetch_once(client: NBIAClient, series_uid: str, collection: str | None,
                      target: _PartialFile | SeriesZipSink, chunk_size: int, rate: RateLimiter | None,
                      on_bytes: Callable[[int], None] | None, max_bytes: int | None) -> int:
    """One attempt: the checked body, chunk by chunk, into ``target``; returns its size."""
    received = 0
    shown = redact_url(client.series_url(series_uid, collection))

    def too_big(total: int) -> OversizeDownloadError:
        return OversizeDownloadError(
            f"download of series {series_uid} passed {total} bytes, more than the {max_bytes} the archive's "
            "announced size allows: not the announced series", series_uid=series_uid)

    guard = BodyGuard(client.config, shown, max_bytes=max_bytes, too_big=too_big)
    async with client.open_series(series_uid, collection) as resp:
        head = b""  # the first bytes, until the ZIP signature could be checked
        async for chunk in resp.content.iter_chunked(chunk_size):
            guard.feed(len(chunk))
            ours = time.monotonic()  # from here to the next read: our side's time, not the server's
            if rate is not None:
                await rate.consume(len(chunk))
            received += len(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
            if head is not None:
                head += chunk
                if len(head) < 4:
                    continue
                if not head.startswith(ZIP_SIGNATURES):
                    preview = head[:60].decode("utf-8", "replace")
                    raise RetryableRequestError(
                        f"download of series {series_uid} is not a ZIP (starts with {preview!r})")
                chunk, head = head, None
            await target.feed(chunk)
            guard.credit(time.monotonic() - ours)
        if head is not None:
            raise RetryableRequestError(f"download of series {series_uid} was empty or not a ZIP")
        await target.flush()
    return received


class _PartialFile:
    """The ``.partial`` file of ``fetch_series_zip``: chunks are gathered into batches of
    ``batch_bytes`` and each is written with one ``os.writev`` in a worker thread."""

    def __init__(self, dest: Path, batch_bytes: int) -> None:
        self.dest = dest
        self._batch_bytes = batch_bytes
        self._batch: list[bytes] = []
        self._batched = 0
        try:
            self._fd: int | None = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise classify_os_error(exc, dest.name) from None

    async def feed(self, chunk: bytes) -> None:
        self._batch.append(chunk)
        self._batched += len(chunk)
        if self._batched >= self._batch_bytes:
            await self.flush()

    async def flush(self) -> None:
        batch, self._batch, self._batched = self._batch, [], 0
        if batch and self._fd is not None:
            await _write_batch(self._fd, batch, self.dest)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:
                raise classify_os_error(exc, self.dest.name) from None


async def _write_batch(fd: int, batch: list[bytes], dest: Path) -> int:
    """Write ``batch`` at the end of ``fd`` in a worker thread; returns the byte count."""
    try:
        return await anyio.to_thread.run_sync(_writev_all, fd, batch)
    except OSError as exc:
        raise classify_os_error(exc, dest.name) from None


_IOV_MAX = 512  # buffers per writev call, below every platform's IOV_MAX


def _writev_all(fd: int, parts: list[bytes]) -> int:
    total = sum(len(p) for p in parts)
    views = [memoryview(p) for p in parts]
    while views:
        n = os.writev(fd, views[:_IOV_MAX])
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total
