"""The state of a cluster's shards in a harvest's folder, and merging them into the harvest's.

A harvest on a cluster (``harvester.cluster``) runs each shard of its plan in one task, whose
state is a ``ShardState``: a ``HarvestState`` of DIR with its own SQLite database, lock and
staging folder under ``DIR/.harvester/shards/<run>-<n>/`` (one writer per database file). The
client merges each finished shard into the harvest's database (``merge_shard``); shards a killed
client left are merged by the next run of either kind (``merge_leftovers``, called by
``harvester.operations`` before any run), so a single-process run after a cluster run sees
one harvest too. Nothing here imports Dask.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from harvester.containment import check_not_link
from harvester.errors import HarvesterError
from harvester.store.db import DB_NAME
from harvester.store.state import HarvestState, totals_of


class ShardState(HarvestState):
    """The state of one shard: a ``HarvestState`` of DIR whose database, journal, lock and
    staging folder are in ``shard_dir`` (under ``DIR/.harvester/shards/``) instead of
    ``DIR/.harvester``. It writes no export (harvest.json is the client's), and reads nothing of
    the harvest's: its ``taken_paths`` are the folders the client assigned (``paths``)."""

    def __init__(self, out_dir: Path, shard_dir: Path, paths: dict[str, str] | None = None) -> None:
        super().__init__(out_dir)
        self.meta_dir = shard_dir
        self.tmp_dir = shard_dir / "tmp"
        self.journal_path = shard_dir / "journal.jsonl"
        self.db_path = shard_dir / DB_NAME
        self.manifest_path = shard_dir / "harvest.json"   # never written: nothing to read in on open
        self._paths = dict(paths or {})

    def taken_paths(self) -> dict[str, str]:
        return {**super().taken_paths(), **self._paths}

    def write_manifest(self, header: dict[str, Any], order: Any = None, *, final: bool = True) -> dict[str, Any]:
        """The totals of ``order`` only: the harvest's exports are the client's to write."""
        return totals_of([r for u in (order or []) if (r := self.records.get(u)) is not None])

    def _unsafe(self, rec: Any) -> str | None:
        problem = super()._unsafe(rec)
        if problem is None and rec.get("path") and str(rec["path"]).split("/")[0] == ".harvester":
            return f"refusing path {rec['path']!r}: it lies in .harvester/"
        return problem


def shards_dir(state: HarvestState) -> Path:
    return state.meta_dir / "shards"


def merge_shard(state: HarvestState, shard_dir: Path) -> tuple[list[str], str | None]:
    """Record in ``state`` (the harvest's, locked) what the shard in ``shard_dir`` committed or
    failed, then remove the shard's folder. Returns the series now complete, and why the shard
    was left for later (None when merged): its lock is held (its task still runs) or its state
    cannot be read. A series whose record the harvest already holds as it is is not recorded
    again, so a kill between the records and the removal costs nothing and commits nothing twice."""
    if not shard_dir.is_dir():   # its task never began
        return [], None
    shard = ShardState(state.out_dir, shard_dir)
    try:
        shard.open()
    except HarvesterError as exc:
        return [], exc.one_line()
    done: list[str] = []
    try:
        for uid, rec in shard.records.items():
            status = rec.get("status")
            if status == "complete":
                if state.records.get(uid) != rec:   # the same record: merged before a kill took the folder's removal
                    state.restore(rec)
                done.append(uid)
            elif status == "failed":
                state.fail(rec)
    finally:
        shard.close()
    shutil.rmtree(shard_dir, ignore_errors=True)
    return done, None


def merge_leftovers(state: HarvestState) -> tuple[list[str], list[str]]:
    """``merge_shard`` of every shard folder a killed client left; returns the series now
    complete and one line per shard left for later."""
    root = shards_dir(state)
    check_not_link(state.out_dir, root)
    if not root.is_dir():
        return [], []
    done: list[str] = []
    left: list[str] = []
    for shard_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        got, why = merge_shard(state, shard_dir)
        done += got
        if why is not None:
            left.append(f"shard {shard_dir.name} left for a later run: {why}")
    return done, left
