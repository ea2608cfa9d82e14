"""Two harvester trees on one scenario, run alternately: before, after, before, after...

    python bench/alternate.py SCENARIO BEFORE_TREE [--repeat N] [--small] [--json FILE]

``bench/run.py`` with ``HARVESTER_BENCH_BEFORE`` runs every before run, then every after run,
then the peers: a fixed order, so a load that rises along a hold lands on one tree. This runs
only the two harvesters (no peers: scenario g's take 270 s each), each ``--repeat`` times in
turn, against the scenario's archive and faults (``run.SETUPS``), measured exactly as
``run.py`` measures (``Bench.measure_once``: a fresh server per run, the output checked byte
for byte). BEFORE_TREE is a ``git archive`` of a commit's ``harvester`` package, put first on
``PYTHONPATH`` for its runs. Prints one row per run and the medians; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import MIB, PYTHON, compile_trees, empty_trash  # noqa: E402
from run import SETUPS, Bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=[n for n in SETUPS if not n.startswith("h")])
    parser.add_argument("before", type=Path, help="a tree with the earlier harvester package")
    parser.add_argument("--repeat", type=int, default=3, metavar="N")
    parser.add_argument("--small", action="store_true", help="the scenario's small version (a smoke test)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    compile_trees(args.before)
    bench = Bench(args.scenario, args.small, False, 1)

    def command(tree: Path | None) -> Any:
        def build(base_url: str, work: Path) -> list[str]:
            query = work / "query.json"
            query.write_text(json.dumps({"select": [{"collection": c} for c in bench.collections]}))
            if planning:   # e measures the plan, as run.py's harvester_plan
                cmd = [PYTHON, "-m", "harvester", "plan", str(query), "--json", "--api-url", base_url]
            else:
                cmd = [PYTHON, "-m", "harvester", "run", str(query), "-o", str(work / "out"), "--api-url", base_url]
            return (["env", f"PYTHONPATH={tree}"] if tree else []) + cmd
        return build

    #: scenarios that time planning, not a harvest (``run.py``'s scenario e)
    planning = args.scenario == "e"

    rows: list[dict[str, Any]] = []
    for i in range(max(1, args.repeat)):
        for label, tree in (("before", args.before), ("after", None)):
            m = bench.measure_once(f"harvester ({label})", "plan --json" if planning else "defaults", command(tree),
                                   download=not planning)
            rows.append({"tree": label, "run": i + 1, "wall": m.wall, "cpu": m.cpu, "cpu_per_gb": m.cpu_per_gb,
                         "peak_rss_mib": m.peak_rss / MIB, "requests": m.requests, "retries": m.retries,
                         "complete": m.check.complete if m.check else None, "asked": len(bench.uids),
                         "load": m.load, "bytes_sent": m.bytes_sent})
    print(f"\n{args.scenario}: `{bench.setup.spec}`, faults `{bench.setup.faults or 'none'}`, "
          f"before = {args.before}, runs alternate\n")
    print("| tree | run | wall s | CPU s | CPU-s/GB | peak RSS MiB | requests | retries | series complete | load |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['tree']} | {r['run']} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['cpu_per_gb'] or 0:.2f} | "
              f"{r['peak_rss_mib']:.0f} | {r['requests']} | {'-' if r['retries'] is None else r['retries']} | "
              f"{'-' if r['complete'] is None else r['complete']}/{r['asked']} | "
              f"{r['load']:.1f} |")
    med = {t: statistics.median(r["wall"] for r in rows if r["tree"] == t) for t in ("before", "after")}
    print(f"\nmedian wall: before {med['before']:.2f} s, after {med['after']:.2f} s, "
          f"after/before {med['after'] / med['before']:.3f}x")
    if args.json:
        args.json.write_text(json.dumps({"scenario": args.scenario, "before": str(args.before), "runs": rows}, indent=1))
    empty_trash()
    return 0


if __name__ == "__main__":
    sys.exit(main())
