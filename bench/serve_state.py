"""``harvester serve DIR`` over a large harvest: start-up time, peak RSS and query latency (issue 16).

DIR is a harvest with a state database, e.g. the 1,000,000-file tree that ``scale_state.py state
1000000 --keep`` leaves (20,000 series of 50 files, every file a hard link, one collection
``SCALE``, a patient per 4 series). For each source tree given (this one, and a baseline checkout
with ``--baseline SRC``), one after the other: ``harvester serve DIR`` in a subprocess, the time
until it prints its URL (the load), then each query ``--repeat`` times (the median), then the
server's peak RSS (``VmHWM``), and the server is stopped.

    .venv/bin/python bench/serve_state.py DIR [--baseline SRC] [--repeat 3] [--json out.json]

The queries need the records only; the one download (getImage of one series) needs its files.
Nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parent.parent


def _queries(series: int) -> list[tuple[str, str]]:
    middle = series // 2
    uid = f"1.3.6.1.4.1.9328.50.{middle}"
    patient = f"SCALE-{middle // 4:07d}"
    return [
        ("getCollectionValues", "getCollectionValues"),
        (f"getSeries Collection=scale (all {series:,} rows)", "getSeries?Collection=scale"),
        ("getSeries PatientID (lower case)", "getSeries?" + urlencode({"PatientID": patient.lower()})),
        ("getSeries SeriesInstanceUID", "getSeries?" + urlencode({"SeriesInstanceUID": uid})),
        ("getSeries Collection + Modality=ct", "getSeries?Collection=SCALE&Modality=ct"),
        (f"getPatient Collection=SCALE ({series // 4:,} patients)", "getPatient?Collection=SCALE"),
        ("getPatientStudy PatientID", "getPatientStudy?" + urlencode({"PatientID": patient})),
        ("getSeriesSize", "getSeriesSize?" + urlencode({"SeriesInstanceUID": uid})),
        ("getSOPInstanceUIDs", "getSOPInstanceUIDs?" + urlencode({"SeriesInstanceUID": uid})),
        ("getImage (one series of 50 files)", "getImage?" + urlencode({"SeriesInstanceUID": uid})),
    ]


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(tree: Path, out: Path, repeat: int, series: int) -> dict[str, Any]:
    code = f"import sys; sys.path.insert(0, {str(tree)!r}); from harvester.cli import main; sys.exit(main())"
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", str(out), "--port", "0"], cwd=tree,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().strip()
        load_s = time.perf_counter() - started
        if not base.startswith("http://"):
            raise RuntimeError(f"{tree}: serve printed {base!r}")
        rss_loaded = _peak_rss_mb(proc.pid)
        row: dict[str, Any] = {"tree": str(tree), "load_s": load_s, "peak_rss_mb_loaded": rss_loaded}
        for name, target in _queries(series):
            times, size = [], 0
            for _ in range(repeat):
                t0 = time.perf_counter()
                with urllib.request.urlopen(f"{base}/{target}", timeout=600) as resp:
                    size = len(resp.read())
                times.append(time.perf_counter() - t0)
            row[name] = {"median_ms": statistics.median(times) * 1000, "bytes": size}
        row["peak_rss_mb"] = _peak_rss_mb(proc.pid)
        return row
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path, help="a harvest with a state database (scale_state.py state N --keep)")
    parser.add_argument("--baseline", type=Path, help="the source tree of the version to compare with")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--series", type=int, default=20_000, help="how many series DIR holds")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for tree in [REPO] + ([args.baseline.resolve()] if args.baseline else []):
        row = measure(tree, args.dir.resolve(), args.repeat, args.series)
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
