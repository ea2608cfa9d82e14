"""CPU per GB through the old path (.partial file, then ``verify_and_unpack``) against the
streaming sink (``ZipSeriesSink``), on one series ZIP as ``harvester serve`` sends it.

The ZIP is built once per format by the server's own writer (``harvester.server.zipstream``:
``deflated``, the real service's format with data descriptors, and ``stored``) from a synthetic
series (``--spec``), and held in memory; each path then takes it in 1 MiB chunks, as it would
come off the socket: the old one writes them to a ``.partial`` file (as the harvester did before
the sink) and unpacks that; the sink writes each instance as it arrives. No
network, no event loop: the CPU of the data path alone. Reported per GB of DICOM data
(process CPU time, all threads), the best of ``--repeat`` runs.

    .venv/bin/python bench/sink_bench.py [--spec ...] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import anyio  # noqa: E402

from harvester.config import Limits  # noqa: E402
from harvester.server.app import entry_names, md5_csv  # noqa: E402
from harvester.server.synthetic import SyntheticSpec, build_synthetic  # noqa: E402
from harvester.server.zipstream import bytes_entry, file_entry, zip_stream  # noqa: E402
from harvester.store.sink import ZipSeriesSink  # noqa: E402
from harvester.unpack import verify_and_unpack  # noqa: E402

CHUNK = 1 << 20


async def _zip(record, fmt: str) -> bytes:  # type: ignore[no-untyped-def]
    names = entry_names(len(record.instances), True)
    entries = [bytes_entry("LICENSE", record.license_text.encode("utf-8"))]
    entries += [file_entry(name, inst.path, inst.size, inst.crc32) for name, inst in zip(names, record.instances)]
    entries.append(bytes_entry("md5hashes.csv", md5_csv(record, names)))
    return b"".join([piece async for piece in zip_stream(entries, zip_format=fmt)])


def old_path(data: bytes, work: Path, record) -> None:  # type: ignore[no-untyped-def]
    partial = work / "s.zip.partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        for at in range(0, len(data), CHUNK):
            piece = view[at:at + CHUNK]
            while piece:
                piece = piece[os.write(fd, piece):]
    finally:
        os.close(fd)
    verify_and_unpack(partial, work / "staging", series_uid=record.uid, image_count=len(record.instances),
                      file_size=record.total_bytes, limits=Limits())
    partial.unlink()


def sink_path(data: bytes, work: Path, record) -> None:  # type: ignore[no-untyped-def]
    sink = ZipSeriesSink(work / "staging", series_uid=record.uid, image_count=len(record.instances),
                         file_size=record.total_bytes, limits=Limits())
    view = memoryview(data)
    for at in range(0, len(data), CHUNK):
        sink.write(view[at:at + CHUNK])  # type: ignore[arg-type]
    sink.finish()


def measure(path, data: bytes, record, repeat: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(best CPU seconds, best wall seconds) of ``repeat`` runs."""
    cpus, walls = [], []
    for _ in range(repeat):
        work = Path(tempfile.mkdtemp(prefix="sink-bench-"))
        try:
            wall, cpu = time.perf_counter(), time.process_time()
            path(data, work, record)
            cpus.append(time.process_time() - cpu)
            walls.append(time.perf_counter() - wall)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return min(cpus), min(walls)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="collections=1,patients=1,studies=1,series=1,instances=50,size=2MiB,seed=0")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("HARVESTER_BENCH_CACHE",
                                                                              REPO / ".cache" / "synthetic")))
    args = parser.parse_args()
    archive = build_synthetic(SyntheticSpec.parse(args.spec), args.cache_dir)
    record = archive.records()[0]
    gb = record.total_bytes / 1e9
    print(f"series: {len(record.instances)} files, {record.total_bytes / 1e6:.1f} MB of DICOM; "
          f"best of {args.repeat}")
    print(f"{'format':<10} {'ZIP MB':>8} {'path':<22} {'CPU-s/GB':>9} {'wall-s/GB':>10}")
    for fmt in ("deflated", "stored"):
        data = anyio.run(_zip, record, fmt)
        figures = {}
        for label, path in (("partial + unpack (old)", old_path), ("streaming sink", sink_path)):
            cpu, wall = measure(path, data, record, args.repeat)
            figures[label] = cpu
            print(f"{fmt:<10} {len(data) / 1e6:>8.1f} {label:<22} {cpu / gb:>9.2f} {wall / gb:>10.2f}")
        old, new = figures["partial + unpack (old)"], figures["streaming sink"]
        print(f"{fmt:<10} sink CPU is {new / old:.0%} of the old path's ({1 - new / old:+.0%} saved)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
