"""What is done: the state database, and ``harvest.json`` and ``metadata.csv`` exported from it.

Files on disk are a database (rclone's rule): nothing half-written ever sits under a final name.

* ``DIR/.harvester/state.db`` (``harvester.store.db``) is the source of truth: every question
  (``complete``, ``taken_paths``, ``records``, ``events``) is an index lookup or a streamed read,
  so memory does not grow with the number of files recorded. A series is committed by
  (1) writing and verifying it in ``DIR/.harvester/tmp/<key>.staging``, (2) writing its row and
  its run event (one durable transaction, fsynced: SQLite's WAL is the write-ahead log),
  (3) renaming the staging folder to its final path (atomic on one filesystem). Then one
  streamed pass over every series on ``open()``: a complete one whose folder is intact stays
  complete; one whose staging folder survived is finished (step 3 redone); anything else is
  recorded failed and fetched again. Then ``tmp/`` is emptied. A row the database vouches for
  (``vouched``: written with the row at commit, or after the first full check of an older row,
  and sealed by a CRC of the row) is not parsed or path-checked again: only its files are
  stat'ed, and it is checked in full when one is not there.
* ``DIR/.harvester/journal.jsonl`` is no longer written. Earlier versions appended every change
  to it; ``open()`` reads the lines past the mark the database keeps of it (``meta.journal``:
  the offset of the first line not read), with the checks below, and moves the mark in the same
  transaction: the migration of a harvest made before the database (its whole journal, its run
  events copied into the database's), and the tail an earlier version left behind (a kill -9
  between a line and its row, a run of that version on a DIR this one made). The file is kept
  as it was.
* ``DIR/harvest.json`` is written atomically (temp file, fsync, rename) by streaming the
  database's records, so it only ever lists verified series (during a run only while it is
  small: ``CHECKPOINT_EXPORT_MAX_SERIES``). ``metadata.csv`` (the Data Retriever's, value for
  value: CRLF, unquoted, its 17 columns) likewise; ``metadata/metadata.csv`` for ``tcia2026``.
  On a new database harvest.json's records are read in once (a DIR sent without ``.harvester``).
* ``DIR/.harvester/lock`` holds an flock while a run uses DIR, so two runs cannot interleave.
* A series a cart or list asked for that the archive did not give is recorded with status
  ``unavailable`` and the archive's reason in ``error`` (no path, no files); it never replaces a
  complete record, and the next run looks it up again.
* Every path read from harvest.json, an old journal or the database goes through ``harvester.containment``:
  a record whose folder or files would leave DIR is refused (left out of ``records``, so it is
  fetched again into a safe folder, and listed in ``refused`` with where it came from); a link
  at ``.harvester``, ``.harvester/tmp``, ``licenses`` or on the way to a series folder stops the
  run with ``UnsafePathError`` naming it. Renames into place are made relative to a descriptor
  of the parent folder opened without following links.

Raises ``OutputNotWritableError``/``DiskFullError`` (fatal) when DIR cannot be written, and
``FatalError`` when another run holds the lock or the state database is damaged.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from harvester.containment import check_not_link, inside, link_error, open_dir, open_nofollow, parts_of
from harvester.errors import (
    DiskFullError,
    FatalError,
    HarvesterError,
    ManifestError,
    OutputNotWritableError,
    UnsafePathError,
    UsageError,
    classify_os_error,
)
from harvester.store.layout import METADATA_IN_SUBFOLDER, assign_paths, retriever_date, retriever_text
from harvester.redact import redact
from harvester.store.db import DB_NAME, FolderIndex, FolderTaken, StateDB, plain_name
from harvester.store.manifest import read_manifest

_log = logging.getLogger("harvester")  # reports of damaged records and refused paths, on stderr by default

SCHEMA = "harvester/1"
METADATA_COLUMNS = [
    "Series UID", "Collection", "3rd Party Analysis", "Data Description URI", "Subject ID", "Study UID",
    "Study Description", "Study Date", "Series Description", "Manufacturer", "Modality", "SOP Class Name",
    "SOP Class UID", "Number of Images", "File Size", "File Location", "Download Timestamp",
]
_ATOMIC_TMP = re.compile(r"^\..+\.[0-9]+\.tmp$")   # atomic_write's temp names: .<name>.<pid>.tmp


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def record_problem(rec: Any) -> str | None:
    """Why a series record read from the journal or harvest.json (hostile until checked: the
    directory may come from someone else) cannot be used, or None. Checks the types of every
    field the readers compute with; other fields are only ever shown, through ``str``."""
    if not isinstance(rec, dict):
        return "a series record is not an object"
    if not isinstance(rec.get("SeriesInstanceUID"), str) or not rec["SeriesInstanceUID"]:
        return "SeriesInstanceUID is not a non-empty string"
    for key in ("status", "path", "error", "error_kind", "completed", "sop_class_uid"):
        if rec.get(key) is not None and not isinstance(rec[key], str):
            return f"{key} is not a string"
    for key in ("bytes", "attempts"):
        if rec.get(key) is not None and not _whole(rec[key]):
            return f"{key} is not a whole number"
    for key in ("metadata", "patient", "study"):
        if rec.get(key) is not None and not isinstance(rec[key], dict):
            return f"{key} is not an object"
    files = rec.get("files", [])
    if not isinstance(files, list):
        return "files is not a list"
    for i, f in enumerate(files):
        if not isinstance(f, dict) or not isinstance(f.get("path"), str) or not _whole(f.get("size")):
            return f"files[{i}] is not an object with a path and a size"
        if not isinstance(f.get("md5"), str):
            return f"files[{i}].md5 is not a string"
    if rec.get("status") == "complete" and not isinstance(rec.get("path"), str):
        return "a complete series without a path"
    return None


def numbered_usable_records(series: Any, where: str, skipped: list[str] | None = None
                            ) -> list[tuple[int, dict[str, Any]]]:
    """(position from 1, record) for the records of a harvest.json ``series`` list that pass
    ``record_problem``; each one that does not is reported (``logging``, on stderr by default)
    with its position, added to ``skipped`` when given, and skipped."""
    if not isinstance(series, list):
        _log.warning("%s: the series list is not a list; ignored", where)
        if skipped is not None:
            skipped.append(f"{where}: the series list is not a list; ignored")
        return []
    good = []
    for n, rec in enumerate(series, 1):
        problem = record_problem(rec)
        if problem is None:
            good.append((n, rec))
        else:
            _log.warning("%s: series record %d: %s; skipped", where, n, redact(problem))
            if skipped is not None:
                skipped.append(f"{where}: series record {n}: {redact(problem)}; skipped")
    return good


def usable_records(series: Any, where: str) -> list[dict[str, Any]]:
    """The records of ``numbered_usable_records``, without their positions."""
    return [rec for _, rec in numbered_usable_records(series, where)]


def now_iso() -> str:
    """UTC now as ISO-8601 with milliseconds (the report buckets short runs by these)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def series_key(uid: str) -> str:
    """A short, filesystem-safe key for temp names (UIDs from a server are not trusted)."""
    return hashlib.sha1(uid.encode("utf-8", "replace")).hexdigest()[:20]


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temp file and rename; readers see old or new, never half."""
    atomic_write_chunks(path, (data,))


def atomic_write_chunks(path: Path, chunks: Iterable[bytes]) -> None:
    """``atomic_write`` of the concatenation of ``chunks``, consumed as they come (an export
    streamed from the database never sits in memory whole)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # A file (or a planted link) left under the temp name goes first; the temp is then made
        # new, never through a link.
        tmp.unlink(missing_ok=True)
        with open(tmp, "wb", opener=_new_file) as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise classify_os_error(exc, path.name) from None


def _new_file(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_EXCL | os.O_NOFOLLOW, 0o644)


def write_output(target: Path | str, data: bytes, *, option: str) -> None:
    """Write a file the user named (an export, a report given with ``option``): ``-`` is stdout;
    a symlink or a non-regular file (``/dev/stdout``, a FIFO) is written through, as the shell's
    ``>`` does, and never replaced; a regular file or a new name is written by ``atomic_write``.

    Raises ``DiskFullError``, or ``OutputNotWritableError`` whose hint names ``option``.
    """
    write_output_chunks(target, (data,), option=option)


def write_output_chunks(target: Path | str, chunks: Iterable[bytes], *, option: str) -> None:
    """``write_output`` of the concatenation of ``chunks``, consumed as they come."""
    hint = f"choose a file you can write to with {option} FILE, or {option} - for stdout"
    if str(target) == "-":
        try:
            sys.stdout.flush()
            for chunk in chunks:
                sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            raise  # the reader left (| head): the CLI ends quietly
        except OSError as exc:
            raise OutputNotWritableError(f"cannot write to stdout: {exc.strerror or exc}", hint=hint) from None
        return
    path = Path(target)
    try:
        through = path.is_symlink() or (path.exists() and not path.is_file())
        if through:
            with open(path, "wb") as fh:  # follows the link / opens the device or FIFO: never replaced
                for chunk in chunks:
                    fh.write(chunk)
            return
        if not path.parent.is_dir():
            raise OutputNotWritableError(f"cannot write {path}: {path.parent} is not a directory", hint=hint)
        atomic_write_chunks(path, chunks)
    except DiskFullError:
        raise
    except HarvesterError as exc:  # atomic_write's, classified; or the parent check's
        raise OutputNotWritableError(str(exc), hint=hint) from None
    except OSError as exc:
        err = classify_os_error(exc, str(path))
        if isinstance(err, DiskFullError):
            raise err from None
        raise OutputNotWritableError(f"cannot write {path}: {exc.strerror or exc}", hint=hint) from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def totals_of(recs: list[dict[str, Any]]) -> dict[str, int]:
    """The ``totals`` block of harvest.json for these records."""
    done = [r for r in recs if r.get("status") == "complete"]
    unavailable = sum(1 for r in recs if r.get("status") == "unavailable")
    return {
        "series": len(recs),
        "complete": len(done),
        "failed": len(recs) - len(done) - unavailable,
        "unavailable": unavailable,
        "files": sum(len(r.get("files", [])) for r in done),
        "bytes": sum(int(r.get("bytes") or 0) for r in done),
    }


class _Records(Mapping[str, dict[str, Any]]):
    """The series records, read from the state database by index: nothing is held in memory but
    what ``read()`` found in an old journal past the database (``overlay``: a record, or None for a
    series forgotten there). ``items()`` and ``values()`` stream in batches."""

    def __init__(self, state: HarvestState) -> None:
        self._state = state
        self.overlay: dict[str, dict[str, Any] | None] = {}
        self.hidden: set[str] = set()      # rows refused by ``read()`` (it cannot delete them)
        self.first: list[str] = []         # ``read()``: harvest.json's order goes first, as it did

    def _from_db(self, uid: str) -> dict[str, Any] | None:
        db = self._state.db
        if db is None or uid in self.hidden:
            return None
        got = db.get(uid)
        return json_record(got[0]) if got is not None else None

    def get(self, uid: str, default: Any = None) -> Any:  # type: ignore[override]
        if uid in self.overlay:
            rec = self.overlay[uid]
        else:
            rec = self._from_db(uid)
        return default if rec is None else rec

    def __getitem__(self, uid: str) -> dict[str, Any]:
        rec = self.get(uid)
        if rec is None:
            raise KeyError(uid)
        return rec

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, str) and self.get(uid) is not None

    def items(self) -> Iterator[tuple[str, dict[str, Any]]]:  # type: ignore[override]
        seen: set[str] = set()
        for uid in self.first:
            rec = self.get(uid)
            if rec is not None and uid not in seen:
                seen.add(uid)
                yield uid, rec
        db = self._state.db
        if db is not None:
            for uid, raw, _ in db.rows():
                if uid in self.hidden or uid in seen:
                    continue
                if uid in self.overlay:
                    seen.add(uid)
                    rec = self.overlay[uid]
                else:
                    rec = json_record(raw)
                if rec is not None:
                    yield uid, rec
        for uid, rec in list(self.overlay.items()):
            if uid not in seen and rec is not None:
                yield uid, rec

    def values(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        return (rec for _, rec in self.items())

    def __iter__(self) -> Iterator[str]:
        return (uid for uid, _ in self.items())

    def __len__(self) -> int:
        if not self.overlay and not self.hidden and not self.first and self._state.db is not None:
            return self._state.db.count()
        return sum(1 for _ in self.items())


def _plain_child(folder: str, path: str) -> bool:
    """``path`` is ``folder/NAME`` with NAME one plain file name (what the layout writes): no
    separator, no ``..``, nothing Windows reads otherwise. False means "check it in full"."""
    if not path.startswith(folder) or path[len(folder):len(folder) + 1] != "/":
        return False
    return plain_name(path[len(folder) + 1:])


def json_record(raw: str) -> dict[str, Any] | None:
    """The JSON object in ``raw``, or None when it is not JSON or not an object (a hostile record)."""
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return rec if isinstance(rec, dict) else None


def _row_problem(uid: str, rec: dict[str, Any] | None) -> str | None:
    """Why a database row of ``uid`` (its record parsed, or None) is not a usable record, or None."""
    why = record_problem(rec) if rec is not None else "the record is not a JSON object"
    if why is None and rec is not None and rec.get("SeriesInstanceUID") != uid:
        why = "the record names another series"
    return why


class HarvestState:
    """The on-disk state of one output directory. Thread-safe for the calls the engine makes."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.meta_dir = out_dir / ".harvester"
        self.tmp_dir = self.meta_dir / "tmp"
        self.journal_path = self.meta_dir / "journal.jsonl"
        self.db_path = self.meta_dir / DB_NAME
        self.manifest_path = out_dir / "harvest.json"
        self.db: StateDB | None = None
        #: the series records (a read-only view of the database; see ``_Records``)
        self.records = _Records(self)
        self.header: dict[str, Any] = {}
        self.recovered = 0      # commits finished during recovery
        self.lost = 0           # commits whose files were gone (will be fetched again)
        self._pending_trash: dict[str, tuple[str, str]] = {}  # uid -> (path, trash) of prunes
        #: (position, record) of each usable record harvest.json lists, as read (verify checks them)
        self.listed: list[tuple[int, dict[str, Any]]] = []
        #: one line per record refused on open (a path that leaves DIR), naming the file and line
        self.refused: list[str] = []
        #: one line per record that could not be used at all (not a record, not JSON), warned and
        #: skipped: ``verify`` cannot vouch for those series
        self.unusable: list[str] = []
        self._lockfile: int | None = None
        self._overlay_origin: dict[str, str] = {}   # uid -> where read() found its overlay record
        #: (byte offset, line number) of the first old journal line not read (past the last whole one)
        self._journal_end: tuple[int, int] = (0, 0)
        self._journal_from: tuple[int, int] = (0, 0)  # where read() started on it (events() reads on)
        #: old journal lines ``events()`` could not read (a kill -9 mid-append tears the last one)
        self.torn_lines = 0
        self._unchecked = False     # read(streamed=True): rows are checked by checked_items

    # ------------------------------------------------------------ open / recover
    def open(self, *, recover: bool = True) -> None:
        """Create, lock, load and recover DIR. Raises ``UnsafePathError`` when ``.harvester``,
        ``.harvester/tmp``, ``licenses``, an old journal, the database or the lock is a symbolic
        link, or an old journal is not a regular file (nothing is written then); ``FatalError``
        when the database is damaged (see ``harvester.store.db``). ``recover=False`` leaves the
        pass over every series (``recover``) to the caller, who makes it before any other use
        but the header (a run plans meanwhile)."""
        for fixed in (self.meta_dir, self.tmp_dir, self.out_dir / "licenses", self.journal_path,
                      self.meta_dir / "lock"):
            check_not_link(self.out_dir, fixed)
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            probe = self.meta_dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            err = classify_os_error(exc, f"output directory {self.out_dir}")
            if not isinstance(err, FatalError):  # ENOTDIR, EEXIST...: DIR is unusable, not a series problem
                err = OutputNotWritableError(f"cannot use output directory {self.out_dir}: {exc.strerror or exc}")
            raise err from None
        self._take_lock()
        self._check_journal()
        try:
            db = StateDB(self.db_path)
            db.open()
            self.db = db
            with _IntoDB(self) as target:
                self._import(target)
                target.mark_imported()
            if recover:
                self._recover()
        except BaseException:
            self.close()
            raise

    def recover(self) -> None:
        """The pass ``open(recover=False)`` left out (see ``_recover``); raises as ``open``."""
        self._recover()

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
        if self._lockfile is not None:
            os.close(self._lockfile)
            self._lockfile = None

    @property
    def locked(self) -> bool:
        """Whether this state holds DIR's lock (``open`` took it and ``close`` has not yet let go)."""
        return self._lockfile is not None

    def _take_lock(self) -> None:
        lock = self.meta_dir / "lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except (IsADirectoryError, NotADirectoryError):
            raise FatalError(f"{lock} is a folder, where DIR's lock file belongs",
                             hint="remove it (the lock file holds nothing), then run the same command again") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(f"{lock} is a symbolic link; refusing to use it", path=str(lock)) from None
            raise classify_os_error(exc, str(lock)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            # Fatal, not a usage error (exit 3): the command was right, only the moment was not.
            raise FatalError(f"another harvester is running in {self.out_dir}",
                             hint="wait for it to finish (or stop it), then run the same command again; "
                                  "or use another output directory") from None
        self._lockfile = fd

    def origin(self, uid: str) -> str:
        """Where the record of ``uid`` was read (``harvest.json series #3``, ``journal.jsonl line 25``)."""
        where = self._overlay_origin.get(uid)
        if where is None and self.db is not None and uid not in self.records.overlay:
            got = self.db.get(uid)
            where = got[1] if got is not None else None
        return where or self.manifest_path.name

    def read(self, *, listed: bool = True, streamed: bool = False) -> None:
        """Fill ``records`` and ``header`` as ``open()`` would before recovery, without the lock
        and without writing anything (verify reads this way): the database read-only, then the
        journal past what the database holds; a harvest made before the database, from
        harvest.json and its journal (in memory, as those versions did). ``listed=False`` leaves
        ``listed`` empty: harvest.json is then read only when the database lacks its records.
        ``streamed=True`` (a reader that goes through the records once, by ``checked_items``):
        the database's rows are checked as that reads them, not by a pass of their own here."""
        self._check_journal()
        if self.db_path.exists() or self.db_path.is_symlink():
            db = StateDB(self.db_path, readonly=True)
            db.open()
            self.db = db
        target = _IntoOverlay(self)
        self._import(target, load_listed=listed)
        self._unchecked = streamed and not self.records.overlay and not self.listed
        if not self._unchecked:
            self._hide_unusable(target)
        self.records.first = [rec["SeriesInstanceUID"] for _, rec in self.listed]

    def checked_items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``records.items()``; after ``read(streamed=True)``, every database row is checked as it
        is read (as ``_hide_unusable`` does: each unusable one reported and left out, and hidden
        from then on), so each record is parsed once."""
        if not self._unchecked or self.db is None:
            yield from self.records.items()
            return
        for uid, raw, origin in self.db.rows():
            rec = json_record(raw)
            why = _row_problem(uid, rec)
            if why is not None:
                if uid not in self.records.hidden:
                    _log.warning("%s: series %s: %s; not used", origin, uid, redact(why))
                    self.unusable.append(f"{origin}: series {uid}: {redact(why)}; not used")
                    self.records.hidden.add(uid)
                continue
            assert rec is not None
            yield uid, rec

    def read_events(self) -> Iterator[dict[str, Any]]:
        """``events()`` without the lock, without writing and without reading any record (the
        report asks only this): the database read-only, then an old journal past its mark."""
        self._check_journal()
        if self.db is None and (self.db_path.exists() or self.db_path.is_symlink()):
            db = StateDB(self.db_path, readonly=True)
            db.open()
            self.db = db
        self._journal_from = self._journal_start(self.db)
        return self.events()

    def _check_journal(self) -> None:
        if self.journal_path.is_symlink():
            raise link_error(self.out_dir, self.journal_path)

    # ------------------------------------------------------------ import (migration and journal tail)
    def _import(self, target: _Target, *, load_listed: bool = False) -> None:
        """Bring ``target`` up to date: harvest.json's records when the database has never been
        filled (a harvest made by an earlier version, or a DIR someone sent without its
        ``.harvester``), then every line of an old journal past the one the database last read
        (the run events too when the database never read it: the migration). Both are hostile:
        each record passes ``record_problem`` first."""
        db = self.db
        header = db.get_meta("header") if db is not None else None
        imported = db is not None and db.get_meta("imported") is True
        if isinstance(header, dict):
            self.header = header
        if (not imported or load_listed) and self.manifest_path.exists():
            try:
                data = read_manifest(self.out_dir)   # a link or a FIFO: rebuilt as damaged
                self.listed = numbered_usable_records(data.get("series", []), str(self.manifest_path), self.unusable)
                if not imported:
                    for index, rec in self.listed:
                        target.put(rec["SeriesInstanceUID"], rec, f"{self.manifest_path.name} series #{index}")
                    if not isinstance(header, dict):
                        self.header = {k: v for k, v in data.items() if k not in ("series", "totals")}
            except (ManifestError, UsageError, AttributeError, TypeError):
                # A damaged harvest.json is rebuilt from the database (and an old journal).
                self.listed = []
                if not imported:
                    target.clear()
        for key in ("started", "finished", "last_sync"):  # times the next run computes with
            if self.header.get(key) is not None and not isinstance(self.header[key], str):
                _log.warning("%s: %s is not a string; ignored", self.manifest_path, key)
                del self.header[key]
        start = self._journal_start(db)
        self._journal_from = start
        self._replay_journal(target, *start, events=db is not None and db.get_meta("journal") is None)
        if start != self._journal_end:
            target.mark_journal(*self._journal_end)

    def _journal_start(self, db: StateDB | None) -> tuple[int, int]:
        """(byte offset, line number) of the first journal line the database has not read: where
        it stopped, unless the journal is no longer the file it read (shorter, or that offset is
        not the start of a line): then from the start (replaying a line twice changes nothing)."""
        mark = db.get_meta("journal") if db is not None else None
        if not (isinstance(mark, dict) and _whole(mark.get("offset")) and _whole(mark.get("line"))):
            return 0, 0
        offset, line = mark["offset"], mark["line"]
        if offset == 0:
            return 0, 0
        try:
            with open(self.journal_path, "rb", opener=open_nofollow) as fh:
                fh.seek(offset - 1)
                if fh.read(1) == b"\n":
                    return offset, line
        except OSError:
            pass
        return 0, 0

    def _replay_journal(self, target: _Target, offset: int, first_line: int, *, events: bool = False) -> None:
        """Read an old journal's lines from ``offset`` into ``target`` (and their run events,
        when ``events``); ``_journal_end`` is then past its last whole line (a torn one after it,
        a kill -9's, is read again should an older version end it)."""
        self._journal_end = (offset, first_line)
        if not self.journal_path.exists():
            return
        try:
            fh = open(self.journal_path, "rb", opener=open_nofollow)
        except OSError as exc:
            raise UnsafePathError(f"{self.journal_path} cannot be read as a regular file ({exc.strerror or exc}); "
                                  f"refusing to use it", path=str(self.journal_path)) from None
        with fh:
            fh.seek(offset)
            for lineno, line in enumerate(fh, start=first_line + 1):
                offset += len(line)
                if line.endswith(b"\n"):
                    self._journal_end = (offset, lineno)
                try:
                    event = json.loads(line)
                except RecursionError:
                    _log.warning("%s line %d: JSON nested too deep; line skipped", self.journal_path, lineno)
                    continue
                except ValueError:
                    continue  # a torn last line from a kill -9
                if not isinstance(event, dict):
                    continue
                kind, rec = event.get("event"), event.get("series")
                if events and (ev := _event_of_line(event)) is not None:
                    target.event(ev)
                if kind in ("commit", "failed"):
                    problem = record_problem(rec)
                    if problem is not None:
                        _log.warning("%s line %d: %s; line skipped", self.journal_path, lineno, redact(problem))
                        continue
                    uid = rec["SeriesInstanceUID"]
                    if kind == "failed" and target.status(uid) == "complete":
                        continue  # a later failure to refresh never hides a verified copy
                    target.put(uid, rec, f"{self.journal_path.name} line {lineno}")
                    self._pending_trash.pop(uid, None)  # fetched again after a prune: keep it
                elif kind == "unavailable" and isinstance(rec, list):
                    for one in rec:
                        if (isinstance(one, dict) and one.get("SeriesInstanceUID")
                                and record_problem(one) is None
                                and target.status(str(one["SeriesInstanceUID"])) != "complete"):
                            target.put(str(one["SeriesInstanceUID"]), one, f"{self.journal_path.name} line {lineno}")
                elif kind == "forget":
                    uid, path, trash = event.get("uid"), event.get("path"), event.get("trash")
                    if not isinstance(uid, str) or not uid or not all(isinstance(v, (str, type(None)))
                                                                      for v in (path, trash)):
                        _log.warning("%s line %d: a forget event without a usable uid, path or trash; line "
                                     "skipped", self.journal_path, lineno)
                        continue
                    target.forget(uid, path, trash)
                    if path and trash:
                        self._pending_trash[uid] = (path, trash)

    def _hide_unusable(self, target: _IntoOverlay) -> None:
        """Leave out of ``records`` every database row that is not a usable record (a hostile
        database's: wrong types, another series' UID), each reported once. Paths are left for
        the reader to check (verify names each refused path with its record)."""
        db = self.db
        if db is None:
            return
        for uid, raw, origin in db.rows():
            if uid in self.records.overlay:
                continue
            why = _row_problem(uid, json_record(raw))
            if why is not None:
                _log.warning("%s: series %s: %s; not used", origin, uid, redact(why))
                self.unusable.append(f"{origin}: series {uid}: {redact(why)}; not used")
                target.hide(uid)

    def _unsafe(self, rec: Any) -> str | None:
        problem = record_problem(rec)
        if problem is not None:
            return redact(problem)
        try:
            paths = [rec.get("path")] if rec.get("status") == "complete" or rec.get("path") else []
            folder = paths[0] if paths and isinstance(paths[0], str) else None
            paths += [f.get("path") if isinstance(f, dict) else f for f in rec.get("files") or []]
            for n, path in enumerate(paths):
                if not isinstance(path, str):
                    raise UnsafePathError(f"refusing a path that is a {type(path).__name__}, not a string", path="")
                if n and folder is not None and _plain_child(folder, path):
                    continue    # one plain name inside the folder checked first: as safe as it
                if parts_of(path)[0] == self.meta_dir.name:
                    raise UnsafePathError(f"refusing path {path!r}: it lies in {self.meta_dir.name}/", path=path)
        except UnsafePathError as exc:
            return str(exc)
        except (AttributeError, TypeError):
            return "malformed file list"
        return None

    def _recover(self) -> None:
        """One pass over every series (streamed from the database): refuse unsafe records, finish
        the renames a kill -9 cut off, and record as failed the series whose files are gone."""
        assert self.db is not None
        with _IntoDB(self) as target:
            self._recover_rows(target)
        for line in self.refused:
            _log.warning("%s", line)
        for child in self.tmp_dir.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        # atomic_write temps of a killed run
        for folder in (self.out_dir, self.out_dir / "licenses", self.out_dir / "metadata"):
            for child in folder.glob(".*.tmp"):
                if _ATOMIC_TMP.match(child.name) and child.is_file():
                    child.unlink(missing_ok=True)

    def _recover_rows(self, target: _IntoDB) -> None:
        assert self.db is not None
        # prunes interrupted between their record and the move (the journal's lines replayed now
        # are in the database's list too)
        for uid, path, trash in self.db.pending_trash():
            try:
                self._to_trash(path, trash)
            except UnsafePathError as exc:
                self.refused.append(f"{self.journal_path.name}: {exc}; not moved")
            self.db.trash_done(uid)
        self._pending_trash.clear()
        checked: list[tuple[str, dict[str, Any]]] = []
        for uid, origin, columns, vouched, record in self.db.rows_for_recovery():
            # A row vouched for when it was written (and unchanged since) passed every check
            # below then: only its files are looked at again (a kill -9 or a hand may have taken
            # them); it is checked in full only when they are not all there.
            if vouched is not None and self._vouched_intact(*vouched):
                continue
            rec = json_record(record())
            why = self._unsafe(rec) if rec is not None else "the record is not a JSON object"
            if why is None and rec is not None and rec.get("SeriesInstanceUID") != uid:
                why = "the record names another series"
            if why is not None:
                self.refused.append(f"{origin}: series {uid}: {why}; not used (it will be fetched again)")
                target.delete(uid)
                continue
            assert rec is not None
            if columns != StateDB.columns_of(rec):   # a hand-edited row: its columns follow its record
                target.put(uid, rec, origin)
            if rec.get("status") == "complete":
                checked.append((uid, rec))
                if vouched is None and (plain := self._checks_of(rec)) is not None:
                    target.vouch(uid, plain)   # undone by put() should its files be gone
            if len(checked) >= 256:
                self._recover_batch(checked, target)
                checked = []
        self._recover_batch(checked, target)

    def _vouched_intact(self, path: str, checks: list[tuple[str, int]]) -> bool:
        """``_intact`` of a vouched series in ``path``, from its plain file names: each is stat'ed
        relative to a descriptor of the folder, reached as ``final_dir`` does (a link on the way
        raises ``UnsafePathError``, before any write). A path that leaves DIR (a forged row) is
        left to the full check, which refuses the record."""
        try:
            parts_of(path)
        except UnsafePathError:
            return False
        try:
            with open_dir(self.out_dir, path) as folder:   # one open per component, no link followed
                for name, size in checks:
                    if os.stat(name, dir_fd=folder).st_size != size:
                        return False
        except OSError:
            return False
        return True

    def _checks_of(self, rec: dict[str, Any]) -> list[tuple[str, int]] | None:
        """The (name, size) of every file ``_intact`` checks of ``rec`` when each is one plain
        name inside its folder and ``rec`` passes ``_unsafe`` (what the database may vouch for),
        else None."""
        folder = rec.get("path")
        if not isinstance(folder, str) or self._unsafe(rec) is not None:
            return None
        checks = []
        for f in [*rec.get("files", []), *(rec.get("annotations") or [])]:
            path, size = f.get("path") if isinstance(f, dict) else None, f.get("size") if isinstance(f, dict) else None
            if not isinstance(path, str) or not _whole(size) or not _plain_child(folder, path) or "\n" in path:
                return None
            checks.append((path[len(folder) + 1:], size))
        return checks if rec.get("files") else None

    def _recover_batch(self, batch: list[tuple[str, dict[str, Any]]], target: _IntoDB) -> None:
        for uid, rec in batch:
            self.final_dir(rec)  # a link on the way to a recorded series stops here, before any write
            if self._intact(rec):
                continue
            staging = self.staging_dir(uid)
            if staging.is_dir() and self._intact(rec, root=staging):
                self._move_into_place(staging, self.final_dir(rec))  # an old copy: removed with tmp/ below
                self.recovered += 1
            else:
                self.lost += 1
                target.put(uid, dict(rec, status="failed",
                                     error="files missing after an interrupted run; will be fetched again"),
                           self.origin(uid))

    # ------------------------------------------------------------ paths
    def final_dir(self, rec: dict[str, Any]) -> Path:
        """The series folder of ``rec``. Paths come from our own sanitiser, or from a harvest.json
        someone sent: raises ``UnsafePathError`` for anything not strictly inside DIR, or with a
        link on the way."""
        return inside(self.out_dir, rec["path"])

    def _move_into_place(self, staging: Path, final: Path) -> Path | None:
        """Rename ``staging`` to ``final`` (from ``final_dir``) relative to a descriptor of its
        parent, reached without following links; an old folder under that name goes aside first
        (returned). Raises ``UnsafePathError`` or ``OSError``."""
        with open_dir(self.out_dir, final.parent.relative_to(self.out_dir), create=True) as parent:
            aside = self._move_aside(final)
            os.rename(staging, final.name, dst_dir_fd=parent)
            try:
                os.fsync(parent)
            except OSError:
                pass  # as _fsync_dir: some file systems cannot fsync a folder; the rename stands
        return aside

    def staging_dir(self, uid: str) -> Path:
        return self.tmp_dir / f"{series_key(uid)}.staging"

    def partial_path(self, uid: str) -> Path:
        return self.tmp_dir / f"{series_key(uid)}.zip.partial"

    def _intact(self, rec: dict[str, Any], root: Path | None = None) -> bool:
        """Every recorded file (annotation files included) is there with its recorded size (MD5s
        are for ``verify``)."""
        base = self.out_dir / rec.get("path", "\x00") if root is None else root
        prefix = rec.get("path", "") + "/"
        try:
            # Relative to a descriptor of the folder: one path walk for the folder, not one per
            # file (a no-op resume stats every file recorded).
            folder = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        except (OSError, TypeError, ValueError):
            return False
        try:
            for f in [*rec.get("files", []), *(rec.get("annotations") or [])]:
                rel = f["path"][len(prefix):] if f["path"].startswith(prefix) else f["path"]
                if os.stat(rel, dir_fd=folder).st_size != f["size"]:
                    return False
        except (OSError, KeyError, TypeError, ValueError):
            return False
        finally:
            os.close(folder)
        return bool(rec.get("files"))

    def _move_aside(self, final: Path) -> Path | None:
        """A folder under a final name that the state does not vouch for goes to tmp/ (deleted
        after the new one is in place, or by the next run's clean-up)."""
        if final.exists() or final.is_symlink():
            self._check_one_series(final)
            aside = self.tmp_dir / f"replaced-{series_key(str(final))}-{os.getpid()}"
            os.rename(final, aside)
            return aside
        return None

    def _check_one_series(self, folder: Path) -> None:
        """Raises ``UnsafePathError`` when ``folder`` holds a folder: a series folder holds only
        files (its DICOM and annotation files), so this is a collection's, a patient's or a
        study's that a forged or broken record names, and replacing or pruning it would take the
        other series in it along."""
        try:
            with os.scandir(folder) as entries:
                inner = next((e.name for e in entries if e.is_dir(follow_symlinks=False)), None)
        except NotADirectoryError:
            return
        if inner is not None:
            shown = folder.relative_to(self.out_dir) if folder.is_relative_to(self.out_dir) else folder
            raise UnsafePathError(f"refusing to replace or move {str(shown)[:200]!r}: it holds the folder "
                                  f"{inner[:100]!r}, so it is not one series' folder (a record names it)",
                                  path=str(shown))

    # ------------------------------------------------------------ queries (index lookups)
    def complete(self, uid: str) -> dict[str, Any] | None:
        rec = self.records.get(uid)
        return rec if rec is not None and rec.get("status") == "complete" else None

    def completed_bytes(self, uid: str) -> int | None:
        """The bytes of ``uid`` when it is complete, else None: ``complete`` without parsing the
        record (the engine asks it of every series of a plan)."""
        if self.db is None or self.records.overlay or self.records.hidden:
            rec = self.complete(uid)
            return int(rec.get("bytes") or 0) if rec is not None else None
        return self.db.completed_bytes(uid)

    def complete_uids(self) -> Iterator[str]:
        """The uid of every complete series, in the order first recorded, streamed (from the
        database's columns: no record parsed, none held)."""
        if self.db is None or self.records.overlay or self.records.hidden:
            yield from (uid for uid, r in self.records.items() if r.get("status") == "complete")
            return
        for uid, status, *_ in self.db.verify_rows():
            if status == "complete":
                yield uid

    def taken_paths(self) -> dict[str, str]:
        """uid -> folder of every complete series (one pair per series, never per file)."""
        if self.db is None or self.records.overlay:
            return {uid: r["path"] for uid, r in self.records.items() if r.get("status") == "complete" and r.get("path")}
        return self.db.complete_paths()

    def assign_paths(self, items: Iterable[tuple[str, Mapping[str, Any]]], layout: str) -> dict[str, str]:
        """``layout.assign_paths`` with the folders of every complete series kept
        (``taken_paths``), the folders in use held in a scratch database in ``.harvester/``
        (``FolderIndex``), not in memory. Raises ``DiskFullError``/``OutputNotWritableError``."""
        with FolderIndex(self.meta_dir / "folders.db") as folders:
            return assign_paths(items, layout, taken=self.taken_paths(), folders=folders)

    @contextlib.contextmanager
    def path_assigner(self, layout: str) -> Iterator[Callable[[Iterable[tuple[str, Mapping[str, Any]]]],
                                                              dict[str, str]]]:
        """``assign_paths`` a batch at a time: the folders of every complete series and of each
        batch assigned so far held in one scratch database (``FolderIndex``) until the block
        ends. Raises ``DiskFullError``/``OutputNotWritableError``."""
        with FolderIndex(self.meta_dir / "folders.db") as folders:
            taken = self.taken_paths()
            for folder in taken.values():
                folders.add(folder)

            def assign(items: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, str]:
                return assign_paths(items, layout, taken=taken, folders=folders, seeded=True)
            yield assign

    def events(self) -> Iterator[dict[str, Any]]:
        """The run events, oldest first (``run``, ``progress``, ``finish``, and one per series
        committed or failed: uid, status, bytes, attempts): the database's, then (``read()`` of a
        harvest an earlier version left) those of an old journal's lines past what the database
        holds, streamed. Only the last of those may be torn; it is left out."""
        if self.db is not None:
            yield from self.db.events()
        if self.db is not None and not self.db.readonly:
            return      # open() read the journal's tail into the database
        try:
            fh = open(self.journal_path, "rb", opener=open_nofollow)
        except OSError:
            return
        with fh:
            fh.seek(self._journal_from[0])
            for line in fh:
                try:
                    event = json.loads(line)
                except (ValueError, RecursionError):
                    self.torn_lines += line.strip() != b""
                    continue
                if not isinstance(event, dict):
                    self.torn_lines += 1
                elif (ev := _event_of_line(event)) is not None:
                    yield ev

    # ------------------------------------------------------------ writes (call from a worker thread)
    def _db(self) -> StateDB:
        if self.db is None:
            raise HarvesterError("state is closed")
        return self.db

    def commit(self, rec: dict[str, Any], staging: Path) -> None:
        """Record the verified series and its run event in the database (one durable
        transaction), then move its staging folder to its final path."""
        final = self.final_dir(rec)   # refused before anything is recorded
        uid = rec["SeriesInstanceUID"]
        db = self._db()
        before = self.records.get(uid)
        checks = self._checks_of(rec)
        with db.transaction():   # the record and its event, or neither
            db.put(uid, rec, "the state database", replace_folder=True)
            if checks is not None:   # the next open stats its files, nothing more
                db.vouch(uid, checks)
            db.add_event("commit", now_iso(), _event_of(rec))
        try:
            aside = self._move_into_place(staging, final)
        except (OSError, UnsafePathError) as exc:
            # Not in place: the database must not vouch for it in this run's exports. (Should
            # this write fail too, the next open finds the staging folder and finishes the rename.)
            with contextlib.suppress(HarvesterError):
                db.delete(uid) if before is None else db.put(uid, before, "the state database", replace_folder=True)
            if isinstance(exc, UnsafePathError):
                raise
            raise classify_os_error(exc, rec["path"]) from None
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def restore(self, rec: dict[str, Any]) -> None:
        """Record a series complete whose files are already in place (mended by ``verify --repair``,
        or committed by a cluster's shard): its record and a commit run event, in one transaction."""
        db = self._db()
        with db.transaction():
            db.put(rec["SeriesInstanceUID"], rec, "the state database", replace_folder=True)
            db.add_event("commit", now_iso(), _event_of(rec))

    def fail(self, rec: dict[str, Any]) -> None:
        db = self._db()
        with db.transaction():
            if db.status(rec["SeriesInstanceUID"]) != "complete":  # never hides a verified copy
                db.put(rec["SeriesInstanceUID"], rec, "the state database")
            db.add_event("failed", now_iso(), _event_of(rec))

    def mark_unavailable(self, missing: Iterable[tuple[str, str, str]]) -> None:
        """Record series the archive did not give, as ``(uid, origin, reason)``: one database
        transaction for all of them. A complete record is kept as it is (its files are verified;
        the archive withdrawing the series later does not undo that)."""
        recs = [{"SeriesInstanceUID": uid, "Collection": "", "PatientID": "", "StudyInstanceUID": "",
                 "Modality": "", "status": "unavailable", "path": None, "bytes": 0, "attempts": 0,
                 "error": reason, "origin": origin, "checked": now_iso(), "files": []}
                for uid, origin, reason in missing]
        if not recs:
            return
        db = self._db()
        with db.transaction():
            for rec in recs:
                if db.status(rec["SeriesInstanceUID"]) != "complete":
                    db.put(rec["SeriesInstanceUID"], rec, "the state database")

    def forget(self, uid: str, path: str, trash: str) -> None:
        """Drop a series from the manifest and move its folder to ``trash`` (relative to DIR).

        Recorded first (with the move still to make), so a kill between the two steps is
        finished by the next ``open()``.
        """
        db = self._db()
        db.forget(uid, path, trash)
        self._to_trash(path, trash)
        db.trash_done(uid)

    def _to_trash(self, path: str, trash: str) -> None:
        """Raises ``UnsafePathError`` when either path is not strictly inside DIR, when ``path``
        lies in ``.harvester/``, or ``trash`` does but not in ``.harvester/trash/``: a forged
        journal line must not move the harvester's own files, nor a series into ``tmp/`` (emptied
        on the next open)."""
        src_parts, dst_parts = parts_of(path), parts_of(trash)
        if src_parts[0] == self.meta_dir.name or (dst_parts[0] == self.meta_dir.name and dst_parts[1:2] != ("trash",)):
            raise UnsafePathError(f"refusing to move {path[:200]!r} to {trash[:200]!r}: only a series folder "
                                  f"goes to the trash", path=path)
        src, dst = inside(self.out_dir, path), inside(self.out_dir, trash)
        if src.exists() and not dst.exists():
            if not src.is_symlink():
                self._check_one_series(src)
            try:
                with open_dir(self.out_dir, dst.parent.relative_to(self.out_dir), create=True) as parent:
                    os.rename(src, dst.name, dst_dir_fd=parent)
            except OSError as exc:
                raise classify_os_error(exc, path) from None

    def log_event(self, event: dict[str, Any]) -> None:
        """Anything else worth keeping (run start/finish, progress, retries): recorded in the
        database, without an fsync of its own (the next commit's covers it; a kill -9 loses none)."""
        t = now_iso()
        body = {k: v for k, v in event.items() if k not in ("event", "t")}
        self._db().add_event(str(event.get("event") or ""), t, body, durable=False)

    # ------------------------------------------------------------ manifests (exports)
    def write_manifest(self, header: dict[str, Any], order: Iterable[str] | None = None, *,
                       final: bool = True) -> dict[str, Any]:
        """Write harvest.json and metadata.csv from the database, streamed (temp file, fsync,
        rename; memory holds one record at a time); returns the totals. Series in ``order``
        first, then every other one in the order first recorded.

        ``final=False`` is a checkpoint during a run: beyond ``CHECKPOINT_EXPORT_MAX_SERIES``
        series the exports are left for the end of the run (rewriting them whole every 30 s
        would cost more than the harvest); the database holds every commit either way."""
        order = list(order) if order is not None else []
        totals = self.db.totals() if self.db is not None and not self.records.overlay else totals_of(
            list(self.records.values()))
        mark = None
        if final or totals["series"] <= CHECKPOINT_EXPORT_MAX_SERIES:
            mark = self._export(header, totals, order)
        if self.db is not None and not self.db.readonly:
            with self.db.transaction():   # one fsync for both
                self.db.set_meta("header", {"schema": SCHEMA, **header})
                if mark is not None:
                    self.db.set_meta("export", mark)
        return totals

    def _export(self, header: dict[str, Any], totals: dict[str, int], order: list[str]) -> dict[str, Any] | None:
        """harvest.json and metadata.csv. When the series rows have not changed since the last
        export (the database's ``generation``), nor the order asked for, the layout, or either
        file since it was written (inode, size and time, recorded with it), the series part of
        harvest.json is copied from the file as it stands after a new header, and metadata.csv is
        kept: a run with nothing to do does not encode every record again (8 s at 1 M files).
        Returns the mark to record with the header (None when the state cannot say)."""
        db = self.db
        usable = db is not None and not db.readonly and not self.records.overlay and not self.records.hidden
        generation = db.generation() if usable and db is not None else None
        layout = header.get("layout")
        csv_path = (self.out_dir / "metadata" if layout in METADATA_IN_SUBFOLDER else self.out_dir) / "metadata.csv"
        mark = {"generation": generation, "order": hashlib.sha1("\0".join(order).encode("utf-8", "replace")).hexdigest(),
                "csv": str(csv_path.relative_to(self.out_dir))}
        kept = db.get_meta("export") if usable and db is not None and generation is not None else None
        series_at = None
        if (isinstance(kept, dict) and all(kept.get(k) == v for k, v in mark.items())
                and kept.get("json") == _stamp(self.manifest_path) and kept.get("csv_stamp") == _stamp(csv_path)
                and _whole(kept.get("series_at"))):
            series_at = reuse_manifest_series(self.manifest_path, header, totals, kept["series_at"])
        if series_at is None:
            # (each file is replaced, a new inode: a kill on the way leaves no stamp matching)
            series_at = export_manifest(self.manifest_path, header, totals, self._ordered(order))
            self._write_metadata_csv(self._ordered(order), layout)
        if generation is None:
            return None
        return {**mark, "series_at": series_at, "json": _stamp(self.manifest_path), "csv_stamp": _stamp(csv_path)}

    def _ordered(self, order: list[str]) -> Iterator[dict[str, Any]]:
        wanted = set(order)
        for uid in order:
            rec = self.records.get(uid)
            if rec is not None:
                yield rec
        for uid, rec in self.records.items():
            if uid not in wanted:
                yield rec

    def _write_metadata_csv(self, recs: Iterable[dict[str, Any]], layout: Any = None) -> None:
        """metadata.csv as the Java Data Retriever writes it (see ``metadata_csv_row``), or
        ``metadata/metadata.csv`` for the layouts of TCIA's 2026 Retriever."""
        def lines() -> Iterator[bytes]:
            yield (",".join(METADATA_COLUMNS) + "\r\n").encode("utf-8")
            for r in recs:
                if r.get("status") == "complete":
                    yield (",".join(metadata_csv_row(r)) + "\r\n").encode("utf-8")
        if layout in METADATA_IN_SUBFOLDER:
            folder = self.out_dir / "metadata"
            try:
                folder.mkdir(exist_ok=True)
            except OSError as exc:
                raise classify_os_error(exc, "metadata/") from None
        else:
            folder = self.out_dir
        atomic_write_chunks(folder / "metadata.csv", lines())


#: A checkpoint during a run rewrites harvest.json only up to this many series (about 34 MB at 50
#: files a series); beyond it harvest.json is written at the end of the run and by ``export``.
CHECKPOINT_EXPORT_MAX_SERIES = 2000


def _is_harvest(out_dir: Path) -> None:
    """Raises ``UsageError`` unless ``out_dir`` holds a harvest (its state or its harvest.json)."""
    if not ((out_dir / ".harvester").is_dir() or (out_dir / "harvest.json").exists()):
        raise UsageError(f"{out_dir} holds no harvest (no .harvester/ and no harvest.json)",
                         hint="export takes the output directory of a harvest")


def export_jsonl(out_dir: Path, target: Path | str) -> int:
    """Every series record of ``out_dir``, one JSON object a line, streamed from the state
    database (reading only: no lock, nothing written in DIR) to ``target`` (``-`` for stdout; see
    ``write_output``). The form beyond harvest.json's size (see docs): memory holds one record.
    Returns how many records were written. Raises ``UsageError`` when DIR holds no harvest."""
    _is_harvest(out_dir)
    state = HarvestState(out_dir)
    state.read()
    count = 0

    def lines() -> Iterator[bytes]:
        nonlocal count
        for rec in state.records.values():
            count += 1
            yield (json.dumps(rec, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")
    try:
        write_output_chunks(target, lines(), option="--jsonl")
    finally:
        state.close()
    return count


def rewrite_exports(out_dir: Path) -> dict[str, int]:
    """Write ``out_dir``'s harvest.json and metadata.csv again from the state database (opened,
    locked and recovered as a run does); returns the totals. Raises ``UsageError`` when DIR holds
    no harvest, and what ``HarvestState.open`` raises."""
    _is_harvest(out_dir)
    state = HarvestState(out_dir)
    state.open()
    try:
        header = {k: v for k, v in state.header.items() if k != "schema"}
        return state.write_manifest(header)
    finally:
        state.close()


def _event_of(rec: dict[str, Any]) -> dict[str, Any]:
    """What a run event keeps of a series record (the report's time series need no more)."""
    return {"uid": rec.get("SeriesInstanceUID"), "status": rec.get("status"), "bytes": rec.get("bytes"),
            "attempts": rec.get("attempts")}


def _event_of_line(line: dict[str, Any]) -> dict[str, Any] | None:
    """An old journal line as the database records its run event (``StateDB.events``' form), or
    None for a line that is no run event (``unavailable``, ``forget``) or has no time. Hostile:
    only a commit's or failure's series fields the readers use are kept, as they are."""
    kind, t = line.get("event"), line.get("t")
    if not isinstance(kind, str) or not isinstance(t, str) or kind in ("unavailable", "forget"):
        return None
    if kind in ("commit", "failed"):
        rec = line.get("series")
        return {"event": kind, "t": t, **_event_of(rec)} if isinstance(rec, dict) else None
    return dict(line)


def _manifest_head(header: dict[str, Any], totals: dict[str, int]) -> bytes:
    """harvest.json up to its series list (the ``,`` before ``"series"`` excluded)."""
    head = json.dumps({"schema": SCHEMA, **header, "totals": totals}, indent=1, ensure_ascii=False)
    return head[:-2].encode("utf-8")   # head ends with "\n}": the series list goes before that brace


_SERIES_KEY = b',\n "series": ['


def _stamp(path: Path) -> list[int] | None:
    """What says a file is still the one written: inode, size, modification time (ns)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns] if not os.path.islink(path) else None


def reuse_manifest_series(path: Path, header: dict[str, Any], totals: dict[str, int], series_at: int) -> int | None:
    """Write harvest.json again with a new header and the series list of the file as it stands
    (from byte ``series_at``, where ``export_manifest`` said it begins), copied, not encoded;
    returns where the list begins now, or None (nothing written) when the file is not that."""
    try:
        fh = open(path, "rb", opener=open_nofollow)
    except OSError:
        return None
    with fh:
        fh.seek(series_at)
        if fh.read(len(_SERIES_KEY)) != _SERIES_KEY:
            return None
        head = _manifest_head(header, totals)

        def chunks() -> Iterator[bytes]:
            yield head
            fh.seek(series_at)
            while chunk := fh.read(1 << 20):
                yield chunk
        atomic_write_chunks(path, chunks())
    return len(head)


def export_manifest(path: Path, header: dict[str, Any], totals: dict[str, int],
                    recs: Iterable[dict[str, Any]]) -> int:
    """Write harvest.json from ``recs`` streamed, byte for byte what
    ``json.dumps({"schema": SCHEMA, **header, "totals": totals, "series": [...]}, indent=1,
    ensure_ascii=False)`` gives (the format is documented and pinned by tests); returns the byte
    offset where the series list begins (``reuse_manifest_series``)."""
    head = _manifest_head(header, totals)

    def chunks() -> Iterator[bytes]:
        yield head + _SERIES_KEY
        first = True
        for rec in recs:
            text = json.dumps(rec, indent=1, ensure_ascii=False).replace("\n", "\n  ")
            yield (("\n  " if first else ",\n  ") + text).encode("utf-8")
            first = False
        yield ("]\n}" if first else "\n ]\n}").encode("utf-8")
    atomic_write_chunks(path, chunks())
    return len(head)


class _Target:
    """Where ``_import`` puts what it reads: the database (``open``) or an overlay in memory
    (``read``, which writes nothing)."""

    def status(self, uid: str) -> str | None:
        raise NotImplementedError

    def put(self, uid: str, rec: dict[str, Any], origin: str) -> None:
        raise NotImplementedError

    def delete(self, uid: str) -> None:
        raise NotImplementedError

    def forget(self, uid: str, path: str | None, trash: str | None) -> None:
        self.delete(uid)

    def clear(self) -> None:
        raise NotImplementedError

    def event(self, event: dict[str, Any]) -> None:
        """A run event of an old journal (``StateDB.events``' form), migrated."""

    def mark_journal(self, offset: int, line: int) -> None:
        """The old journal is read up to ``offset`` (``line`` lines)."""

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        """Everything put so far is written, or (on an exception) none of it."""


class _IntoDB(_Target):
    def __init__(self, state: HarvestState) -> None:
        assert state.db is not None
        self.state, self.db = state, state.db
        self._txn: contextlib.AbstractContextManager[Any] | None = None

    def _begin(self) -> None:
        if self._txn is None:
            self._txn = self.db.transaction()
            self._txn.__enter__()

    def status(self, uid: str) -> str | None:
        return self.db.status(uid)

    def put(self, uid: str, rec: dict[str, Any], origin: str) -> None:
        self._begin()
        try:
            self.db.put(uid, rec, origin)
        except FolderTaken as taken:
            self.state.refused.append(f"{origin}: series {uid}: its folder {str(rec.get('path'))[:200]!r} is "
                                      f"series {taken.uid}'s; not used (it will be fetched again)")

    def delete(self, uid: str) -> None:
        self._begin()
        self.db.delete(uid)

    def forget(self, uid: str, path: str | None, trash: str | None) -> None:
        self._begin()
        self.db.forget(uid, path, trash)

    def vouch(self, uid: str, checks: list[tuple[str, int]]) -> None:
        self._begin()
        self.db.vouch(uid, checks)

    def clear(self) -> None:
        self._begin()
        self.db.clear_series()

    def event(self, event: dict[str, Any]) -> None:
        self._begin()
        body = {k: v for k, v in event.items() if k not in ("event", "t")}
        self.db.add_event(str(event["event"]), str(event["t"]), body)

    def mark_journal(self, offset: int, line: int) -> None:
        self._begin()    # with what was read, in one transaction: never read twice, never skipped
        self.db.set_meta("journal", {"offset": offset, "line": line})

    def mark_imported(self) -> None:
        if self.db.get_meta("imported") is True and self._txn is None:
            return                          # nothing read in: a no-op open writes nothing
        self._begin()
        self.db.set_meta("imported", True)   # harvest.json is never read into the database again

    def __exit__(self, *exc: Any) -> None:
        # one transaction for everything put: committed, or rolled back by the exception
        if self._txn is not None:
            txn, self._txn = self._txn, None
            txn.__exit__(*exc)


class _IntoOverlay(_Target):
    def __init__(self, state: HarvestState) -> None:
        self.state, self.records = state, state.records

    def status(self, uid: str) -> str | None:
        rec = self.records.get(uid)
        return rec.get("status") if rec is not None else None

    def put(self, uid: str, rec: dict[str, Any], origin: str) -> None:
        self.records.overlay[uid] = rec
        self.state._overlay_origin[uid] = origin

    def delete(self, uid: str) -> None:
        self.records.overlay[uid] = None

    def clear(self) -> None:
        self.records.overlay.clear()
        self.state._overlay_origin.clear()

    def hide(self, uid: str) -> None:
        self.records.hidden.add(uid)
        self.records.overlay.pop(uid, None)


# A value that would end or split an unquoted CSV field (a hostile server's description, a name
# with a comma): each such character becomes a space, so every row keeps its 17 columns.
_CSV_BREAKERS = re.compile(r'[,"\x00-\x1f\x7f\u2028\u2029\x85]')


def _csv_value(value: Any) -> str:
    """One unquoted metadata.csv field; ``null`` for an absent value, as the Retriever writes it."""
    if value is None or value == "":
        return "null"
    return _CSV_BREAKERS.sub(" ", str(value))


def retriever_file_size(size: Any) -> str:
    """File Size as the Data Retriever shows it: decimal units, two decimals, half up
    (``3.62 MB``, ``163.31 KB``, ``6.10 MB``; real HNSCC rows show 1 MB = 1,000,000 bytes).
    Java's ``%.2f`` rounds half up, so 1,125,000 bytes is ``1.13 MB`` there (Python's float
    formatting rounds half to even: 1.12); exact integer arithmetic agrees with Java."""
    try:
        n = max(0, int(size or 0))
    except (TypeError, ValueError, OverflowError):
        n = 0
    for unit, scale in (("TB", 10 ** 12), ("GB", 10 ** 9), ("MB", 10 ** 6), ("KB", 10 ** 3)):
        if n >= scale:
            break
    else:
        unit, scale = "B", 1
    hundredths = (n * 100 + scale // 2) // scale      # integers: exact, half up, any size
    return f"{hundredths // 100}.{hundredths % 100:02d} {unit}"


def retriever_timestamp(value: Any) -> str | None:
    """A record's UTC ``completed`` time as the Retriever's Download Timestamp: local time, no
    zone, milliseconds (``2021-09-30T21:39:12.665``); None when unreadable."""
    try:
        when = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        return when.astimezone().replace(tzinfo=None).isoformat(timespec="milliseconds")
    except (ValueError, OverflowError, OSError):   # a hostile harvest.json: year 9999 at UTC+14...
        return None


def metadata_csv_row(rec: dict[str, Any]) -> list[str]:
    """The 17 metadata.csv fields of a complete record, value for value as the Java Data Retriever
    writes them (descriptions and Manufacturer reduced to the server's character set, ``NA`` when
    empty; Study Date ``MM-DD-YYYY``; absent values ``null``), except the Data Description URI,
    which is written whole (the Retriever's server strips its ``:`` and ``/``)."""
    row = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
    study = rec.get("study") if isinstance(rec.get("study"), dict) else {}
    sop_class = rec.get("sop_class_uid") or ""
    files = rec.get("files") if isinstance(rec.get("files"), list) else []
    values = [
        rec.get("SeriesInstanceUID"), rec.get("Collection"), row.get("ThirdPartyAnalysis"),
        row.get("DataDescriptionURI"), rec.get("PatientID"), rec.get("StudyInstanceUID"),
        retriever_text(study.get("StudyDescription") or row.get("StudyDesc")),
        retriever_date(study.get("StudyDate") or row.get("StudyDate")),
        retriever_text(row.get("SeriesDescription")), retriever_text(row.get("Manufacturer")),
        rec.get("Modality"), _sop_class_name(sop_class), sop_class, len(files),
        retriever_file_size(rec.get("bytes")), "./" + str(rec.get("path") or ""),
        retriever_timestamp(rec.get("completed")),
    ]
    return [_csv_value(v) for v in values]


def _sop_class_name(uid: str) -> str:
    """The name pydicom gives ``uid`` (``pydicom.uid.UID(uid).name``: its UID dictionary's, else
    the UID itself)."""
    if not uid:
        return ""
    try:
        entry = _uid_names().get(uid)
        return str(entry[0]) if entry else uid
    except Exception:  # noqa: BLE001 - a name is a nicety, never a failure
        return uid


@functools.cache
def _uid_names() -> Mapping[str, Any]:
    """pydicom's UID dictionary (``UID.name`` reads it): its module alone, a dict literal of a
    millisecond, when this pydicom has it where pydicom 2.4 and 3 keep it; else through
    ``pydicom.uid``. Not ``import pydicom.uid``: that runs all of pydicom's ``__init__`` (a third
    of a CPU-second) once at the end of every run, only to name the SOP classes in metadata.csv."""
    try:
        spec = importlib.util.find_spec("pydicom")
        folder = (spec.submodule_search_locations or [None])[0] if spec else None
        loaded = importlib.util.spec_from_file_location("harvester._pydicom_uid_dict",
                                                        os.path.join(folder, "_uid_dict.py")) if folder else None
        if loaded is not None and loaded.loader is not None:
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
            names = module.UID_dictionary
            if isinstance(names, dict):
                return names
    except Exception:  # noqa: BLE001 - pydicom moved or reshaped it: ask pydicom itself
        pass
    from pydicom.uid import UID_dictionary

    return UID_dictionary
