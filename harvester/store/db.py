"""The state database: ``DIR/.harvester/state.db``, SQLite in WAL mode.

One row per series (its whole record as JSON, plus the columns the queries need), the run
events, and a few named values (the manifest header, how far an old journal has been read). It is
what every question about DIR asks (is this series complete? which folders are taken? what goes
into harvest.json?), by index, so memory does not grow with the number of files recorded.

* Durability: ``synchronous=FULL``. In WAL mode NORMAL only fsyncs at checkpoints, so a power cut
  could lose a commit whose folder was already renamed into place; the next run would then find a
  folder nobody vouches for and fetch the series again. FULL fsyncs the WAL at every commit, so
  ``transaction()`` returning means the rows survive a power cut; the rename comes after.
* One writer: the caller holds DIR's lock (``HarvestState``), and inside the process every write
  goes through one connection under ``_write_lock``. Reads use a second connection under their
  own lock, so an index lookup on the event loop never waits for a commit's fsync (WAL lets a
  reader see the last committed state while a writer works).
* A damaged file (truncated, garbage, another program's database, a schema this version does
  not know) raises ``FatalError`` with one line saying what to do; nothing is written to it.
  ``.harvester/state.db`` and its ``-wal``/``-shm`` companions must be regular files, not links
  (``UnsafePathError``), so SQLite never writes through a planted link.

Every value read back is hostile until checked: ``HarvestState`` runs each record through
``record_problem`` and the containment rules, as it does for an old journal's lines.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import stat
import threading
import urllib.parse
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Self

from harvester.errors import DiskFullError, FatalError, OutputNotWritableError, UnsafePathError
from harvester.store.layout import name_key

#: The schema this version writes. An older one is migrated on open; a newer one is refused.
SCHEMA_VERSION = 1
DB_NAME = "state.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- first-recorded order: harvest.json lists series in it
    uid TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    path TEXT,                              -- the series folder, relative to DIR
    files INTEGER NOT NULL DEFAULT 0,       -- counts for harvest.json's totals, without parsing
    bytes INTEGER NOT NULL DEFAULT 0,
    origin TEXT NOT NULL,                   -- where the record was read or made (refusals name it)
    record BLOB NOT NULL                    -- the series record as harvest.json lists it, JSON, zlib
);
-- Two complete series never share a folder: the layout assigns unique ones, and the database
-- refuses a record (a hostile journal's) that would take one already taken.
CREATE UNIQUE INDEX IF NOT EXISTS series_folder ON series(path) WHERE status = 'complete';
-- Series dropped from the state whose folder is still to be moved to the trash (sync's prune):
-- the next open finishes a move that a crash or an error cut off.
CREATE TABLE IF NOT EXISTS trash (uid TEXT PRIMARY KEY, path TEXT NOT NULL, dest TEXT NOT NULL);
-- What open may take on trust: the files of a complete series whose record passed every check
-- (``HarvestState._unsafe``: types, containment) when it was written. ``seal`` is a CRC of the
-- series row as it was then (status, path, counts, record), so a row changed since (by ``put``,
-- by an older harvester that knows nothing of this table, by hand) is checked in full again.
-- ``checks`` is zlib of "size/name" lines, each name one plain file name inside the folder.
CREATE TABLE IF NOT EXISTS vouched (uid TEXT PRIMARY KEY, seal INTEGER NOT NULL, checks BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    t TEXT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL
);
"""

_VOUCHED_TABLE = next(s for s in _SCHEMA.split(";") if "TABLE IF NOT EXISTS vouched" in s)

#: ``meta.generation`` counts the changes to ``series`` (every insert, update and delete, by any
#: writer, this version or another: SQL triggers of the file itself). An export records the
#: generation it was written from (``HarvestState.write_manifest``); while it is the same, the
#: records are the ones it holds. Added within version 1: a file without the triggers gets them
#: on open, and its generation moves then (an export recorded before cannot be trusted).
GENERATION = "generation"
_GENERATION_TRIGGERS = [
    f"CREATE TRIGGER IF NOT EXISTS series_generation_{when.lower()} AFTER {when} ON series BEGIN "
    f"UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = '{GENERATION}'; END"
    for when in ("INSERT", "UPDATE", "DELETE")]
_HEADER = b"SQLite format 3\x00"
_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN = 3, 8, 10, 13, 14
_DAMAGED_HINT = ("move {db} aside (keep it for a bug report) and run the same command again: the state is "
                 "rebuilt from harvest.json, and the verified series it lists are kept")


class FolderTaken(Exception):
    """``put`` of a complete record whose folder another complete series holds (``uid`` is it)."""

    def __init__(self, uid: str) -> None:
        super().__init__(uid)
        self.uid = uid


class StateDB:
    """``DIR/.harvester/state.db``. ``readonly`` opens an existing file without writing to it
    (``verify`` reads this way, with no lock). Thread-safe: one writer connection, one reader."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self.created = False     # the file did not exist before ``open``
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._write_lock = threading.RLock()
        self._read_lock = threading.Lock()

    # ------------------------------------------------------------ open / close
    def open(self) -> None:
        """Open (or create) the database and check its schema. Raises ``UnsafePathError`` when
        the file or a companion is a link or not a regular file, ``FatalError`` when it is
        damaged or of a newer schema, ``DiskFullError``/``OutputNotWritableError``."""
        self._check_files()
        self.created = not self.path.exists()
        if not self.created:
            self._check_header()
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        with self._guard():
            if self.readonly:
                # No WAL beside it: the last writer closed cleanly and the file is whole; read it
                # as immutable, so that not even a -shm file is created (verify writes nothing).
                # A WAL: a run is writing, or was killed; read through it (SQLite's shared memory).
                wal = self.path.with_name(self.path.name + "-wal").exists()
                self._reader = self._connect(f"file:{urllib.parse.quote(str(self.path))}?mode=ro"
                                             + ("" if wal else "&immutable=1"))
            else:
                self._writer = self._connect(str(self.path))
                tables = {r[0] for r in self._writer.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if tables and "schema_version" not in tables:   # checked before anything is written
                    raise self._damaged("it holds tables but no schema version (not a harvester database)")
                self._writer.execute("PRAGMA journal_mode=WAL")
                self._writer.execute("PRAGMA synchronous=FULL")
                # A checkpoint every 64 pages keeps the WAL near 256 KB: it never outgrows the
                # exports, and a reader's lookups stay short.
                self._writer.execute("PRAGMA wal_autocheckpoint=64")
                self._migrate()
                self._reader = self._connect(str(self.path))
            version = self._version(self._reader)
        if version != SCHEMA_VERSION:
            raise self._damaged(f"it has schema version {version!r}, and this harvester knows version "
                                f"{SCHEMA_VERSION}" if isinstance(version, int) and version > SCHEMA_VERSION
                                else f"its schema version is {version!r}")

    @staticmethod
    def _connect(where: str) -> sqlite3.Connection:
        conn = sqlite3.connect(where, uri=where.startswith("file:"), isolation_level=None,
                               check_same_thread=False, timeout=30)
        conn.execute("PRAGMA trusted_schema=OFF")   # a planted trigger or view never runs our way
        return conn

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            for conn in (self._reader, self._writer):
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
            self._reader = self._writer = None

    def _check_files(self) -> None:
        for name in (self.path.name, self.path.name + "-wal", self.path.name + "-shm"):
            path = self.path.with_name(name)
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise UnsafePathError(f"{path} cannot be read ({exc.strerror or exc}); refusing to use it",
                                      path=str(path)) from None
            if stat.S_ISLNK(mode):
                raise UnsafePathError(f"{path} is a symbolic link inside the output directory; refusing to "
                                      f"follow it", path=str(path))
            if not stat.S_ISREG(mode):
                raise UnsafePathError(f"{path} is not a regular file; refusing to use it", path=str(path))

    def _check_header(self) -> None:
        """An empty file is a database SQLite never got to write (a kill right at creation): it
        is started again. Anything else must begin with SQLite's header."""
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(len(_HEADER))
        except OSError as exc:
            raise self._damaged(f"it cannot be read ({exc.strerror or exc})") from None
        if head and head != _HEADER:
            raise self._damaged("it is not an SQLite database")
        if not head:
            self.created = True

    def _migrate(self) -> None:
        """Bring the file to ``SCHEMA_VERSION``: create it when new; a newer version is refused
        by ``open``. Version 1 is the first; later versions add their steps here."""
        assert self._writer is not None
        with self._write_lock:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                tables = {r[0] for r in self._writer.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if "schema_version" not in tables:
                    if tables - {"sqlite_sequence"}:
                        raise self._damaged("it holds tables but no schema version (not a harvester database)")
                    for statement in filter(str.strip, _SCHEMA.split(";")):
                        self._writer.execute(statement)
                    self._writer.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                    self.created = True
                elif "vouched" not in tables:
                    # Added within version 1: optional (a missing or stale row only means a full
                    # check), so a database made before it, or opened by a harvester without it,
                    # stays readable both ways.
                    self._writer.execute(_VOUCHED_TABLE)
                triggers = {r[0] for r in self._writer.execute("SELECT name FROM sqlite_master WHERE type='trigger' "
                                                                "AND name LIKE 'series_generation_%'")}
                if len(triggers) < len(_GENERATION_TRIGGERS):
                    # new, or a file made before them (or with one dropped): a generation of its
                    # own, unlike any an export recorded
                    for statement in _GENERATION_TRIGGERS:
                        self._writer.execute(statement)
                    self._writer.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                                         "value = CAST(value AS INTEGER) + 1000003", (GENERATION, "1"))
                self._writer.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._writer.execute("ROLLBACK")
                raise

    @staticmethod
    def _version(conn: sqlite3.Connection) -> Any:
        try:
            rows = conn.execute("SELECT version FROM schema_version").fetchall()
        except sqlite3.OperationalError:
            return None
        return rows[0][0] if len(rows) == 1 else None

    def _damaged(self, why: str) -> FatalError:
        return FatalError(f"the state database {self.path} is damaged: {why}",
                          hint=_DAMAGED_HINT.format(db=self.path))

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """SQLite's errors as the harvester's: disk full and unwritable DIR are fatal as for any
        file; anything else means the file is damaged (``FatalError`` with what to do)."""
        try:
            yield
        except sqlite3.Error as exc:
            text = str(exc)
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF    # the primary result code
            if code in (_SQLITE_FULL, _SQLITE_IOERR) or "disk is full" in text:
                # SQLite does not say which errno: ENOSPC, EDQUOT and EFBIG (a quota or file size
                # limit) all come back as an I/O error.
                raise DiskFullError(f"cannot write {self.path.name}: disk full, a file size limit or an I/O "
                                    f"error ({text})") from None
            if code in (_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_CANTOPEN):
                raise OutputNotWritableError(f"cannot write {self.path}: {text}") from None
            raise self._damaged(text) from None

    # ------------------------------------------------------------ writes
    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One durable transaction (``BEGIN IMMEDIATE`` .. ``COMMIT``, fsynced): every row
        written inside it, or none. Raises as ``_guard``."""
        with self._write_lock, self._guard():
            conn = self._writer
            if conn is None:
                raise FatalError("the state database is closed" if not self.readonly
                                 else "the state database is open read-only")
            if conn.in_transaction:           # nested: part of the caller's transaction
                yield conn
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def put(self, uid: str, rec: dict[str, Any], origin: str, *, replace_folder: bool = False) -> None:
        """Insert or replace the record of ``uid``, keeping its place in the order. Raises
        ``FolderTaken`` when ``rec`` is complete and another complete series holds its folder,
        unless ``replace_folder``: then that series is recorded as failed (its folder is gone)."""
        complete = rec.get("status") == "complete"
        row = (rec.get("status") or "", rec.get("path"), len(rec.get("files") or []) if complete else 0,
               min(int(rec.get("bytes") or 0), 2 ** 62) if complete else 0, origin,
               _deflate(rec))
        with self.transaction() as conn:
            if complete:
                other = conn.execute("SELECT uid, record FROM series WHERE status='complete' AND path=? AND uid<>?",
                                     (rec.get("path"), uid)).fetchone()
                if other is not None:
                    if not replace_folder:
                        raise FolderTaken(other[0])
                    old = _inflate(other[1])
                    displaced = dict(json.loads(old) if old else {}, status="failed",
                                     error=f"its folder now holds series {uid}; will be fetched again")
                    conn.execute("UPDATE series SET status='failed', files=0, bytes=0, record=? WHERE uid=?",
                                 (_deflate(displaced), other[0]))
            conn.execute("INSERT INTO series (uid, status, path, files, bytes, origin, record) VALUES (?,?,?,?,?,?,?) "
                         "ON CONFLICT(uid) DO UPDATE SET status=excluded.status, path=excluded.path, "
                         "files=excluded.files, bytes=excluded.bytes, origin=excluded.origin, record=excluded.record",
                         (uid, *row))
            conn.execute("DELETE FROM trash WHERE uid=?", (uid,))   # fetched again: its folder stays
            conn.execute("DELETE FROM vouched WHERE uid=?", (uid,))

    def vouch(self, uid: str, checks: list[tuple[str, int]]) -> None:
        """Record that the current row of ``uid`` passed every check and that its files are
        ``checks`` ((plain name inside its folder, size); nothing is vouched otherwise): a later
        open stats them without parsing the record, as long as the row stays as it is now."""
        with self.transaction() as conn:
            row = conn.execute("SELECT status, path, files, bytes, record FROM series WHERE uid=?",
                               (uid,)).fetchone()
            if row is None or not checks or any(not plain_name(n) or "\n" in n for n, _ in checks):
                return
            text = "\n".join(f"{int(size)}/{name}" for name, size in checks)
            conn.execute("INSERT OR REPLACE INTO vouched VALUES (?,?,?)",
                         (uid, _seal(*row), zlib.compress(text.encode("utf-8"), 1)))

    def delete(self, uid: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM series WHERE uid=?", (uid,))
            conn.execute("DELETE FROM vouched WHERE uid=?", (uid,))

    def forget(self, uid: str, path: str | None, dest: str | None) -> None:
        """Drop ``uid``; when ``path`` and ``dest`` are given, remember that its folder is to be
        moved there (``trash_done`` once it is)."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM series WHERE uid=?", (uid,))
            conn.execute("DELETE FROM vouched WHERE uid=?", (uid,))
            if path and dest:
                conn.execute("INSERT OR REPLACE INTO trash VALUES (?,?,?)", (uid, path, dest))

    def trash_done(self, uid: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM trash WHERE uid=?", (uid,))

    def pending_trash(self) -> list[tuple[str, str, str]]:
        """(uid, folder, trash) of every move still to be made (as few as prunes cut off)."""
        with self._read() as conn:
            return [(u, p, d) for u, p, d in conn.execute("SELECT uid, path, dest FROM trash")
                    if isinstance(u, str) and isinstance(p, str) and isinstance(d, str)]

    def clear_series(self) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM series")
            conn.execute("DELETE FROM vouched")

    def add_event(self, kind: str, t: str, body: dict[str, Any], *, durable: bool = True) -> None:
        """Record a run event. ``durable=False`` (not inside another transaction): committed
        without an fsync of its own (WAL with synchronous=NORMAL for this one commit); the next
        durable commit's fsync covers it, a power cut before that may lose it, a kill -9 does not."""
        with self._write_lock:
            lazy = not durable and self._writer is not None and not self._writer.in_transaction
            if lazy:
                with self._guard():
                    self._writer.execute("PRAGMA synchronous=NORMAL")
            try:
                with self.transaction() as conn:
                    conn.execute("INSERT INTO events (t, kind, body) VALUES (?,?,?)",
                                 (t, kind, json.dumps(body, separators=(",", ":"), ensure_ascii=False)))
            finally:
                if lazy:
                    with self._guard():
                        self._writer.execute("PRAGMA synchronous=FULL")

    def set_meta(self, key: str, value: Any) -> None:
        with self.transaction() as conn:
            conn.execute("INSERT INTO meta VALUES (?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                         (key, json.dumps(value, ensure_ascii=False)))

    # ------------------------------------------------------------ reads
    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._read_lock, self._guard():
            if self._reader is None:
                raise FatalError("the state database is closed")
            yield self._reader

    def get(self, uid: str) -> tuple[str, str] | None:
        """(record JSON, origin) of ``uid``, or None."""
        with self._read() as conn:
            row = conn.execute("SELECT record, origin FROM series WHERE uid=?", (uid,)).fetchone()
        record = _inflate(row[0]) if row is not None else None
        return (record, str(row[1])) if record is not None else None

    def status(self, uid: str) -> str | None:
        """The status of ``uid``; inside a transaction of this thread, as that transaction sees it."""
        with self._write_lock:
            if self._writer is not None and self._writer.in_transaction:
                with self._guard():
                    row = self._writer.execute("SELECT status FROM series WHERE uid=?", (uid,)).fetchone()
                return row[0] if row is not None else None
        with self._read() as conn:
            row = conn.execute("SELECT status FROM series WHERE uid=?", (uid,)).fetchone()
        return row[0] if row is not None else None

    def get_meta(self, key: str) -> Any:
        with self._read() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        if row is None or not isinstance(row[0], str):
            return None
        try:
            return json.loads(row[0])
        except (ValueError, RecursionError):
            return None

    def generation(self) -> int | None:
        """``meta.generation``: moves with every change to the series rows (see ``GENERATION``);
        None when unreadable."""
        with self._read() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key=?", (GENERATION,)).fetchone()
        try:
            return int(row[0]) if row is not None else None
        except (TypeError, ValueError):
            return None

    def count(self) -> int:
        with self._read() as conn:
            return int(conn.execute("SELECT count(*) FROM series").fetchone()[0])

    def rows(self, *, batch: int = 256) -> Iterator[tuple[str, str, str]]:
        """(uid, record JSON, origin) of every series in order, read in batches by key (memory
        holds one batch; a write between batches is seen or not, never half)."""
        for uid, record, origin, _ in self.rows_with_columns(batch=batch):
            yield uid, record, origin

    def rows_with_columns(self, *, batch: int = 256) -> Iterator[tuple[str, str, str, tuple[Any, Any]]]:
        """``rows`` with the (status, bytes) columns, which ``HarvestState`` checks against the
        record on open (the columns answer ``completed_bytes`` without parsing it)."""
        after = 0
        while True:
            with self._read() as conn:
                got = conn.execute("SELECT seq, uid, record, origin, status, bytes FROM series WHERE seq>? "
                                   "ORDER BY seq LIMIT ?", (after, batch)).fetchall()
            if not got:
                return
            for seq, uid, blob, origin, status, size in got:
                record = _inflate(blob)
                if isinstance(uid, str):
                    yield uid, record if record is not None else "", str(origin), (status, size)
            after = got[-1][0]

    def rows_for_recovery(self, *, batch: int = 256
                          ) -> Iterator[tuple[str, str, tuple[Any, Any], tuple[str, list[tuple[str, int]]] | None,
                                              Any]]:
        """(uid, origin, (status, bytes) columns, vouched, record) of every series in order, in
        batches by key. ``vouched`` is (folder, the ``vouch``ed (name, size) list) when the row
        is complete and still sealed as vouched, else None; ``record()`` inflates the record's
        JSON ("" for a hostile blob) only when asked (a vouched row never needs it)."""
        after = 0
        while True:
            with self._read() as conn:
                got = conn.execute("SELECT s.seq, s.uid, s.origin, s.status, s.path, s.files, s.bytes, s.record, "
                                   "v.seal, v.checks FROM series s LEFT JOIN vouched v ON v.uid = s.uid "
                                   "WHERE s.seq>? ORDER BY s.seq LIMIT ?", (after, batch)).fetchall()
            if not got:
                return
            for _, uid, origin, status, path, files, size, blob, seal, packed in got:
                if not isinstance(uid, str):
                    continue
                vouched = None
                if (seal is not None and status == "complete" and isinstance(path, str)
                        and seal == _seal(status, path, files, size, blob)):
                    checks = _unpack_checks(packed)
                    vouched = (path, checks) if checks is not None else None
                yield (uid, str(origin), (status, size), vouched,
                       lambda blob=blob: _inflate(blob) or "")
            after = got[-1][0]

    def verify_rows(self, *, batch: int = 256) -> Iterator[tuple[str, Any, str, int, int, bool, Any]]:
        """(uid, status, folder, files, bytes, vouched, record) of every series in order, in
        batches by key: the columns, whether the row is complete and still sealed as ``vouch``ed
        (each of its files one plain name inside ``folder``), and ``record()``, which inflates
        the record's JSON ("" for a hostile blob) only when asked. Hostile columns (a folder or a
        count of the wrong type) are given as "" and 0."""
        after = 0
        while True:
            with self._read() as conn:
                got = conn.execute("SELECT s.seq, s.uid, s.status, s.path, s.files, s.bytes, s.record, v.seal, "
                                   "v.checks FROM series s LEFT JOIN vouched v ON v.uid = s.uid "
                                   "WHERE s.seq>? ORDER BY s.seq LIMIT ?", (after, batch)).fetchall()
            if not got:
                return
            for _, uid, status, path, files, size, blob, seal, packed in got:
                if not isinstance(uid, str):
                    continue
                sealed = (seal is not None and status == "complete" and isinstance(path, str)
                          and seal == _seal(status, path, files, size, blob) and _unpack_checks(packed) is not None)
                yield (uid, status, path if isinstance(path, str) else "",
                       files if isinstance(files, int) and files >= 0 else 0,
                       size if isinstance(size, int) and size >= 0 else 0, sealed,
                       lambda blob=blob: _inflate(blob) or "")
            after = got[-1][0]

    def complete_at(self, path: str) -> str | None:
        """The uid of the complete series whose folder is ``path`` (by index), or None."""
        with self._read() as conn:
            row = conn.execute("SELECT uid FROM series WHERE status='complete' AND path=?", (path,)).fetchone()
        return row[0] if row is not None and isinstance(row[0], str) else None

    def completed_bytes(self, uid: str) -> int | None:
        """The bytes of ``uid`` when it is complete, else None: from the columns, no record parsed."""
        with self._read() as conn:
            row = conn.execute("SELECT bytes FROM series WHERE uid=? AND status='complete'", (uid,)).fetchone()
        return int(row[0]) if row is not None and isinstance(row[0], int) else None

    @staticmethod
    def columns_of(rec: dict[str, Any]) -> tuple[str, int]:
        """The (status, bytes) columns ``put`` writes for ``rec``."""
        complete = rec.get("status") == "complete"
        return rec.get("status") or "", min(int(rec.get("bytes") or 0), 2 ** 62) if complete else 0

    def totals(self) -> dict[str, int]:
        """harvest.json's ``totals`` block, counted by the database (``totals_of`` for records)."""
        with self._read() as conn:
            n, done, unavailable, files, size = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE status='complete'), "
                "count(*) FILTER (WHERE status='unavailable'), total(files), total(bytes) FROM series").fetchone()
        return {"series": n, "complete": done, "failed": n - done - unavailable, "unavailable": unavailable,
                "files": int(files), "bytes": int(size)}

    def complete_paths(self) -> dict[str, str]:
        """uid -> folder of every complete series (one string pair per series, not per file)."""
        with self._read() as conn:
            return {u: p for u, p in conn.execute("SELECT uid, path FROM series WHERE status='complete'")
                    if isinstance(u, str) and isinstance(p, str)}

    def events(self, *, batch: int = 256) -> Iterator[dict[str, Any]]:
        """The run events in order, as ``{"event": kind, "t": t, **body}``; unreadable ones skipped."""
        after = 0
        while True:
            with self._read() as conn:
                got = conn.execute("SELECT id, t, kind, body FROM events WHERE id>? ORDER BY id LIMIT ?",
                                   (after, batch)).fetchall()
            if not got:
                return
            for _, t, kind, body in got:
                try:
                    event = json.loads(body)
                except (TypeError, ValueError, RecursionError):
                    continue
                if isinstance(event, dict):
                    yield {**event, "event": kind, "t": t}
            after = got[-1][0]


#: A record read back larger than this is refused (a hostile row: a zlib bomb). The largest real
#: series (NLST's, ~1,000 files) is well under 1 MB of JSON.
MAX_RECORD_BYTES = 64 << 20


class ScratchDB:
    """A scratch SQLite file inside the harvest's own folder, for one run or one assignment
    (``FolderIndex``, ``store.plan.PlanTable``): created empty (one a kill left is removed first),
    written without journal or fsync (nothing in it outlives its user: the state database holds
    what is done), removed by ``close``. One statement at a time (its users read from several
    threads). Raises ``DiskFullError``/``OutputNotWritableError`` when it cannot be written."""

    def __init__(self, path: Path, schema: str, what: str) -> None:
        self.path, self._what = path, what
        self._remove()
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        with self._guard():
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._conn = conn
            for pragma in ("journal_mode=OFF", "synchronous=OFF", "trusted_schema=OFF"):
                conn.execute(f"PRAGMA {pragma}")
            conn.execute(schema)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        self._remove()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutputNotWritableError(f"the {self._what} {self.path} is closed")
        return self._conn

    def _remove(self) -> None:
        for path in (self.path, self.path.with_name(self.path.name + "-journal")):
            try:
                os.unlink(path)   # (a link planted there is removed, never followed)
            except FileNotFoundError:
                pass
            except (IsADirectoryError, PermissionError) as exc:
                if not path.is_dir():
                    raise OutputNotWritableError(f"cannot remove the {self._what} {path}: {exc.strerror}") from None
                raise FatalError(f"{path} is a folder, where the {self._what} (a scratch file) belongs",
                                 hint="remove it (it holds nothing the harvest needs), then run the same "
                                      "command again") from None

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            with self._lock:
                yield
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            if code in (_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_CANTOPEN):
                raise OutputNotWritableError(f"cannot write {self.path}: {exc}") from None
            raise DiskFullError(f"cannot write {self.path.name}: disk full, a file size limit or an I/O "
                                f"error ({exc})") from None


class FolderIndex(ScratchDB):
    """The series folders of one assignment (``layout.assign_paths``) and their ancestors, in a
    scratch SQLite file (``ScratchDB``): the key (``name_key`` of the folder) is the table's
    primary key, so the folders of half a million series are never a set in memory.
    ``layout.Folders``."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "CREATE TABLE folders (key TEXT PRIMARY KEY, series INTEGER NOT NULL, "
                               "inner INTEGER NOT NULL) WITHOUT ROWID", "folder index")
        with self._guard():
            self._connection().execute("BEGIN")

    def add(self, folder: str) -> None:
        key = name_key(folder)
        marks = [(key, 1, 0)] + [(str(p), 0, 1) for p in PurePosixPath(key).parents if str(p) != "."]
        with self._guard():
            self._connection().executemany(
                "INSERT INTO folders VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                "series=max(series, excluded.series), inner=max(inner, excluded.inner)", marks)

    def is_folder(self, folder: str) -> bool:
        with self._guard():
            return self._connection().execute("SELECT 1 FROM folders WHERE key=? AND series=1",
                                              (name_key(folder),)).fetchone() is not None

    def clashes(self, candidate: str) -> bool:
        """The same folder, one that holds a series, or one inside a series: files would mix."""
        key = name_key(candidate)
        parents = [str(p) for p in PurePosixPath(key).parents if str(p) != "."]
        with self._guard():
            return self._connection().execute(
                f"SELECT 1 FROM folders WHERE key=? OR (series=1 AND key IN ({','.join('?' * len(parents))})) LIMIT 1",
                [key, *parents]).fetchone() is not None


def _deflate(rec: dict[str, Any]) -> bytes:
    # JSON of a series compresses about 8:1 (every file's path repeats the folder's): the
    # database stays near a tenth of harvest.json, and each commit writes fewer pages.
    return zlib.compress(json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode("utf-8"), 1)


_NOT_IN_A_NAME = frozenset("/\\:\x00")


def plain_name(name: str) -> bool:
    """``name`` is one plain file name (what the layout writes): no separator, not ``.`` or
    ``..``, nothing Windows reads otherwise."""
    return name not in ("", ".", "..") and _NOT_IN_A_NAME.isdisjoint(name)


def _seal(status: Any, path: Any, files: Any, size: Any, blob: Any) -> int:
    """A CRC of a series row (``vouched``): not against forgery (a forged row is no worse on the
    fast path: it only stats plain names inside a folder reached without links), against a row
    changed since it was vouched."""
    head = json.dumps([status, path, files, size]).encode("utf-8")
    return zlib.crc32(blob if isinstance(blob, bytes) else b"\x00", zlib.crc32(head))


def _unpack_checks(packed: Any) -> list[tuple[str, int]] | None:
    """The (name, size) list of a ``vouched`` row, or None for anything that is not one (hostile:
    a name that is not plain, a size that is not a whole number)."""
    if not isinstance(packed, bytes):
        return None
    try:
        inflater = zlib.decompressobj()
        text = inflater.decompress(packed, MAX_RECORD_BYTES).decode("utf-8")
        if inflater.unconsumed_tail:
            return None
        # one pass in C over the whole list (a no-op open reads one per series): every line a
        # size and a plain name (``plain_name``'s rules, as a pattern), or nothing is used
        if _CHECKS.fullmatch(text) is None:
            return None
        return [(name, int(size)) for size, name in _CHECK_LINE.findall(text)]
    except (zlib.error, UnicodeDecodeError, ValueError):
        return None


_CHECK = r"[0-9]+/(?!\.\.?(?:\n|\Z))[^/\\:\x00\n]+"
_CHECKS = re.compile(f"(?:{_CHECK}\n)*{_CHECK}")
_CHECK_LINE = re.compile(r"([0-9]+)/([^\n]*)")


def _inflate(blob: Any) -> str | None:
    """The JSON text of a stored record, or None for anything that is not one (hostile rows)."""
    if not isinstance(blob, bytes):
        return None
    try:
        inflater = zlib.decompressobj()
        data = inflater.decompress(blob, MAX_RECORD_BYTES)
        if inflater.unconsumed_tail:
            return None
        return data.decode("utf-8")
    except (zlib.error, UnicodeDecodeError):
        return None
