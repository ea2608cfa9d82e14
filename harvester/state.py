"""What is done: an append-only journal plus ``harvest.json`` and ``metadata.csv``.

Files on disk are a database (rclone's rule): nothing half-written ever sits under a final name.

* ``DIR/.harvester/journal.jsonl`` is append-only and fsynced, with group commit: concurrent
  appends each write their line under a lock, then one fsync covers every line written before it
  started, and no append returns before its line is durable. A series is committed by
  (1) writing and verifying it in ``DIR/.harvester/tmp/<key>.staging``, (2) appending a
  ``commit`` line that holds its full record, (3) renaming the staging folder to its final
  path (atomic on one filesystem). After kill -9 at any point, ``open()`` replays the journal:
  a commit whose final folder is intact is complete; one whose staging folder survived is
  finished (step 3 redone); anything else is simply fetched again. Then ``tmp/`` is emptied.
* ``DIR/harvest.json`` is rewritten atomically (temp file, fsync, rename) from the records, so
  it only ever lists verified series. ``metadata.csv`` (the Data Retriever's columns) likewise.
* ``DIR/.harvester/lock`` holds an flock while a run uses DIR, so two runs cannot interleave.

Raises ``OutputNotWritableError``/``DiskFullError`` (fatal) when DIR cannot be written, and
``FatalError`` when another run holds the lock.
"""
from __future__ import annotations

import csv
import datetime as dt
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from harvester.errors import DiskFullError, FatalError, HarvesterError, OutputNotWritableError, classify_os_error

SCHEMA = "harvester/1"
METADATA_COLUMNS = [
    "Series UID", "Collection", "3rd Party Analysis", "Data Description URI", "Subject ID", "Study UID",
    "Study Description", "Study Date", "Series Description", "Manufacturer", "Modality", "SOP Class Name",
    "SOP Class UID", "Number of Images", "File Size", "File Location", "Download Timestamp",
]
_ATOMIC_TMP = re.compile(r"^\..+\.[0-9]+\.tmp$")   # atomic_write's temp names: .<name>.<pid>.tmp


def now_iso() -> str:
    """UTC now as ISO-8601 with milliseconds (the report buckets short runs by these)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def series_key(uid: str) -> str:
    """A short, filesystem-safe key for temp names (UIDs from a server are not trusted)."""
    return hashlib.sha1(uid.encode("utf-8", "replace")).hexdigest()[:20]


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temp file and rename; readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
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


def write_output(target: Path | str, data: bytes, *, option: str) -> None:
    """Write a file the user named (an export, a report given with ``option``): ``-`` is stdout;
    a symlink or a non-regular file (``/dev/stdout``, a FIFO) is written through, as the shell's
    ``>`` does, and never replaced; a regular file or a new name is written by ``atomic_write``.

    Raises ``DiskFullError``, or ``OutputNotWritableError`` whose hint names ``option``.
    """
    hint = f"choose a file you can write to with {option} FILE, or {option} - for stdout"
    if str(target) == "-":
        try:
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
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
                fh.write(data)
            return
        if not path.parent.is_dir():
            raise OutputNotWritableError(f"cannot write {path}: {path.parent} is not a directory", hint=hint)
        atomic_write(path, data)
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
    return {
        "series": len(recs),
        "complete": len(done),
        "failed": len(recs) - len(done),
        "files": sum(len(r.get("files", [])) for r in done),
        "bytes": sum(int(r.get("bytes") or 0) for r in done),
    }


class _SyncGroup:
    """The journal lines written since the last fsync started: one fsync makes all of them durable."""

    __slots__ = ("done", "error", "start")

    def __init__(self, start: int) -> None:
        self.start = start                  # journal offset of the group's first line
        self.done = False
        self.error: OSError | None = None   # set when the group's lines are not durable


class HarvestState:
    """The on-disk state of one output directory. Thread-safe for the calls the engine makes."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.meta_dir = out_dir / ".harvester"
        self.tmp_dir = self.meta_dir / "tmp"
        self.journal_path = self.meta_dir / "journal.jsonl"
        self.manifest_path = out_dir / "harvest.json"
        self.records: dict[str, dict[str, Any]] = {}
        self.header: dict[str, Any] = {}
        self.recovered = 0      # commits finished during recovery
        self.lost = 0           # commits whose files were gone (will be fetched again)
        self._lock = threading.Lock()
        self._synced = threading.Condition(self._lock)  # notified whenever an fsync ends
        self._syncing = False                           # an fsync is running (outside the lock)
        self._group = _SyncGroup(0)                     # lines waiting for the next fsync
        self._pending_trash: dict[str, tuple[str, str]] = {}  # uid -> (path, trash) of prunes
        self._journal: io.RawIOBase | None = None
        self._lockfile: int | None = None

    # ------------------------------------------------------------ open / recover
    def open(self) -> None:
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
        self._load()
        self._recover()
        try:
            # Unbuffered: an append that fails leaves nothing behind in a buffer for close() to
            # flush (and fail on) later; _append cuts off whatever part of it reached the file.
            self._journal = open(self.journal_path, "ab", buffering=0)
            self._group = _SyncGroup(self._journal.tell())
            # A kill -9 mid-append leaves a line without its newline; end it, or the next event
            # would be glued to the fragment and lost on the next replay.
            if self._journal.tell() > 0:
                with open(self.journal_path, "rb") as fh:
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        self._journal.write(b"\n")
                        self._journal.flush()
        except OSError as exc:
            raise classify_os_error(exc, str(self.journal_path)) from None

    def close(self) -> None:
        with self._lock:
            while self._syncing:  # never close the descriptor under a running fsync
                self._synced.wait()
            if self._journal is not None:
                self._journal.close()
                self._journal = None
        if self._lockfile is not None:
            os.close(self._lockfile)
            self._lockfile = None

    def _take_lock(self) -> None:
        fd = os.open(self.meta_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            # Fatal, not a usage error (exit 3): the command was right, only the moment was not.
            raise FatalError(f"another harvester is running in {self.out_dir}",
                             hint="wait for it to finish (or stop it), then run the same command again; "
                                  "or use another output directory") from None
        self._lockfile = fd

    def read(self) -> None:
        """Fill ``records`` and ``header`` from harvest.json and the journal, as ``open()`` would
        before recovery, without the lock and without writing anything (verify reads this way)."""
        self._load()

    def _load(self) -> None:
        if self.manifest_path.exists():
            try:
                data = json.loads(self.manifest_path.read_text("utf-8"))
                for rec in data.get("series", []):
                    if isinstance(rec, dict) and rec.get("SeriesInstanceUID"):
                        self.records[str(rec["SeriesInstanceUID"])] = rec
                self.header = {k: v for k, v in data.items() if k not in ("series", "totals")}
            except (ValueError, OSError, AttributeError, TypeError):
                # A damaged harvest.json is rebuilt from the journal, which is the source of truth.
                self.records.clear()
        if not self.journal_path.exists():
            return
        with open(self.journal_path, "rb") as fh:
            for line in fh:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # a torn last line from a kill -9
                if not isinstance(event, dict):
                    continue
                kind, rec = event.get("event"), event.get("series")
                if kind in ("commit", "failed") and isinstance(rec, dict) and rec.get("SeriesInstanceUID"):
                    uid = str(rec["SeriesInstanceUID"])
                    if kind == "failed" and self.records.get(uid, {}).get("status") == "complete":
                        continue  # a later failure to refresh never hides a verified copy
                    self.records[uid] = rec
                    self._pending_trash.pop(uid, None)  # fetched again after a prune: keep it
                elif kind == "forget" and event.get("uid"):
                    self.records.pop(str(event["uid"]), None)
                    if event.get("path") and event.get("trash"):
                        self._pending_trash[str(event["uid"])] = (str(event["path"]), str(event["trash"]))

    def _recover(self) -> None:
        for path, trash in self._pending_trash.values():  # prunes interrupted between journal and move
            self._to_trash(path, trash)
        self._pending_trash.clear()
        for uid, rec in list(self.records.items()):
            if rec.get("status") != "complete":
                continue
            if self._intact(rec):
                continue
            staging = self.staging_dir(uid)
            if staging.is_dir() and self._intact(rec, root=staging):
                final = self.final_dir(rec)
                self._move_aside(final)  # removed with the rest of tmp/ below
                final.parent.mkdir(parents=True, exist_ok=True)
                os.rename(staging, final)
                self.recovered += 1
            else:
                self.lost += 1
                rec = dict(rec, status="failed", error="files missing after an interrupted run; will be fetched again")
                self.records[uid] = rec
        for child in self.tmp_dir.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        for folder in (self.out_dir, self.out_dir / "licenses"):  # atomic_write temps of a killed run
            for child in folder.glob(".*.tmp"):
                if _ATOMIC_TMP.match(child.name) and child.is_file():
                    child.unlink(missing_ok=True)

    # ------------------------------------------------------------ paths
    def final_dir(self, rec: dict[str, Any]) -> Path:
        path = self.out_dir / rec["path"]
        # Paths come from our own sanitiser; refuse anything that would leave DIR all the same.
        resolved = path.resolve()
        if not resolved.is_relative_to(self.out_dir.resolve()):
            raise HarvesterError(f"refusing series path outside the output directory: {rec['path']!r}")
        return path

    def staging_dir(self, uid: str) -> Path:
        return self.tmp_dir / f"{series_key(uid)}.staging"

    def partial_path(self, uid: str) -> Path:
        return self.tmp_dir / f"{series_key(uid)}.zip.partial"

    def _intact(self, rec: dict[str, Any], root: Path | None = None) -> bool:
        """Every recorded file is there with its recorded size (MD5s are for ``verify``)."""
        base = self.out_dir / rec.get("path", "\x00") if root is None else root
        prefix = rec.get("path", "") + "/"
        try:
            for f in rec.get("files", []):
                rel = f["path"][len(prefix):] if f["path"].startswith(prefix) else f["path"]
                if (base / rel).stat().st_size != f["size"]:
                    return False
        except (OSError, KeyError, TypeError):
            return False
        return bool(rec.get("files"))

    def _move_aside(self, final: Path) -> Path | None:
        """A folder under a final name that the journal does not vouch for goes to tmp/ (deleted
        after the new one is in place, or by the next run's clean-up)."""
        if final.exists() or final.is_symlink():
            aside = self.tmp_dir / f"replaced-{series_key(str(final))}-{os.getpid()}"
            os.rename(final, aside)
            return aside
        return None

    # ------------------------------------------------------------ queries
    def complete(self, uid: str) -> dict[str, Any] | None:
        rec = self.records.get(uid)
        return rec if rec is not None and rec.get("status") == "complete" else None

    def taken_paths(self) -> dict[str, str]:
        return {uid: r["path"] for uid, r in self.records.items() if r.get("status") == "complete" and r.get("path")}

    # ------------------------------------------------------------ writes (call from a worker thread)
    def _append(self, event: dict[str, Any]) -> None:
        """Append one line to the journal; returns once it is durable (fsynced).

        Group commit: the line is written under the lock, then the appender waits for an fsync
        that starts after its write. If none is running, it runs one itself (outside the lock), for
        every line written so far; lines written meanwhile wait for the next one. Raises what
        ``classify_os_error`` makes of a failed write or fsync; the lines that fsync did not make
        durable are cut off, so the journal only holds lines whose append returned (or that a
        kill -9 interrupted).
        """
        line = (json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            journal = self._open_journal()
            start = journal.tell()
            try:
                view = memoryview(line)
                while view:
                    written = journal.write(view)
                    if not written:
                        raise OSError(errno.EIO, "the journal accepts no more bytes")
                    view = view[written:]
            except OSError as exc:
                # Disk full or a size limit mid-line: cut the fragment off, so the journal stays a
                # sequence of whole lines and the next append (this run's or the next's) is readable.
                self._cut(journal, start)
                raise classify_os_error(exc, "the journal") from None
            group = self._group
            while not group.done:
                if self._syncing:   # started before this write: it does not cover this line
                    self._synced.wait()
                else:       # none running, so this line's group is still the current one
                    self._sync_group()
            if group.error is not None:
                raise classify_os_error(group.error, "the journal") from None

    def _open_journal(self) -> io.RawIOBase:
        if self._journal is None:
            raise HarvesterError("state is closed")
        return self._journal

    def _sync_group(self) -> None:
        """fsync the current group's lines; called with the lock held, drops it during the fsync."""
        journal, group = self._open_journal(), self._group
        self._group = _SyncGroup(journal.tell())
        self._syncing = True
        outcome: OSError | None = OSError(errno.EIO, "the journal's fsync was interrupted")
        self._lock.release()
        try:
            os.fsync(journal.fileno())
            outcome = None
        except OSError as exc:
            outcome = exc
        finally:
            self._lock.acquire()
            self._syncing = False
            group.done, group.error = True, outcome
            self._synced.notify_all()
        if outcome is not None:
            # Nothing since group.start is known durable: cut it all off, the lines written during
            # the fsync included, and fail their appends too.
            self._cut(journal, group.start)
            self._group.done, self._group.error = True, outcome
            self._group = _SyncGroup(group.start)

    @staticmethod
    def _cut(journal: io.RawIOBase, offset: int) -> None:
        try:
            os.ftruncate(journal.fileno(), offset)
            journal.seek(offset)  # appends still go to the end; tell() must not report the old one
        except OSError:
            pass

    def commit(self, rec: dict[str, Any], staging: Path) -> None:
        """Journal the verified series, then move its staging folder to its final path."""
        final = self.final_dir(rec)
        self._append({"event": "commit", "t": now_iso(), "series": rec})
        try:
            aside = self._move_aside(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            raise classify_os_error(exc, rec["path"]) from None
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        with self._lock:
            self.records[rec["SeriesInstanceUID"]] = rec

    def restore(self, rec: dict[str, Any]) -> None:
        """Record a series complete again after its files were mended in place (``verify --repair``)."""
        self._append({"event": "commit", "t": now_iso(), "series": rec})
        with self._lock:
            self.records[rec["SeriesInstanceUID"]] = rec

    def fail(self, rec: dict[str, Any]) -> None:
        self._append({"event": "failed", "t": now_iso(), "series": rec})
        with self._lock:
            uid = rec["SeriesInstanceUID"]
            if self.records.get(uid, {}).get("status") != "complete":
                self.records[uid] = rec

    def forget(self, uid: str, path: str, trash: str) -> None:
        """Drop a series from the manifest and move its folder to ``trash`` (relative to DIR).

        Journalled first, so a kill between the two steps is finished by the next ``open()``.
        """
        self._append({"event": "forget", "t": now_iso(), "uid": uid, "path": path, "trash": trash})
        self._to_trash(path, trash)
        with self._lock:
            self.records.pop(uid, None)

    def _to_trash(self, path: str, trash: str) -> None:
        src, dst = self.out_dir / path, self.out_dir / trash
        root = self.out_dir.resolve()
        if not src.resolve().is_relative_to(root) or not dst.resolve().is_relative_to(root):
            return
        if src.exists() and not dst.exists():
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.rename(src, dst)
            except OSError as exc:
                raise classify_os_error(exc, path) from None

    def log_event(self, event: dict[str, Any]) -> None:
        """Anything else worth keeping (run start/finish, retries): appended to the journal."""
        self._append(dict(event, t=now_iso()))

    # ------------------------------------------------------------ manifests
    def write_manifest(self, header: dict[str, Any], order: Iterable[str] | None = None) -> dict[str, Any]:
        """Rewrite harvest.json atomically from the records; returns the totals."""
        with self._lock:
            uids = list(order) if order is not None else list(self.records)
            wanted = set(uids)
            extra = [u for u in self.records if u not in wanted]
            recs = [self.records[u] for u in uids + extra if u in self.records]
        totals = totals_of(recs)
        doc = {"schema": SCHEMA, **header, "totals": totals, "series": recs}
        atomic_write(self.manifest_path, json.dumps(doc, indent=1, ensure_ascii=False).encode("utf-8"))
        self._write_metadata_csv(recs)
        return totals

    def _write_metadata_csv(self, recs: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(METADATA_COLUMNS)
        for r in recs:
            if r.get("status") != "complete":
                continue
            row, study = r.get("metadata") or {}, r.get("study") or {}
            sop_class = r.get("sop_class_uid", "")
            writer.writerow([
                r["SeriesInstanceUID"], r.get("Collection", ""), row.get("ThirdPartyAnalysis", ""),
                row.get("DataDescriptionURI", ""), r.get("PatientID", ""), r.get("StudyInstanceUID", ""),
                study.get("StudyDescription") or row.get("StudyDesc", ""), study.get("StudyDate") or row.get("StudyDate", ""),
                row.get("SeriesDescription", ""), row.get("Manufacturer", ""), r.get("Modality", ""),
                _sop_class_name(sop_class), sop_class, len(r.get("files", [])), r.get("bytes", 0),
                "./" + r.get("path", ""), r.get("completed", ""),
            ])
        atomic_write(self.out_dir / "metadata.csv", buf.getvalue().encode("utf-8"))


def _sop_class_name(uid: str) -> str:
    if not uid:
        return ""
    try:
        from pydicom.uid import UID
        return str(UID(uid).name)
    except Exception:  # noqa: BLE001 - a name is a nicety, never a failure
        return uid
