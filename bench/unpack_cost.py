"""CPU cost of verifying and unpacking one series, alone (no network, no event loop).

Downloads one series ZIP (``--spec``, default 50 x 64 KB, scenario a's series) from an in-process
``harvester serve``, then times ``verify_and_unpack`` on it ``--repeat`` times, next to the MD5
and CRC-32 of the same bytes for scale. ``--profile`` adds a cProfile table.

    .venv/bin/python bench/unpack_cost.py [--spec ...] [--repeat 40] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import hashlib
import pstats
import shutil
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harvester.server.synthetic import SyntheticSpec, build_synthetic  # noqa: E402
from harvester.server.testing import serve_in_thread  # noqa: E402
from harvester.unpack import Limits, verify_and_unpack  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="collections=1,patients=1,studies=1,series=1,instances=50,size=64KiB,seed=0")
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "synthetic")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    archive = build_synthetic(SyntheticSpec.parse(args.spec), args.cache_dir)
    record = archive.records()[0]
    work = Path(tempfile.mkdtemp(prefix="unpack-cost-"))
    try:
        with serve_in_thread(archive) as server:
            url = f"{server.base_url}/getImage?SeriesInstanceUID={record.uid}&NewFileNames=Yes&IncludeMD5=yes"
            data = urllib.request.urlopen(url, timeout=60).read()
        zip_path = work / "series.zip"
        zip_path.write_bytes(data)

        def unpack(i: int) -> None:
            verify_and_unpack(zip_path, work / f"staging{i}", series_uid=record.uid,
                              image_count=len(record.instances), file_size=record.total_bytes, limits=Limits())

        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(args.repeat):
            unpack(i)
        wall, cpu = (time.perf_counter() - wall) / args.repeat, (time.process_time() - cpu) / args.repeat
        md5 = time.perf_counter()
        for _ in range(args.repeat):
            hashlib.md5(data).hexdigest()
        md5 = (time.perf_counter() - md5) / args.repeat
        crc = time.perf_counter()
        for _ in range(args.repeat):
            zlib.crc32(data)
        crc = (time.perf_counter() - crc) / args.repeat
        print(f"series: {len(record.instances)} files, ZIP {len(data) / 1e6:.1f} MB")
        print(f"verify_and_unpack: {wall * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms CPU per series")
        print(f"for scale: MD5 {md5 * 1e3:.1f} ms, CRC-32 {crc * 1e3:.1f} ms of the same bytes")
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            for i in range(args.repeat):
                unpack(args.repeat + i)
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(12)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
