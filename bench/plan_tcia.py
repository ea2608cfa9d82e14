"""Planning the real shape of TCIA (issue 16): ``harvester plan`` of all 141 collections.

The server is the metadata-only backend of ``harvester.server.tciaindex``: the TCIA-sourced
original rows of the IDC index (``idc-index-data``, the ``idc`` extra; about 492,000 series,
NLST alone one getSeries answer of about 205,000 rows), with ``latency`` added to every request.
The client is ``harvester plan QUERY --json --api-url URL`` with one selector per collection, in
its own process: wall time, CPU, peak RSS (the process tree, sampled), requests (the server's
count) and the series listed. Then, outside the measured run, the folders the plan's series would
get in the ``descriptive`` layout (``store.layout.assign_paths`` over the index's rows): how
many, whether all are distinct, and how many are longer than 240 characters.

    .venv/bin/python bench/plan_tcia.py [--index PATH] [--latency 20ms] [--repeat 1] [--json OUT]

``HARVESTER_BENCH_BEFORE=DIR`` (a ``git archive`` of an earlier commit unpacked in DIR) measures
that tree's client first, against the same server, in the same invocation.
Run it under the bench lock (``flock /tmp/harvester-bench.lock ...``); it asserts no timing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import MIB, PEERS_PYTHON, PYTHON, REPO, compile_trees, request_count, run_tool, stop_process  # noqa: E402

BEFORE = os.environ.get("HARVESTER_BENCH_BEFORE", "")
LONG_PATH = 240


def find_index(given: str | None) -> Path:
    """The index given, or idc-index-data's (in this interpreter, else in the peers' venv)."""
    if given:
        return Path(given)
    for python in (PYTHON, PEERS_PYTHON):
        try:
            out = subprocess.run([python, "-c", "import idc_index_data as d; print(d.IDC_INDEX_PARQUET_FILEPATH)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            continue
        if out and Path(out).is_file():
            return Path(out)
    sys.exit("plan_tcia: no idc_index.parquet: pip install 'harvester[idc]' (or make peers), or give --index PATH")


class IndexServer:
    """``python -m harvester.server.tciaindex`` in a subprocess; a context manager."""

    def __init__(self, index: Path, faults: str) -> None:
        self.index, self.faults = index, faults
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = self.root_url = ""

    def __enter__(self) -> IndexServer:
        self.proc = subprocess.Popen([PYTHON, "-m", "harvester.server.tciaindex", str(self.index),
                                      "--faults", self.faults], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url.startswith("http://127.0.0.1:"):
            self.proc.kill()
            raise RuntimeError(f"the index server printed no base URL (got {self.base_url!r})")
        self.root_url = self.base_url.split("/nbia-api/")[0]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.root_url + "/_harvester/stats", timeout=60) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    def collections(self) -> list[str]:
        with urllib.request.urlopen(self.base_url + "/getCollectionValues", timeout=60) as resp:
            return [row["Collection"] for row in json.loads(resp.read())]


def measure(server: IndexServer, query: Path, work: Path, tree: str | None) -> dict[str, Any]:
    cmd = [PYTHON, "-m", "harvester", "plan", str(query), "--json", "--api-url", server.base_url]
    if tree:
        cmd = ["env", f"PYTHONPATH={tree}", *cmd]
    before = server.stats()
    load = os.getloadavg()[0]
    run = run_tool(cmd, work)
    after = server.stats()
    listed = None
    uids: list[str] = []
    if run.returncode == 0:
        plan = json.loads(run.stdout.strip().splitlines()[-1])
        uids = [s["SeriesInstanceUID"] for s in plan["list"]]
        listed = len(uids)
    return {"tree": tree or "this tree", "returncode": run.returncode, "wall": run.wall, "cpu": run.cpu,
            "peak_rss_mib": run.peak_rss / MIB, "requests": request_count(before, after), "series": listed,
            "load_1min": load, "stderr_tail": run.stderr[-400:], "uids": uids}


def layout_figures(index: Path, uids: list[str]) -> dict[str, Any]:
    """The descriptive-layout folders of the plan's series, in plan order (as the engine assigns)."""
    from harvester.server.tciaindex import TciaIndexArchive
    from harvester.store.layout import assign_paths

    archive = TciaIndexArchive.load(index)
    wanted = set(uids)
    fields: dict[str, dict[str, Any]] = {}
    for key in list(archive._slices):   # one collection at a time: its records are dropped after
        for rec in archive._collection(key):
            if rec.uid in wanted:
                fields[rec.uid] = {**rec.row, "StudyDescription": rec.row.get("StudyDesc", ""), "StudyID": ""}
    paths = assign_paths(((u, fields[u]) for u in uids if u in fields), "descriptive")
    lengths = sorted(len(p) for p in paths.values())
    return {"paths": len(paths), "unique": len(set(paths.values())) == len(paths),
            "over_240": sum(1 for n in lengths if n > LONG_PATH), "longest": lengths[-1] if lengths else 0,
            "median": lengths[len(lengths) // 2] if lengths else 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index")
    parser.add_argument("--latency", default="20ms")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-layout", action="store_true", help="skip the layout figures")
    args = parser.parse_args()
    index = find_index(args.index)
    compile_trees(*([BEFORE] if BEFORE else []))
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="plan-tcia-") as tmp, IndexServer(index, f"latency={args.latency}") as server:
        work = Path(tmp)
        collections = server.collections()
        query = work / "query.json"
        query.write_text(json.dumps({"select": [{"collection": c} for c in collections]}))
        print(f"{len(collections)} collections; load {os.getloadavg()[0]:.2f}", flush=True)
        for n in range(args.repeat):
            for tree in ([BEFORE] if BEFORE else []) + [None]:
                r = measure(server, query, work / f"run-{n}", tree)
                results.append(r)
                print(f"{r['tree']}: exit {r['returncode']}, {r['series']} series, {r['wall']:.1f} s wall, "
                      f"{r['cpu']:.1f} CPU-s, {r['peak_rss_mib']:.0f} MiB peak, {r['requests']} requests, "
                      f"load {r['load_1min']:.2f}", flush=True)
                if r["returncode"]:
                    print(r["stderr_tail"], flush=True)
    layout = None
    last = next((r for r in reversed(results) if r["uids"]), None)
    if last and not args.no_layout:
        started = time.monotonic()
        layout = layout_figures(index, last["uids"])
        print(f"layout descriptive: {layout['paths']} folders, unique {layout['unique']}, "
              f"{layout['over_240']} over {LONG_PATH} characters (longest {layout['longest']}, median "
              f"{layout['median']}); {time.monotonic() - started:.0f} s", flush=True)
    print(f"load after {os.getloadavg()[0]:.2f}", flush=True)
    if args.json:
        for r in results:
            r.pop("uids")
        args.json.write_text(json.dumps({"runs": results, "layout": layout}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
