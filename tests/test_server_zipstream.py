"""harvester.server.zipstream: the ZIP bytes, read back field by field, are those that
java.util.zip.ZipOutputStream writes (the real NBIA service), and Python's zipfile (the peers'
reader) reads them; the STORED writer stays as it was; the deflate cache sends the same bytes
within its memory bound."""
from __future__ import annotations

import asyncio
import io
import random
import struct
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import anyio
import pytest
from pydicom.data import get_testdata_file

from harvester.server.app import DownloadWire
from harvester.server.deflatecache import DeflateCache
from harvester.server.serve import main as serve_main
from harvester.server.synthetic import SyntheticSpec, build_synthetic
from harvester.server.testing import serve_in_thread
from harvester.server.zipstream import (
    DEFAULT_ZIP_FORMAT,
    READ_CHUNK,
    ZipEntry,
    ZipSourceError,
    _Deflated,
    _java_central_header,
    bytes_entry,
    file_entry,
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


# ------------------------------------------------------------------ the deflate cache

def instance_files(root: Path) -> list[tuple[str, Path, int, int]]:
    """Real files of the shapes a series holds: random pixels over several read chunks, zeros
    (a mask), a real DICOM file, an empty file; as (name, path, size, crc32)."""
    root.mkdir(parents=True, exist_ok=True)
    contents = {
        "1-1.dcm": random.Random(7).randbytes(3 * READ_CHUNK + 12_345),
        "1-2.dcm": bytes(2 * READ_CHUNK),
        "1-3.dcm": Path(get_testdata_file("CT_small.dcm")).read_bytes(),
        "1-4.dcm": b"",
    }
    files = []
    for name, data in contents.items():
        path = (root / name).resolve()
        path.write_bytes(data)
        files.append((name, path, len(data), zlib.crc32(data)))
    return files


def cached_entries(files: list[tuple[str, Path, int, int]], cache: DeflateCache | None) -> list[ZipEntry]:
    return [file_entry(name, path, size, crc,
                       deflated=None if cache is None else (lambda p=path, s=size, c=crc: cache.lookup(p, s, c)))
            for name, path, size, crc in files]


@pytest.mark.parametrize("tiers", ["memory", "disk", "memory+disk"])
async def test_cached_and_uncached_zips_are_byte_identical(tmp_path: Path, tiers: str) -> None:
    files = instance_files(tmp_path / "series")
    cache = DeflateCache(tmp_path / "cache" if "disk" in tiers else None,
                         memory_bytes=64 << 20 if "memory" in tiers else 0)
    live = await collect(cached_entries(files, None))
    first = await collect(cached_entries(files, cache))     # every entry computed
    assert cache.computed == len(files)
    second = await collect(cached_entries(files, cache))    # every entry from the cache
    assert cache.computed == len(files)
    assert first == live and second == live
    assert [e["data"] for e in parse_java_zip(second)] == [p.read_bytes() for _, p, _, _ in files]
    if "disk" in tiers:
        assert len(list((tmp_path / "cache").rglob("*.deflate"))) == len(files)


@pytest.mark.parametrize("chunk_size", [4096, 65_537, 1 << 20])
async def test_the_cached_stream_does_not_depend_on_how_the_live_writer_reads(tmp_path: Path,
                                                                             chunk_size: int) -> None:
    """The cache computes with READ_CHUNK reads; a live writer reading other chunk sizes (above
    and below THREAD_DEFLATE_MIN, so in a thread or not) writes the same bytes."""
    files = instance_files(tmp_path / "series")
    cache = DeflateCache(None, memory_bytes=64 << 20)
    live = await collect([file_entry(n, p, s, c, chunk_size=chunk_size) for n, p, s, c in files])
    assert await collect(cached_entries(files, cache)) == live


async def test_a_new_cache_on_the_same_directory_computes_nothing(tmp_path: Path) -> None:
    files = instance_files(tmp_path / "series")
    live = await collect(cached_entries(files, None))
    assert await collect(cached_entries(files, DeflateCache(tmp_path / "cache"))) == live
    again = DeflateCache(tmp_path / "cache", memory_bytes=0)
    assert await collect(cached_entries(files, again)) == live
    assert again.computed == 0


async def test_a_damaged_cache_file_is_recomputed_never_sent(tmp_path: Path) -> None:
    files = instance_files(tmp_path / "series")
    live = await collect(cached_entries(files, None))
    await collect(cached_entries(files, DeflateCache(tmp_path / "cache", memory_bytes=0)))
    damaged = sorted((tmp_path / "cache").rglob("*.deflate"))
    damaged[0].write_bytes(damaged[0].read_bytes()[:-1])                 # cut short
    damaged[1].write_bytes(damaged[1].read_bytes() + b"x")  # longer than it says
    damaged[2].write_bytes(b"not ours" + damaged[2].read_bytes()[8:])     # foreign header
    cache = DeflateCache(tmp_path / "cache", memory_bytes=0)
    assert await collect(cached_entries(files, cache)) == live
    assert cache.computed == 3


async def test_a_file_changed_on_disk_is_refused_not_served_from_the_cache(tmp_path: Path) -> None:
    files = instance_files(tmp_path / "series")
    cache = DeflateCache(tmp_path / "cache")
    await collect(cached_entries(files, cache))
    name, path, size, crc = files[0]
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))      # same size, new bytes: the announced CRC no longer holds
    pieces: list[bytes] = []
    with pytest.raises(ZipSourceError):
        async for piece in zip_stream(cached_entries(files[:1], cache)):
            pieces.append(piece)
    assert len(b"".join(pieces)) < 100 and struct.pack("<I", CENTRAL) not in b"".join(pieces)


async def test_a_file_swapped_for_a_link_is_refused_with_the_cache(tmp_path: Path) -> None:
    files = instance_files(tmp_path / "series")
    cache = DeflateCache(tmp_path / "cache")
    await collect(cached_entries(files, cache))
    name, path, size, crc = files[2]
    decoy = tmp_path / "decoy.dcm"
    path.rename(decoy)
    path.symlink_to(decoy)
    with pytest.raises(OSError):
        await cache.lookup(path, size, crc)


async def test_a_miss_under_concurrency_is_computed_once(tmp_path: Path) -> None:
    files = instance_files(tmp_path / "series")
    _, path, size, crc = files[0]
    cache = DeflateCache(tmp_path / "cache")
    results: list[object] = []

    async def one() -> None:
        results.append(await cache.lookup(path, size, crc))

    async with anyio.create_task_group() as tg:
        for _ in range(16):
            tg.start_soon(one)
    assert cache.computed == 1
    assert len({(r.size, r.crc32, r.csize) for r in results}) == 1  # type: ignore[attr-defined]
    bodies = await asyncio.gather(*(collect(cached_entries(files, cache)) for _ in range(8)))
    assert len(set(bodies)) == 1 and bodies[0] == await collect(cached_entries(files, None))
    assert cache.computed == len(files)


async def test_a_waiter_going_away_does_not_cancel_the_computation(tmp_path: Path) -> None:
    files = instance_files(tmp_path / "series")
    _, path, size, crc = files[0]
    cache = DeflateCache(None, memory_bytes=64 << 20)
    with anyio.move_on_after(0):   # cancelled at its first wait
        await cache.lookup(path, size, crc)
    stream = await cache.lookup(path, size, crc)
    assert stream is not None and cache.computed == 1


async def test_memory_is_bounded_by_bytes_least_recently_used_first(tmp_path: Path) -> None:
    root = tmp_path / "series"
    root.mkdir()
    rng = random.Random(3)
    files = []
    for i in range(12):
        data = rng.randbytes(10_000)
        path = (root / f"{i}.dcm").resolve()
        path.write_bytes(data)
        files.append((path, len(data), zlib.crc32(data)))
    bound = 4 * 10_100   # four random entries of 10,000 bytes (deflate adds a few bytes each)
    cache = DeflateCache(None, memory_bytes=bound)
    for path, size, crc in files[:4]:
        await cache.lookup(path, size, crc)
    assert cache.computed == 4 and 0 < cache.held_bytes <= bound
    await cache.lookup(*files[0])       # the most recently used now
    for path, size, crc in files[4:]:
        await cache.lookup(path, size, crc)
        assert cache.held_bytes <= bound
    assert cache.computed == 12
    await cache.lookup(*files[-1])      # still held
    assert cache.computed == 12
    await cache.lookup(*files[1])       # evicted long ago
    assert cache.computed == 13


async def test_an_entry_too_big_for_memory_streams_live_without_a_directory(tmp_path: Path) -> None:
    files = instance_files(tmp_path / "series")
    _, path, size, crc = files[0]       # 786 KB
    cache = DeflateCache(None, memory_bytes=1 << 20)    # holds entries up to a quarter of it
    assert await cache.lookup(path, size, crc) is None
    assert cache.computed == 0 and cache.held_bytes == 0
    assert await collect(cached_entries(files, cache)) == await collect(cached_entries(files, None))
    assert 0 < cache.held_bytes <= 1 << 20


def test_precompute_fills_the_directory_a_server_then_reads(tmp_path: Path) -> None:
    files = instance_files(tmp_path / "series")
    cache = DeflateCache(tmp_path / "cache", memory_bytes=0)
    (tmp_path / "cache" / "00").mkdir(parents=True)
    (tmp_path / "cache" / "00" / ".left-by-a-kill.tmp").write_bytes(b"half")   # never read
    assert cache.precompute([(p, c) for _, p, _, c in files], threads=4) == len(files) == cache.computed
    assert cache.precompute([(p, c) for _, p, _, c in files]) == 0
    assert all(cache.disk_path(p, c).is_file() for _, p, _, c in files)
    served = DeflateCache(tmp_path / "cache")

    async def both() -> tuple[bytes, bytes]:
        return await collect(cached_entries(files, served)), await collect(cached_entries(files, None))

    cached, live = anyio.run(both)
    assert cached == live and served.computed == 0


ENDPOINT_CALLS = [
    ("getImage", {"NewFileNames": "Yes", "IncludeMD5": "yes"}),
    ("getImage", {}),
    ("getImageWithMD5Hash", {}),
]


def test_served_answers_are_byte_identical_with_the_cache(tmp_path: Path, synthetic_cache: Path) -> None:
    """Through the real server over loopback: every download endpoint answers the same bytes with
    and without the deflate cache, from a cold and from a warm cache; STORED never uses it."""
    archive = build_synthetic(SyntheticSpec.parse(
        "collections=1,patients=2,studies=1,series=2,instances=3,size=300KiB,annotations=1,seed=21"), synthetic_cache)
    calls = [(endpoint, {"SeriesInstanceUID": rec.uid, **extra})
             for rec in archive.records() for endpoint, extra in ENDPOINT_CALLS]
    calls += [("v1/getDCMImage", {"SeriesInstanceUID": rec.uid, "MD5Verification": "true",
                                  "IncludeAnnotation": "true"}) for rec in archive.records()]

    def answers(wire: DownloadWire | None) -> list[bytes]:
        with serve_in_thread(archive, wire=wire) as handle:
            out = []
            for endpoint, params in calls:
                url = (handle.url(endpoint.split("/")[1], "v1") if endpoint.startswith("v1/")
                       else handle.url(endpoint)) + "?" + urllib.parse.urlencode(params)
                with urllib.request.urlopen(url) as resp:
                    out.append(resp.read())
            return out

    cache = DeflateCache(tmp_path / "deflate")
    live = answers(None)
    assert answers(DownloadWire(deflate_cache=cache)) == live      # cold: computed
    files = {inst.path for rec in archive.records() for inst in rec.instances}
    files |= {ann.path for rec in archive.records() for ann in rec.annotations}
    assert cache.computed == len(files)
    assert answers(DownloadWire(deflate_cache=cache)) == live      # warm: nothing computed
    assert cache.computed == len(files)
    stored = answers(DownloadWire(zip_format="stored"))
    assert answers(DownloadWire(zip_format="stored", deflate_cache=cache)) == stored
    assert cache.computed == len(files)


@pytest.mark.parametrize("args, message", [
    (["--deflate-cache-memory", "2M"], "--deflate-cache-memory: not a size"),
    (["--deflate-cache", "{file}"], "--deflate-cache: cannot use"),
])
def test_serve_refuses_a_bad_deflate_cache_option_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             args: list[str], message: str) -> None:
    (tmp_path / "file").write_text("x")
    argv = ["--synthetic", "collections=1", "--cache-dir", str(tmp_path / "cache"),
            *[a.replace("{file}", str(tmp_path / "file")) for a in args]]
    assert serve_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"harvester: error: {message}") and err.count("\n") == 1
    assert "Traceback" not in err and not (tmp_path / "cache").exists()
