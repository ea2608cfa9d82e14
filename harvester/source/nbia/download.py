"""Stream one series ZIP, with request-level retries, into a streaming sink
(``stream_series_zip``): the series is verified and unpacked as it arrives (see
``harvester.store.sink``); no ``.partial`` file, for getImage as for getDCMImage's annotations.

Memory is at most about two write batches (``chunk_size``) per series in flight, whatever the
series size: received chunks are gathered by the sink into batches and each batch is handled
in a worker thread, so file I/O stays off the event loop and the loop pays one thread hop per
batch instead of one per network read. Before a byte is kept, the status and content type are
checked (``NBIAClient.open_series``) and the first bytes must carry the ZIP signature: an
outage page sent with HTTP 200 is retried, not unzipped.

Every attempt is bounded (``BodyGuard``): the per-request deadline and the stall rule of the
config, the idle read timeout (``IdleWatch``: no byte for ``config.read_timeout`` seconds while
we wait for one), and ``max_bytes``, the size the archive announced for the series plus a margin
(``download_bound``; counted after any Content-Encoding is decoded), past which the download
stops with ``OversizeDownloadError`` and the sink is discarded.

Raises ``RetryableRequestError`` once the request-level retries are spent, the client's
permanent errors at once, ``OversizeDownloadError`` (the series is retried later, then failed),
and what the sink raises (``DiskFullError``/``OutputNotWritableError`` when the disk fails).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from harvester.config import Limits
from harvester.errors import OversizeDownloadError, RetryableRequestError
from harvester.source.http import BodyGuard, IdleWatch, redact_url
from harvester.rate import RateLimiter
from harvester.source.nbia.client import NBIAClient

T = TypeVar("T", covariant=True)

ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
#: ZIP bytes allowed per entry beyond its data (local header, data descriptor, central record,
#: a name of up to 255 bytes twice), plus the LICENSE and md5hashes.csv of a getImage answer
ZIP_ENTRY_OVERHEAD = 30 + 16 + 46 + 2 * 255
ZIP_FIXED_OVERHEAD = 1 << 20
#: ``on_bytes`` hears of the bytes received in steps of at least this much (and at the end of an
#: attempt): one event per network read (about 20 KB) cost the event loop more than the progress
#: and the connection controller gain from it
REPORT_BYTES = 256 << 10


def download_bound(file_size: int | None, image_count: int | None, limits: Limits) -> int | None:
    """The most ZIP bytes a series announced as ``file_size`` bytes in ``image_count`` files may
    take: deflate never grows data by more than a few bytes per block, so the DICOM bytes plus
    ``limits.max_series_overhead``, the ZIP's own records per entry and a fixed megabyte. None
    (no bound but the deadline and the disk) when the archive announced no size."""
    if not file_size or file_size <= 0:
        return None
    entries = max(image_count or 0, 0) + 2
    return int(file_size * (1 + limits.max_series_overhead)) + entries * ZIP_ENTRY_OVERHEAD + ZIP_FIXED_OVERHEAD


class ZipTarget(Protocol[T]):
    """What ``stream_series_zip`` pours a ZIP into: a ``SeriesZipSink`` (``close`` gives the
    verified series) or an ``AnnotationSink`` (``close`` gives the annotation files)."""

    async def feed(self, chunk: bytes) -> None: ...

    async def close(self) -> T: ...

    def discard(self) -> None: ...


async def stream_series_zip(client: NBIAClient, series_uid: str, collection: str | None,
                            open_sink: Callable[[], ZipTarget[T]], *, chunk_size: int = 1 << 20,
                            rate: RateLimiter | None = None, on_bytes: Callable[[int], None] | None = None,
                            max_bytes: int | None = None, on_latency: Callable[[float], None] | None = None,
                            hold: Callable[[], contextlib.AbstractAsyncContextManager[Any]] | None = None) -> T:
    """Stream the series ZIP into a sink (``open_sink()``, a fresh one per attempt) and return
    what its ``close`` gives: no ``.partial`` file. A failed attempt discards its sink, so the
    staging folder holds nothing of it. ``on_latency`` hears each attempt's seconds from
    sending the request to its headers (one round trip, for the connection controller);
    ``hold()``, when given, is entered around each attempt's body only (a connection of the
    engine's): none is held through a back-off between attempts, nor by the sink's close.
    ``client`` may be any opener with ``config``, ``retrying``, ``series_url`` and
    ``open_series`` (``AnnotationOpener``). Raises as the module docstring says."""
    async for attempt in client.retrying():
        with attempt:
            sink = open_sink()
            try:
                async with hold() if hold is not None else contextlib.nullcontext():
                    await _fetch_once(client, series_uid, collection, sink, chunk_size, rate, on_bytes, max_bytes,
                                      on_latency)
                return await sink.close()
            except BaseException:
                sink.discard()  # blocking but quick; it must run even when cancelled
                raise
    raise AssertionError("unreachable")  # pragma: no cover


async def _fetch_once(client: NBIAClient, series_uid: str, collection: str | None,
                      target: ZipTarget[Any], chunk_size: int, rate: RateLimiter | None,
                      on_bytes: Callable[[int], None] | None, max_bytes: int | None,
                      on_latency: Callable[[float], None] | None = None) -> int:
    """One attempt: the checked body, chunk by chunk, into ``target``; returns its size."""
    received = 0
    shown = redact_url(client.series_url(series_uid, collection))

    def too_big(total: int) -> OversizeDownloadError:
        return OversizeDownloadError(
            f"download of series {series_uid} passed {total} bytes, more than the {max_bytes} the archive's "
            "announced size allows: not the announced series", series_uid=series_uid)

    guard = BodyGuard(client.config, shown, max_bytes=max_bytes, too_big=too_big)
    unreported = 0   # bytes received but not yet told to ``on_bytes`` (told at least every REPORT_BYTES)
    sent = time.monotonic()
    # the idle read timeout, kept here (open_series' request has none of aiohttp's: a timer per read)
    try:
        with IdleWatch(client.config.read_timeout, shown) as idle:
            async with client.open_series(series_uid, collection) as resp:
                if on_latency is not None:
                    on_latency(time.monotonic() - sent)
                idle.ready()
                head = b""  # the first bytes, until the ZIP signature could be checked
                # half a chunk per read: aiohttp raises its buffer's high water to twice what
                # iter_chunked asks for (StreamReader.set_read_chunk_size), and fills it while the
                # sink's thread works on the last batch; so a series holds about one chunk there,
                # one batch in the sink and one inflated piece, whatever the load
                async for chunk in resp.content.iter_chunked(max(1, chunk_size // 2)):
                    guard.feed(len(chunk))
                    ours = time.monotonic()  # from here to the next read: our side's time, not the server's
                    with idle.ours():
                        if rate is not None:
                            await rate.consume(len(chunk))
                        received += len(chunk)
                        unreported += len(chunk)
                        if on_bytes is not None and unreported >= REPORT_BYTES:
                            on_bytes(unreported)
                            unreported = 0
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
    finally:
        if on_bytes is not None and unreported:
            on_bytes(unreported)   # every byte received is counted, a failed attempt's too
    return received  # the last batch goes with the sink's close: one thread hop for both
