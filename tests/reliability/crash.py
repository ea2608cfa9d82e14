"""The kill -9 campaign: kill ``harvester run`` at chosen moments of every phase, check the tree
after each kill, and check that no completed series is ever downloaded again.

Phases, and how a kill is aimed at each (every kill is a real SIGKILL of a real process; the
phase it hit is then *observed* from what it left on disk, never assumed):

``planning``  the server answers every request 150 ms late; kill 0-250 ms after the first
              planning request reached it (no ``run`` event in the state database yet).
``download``  the server sends each series (~27 KB) at 16 KB/s; kill while it sends one (its
              in-flight count) or a staging folder fills (the streaming sink writes instances
              in batches as bytes arrive, a series' first MiB from memory: there is no
              ``.zip.partial`` any more, and downloading and unpacking are one phase).
``verify``    every series has one corrupt instance and requests are 200 ms late; kill while the
              single-instance repair runs (the staging folder holds every file).
``commit``    a slow disk (each fsync and rename +50 ms, ``slow_disk.py``); kill as soon as a
              ``commit`` event is in the state database, before its staging folder is renamed
              into place.
``manifest``  the same slow disk; kill while ``.harvest.json.*.tmp``/``.metadata.csv.*.tmp``
              exists (harvest.json or metadata.csv being rewritten).
``random``    a slow link; kill at a uniformly random moment 0.3-3 s after the start (which may
              be ``startup``: before the process reached the archive).

After every kill, ``check_tree`` asserts what a user may rely on at that instant, and the next
run must not download again any series that was complete (or recoverable) at the kill.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harvester.server.archive import Archive
from harvester.server.testing import ServerHandle
from harvester.store.state import series_key

#: 60 series of 30 small instances: long enough downloads to aim at.
KILL_SPEC = "collections=1,patients=6,studies=1,series=10,instances=30,size=256B,seed=62"
PHASES = ("planning", "download", "verify", "commit", "manifest")
#: When several phases are in progress at the kill, the one reported (rarest first).
_PRIORITY = ("commit", "manifest", "verify", "download", "planning", "startup")
SLOW_DISK = Path(__file__).with_name("slow_disk.py")
FSYNC_DELAY = "0.05"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
TRIGGER_TIMEOUT = 30.0


@dataclass
class Target:
    faults: str | None
    slow_disk: bool = False


TARGETS: dict[str, Target] = {
    "planning": Target("latency=150ms"),
    "download": Target("rate=16KiB"),
    "verify": Target("corrupt=1.0,latency=200ms"),
    "commit": Target(None, slow_disk=True),
    "manifest": Target(None, slow_disk=True),
    "random": Target("rate=96KiB,latency=20ms"),
}


@dataclass
class Kill:
    target: str
    phase: str             # what the kill hit, as observed on disk ("startup", "other" between phases)
    phases: list[str]      # everything in progress at that instant
    elapsed: float         # seconds from launch to the kill


@dataclass
class CampaignResult:
    seed: int
    kills: list[Kill] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)      # aimed at, but the moment never came
    finished_early: int = 0                              # runs that ended before the trigger
    complete_at_kills: int = 0                           # (series, kill) pairs that had to survive
    lost: int = 0                                        # completed series fetched again or gone
    final_series: int = 0
    bytes_verified: int = 0

    def by_phase(self) -> dict[str, int]:
        counts = {p: 0 for p in (*PHASES, "startup", "other")}
        for k in self.kills:
            counts[k.phase] = counts.get(k.phase, 0) + 1
        return counts


# ------------------------------------------------------------------------------ the run events

def _events_after(conn: sqlite3.Connection, after: int) -> list[tuple[int, str, dict[str, Any]]]:
    try:
        rows = conn.execute("SELECT id, kind, body FROM events WHERE id > ? ORDER BY id", (after,)).fetchall()
    except sqlite3.OperationalError:   # the database is being created: no tables yet
        return []
    return [(i, kind, json.loads(body)) for i, kind, body in rows]


class EventTail:
    """Reads the state database's new run events since the last call (the table only grows),
    through a read-only connection of its own (what a kill leaves committed)."""

    def __init__(self, out: Path) -> None:
        self.db = out / ".harvester" / "state.db"
        self._conn: sqlite3.Connection | None = None
        self.after = 0
        if self.db.exists():
            self.after = max((i for i, _, _ in self._events()), default=0)

    def _events(self) -> list[tuple[int, str, dict[str, Any]]]:
        if self._conn is None:
            if not self.db.exists():
                return []
            self._conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        return _events_after(self._conn, self.after)

    def new_events(self) -> list[dict[str, Any]]:
        got = self._events()
        if got:
            self.after = got[-1][0]
        return [{**body, "event": kind} for _, kind, body in got]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def committed_records(out: Path) -> dict[str, dict[str, Any] | None]:
    """uid -> the series record the database holds now, for every series a ``commit`` event
    names (None: no record any more)."""
    db = out / ".harvester" / "state.db"
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        uids = {body.get("uid") for _, kind, body in _events_after(conn, 0) if kind == "commit"}
        latest: dict[str, dict[str, Any] | None] = {}
        for uid in sorted(u for u in uids if isinstance(u, str)):
            row = conn.execute("SELECT record FROM series WHERE uid=?", (uid,)).fetchone()
            latest[uid] = json.loads(zlib.decompress(row[0])) if row is not None else None
        return latest
    finally:
        conn.close()


# ------------------------------------------------------------------------------ observing a kill

def _dicom_files(folder: Path) -> int:
    try:
        return sum(1 for p in folder.iterdir() if not p.name.endswith(".repair"))
    except OSError:
        return 0


def observe(out: Path, started: bool, run_started: bool, committed_keys: set[str], instances: int,
            streaming: bool = False) -> set[str]:
    """The phases in progress when the process died, read from what it left on disk
    (``instances``: the files of every series) and from the server (``streaming``: a series ZIP
    was being sent to it at the kill; the sink holds a series' first MiB in memory before its
    staging folder appears, so a small series downloading leaves nothing on disk).

    ``started``: the process had reached the archive (its first planning request), so it had
    opened DIR and cleaned what earlier runs left in ``.harvester/tmp``; before that, the kill
    hit interpreter start-up and whatever is on disk is an earlier run's.
    """
    if not started and not run_started:
        return {"startup"}
    phases: set[str] = set()
    if not run_started:
        phases.add("planning")
    if streaming and run_started:
        phases.add("download")
    tmp = out / ".harvester" / "tmp"
    names = {p.name for p in tmp.iterdir()} if tmp.is_dir() else set()
    for name in names:
        if name.endswith(".staging"):
            key = name.removesuffix(".staging")
            if key in committed_keys:
                phases.add("commit")       # recorded, not yet renamed
            elif _dicom_files(tmp / name) < instances:
                phases.add("download")     # the sink writes each instance as its bytes arrive
            else:
                phases.add("verify")       # every file arrived: the checks at the end, a repair, the commit
        elif name.startswith("replaced-"):
            phases.add("commit")
    if any(out.glob(".*.tmp")) or any((out / "licenses").glob(".*.tmp")):
        phases.add("manifest")
    return phases


def primary(phases: set[str], target: str) -> str:
    if target in phases:
        return target
    return next((p for p in _PRIORITY if p in phases), "other")


# ------------------------------------------------------------------------------ the invariants

def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _whole(folder: Path, rec: dict[str, Any]) -> bool:
    """Every file of the record is in ``folder`` with its recorded MD5."""
    prefix = rec["path"] + "/"
    for f in rec["files"]:
        p = folder / f["path"].removeprefix(prefix)
        if not p.is_file() or _md5(p) != f["md5"]:
            return False
    return bool(rec["files"])


def check_tree(out: Path, archive: Archive) -> set[str]:
    """Assert the invariants of DIR at an arbitrary instant (after a kill -9).

    * harvest.json parses (it is only ever replaced atomically) and every file it lists as part
      of a complete series exists with its MD5, which is the archive's MD5 for that instance;
    * every series the database recorded as committed is whole under its final name, or whole in
      its staging folder (killed between its row and the rename: the next run finishes the rename);
    * every file under DIR outside ``.harvester/`` is listed by harvest.json or by a committed
      record with that MD5, a complete license, or a temp file (``.NAME.PID.tmp``) of a rewrite
      in progress: nothing partial ever sits under a final name.

    Returns the series a rerun must not download again.
    """
    md5_of_sop = {i.sop_uid: i.md5 for r in archive.records() for i in r.instances}
    listed: dict[Path, str] = {}
    manifest = out / "harvest.json"
    if manifest.exists():
        doc = json.loads(manifest.read_text("utf-8"))
        for rec in doc["series"]:
            if rec.get("status") != "complete":
                continue
            for f in rec["files"]:
                path = out / f["path"]
                assert path.is_file(), f"harvest.json lists {f['path']}, which does not exist"
                assert _md5(path) == f["md5"] == md5_of_sop[f["SOPInstanceUID"]], f"{f['path']}: wrong bytes"
                listed[path.resolve()] = f["md5"]
    must_skip: set[str] = set()
    tmp = out / ".harvester" / "tmp"
    for uid, rec in committed_records(out).items():
        assert rec is not None and rec["status"] == "complete", f"{uid} was committed, and its record is now {rec}"
        final = out / rec["path"]
        staging = tmp / f"{series_key(uid)}.staging"
        if final.exists():
            assert _whole(final, rec), f"{rec['path']}: committed folder is not whole"
            for f in rec["files"]:
                assert f["md5"] == md5_of_sop[f["SOPInstanceUID"]]
                listed[(out / f["path"]).resolve()] = f["md5"]
        else:
            assert staging.is_dir() and _whole(staging, rec), \
                f"the database committed {uid} but neither its folder nor its staging folder is whole"
        must_skip.add(uid)
    licenses = {r.license_text for r in archive.records()}
    for path in out.rglob("*"):
        rel = path.relative_to(out)
        if path.is_dir() or rel.parts[0] == ".harvester" or str(rel) in ("harvest.json", "metadata.csv"):
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            continue  # atomic_write's temp file: not a final name
        if rel.parts[0] == "licenses":
            assert path.read_text("utf-8") in licenses, f"{rel}: partial license file"
            continue
        assert path.resolve() in listed, f"{rel}: a file under a final name that no commit vouches for"
        assert _md5(path) == listed[path.resolve()], f"{rel}: bytes differ from the record"
    metadata = out / "metadata.csv"
    if metadata.exists():
        assert metadata.read_text("utf-8").startswith("Series UID,Collection,"), "metadata.csv is torn"
    return must_skip


# ------------------------------------------------------------------------------ the campaign

class Campaign:
    """One seeded sequence of kills into one output directory, then a final complete run."""

    def __init__(self, archive: Archive, server: ServerHandle, work: Path, seed: int, *,
                 kills_per_phase: int = 3, random_kills: int = 6, max_attempts: int = 60) -> None:
        self.archive, self.server, self.seed = archive, server, seed
        self.work = work
        self.harvests = 1          # output folders used: a new one once a harvest is whole
        self.out = work / "out"
        self.whole: list[Path] = []   # earlier output folders, left whole (the final run resumes each)
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.query = work / "q.yaml"
        collections = sorted({r.row["Collection"] for r in archive.records()})
        self.query.write_text(yaml.safe_dump({"select": [{"collection": c} for c in collections]}))
        self.rng = random.Random(seed)
        self.streaming_at_kill = False   # the server was sending a series ZIP at the last kill
        self.schedule = [p for p in PHASES for _ in range(kills_per_phase)] + ["random"] * random_kills
        self.rng.shuffle(self.schedule)
        self.max_attempts = max_attempts
        self.result = CampaignResult(seed=seed)
        self.ever_complete: set[str] = set()

    def args(self, slow_disk: bool) -> list[str]:
        harvester = ["run", str(self.query), "-o", str(self.out), "--api-url", self.server.base_url,
                     "--workers", "3", "--timeout", "5", "--retries", "6", "--no-progress", "--quiet"]
        if slow_disk:
            return [sys.executable, str(SLOW_DISK), FSYNC_DELAY, *harvester]
        return [sys.executable, "-m", "harvester", *harvester]

    def run(self) -> CampaignResult:
        queue = list(self.schedule)
        attempts = 0
        while queue and attempts < self.max_attempts:
            attempts += 1
            target = queue.pop(0)
            if not self._attempt(target, attempts):
                queue.append(target)  # the moment never came (e.g. the run got past it): aim again
        self.result.missed = queue
        self._final_run()
        return self.result

    def _trigger(self, target: str, proc: subprocess.Popen[bytes], tail: EventTail,
                 launched: float) -> tuple[bool, bool, bool, set[str]]:
        """Wait for the moment to kill. Returns (killed, reached the archive, ``run`` event recorded,
        keys of series committed since launch).

        Every trigger but ``random`` fires only once this run reached the archive (planning) or
        recorded its ``run`` event (the rest), so nothing an earlier run left behind can fire it.
        """
        run_started = False
        committed: set[str] = set()
        tmp = self.out / ".harvester" / "tmp"
        planning_before = self.server.stats.requests.get("getCollectionValues", 0)
        deadline = time.monotonic() + TRIGGER_TIMEOUT
        kill_at: float | None = None
        if target == "random":
            kill_at = launched + self.rng.uniform(0.3, 3.0)

        def read_events() -> None:
            nonlocal run_started
            for ev in tail.new_events():
                if ev.get("event") == "run":
                    run_started = True
                elif ev.get("event") == "commit":
                    committed.add(series_key(str(ev["uid"])))

        def started() -> bool:
            return self.server.stats.requests.get("getCollectionValues", 0) > planning_before

        while time.monotonic() < deadline and proc.poll() is None:
            read_events()
            now = time.monotonic()
            if kill_at is None:
                if target == "planning":
                    if not run_started and started():
                        kill_at = now + self.rng.uniform(0.0, 0.25)
                elif not run_started:
                    pass
                elif target == "download":
                    if self.server.stats.downloads_in_flight > 0 or any(
                            0 < _dicom_files(s) < self._instances_per_series for s in _glob(tmp, "*.staging")):
                        kill_at = now + self.rng.uniform(0.0, 0.5)
                elif target == "verify":
                    if any(_dicom_files(s) >= self._instances_per_series for s in _glob(tmp, "*.staging")):
                        kill_at = now
                elif target == "commit":
                    if committed:
                        kill_at = now
                elif target == "manifest":
                    if _glob(self.out, ".*.tmp"):
                        kill_at = now
            if kill_at is not None and now >= kill_at:
                self.streaming_at_kill = self.server.stats.downloads_in_flight > 0
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                read_events()  # events committed between the last poll and the kill
                return True, started(), run_started, committed
            time.sleep(0.001)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            raise AssertionError(f"the {target} trigger never fired in {TRIGGER_TIMEOUT}s (run hung?)")
        return False, started(), run_started, committed

    @property
    def _instances_per_series(self) -> int:
        return min(len(r.instances) for r in self.archive.records())

    def _attempt(self, target: str, n: int) -> bool:
        spec = TARGETS[target]
        self.server.set_faults(f"{spec.faults},seed={self.seed * 1000 + n}" if spec.faults else None)
        must_skip = check_tree(self.out, self.archive) if self.out.exists() else set()
        if len(must_skip) >= len(self.archive):
            # The harvest is whole: no moment of it is left to aim at (a faster harvester commits
            # more series before each kill lands). Aim at a new harvest in a new folder; the one
            # left is complete, so nothing it ever held was lost.
            self.harvests += 1
            self.whole.append(self.out)
            self.out = self.work / f"out{self.harvests}"
            self.ever_complete = set()
            must_skip = set()
        downloads_before = self.server.stats.downloads
        tail = EventTail(self.out)
        log = self.logs / f"{n:02d}-{target}.log"
        with open(log, "wb") as fh:
            launched = time.monotonic()
            proc = subprocess.Popen(self.args(spec.slow_disk), env=ENV, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            try:
                killed, started, run_started, committed = self._trigger(target, proc, tail, launched)
            finally:
                tail.close()
        elapsed = time.monotonic() - launched
        if not killed:
            # The run ended on its own before the moment came: fine (exit 0), but not a kill.
            assert proc.returncode == 0, f"run {n} ({target}) exited {proc.returncode}: {log.read_text()[-2000:]}"
            self.result.finished_early += 1
        else:
            phases = observe(self.out, started, run_started, committed, self._instances_per_series,
                             self.streaming_at_kill)
            self.result.kills.append(Kill(target, primary(phases, target), sorted(phases), round(elapsed, 3)))
        self._no_refetch(must_skip, downloads_before)
        now_complete = check_tree(self.out, self.archive)  # the invariants at the instant of the kill
        self.result.complete_at_kills += len(now_complete)
        self.ever_complete |= now_complete
        if not killed:
            return False
        return target == "random" or self.result.kills[-1].phase == target

    def _no_refetch(self, must_skip: set[str], before: dict[str, int]) -> None:
        after = self.server.stats.downloads
        again = sorted(u for u in must_skip if after.get(u, 0) != before.get(u, 0))
        self.result.lost += len(again)
        assert not again, f"completed series downloaded again after a kill: {again[:3]}"

    def _final_run(self) -> None:
        """A run without faults in the current folder, which completes it, then one in every
        earlier folder (whole, but its last run may have been killed before its exports): none
        downloads a series that was complete."""
        current = self.out
        for out in (*self.whole, current):
            self.out = out
            self._run_to_the_end(set() if out != current else self.ever_complete)
        self.result.final_series = len(self.archive)

    def _run_to_the_end(self, ever_complete: set[str]) -> None:
        self.server.set_faults(None)
        must_skip = check_tree(self.out, self.archive)
        downloads_before = self.server.stats.downloads
        proc = subprocess.run(self.args(False), env=ENV, capture_output=True, text=True, timeout=600,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
        self._no_refetch(must_skip, downloads_before)
        after = check_tree(self.out, self.archive)
        gone = sorted((ever_complete | must_skip) - after)
        self.result.lost += len(gone)
        assert not gone, f"series complete at some kill are no longer complete: {gone[:3]}"


def _glob(folder: Path, pattern: str) -> list[Path]:
    try:
        return list(folder.glob(pattern))
    except OSError:
        return []

