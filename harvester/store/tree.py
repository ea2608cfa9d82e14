"""Operations on a harvest tree, for people and tools: ``verify_tree`` (re-hash every file),
``read_status``, ``export_tcia``, ``export_csv``. Each reads harvest.json through
``harvester.store.manifest.read_manifest`` (``UsageError`` when absent, ``ManifestError`` when
unreadable) and skips unusable records. Nothing here writes into the tree but the exports'
own targets.

Sync and repair live in ``harvester.operations``.
"""
from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harvester.containment import inside, open_nofollow
from harvester.errors import UnsafePathError
from harvester.redact import redact
from harvester.store.manifest import read_manifest
from harvester.store.state import HarvestState, now_iso, usable_records, write_output

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
        return self.files_ok and not self.failed and not self.unavailable and not self.missing

    def summary(self) -> str:
        """``58 series checked: 53 intact, 5 failed, 0 missing, 0 damaged files, 1 extra file``."""
        def n(count: int, what: str) -> str:
            return f"{count} {what}{'' if count == 1 else 's'}"
        unavailable = f", {len(self.unavailable)} unavailable" if self.unavailable else ""
        return (f"{self.checked} series checked: {self.intact} intact, {len(self.failed)} failed{unavailable}, "
                f"{self.missing} missing, {n(len(self.problems), 'damaged file')}, {n(len(self.extra), 'extra file')}")


def verify_tree(out_dir: Path, *, on_file: Callable[[int], None] | None = None) -> VerifyResult:
    """Re-hash every file listed in ``out_dir/harvest.json`` (and in the state's commits it does not
    list yet), look for files no record lists in the series folders, and count the series that
    are failed, unavailable or missing (blocking; run it in a thread). Reads only: nothing in
    ``out_dir`` is changed.

    A file path that is not strictly inside DIR, or reaches its file through a symbolic link, is
    a problem naming the record; it is never opened. Raises ``UsageError`` when there is no
    harvest.json, ``ManifestError`` when it is unreadable.
    """
    read_manifest(out_dir)   # UsageError when absent, ManifestError when unreadable (the state rebuilds those)
    # The state database holds commits that harvest.json (rewritten at checkpoints) may not list yet
    # after a kill -9: the records are what the next run would start from.
    state = HarvestState(out_dir)
    journal_problem: str | None = None
    try:
        state.read()   # the database's records (or harvest.json's and an old journal's)
    except UnsafePathError as exc:  # the database or an old journal is a link or not a regular file: never read
        journal_problem = str(exc)
    except OSError:
        pass  # an unreadable old journal: what harvest.json lists is all there is to check
    series = list(state.records.values())
    result = VerifyResult(out_dir=out_dir)
    if journal_problem:
        result.problems.append(journal_problem)
    root = out_dir.resolve()
    complete = [rec for rec in series if isinstance(rec, dict) and rec.get("status") == "complete"]
    for rec in series:
        if not isinstance(rec, dict) or rec.get("status") == "complete":
            continue
        (result.unavailable if rec.get("status") == "unavailable" else result.failed).append(rec)
    # Every path a complete record lists, and every series folder: what the folders may hold.
    listed = {os.path.normpath(str(f.get("path", ""))) for rec in complete for f in _files(rec)}
    folders = {os.path.normpath(str(rec.get("path") or ".")) for rec in complete}
    for rec in complete:
        result.series += 1
        problems_before, files = len(result.problems), _files(rec)
        gone = 0
        for f in files:
            rel = str(f.get("path", ""))
            try:
                path = inside(out_dir, rel)
            except UnsafePathError as exc:
                where = state.origin(str(rec.get("SeriesInstanceUID")))
                result.problems.append(f"{where} ({rec.get('SeriesInstanceUID')}): {exc}")
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
        extra = _extra_files(out_dir, root, str(rec.get("path") or ""), listed, folders)
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
    state.close()
    return result


def _files(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The file entries of a record (harvest.json is not trusted to hold the right types)."""
    files = rec.get("files")
    return [f for f in files if isinstance(f, dict)] if isinstance(files, list) else []


def _extra_files(out_dir: Path, root: Path, folder: str, listed: set[str], folders: set[str]) -> list[str]:
    """Files under the series folder ``folder`` (relative to ``out_dir``) that no complete record
    lists; folders of other series inside it are theirs to check. Symlinks are reported, never
    followed, and a folder that leaves ``out_dir`` is not walked."""
    base = out_dir / folder
    if not folder or not base.resolve().is_relative_to(root) or base.is_symlink() or not base.is_dir():
        return []
    extra = []
    for dirpath, dirnames, filenames in os.walk(base):  # never follows a symlinked folder
        rel_dir = os.path.relpath(dirpath, out_dir)
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = sorted(d for d in dirnames if d not in links and os.path.join(rel_dir, d) not in folders)
        for name in sorted(filenames + links):
            rel = os.path.join(rel_dir, name)
            if rel not in listed:
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

def _load_manifest(out_dir: Path) -> dict[str, Any]:
    """harvest.json (``read_manifest``: ``UsageError``, ``ManifestError``) with only its usable
    records; the others are reported and skipped."""
    doc = read_manifest(out_dir)
    doc["series"] = usable_records(doc["series"], str(out_dir / "harvest.json"))
    return doc


def read_status(out_dir: Path) -> dict[str, Any]:
    """What DIR holds: per collection series/files/bytes, failures, last sync, disk use."""
    doc = _load_manifest(out_dir)
    collections: dict[str, dict[str, int]] = {}
    failures = []
    for rec in doc["series"]:
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
    disk = 0
    for root, _dirs, files in os.walk(out_dir):
        for name in files:
            try:
                disk += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return {
        "dir": str(out_dir), "api_url": doc.get("api_url"), "started": doc.get("started"),
        "finished": doc.get("finished"), "last_sync": doc.get("last_sync"), "totals": doc.get("totals", {}),
        "collections": dict(sorted(collections.items())), "failures": failures, "disk_bytes": disk,
    }


def export_tcia(out_dir: Path, target: Path) -> int:
    """Write a TCIA portal cart of the complete series to ``target`` (``-`` for stdout; see
    ``write_output``); returns how many series it lists."""
    doc = _load_manifest(out_dir)
    uids = [r["SeriesInstanceUID"] for r in doc["series"] if r.get("status") == "complete"]
    stamp = int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)
    lines = [
        "downloadServerUrl=https://nbia.cancerimagingarchive.net/nbia-download/servlet/DownloadServlet",
        "includeAnnotation=true", "noOfrRetry=4", f"databasketId=manifest-{stamp}.tcia", "manifestVersion=3.0",
        "ListOfSeriesToDownload=", *uids,
    ]
    write_output(target, ("\n".join(lines) + "\n").encode("utf-8"), option="--tcia")
    return len(uids)


EXPORT_COLUMNS = ["SeriesInstanceUID", "Collection", "PatientID", "StudyInstanceUID", "Modality", "status",
                  "path", "files", "bytes", "SeriesDescription", "SeriesNumber", "StudyDate", "BodyPartExamined",
                  "Manufacturer", "DateReleased", "error"]


def export_csv(out_dir: Path, target: Path) -> int:
    """One row per series with its metadata and path, to ``target`` (``-`` for stdout; see
    ``write_output``); returns the number of rows."""
    doc = _load_manifest(out_dir)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(EXPORT_COLUMNS)
    for r in doc["series"]:
        meta = r.get("metadata") or {}
        writer.writerow([r.get("SeriesInstanceUID"), r.get("Collection"), r.get("PatientID"),
                         r.get("StudyInstanceUID"), r.get("Modality"), r.get("status"), r.get("path"),
                         len(r.get("files", [])), r.get("bytes"), meta.get("SeriesDescription", ""),
                         meta.get("SeriesNumber", ""), meta.get("StudyDate", ""), meta.get("BodyPartExamined", ""),
                         meta.get("Manufacturer", ""), meta.get("DateReleased", ""), redact(r.get("error") or "")])
    write_output(target, buf.getvalue().encode("utf-8"), option="--csv")
    return len(doc["series"])


__all__ = ["VerifyResult", "verify_tree", "read_status", "export_tcia", "export_csv", "now_iso"]
