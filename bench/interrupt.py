"""Issue 17: Ctrl-C or kill -9 halfway through a large series, then a rerun: bytes fetched again.

    python bench/interrupt.py [--signal int|kill] [--small]

Serves scenario g's archive (one 1 GiB series of 200 instances, 4 MB/s per connection, 64 MB/s
in total; ``--small``: 10 instances of 1 MiB at 1 MB/s, 8 MB/s), starts ``harvester run`` at
defaults, sends the signal once the server has sent half the series' bytes, then reruns into
the same folder. The server's byte counter says what each run was sent; "fetched again" is
what both runs were sent beyond the series' size (the instances in flight at the signal, and
for Ctrl-C whatever the run still fetched while it stopped). Prints one Markdown table.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import MIB, PYTHON, REPO, ServedArchive, load_archive  # noqa: E402
from run import SETUPS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--signal", choices=("int", "kill"), default="kill")
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)
    setup = SETUPS["g"][args.small]
    archive = load_archive(setup.spec)
    total = sum(r.total_bytes for r in archive.records())
    collection = next(iter(archive.records())).row["Collection"]
    sig = signal.SIGINT if args.signal == "int" else signal.SIGKILL
    with tempfile.TemporaryDirectory(prefix="bench-interrupt-") as tmp, ServedArchive(setup.spec, setup.faults) as srv:
        work = Path(tmp)
        query = work / "q.json"
        query.write_text(json.dumps({"select": [{"collection": collection}]}))
        cmd = [PYTHON, "-m", "harvester", "run", str(query), "-o", str(work / "out"), "--api-url", srv.base_url,
               "--no-progress", "--quiet"]
        start = srv.stats()["bytes_sent"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while srv.stats()["bytes_sent"] - start < total / 2 and proc.poll() is None:
            time.sleep(0.05)
        at_signal = srv.stats()["bytes_sent"] - start
        proc.send_signal(sig)
        code = proc.wait(600)
        first = srv.stats()["bytes_sent"] - start
        kept = sum(p.stat().st_size for p in (work / "out" / ".harvester" / "instances").rglob("*.dcm")) \
            if (work / "out" / ".harvester" / "instances").is_dir() else 0
        started = time.monotonic()
        rerun = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.monotonic() - started
        second = srv.stats()["bytes_sent"] - start - first
    again = first + second - total
    print(f"archive `{setup.spec}` ({total / MIB:.0f} MiB), faults `{setup.faults}`, signal {args.signal}\n")
    print("| signal | sent at signal MiB | first run sent MiB (exit) | kept instances MiB | rerun sent MiB "
          "(exit, wall s) | fetched again MiB | of the series |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    print(f"| {args.signal} | {at_signal / MIB:.0f} | {first / MIB:.0f} ({code}) | {kept / MIB:.0f} | "
          f"{second / MIB:.0f} ({rerun.returncode}, {wall:.1f}) | {again / MIB:.1f} | {again / total:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
