"""harvester.server.zipstream: the ZIP bytes, read back field by field, are those that
java.util.zip.ZipOutputStream writes (the real NBIA service), and Python's zipfile (the peers'
reader) reads them; the STORED writer stays as it was."""
from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import AsyncIterator, Iterable

import pytest

from harvester.server.zipstream import (
    DEFAULT_ZIP_FORMAT,
    ZipEntry,
    ZipSourceError,
    _Deflated,
    _java_central_header,
    bytes_entry,
    zip_stream,
)

pytestmark = pytest.mark.anyio

LOCAL, DESCRIPTOR, CENTRAL = 0x04034B50, 0x08074B50, 0x02014B50
EOCD, EOCD64, LOCATOR = 0x06054B50, 0x06064B50, 0x07064B50


async def collect(entries: Iterable[ZipEntry], **kw: object) -> bytes:
    return b"".join([piece async for piece in zip_stream(entries, **kw)])  # type: ignore[arg-type]


def java_deflate(data: bytes) -> bytes:
    """What java.util.zip.Deflater(DEFAULT_COMPRESSION, nowrap=true) makes of ``data``."""
    deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
    return deflater.compress(data) + deflater.flush()


def parse_java_zip(body: bytes) -> list[dict[str, object]]:
    """Walk ``body`` from the first byte as a streaming reader would, checking every field the
    way ZipOutputStream writes it; returns the entries (name, data, offset) in order."""
    entries: list[dict[str, object]] = []
    pos = 0
    while struct.unpack_from("<I", body, pos)[0] == LOCAL:
        (_, version, flags, method, _time, _date, crc, csize, size, name_len,
         extra_len) = struct.unpack_from("<IHHHHHIIIHH", body, pos)
        assert (version, flags, method) == (20, 0x0808, 8)  # deflate, data descriptor, UTF-8 names
        assert (crc, csize, size, extra_len) == (0, 0, 0, 0)  # all in the data descriptor
        name = body[pos + 30:pos + 30 + name_len].decode("utf-8")
        start = pos + 30 + name_len
        inflater = zlib.decompressobj(-15)
        data = inflater.decompress(body[start:])
        assert inflater.eof
        used = len(body) - start - len(inflater.unused_data)
        assert body[start:start + used] == java_deflate(data)  # zlib level 6, raw deflate
        sig, dd_crc, dd_csize, dd_size = struct.unpack_from("<IIII", body, start + used)
        assert (sig, dd_crc, dd_csize, dd_size) == (DESCRIPTOR, zlib.crc32(data), used, len(data))
        entries.append({"name": name, "data": data, "offset": pos, "crc": dd_crc, "csize": used})
        pos = start + used + 16
    cd_start = pos
    for entry in entries:
        (sig, made_by, needed, flags, method, _t, _d, crc, csize, size, name_len, extra_len, comment_len,
         disk, internal, external, offset) = struct.unpack_from("<IHHHHHHIIIHHHHHII", body, pos)
        assert sig == CENTRAL and (made_by, needed, flags, method) == (20, 20, 0x0808, 8)
        assert (extra_len, comment_len, disk, internal, external) == (0, 0, 0, 0, 0)
        assert (crc, csize, size, offset) == (entry["crc"], entry["csize"], len(entry["data"]), entry["offset"])
        assert body[pos + 46:pos + 46 + name_len].decode("utf-8") == entry["name"]
        pos += 46 + name_len
    sig, _, _, on_disk, total, cd_size, cd_offset, comment = struct.unpack_from("<IHHHHIIH", body, pos)
    assert sig == EOCD and on_disk == total == len(entries)
    assert (cd_size, cd_offset, comment) == (pos - cd_start, cd_start, 0) and pos + 22 == len(body)
    return entries


def test_deflated_is_the_default() -> None:
    assert DEFAULT_ZIP_FORMAT == "deflated"


async def test_deflated_entries_are_written_as_java_writes_them() -> None:
    files = [("LICENSE", b"CC BY 4.0\n"), ("1-1.dcm", bytes(300_000)), ("1-2.dcm", bytes(range(256)) * 999),
             ("n\u00e4me.dcm", b""), ("md5hashes.csv", b"Filename,MD5Hash\n")]
    body = await collect(bytes_entry(n, d) for n, d in files)
    assert [(e["name"], e["data"]) for e in parse_java_zip(body)] == files
    with zipfile.ZipFile(io.BytesIO(body)) as zf:  # what tcia_utils and nbiatoolkit read it with
        assert zf.testzip() is None
        assert [(i.filename, zf.read(i)) for i in zf.infolist()] == files
        assert all(i.compress_type == zipfile.ZIP_DEFLATED and i.flag_bits == 0x0808 for i in zf.infolist())


async def test_entries_are_compressed_as_they_stream() -> None:
    """Each chunk's compressed bytes leave before the next chunk is read: memory stays at the
    deflater's window whatever the entry's size."""
    chunk, count = bytes(range(256)) * 1024, 64
    read = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal read
        for _ in range(count):
            read += 1
            yield chunk

    total = chunk * count
    entry = ZipEntry("big.dcm", len(total), zlib.crc32(total), chunks)
    out_before_last_read = 0
    sent = 0
    async for piece in zip_stream([entry]):
        sent += len(piece)
        if read < count:
            out_before_last_read = sent
    assert out_before_last_read > 0  # output flowed while the entry was still being read
    assert read == count


async def test_a_source_that_changed_breaks_the_zip_before_its_directory() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"changed on disk"

    pieces: list[bytes] = []
    with pytest.raises(ZipSourceError):
        async for piece in zip_stream([ZipEntry("1-1.dcm", 15, 12345, chunks)]):
            pieces.append(piece)
    assert struct.pack("<I", CENTRAL) not in b"".join(pieces)


async def test_zip64_end_records_past_65534_entries() -> None:
    """Java writes the ZIP64 end record and locator once the count reaches 0xFFFF, and puts
    0xFFFF in the classic record's counts (but real values in its fields that did not overflow)."""
    count = 65_535
    body = await collect(bytes_entry(f"{i:08d}.dcm", bytes([i % 251])) for i in range(count))
    eocd = body.rindex(struct.pack("<I", EOCD))
    _, _, _, on_disk, total, cd_size, cd_offset, _ = struct.unpack_from("<IHHHHIIH", body, eocd)
    assert on_disk == total == 0xFFFF
    locator = eocd - 20
    sig, _, eocd64_offset, disks = struct.unpack_from("<IIQI", body, locator)
    assert sig == LOCATOR and disks == 1 and eocd64_offset == locator - 56
    (sig, record_size, made_by, needed, _, _, on_disk64, total64, cd_size64,
     cd_offset64) = struct.unpack_from("<IQHHIIQQQQ", body, eocd64_offset)
    assert (sig, record_size, made_by, needed) == (EOCD64, 44, 45, 45)
    assert on_disk64 == total64 == count
    assert (cd_size64, cd_offset64) == (cd_size, cd_offset) == (eocd64_offset - cd_offset, cd_offset)
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        infos = zf.infolist()
        assert len(infos) == count
        assert zf.read(infos[-1]) == bytes([(count - 1) % 251])


async def test_no_zip64_records_below_the_limits() -> None:
    body = await collect(bytes_entry(f"{i}.dcm", b"x") for i in range(3))
    assert struct.pack("<I", EOCD64) not in body and struct.pack("<I", LOCATOR) not in body


def test_central_header_zip64_extra_holds_only_what_overflowed_in_java_order() -> None:
    """writeCEN: a ZIP64 extra with the uncompressed size, compressed size and offset, each only
    when it reaches 0xFFFFFFFF, in that order; version 45 then; the others stay in place."""
    item = _Deflated(name=b"1-1.dcm", size=5 << 30, csize=1234, crc32=0xCAFE, offset=6 << 30)
    header = _java_central_header(item, False, 0, 0)
    (_, made_by, needed, flags, method, _, _, crc, csize, size, name_len, extra_len, _, _, _, _,
     offset) = struct.unpack_from("<IHHHHHHIIIHHHHHII", header)
    assert (made_by, needed, flags, method, crc) == (45, 45, 0x0808, 8, 0xCAFE)
    assert (csize, size, offset) == (1234, 0xFFFFFFFF, 0xFFFFFFFF)
    extra = header[46 + name_len:]
    assert len(extra) == extra_len == 4 + 16
    assert struct.unpack("<HHQQ", extra) == (0x0001, 16, 5 << 30, 6 << 30)


async def test_stored_writer_stays_as_it_was() -> None:
    files = [("LICENSE", b"CC BY 4.0\n"), ("1-1.dcm", bytes(300_000))]
    body = await collect([bytes_entry(n, d) for n, d in files], zip_format="stored")
    _, version, flags, method, _, _, crc, csize, size = struct.unpack_from("<IHHHHHIII", body, 0)
    assert (version, flags, method) == (20, 0, 0) and (csize, size) == (10, 10) and crc == zlib.crc32(files[0][1])
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert [(i.filename, zf.read(i)) for i in zf.infolist()] == files
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())


async def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown ZIP format"):
        await collect([bytes_entry("a", b"")], zip_format="bzip2")
