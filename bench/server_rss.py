"""Peak RSS of ``harvester serve`` while it streams one 1 GB series (target: < 150 MB).

Builds (once, cached) a synthetic archive holding a single series of 200 x 5 MB instances,
starts ``python -m harvester.server.serve`` as a subprocess, downloads the series with a
streaming client that discards the bytes, and samples the server's RSS with psutil.

    .venv/bin/python bench/server_rss.py [--cache-dir .cache/synthetic] [--parallel 1] [--serve-arg=--deflate-cache=none ...]

A timing here is informative only; the figure that matters is the peak RSS, which must not
grow with the series size because the server streams the ZIP in constant memory. The server's
own CPU-s per GB sent is printed too: with ``--serve-arg=--deflate-cache=none
--serve-arg=--deflate-cache-memory=0`` it compresses every entry as it streams, at its defaults
it sends the streams of its deflate cache (computed by the first download, or by the bench).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import TreeRss  # noqa: E402

from harvester.server.synthetic import SyntheticSpec, build_synthetic  # noqa: E402

SPEC = "collections=1,patients=1,studies=1,series=1,instances=200,size=5MiB,seed=0"
MB = 1024 * 1024


def download(url: str) -> int:
    """Stream ``url`` and discard it; returns the number of bytes received."""
    received = 0
    with urllib.request.urlopen(url, timeout=120) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status} for {url}")
        while chunk := resp.read(MB):
            received += len(chunk)
    return received


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "synthetic")
    parser.add_argument("--spec", default=SPEC)
    parser.add_argument("--parallel", type=int, default=1, help="concurrent downloads of the series")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="pass ARG to harvester serve (repeatable), e.g. --serve-arg=--zip=stored")
    args = parser.parse_args()

    start = time.monotonic()
    archive = build_synthetic(SyntheticSpec.parse(args.spec), args.cache_dir)
    (record,) = archive.records()
    print(f"archive: 1 series, {len(record.instances)} instances, {record.total_bytes / MB:.0f} MiB "
          f"(ready in {time.monotonic() - start:.1f} s)")

    server = subprocess.Popen([sys.executable, "-m", "harvester.server.serve", "--synthetic", args.spec,
                               "--cache-dir", str(args.cache_dir), *args.serve_arg], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        base_url = server.stdout.readline().strip()
        if not base_url.startswith("http://"):
            raise RuntimeError("the server did not print its base URL")
        idle_rss = psutil.Process(server.pid).memory_info().rss
        sampler = TreeRss(server.pid, interval=0.005)
        sampler.start()
        url = f"{base_url}/getImage?SeriesInstanceUID={record.uid}"
        began = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            sizes = list(pool.map(download, [url] * args.parallel))
        elapsed = time.monotonic() - began
        sampler.stop()
        times = psutil.Process(server.pid).cpu_times()
        server_cpu = times.user + times.system
    finally:
        server.terminate()
        server.wait(30)
    total = sum(sizes)
    print(f"downloaded: {args.parallel} x {sizes[0] / MB:.1f} MiB in {elapsed:.1f} s "
          f"({total / MB / elapsed:.0f} MiB/s)")
    print(f"server RSS: idle {idle_rss / MB:.1f} MiB, peak {sampler.peak / MB:.1f} MiB "
          f"({sampler.samples} samples)")
    print(f"server CPU: {server_cpu:.1f} s ({server_cpu / (total / 1e9):.2f} CPU-s per GB sent, start-up included)")
    print(f"peak_rss_mib={sampler.peak / MB:.1f}")
    return 0 if sampler.peak < 150 * MB else 1


if __name__ == "__main__":
    sys.exit(main())
