"""Size bounds: a getImage body that grows past the series' announced size (plain, or gzip- or
deflate-encoded so that a small transfer decompresses into a flood) is stopped at the announced
size plus the margin and its temp file removed; a getSeries answer past the JSON cap (plain, or a
gzip bomb), and JSON nested 200,000 deep, give one classified line and exit 3, never an
exhausted memory or a RecursionError. The cap is set small on the command line."""
from __future__ import annotations

import asyncio
import struct
import zlib
from pathlib import Path

import pytest
from aiohttp import web

from harvester.config import Limits
from harvester.errors import HarvesterError, IncompleteSeriesError
from harvester.source.nbia.download import download_bound

from .hostile import (
    AUTH,
    assert_rerun_completes,
    build_hostile,
    cli,
    error_lines,
    failed_lines,
    run_args,
    scan,
    serve_hostile,
    stream,
)

FLOOD = 200 << 20   # what the hostile server would send if nobody stopped it
CUT = 24 << 20      # it must have been stopped long before (socket buffers hold a few MB)


def compress(data_chunks, encoding: str):
    """Yield ``data_chunks`` encoded as gzip or deflate (zlib), chunk by chunk."""
    comp = zlib.compressobj(6, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
    for chunk in data_chunks:
        out = comp.compress(chunk)
        if out:
            yield out
    yield comp.flush()


def empty_entries():
    """Local headers of empty STORED entries, each with a 64,000-byte extra field: a ZIP stream
    that the streaming sink accepts entry by entry (an empty file proves nothing wrong until the
    end), so only the download bound can stop it."""
    for i in range(FLOOD // 64_000):
        name = f"1-{i:07d}.dcm".encode()
        yield struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 64_000) + name + \
            struct.pack("<HH", 0xCAFE, 63_996) + b"\0" * 63_996


def flood(h, key: str, head: bytes, *, encoding: str | None = None, total: int = FLOOD, filler=None):
    """``head`` then what ``filler()`` yields (zeros by default), up to ``total`` bytes (before encoding)."""
    def plain():
        yield head
        if filler is not None:
            yield from filler()
            return
        for _ in range(total // (64 << 10)):
            yield b"\0" * (64 << 10)

    async def answer(request: web.Request) -> web.StreamResponse:
        source = plain() if encoding is None else compress(plain(), encoding)

        async def chunks():
            for chunk in source:
                yield chunk
                await asyncio.sleep(0)
        headers = {"Content-Encoding": encoding} if encoding else {}
        return await stream(request, chunks(), h=h, key=key, headers=headers)
    return answer


@pytest.mark.parametrize("encoding", [None, "gzip", "deflate"], ids=["plain", "gzip", "deflate"])
def test_download_past_the_announced_size_stops_and_leaves_nothing(tmp_path: Path, encoding, figures) -> None:
    h = build_hostile(2)
    uid = h.uids[0]
    row = h.archive.series[0]
    bound = download_bound(row["FileSize"], row["ImageCount"], Limits())
    # The ZIP stream stays well-formed as it grows: the sink would refuse a corrupt one at once
    h.attacks[uid] = flood(h, uid, b"", encoding=encoding, filler=empty_entries)
    out = tmp_path / "out"
    with serve_hostile(h):
        run = cli(*run_args(h, tmp_path, out, "--retries", "1"))
        assert run.returncode == 1, (run.stdout[-2000:], run.stderr[-2000:])
        failed = failed_lines(run)
        assert len(failed) == 1 and uid in failed[0], failed
        assert f"more than the {bound} the archive's announced size allows" in failed[0], failed
        assert "truncated" not in failed[0]
        assert h.sent[uid] < (CUT if encoding is None else FLOOD // 100), h.sent  # stopped, not drained
        assert not list((out / ".harvester" / "tmp").iterdir())  # the temp file went
        scan(out, run)
        assert_rerun_completes(h, tmp_path, out)
    figures.record("issue14", family=f"size bounds: getImage past the announced size ({encoding or 'plain'})",
                   attacks=1, bound=bound, sent=h.sent[uid], outcome="stopped, temp removed, series failed; exit 1")


def endless_rows(h, key: str, *, encoding: str | None = None):
    def plain():
        yield b"["
        row = b'{"SeriesInstanceUID": "1.2.3", "Collection": "HOSTILE", "SeriesDescription": "' + b"x" * 4000 + b'"},'
        for _ in range(FLOOD // len(row)):
            yield row

    async def answer(request: web.Request) -> web.StreamResponse:
        source = plain() if encoding is None else compress(plain(), encoding)

        async def chunks():
            for chunk in source:
                yield chunk
                await asyncio.sleep(0)
        headers = {"Content-Type": "application/json", **({"Content-Encoding": encoding} if encoding else {})}
        return await stream(request, chunks(), h=h, key=key, headers=headers)
    return answer


@pytest.mark.parametrize("encoding", [None, "gzip"], ids=["plain", "gzip-bomb"])
def test_getseries_past_the_json_cap_is_one_line_exit_3(tmp_path: Path, encoding, figures) -> None:
    h = build_hostile(2)
    h.attacks["getSeries"] = endless_rows(h, "getSeries", encoding=encoding)
    out = tmp_path / "out"
    with serve_hostile(h):
        run = cli(*run_args(h, tmp_path, out, "--max-json-bytes", "1MB"))
        assert run.returncode == 3, (run.stdout[-2000:], run.stderr[-2000:])
        lines = error_lines(run)
        assert len(lines) == 1 and "more than 1000000 bytes of JSON" in lines[0], run.stderr
        assert h.hits["getSeries"] == 1  # a cap is not worth retrying
        assert h.sent["getSeries"] < (CUT if encoding is None else FLOOD // 100)
        scan(out, run)
        assert_rerun_completes(h, tmp_path, out)
    figures.record("issue14", family=f"size bounds: getSeries past the JSON cap ({encoding or 'plain'})",
                   attacks=1, sent=h.sent["getSeries"], outcome="one line, exit 3", message=lines[0][:200])


def test_json_nested_200000_deep_is_one_line_exit_3(tmp_path: Path, figures) -> None:
    h = build_hostile(2)
    deep = b"[" * 200_000 + b"]" * 200_000

    async def nested(request: web.Request) -> web.Response:
        return web.Response(body=deep, content_type="application/json")

    h.attacks["getSeries"] = nested
    out = tmp_path / "out"
    with serve_hostile(h):
        run = cli(*run_args(h, tmp_path, out))
        assert run.returncode == 3, (run.stdout[-2000:], run.stderr[-2000:])
        lines = error_lines(run)
        assert len(lines) == 1 and "nested too deep" in lines[0], run.stderr
        scan(out, run)
        assert_rerun_completes(h, tmp_path, out)
    figures.record("issue14", family="size bounds: JSON nested 200,000 deep", attacks=1,
                   outcome="one line, exit 3", message=lines[0][:200])


def test_download_bound_units() -> None:
    limits = Limits()
    assert download_bound(None, 3, limits) is None and download_bound(0, 3, limits) is None
    bound = download_bound(10 << 20, 100, limits)
    assert (10 << 20) * 1.1 < bound < (10 << 20) * 1.1 + (2 << 20)
    assert download_bound(10 << 20, None, limits) < bound  # unknown count: the fixed margin only


def test_token_answer_past_its_cap_is_one_line_exit_3(tmp_path: Path, figures) -> None:
    h = build_hostile(1)
    h.require_auth = True
    h.attacks["token"] = endless_rows(h, "token")
    out = tmp_path / "out"
    with serve_hostile(h):
        run = cli(*run_args(h, tmp_path, out, *AUTH))
        assert run.returncode == 3, (run.stdout[-2000:], run.stderr[-2000:])
        lines = error_lines(run)
        assert len(lines) == 1 and "token endpoint" in lines[0] and "more than 1048576 bytes" in lines[0], run.stderr
        assert h.sent["token"] < CUT
        scan(out, run)
        assert_rerun_completes(h, tmp_path, out, *AUTH)
    figures.record("issue14", family="size bounds: token endpoint answer past 1 MiB", attacks=1,
                   outcome="one line, exit 3", message=lines[0][:200])


def many_entries_zip(n: int) -> bytes:
    """LICENSE, ``n`` empty ``1-NNNNNN.dcm`` and md5hashes.csv, STORED, as ``zipfile`` writes them
    (no data descriptors; ZIP64 end records past 65,535 entries), packed here with ``struct``:
    ``zipfile.writestr`` took 4 s for 200,000 entries. ``test_many_entries_zip_is_a_zip`` reads
    a small one back with ``zipfile``."""
    members = [("LICENSE", b"CC BY 4.0\n"), *((f"1-{i:06d}.dcm", b"") for i in range(n)),
               ("md5hashes.csv", b"Filename,MD5Hash\n")]
    local, central, offset = [], [], 0
    for name, data in members:
        raw, crc = name.encode("ascii"), zlib.crc32(data)
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0x21, crc, len(data), len(data), len(raw), 0)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0x21, crc, len(data),
                                   len(data), len(raw), 0, 0, 0, 0, 0, offset) + raw)
        local.append(header + raw + data)
        offset += len(header) + len(raw) + len(data)
    directory = b"".join(central)
    count, size = len(members), len(directory)
    end = b""
    if count > 0xFFFF:   # ZIP64 end of central directory record and locator
        end = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, size, offset)
        end += struct.pack("<IIQI", 0x07064B50, 0, offset + size, 1)
    end += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF), size, offset, 0)
    return b"".join(local) + directory + end


@pytest.mark.parametrize("n", [2, 0x10000])   # past 65,535 entries: the ZIP64 end records
def test_many_entries_zip_is_a_zip(n: int) -> None:
    import io
    import zipfile
    with zipfile.ZipFile(io.BytesIO(many_entries_zip(n))) as zf:
        assert zf.read("LICENSE") == b"CC BY 4.0\n" and zf.read(f"1-{n - 1:06d}.dcm") == b""  # CRCs checked
        names = zf.namelist()
    assert len(names) == n + 2 and names[0] == "LICENSE" and names[-1] == "md5hashes.csv"
    assert names[1:-1] == [f"1-{i:06d}.dcm" for i in range(n)]


def test_zip_of_200000_entries_is_not_the_announced_series_not_truncated(tmp_path: Path, figures) -> None:
    """Issue 14: a ZIP of 200,000 entries for a series of 3 was reported as "truncated"."""
    from harvester.unpack import verify_and_unpack

    # the unpacker's verdict, past the download bound (which would stop these ZIPs first, see below):
    # too many entries for any series at the entry limit, not the announced series below it
    for n, verdict in ((199_990, "more than the 3 the archive announced: not the announced series"),
                       (200_000, "ZIP has 200,002 entries, more than the limit of 200,000 per series")):
        data = many_entries_zip(n)
        path = tmp_path / f"many-{n}.zip"
        path.write_bytes(data)
        with pytest.raises(HarvesterError) as err:
            verify_and_unpack(path, tmp_path / "staging", series_uid="1.2.3", image_count=3, file_size=None,
                              limits=Limits())
        line = err.value.one_line()
        assert verdict in line and "truncated" not in line, line
        assert not isinstance(err.value, IncompleteSeriesError)
        assert not (tmp_path / "staging").exists()
    # end to end: the download bound stops it, with the same verdict
    h = build_hostile(2)
    uid = h.uids[0]
    h.archive.zips[uid] = data
    out = tmp_path / "out"
    with serve_hostile(h):
        run = cli(*run_args(h, tmp_path, out, "--retries", "1"))
        assert run.returncode == 1, (run.stdout[-2000:], run.stderr[-2000:])
        failed = failed_lines(run)
        assert len(failed) == 1 and "not the announced series" in failed[0] and "truncated" not in failed[0], failed
        scan(out, run)
        h.archive.zips[uid] = build_hostile(2).archive.zips[uid]
        assert_rerun_completes(h, tmp_path, out)
    figures.record("issue14", family="size bounds: a ZIP of 200,000 entries for a series of 3", attacks=2,
                   outcome="'not the announced series' (unpack and download), never 'truncated'; exit 1",
                   message=line[:200])
