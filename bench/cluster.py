"""Benchmark: one harvest on Dask distributed (harvester.cluster) with 1, 2 and 4 workers.

    python bench/cluster.py [--workers 1,2,4] [--spec SPEC] [--rate 1MiB] [--total-rate 6MiB]
                            [--per-worker 2] [--json FILE]

The archive is ``harvester serve --synthetic SPEC`` in a subprocess on loopback with a
per-connection cap (``rate``) and a total cap (``total_rate``). Each run starts a LocalCluster
of N worker processes (one thread each), every worker fetching ``--per-worker`` series at once
(``--workers`` of the harvester), so N workers ask for N x per-worker x rate until the total cap
binds; the host limit (``--connections``) is set high enough not to. Throughput is the bytes
received over the engine's run (plan and cluster start left out), as a ratio to N times the one
worker figure and as a fraction of the total cap; peak RSS is each worker process's own
(``ru_maxrss``), read after its run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import MIB, OUT_DIR, ServedArchive, load_archive, warm_cache  # noqa: E402

from harvester import cluster  # noqa: E402
from harvester.config import Config  # noqa: E402
from harvester.query import query_from_dict  # noqa: E402
from harvester.units import parse_size  # noqa: E402

SPEC = "collections=2,patients=24,studies=1,series=2,instances=8,size=128KiB,modalities=CT+MR,seed=18"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_run(n: int, base_url: str, query: dict[str, Any], per_worker: int) -> dict[str, Any]:
    import distributed

    out = OUT_DIR / f"cluster-{n}"
    shutil.rmtree(out, ignore_errors=True)
    config = Config(api_url=base_url, out_dir=out, workers=per_worker, connections=256, progress=False,
                    quiet=True, space_check=False)
    q = query_from_dict(query, origin="bench")

    async def go() -> tuple[Any, dict[str, float]]:
        async with distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, asynchronous=True,
                                            dashboard_address=None) as local:
            async with distributed.Client(local, asynchronous=True) as client:
                await client.wait_for_workers(n)
                result = await cluster.aharvest(q, config, cluster=local.scheduler_address)
                rss = await client.run(peak_rss_mib)
                return result, rss

    result, rss = anyio.run(go)
    assert result.ok, result.failed
    shutil.rmtree(out, ignore_errors=True)
    return {"workers": n, "series": result.downloaded, "bytes": result.bytes_received,
            "seconds": round(result.elapsed, 2), "mib_s": round(result.bytes_received / MIB / result.elapsed, 2),
            "peak_rss_mib": sorted(round(v, 1) for v in rss.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--spec", default=SPEC)
    ap.add_argument("--rate", default="1MiB", help="per-connection cap of the server")
    ap.add_argument("--total-rate", default="6MiB", help="the server's total cap")
    ap.add_argument("--per-worker", type=int, default=2, help="series each worker fetches at once")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    archive = load_archive(args.spec)
    warm_cache(archive)
    collections = sorted({r.row["Collection"] for r in archive.records()})
    query = {"select": [{"collection": c} for c in collections]}
    total_cap = parse_size(args.total_rate, rate=True)
    per_conn = parse_size(args.rate, rate=True)
    rows = []
    with ServedArchive(args.spec, faults=f"rate={args.rate},total_rate={args.total_rate}") as served:
        for n in counts:
            rows.append(one_run(n, served.base_url, query, args.per_worker))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    one = next((r["mib_s"] for r in rows if r["workers"] == 1), None)
    print(f"per-connection cap {args.rate}/s, total cap {args.total_rate}/s, {args.per_worker} series at once "
          f"per worker, load {os.getloadavg()[0]:.1f}")
    print("| workers | series | MiB | s | MiB/s | / (N x one worker) | / total cap | / min(both) "
          "| asked (N x per-worker x rate) MiB/s | peak RSS per worker MiB |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|")
    for r in rows:
        ideal = min(r["workers"] * one, total_cap / MIB) if one else None
        asked = r["workers"] * args.per_worker * per_conn / MIB
        print(f"| {r['workers']} | {r['series']} | {r['bytes'] / MIB:.1f} | {r['seconds']} | {r['mib_s']} | "
              f"{r['mib_s'] / (r['workers'] * one):.2f} | {r['mib_s'] / (total_cap / MIB):.2f} | "
              f"{r['mib_s'] / ideal:.2f} | "
              f"{asked:.1f} | {', '.join(map(str, r['peak_rss_mib']))} |" if one else str(r))
        r["vs_linear"] = round(r["mib_s"] / (r["workers"] * one), 3) if one else None
        r["vs_total_cap"] = round(r["mib_s"] / (total_cap / MIB), 3)
        r["vs_bound"] = round(r["mib_s"] / ideal, 3) if ideal else None
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rate": args.rate, "total_rate": args.total_rate,
                                         "per_worker": args.per_worker, "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
