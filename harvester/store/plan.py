"""The plan of one run, outside memory: ``DIR/.harvester/plan.db``, a scratch SQLite file.

A plan of all of TCIA is about 500,000 series, each task with its getSeries row, study and
patient records (about 1 KB a task in memory). The planner writes its tasks here as it makes
them (``PlanTable.add``, in the plan's order), compressed (zlib of the task's JSON: about a
fifth of it); the engine, the space check and sync read them back in batches of ``BATCH``
(``batches``, ``__iter__``), so the plan in memory is one batch, whatever its size.

Scratch, like ``FolderIndex``: made empty for each run (what a killed run left is removed
first), written without journal or fsync (nothing in it outlives the run: the state database
holds what is done, and the next run plans again), removed by ``close``. It is not the state
database on purpose: the state database is fsynced at every commit and never shrinks, and a
plan's rows are needed for one run only. Every row read back was written by this process;
a row that does not decode (the disk's fault) is an error, not a task to guess at.

Raises ``DiskFullError``/``OutputNotWritableError`` when the file cannot be written.
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from harvester.models import CollectionTotals, SeriesTask
from harvester.store.db import ScratchDB

#: tasks read back at a time (the engine's and the readers' batch)
BATCH = 256
PLAN_NAME = "plan.db"


def _pack(task: SeriesTask) -> bytes:
    body = [task.series_uid, task.collection, task.patient_id, task.study_uid, task.modality, task.image_count,
            task.file_size, task.row, task.study, task.patient]
    return zlib.compress(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8"), 1)


def _unpack(blob: bytes) -> SeriesTask:
    uid, collection, patient_id, study_uid, modality, count, size, row, study, patient = json.loads(
        zlib.decompress(blob).decode("utf-8"))
    return SeriesTask(series_uid=uid, collection=collection, patient_id=patient_id, study_uid=study_uid,
                      modality=modality, image_count=count, file_size=size, row=row, study=study, patient=patient)


class PlanTable(ScratchDB):
    """The tasks of one plan, in order (``models.TaskStore``), in a scratch SQLite file
    (``store.db.ScratchDB``). One writer (the planner, on the event loop or a thread), then
    readers; not for concurrent writes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "CREATE TABLE tasks (seq INTEGER PRIMARY KEY, uid TEXT NOT NULL UNIQUE, "
                               "collection TEXT NOT NULL, images INTEGER, bytes INTEGER, body BLOB NOT NULL)", "plan")
        self._count = 0

    # ------------------------------------------------------------ write
    def add(self, tasks: Iterable[SeriesTask]) -> None:
        """Append ``tasks`` (consumed as they come, written a batch at a time); a series already
        in the plan is not added twice."""
        batch: list[tuple[str, str, int | None, int | None, bytes]] = []
        for task in tasks:
            batch.append((task.series_uid, task.collection, task.image_count, task.file_size, _pack(task)))
            if len(batch) >= BATCH:
                self._insert(batch)
                batch = []
        self._insert(batch)

    def _insert(self, batch: list[tuple[str, str, int | None, int | None, bytes]]) -> None:
        if not batch:
            return
        with self._guard():
            conn = self._connection()
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO tasks (uid, collection, images, bytes, body) VALUES (?,?,?,?,?)",
                             batch)
            self._count += conn.total_changes - before

    # ------------------------------------------------------------ read
    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[SeriesTask]:
        for batch in self.batches():
            yield from batch

    def batches(self, size: int = BATCH) -> Iterator[list[SeriesTask]]:
        """The tasks in the plan's order, ``size`` at a time (by key: memory holds one batch)."""
        for got in self._scan("body", size):
            yield [_unpack(body) for _, body in got]

    def select(self, wanted: Callable[[str], bool], size: int = BATCH) -> Iterator[list[SeriesTask]]:
        """The tasks whose UID ``wanted`` takes, in order, from ``size`` rows at a time (a batch
        may be empty): the others are never decoded (a run with little to do decodes little)."""
        for got in self._scan("uid, body", size):
            yield [_unpack(body) for _, uid, body in got if wanted(uid)]

    def sizes(self) -> Iterator[tuple[str, int | None, int | None]]:
        """(uid, image count, bytes) of every task in order, streamed (no task decoded)."""
        for got in self._scan("uid, images, bytes", 4 * BATCH):
            for _, uid, images, size in got:
                yield uid, images, size

    def uids(self) -> Iterator[str]:
        """The series UIDs in the plan's order, streamed (no task decoded)."""
        for got in self._scan("uid", 4 * BATCH):
            for _, uid in got:
                yield uid

    def _scan(self, columns: str, size: int) -> Iterator[list[Any]]:
        """The rows' ``seq`` and ``columns``, in order, ``size`` rows at a time (by key, so each
        read is one index range, and no statement stays open between batches)."""
        after = 0
        while True:
            with self._guard():
                got = self._connection().execute(f"SELECT seq, {columns} FROM tasks WHERE seq>? ORDER BY seq LIMIT ?",
                                                 (after, size)).fetchall()
            if not got:
                return
            yield got
            after = got[-1][0]

    def totals(self) -> dict[str, CollectionTotals]:
        """Series, images and bytes per collection (``Plan.collections``), counted by SQL."""
        with self._guard():
            rows = self._connection().execute(
                "SELECT collection, count(*), total(images), total(bytes) FROM tasks GROUP BY collection").fetchall()
        return {c: CollectionTotals(series=n, images=int(images), bytes=int(size)) for c, n, images, size in rows}


def plan_path(meta_dir: Path) -> Path:
    """Where a run's plan goes: inside the harvest's own folder."""
    return meta_dir / PLAN_NAME
