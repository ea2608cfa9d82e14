"""A sans-IO reader of a ZIP as a stream, front to back, in memory bounded per entry.

``ZipStreamReader.feed(chunk)`` is a generator of events, in order::

    ("entry", LocalEntry)       a local header: name, flags, method, declared sizes if any
    ("data", bytes-like)        uncompressed bytes of that entry (at most ``OUTPUT_STEP`` each)
    ("end", EntryEnd)           the entry's sizes and CRC-32, checked against its descriptor
    ("central", CentralRecord)  each central directory record, before it is compared with its entry
    ("directory", [Central])    once, at the end record: the directory, checked against the entries seen

A consumer that stops iterating (to refuse an entry) abandons the reader. ``close()`` raises
unless the end of central directory record was read. What is read: STORED entries with their
sizes in the local header, DEFLATED entries with or without a data descriptor (general-purpose
bit 3; the descriptor with or without its signature, 4- or 8-byte sizes) as Java's
``ZipOutputStream`` writes them, ZIP64 extra fields and end records. Everything else raises
``ZipStreamError``: another method (the bytes are not read), a STORED entry with a data
descriptor (its end cannot be found without guessing), a local header or data that disagrees
with the central directory (name, CRC-32, sizes, offset, count), end records that disagree with
the directory, anything after the end record's comment.

Memory: the unparsed tail of the last chunk (a record's bytes: at most 46 + 3 x 65,535), zlib's
window and one output step; per entry, two small records (its local header's and its central
one, for the directory check). The
checks of names, sizes and counts against limits are the consumer's (``harvester.store.sink``),
which sees each entry before any of its bytes.
"""
from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: the most uncompressed bytes one ``data`` event carries
OUTPUT_STEP = 1 << 20
#: compressed bytes handed to zlib per call (zlib copies what it has not consumed each call)
_INPUT_STEP = 256 << 10
_FIRST_INPUT_STEP = 16 << 10
#: bytes past the last entry's compressed size the first piece of the next one takes (its
#: deflate stream may be a little longer: the instances of a series are alike, not equal)
_HINT_SLACK = 4 << 10
_U32, _U16 = 0xFFFFFFFF, 0xFFFF
_LOCAL, _CENTRAL, _DESCRIPTOR = b"PK\x03\x04", b"PK\x01\x02", b"PK\x07\x08"
_END, _END64, _LOCATOR64 = b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"
_LOCAL_HEAD = struct.Struct("<IHHHHHIIIHH")          # 30 bytes
_CENTRAL_HEAD = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
_END_HEAD = struct.Struct("<IHHHHIIH")               # 22 bytes
STORED, DEFLATED = 0, 8
FLAG_ENCRYPTED, FLAG_DESCRIPTOR, FLAG_UTF8 = 0x1, 0x8, 0x800


class ZipStreamError(ValueError):
    """The bytes are not a ZIP this reader can vouch for; the message says where."""


@dataclass(frozen=True)
class LocalEntry:
    name: str                  # decoded (UTF-8 with flag bit 11, else cp437, as zipfile does)
    flags: int
    method: int
    offset: int                # of the local header in the stream
    declared_size: int | None  # uncompressed size from the local header, None with a data descriptor

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FLAG_ENCRYPTED)


@dataclass(frozen=True)
class EntryEnd:
    size: int
    compressed_size: int
    crc32: int


@dataclass(frozen=True)
class CentralRecord:
    name: str
    flags: int
    method: int
    crc32: int
    compressed_size: int
    size: int
    offset: int
    external_attr: int


@dataclass
class _Seen:
    raw_name: bytes
    offset: int
    method: int
    end: EntryEnd | None = None


def _decode(raw: bytes, flags: int) -> str:
    return raw.decode("utf-8", "replace") if flags & FLAG_UTF8 else raw.decode("cp437")


def _zip64_fields(extra: bytes, wanted: list[str]) -> dict[str, int]:
    """The ZIP64 extra field's values, in order, for the ``wanted`` fields that said 0xFFFFFFFF."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4:pos + 4 + size]
        if len(body) != size:
            raise ZipStreamError("an extra field runs past its header")
        if tag == 0x0001:
            if len(body) < 8 * len(wanted):
                raise ZipStreamError("a ZIP64 extra field is too short")
            return {name: struct.unpack_from("<Q", body, 8 * i)[0] for i, name in enumerate(wanted)}
        pos += 4 + size
    if wanted:
        raise ZipStreamError("a size says 0xFFFFFFFF but no ZIP64 extra field follows")
    return {}


def _has_zip64(extra: bytes) -> bool:
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == 0x0001:
            return True
        pos += 4 + size
    return False


class ZipStreamReader:
    """See the module docstring. One instance reads one stream; not thread-safe."""

    def __init__(self) -> None:
        self._tail = b""          # bytes received but not yet parsed (a record split by a chunk)
        self._offset = 0          # stream offset of the first byte of ``_tail``
        self._record_offset = 0   # stream offset of the record being parsed
        # header -> data [-> descriptor] -> header ... -> central -> [end64 -> locator ->] end -> done
        self._state = "header"
        self._seen: list[_Seen] = []
        self._entry: LocalEntry | None = None
        self._entry_zip64 = False
        self._expected: EntryEnd | None = None   # from the local header (no data descriptor)
        self._stored_left = 0
        self._crc = self._size = self._csize = 0
        self._inflater: Any = None
        self._drain = False        # zlib may hold output beyond the last step, with no input left
        self._hint = 0             # compressed size of the last DEFLATED entry (the next is likely alike)
        self._central: list[CentralRecord] = []
        self._central_start: int | None = None
        self._central_end: int | None = None
        self._zip64_end: tuple[int, int, int] | None = None  # (count, cd size, cd offset)
        self._comment_left = 0

    @property
    def done(self) -> bool:
        return self._state == "done" and self._comment_left == 0

    def close(self) -> None:
        """Raises ``ZipStreamError`` unless the whole ZIP, end record and comment included, was read."""
        if not self.done:
            where = f"inside entry {self._entry.name!r}" if self._state in ("data", "descriptor") and self._entry \
                else "before the end of its central directory"
            raise ZipStreamError(f"the ZIP ends {where} (cut short)")

    def feed(self, chunk: bytes | memoryview) -> Iterator[tuple[str, Any]]:
        """The events the bytes of ``chunk`` complete (see the module docstring); raises
        ``ZipStreamError``. Consume each ``data`` event before asking for the next."""
        buf = memoryview(self._tail + chunk if self._tail else chunk)
        pos = 0
        try:
            while True:
                if self._state == "data":
                    taken, events, progressed = self._data(buf, pos)
                    pos += taken
                    yield from events
                    if not progressed:
                        break
                    continue
                if self._state == "done":
                    skip = min(self._comment_left, len(buf) - pos)
                    self._comment_left -= skip
                    pos += skip
                    if pos < len(buf):
                        raise ZipStreamError("bytes follow the end of the ZIP")
                    break
                need = self._need(buf, pos)
                if need is None or pos + need > len(buf):
                    break
                self._record_offset = self._offset + pos
                rec = bytes(buf[pos:pos + need])
                pos += need
                yield from self._record(rec)
        finally:
            self._offset += pos
            self._tail = bytes(buf[pos:])

    # ------------------------------------------------------------ records

    def _need(self, buf: memoryview, pos: int) -> int | None:
        """Bytes the record at ``pos`` takes, or None when more must arrive to tell."""
        have = len(buf) - pos
        state = self._state
        if state == "descriptor":
            return self._descriptor_length(bytes(buf[pos:pos + 24])) if have >= 24 else None
        if have < 4:
            return None
        sig = bytes(buf[pos:pos + 4])
        if state == "header" and sig == _LOCAL:
            if have < 30:
                return None
            nlen, xlen = struct.unpack_from("<HH", buf, pos + 26)
            return 30 + nlen + xlen
        if state in ("header", "central") and sig == _CENTRAL:
            if have < 46:
                return None
            nlen, xlen, clen = struct.unpack_from("<HHH", buf, pos + 28)
            return 46 + nlen + xlen + clen
        if state in ("header", "central") and sig == _END64:
            if have < 12:
                return None
            size = struct.unpack_from("<Q", buf, pos + 4)[0]
            if not 44 <= size <= 1 << 16:
                raise ZipStreamError("a ZIP64 end record of an implausible size")
            return 12 + size
        if state == "locator" and sig == _LOCATOR64:
            return 20
        if state in ("header", "central", "end") and sig == _END:
            return 22
        raise ZipStreamError(f"unexpected bytes at offset {self._offset + pos} (not the ZIP record expected)")

    def _record(self, rec: bytes) -> Iterator[tuple[str, Any]]:
        sig = rec[:4]
        if self._state == "descriptor":
            yield "end", self._finish(None)
            return
        if sig == _LOCAL:
            yield from self._local(rec)
            return
        if self._state == "header":           # the first record after the entries
            self._central_start = self._record_offset
            self._state = "central"
        if sig == _CENTRAL:
            yield from self._central_record(rec)
            return
        if self._central_end is None:
            self._central_end = self._record_offset
        if sig == _END64:
            self._zip64_end = struct.unpack_from("<QQQ", rec, 32)  # count, cd size, cd offset
            self._state = "locator"
        elif sig == _LOCATOR64:
            if struct.unpack_from("<Q", rec, 8)[0] != self._central_end:
                raise ZipStreamError("the ZIP64 locator points elsewhere than its end record")
            self._state = "end"
        else:
            yield from self._end(rec)

    def _local(self, rec: bytes) -> Iterator[tuple[str, Any]]:
        (_, _version, flags, method, _t, _d, crc, csize, usize, nlen, _xlen) = _LOCAL_HEAD.unpack_from(rec)
        raw, extra = rec[30:30 + nlen], rec[30 + nlen:]
        wanted = [n for n, v in (("size", usize), ("csize", csize)) if v == _U32]
        values = _zip64_fields(extra, wanted) if wanted else {}
        usize, csize = values.get("size", usize), values.get("csize", csize)
        self._entry_zip64 = _has_zip64(extra)   # its data descriptor then has 8-byte sizes
        descriptor = bool(flags & FLAG_DESCRIPTOR)
        entry = LocalEntry(_decode(raw, flags), flags, method, self._record_offset, None if descriptor else usize)
        self._seen.append(_Seen(raw, entry.offset, method))
        self._entry = entry
        self._crc = self._size = self._csize = 0
        self._expected = None if descriptor else EntryEnd(usize, csize, crc)
        yield "entry", entry
        # the consumer has seen the header (and refused it if it was going to): now its data
        if method == STORED:
            if descriptor:
                raise ZipStreamError(f"STORED entry {entry.name!r} has a data descriptor: its end cannot be found "
                                     "in a stream")
            if csize != usize:
                raise ZipStreamError(f"STORED entry {entry.name!r} declares {csize} stored and {usize} plain bytes")
            self._stored_left = usize
        elif method == DEFLATED:
            self._inflater = zlib.decompressobj(-15)
            self._drain = False
        else:
            raise ZipStreamError(f"entry {entry.name!r} uses compression method {method}, which is not read")
        self._state = "data"

    # ------------------------------------------------------------ entry data

    def _data(self, buf: memoryview, pos: int) -> tuple[int, list[tuple[str, Any]], bool]:
        """One step of entry bytes from ``buf[pos:]``: (bytes consumed, events, whether to go on).
        A step yields at most OUTPUT_STEP bytes, so the consumer has written them before the next."""
        if self._inflater is None:  # STORED
            take = min(self._stored_left, len(buf) - pos, OUTPUT_STEP)
            events: list[tuple[str, Any]] = []
            if take:
                piece = buf[pos:pos + take]
                self._crc = zlib.crc32(piece, self._crc)
                self._size += take
                self._csize += take
                self._stored_left -= take
                events.append(("data", piece))
            if self._stored_left == 0:
                events.append(("end", self._finish(self._expected)))
            return take, events, bool(events)
        return self._inflate(buf, pos)

    def _inflate(self, buf: memoryview, pos: int) -> tuple[int, list[tuple[str, Any]], bool]:
        inflater = self._inflater
        assert self._entry is not None
        left = None if self._expected is None else self._expected.compressed_size - self._csize
        end = len(buf) if left is None else min(len(buf), pos + left)
        if pos >= end and not self._drain:
            if left == 0:
                raise ZipStreamError(f"entry {self._entry.name!r} is corrupt (its deflate stream runs past its "
                                     "compressed size)")
            return 0, [], False
        # At the end of the stream zlib copies what follows it into ``unused_data``: pieces that
        # grow with the entry (16 KiB, then as much as it has consumed) keep that copy no larger
        # than the entry itself, so a series of small entries is not copied over and over. The
        # first piece takes as much as the entry before took (and a little more): the instances
        # of a series are alike, so an entry is mostly inflated, checked, hashed and written in
        # one step each (four zlib calls and four writes an entry of 64 KiB before, each a GIL
        # hand-over between the event loop and the sink's threads).
        step = max(_FIRST_INPUT_STEP, self._csize, self._hint + _HINT_SLACK - self._csize)
        piece = buf[pos:min(end, pos + min(_INPUT_STEP, step))]
        try:
            out = inflater.decompress(piece, OUTPUT_STEP)
        except zlib.error as exc:
            raise ZipStreamError(f"entry {self._entry.name!r} is corrupt ({exc})") from None
        used = len(piece) - len(inflater.unused_data if inflater.eof else inflater.unconsumed_tail)
        self._csize += used
        self._drain = not inflater.eof and len(out) >= OUTPUT_STEP
        events: list[tuple[str, Any]] = []
        if out:
            self._crc = zlib.crc32(out, self._crc)
            self._size += len(out)
            events.append(("data", out))
        if inflater.eof:
            self._inflater = None
            self._hint = self._csize
            if self._expected is not None:
                events.append(("end", self._finish(self._expected)))
            else:
                self._state = "descriptor"
            return used, events, True
        return used, events, bool(used or out)

    def _finish(self, expected: EntryEnd | None) -> EntryEnd:
        assert self._entry is not None
        got = EntryEnd(self._size, self._csize, self._crc)
        if expected is not None and got != expected:
            what = "CRC-32" if (got.size, got.compressed_size) == (expected.size, expected.compressed_size) \
                else "sizes"
            raise ZipStreamError(f"entry {self._entry.name!r} is corrupt (its {what} do not match its header)")
        self._seen[-1].end = got
        self._state = "header"
        return got

    def _descriptor_length(self, have: bytes) -> int:
        """The length of the data descriptor at the start of ``have`` (24 bytes) that matches what
        was counted: with or without its signature, with 4- or 8-byte sizes (8 first after a
        ZIP64 local header or for sizes past 4 GiB). Raises ``ZipStreamError`` when none does."""
        wide_first = self._entry_zip64 or self._size >= _U32 or self._csize >= _U32
        forms = [(True, wide_first), (True, not wide_first), (False, wide_first), (False, not wide_first)]
        for signed, wide in forms:
            body = have[4:] if signed else have
            if signed and have[:4] != _DESCRIPTOR:
                continue
            if struct.unpack_from("<IQQ" if wide else "<III", body) == (self._crc, self._csize, self._size):
                return (4 if signed else 0) + (20 if wide else 12)
        assert self._entry is not None
        raise ZipStreamError(f"entry {self._entry.name!r} is corrupt (its data descriptor does not match its "
                             "bytes: CRC-32 or sizes)")

    # ------------------------------------------------------------ central directory and end

    def _central_record(self, rec: bytes) -> Iterator[tuple[str, Any]]:
        (_, _made, _needed, flags, method, _t, _d, crc, csize, usize, nlen, xlen, _clen, disk, _internal, external,
         offset) = _CENTRAL_HEAD.unpack_from(rec)
        raw, extra = rec[46:46 + nlen], rec[46 + nlen:46 + nlen + xlen]
        wanted = [n for n, v in (("size", usize), ("csize", csize), ("offset", offset)) if v == _U32]
        values = _zip64_fields(extra, wanted) if wanted else {}
        record = CentralRecord(_decode(raw, flags), flags, method, crc, values.get("csize", csize),
                               values.get("size", usize), values.get("offset", offset), external)
        index = len(self._central)
        self._central.append(record)
        yield "central", record   # the consumer checks its name and mode before any comparison
        if disk not in (0, _U16):
            raise ZipStreamError(f"central record {record.name!r} names disk {disk} (split archives are not read)")
        if index >= len(self._seen):
            raise ZipStreamError(f"the central directory lists {record.name!r}, which the ZIP does not hold")
        seen = self._seen[index]
        if seen.raw_name != raw:
            raise ZipStreamError(f"the central directory names entry {index + 1} {record.name!r}, its local header "
                                 f"{_decode(seen.raw_name, flags)!r}")
        got = seen.end
        assert got is not None
        if (record.crc32, record.compressed_size, record.size, record.offset, record.method) != \
                (got.crc32, got.compressed_size, got.size, seen.offset, seen.method):
            raise ZipStreamError(f"the central directory disagrees with entry {record.name!r} "
                                 "(CRC-32, sizes, offset or method)")

    def _end(self, rec: bytes) -> Iterator[tuple[str, Any]]:
        (_, disk, cd_disk, count_here, count, cd_size, cd_offset, comment) = _END_HEAD.unpack_from(rec)
        if self._zip64_end is not None:
            z_count, z_size, z_offset = self._zip64_end
            shown = (z_count if count == _U16 else count, z_size if cd_size == _U32 else cd_size,
                     z_offset if cd_offset == _U32 else cd_offset)
            if shown != self._zip64_end:
                raise ZipStreamError("the ZIP64 end record and the end record disagree")
            count, cd_size, cd_offset = self._zip64_end
            count_here = count if count_here == _U16 else count_here
        if disk or cd_disk or count_here != count:
            raise ZipStreamError("the end record names another disk (split archives are not read)")
        if not count == len(self._central) == len(self._seen):
            raise ZipStreamError(f"the ZIP holds {len(self._seen)} entries, its central directory "
                                 f"{len(self._central)}, its end record {count}")
        assert self._central_start is not None and self._central_end is not None
        if (cd_offset, cd_size) != (self._central_start, self._central_end - self._central_start):
            raise ZipStreamError("the end record disagrees with where the central directory is")
        self._state = "done"
        self._comment_left = comment
        yield "directory", self._central
