"""harvester.store.db and the state on it: the schema, index lookups, the streamed exports, the
migration of harvests made before the database, and damaged or hostile database files (refused
with one line saying what to do, or their rows ignored; nothing outside DIR touched, nothing
verified lost)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harvester.errors import FatalError, UnsafePathError
from harvester.store.state import HarvestState, export_manifest
from harvester.store.db import SCHEMA_VERSION, FolderTaken, StateDB


def files_of(uid: str, n: int = 3) -> dict[str, bytes]:
    return {f"1-{i:03d}.dcm": f"{uid} instance {i}".encode() * (i + 1) for i in range(1, n + 1)}


def record(uid: str, path: str, files: dict[str, bytes], status: str = "complete") -> dict[str, Any]:
    return {
        "SeriesInstanceUID": uid, "Collection": "C", "PatientID": "P", "StudyInstanceUID": "1.2.3",
        "Modality": "CT", "status": status, "path": path, "bytes": sum(map(len, files.values())),
        "attempts": 1, "error": None, "completed": "2024-05-01T10:00:00Z", "sop_class_uid": "",
        "files": [{"path": f"{path}/{n}", "size": len(d), "md5": hashlib.md5(d).hexdigest(),
                   "SOPInstanceUID": f"{uid}.{i}"} for i, (n, d) in enumerate(sorted(files.items()), 1)],
    }


def harvest_of(out: Path, n: int = 3) -> list[dict[str, Any]]:
    """A harvest of ``n`` committed series, closed; returns their records."""
    st_ = HarvestState(out)
    st_.open()
    recs = []
    try:
        for i in range(1, n + 1):
            uid, files = f"1.2.840.{i}", files_of(f"1.2.840.{i}")
            staging = st_.staging_dir(uid)
            staging.mkdir(parents=True)
            for name, data in files.items():
                (staging / name).write_bytes(data)
            rec = record(uid, f"C/P/S/{i}", files)
            st_.commit(rec, staging)
            recs.append(rec)
        st_.write_manifest({"layout": "classic"})
    finally:
        st_.close()
    return recs


def tree(root: Path) -> dict[str, bytes | str]:
    """Every file under ``root`` (but the state's own) and its bytes; links by target."""
    got: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel.startswith(".harvester") or rel in ("harvest.json", "metadata.csv"):
            continue
        got[rel] = f"-> {os.readlink(path)}" if path.is_symlink() else (path.read_bytes() if path.is_file() else "dir")
    return got


# ---------------------------------------------------------------- the database itself

def test_a_new_database_has_its_schema_wal_and_full_sync(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    db.open()
    try:
        assert db.created
        conn = sqlite3.connect(tmp_path / "state.db")
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db._writer is not None and db._writer.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
        conn.close()
    finally:
        db.close()


def test_records_keep_their_first_place_and_move_last_after_a_delete(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    db.open()
    try:
        for uid in ("a", "b", "c"):
            db.put(uid, {"SeriesInstanceUID": uid, "status": "failed"}, "test")
        db.put("a", {"SeriesInstanceUID": "a", "status": "failed", "error": "again"}, "test")
        assert [u for u, _, _ in db.rows(batch=2)] == ["a", "b", "c"]   # batches join seamlessly
        assert json.loads(db.get("a")[0])["error"] == "again"
        db.delete("a")
        db.put("a", {"SeriesInstanceUID": "a", "status": "failed"}, "test")
        assert [u for u, _, _ in db.rows()] == ["b", "c", "a"]
        assert db.count() == 3 and db.get("zzz") is None
    finally:
        db.close()


def test_two_complete_series_never_share_a_folder(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    db.open()
    try:
        db.put("x", {"SeriesInstanceUID": "x", "status": "complete", "path": "C/P/S", "files": [{}]}, "test")
        with pytest.raises(FolderTaken) as taken:
            db.put("y", {"SeriesInstanceUID": "y", "status": "complete", "path": "C/P/S", "files": [{}]}, "test")
        assert taken.value.uid == "x" and db.get("y") is None
        db.put("x", {"SeriesInstanceUID": "x", "status": "complete", "path": "C/P/S", "files": [{}, {}]}, "test")
        db.put("y", {"SeriesInstanceUID": "y", "status": "complete", "path": "C/P/S", "files": [{}]}, "test",
               replace_folder=True)     # a commit replaced the folder: the old series is not complete now
        assert json.loads(db.get("x")[0])["status"] == "failed"
        assert db.complete_paths() == {"y": "C/P/S"}
    finally:
        db.close()


def test_totals_are_counted_by_the_database(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    db.open()
    try:
        db.put("a", {"status": "complete", "path": "A", "bytes": 10, "files": [{}, {}]}, "t")
        db.put("b", {"status": "failed", "path": "B", "bytes": 99, "files": [{}]}, "t")
        db.put("c", {"status": "unavailable", "path": None, "files": []}, "t")
        assert db.totals() == {"series": 3, "complete": 1, "failed": 1, "unavailable": 1, "files": 2, "bytes": 10}
    finally:
        db.close()


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_value = st.recursive(st.none() | st.booleans() | st.integers() | _text,
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                      max_leaves=8)


@settings(max_examples=60, deadline=None)
@given(header=st.dictionaries(_text, _value, max_size=3), recs=st.lists(st.dictionaries(_text, _value, max_size=4),
                                                                       max_size=4))
def test_the_streamed_harvest_json_is_byte_for_byte_json_dumps(tmp_path_factory: pytest.TempPathFactory,
                                                              header: dict[str, Any], recs: list[Any]) -> None:
    path = tmp_path_factory.mktemp("export") / "harvest.json"
    totals = {"series": len(recs), "complete": 0, "failed": 0, "unavailable": 0, "files": 0, "bytes": 0}
    export_manifest(path, header, totals, iter(recs))
    expected = json.dumps({"schema": "harvester/1", **header, "totals": totals, "series": recs},
                          indent=1, ensure_ascii=False)
    assert path.read_text("utf-8") == expected


# ---------------------------------------------------------------- migration of older harvests

def legacy_harvest(out: Path, n: int = 2) -> list[dict[str, Any]]:
    """A harvest as versions before the database left it: harvest.json lists the first series,
    the journal commits every one, no state.db."""
    recs = harvest_of(out, n)
    (out / ".harvester" / "state.db").unlink()
    lines = [json.dumps({"event": "run", "t": "2024-05-01T10:00:00Z", "series": n, "todo": n})]
    lines += [json.dumps({"event": "commit", "t": "2024-05-01T10:00:01Z", "series": r}) for r in recs]
    (out / ".harvester" / "journal.jsonl").write_text("\n".join(lines) + "\n")
    doc = json.loads((out / "harvest.json").read_text())
    doc["series"] = recs[:1]
    (out / "harvest.json").write_text(json.dumps(doc, indent=1))
    return recs


def test_a_harvest_made_before_the_database_opens_complete_without_refetching(tmp_path: Path) -> None:
    out = tmp_path / "h"
    recs = legacy_harvest(out, 3)
    journal = (out / ".harvester" / "journal.jsonl").read_bytes()
    before = tree(out)
    state = HarvestState(out)
    state.open()
    try:
        assert state.lost == 0 and state.refused == []
        assert all(state.complete(r["SeriesInstanceUID"]) == r for r in recs)
        assert state.taken_paths() == {r["SeriesInstanceUID"]: r["path"] for r in recs}
        assert state.header.get("layout") == "classic"
        # its run events too (report and verify read them from the database from now on)
        assert [(e["event"], e.get("uid")) for e in state.events()] == [
            ("run", None), *(("commit", r["SeriesInstanceUID"]) for r in recs)]
    finally:
        state.close()
    assert (out / ".harvester" / "state.db").is_file()
    assert (out / ".harvester" / "journal.jsonl").read_bytes() == journal   # kept as it was
    assert tree(out) == before                                                # no series moved
    # imported once: harvest.json is an export from now on, and editing it changes nothing
    doc = json.loads((out / "harvest.json").read_text())
    doc["series"] = []
    (out / "harvest.json").write_text(json.dumps(doc))
    again = HarvestState(out)
    again.open()
    try:
        assert len(again.records) == 3 and all(again.complete(r["SeriesInstanceUID"]) for r in recs)
        assert len(list(again.events())) == 4      # read once
    finally:
        again.close()


def test_reading_a_harvest_made_before_the_database_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "h"
    recs = legacy_harvest(out, 2)
    state = HarvestState(out)
    state.read()
    assert [r["SeriesInstanceUID"] for r in state.records.values()] == [r["SeriesInstanceUID"] for r in recs]
    assert state.origin(recs[1]["SeriesInstanceUID"]) == "journal.jsonl line 3"
    assert [e["event"] for e in state.events()] == ["run", "commit", "commit"]   # streamed from the journal
    assert not (out / ".harvester" / "state.db").exists()


def test_journal_lines_past_the_database_are_replayed_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Lines an earlier version appended after the database last read the journal (its run on a
    DIR this version made, a kill -9 before its mark, a hand edit) are read into it on the next
    open, checked, and not read again. This version writes no journal."""
    out = tmp_path / "h"
    recs = harvest_of(out, 2)
    journal = out / ".harvester" / "journal.jsonl"
    assert not journal.exists()
    lines = 0
    with journal.open("a") as fh:
        fh.write(json.dumps({"event": "forget", "t": "x", "uid": recs[0]["SeriesInstanceUID"]}) + "\n")
        fh.write(json.dumps({"event": "commit", "t": "x", "series": {"SeriesInstanceUID": 5}}) + "\n")
    caplog.set_level(logging.WARNING, logger="harvester")
    state = HarvestState(out)
    state.open()
    try:
        assert state.records.get(recs[0]["SeriesInstanceUID"]) is None
        assert state.complete(recs[1]["SeriesInstanceUID"]) == recs[1]
    finally:
        state.close()
    assert any(f"journal.jsonl line {lines + 2}" in m for m in caplog.messages), caplog.messages
    caplog.clear()
    again = HarvestState(out)
    again.open()
    again.close()
    assert not any("journal.jsonl line" in m for m in caplog.messages)


# ---------------------------------------------------------------- damaged database files

def damage_truncate(db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2 + 100])


def damage_garbage(db: Path) -> None:
    db.write_bytes(os.urandom(8192))


def damage_pages(db: Path) -> None:
    data = bytearray(db.read_bytes())
    data[4096:] = b"\xff" * (len(data) - 4096)     # the header survives, every page after it does not
    db.write_bytes(bytes(data))


def damage_schema_version(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("UPDATE schema_version SET version=99")
    conn.commit()
    conn.close()


def damage_other_database(db: Path) -> None:
    db.unlink()
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE photos (id INTEGER)")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("damage", [damage_truncate, damage_garbage, damage_pages, damage_schema_version,
                                    damage_other_database])
def test_a_damaged_database_is_one_line_saying_what_to_do_and_nothing_verified_is_lost(
        tmp_path: Path, damage: Any) -> None:
    out = tmp_path / "h"
    recs = harvest_of(out, 3)
    db = out / ".harvester" / "state.db"
    damage(db)
    damaged, before = db.read_bytes(), tree(out)
    state = HarvestState(out)
    with pytest.raises(FatalError) as refused:
        state.open()
        for r in recs:               # a damage SQLite only meets when it reads the page
            state.complete(r["SeriesInstanceUID"])
        state.close()
    message = refused.value.one_line()
    assert "\n" not in message and str(db) in message and "damaged" in message and "aside" in message, message
    assert state._lockfile is None    # the lock is let go
    assert db.read_bytes() == damaged and tree(out) == before
    # what the message says to do works: the state comes back from the journal, nothing refetched
    db.rename(db.with_name("state.db.damaged"))
    for companion in ("state.db-wal", "state.db-shm"):
        (out / ".harvester" / companion).unlink(missing_ok=True)
    again = HarvestState(out)
    again.open()
    try:
        assert all(again.complete(r["SeriesInstanceUID"]) == r for r in recs) and again.lost == 0
    finally:
        again.close()
    assert tree(out) == before


def test_the_cli_reports_a_damaged_database_in_one_line_with_exit_3(tmp_path: Path) -> None:
    out = tmp_path / "h"
    harvest_of(out, 1)
    damage_garbage(out / ".harvester" / "state.db")
    proc = subprocess.run([sys.executable, "-m", "harvester", "verify", str(out)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "state.db is damaged" in line and "aside" in line


@pytest.mark.parametrize("name", ["state.db", "state.db-wal", "state.db-shm"])
def test_a_linked_database_file_is_refused_and_its_target_untouched(tmp_path: Path, name: str) -> None:
    out = tmp_path / "h"
    harvest_of(out, 1)
    decoy = tmp_path / "decoy.db"
    decoy.write_bytes(b"someone else's file")
    link = out / ".harvester" / name
    if name == "state.db":
        link.rename(tmp_path / "moved.db")
    link.unlink(missing_ok=True)
    link.symlink_to(decoy)
    for opener in (HarvestState.open, HarvestState.read):
        with pytest.raises(UnsafePathError) as refused:
            opener(HarvestState(out))
        assert "symbolic link" in str(refused.value) and name in str(refused.value)
    assert decoy.read_bytes() == b"someone else's file" and link.is_symlink()


def test_a_database_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "h"
    harvest_of(out, 1)
    db = out / ".harvester" / "state.db"
    db.unlink()
    db.mkdir()
    with pytest.raises(UnsafePathError, match="not a regular file"):
        HarvestState(out).open()


# ---------------------------------------------------------------- hostile rows

def plant(db: Path, uid: str, record: bytes | str | int, *, status: str = "complete", path: Any = "X") -> None:
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO series (uid, status, path, files, bytes, origin, record) VALUES (?,?,?,?,?,?,?)",
                 (uid, status, path, 1, 1, "planted", record))
    conn.commit()
    conn.close()


def deflated(rec: Any) -> bytes:
    return zlib.compress(json.dumps(rec).encode())


def test_hostile_rows_are_refused_with_a_line_and_nothing_outside_is_touched(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "h"
    recs = harvest_of(out, 2)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.dcm").write_bytes(b"not yours")
    db = out / ".harvester" / "state.db"
    hostile = {
        "9.1": deflated({"SeriesInstanceUID": "9.1", "status": "complete", "path": "../outside",
                         "files": [{"path": "../outside/keep.dcm", "size": 9, "md5": "0" * 32}]}),
        "9.2": deflated({"SeriesInstanceUID": "9.2", "status": "complete", "path": "/abs",
                         "files": [{"path": "/etc/passwd", "size": 1, "md5": "0" * 32}]}),
        "9.3": deflated({"SeriesInstanceUID": "9.3", "status": "complete", "path": ".harvester",
                         "files": [{"path": ".harvester/lock", "size": 0, "md5": "0" * 32}]}),
        "9.4": deflated({"SeriesInstanceUID": "9.4", "status": "complete", "path": "Y", "files": "abc"}),
        "9.5": deflated({"SeriesInstanceUID": "another", "status": "failed", "files": []}),
        "9.6": deflated([1, 2, 3]),
        "9.7": b"not zlib at all",
        "9.8": zlib.compress(b"[" * 100_000 + b"]" * 100_000),
        "9.9": zlib.compress(b" " * (80 << 20)),      # a bomb: 80 MB of JSON from 80 KB
        "9.10": "a text, not a blob",
    }
    for i, (uid, blob) in enumerate(hostile.items()):
        plant(db, uid, blob, path=f"P{i}")
    plant(db, "9.11", 12345, status="complete", path=None)
    caplog.set_level(logging.WARNING, logger="harvester")
    before = tree(outside)
    state = HarvestState(out)
    state.open()
    try:
        assert all(state.complete(r["SeriesInstanceUID"]) == r for r in recs)
        for uid in [*hostile, "9.11"]:
            assert state.records.get(uid) is None, uid
            assert any(f"series {uid}:" in line for line in state.refused), (uid, state.refused)
        assert set(state.taken_paths()) == {r["SeriesInstanceUID"] for r in recs}
        state.write_manifest({})
    finally:
        state.close()
    assert tree(outside) == before and (out / ".harvester" / "lock").exists()
    assert all(len(line) < 600 and "\n" not in line for line in caplog.messages)
    listed = [r["SeriesInstanceUID"] for r in json.loads((out / "harvest.json").read_text())["series"]]
    assert listed == [r["SeriesInstanceUID"] for r in recs]


def test_reading_a_database_with_hostile_rows_skips_them(tmp_path: Path) -> None:
    out = tmp_path / "h"
    recs = harvest_of(out, 1)
    db = out / ".harvester" / "state.db"
    plant(db, "9.4", deflated({"SeriesInstanceUID": "9.4", "status": "complete", "path": "Y", "files": "abc"}))
    plant(db, "9.7", b"garbage", path="Z")
    state = HarvestState(out)
    state.read()
    try:
        assert [r["SeriesInstanceUID"] for r in state.records.values()] == [recs[0]["SeriesInstanceUID"]]
        assert "9.4" not in state.records and "9.7" not in state.records
    finally:
        state.close()


def test_a_checkpoint_beyond_the_limit_leaves_harvest_json_for_the_end_of_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import harvester.store.state as state_module
    out = tmp_path / "h"
    harvest_of(out, 2)
    written = (out / "harvest.json").read_bytes()
    monkeypatch.setattr(state_module, "CHECKPOINT_EXPORT_MAX_SERIES", 1)
    state = HarvestState(out)
    state.open()
    try:
        totals = state.write_manifest({"layout": "classic", "run": 2}, final=False)
        assert totals["complete"] == 2
        assert (out / "harvest.json").read_bytes() == written        # not rewritten at 2 > 1 series
        assert state.db is not None and state.db.get_meta("header")["run"] == 2   # the database has it
        state.write_manifest({"layout": "classic", "run": 2})          # the end of the run: written
        assert json.loads((out / "harvest.json").read_text())["run"] == 2
    finally:
        state.close()


# ---------------------------------------------------------------- exports on demand

def harvester_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harvester", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "NO_COLOR": "1"})


def test_export_jsonl_streams_every_record_and_writes_nothing_in_dir(tmp_path: Path) -> None:
    out = tmp_path / "h"
    recs = harvest_of(out, 3)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = harvester_cli("export", out, "--jsonl", "-")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line) for line in proc.stdout.splitlines()] == recs
    assert proc.stderr.strip() == "wrote -: 3 series"
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    target = tmp_path / "all.jsonl"
    assert harvester_cli("export", out, "--jsonl", target).returncode == 0
    assert target.read_text().splitlines() == proc.stdout.splitlines()


def test_export_manifest_writes_harvest_json_again_from_the_database(tmp_path: Path) -> None:
    out = tmp_path / "h"
    recs = harvest_of(out, 2)
    written = (out / "harvest.json").read_bytes()
    (out / "harvest.json").unlink()
    (out / "metadata.csv").unlink()
    proc = harvester_cli("export", out, "--manifest")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "harvest.json").read_text())
    assert doc["series"] == recs and doc["layout"] == "classic" and doc["totals"]["complete"] == 2
    assert (out / "harvest.json").read_bytes() == written
    assert len((out / "metadata.csv").read_text().splitlines()) == 3


def test_export_of_a_folder_that_is_no_harvest_is_a_usage_error(tmp_path: Path) -> None:
    proc = harvester_cli("export", tmp_path, "--manifest")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "holds no harvest" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_scale_benchmark_runs_at_a_tiny_size(tmp_path: Path) -> None:
    """``bench/scale_state.py`` (issue 16's figures) at 10 series: every figure is there, every
    series recorded is found complete by the no-op resume, nothing lost."""
    bench = Path(__file__).resolve().parents[2] / "bench" / "scale_state.py"
    proc = subprocess.run([sys.executable, str(bench), "state", "500", "--dir", str(tmp_path), "--json",
                           str(tmp_path / "r.json")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads((tmp_path / "r.json").read_text())
    assert row["files"] == 500 and row["series"] == 10 and row["complete"] == 10 and row["lost"] == 0
    assert row["harvest_json"] > row["db"] > 0 and row["series_per_s"] > 0 and row["peak_rss_mb_resume"] > 0


@pytest.mark.slow
def test_the_rerun_benchmark_runs_at_a_tiny_size(tmp_path: Path) -> None:
    """``scale_state.py rerun`` (the no-op ``harvester run`` over a kept tree, as a user hits it):
    at 10 series, twice, nothing fetched, every series found complete; and ``--into`` harvests a
    synthetic archive into a copy of the tree, beside all it records."""
    bench = Path(__file__).resolve().parents[2] / "bench" / "scale_state.py"

    def run(*args: str) -> list[dict[str, Any]]:
        proc = subprocess.run([sys.executable, str(bench), *args, "--json", str(tmp_path / "r.json")],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads((tmp_path / "r.json").read_text())

    run("state", "500", "--dir", str(tmp_path / "kept"), "--keep")
    tree = tmp_path / "kept" / "state-500"
    rows = run("rerun", str(tree), "--dir", str(tmp_path / "work"), "--repeat", "2")
    assert [(r["run"], r["rc"], r["planned"], r["complete_now"], r["complete_before"]) for r in rows] == [
        (1, 0, 10, 0, 10), (2, 0, 10, 0, 10)]
    (into,) = run("rerun", str(tree), "--dir", str(tmp_path / "work"),
                  "--into", "collections=1,patients=3,studies=1,series=1,instances=2,size=1KB,seed=0")
    assert (into["rc"], into["planned"], into["complete_now"], into["failed"]) == (0, 3, 3, 0)
    assert json.loads((tree / "harvest.json").read_text())["totals"]["complete"] == 10   # the kept tree untouched


def test_the_10_million_prefill_goes_on_where_a_budget_stopped_it(tmp_path: Path) -> None:
    """``scale_state.py prefill --budget`` (the 10 M fill, split across holds of the bench lock):
    a run stops after its first batch when the budget is spent, the next run with ``--keep`` goes
    on from the database's count, and the export lists every series once."""
    bench = Path(__file__).resolve().parents[2] / "bench" / "scale_state.py"

    def run(*args: str) -> dict[str, Any]:
        proc = subprocess.run([sys.executable, str(bench), "prefill", "10000", "--dir", str(tmp_path), "--keep",
                               "--no-commits", "--batch", "100", "--json", str(tmp_path / "r.json"), *args],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        (row,) = json.loads((tmp_path / "r.json").read_text())
        return row

    first = run("--budget", "0", "--no-export")
    assert (first["prefill_from"], first["prefill_to"]) == (0, 100) and "export_s" not in first
    second = run()
    assert (second["prefill_from"], second["prefill_to"], second["series"]) == (100, 200, 200)
    doc = json.loads((tmp_path / "prefill-10000" / "harvest.json").read_text("utf-8"))
    assert len({rec["SeriesInstanceUID"] for rec in doc["series"]}) == len(doc["series"]) == 200


def test_a_row_whose_columns_disagree_with_its_record_follows_the_record(tmp_path: Path) -> None:
    """``completed_bytes`` answers from the columns: a hand-edited row that says complete while its
    record says failed is put right on open (and the other way round)."""
    out = tmp_path / "h"
    recs = harvest_of(out, 2)
    conn = sqlite3.connect(out / ".harvester" / "state.db")
    conn.execute("UPDATE series SET status='failed', bytes=0 WHERE uid=?", (recs[0]["SeriesInstanceUID"],))
    conn.execute("INSERT INTO series (uid, status, path, files, bytes, origin, record) VALUES (?,?,?,?,?,?,?)",
                 ("9.9", "complete", "Z", 1, 5, "planted",
                  deflated({"SeriesInstanceUID": "9.9", "status": "failed", "path": None, "files": []})))
    conn.commit()
    conn.close()
    state = HarvestState(out)
    state.open()
    try:
        assert state.completed_bytes(recs[0]["SeriesInstanceUID"]) == recs[0]["bytes"]
        assert state.completed_bytes("9.9") is None and state.complete("9.9") is None
        assert state.completed_bytes(recs[1]["SeriesInstanceUID"]) == recs[1]["bytes"]
    finally:
        state.close()


# ---------------------------------------------------------------- vouched rows (a no-op open at archive scale)

def test_an_open_over_vouched_rows_stats_their_files_without_parsing_a_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each commit vouches for its row: the next open stats the series' files and parses no
    record, yet a file a hand took is still found (the series fetched again)."""
    import harvester.store.state as state_module
    out = tmp_path / "h"
    recs = harvest_of(out, 3)
    conn = sqlite3.connect(out / ".harvester" / "state.db")
    assert conn.execute("SELECT count(*) FROM vouched").fetchone()[0] == 3
    conn.close()
    parsed: list[str] = []
    real = state_module.json_record
    monkeypatch.setattr(state_module, "json_record", lambda raw: parsed.append(raw) or real(raw))
    (out / recs[1]["files"][0]["path"]).unlink()
    state = HarvestState(out)
    state.open()
    try:
        assert len(parsed) == 1      # the one whose file is gone, checked in full
        assert state.lost == 1 and state.complete(recs[1]["SeriesInstanceUID"]) is None
        assert state.complete(recs[0]["SeriesInstanceUID"]) == recs[0]
    finally:
        state.close()


def test_a_vouched_row_changed_since_is_checked_in_full(tmp_path: Path) -> None:
    """The seal covers the whole row: a record edited after it was vouched (here to leave DIR)
    is refused on open, as an unvouched one is, and nothing outside DIR is touched."""
    out = tmp_path / "h"
    recs = harvest_of(out, 2)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "1-001.dcm").write_bytes(b"not yours")
    uid = recs[0]["SeriesInstanceUID"]
    hostile = dict(recs[0], path="../outside",
                   files=[{"path": "../outside/1-001.dcm", "size": 9, "md5": "0" * 32}])
    conn = sqlite3.connect(out / ".harvester" / "state.db")
    conn.execute("UPDATE series SET record=? WHERE uid=?", (deflated(hostile), uid))
    conn.commit()
    conn.close()
    state = HarvestState(out)
    state.open()
    try:
        assert state.records.get(uid) is None
        assert any(f"series {uid}:" in line for line in state.refused), state.refused
        assert state.complete(recs[1]["SeriesInstanceUID"]) == recs[1]
    finally:
        state.close()
    assert (outside / "1-001.dcm").read_bytes() == b"not yours"


def test_a_database_made_before_vouching_is_vouched_on_its_first_open_and_a_no_op_open_writes_nothing(
        tmp_path: Path) -> None:
    out = tmp_path / "h"
    recs = harvest_of(out, 3)
    db = out / ".harvester" / "state.db"
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE vouched")
    conn.commit()
    conn.close()
    for _ in range(2):
        state = HarvestState(out)
        state.open()
        try:
            assert all(state.complete(r["SeriesInstanceUID"]) == r for r in recs) and state.lost == 0
        finally:
            state.close()
        conn = sqlite3.connect(db)
        assert conn.execute("SELECT count(*) FROM vouched").fetchone()[0] == 3
        conn.close()
    before = db.read_bytes()
    state = HarvestState(out)
    state.open()
    state.close()
    assert db.read_bytes() == before


@pytest.mark.parametrize("packed", [zlib.compress(b"3/../x"), zlib.compress(b"3/a/b"), zlib.compress(b"x/a"),
                                    b"not zlib", zlib.compress(b" " * (80 << 20))])
def test_a_hostile_vouched_row_only_means_a_full_check(tmp_path: Path, packed: bytes) -> None:
    """A vouched row whose list is not plain names and sizes is ignored (the record is checked in
    full and kept); nothing is stat'ed outside the series folder."""
    out = tmp_path / "h"
    recs = harvest_of(out, 1)
    conn = sqlite3.connect(out / ".harvester" / "state.db")
    conn.execute("UPDATE vouched SET checks=?", (packed,))
    conn.commit()
    conn.close()
    state = HarvestState(out)
    state.open()
    try:
        assert state.complete(recs[0]["SeriesInstanceUID"]) == recs[0] and state.lost == 0
    finally:
        state.close()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=0, max_size=8), st.integers(min_value=0, max_value=2 ** 40)),
                min_size=1, max_size=5))
def test_a_vouched_list_reads_back_exactly_when_every_name_is_plain(checks: list[tuple[str, int]]) -> None:
    from harvester.store.db import _unpack_checks, plain_name
    text = "\n".join(f"{size}/{name}" for name, size in checks)
    got = _unpack_checks(zlib.compress(text.encode("utf-8", "surrogatepass")))
    if all(plain_name(n) and "\n" not in n for n, _ in checks):
        assert got == checks
    else:
        assert got is None or all(plain_name(n) for n, _ in got) and got != checks


def test_a_vouched_series_whose_rename_did_not_happen_is_finished_from_its_staging_folder(tmp_path: Path) -> None:
    """A kill -9 after the commit's transaction and before the rename leaves a vouched row, no
    final folder and the staging folder: open moves it into place (nothing fetched again)."""
    out = tmp_path / "h"
    recs = harvest_of(out, 2)
    state = HarvestState(out)
    staging = state.staging_dir(recs[0]["SeriesInstanceUID"])
    os.rename(out / recs[0]["path"], staging)
    state.open()
    try:
        assert state.recovered == 1 and state.lost == 0
        assert all(state.complete(r["SeriesInstanceUID"]) == r for r in recs)
        assert all((out / f["path"]).is_file() for f in recs[0]["files"]) and not staging.exists()
    finally:
        state.close()


def test_a_link_on_the_way_to_a_vouched_series_stops_the_open_and_nothing_outside_is_touched(tmp_path: Path) -> None:
    out = tmp_path / "h"
    recs = harvest_of(out, 1)
    outside = tmp_path / "outside"
    os.rename(out / "C" / "P", outside)        # the same files, now outside DIR, reached by a link
    (out / "C" / "P").symlink_to(outside)
    before = tree(outside)
    state = HarvestState(out)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        state.open()
    state.close()
    assert tree(outside) == before and recs


def test_a_forged_vouched_row_whose_folder_leaves_dir_is_refused_and_nothing_outside_is_touched(
        tmp_path: Path) -> None:
    """The seal is no defence against forgery (anyone can compute it): a row forged to look
    vouched with a folder outside DIR still meets the full check, which refuses it."""
    from harvester.store.db import _seal
    out = tmp_path / "h"
    recs = harvest_of(out, 2)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "1-001.dcm").write_bytes(b"not yours")
    uid = recs[0]["SeriesInstanceUID"]
    forged = dict(recs[0], path="../outside", files=[{"path": "../outside/1-001.dcm", "size": 9, "md5": "0" * 32}])
    blob = deflated(forged)
    conn = sqlite3.connect(out / ".harvester" / "state.db")
    conn.execute("UPDATE series SET path='../outside', files=1, bytes=9, record=? WHERE uid=?", (blob, uid))
    conn.execute("UPDATE vouched SET seal=?, checks=? WHERE uid=?",
                 (_seal("complete", "../outside", 1, 9, blob), zlib.compress(b"9/1-001.dcm"), uid))
    conn.commit()
    conn.close()
    state = HarvestState(out)
    state.open()
    try:
        assert state.records.get(uid) is None
        assert any(f"series {uid}:" in line for line in state.refused), state.refused
        assert state.complete(recs[1]["SeriesInstanceUID"]) == recs[1]
    finally:
        state.close()
    assert tree(outside) == {"1-001.dcm": b"not yours"}


# ---------------------------------------------------------------- exports reused when nothing changed

def _full_manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "harvest.json").read_text())


def _expected_bytes(out: Path, header: dict[str, Any]) -> bytes:
    """harvest.json as a full export of ``out``'s state writes it under ``header`` (another DIR:
    the same records, encoded anew)."""
    doc = _full_manifest(out)
    return json.dumps({"schema": doc["schema"], **header, "totals": doc["totals"], "series": doc["series"]},
                      indent=1, ensure_ascii=False).encode("utf-8")


def test_an_export_with_no_series_changed_copies_the_series_list_after_a_new_header(tmp_path: Path) -> None:
    out = tmp_path / "h"
    harvest_of(out, 3)
    csv_before = (out / "metadata.csv").read_bytes()
    state = HarvestState(out)
    state.open()
    try:
        state.write_manifest({"layout": "classic", "run": 2})        # recorded with its generation
        # The series list as it stands is what a reuse copies: a byte changed in place (same inode,
        # size and time, which only a hand restoring them could do) shows that it was copied.
        path = out / "harvest.json"
        st_ = os.stat(path)
        data = path.read_bytes()
        at = data.index(b'"Modality": "CT"')
        with open(path, "r+b") as fh:
            fh.seek(at + len(b'"Modality": "'))
            fh.write(b"MR")
        os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns))
        state.write_manifest({"layout": "classic", "run": 3})
        doc = _full_manifest(out)
        assert doc["run"] == 3 and doc["totals"]["complete"] == 3
        assert [s["Modality"] for s in doc["series"]].count("MR") == 1    # copied, not encoded again
        assert (out / "metadata.csv").read_bytes() == csv_before         # kept as it was
    finally:
        state.close()


def test_an_export_after_a_change_encodes_every_record_again(tmp_path: Path) -> None:
    out = tmp_path / "h"
    recs = harvest_of(out, 2)
    state = HarvestState(out)
    state.open()
    try:
        state.write_manifest({"layout": "classic"})
        # a new series, a record failed, a record forgotten: each moves the generation
        uid, files = "1.2.840.9", files_of("1.2.840.9")
        staging = state.staging_dir(uid)
        staging.mkdir(parents=True)
        for name, data in files.items():
            (staging / name).write_bytes(data)
        state.commit(record(uid, "C/P/S/9", files), staging)
        state.write_manifest({"layout": "classic"})
        assert [s["SeriesInstanceUID"] for s in _full_manifest(out)["series"]] == [
            recs[0]["SeriesInstanceUID"], recs[1]["SeriesInstanceUID"], uid]
        assert (out / "harvest.json").read_bytes() == _expected_bytes(out, {"layout": "classic"})
        assert "1.2.840.9" in (out / "metadata.csv").read_text()
        state.fail(dict(record("1.2.840.10", "C/P/S/10", {}), status="failed", error="boom"))
        state.write_manifest({"layout": "classic"})
        assert _full_manifest(out)["totals"]["failed"] == 1
        # another order asked for: encoded again, in that order
        state.write_manifest({"layout": "classic"}, [uid])
        assert _full_manifest(out)["series"][0]["SeriesInstanceUID"] == uid
    finally:
        state.close()


def test_an_export_edited_by_hand_is_written_again_in_full(tmp_path: Path) -> None:
    out = tmp_path / "h"
    harvest_of(out, 2)
    state = HarvestState(out)
    state.open()
    try:
        state.write_manifest({"layout": "classic"})
        path = out / "harvest.json"
        path.write_bytes(path.read_bytes().replace(b'"Modality": "CT"', b'"Modality": "XX"'))  # a new time
        (out / "metadata.csv").write_text("edited\n")
        state.write_manifest({"layout": "classic"})
        assert b'"XX"' not in path.read_bytes()
        assert path.read_bytes() == _expected_bytes(out, {"layout": "classic"})
        assert (out / "metadata.csv").read_text().startswith("Series UID,")
    finally:
        state.close()


def test_a_database_without_the_generation_triggers_gets_them_and_a_new_generation(tmp_path: Path) -> None:
    out = tmp_path / "h"
    harvest_of(out, 2)
    db_path = out / ".harvester" / "state.db"
    state = HarvestState(out)
    state.open()
    state.write_manifest({"layout": "classic"})
    state.close()
    # as an earlier version of this schema left it: no triggers; its rows changed since the export
    conn = sqlite3.connect(db_path)
    before = conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0]
    for name in ("insert", "update", "delete"):
        conn.execute(f"DROP TRIGGER series_generation_{name}")
    conn.execute("DELETE FROM series WHERE uid='1.2.840.2'")
    conn.commit()
    conn.close()
    state = HarvestState(out)
    state.open()
    try:
        assert state.db is not None and state.db.generation() != int(before)
        state.write_manifest({"layout": "classic"})
        assert [s["SeriesInstanceUID"] for s in _full_manifest(out)["series"]] == ["1.2.840.1"]
        generation = state.db.generation()
        state.db.delete("1.2.840.1")                                     # the triggers fire again
        assert state.db.generation() == (generation or 0) + 1
    finally:
        state.close()
