"""Operations on a harvest tree, for people and tools: ``verify_tree`` (re-hash every file),
``read_status``, ``export_tcia``, ``export_csv``. Each reads the records through
``read_records``: streamed from the state database one at a time, so memory does not grow with
the number of files recorded (a harvest made before the database: harvest.json, through
``harvester.store.manifest.read_manifest``: ``UsageError`` when absent, ``ManifestError`` when
unreadable), and skips unusable records. Nothing here writes into the tree but the exports'
own targets.

Sync and repair live in ``harvester.operations``.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as dt
import hashlib
import io
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harvester.containment import inside, inside_text, open_nofollow
from harvester.errors import UnsafePathError
from harvester.redact import redact
from harvester.store.manifest import read_manifest
from harvester.store.state import HarvestState, json_record, _plain_child, _whole, now_iso, write_output_chunks

# ---------------------------------------------------------------- verify

@dataclass
class VerifyResult:
    """What ``verify_tree`` found. ``ok`` only when every series the harvest planned is there and
    intact: none failed, unavailable or missing, no damaged file, no extra file."""

    out_dir: Path
    series: int = 0          # complete series whose files were re-hashed
    files: int = 0           # files re-hashed
    bytes: int = 0
    problems: list[str] = field(default_factory=list)   # one per damaged file: "<path>: <what>"
    intact: int = 0          # complete series with every file as recorded and nothing else
    failed: list[dict[str, Any]] = field(default_factory=list)       # records the harvest did not complete
    unavailable: list[dict[str, Any]] = field(default_factory=list)  # records the archive could not serve
    missing: int = 0         # planned series absent: all files gone, or never finished by the last run
    extra: list[str] = field(default_factory=list)      # files in series folders that no record lists
    damaged_series: int = 0  # complete series with damaged or extra files (but not all of them gone)
    refused: list[str] = field(default_factory=list)    # records that could not be used (warned): unchecked

    @property
    def checked(self) -> int:
        """Series checked: every series harvest.json records, plus those the last run left unfinished."""
        return self.intact + len(self.failed) + len(self.unavailable) + self.missing + self.damaged_series

    @property
    def files_ok(self) -> bool:
        """Every file that is recorded complete is intact and no series folder holds anything else."""
        return not self.problems and not self.extra

    @property
    def ok(self) -> bool:
        return (self.files_ok and not self.failed and not self.unavailable and not self.missing
                and not self.refused)   # a record verify could not use is a series it could not vouch for

    def summary(self) -> str:
        """``58 series checked: 53 intact, 5 failed, 0 missing, 0 damaged files, 1 extra file``."""
        def n(count: int, what: str) -> str:
            return f"{count} {what}{'' if count == 1 else 's'}"
        unavailable = f", {len(self.unavailable)} unavailable" if self.unavailable else ""
        refused = f", {n(len(self.refused), 'record')} not usable" if self.refused else ""
        return (f"{self.checked} series checked: {self.intact} intact, {len(self.failed)} failed{unavailable}, "
                f"{self.missing} missing, {n(len(self.problems), 'damaged file')}, {n(len(self.extra), 'extra file')}"
                f"{refused}")


def verify_tree(out_dir: Path, *, on_file: Callable[[int], None] | None = None,
                on_total: Callable[[int, int], None] | None = None) -> VerifyResult:
    """Re-hash every file the harvest records (the state database, read series by series, and
    the commits of an old journal it has not read yet; harvest.json for a harvest made before
    the database), look for files no record lists in the series folders, and count the series
    that are failed, unavailable or missing (blocking; run it in a thread). Reads only: nothing
    in ``out_dir`` is changed. Memory holds one record at a time (and the few records an old
    journal adds), whatever the number of files.

    ``on_total(files, bytes)`` is called once, before any file is read, with what is to be
    re-hashed (the records' counts: the progress line's totals); ``on_file(size)`` after each file.

    A file path that is not strictly inside DIR, or reaches its file through a symbolic link, is
    a problem naming the record; it is never opened. Raises ``UsageError`` when DIR has neither
    a state database nor a harvest.json, ``ManifestError`` when it has no database and its
    harvest.json is unreadable.
    """
    state = HarvestState(out_dir)
    has_db = _check_manifest(state) is None
    journal_problem: str | None = None
    try:
        # the database's records (read only), or harvest.json's and an old journal's; harvest.json
        # is read whole only when the database does not hold its records
        state.read(listed=not has_db, streamed=True)
    except UnsafePathError as exc:  # the database or an old journal is a link or not a regular file: never read
        journal_problem = str(exc)
    except OSError:
        pass  # an unreadable old journal: what harvest.json lists is all there is to check
    try:
        return _verify_records(state, on_file, on_total, journal_problem)
    finally:
        state.close()


def _verify_records(state: HarvestState, on_file: Callable[[int], None] | None,
                    on_total: Callable[[int, int], None] | None, journal_problem: str | None) -> VerifyResult:
    out_dir = state.out_dir
    result = VerifyResult(out_dir=out_dir)
    if journal_problem:
        result.problems.append(journal_problem)
    root = out_dir.resolve()
    others = _OtherSeries.scan(state)
    if on_total is not None:
        on_total(others.files, others.bytes)
    for uid, rec in state.checked_items():
        if not isinstance(rec, dict):
            continue
        if rec.get("status") != "complete":
            (result.unavailable if rec.get("status") == "unavailable" else result.failed).append(rec)
            continue
        result.series += 1
        problems_before, files = len(result.problems), _files(rec)
        gone = 0
        for f in files:
            rel = str(f.get("path", ""))
            try:
                path = inside_text(out_dir, rel)
            except UnsafePathError as exc:
                result.problems.append(f"{state.origin(uid)} ({rec.get('SeriesInstanceUID')}): {exc}")
                continue
            try:
                md5 = hashlib.md5()
                size = 0
                with open(path, "rb", opener=open_nofollow) as fh:
                    while chunk := fh.read(1 << 20):
                        md5.update(chunk)
                        size += len(chunk)
            except FileNotFoundError:
                gone += 1
                result.problems.append(f"{rel}: missing")
                continue
            except OSError as exc:
                result.problems.append(f"{rel}: unreadable ({exc.strerror})")
                continue
            result.files += 1
            result.bytes += size
            if on_file is not None:
                on_file(size)
            if size != f.get("size"):
                result.problems.append(f"{rel}: size {size}, expected {f.get('size')}")
            elif md5.hexdigest() != f.get("md5"):
                result.problems.append(f"{rel}: MD5 mismatch (series {rec.get('SeriesInstanceUID')})")
        own = {os.path.normpath(str(f.get("path", ""))) for f in files}
        extra = _extra_files(out_dir, root, str(rec.get("path") or ""), own, others)
        result.extra += extra
        if files and gone == len(files) and not extra:
            # The whole series is gone (its folder deleted): a missing series, not damaged files.
            del result.problems[problems_before:]
            result.missing += 1
        elif len(result.problems) > problems_before or extra:
            result.damaged_series += 1
        else:
            result.intact += 1
    # What harvest.json itself lists is read by other tools too (and the journal may have replaced
    # it for the next run): a path of it that leaves DIR is reported under its own origin as well.
    # (Read only for a harvest without a database: with one, harvest.json is its export.)
    for index, rec in state.listed:
        if state.records.get(str(rec.get("SeriesInstanceUID"))) == rec:
            continue  # the same record was checked above, under the origin the next run reads it from
        for f in _files(rec):
            try:
                inside(out_dir, str(f.get("path", "")))
            except UnsafePathError as exc:
                result.problems.append(f"harvest.json series #{index} ({rec.get('SeriesInstanceUID')}): {exc}")
    # An interrupted run (kill -9, Ctrl-C, a fatal stop) leaves series it never finished.
    todo, finished = _last_run(state)
    result.missing += max(0, todo - len(finished))
    result.refused = list(dict.fromkeys([*state.refused, *state.unusable]))
    return result


class _OtherSeries:
    """What the extra-file check of one series folder needs to know of every other complete
    series, without holding a record per series: whether a folder is a series folder (an
    index lookup in the database; the few records kept in memory, an old journal's, apart) and
    the file paths that a record lists outside its own folder's plain names (none, for what
    the layout writes). ``scan`` also counts what verify will re-hash."""

    def __init__(self, state: HarvestState) -> None:
        self.state = state
        self.folders: set[str] = set()     # normalised folders not found as such in the database
        self.listed: set[str] = set()      # file paths outside their own record's folder
        self.files = self.bytes = 0

    @classmethod
    def scan(cls, state: HarvestState) -> _OtherSeries:
        """One streamed pass over the rows: a row the database vouches for (each of its files one
        plain name inside its folder, checked when it was written) is counted from its columns,
        without being parsed; any other complete record is parsed once more here."""
        self = cls(state)
        db, records = state.db, state.records
        if db is not None:
            for uid, status, path, files, size, vouched, record in db.verify_rows():
                if status != "complete" or uid in records.overlay or uid in records.hidden:
                    continue
                if vouched and path == os.path.normpath(path):
                    self.files += files
                    self.bytes += size
                    continue
                rec = json_record(record())
                if rec is not None and rec.get("status") == "complete":
                    self._add(rec, in_db=True)
        for rec in records.overlay.values():
            if rec is not None and rec.get("status") == "complete":
                self._add(rec, in_db=False)
        return self

    def _add(self, rec: dict[str, Any], *, in_db: bool) -> None:
        files = _files(rec)
        self.files += len(files)
        self.bytes += int(rec.get("bytes") or 0) if _whole(rec.get("bytes")) else 0
        folder = str(rec.get("path") or ".")
        norm = os.path.normpath(folder)
        if norm != folder or not in_db:
            self.folders.add(norm)
        for f in files:
            path = str(f.get("path", ""))
            if not _plain_child(folder, path):
                self.listed.add(os.path.normpath(path))

    def is_series_folder(self, rel: str) -> bool:
        if rel in self.folders:
            return True
        db = self.state.db
        return db is not None and db.complete_at(rel) is not None

    def lists(self, rel: str) -> bool:
        return rel in self.listed


def _files(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The file entries of a record (harvest.json is not trusted to hold the right types)."""
    files = rec.get("files")
    return [f for f in files if isinstance(f, dict)] if isinstance(files, list) else []


def _extra_files(out_dir: Path, root: Path, folder: str, own: set[str], others: _OtherSeries) -> list[str]:
    """Files under the series folder ``folder`` (relative to ``out_dir``) that neither its own
    record (``own``: its normalised file paths) nor any other complete record lists; folders of
    other series inside it are theirs to check. Symlinks are reported, never followed, and a
    folder that leaves ``out_dir`` is not walked."""
    base = out_dir / folder
    if not folder or not base.resolve().is_relative_to(root) or base.is_symlink() or not base.is_dir():
        return []
    extra = []
    for dirpath, dirnames, filenames in os.walk(base):  # never follows a symlinked folder
        rel_dir = os.path.relpath(dirpath, out_dir)
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = sorted(d for d in dirnames
                             if d not in links and not others.is_series_folder(os.path.join(rel_dir, d)))
        for name in sorted(filenames + links):
            rel = os.path.join(rel_dir, name)
            if rel not in own and not others.lists(rel):
                extra.append(rel)
    return extra


def _last_run(state: HarvestState) -> tuple[int, set[str]]:
    """How many series the last run set out to fetch (its ``run`` event's ``todo``), and the
    series it committed or recorded as failed after that event (``HarvestState.events``, streamed)."""
    todo, finished = 0, set()
    for event in state.events():
        if event.get("event") == "run":
            todo = event["todo"] if isinstance(event.get("todo"), int) else 0
            finished = set()
        elif event.get("event") in ("commit", "failed"):
            finished.add(str(event.get("uid")))
    return todo, finished


# ---------------------------------------------------------------- status and exports

def _check_manifest(state: HarvestState) -> dict[str, Any] | None:
    """None when ``state``'s DIR has a state database (the record every reader here reads, by
    index and streamed); without one, harvest.json is the record and is returned as read:
    ``read_manifest`` raises ``UsageError`` when it is absent and ``ManifestError`` when it is
    unreadable. With a database harvest.json is only its export and is not read, unless it is
    there but not a regular file (a link, a FIFO): that is refused the same way."""
    has_db = state.db_path.exists() or state.db_path.is_symlink()
    try:
        regular = stat.S_ISREG(os.lstat(state.manifest_path).st_mode)
    except FileNotFoundError:
        regular = True
    except OSError:
        regular = False
    if not has_db or not regular:
        doc = read_manifest(state.out_dir)
        return None if has_db else doc
    return None


@contextlib.contextmanager
def read_records(out_dir: Path, *, streamed: bool = True) -> Iterator[tuple[HarvestState, dict[str, Any] | None]]:
    """``out_dir``'s state read only (``HarvestState.read``: no lock, nothing written), its
    records streamed from the database one at a time (a harvest made before the database: from
    harvest.json and its journal, in memory as those versions did), and harvest.json as read
    when there is no database (else None); closed on exit. Raises what ``_check_manifest`` and
    ``HarvestState.read`` raise. ``streamed`` (a reader that goes through the records once, by
    ``state.checked_items()``): each row is parsed and checked once, as it is read."""
    state = HarvestState(out_dir)
    doc = _check_manifest(state)
    try:
        state.read(listed=False, streamed=streamed)
        yield state, doc
    finally:
        state.close()


def read_status(out_dir: Path) -> dict[str, Any]:
    """What DIR holds: per collection series/files/bytes, failures, last sync, disk use; the
    records streamed from the state database (one at a time: memory holds one per collection
    and one line per failure)."""
    collections: dict[str, dict[str, int]] = {}
    failures = []
    with read_records(out_dir) as (state, doc):
        header = dict(state.header) if doc is None else doc
        count = 0
        for _uid, rec in state.checked_items():
            count += 1
            if rec.get("status") == "unavailable":  # asked for, never in the archive: no collection to count under
                failures.append({"SeriesInstanceUID": rec.get("SeriesInstanceUID"), "error": rec.get("error"),
                                 "status": "unavailable"})
                continue
            c = collections.setdefault(str(rec.get("Collection", "")), {"series": 0, "complete": 0, "failed": 0,
                                                                         "files": 0, "bytes": 0})
            c["series"] += 1
            if rec.get("status") == "complete":
                c["complete"] += 1
                c["files"] += len(rec.get("files", []))
                c["bytes"] += int(rec.get("bytes") or 0)
            else:
                c["failed"] += 1
                failures.append({"SeriesInstanceUID": rec.get("SeriesInstanceUID"),
                                 "error": redact(rec["error"]) if rec.get("error") else rec.get("error")})
        # harvest.json's own block without a database; the database's count when it holds every
        # record (rows left out as unusable: counted from the records)
        totals = doc.get("totals", {}) if doc is not None else state.db.totals() \
            if state.db is not None and not state.records.overlay and not state.records.hidden \
            else _totals_of_groups(collections, failures, count)
    disk = 0
    for root, _dirs, files in os.walk(out_dir):
        for name in files:
            try:
                disk += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return {
        "dir": str(out_dir), "api_url": header.get("api_url"), "started": header.get("started"),
        "finished": header.get("finished"), "last_sync": header.get("last_sync"), "totals": totals,
        "collections": dict(sorted(collections.items())), "failures": failures, "disk_bytes": disk,
    }


def _totals_of_groups(collections: dict[str, dict[str, int]], failures: list[dict[str, Any]],
                      count: int) -> dict[str, int]:
    """harvest.json's ``totals`` block (``totals_of``) from ``read_status``'s counts."""
    done = sum(c["complete"] for c in collections.values())
    unavailable = sum(1 for f in failures if f.get("status") == "unavailable")
    return {"series": count, "complete": done, "failed": count - done - unavailable, "unavailable": unavailable,
            "files": sum(c["files"] for c in collections.values()),
            "bytes": sum(c["bytes"] for c in collections.values())}


def export_tcia(out_dir: Path, target: Path) -> int:
    """Write a TCIA portal cart of the complete series to ``target`` (``-`` for stdout; see
    ``write_output``), streamed from the state database; returns how many series it lists."""
    count = 0
    with read_records(out_dir, streamed=False) as (state, _doc):   # the columns alone: nothing parsed
        stamp = int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)
        head = [
            "downloadServerUrl=https://nbia.cancerimagingarchive.net/nbia-download/servlet/DownloadServlet",
            "includeAnnotation=true", "noOfrRetry=4", f"databasketId=manifest-{stamp}.tcia", "manifestVersion=3.0",
            "ListOfSeriesToDownload=",
        ]

        def lines() -> Iterator[bytes]:
            nonlocal count
            yield ("\n".join(head) + "\n").encode("utf-8")
            for uid, status in _uids_and_status(state):
                if status == "complete":
                    count += 1
                    yield (uid + "\n").encode("utf-8")
        write_output_chunks(target, lines(), option="--tcia")
    return count


def _uids_and_status(state: HarvestState) -> Iterator[tuple[str, Any]]:
    """(uid, status) of every usable record, in order, from the columns when the database holds
    every record (nothing parsed), else from the records."""
    if state.db is not None and not state.records.overlay and not state.records.hidden:
        for uid, status, *_ in state.db.verify_rows():
            yield uid, status
        return
    for rec in state.records.values():
        yield rec["SeriesInstanceUID"], rec.get("status")


EXPORT_COLUMNS = ["SeriesInstanceUID", "Collection", "PatientID", "StudyInstanceUID", "Modality", "status",
                  "path", "files", "bytes", "SeriesDescription", "SeriesNumber", "StudyDate", "BodyPartExamined",
                  "Manufacturer", "DateReleased", "error"]


def export_csv(out_dir: Path, target: Path) -> int:
    """One row per series with its metadata and path, to ``target`` (``-`` for stdout; see
    ``write_output``), streamed from the state database; returns the number of rows."""
    count = 0
    with read_records(out_dir) as (state, _doc):
        def rows() -> Iterator[bytes]:
            nonlocal count
            buf = io.StringIO()
            writer = csv.writer(buf)
            writer.writerow(EXPORT_COLUMNS)
            for _uid, r in state.checked_items():
                count += 1
                meta = r.get("metadata") or {}
                writer.writerow([r.get("SeriesInstanceUID"), r.get("Collection"), r.get("PatientID"),
                                 r.get("StudyInstanceUID"), r.get("Modality"), r.get("status"), r.get("path"),
                                 len(r.get("files", [])), r.get("bytes"), meta.get("SeriesDescription", ""),
                                 meta.get("SeriesNumber", ""), meta.get("StudyDate", ""),
                                 meta.get("BodyPartExamined", ""), meta.get("Manufacturer", ""),
                                 meta.get("DateReleased", ""), redact(r.get("error") or "")])
                if buf.tell() >= 1 << 14:   # written in pieces of about 16 KB
                    yield buf.getvalue().encode("utf-8")
                    buf.seek(0)
                    buf.truncate()
            yield buf.getvalue().encode("utf-8")
        write_output_chunks(target, rows(), option="--csv")
    return count


__all__ = ["VerifyResult", "verify_tree", "read_records", "read_status", "export_tcia", "export_csv", "now_iso"]
