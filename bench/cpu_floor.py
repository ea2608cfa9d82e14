"""The CPU floor of scenario a: what a verifying client cannot avoid, per GB of ZIP received.

Three figures, on the ZIPs ``harvester serve`` sends for scenario a (``--spec``, default 400
series of 50 x 64 KiB, DEFLATED with data descriptors, the real wire format), with no faults:

* **receive**: aiohttp (one session, ``--connections`` at once) GETs every series' getImage
  and reads each body in 1 MiB ``iter_chunked`` steps, as ``stream_series_zip`` does, and
  drops the bytes. The client's process CPU (the server is a subprocess).
* **sink**: the first ``--keep`` series' ZIPs (fetched beforehand, untimed, held in memory) go
  through the real ``ZipSeriesSink`` in 1 MiB chunks (inflate, CRC-32, MD5, the names, the
  DICOM header, the central directory, count, size, md5hashes.csv), and each staging folder is
  renamed into place, as the state's commit does (its SQLite row is not counted).
* **minimum**: the same ZIPs in the tightest Python loop that does the unavoidable work: per
  entry (offsets found beforehand, untimed), one ``zlib`` raw inflate, ``zlib.crc32``,
  ``hashlib.md5``, ``os.open``/``os.write``/``os.close`` of a new file; one ``os.rename`` per
  series. No name, header or md5hashes.csv check at all.

Reported as CPU-s per GB of ZIP bytes (as ``bench/run.py``'s CPU-s/GB: the bytes the server
sent), the best of ``--repeat`` runs, so that "receive + minimum" is a floor no verifying client
in Python gets under on this machine.

    .venv/bin/python bench/cpu_floor.py [--spec ...] [--keep 40] [--repeat 3] [--connections 10]
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import os
import shutil
import struct
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPO, ServedArchive, load_archive, warm_cache  # noqa: E402

sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from harvester.config import Limits  # noqa: E402
from harvester.store.sink import ZipSeriesSink  # noqa: E402

SCENARIO_A = "collections=4,patients=100,studies=1,series=1,instances=50,size=64KiB,seed=0"
CHUNK = 1 << 20
GB = 1e9


def _url(base: str, uid: str) -> str:
    """getImage as the harvester asks it (the TCIA names, and md5hashes.csv in the ZIP)."""
    return f"{base}/getImage?SeriesInstanceUID={urllib.parse.quote(uid)}&NewFileNames=Yes&IncludeMD5=yes"


async def _receive(base: str, uids: list[str], connections: int) -> int:
    """GET every series ZIP, read in CHUNK steps and dropped; returns the bytes read."""
    total = 0
    queue = list(reversed(uids))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        async def worker() -> None:
            nonlocal total
            while queue:
                uid = queue.pop()
                async with session.get(_url(base, uid)) as resp:
                    resp.raise_for_status()
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        total += len(chunk)
        await asyncio.gather(*(worker() for _ in range(connections)))
    return total


def _entries(data: bytes) -> list[tuple[str, int, int, int]]:
    """(name, offset of the compressed data, compressed size, CRC-32) of each entry."""
    found = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
            start = info.header_offset + 30 + name_len + extra_len
            found.append((info.filename, start, info.compress_size, info.CRC))
    return found


def sink_path(zips: list[tuple[object, bytes]], work: Path) -> None:
    for n, (record, data) in enumerate(zips):
        staging = work / f"staging-{n}"
        sink = ZipSeriesSink(staging, series_uid=record.uid, image_count=len(record.instances),  # type: ignore[attr-defined]
                             file_size=record.total_bytes, limits=Limits())  # type: ignore[attr-defined]
        view = memoryview(data)
        for at in range(0, len(data), CHUNK):
            sink.write(view[at:at + CHUNK])  # type: ignore[arg-type]
        sink.finish()
        os.rename(staging, work / f"series-{n}")


def minimum_path(zips: list[tuple[list[tuple[str, int, int, int]], bytes]], work: Path) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for n, (entries, data) in enumerate(zips):
        staging = work / f"staging-{n}"
        os.mkdir(staging)
        view = memoryview(data)
        for name, start, size, crc in entries:
            out = zlib.decompressobj(-15).decompress(view[start:start + size])
            if zlib.crc32(out) != crc:
                raise SystemExit(f"CRC mismatch in {name}")
            hashlib.md5(out).hexdigest()
            fd = os.open(os.path.join(staging, name), flags, 0o644)
            try:
                os.write(fd, out)
            finally:
                os.close(fd)
        os.rename(staging, work / f"series-{n}")


def best(path, zips, repeat: int) -> float:  # type: ignore[no-untyped-def]
    cpus = []
    for _ in range(repeat):
        work = Path(tempfile.mkdtemp(prefix="cpu-floor-"))
        try:
            cpu = time.process_time()
            path(zips, work)
            cpus.append(time.process_time() - cpu)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return min(cpus)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=SCENARIO_A)
    parser.add_argument("--keep", type=int, default=40, help="series put through the sink and the minimum")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--connections", type=int, default=10)
    args = parser.parse_args()
    archive = load_archive(args.spec)
    warm_cache(archive)
    records = archive.records()
    uids = [r.uid for r in records]
    with ServedArchive(args.spec) as served:
        kept = []
        for record in records[:args.keep]:
            with urllib.request.urlopen(_url(served.base_url, record.uid), timeout=60) as resp:
                kept.append((record, resp.read()))
        receive = []
        for _ in range(args.repeat):
            cpu = time.process_time()
            received = asyncio.run(_receive(served.base_url, uids, args.connections))
            receive.append(time.process_time() - cpu)
    zip_bytes = sum(len(data) for _, data in kept)
    sink = best(sink_path, kept, args.repeat)
    minimum = best(minimum_path, [(_entries(data), data) for _, data in kept], args.repeat)
    per = {"receive (aiohttp, bytes dropped)": min(receive) / (received / GB),
           "sink (ZipSeriesSink + rename)": sink / (zip_bytes / GB),
           "minimum (zlib + md5 + os.write)": minimum / (zip_bytes / GB)}
    print(f"{len(uids)} series, {received / 1e6:.0f} MB of ZIP received; {len(kept)} series "
          f"({zip_bytes / 1e6:.0f} MB) through the sink and the minimum; best of {args.repeat}")
    print(f"{'path':<36} {'CPU-s/GB':>9}")
    for label, value in per.items():
        print(f"{label:<36} {value:>9.2f}")
    floor = per["receive (aiohttp, bytes dropped)"] + per["minimum (zlib + md5 + os.write)"]
    ours = per["receive (aiohttp, bytes dropped)"] + per["sink (ZipSeriesSink + rename)"]
    print(f"{'receive + minimum (the floor)':<36} {floor:>9.2f}")
    print(f"{'receive + sink':<36} {ours:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
