"""Shared helpers for the integration tests that harvest from our loopback server."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from harvester.api import aharvest
from harvester.config import Config
from harvester.engine import HarvestResult
from harvester.query import query_from_dict

# Short backoffs and timeouts: the server is on loopback and its faults are injected on purpose.
FAST = dict(workers=4, connections=8, retries=6, series_retries=5, backoff_base=0.01, backoff_max=0.05,
            read_timeout=2.0, connect_timeout=5.0, progress=False, quiet=True)
REPO = Path(__file__).resolve().parent.parent


def peers_path() -> str:
    """Where the peers' interpreter is looked for: $HARVESTER_PEERS_PYTHON, else the repository's .venv-peers."""
    return os.environ.get("HARVESTER_PEERS_PYTHON") or str(REPO / ".venv-peers" / "bin" / "python")


def peers_python() -> str:
    """The peers' interpreter (see ``peers_path``); skips, or fails under make test, when it is missing."""
    path = peers_path()
    if not os.access(path, os.X_OK):
        if os.environ.get("HARVESTER_REQUIRE_PEERS"):
            pytest.fail(f"no peer venv at {path}: run 'make peers'")
        pytest.skip("the peer clients' venv is missing: 'make peers' builds .venv-peers")
    return path


def test_config(base_url: str, out: Path, **overrides: Any) -> Config:
    return Config(api_url=base_url, out_dir=out, **{**FAST, **overrides})


test_config.__test__ = False  # type: ignore[attr-defined]  # not a test, despite the name


def harvest(base_url: str, out: Path, query: dict[str, Any], **overrides: Any) -> HarvestResult:
    config = test_config(base_url, out, **overrides)
    return anyio.run(aharvest, query_from_dict(query, origin="test"), config)


def normal_collections(archive: Any) -> list[str]:
    return sorted({r.row["Collection"] for r in archive.records() if getattr(r, "hostile_kind", None) is None})


def normal_series(archive: Any) -> list[str]:
    return sorted(r.uid for r in archive.records() if getattr(r, "hostile_kind", None) is None)


def select_all(archive: Any) -> dict[str, Any]:
    return {"select": [{"collection": c} for c in normal_collections(archive)]}


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "harvest.json").read_text("utf-8"))


def assert_identical(out: Path, archive: Any, uids: list[str]) -> None:
    """Every series in ``uids`` is complete in harvest.json and its files are the archive's bytes;
    nothing under DIR is unlisted, and no temp file is left."""
    doc = manifest(out)
    recs = {r["SeriesInstanceUID"]: r for r in doc["series"]}
    listed: set[Path] = set()
    for uid in uids:
        rec = recs[uid]
        assert rec["status"] == "complete", (uid, rec.get("error"))
        by_sop = {f["SOPInstanceUID"]: f for f in rec["files"]}
        series = archive.get(uid)
        assert len(by_sop) == len(series.instances) == len(rec["files"])
        for inst in series.instances:
            f = by_sop[inst.sop_uid]
            path = out / f["path"]
            assert path.read_bytes() == inst.path.read_bytes(), f["path"]
            assert f["md5"] == inst.md5
            listed.add(path.resolve())
    for rec in doc["series"]:
        if rec["status"] == "complete":
            listed.update((out / f["path"]).resolve() for f in rec["files"])
    skip = {"harvest.json", "metadata.csv"}
    for path in out.rglob("*"):
        rel = path.relative_to(out)
        if path.is_dir() or rel.parts[0] in (".harvester", "licenses") or str(rel) in skip:
            continue
        assert path.resolve() in listed, f"unlisted file in the tree: {rel}"
    tmp = out / ".harvester" / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir()), list(tmp.iterdir())


def run_events(out: Path, db: Path | None = None) -> list[dict[str, Any]]:
    """The run events of ``out``'s state database (or of the database ``db``, a cluster shard's),
    in order, read with ``sqlite3`` itself (read only; a run may be writing, or have been killed:
    WAL readers see the last commit)."""
    db = db or out / ".harvester" / "state.db"
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT t, kind, body FROM events ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # created a moment ago: no tables yet
        return []
    finally:
        conn.close()
    return [{**json.loads(body), "event": kind, "t": t} for t, kind, body in rows]


def commit_records(out: Path) -> list[dict[str, Any]]:
    """The series record (as the database holds it now) of each commit event, in order."""
    db = out / ".harvester" / "state.db"
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT json_extract(e.body, '$.uid'), s.record FROM events e "
                            "LEFT JOIN series s ON s.uid = json_extract(e.body, '$.uid') "
                            "WHERE e.kind = 'commit' ORDER BY e.id").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()
    return [json.loads(zlib.decompress(record)) if record is not None else {"SeriesInstanceUID": uid, "files": []}
            for uid, record in rows]


def commits(out: Path) -> list[str]:
    """Series UIDs of the database's commit events, in order (a series committed twice is there twice)."""
    return [event["uid"] for event in run_events(out) if event["event"] == "commit"]


def kill_after_progress(proc: subprocess.Popen, out: Path, seconds: float, wait: float = 60) -> bool:
    """kill -9 ``proc`` ``seconds`` after it has committed a series beyond those already in ``out``'s
    state database, unless it exits first; True when it was killed.

    Waiting for a commit, rather than a fixed time from start, puts the kill mid-run whatever the
    machine's speed: a slow interpreter start-up cannot push it past the end of a short harvest.
    """
    before = len(commits(out))
    deadline = time.monotonic() + wait
    while len(commits(out)) == before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return kill_after(proc, seconds)


def kill_after(proc: subprocess.Popen, seconds: float) -> bool:
    """kill -9 ``proc`` after ``seconds`` unless it exits first; True when it was killed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed


@contextlib.contextmanager
def serve_synthetic(spec: str, cache: Path, *extra: str) -> Iterator[str]:
    """``harvester serve --synthetic spec`` in its own process (``cache``: its deflate cache);
    yields its base URL, and stops it after."""
    proc = subprocess.Popen([sys.executable, "-m", "harvester", "serve", "--synthetic", spec, "--cache-dir", str(cache),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://"), proc.stderr.read() if proc.stderr else ""
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
