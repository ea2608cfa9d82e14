"""Regenerate docs/reliability.md: run the reliability suite with a seed set and publish what it
measured.

    .venv/bin/python -m tests.reliability.report [--soak-seeds 5] [--kill-seeds 2] [--out docs/reliability.md]

Seeds: ``N`` means 1..N, ``3,7,9`` those seeds. The suite runs in a pytest subprocess with
``HARVESTER_SOAK_SEEDS``/``HARVESTER_KILL_SEEDS`` set and ``HARVESTER_RELIABILITY_FIGURES``
pointing at a scratch file; every test appends what it measured (see ``conftest.py``), and this
script only adds those figures up. Every figure in the document therefore comes from a test that
asserted on it. Exit status: pytest's (the document is written either way and says what failed).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .seeds import CI_KILL_SEEDS, CI_SOAK_SEEDS, KILL_SEEDS_ENV, SOAK_SEEDS_ENV

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("planning", "download", "verify", "unpack", "commit", "manifest", "startup", "other")
FAULTS = ("error", "throttle", "reset", "truncate", "corrupt", "stall")


#: Bugs these tests exposed (test file, what happened, the commit that fixed it).
FOUND = [
    ("test_disk_full.py", "EFBIG/ENOSPC while appending to the journal left bytes in its buffer; closing it raised "
     "again and `harvester run` died with a traceback", "b50b8ca: unbuffered journal, a failed append is truncated "
     "away (the journal stays whole lines); clean exit 3"),
    ("test_disk_full.py", "disk full while rewriting harvest.json at the end was swallowed: exit 0, "
     "'0/0 series complete', a stale manifest", "b50b8ca: it is the run's fatal error (exit 3)"),
    ("test_hostile_server.py", "`sync` of changed series whose new copies all failed (attack ZIPs) said "
     "'16/16 complete, 0 failed', exit 0: the user could not know the mirror was stale",
     "99d3d36: a failed refetch is listed with its reason and exits 1; the old copy is still kept"),
    ("test_hostile_inputs.py", "a manifest referencing `/dev/zero` read until memory ran out (MemoryError "
     "traceback); a FIFO as query file hung forever", "3b725ea: only regular files are read (exit 2, one line)"),
    ("test_secrets.py", "a token endpoint answering 200 with HTML (a login page, or a redirect to one) crashed "
     "`harvester run --user` with a JSONDecodeError traceback", "2beaedc: exit 3, one line naming the endpoint, "
     "never its body"),
    ("test_containment.py", "`verify --repair` created and replaced files that harvest.json or the journal listed "
     "as `../x` or `/abs`, with bytes from the archive it names: a shared dataset could plant a file anywhere",
     "3c44278: every path from outside goes through `harvester.containment`; refused, reported with the record, "
     "exit 1"),
    ("test_containment.py", "the clean-up of a failed first run into `A/B/C/out` removed `A/B` whole, with any "
     "harvest another run had put there meanwhile", "c903e19: only the folders this run created, deepest first, "
     "and only while empty"),
    ("test_containment.py", "links planted at `.harvester`, `.harvester/tmp`, `licenses` or a collection, patient, "
     "study or series folder made `run` write (or empty `tmp/`) outside DIR", "3c44278, 374438d: refused, exit 3, "
     "one line naming the link"),
    ("test_containment.py", "`harvester serve` checked each file when it loaded DIR, then opened it following links: "
     "a file or folder swapped for a link later was served from outside DIR", "f097d47: opened at request time "
     "with O_NOFOLLOW, and only at the path it was indexed at"),
    ("test_containment.py", "a FIFO as harvest.json hung `verify`, `status`, `export`, `report` and `serve`; a "
     "journal that is a link made `run` append outside DIR", "527b287: DIR's own files are read without following links, "
     "only if regular"),
    ("test_containment.py", "a forged `forget` line in the journal moved a series into `.harvester/tmp`, which the "
     "next open emptied: verified files deleted", "fd0b856: only a series folder, only into the trash; refused with "
     "a warning"),
    ("test_serve_hardening.py", "`harvester serve` kept a stalled or dribbling half-request open for aiohttp's "
     "default hour (and, on older aiohttp, forever)", "d70fc4a: connections idle for 30 s are closed; explicit "
     "request-line and header limits"),
    ("test_exceptions.py", "a redirect loop, a redirect to `file:`, 2 MB response headers and getSeries JSON nested "
     "200,000 deep each ended `harvester run` with a traceback (TooManyRedirects, NonHttpUrlRedirectClientError, "
     "ClientResponseError, RecursionError), on every rerun", "2363f4e: every aiohttp exception is classified "
     "(one line, exit 3); redirects are followed by the harvester's own policy"),
    ("test_exceptions.py", "`[/]` in a collection name crashed `harvester query` with rich's MarkupError; a "
     "harvest.json record with `bytes: \"many\"` or a list for `files` crashed `status` and `verify`; "
     "`last_sync: 5` crashed `sync`", "2363f4e, bf4026f: server text is escaped for rich; records and header "
     "times are type-checked, reported with their line or record number and skipped"),
    ("test_time_bounds.py", "a 503 with `Retry-After: inf` (or 10^9 s, or a date in 9999) made `harvester run` wait "
     "without a word (killed after 40 s in the check)", "2363f4e: past the 300 s cap the request fails with the "
     "reason and the series is tried again later"),
    ("test_secrets_echo.py", "a server echoing the bearer token and the password (literal and base64) in a 400, a "
     "text/plain or a non-ZIP body put them into the journal, harvest.json, stdout and stderr", "2363f4e: one redaction point in every "
     "HarvesterError, for every form of every secret the client knows"),
]


def run_suite(soak: str, kill: str, figures: Path, junit: Path) -> int:
    env = {**os.environ, SOAK_SEEDS_ENV: soak, KILL_SEEDS_ENV: kill,
           "HARVESTER_RELIABILITY_FIGURES": str(figures)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
           "tests/reliability"]
    print("running:", " ".join(cmd), f"(HARVESTER_SOAK_SEEDS={soak} HARVESTER_KILL_SEEDS={kill})", flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def load(figures: Path) -> list[dict[str, Any]]:
    if not figures.exists():
        return []
    return [json.loads(line) for line in figures.read_text("utf-8").splitlines() if line.strip()]


def outcomes(junit: Path) -> dict[str, Counter[str]]:
    """Per test file: passed / failed / skipped."""
    by_file: dict[str, Counter[str]] = defaultdict(Counter)
    if not junit.exists():
        return by_file
    for case in ET.parse(junit).iter("testcase"):
        name = case.get("classname", "").rsplit(".", 1)[-1] or "?"
        if case.find("failure") is not None or case.find("error") is not None:
            by_file[name]["failed"] += 1
        elif case.find("skipped") is not None:
            by_file[name]["skipped"] += 1
        else:
            by_file[name]["passed"] += 1
    return by_file


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def render(rows: list[dict[str, Any]], results: dict[str, Counter[str]], *, soak: str, kill: str,
           command: str, status: int) -> str:
    kinds: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        kinds[r["kind"]].append(r)
    soaks, kills = kinds["soak"], kinds["kill"]
    faults = Counter[str]()
    for s in soaks:
        faults.update(s["faults"])
    phases = Counter[str]()
    for k in kills:
        phases.update(k["by_phase"])
    hostile = kinds["hostile"]
    hostile_inputs = sum(h.get("inputs", 0) for h in hostile)
    hypothesis = sum(h.get("hypothesis_examples", 0) for h in hostile)
    serve_requests = sum(s.get("requests", 0) for s in kinds["serve"])
    containment = kinds["containment"]
    soak_series = sum(s["series"] for s in soaks)
    kill_series = sum(k["series"] for k in kills)
    verified = sum(s["bytes_verified"] for s in soaks) + sum(k["bytes_verified"] for k in kills)
    files = sum(s["files"] for s in soaks) + sum(k["files"] for k in kills)
    lost = sum(s.get("lost", 0) for s in soaks) + sum(k.get("lost", 0) for k in kills)
    total_kills = sum(k["kills"] for k in kills)
    failed = sum(c["failed"] for c in results.values())
    passed = sum(c["passed"] for c in results.values())
    skipped = sum(c["skipped"] for c in results.values())
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    import aiohttp
    import pydicom

    out: list[str] = []
    w = out.append
    w("# Reliability and security: what is tested, and the figures")
    w("")
    w(f"Generated by `{command}` on {dt.date.today().isoformat()} at commit `{git or '?'}` "
      f"(Python {platform.python_version()}, aiohttp {aiohttp.__version__}, pydicom {pydicom.__version__}, "
      f"{os.cpu_count()} CPU). Do not edit by hand: rerun the command. Every figure below was measured "
      f"by a test in `tests/reliability/` that asserted on it; the script only adds them up.")
    w("")
    if status != 0 or failed:
        w(f"**{failed} test(s) FAILED in this run (pytest exit status {status}); the figures below are "
          f"incomplete.**")
        w("")
    w(f"Tests: {passed} passed, {failed} failed, {skipped} skipped "
      f"(soak seeds `{soak}`, kill seeds `{kill}`).")
    w("")
    w("## Summary")
    w("")
    w("| figure | value |")
    w("|---|---|")
    w(f"| series harvested under injected faults, byte-identical | {soak_series + kill_series:,} "
      f"({len(soaks)} chaos soak seed(s) x 300, {len(kills)} kill campaign(s) x 60) |")
    w(f"| faults injected (server statistics) | {sum(faults.values()):,}: "
      + ", ".join(f"{k} {faults.get(k, 0):,}" for k in FAULTS) + " (plus latency and bandwidth caps on every request) |")
    w(f"| kill -9 survived | {total_kills}: " + ", ".join(f"{p} {phases.get(p, 0)}" for p in PHASES if phases.get(p))
      + " |")
    w(f"| hostile inputs tried | {hostile_inputs + serve_requests:,} ({hypothesis:,} of them hypothesis examples; "
      f"{serve_requests} hostile requests to `harvester serve`) |")
    w(f"| containment attacks tried (paths leaving DIR, planted links, swapped files, hostile DIRs) | "
      f"{sum(c.get('attacks', 0) for c in containment):,} in {len(containment)} cases; written outside DIR: 0 |")
    w(f"| bytes verified (MD5 against the archive, after the soak and after each campaign) | {mib(verified)} "
      f"in {files:,} files |")
    w(f"| data lost (a completed series fetched again, damaged or gone) | {lost} |")
    w("")
    w("## What is tested")
    w("")
    w("| area | test file | what must hold | result |")
    w("|---|---|---|---|")

    def res(name: str) -> str:
        c = results.get(name, Counter())
        text = f"{c['passed']} passed"
        if c["failed"]:
            text += f", **{c['failed']} failed**"
        if c["skipped"]:
            text += f", {c['skipped']} skipped"
        return text

    w("| chaos soak | `test_chaos_soak.py` | every fault kind at >= 10% per request at once (error, throttle, reset, "
      "truncate, corrupt, stall) plus latency, per-download and total bandwidth caps; 300 series, 16 workers; "
      "the harvest ends complete and byte-identical, and the server's counters prove each fault kind hit | "
      f"{res('test_chaos_soak')} |")
    w("| crash consistency | `test_crash_consistency.py` | kill -9 of `harvester run` aimed at each phase (the phase "
      "hit is read from what the process left on disk); after every kill harvest.json and the state database agree with "
      "the tree, nothing partial sits under a final name, and the next run downloads no completed series again | "
      f"{res('test_crash_consistency')} |")
    w("| disk full, unwritable output | `test_disk_full.py` | a 3 MB tmpfs (ENOSPC), RLIMIT_FSIZE (EFBIG) mid-state and "
      "at the final harvest.json, output under a regular file, read-only tmpfs and bind mount: exit 3 with one "
      "line, verified series kept, the rerun after freeing space completes without refetching them | "
      f"{res('test_disk_full')} |")
    w("| hostile query files | `test_hostile_inputs.py` | hypothesis drives `harvester plan` with query-file bytes of "
      "every type; nasty files (devices, FIFOs, YAML tags and alias bombs, deep nesting, huge fields) through real "
      "`harvester run` processes: exit 2, one line naming the file, nothing created, no traceback | "
      f"{res('test_hostile_inputs')} |")
    w("| hostile archive | `test_hostile_server.py` | getSeries rows with traversal, NUL, device names, huge strings, "
      "wrong types, missing keys, lying counts, odd UIDs; hand-built ZIPs that lie in every header field: each "
      "series completes into sanitised paths inside DIR or fails with a reason, nothing is written outside DIR, "
      "and completed series survive the archive turning hostile (run and sync) | "
      f"{res('test_hostile_server')} |")
    w("| hostile ZIP bytes | `test_hostile_zip_fuzz.py` | hypothesis-mutated series ZIPs and DICOM headers: "
      "accepted whole and of this series (pydicom agrees), or refused as a series error; nothing outside staging | "
      f"{res('test_hostile_zip_fuzz')} |")
    w("| `harvester serve` | `test_serve_hardening.py` | traversal in parameters and paths never serves a file outside "
      "the archive; no directory listing; oversized requests get 4xx and serving goes on; stalled, dribbling and "
      "non-reading clients do not starve a normal one; a stalled half request is closed; loopback by default | "
      f"{res('test_serve_hardening')} |")
    w("| containment | `test_containment.py` | paths from harvest.json and the journal (`../x`, `/abs`, through a "
      "link), links planted at `.harvester`, `.harvester/tmp`, `licenses` and at every level of the layout, files "
      "swapped under `harvester serve`, a failed first run beside another harvest, a FIFO as harvest.json: "
      "refused with one line (exit 3, or reported with the record and exit 1), a decoy tree beside DIR unchanged "
      "byte for byte, the rerun completes; every CLI command on a hostile DIR under `-X faulthandler` without a "
      f"traceback | {res('test_containment')} |")
    w("| secrets | `test_secrets.py` | the password, every issued token and a password in the URL never appear in "
      "stdout, stderr, state.db (rows inflated), harvest.json, metadata.csv, report.html or status/verify/query output, with "
      "refreshes under faults, a rejected refresh, a password rejected mid-run, and six broken token endpoints | "
      f"{res('test_secrets')} |")
    w("| secrets echoed | `test_secrets_echo.py` | a server echoing the bearer token, refresh token and password "
      "(literal, URL-encoded, base64, the basic-auth pair) in 400, 500, text/plain and non-ZIP bodies and a "
      "getSeries answer: no form of them in any byte under DIR or printed by run/status/verify/report/export | "
      f"{res('test_secrets_echo')} |")
    w("| time bounds | `test_time_bounds.py` | Retry-After past the cap (1e9, inf, nan, -1, 9999) is not waited for; "
      "a dribbling server is cut off by the stall rule and a never-ending one by the deadline, with the URL named | "
      f"{res('test_time_bounds')} |")
    w("| size bounds | `test_size_bounds.py` | getImage past the announced size (plain, gzip, deflate) stops and its "
      "temp file goes; getSeries past the JSON cap (plain, gzip bomb) or nested 200,000 deep: one line, exit 3 | "
      f"{res('test_size_bounds')} |")
    w("| exceptions classified | `test_exceptions.py` | redirect loops, file:/ftp:/invalid/cross-origin redirects, 2 MB "
      "headers, invalid UTF-8, undecodable Content-Encoding, rich markup, malformed journal and harvest.json lines: "
      "one line from every CLI command (`-X faulthandler`), never a traceback; reruns complete | "
      f"{res('test_exceptions')} |")
    w("| DICOMweb requests | `test_exceptions_dicomweb.py` | the DICOMweb client's QIDO-RS requests under redirect loops, "
      "ftp: redirects, JSON nested 200,000 deep or past the cap, 2 MB headers and an echoed bearer token or basic "
      "password: one classified error each, no secret in it (in process, no Orthanc needed) | "
      f"{res('test_exceptions_dicomweb')} |")
    w("")
    out.extend(render_issue14(kinds["issue14"]))
    w("## Chaos soak, per seed")
    w("")
    w("| seed | series | requests | downloads | retries | " + " | ".join(FAULTS) + " | bytes verified | lost |")
    w("|---|---|---|---|---|" + "---|" * len(FAULTS) + "---|---|")
    for s in sorted(soaks, key=lambda r: r["seed"]):
        w(f"| {s['seed']} | {s['series']} | {s['requests']:,} | {s['downloads']:,} | {s['retries']:,} | "
          + " | ".join(str(s["faults"].get(k, 0)) for k in FAULTS) + f" | {mib(s['bytes_verified'])} | {s['lost']} |")
    w("")
    w("Faults (`tests/reliability/test_chaos_soak.py`): `error=0.1, throttle=0.1, reset=0.1, truncate=0.1, "
      "corrupt=0.1, stall=0.1` (stalls of 3 s against a 1 s read timeout), `latency=2ms, rate=256KiB, "
      "total_rate=8MiB`. A download is hit by more than one kind at once (e.g. corrupt and stall).")
    w("")
    w("## kill -9 campaign, per seed")
    w("")
    w("| seed | kills | " + " | ".join(PHASES) + " | aimed but missed | (series, kill) pairs that had to survive | downloads | lost |")
    w("|---|---|" + "---|" * len(PHASES) + "---|---|---|---|")
    for k in sorted(kills, key=lambda r: r["seed"]):
        w(f"| {k['seed']} | {k['kills']} | " + " | ".join(str(k["by_phase"].get(p, 0)) for p in PHASES)
          + f" | {len(k['missed'])} | {k['complete_at_kills']} | {k['downloads']} | {k['lost']} |")
    w("")
    w("How kills are aimed (`tests/reliability/crash.py`): planning, server latency 150 ms; download, 16 KB/s per "
      "series; verify, one corrupt instance per series and 200 ms latency (the single-instance repair); unpack, "
      "30 files per series; commit and manifest, a slow disk (`slow_disk.py`: each fsync +50 ms, no change to the "
      "harvester); plus kills at random moments. `startup` is a kill before the process reached the archive; "
      "`other` one between phases. The phase reported is the one observed on disk, not the one aimed at.")
    w("")
    w("## Disk full and unwritable output")
    w("")
    w("| case | series kept through the stop | the one line printed |")
    w("|---|---|---|")
    for d in kinds["disk"]:
        kept = f"{d['kept']} of {d['series']}" if "kept" in d else "-"
        w(f"| {d['case']} | {kept} | `{d.get('message', '')}` |")
    w("")
    w("## Hostile inputs")
    w("")
    w("| family | inputs | of which hypothesis examples |")
    w("|---|---|---|")
    grouped: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for h in hostile:
        grouped[h["family"]][0] += h.get("inputs", 0)
        grouped[h["family"]][1] += h.get("hypothesis_examples", 0)
    for family, (n, hyp) in grouped.items():
        w(f"| {family} | {n:,} | {hyp:,} |")
    for s in kinds["serve"]:
        w(f"| `harvester serve`: {s['case']} | {s['requests']} | 0 |")
    w("")
    w("## Containment")
    w("")
    w("One function (`harvester.containment.inside`) resolves every path that comes from a manifest, the journal, "
      "harvest.json, the server or a layout template; renames into place go through a folder descriptor opened "
      "without following links, and `serve` opens files at request time with `O_NOFOLLOW` at the path it "
      "indexed. A link inside DIR is refused (DIR itself may be a link). Each case hashes a decoy tree beside "
      "DIR before and after (unchanged in every case) and reruns once the attack is undone.")
    w("")
    w("| case | attacks | exit | the one line |")
    w("|---|---|---|---|")
    for c in containment:
        w(f"| {c['case']} | {c['attacks']} | {c['exit']} | `{c['line']}` |")
    w("")
    w("## Secrets")
    w("")
    w("| case | texts scanned | secrets looked for |")
    w("|---|---|---|")
    for s in kinds["secrets"]:
        w(f"| {s['case']} | {s['texts']} | {s['secrets']} |")
    w("")
    w("## What this suite found, and what was fixed")
    w("")
    w("| found by | problem | fix |")
    w("|---|---|---|")
    for found, problem, fix in FOUND:
        w(f"| `{found}` | {problem} | {fix} |")
    w("")
    w("## Running it")
    w("")
    w(f"CI (`make test`) runs the whole suite with the short seed set (soak seeds {CI_SOAK_SEEDS}, kill seeds "
      f"{CI_KILL_SEEDS}); `{SOAK_SEEDS_ENV}` and `{KILL_SEEDS_ENV}` (`N` for 1..N, or a comma list) choose others. "
      "A long soak:")
    w("")
    w("```make")
    w("## Long chaos soak and kill -9 campaign (20 + 5 seeds); make soak SOAK_SEEDS=50 for more")
    w("SOAK_SEEDS ?= 20")
    w("KILL_SEEDS ?= 5")
    w("soak: $(VENV)/.installed-test")
    w("\tHARVESTER_SOAK_SEEDS=$(SOAK_SEEDS) HARVESTER_KILL_SEEDS=$(KILL_SEEDS) $(BIN)/python -m pytest -q \\")
    w("\t\ttests/reliability/test_chaos_soak.py tests/reliability/test_crash_consistency.py")
    w("```")
    w("")
    w(f"This page: `{command}`.")
    w("")
    return "\n".join(out)


def render_issue14(rows: list[dict[str, Any]]) -> list[str]:
    """The section on the families of issue 14 (secrets echoed, time and size bounds, classified
    exceptions): per family, the attacks tried and the outcome every one of them had."""
    out = ["## Secrets echoed, time and size bounds, classified exceptions", "",
           "Each attack runs real `python -X faulthandler -m harvester` processes against a hostile loopback server "
           "(`tests/reliability/hostile.py`), scans every byte under DIR and printed for the token, the password and "
           "their encodings and for `Traceback`, and ends with a rerun against the healthy server that completes.", "",
           "| family | attacks | outcome (all of them) | a message |", "|---|---|---|---|"]
    grouped: dict[str, list[Any]] = {}
    for r in rows:
        g = grouped.setdefault(r["family"], [0, r.get("outcome", ""), ""])
        g[0] += r.get("attacks", 0)
        if not g[2]:
            msgs = r.get("messages")
            msg = r.get("message") or (next(iter(msgs.values() if isinstance(msgs, dict) else msgs), "") if msgs else "")
            g[2] = str(msg).replace("|", "\\|")[:160]
    for family, (n, outcome, msg) in grouped.items():
        out.append(f"| {family} | {n} | {outcome} | {'`' + msg + '`' if msg else ''} |")
    out.append(f"| **total** | {sum(g[0] for g in grouped.values())} | | |")
    out.append("")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--soak-seeds", default="5", help="N (1..N) or a comma list (default 5)")
    parser.add_argument("--kill-seeds", default="2", help="N (1..N) or a comma list (default 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    args = parser.parse_args(argv)
    command = ".venv/bin/python -m tests.reliability.report"
    if args.soak_seeds != "5" or args.kill_seeds != "2":
        command += f" --soak-seeds {args.soak_seeds} --kill-seeds {args.kill_seeds}"
    with tempfile.TemporaryDirectory(prefix="reliability-") as scratch:
        figures, junit = Path(scratch) / "figures.jsonl", Path(scratch) / "junit.xml"
        status = run_suite(args.soak_seeds, args.kill_seeds, figures, junit)
        text = render(load(figures), outcomes(junit), soak=args.soak_seeds, kill=args.kill_seeds,
                      command=command, status=status)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
