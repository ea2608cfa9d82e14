"""The harvest state at archive scale (issue 16): the state alone, and a 100,000-file harvest.

State alone, no network (``state N``, each size in a fresh process so its peak RSS is its own):
N files are recorded as N / FILES_PER_SERIES synthetic series through ``HarvestState.commit``,
one at a time (the slowest case: no two commits share an fsync). Each series is a real staging
folder renamed into place; its files are hard links to one small file per series (a link is
not a new inode: this machine's ext4 is slow at creating inodes after mass deletions, which is
not the state's cost). Then:

* commit rate: series and files a second over the first and the last ``WINDOW`` commits, and
  over all of them (only the ``commit`` calls are timed, not making the staging folders);
* no-op resume: a new process opens DIR (``open``: an old journal past the mark, none here,
  then recovery, which stats every recorded file) and asks ``completed_bytes(uid)`` of every series, as the
  engine does of its plan;
* export: ``write_manifest`` (harvest.json and metadata.csv streamed from the database);
* sizes: state.db, journal.jsonl (0 since the journal is no longer written), harvest.json; peak RSS of the recording process and of the
  resuming one (``ru_maxrss``).

``prefill N`` (for 10 million files, where a million commits would take hours here): the
database is filled through ``StateDB.put`` in transactions of 1,000 series (no journal, no
files), then ``WINDOW`` ordinary commits are timed on top: the commit rate at that size.

End to end (``e2e``): ``harvester serve --synthetic`` of 2,000 series of 50 files of 1 KB, then
``harvester run`` into an empty directory and again with nothing to do, once with the harvester
of this tree and once with a baseline tree given by ``--baseline SRC`` (a checkout of the
version to compare with, e.g. ``git archive <commit> | tar -x -C SRC``): wall, CPU-s, peak RSS.

The no-op rerun as a user hits it (``rerun DIR``): DIR is a tree ``state N --keep`` left (one
collection SCALE). ``harvester serve`` of a linked copy of DIR serves those very series; then, for
this tree and the ``--baseline`` one, each on its own copy of DIR (files hard-linked, the state
database and harvest.json copied: a run rewrites them), ``harvester run`` of the query
``{collection: SCALE}`` into it, which has nothing to fetch: wall, CPU-s, peak RSS, and the
summary's counts (``complete_now`` must be 0). ``--into SPEC`` serves a synthetic archive
instead and harvests all of it into each copy: a harvest with every file of DIR recorded.

    .venv/bin/python bench/scale_state.py state 10000 1000000 [--json out.json]
    .venv/bin/python bench/scale_state.py prefill 10000000
    .venv/bin/python bench/scale_state.py prefill 10000000 --dir D --keep --budget 240 --no-commits --no-export
        (again until full, then --no-export for the commits, then --no-commits for the export)
    .venv/bin/python bench/scale_state.py e2e --baseline SRC
    .venv/bin/python bench/scale_state.py rerun D/state-1000000 --baseline SRC [--repeat 2]

Nothing here asserts a timing (``tests/store/test_db.py`` runs a tiny version).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FILES_PER_SERIES = 50          # the median of TCIA's series
WINDOW = 500                   # commits in the first and last windows


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # KiB on Linux


def _record(i: int, path: str) -> dict[str, Any]:
    uid = f"1.3.6.1.4.1.9328.50.{i}"
    files = [{"path": f"{path}/1-{k:03d}.dcm", "size": 1, "md5": "c4ca4238a0b923820dcc509a6f75849b",
              "SOPInstanceUID": f"{uid}.{k}"} for k in range(1, FILES_PER_SERIES + 1)]
    return {"SeriesInstanceUID": uid, "Collection": "SCALE", "PatientID": f"SCALE-{i // 4:07d}",
            "StudyInstanceUID": f"{uid}.0", "Modality": "CT", "status": "complete", "path": path,
            "bytes": FILES_PER_SERIES, "attempts": 1, "error": None, "completed": "2026-01-01T00:00:00.000Z",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "files": files,
            "metadata": {"SeriesInstanceUID": uid, "SeriesDescription": "scale", "Manufacturer": "SYN"},
            "study": {"StudyDate": "2000-01-01", "StudyDescription": "scale"}}


def _stage(state: Any, rec: dict[str, Any]) -> Path:
    staging = state.staging_dir(rec["SeriesInstanceUID"])
    staging.mkdir()
    first = staging / "1-001.dcm"
    first.write_bytes(b"1")
    for k in range(2, FILES_PER_SERIES + 1):
        os.link(first, staging / f"1-{k:03d}.dcm")
    return staging


def _sizes(out: Path) -> dict[str, int]:
    names = {"db": ".harvester/state.db", "wal": ".harvester/state.db-wal", "journal": ".harvester/journal.jsonl",
             "harvest_json": "harvest.json", "metadata_csv": "metadata.csv"}
    return {k: (out / v).stat().st_size if (out / v).exists() else 0 for k, v in names.items()}


def record_files(out: Path, files: int) -> dict[str, Any]:
    """Child process: record ``files`` files by commit; time the commits."""
    from harvester.store.state import HarvestState
    series = files // FILES_PER_SERIES
    state = HarvestState(out)
    state.open()
    durations: list[float] = []
    try:
        for i in range(series):
            rec = _record(i, f"SCALE/{i // 1000:04d}/{i:07d}")
            staging = _stage(state, rec)
            started = time.perf_counter()
            state.commit(rec, staging)
            durations.append(time.perf_counter() - started)
        rss_recorded = _rss_mb()
        started = time.perf_counter()
        state.write_manifest({"layout": "bench"})
        export = time.perf_counter() - started
    finally:
        state.close()
    window = min(WINDOW, len(durations))
    return {"files": series * FILES_PER_SERIES, "series": series,
            "commit_s": sum(durations),
            "series_per_s": series / sum(durations),
            "series_per_s_first": window / sum(durations[:window]),
            "series_per_s_last": window / sum(durations[-window:]),
            # the rate over each tenth of the commits, in order: flat or not as the state grows
            "series_per_s_by_tenth": [len(part) / sum(part) for k in range(10)
                                      if (part := durations[k * len(durations) // 10:(k + 1) * len(durations) // 10])],
            "export_s": export, "peak_rss_mb_recording": rss_recorded, "peak_rss_mb_with_export": _rss_mb(),
            **_sizes(out)}


def prefill(out: Path, files: int, budget: float | None = None, commits: bool = True,
            export: bool = True, batch: int = 1000) -> dict[str, Any]:
    """Child process: fill the database to ``files`` files by put (continuing a fill that a
    ``budget`` of seconds cut short before: the database's count is where it goes on), then, once
    full, time ``WINDOW`` commits on top (``commits``) and the export (``export``)."""
    from harvester.store.state import HarvestState
    series = files // FILES_PER_SERIES
    state = HarvestState(out)
    state.open()
    row: dict[str, Any] = {}
    try:
        assert state.db is not None
        have = state.db.count()
        started = time.perf_counter()
        start = have
        while start < series and (budget is None or start == have or time.perf_counter() - started < budget):
            with state.db.transaction():
                for i in range(start, min(series, start + batch)):
                    rec = _record(i, f"PREFILL/{i // 1000:04d}/{i:07d}")
                    state.db.put(rec["SeriesInstanceUID"], rec, "prefill")
            start = min(series, start + batch)
        row.update(prefill_from=have, prefill_to=state.db.count(), prefill_s=time.perf_counter() - started)
        if state.db.count() >= series and commits:
            base = state.db.count()
            durations = []
            for i in range(base, base + WINDOW):
                rec = _record(i, f"SCALE/{i:08d}")
                staging = _stage(state, rec)
                started = time.perf_counter()
                state.commit(rec, staging)
                durations.append(time.perf_counter() - started)
            row.update(commits_at_series=base, series_per_s_at_size=WINDOW / sum(durations))
            started = time.perf_counter()
            complete = sum(1 for i in range(0, base + WINDOW) if state.completed_bytes(f"1.3.6.1.4.1.9328.50.{i}"))
            row.update(complete=complete, completed_bytes_lookups_s=time.perf_counter() - started)
        row["peak_rss_mb"] = _rss_mb()
        if state.db.count() >= series and export:
            started = time.perf_counter()
            state.write_manifest({"layout": "bench"})
            row.update(export_s=time.perf_counter() - started, peak_rss_mb_with_export=_rss_mb())
    finally:
        state.close()
    count = row["prefill_to"] + (WINDOW if "series_per_s_at_size" in row else 0)
    return {"files": count * FILES_PER_SERIES, "series": count, **row, **_sizes(out)}


def resume(out: Path, series: int) -> dict[str, Any]:
    """Child process: a no-op resume: open DIR, ask ``complete`` of every series, close."""
    from harvester.store.state import HarvestState
    started = time.perf_counter()
    state = HarvestState(out)
    state.open()
    opened = time.perf_counter() - started
    try:
        # the engine asks completed_bytes(uid) of each series of its plan: here, those recorded
        uids = [f"1.3.6.1.4.1.9328.50.{i}" for i in range(series)]
        done = sum(1 for uid in uids if state.completed_bytes(uid) is not None)
    finally:
        state.close()
    return {"resume_s": time.perf_counter() - started, "open_s": opened, "complete": done, "lost": state.lost,
            "peak_rss_mb_resume": _rss_mb()}


def _child(*args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "_child", *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{args}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_state(sizes: list[int], root: Path, keep: bool) -> list[dict[str, Any]]:
    results = []
    for files in sizes:
        out = root / f"state-{files}"
        shutil.rmtree(out, ignore_errors=True)
        row = _child("record", str(out), str(files))
        row.update(_child("resume", str(out), str(files // FILES_PER_SERIES)))
        results.append(row)
        print(json.dumps(row), flush=True)
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    return results


def run_prefill(sizes: list[int], root: Path, keep: bool, options: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    for files in sizes:
        out = root / f"prefill-{files}"
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
        row = _child("prefill", str(out), str(files), json.dumps(options))
        results.append(row)
        print(json.dumps(row), flush=True)
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    return results


E2E_SPEC = "collections=1,patients=2000,studies=1,series=1,instances=50,size=1KB,seed=0"


def run_e2e(root: Path, baseline: Path | None, spec: str) -> list[dict[str, Any]]:
    sys.path.insert(0, str(REPO / "bench"))
    from harness import ServedArchive, load_archive, run_tool, warm_cache

    archive = load_archive(spec)
    collections = sorted(archive.collections())
    # every deflate stream computed and every file read before the first tree runs: otherwise
    # the first tree measures the compression and the cold page cache (this tree ran 1.5x slower
    # than the baseline that way, and as fast once warm)
    warm_cache(archive)
    trees = [("this tree", REPO)] + ([("baseline", baseline)] if baseline else [])
    results = []
    for name, src in trees:
        work = root / f"e2e-{name.replace(' ', '-')}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        query = work / "query.json"
        query.write_text(json.dumps({"select": [{"collection": c} for c in collections]}))
        env_path = str(src)
        with ServedArchive(spec) as server:
            cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {env_path!r}); "
                   "from harvester.cli import main; sys.exit(main())",
                   "run", str(query), "-o", str(work / "out"), "--api-url", server.base_url, "--no-progress"]
            first = run_tool(cmd, work / "first")
            again = run_tool(cmd, work / "again")
        row = {"tree": name, "harvest_wall_s": first.wall, "harvest_cpu_s": first.cpu,
               "harvest_peak_rss_mb": first.peak_rss / 2**20, "harvest_rc": first.returncode,
               "rerun_wall_s": again.wall, "rerun_cpu_s": again.cpu, "rerun_peak_rss_mb": again.peak_rss / 2**20,
               "rerun_rc": again.returncode, **_sizes(work / "out")}
        results.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return results


def _copy_tree(src: Path, dst: Path) -> None:
    """``dst``: ``src`` with every file hard-linked, but the files a run writes in place, locks or
    replaces (the state database and its companions, the exports) copied."""
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["cp", "-al", str(src), str(dst)], check=True)
    for name in (".harvester/state.db", ".harvester/state.db-wal", ".harvester/state.db-shm", ".harvester/lock",
                 "harvest.json", "metadata.csv"):
        target = dst / name
        if target.exists():
            target.unlink()
            shutil.copy2(src / name, target)


def _serve_dir(tree: Path, out: Path) -> tuple[subprocess.Popen[str], str]:
    code = f"import sys; sys.path.insert(0, {str(tree)!r}); from harvester.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", str(out), "--port", "0"], cwd=tree,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("http://127.0.0.1:"):
        proc.kill()
        raise RuntimeError(f"harvester serve {out} did not print its URL (got {line!r})")
    return proc, line


def run_rerun(tree_dir: Path, root: Path, baseline: Path | None, repeat: int,
              spec: str | None = None) -> list[dict[str, Any]]:
    sys.path.insert(0, str(REPO / "bench"))
    from harness import ServedArchive, load_archive, run_tool, stop_process, warm_cache

    served = root / "rerun-served"
    started = time.perf_counter()
    collections = ["SCALE"]
    synthetic: Any = None
    if spec:   # --into SPEC: a harvest of a synthetic archive into DIR, beside all it records
        archive = load_archive(spec)
        collections = sorted(archive.collections())
        warm_cache(archive)
        synthetic = ServedArchive(spec).__enter__()
        server, url = synthetic.proc, synthetic.base_url
    else:
        _copy_tree(tree_dir, served)
        server, url = _serve_dir(REPO, served)
    load = time.perf_counter() - started
    trees = [("this tree", REPO)] + ([("baseline", baseline)] if baseline else [])
    results = []
    try:
        for name, src in trees:
            work = root / f"rerun-{name.replace(' ', '-')}"
            out = work / "out"
            work.mkdir(parents=True, exist_ok=True)
            _copy_tree(tree_dir, out)
            query = work / "query.json"
            query.write_text(json.dumps({"select": [{"collection": c} for c in collections]}))
            cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(src)!r}); "
                   "from harvester.cli import main; sys.exit(main())",
                   "run", str(query), "-o", str(out), "--api-url", url, "--layout", "descriptive", "--force",
                   "--no-progress", "--json"]
            for n in range(repeat):
                got = run_tool(cmd, work / f"run-{n}")
                try:
                    summary = json.loads(got.stdout.strip().splitlines()[-1])
                except (ValueError, IndexError):
                    summary = {"stderr": got.stderr[-2000:]}
                row = {"tree": name, "run": n + 1, "wall_s": got.wall, "cpu_s": got.cpu,
                       "peak_rss_mb": got.peak_rss / 2**20, "rc": got.returncode, "serve_load_s": load,
                       **{k: summary.get(k) for k in ("planned", "complete_now", "complete_before", "failed", "received_bytes", "exit_code", "stderr")
                          if k in summary}, **_sizes(out)}
                results.append(row)
                print(json.dumps(row), flush=True)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if synthetic is not None:
            synthetic.__exit__(None, None, None)
        else:
            stop_process(server)
        shutil.rmtree(served, ignore_errors=True)
    return results


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        kind, out = sys.argv[2], Path(sys.argv[3])
        row = (record_files(out, int(sys.argv[4])) if kind == "record" else
               prefill(out, int(sys.argv[4]), **json.loads(sys.argv[5] if len(sys.argv) > 5 else "{}"))
               if kind == "prefill" else resume(out, int(sys.argv[4])))
        print(json.dumps(row))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["state", "prefill", "e2e", "rerun"])
    parser.add_argument("files", nargs="*", help="sizes in files (state, prefill); rerun: the tree")
    parser.add_argument("--dir", type=Path, help="where to work (default: a temp dir)")
    parser.add_argument("--baseline", type=Path, help="e2e: the source tree of the version to compare with")
    parser.add_argument("--spec", default=E2E_SPEC, help="e2e: the synthetic archive")
    parser.add_argument("--keep", action="store_true", help="keep DIR (prefill: and go on with the one kept)")
    parser.add_argument("--budget", type=float, help="prefill: stop filling after this many seconds "
                        "(run again with --keep to go on: each run fits a hold of the bench lock)")
    parser.add_argument("--no-commits", action="store_true", help="prefill: fill only, no timed commits")
    parser.add_argument("--no-export", action="store_true", help="prefill: no export")
    parser.add_argument("--batch", type=int, default=1000, help="prefill: series per transaction")
    parser.add_argument("--repeat", type=int, default=1, help="rerun: runs of each tree, one after the other")
    parser.add_argument("--into", metavar="SPEC", help="rerun: harvest this synthetic archive into (a copy of) "
                        "the tree instead: a harvest with every file of the tree recorded")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="scale-state-"))
    root.mkdir(parents=True, exist_ok=True)
    sizes = [int(f) for f in args.files] if args.what in ("state", "prefill") else []
    if args.what == "state":
        results = run_state(sizes or [10_000, 1_000_000], root, args.keep)
    elif args.what == "rerun":
        if len(args.files) != 1:
            parser.error("rerun takes one tree (what state N --keep left)")
        results = run_rerun(Path(args.files[0]).resolve(), root, args.baseline, args.repeat, args.into)
    elif args.what == "prefill":
        results = run_prefill(sizes or [10_000_000], root, args.keep,
                              {"budget": args.budget, "commits": not args.no_commits, "export": not args.no_export,
                               "batch": args.batch})
    else:
        results = run_e2e(root, args.baseline, args.spec)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not args.keep and args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
