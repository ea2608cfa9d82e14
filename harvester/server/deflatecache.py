"""Each instance's raw deflate stream, computed once and reused, so that a DEFLATED ZIP answer
is local headers + cached deflate data + data descriptors + central directory, written at the
speed of the socket rather than of zlib.

Why: level-6 deflate of random synthetic pixels runs at about 20-26 MB/s per core, so a server
compressing every entry of every download is the bottleneck of every benchmark, and every client
looks alike. The stream depends only on the file's bytes and the deflater's settings
(:func:`harvester.server.zipstream.new_deflater`, shared with the live writer), and zlib's output
does not depend on how its input is cut into chunks: a cached answer is byte for byte the live
one (``tests/test_server_zipstream.py`` asserts it).

Two tiers, each optional:

* memory: an LRU bounded by the bytes of deflate data it holds (``memory_bytes``); invariant:
  the bytes held never exceed the bound, and an entry bigger than a quarter of it is never held;
* disk: one file per instance under ``directory`` (``harvester serve`` uses
  ``<cache-dir>/deflate`` for a synthetic archive; none for a harvested DIR unless
  ``--deflate-cache DIR``). A file is written under a temporary name and renamed, so a reader
  never sees half of one; its header repeats the size, CRC-32 and length of the stream, and a
  file whose header or length disagrees is a miss (recomputed and replaced). The directory
  grows to about the size of the archive served; deleting it is safe (a download reading one
  of its files at that moment may be cut short, as when a source file goes away), and so is
  a ``.*.tmp`` file that a killed computation left (never read).

The key is the indexed path plus what ``fstat`` says of the file opened *now* (device, inode,
size, mtime in ns), the CRC-32 announced for it, the deflater's settings and zlib's version.
Every lookup opens the source with ``open_indexed``, so a file swapped for a link since loading
is refused as before; a file changed on disk is a new key, and computing it checks its bytes
against the announced size and CRC-32 (:class:`ZipSourceError`), so a stale or wrong stream is
never served.

Concurrency: lookups run on one event loop; a miss starts one computation of that key in a
worker thread (zlib and file I/O release the GIL), and every lookup of the key meanwhile awaits
the same computation: computed once. Precomputing from another process (``precompute``) while a
server runs is harmless: the renames are atomic and both write the same bytes.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import struct
import tempfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiofiles

from harvester.containment import open_indexed, open_nofollow
from harvester.server.zipstream import DEFLATE_LEVEL, READ_CHUNK, ZipSourceError, new_deflater

#: Memory tier of ``harvester serve`` unless ``--deflate-cache-memory`` says otherwise.
DEFAULT_MEMORY_BYTES = 16 * 1024 * 1024
#: Bumped whenever the file format or the deflater's settings change.
FORMAT_VERSION = 1
_MAGIC = b"HVDEFL%02d" % FORMAT_VERSION   # 8 bytes
_HEADER = struct.Struct("<8sQIQ")  # magic, size, crc32, csize
#: Cached files at most this long are read in one piece; longer ones are streamed.
_READ_WHOLE = 1024 * 1024

_Key = tuple[str, int, int, int, int, int]


@dataclass(frozen=True)
class DeflatedStream:
    """One entry's raw deflate stream (:class:`harvester.server.zipstream.Precompressed`):
    ``data`` in memory, or ``path`` on disk (the stream follows the header)."""

    size: int
    crc32: int
    csize: int
    data: bytes | None = None
    path: Path | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The stream's bytes. Raises ``OSError`` if the disk file went away."""
        if self.data is not None:
            yield self.data
            return
        assert self.path is not None
        async with aiofiles.open(self.path, "rb", opener=open_nofollow) as fh:
            await fh.seek(_HEADER.size)
            while chunk := await fh.read(READ_CHUNK):
                yield chunk


class DeflateCache:
    """See the module docstring. ``directory=None``: memory only; ``memory_bytes=0``: disk only.

    Use :meth:`lookup` from the event loop; :meth:`precompute` from a plain thread.
    """

    def __init__(self, directory: Path | None = None, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        if memory_bytes < 0:
            raise ValueError("memory_bytes must not be negative")
        self.directory = Path(directory).expanduser().resolve() if directory is not None else None
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[_Key, DeflatedStream] = OrderedDict()
        self._held = 0
        self._inflight: dict[_Key, asyncio.Future[DeflatedStream | None]] = {}
        self._count_lock = threading.Lock()   # computations run in several worker threads
        self.computed = 0   # streams compressed by this cache (not read back from disk)

    @property
    def held_bytes(self) -> int:
        """Bytes of deflate data held in memory (never above ``memory_bytes``)."""
        return self._held

    async def lookup(self, path: Path, size: int, crc32: int) -> DeflatedStream | None:
        """The deflate stream of the file indexed at ``path`` announced with ``size`` and ``crc32``,
        or ``None`` when it cannot be cached (no directory and too big for memory): the caller
        then compresses as it streams.

        Raises ``OSError`` when the file cannot be opened through ``open_indexed`` (gone, or a
        link since loading) and :class:`ZipSourceError` when its bytes differ from the announced
        size or CRC-32.
        """
        if self.directory is None and size > self.memory_bytes // 4:
            return None
        key = await asyncio.to_thread(_key_of, path, crc32)
        if key[3] != size:
            raise ZipSourceError(f"{path.name}: {key[3]} bytes on disk, announced {size}")
        held = self._memory.get(key)
        if held is not None:
            self._memory.move_to_end(key)
            return held
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(asyncio.to_thread(self._load_or_compute, path, key))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._settle(key, done))
        return await asyncio.shield(task)  # one waiter going away does not cancel the others'

    def precompute(self, entries: Iterable[tuple[Path, int]], threads: int = 2) -> int:
        """Compute the disk files of ``entries`` (indexed path, CRC-32) not there yet, in
        ``threads`` threads; returns how many were computed. For a benchmark's warm-up: a server
        using the same directory then finds them. Raises ``ValueError`` without a directory,
        ``OSError`` and :class:`ZipSourceError` as :meth:`lookup`."""
        if self.directory is None:
            raise ValueError("precompute needs a cache directory")

        def one(item: tuple[Path, int]) -> bool:
            key = _key_of(item[0], item[1])
            if _read_disk(self._disk_path(key), key, read=False, whole=False) is not None:
                return False
            self._compute(item[0], key, small=False)
            return True

        with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
            return sum(pool.map(one, entries))

    def disk_path(self, path: Path, crc32: int) -> Path:
        """Blocking: where the disk file of the file indexed at ``path`` is (or would be) kept.
        Raises ``ValueError`` without a directory, ``OSError`` as :meth:`lookup`."""
        if self.directory is None:
            raise ValueError("a memory-only cache keeps no files")
        return self._disk_path(_key_of(path, crc32))

    # ------------------------------------------------------------------ internals
    def _settle(self, key: _Key, done: asyncio.Future[DeflatedStream | None]) -> None:
        """On the loop, when a computation ends: forget it, keep its stream in memory if it fits."""
        self._inflight.pop(key, None)
        if done.cancelled() or done.exception() is not None:
            return
        stream = done.result()
        if stream is None or stream.data is None or stream.csize > self.memory_bytes // 4:
            return
        self._memory[key] = stream
        self._held += stream.csize
        while self._held > self.memory_bytes:  # invariant: never above the bound
            _, evicted = self._memory.popitem(last=False)
            self._held -= evicted.csize

    def _disk_path(self, key: _Key) -> Path:
        assert self.directory is not None
        digest = hashlib.sha256(repr(key).encode("utf-8")).hexdigest()
        return self.directory / digest[:2] / f"{digest}.deflate"

    def _load_or_compute(self, path: Path, key: _Key) -> DeflatedStream | None:
        """Blocking (a worker thread): the disk file of ``key`` if valid, else compress ``path``
        (and store it on disk if there is a directory); a stream small enough for the memory
        tier comes back with its bytes."""
        small = key[3] <= self.memory_bytes // 4
        if self.directory is not None:
            found = _read_disk(self._disk_path(key), key, read=True, whole=small)
            if found is not None:
                return found
        return self._compute(path, key, small)

    def _compute(self, path: Path, key: _Key, small: bool) -> DeflatedStream:
        size, crc32 = key[3], key[5]
        target = self._disk_path(key) if self.directory is not None else None
        parts: list[bytes] | None = [] if small or target is None else None
        out = None
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".tmp")
            out = os.fdopen(fd, "wb")
            out.write(_HEADER.pack(_MAGIC, 0, 0, 0))   # rewritten once the stream is known
        try:
            deflater = new_deflater()
            sent = csize = crc = 0
            with open(path, "rb", opener=open_indexed) as src:   # never through a link
                while chunk := src.read(READ_CHUNK):
                    sent += len(chunk)
                    crc = zlib.crc32(chunk, crc)
                    packed = deflater.compress(chunk)
                    csize += len(packed)
                    if out is not None:
                        out.write(packed)
                    if parts is not None:
                        parts.append(packed)
            if sent != size or crc != crc32:
                raise ZipSourceError(f"{path.name}: read {sent} bytes with CRC {crc:08x}, "
                                     f"announced {size} bytes with CRC {crc32:08x}")
            tail = deflater.flush()
            csize += len(tail)
            if parts is not None:
                parts.append(tail)
            if out is not None:
                assert target is not None
                out.write(tail)
                out.seek(0)
                out.write(_HEADER.pack(_MAGIC, size, crc32, csize))
                out.close()
                os.replace(temp, target)   # invariant: a cache file under its name is complete
                out = None
        finally:
            if out is not None:
                out.close()
                os.unlink(temp)
        with self._count_lock:
            self.computed += 1
        if parts is not None:
            return DeflatedStream(size, crc32, csize, data=b"".join(parts))
        return DeflatedStream(size, crc32, csize, path=target)


def _key_of(path: Path, crc32: int) -> _Key:
    """Blocking: the cache key of the file indexed at ``path``, opened now through
    ``open_indexed`` (raises ``OSError`` as it does)."""
    fd = open_indexed(str(path), os.O_RDONLY)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    settings = (FORMAT_VERSION, DEFLATE_LEVEL, zlib.ZLIB_RUNTIME_VERSION)
    return (f"{path}|{settings}", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, crc32)


def _read_disk(target: Path, key: _Key, read: bool, whole: bool) -> DeflatedStream | None:
    """Blocking: the stream in ``target`` if its header and length agree with ``key``, else
    ``None`` (absent, partial or foreign: recomputed). ``read``: read the bytes of a short one
    into memory (``whole``: whatever its length) rather than stream them later."""
    try:
        with open(target, "rb", opener=open_nofollow) as fh:
            length = os.fstat(fh.fileno()).st_size
            header = fh.read(_HEADER.size)
            if len(header) != _HEADER.size:
                return None
            magic, size, crc32, csize = _HEADER.unpack(header)
            if (magic, size, crc32) != (_MAGIC, key[3], key[5]) or length != _HEADER.size + csize:
                return None
            if read and (whole or csize <= _READ_WHOLE):
                data = fh.read()
                return DeflatedStream(size, crc32, csize, data=data) if len(data) == csize else None
    except OSError:
        return None
    return DeflatedStream(size, crc32, csize, path=target)
