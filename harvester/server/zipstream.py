"""A streaming ZIP writer in constant memory, in two formats.

``deflated`` (the default, :data:`DEFAULT_ZIP_FORMAT`) is what the real NBIA service sends:
its ``java.util.zip.ZipOutputStream`` with default entries. Every entry is DEFLATED (zlib
level 6, raw deflate), general-purpose flags 0x0808 (bit 3: CRC and sizes are zero in the local
header and follow the data in a ``PK\x07\x08`` data descriptor; bit 11: UTF-8 names), version
20, no extra fields in local headers, external attributes 0. As Java does it, a data descriptor
carries 8-byte sizes when either size reaches 0xFFFFFFFF (4-byte otherwise), a central header
gets a ZIP64 extra (uncompressed size, compressed size, offset: only those that reach
0xFFFFFFFF, in that order) and then version 45, and the end records turn ZIP64 when the
central directory's size or offset reaches 0xFFFFFFFF or the entry count reaches 65,535.

``stored`` is the older writer, kept for faults and tests: STORED entries with the real sizes
and CRC in the local header (no data descriptor), which streaming unzippers follow too.

Invariants: entries are written in the order given; each entry's bytes are streamed exactly
once and compressed as they stream (never a whole entry in memory); the central directory is
written only after every entry was streamed and checked, so a ZIP that ends cleanly always has
correct sizes and CRCs. ZIP64 records are used only when a size, offset or entry count needs
them (or when ``force_zip64`` asks for them in tests).

An entry may carry a precomputed raw deflate stream (``ZipEntry.deflated``, from
:mod:`harvester.server.deflatecache`): the ``deflated`` writer then sends it instead of
compressing, and the ZIP is byte for byte the same, since both come from :func:`new_deflater`
and zlib's output does not depend on how the input is cut into chunks. Such a stream may be
held whole in memory, within the cache's bound; its size and CRC-32 were checked against the
file's bytes when it was computed, and its length is checked as it is sent.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import struct
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiofiles

from harvester.containment import open_indexed

_U32 = 0xFFFFFFFF
_U16 = 0xFFFF
_VERSION_PLAIN = 20
_VERSION_ZIP64 = 45
_FLAG_UTF8 = 0x0800
_FLAG_DESCRIPTOR = 0x0008
_METHOD_DEFLATED = 8
_DESCRIPTOR_SIG = 0x08074B50
#: zlib level of java.util.zip.Deflater's DEFAULT_COMPRESSION
DEFLATE_LEVEL = 6
#: Chunks at least this big are deflated in a worker thread (zlib releases the GIL), so one
#: download's compression neither stalls the event loop nor keeps the other core idle.
THREAD_DEFLATE_MIN = 64 * 1024
ZIP_FORMATS = ("deflated", "stored")
DEFAULT_ZIP_FORMAT = "deflated"
_UNIX_REGULAR_FILE = 0o100644 << 16
#: The timestamp of every entry, so identical inputs give byte-identical ZIPs.
FIXED_MTIME = dt.datetime(2020, 1, 1, 0, 0, 0)
READ_CHUNK = 256 * 1024


def new_deflater() -> zlib._Compress:
    """The deflater of every DEFLATED entry (live or cached): raw deflate, level 6, zlib's
    default memory level and strategy, as ``java.util.zip.Deflater`` with default settings."""
    return zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)


class ZipSourceError(Exception):
    """An entry's bytes did not match the size or CRC-32 announced for it (file changed on disk).

    Raised by :func:`zip_stream` before the central directory is written, so the receiver
    sees a broken download rather than a well-formed ZIP with wrong contents.
    """


class Precompressed(Protocol):
    """An entry's raw deflate stream computed beforehand by :func:`new_deflater`: the size and
    CRC-32 of the bytes it holds, its own length ``csize``, and its bytes in chunks."""

    size: int
    crc32: int
    csize: int

    def chunks(self) -> AsyncIterator[bytes]: ...


@dataclass(frozen=True)
class ZipEntry:
    """One entry to stream: its name, exact size and CRC-32, and a factory for its bytes.

    ``deflated``, when set, is awaited by the ``deflated`` writer for the entry's precomputed
    stream; ``None`` from it (or no ``deflated``) means: compress ``chunks()`` as they stream.
    """

    name: str
    size: int
    crc32: int
    chunks: Callable[[], AsyncIterator[bytes]]
    deflated: Callable[[], Awaitable[Precompressed | None]] | None = None


def bytes_entry(name: str, data: bytes) -> ZipEntry:
    """An entry whose content is already in memory (LICENSE, md5hashes.csv)."""

    async def chunks() -> AsyncIterator[bytes]:
        yield data

    return ZipEntry(name, len(data), zlib.crc32(data), chunks)


def file_entry(name: str, path: Path, size: int, crc32: int, *, flip_last_byte: bool = False,
               chunk_size: int = READ_CHUNK,
               deflated: Callable[[], Awaitable[Precompressed | None]] | None = None) -> ZipEntry:
    """An entry read from ``path`` in chunks without blocking the event loop.

    With ``flip_last_byte`` the last byte is inverted on the way out (the corrupt fault);
    ``crc32`` must then be the CRC of the altered bytes. Reading raises ``OSError``.
    ``deflated``: see :class:`ZipEntry`.
    """

    async def chunks() -> AsyncIterator[bytes]:
        position = 0
        async with aiofiles.open(path, "rb", opener=open_indexed) as fh:   # never through a link
            while True:
                chunk = await fh.read(chunk_size)
                if not chunk:
                    return
                end = position + len(chunk)
                if flip_last_byte and position <= size - 1 < end:
                    buf = bytearray(chunk)
                    buf[size - 1 - position] ^= 0xFF
                    chunk = bytes(buf)
                position = end
                yield chunk

    return ZipEntry(name, size, crc32, chunks, deflated)


def _dos_datetime(moment: dt.datetime) -> tuple[int, int]:
    date = ((moment.year - 1980) << 9) | (moment.month << 5) | moment.day
    time = (moment.hour << 11) | (moment.minute << 5) | (moment.second // 2)
    return time, date


@dataclass
class _Written:
    name: bytes
    flags: int
    size: int
    crc32: int
    offset: int


def _local_header(name: bytes, flags: int, size: int, crc: int, zip64: bool, time: int, date: int) -> bytes:
    extra = struct.pack("<HHQQ", 0x0001, 16, size, size) if zip64 else b""
    shown = _U32 if zip64 else size
    return struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, _VERSION_ZIP64 if zip64 else _VERSION_PLAIN, flags, 0,
        time, date, crc, shown, shown, len(name), len(extra),
    ) + name + extra


def _central_header(item: _Written, force_zip64: bool, time: int, date: int) -> bytes:
    big_size = force_zip64 or item.size >= _U32
    big_offset = force_zip64 or item.offset >= _U32
    fields: list[int] = []
    if big_size:
        fields += [item.size, item.size]
    if big_offset:
        fields.append(item.offset)
    extra = struct.pack(f"<HH{len(fields)}Q", 0x0001, 8 * len(fields), *fields) if fields else b""
    version = _VERSION_ZIP64 if fields else _VERSION_PLAIN
    return struct.pack(
        "<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | version, version, item.flags, 0, time, date,
        item.crc32, _U32 if big_size else item.size, _U32 if big_size else item.size,
        len(item.name), len(extra), 0, 0, 0, _UNIX_REGULAR_FILE, _U32 if big_offset else item.offset,
    ) + item.name + extra


def _end_records(count: int, cd_offset: int, cd_size: int, force_zip64: bool) -> bytes:
    out = b""
    zip64 = force_zip64 or count >= _U16 or cd_offset >= _U32 or cd_size >= _U32
    if zip64:
        eocd64_offset = cd_offset + cd_size
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, (3 << 8) | _VERSION_ZIP64, _VERSION_ZIP64,
                           0, 0, count, count, cd_size, cd_offset)
        out += struct.pack("<IIQI", 0x07064B50, 0, eocd64_offset, 1)
    out += struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, min(count, _U16), min(count, _U16),
        min(cd_size, _U32) if not zip64 else _U32, min(cd_offset, _U32) if not zip64 else _U32, 0,
    )
    return out


async def _aiter(entries: AsyncIterable[ZipEntry] | Iterable[ZipEntry]) -> AsyncIterator[ZipEntry]:
    if isinstance(entries, AsyncIterable):
        async for entry in entries:
            yield entry
    else:
        for entry in entries:
            yield entry


async def zip_stream(entries: AsyncIterable[ZipEntry] | Iterable[ZipEntry], *,
                     mtime: dt.datetime = FIXED_MTIME, force_zip64: bool = False,
                     zip_format: str = DEFAULT_ZIP_FORMAT) -> AsyncIterator[bytes]:
    """Yield the bytes of a ZIP holding ``entries`` in ``zip_format`` (one of
    :data:`ZIP_FORMATS`), ready to write to a socket.

    Raises :class:`ZipSourceError` when an entry yields a different number of bytes or a
    different CRC-32 than it announced, whatever reading an entry raises (``OSError``), and
    ``ValueError`` for an unknown ``zip_format``.
    """
    if zip_format == "deflated":
        async for piece in _deflated_stream(entries, mtime, force_zip64):
            yield piece
        return
    if zip_format != "stored":
        raise ValueError(f"unknown ZIP format {zip_format!r} (one of {', '.join(ZIP_FORMATS)})")
    time, date = _dos_datetime(mtime)
    offset = 0
    written: list[_Written] = []
    async for entry in _aiter(entries):
        name = entry.name.encode("utf-8")
        flags = 0 if entry.name.isascii() else _FLAG_UTF8
        zip64 = force_zip64 or entry.size >= _U32
        header = _local_header(name, flags, entry.size, entry.crc32, zip64, time, date)
        written.append(_Written(name, flags, entry.size, entry.crc32, offset))
        yield header
        offset += len(header)
        sent, crc = 0, 0
        async for chunk in entry.chunks():
            sent += len(chunk)
            if sent > entry.size:
                raise ZipSourceError(f"{entry.name}: more than the announced {entry.size} bytes")
            crc = zlib.crc32(chunk, crc)
            yield chunk
        if sent != entry.size or crc != entry.crc32:
            raise ZipSourceError(f"{entry.name}: sent {sent} bytes with CRC {crc:08x}, "
                                 f"announced {entry.size} bytes with CRC {entry.crc32:08x}")
        offset += sent
    cd_offset = offset
    central = b"".join(_central_header(item, force_zip64, time, date) for item in written)
    yield central
    yield _end_records(len(written), cd_offset, len(central), force_zip64)


@dataclass
class _Deflated:
    name: bytes
    size: int
    csize: int
    crc32: int
    offset: int


def _java_central_header(item: _Deflated, force_zip64: bool, time: int, date: int) -> bytes:
    """A central header as ``ZipOutputStream.writeCEN`` writes it (ZIP64 extra: size, csize,
    offset, each only when it reaches 0xFFFFFFFF)."""
    fields = [value for value in (item.size, item.csize, item.offset) if force_zip64 or value >= _U32]
    big_size, big_csize, big_offset = (force_zip64 or v >= _U32 for v in (item.size, item.csize, item.offset))
    extra = struct.pack(f"<HH{len(fields)}Q", 0x0001, 8 * len(fields), *fields) if fields else b""
    version = _VERSION_ZIP64 if fields else _VERSION_PLAIN
    return struct.pack(
        "<IHHHHHHIIIHHHHHII", 0x02014B50, version, version, _FLAG_DESCRIPTOR | _FLAG_UTF8, _METHOD_DEFLATED,
        time, date, item.crc32, _U32 if big_csize else item.csize, _U32 if big_size else item.size,
        len(item.name), len(extra), 0, 0, 0, 0, _U32 if big_offset else item.offset,
    ) + item.name + extra


def _java_end_records(count: int, cd_offset: int, cd_size: int, force_zip64: bool) -> bytes:
    """End records as ``ZipOutputStream.writeEND`` writes them: ZIP64 when the central
    directory's size or offset reaches 0xFFFFFFFF or the count reaches 0xFFFF; in the classic
    record only the field that overflowed says 0xFFFFFFFF (0xFFFF for the count)."""
    big_size, big_offset = cd_size >= _U32, cd_offset >= _U32
    zip64 = force_zip64 or big_size or big_offset or count >= _U16
    out = b""
    if zip64:
        eocd64_offset = cd_offset + cd_size
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, _VERSION_ZIP64, _VERSION_ZIP64,
                           0, 0, count, count, cd_size, cd_offset)
        out += struct.pack("<IIQI", 0x07064B50, 0, eocd64_offset, 1)
    shown_count = _U16 if zip64 and count >= _U16 else count
    return out + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, shown_count, shown_count,
                             _U32 if big_size else cd_size, _U32 if big_offset else cd_offset, 0)


async def _deflated_stream(entries: AsyncIterable[ZipEntry] | Iterable[ZipEntry], mtime: dt.datetime,
                           force_zip64: bool) -> AsyncIterator[bytes]:
    """The ``deflated`` format (see the module docstring); raises as :func:`zip_stream`."""
    time, date = _dos_datetime(mtime)
    offset = 0
    written: list[_Deflated] = []
    async for entry in _aiter(entries):
        name = entry.name.encode("utf-8")
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, _VERSION_PLAIN, _FLAG_DESCRIPTOR | _FLAG_UTF8,
                             _METHOD_DEFLATED, time, date, 0, 0, 0, len(name), 0) + name
        yield header
        entry_offset, offset = offset, offset + len(header)
        ready = await entry.deflated() if entry.deflated is not None else None
        tail = b""
        if ready is not None:
            if ready.size != entry.size or ready.crc32 != entry.crc32:
                raise ZipSourceError(f"{entry.name}: precomputed for {ready.size} bytes with CRC {ready.crc32:08x}, "
                                     f"announced {entry.size} bytes with CRC {entry.crc32:08x}")
            sent, crc, csize = ready.size, ready.crc32, 0
            async for packed in ready.chunks():
                csize += len(packed)
                yield packed
            if csize != ready.csize:
                raise ZipSourceError(f"{entry.name}: precomputed stream of {csize} bytes, announced {ready.csize}")
        else:
            deflater = new_deflater()
            sent = csize = crc = 0
            async for chunk in entry.chunks():
                sent += len(chunk)
                if sent > entry.size:
                    raise ZipSourceError(f"{entry.name}: more than the announced {entry.size} bytes")
                crc = zlib.crc32(chunk, crc)
                if len(chunk) >= THREAD_DEFLATE_MIN:
                    packed = await asyncio.to_thread(deflater.compress, chunk)
                else:
                    packed = deflater.compress(chunk)
                if packed:
                    csize += len(packed)
                    yield packed
            if sent != entry.size or crc != entry.crc32:
                raise ZipSourceError(f"{entry.name}: sent {sent} bytes with CRC {crc:08x}, "
                                     f"announced {entry.size} bytes with CRC {entry.crc32:08x}")
            tail = deflater.flush()
            csize += len(tail)
        wide = sent >= _U32 or csize >= _U32
        descriptor = struct.pack("<IIQQ" if wide else "<IIII", _DESCRIPTOR_SIG, crc, csize, sent)
        yield tail + descriptor
        offset += csize + len(descriptor)
        written.append(_Deflated(name, sent, csize, crc, entry_offset))
    central = b"".join(_java_central_header(item, force_zip64, time, date) for item in written)
    yield central
    yield _java_end_records(len(written), offset, len(central), force_zip64)
