"""Dataset mirroring: keep an output directory current with a query, repair it, describe it.

* ``async_sync``: plan the query now, compare with ``harvest.json``, and fetch what is new,
  what changed on the server (ImageCount or FileSize differ, or getUpdatedSeries lists it
  since the last successful sync, minus a safety overlap) and what is missing or failed.
  With ``prune``, series no longer selected move to ``DIR/.harvester/trash/``. ``dry_run``
  only reports the difference. A changed series keeps its old copy until the new one is
  verified (``HarvestState.commit`` swaps them atomically).
* ``async_repair``: re-hash every file; refetch only the bad instances with getSingleImage,
  and the whole series only when an instance cannot be repaired alone. A file whose recorded
  path is not strictly inside DIR (``../x``, absolute, through a link) is refused and reported
  (``RepairResult.refused``), never created or replaced.
* ``read_status``, ``export_tcia``, ``export_csv``: what the tree holds, for people and tools.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from harvester.config import Config
from harvester.containment import inside, open_dir, open_nofollow, read_bytes
from harvester.dates import parse_archive_date
from harvester.engine import Engine, HarvestResult
from harvester.errors import HarvesterError, ManifestError, RequestError, UnsafePathError, UsageError
from harvester.models import Plan, SeriesTask
from harvester.progress import Hub
from harvester.query import Query
from harvester.source.nbia import NBIAClient, as_int, make_session
from harvester.redact import redact
from harvester.state import HarvestState, atomic_write, now_iso, usable_records, write_output

SYNC_OVERLAP = dt.timedelta(days=2)


@dataclass
class SyncDiff:
    new: list[str] = field(default_factory=list)          # not harvested yet (or failed before)
    changed: list[str] = field(default_factory=list)      # complete here, different on the server
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)      # complete here, no longer selected

    def to_json(self) -> dict[str, Any]:
        return {"new": self.new, "changed": self.changed, "unchanged": len(self.unchanged), "removed": self.removed}


@dataclass
class SyncResult:
    diff: SyncDiff
    harvest: HarvestResult | None
    pruned: list[str]
    dry_run: bool
    #: (uid, reason) of the series the query's lists name that the archive does not give
    unavailable: list[tuple[str, str]] = field(default_factory=list)


def from_date_param(when: dt.date, api_url: str) -> str:
    """fromDate as the API version wants it: v4 MM-DD-YYYY, v1/v2 DD/MM/YYYY."""
    version = api_url.rstrip("/").rsplit("/", 1)[-1]
    return when.strftime("%d/%m/%Y") if version in ("v1", "v2") else when.strftime("%m-%d-%Y")


def same_release(now: Any, recorded: Any) -> bool:
    """Whether two DateReleased values name the same day, whatever form each came in (a tree
    harvested from a v2 server and synced from v4 holds ``2015-05-27 00:00:00.0`` for the v4
    ``05-27-2015``); values that are not dates compare as text."""
    day_now, day_recorded = parse_archive_date(now), parse_archive_date(recorded)
    if day_now is not None and day_recorded is not None:
        return day_now == day_recorded
    return str(now or "") == str(recorded or "")


def diff_plan(state: HarvestState, plan: Plan, updated: set[str]) -> SyncDiff:
    """Compare what is on disk with what the query selects now."""
    diff = SyncDiff()
    selected = set()
    for task in plan.tasks:
        selected.add(task.series_uid)
        rec = state.complete(task.series_uid)
        if rec is None:
            diff.new.append(task.series_uid)
            continue
        meta = rec.get("metadata") or {}
        count_changed = task.image_count is not None and task.image_count != len(rec.get("files", []))
        size_changed = task.file_size is not None and as_int(meta.get("FileSize")) not in (None, task.file_size)
        released_changed = (not same_release(task.row.get("DateReleased"), meta.get("DateReleased"))
                            and task.series_uid in updated)
        if count_changed or size_changed or released_changed:
            diff.changed.append(task.series_uid)
        else:
            diff.unchanged.append(task.series_uid)
    diff.removed = sorted(uid for uid, rec in state.records.items()
                          if rec.get("status") == "complete" and uid not in selected)
    return diff


async def _updated_since(client: NBIAClient, last_sync: str | None) -> set[str]:
    """Series the archive says were released or updated since the last sync (minus an overlap)."""
    if not last_sync:
        return set()
    try:
        since = dt.datetime.fromisoformat(last_sync.replace("Z", "+00:00")).date() - SYNC_OVERLAP
    except ValueError:
        return set()
    rows = await client.query("getUpdatedSeries", {"fromDate": from_date_param(since, client.config.api_url)})
    return {str(r["SeriesInstanceUID"]) for r in rows if r.get("SeriesInstanceUID")}


async def async_sync(query: Query, config: Config, *, prune: bool = False, dry_run: bool = False,
                     hub: Hub | None = None) -> SyncResult:
    """Bring ``config.out_dir`` up to date with ``query`` (see the module docstring)."""
    from harvester.api import emit_warnings, harvest_plan, manifest_header, open_harvest, plan_event

    hub = hub or Hub()
    if query.annotations and not config.annotations:   # the cart or manifest asks for them
        config = dataclasses.replace(config, annotations=True)
    async with open_harvest(config) as (state, source):
        plan = await source.plan(query)
        updated: set[str] = set()
        if isinstance(getattr(source, "client", None), NBIAClient):
            try:
                updated = await _updated_since(source.client, state.header.get("last_sync"))
            except RequestError:
                updated = set()  # counts and sizes still catch changed series
        diff = diff_plan(state, plan, updated)
        if dry_run:
            return SyncResult(diff=diff, harvest=None, pruned=[], dry_run=True,
                              unavailable=[(u.series_uid, u.reason) for u in plan.unavailable])
        pruned = await anyio.to_thread.run_sync(_prune, state, diff.removed) if prune else []
        hub.emit(plan_event(plan))
        emit_warnings(hub, plan)
        result = await harvest_plan(Engine(config, source, state, hub), plan, manifest_header(config, query, state),
                                    refetch=frozenset(diff.changed))
        return SyncResult(diff=diff, harvest=result, pruned=pruned, dry_run=False, unavailable=result.unavailable)


def _prune(state: HarvestState, uids: list[str]) -> list[str]:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    pruned = []
    for uid in uids:
        rec = state.complete(uid)
        if rec is None:
            continue
        trash = Path(".harvester") / "trash" / stamp / rec["path"]
        state.forget(uid, rec["path"], str(trash))
        pruned.append(uid)
    return pruned


# ---------------------------------------------------------------- repair

@dataclass
class RepairResult:
    damaged: list[str] = field(default_factory=list)        # file paths that failed verification
    repaired_files: list[str] = field(default_factory=list)  # fixed with getSingleImage
    refetched_series: list[str] = field(default_factory=list)
    harvest: HarvestResult | None = None
    still_bad: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)          # records or files whose paths leave DIR

    @property
    def ok(self) -> bool:
        return not self.still_bad and not self.refused and (self.harvest is None or self.harvest.ok)


def _file_md5(path: Path) -> str | None:
    try:
        md5 = hashlib.md5()
        with open(path, "rb", opener=open_nofollow) as fh:
            while chunk := fh.read(1 << 20):
                md5.update(chunk)
        return md5.hexdigest()
    except OSError:
        return None


def task_from_record(rec: dict[str, Any]) -> SeriesTask:
    meta = rec.get("metadata") or {}
    return SeriesTask(
        series_uid=rec["SeriesInstanceUID"], collection=rec.get("Collection", ""),
        patient_id=rec.get("PatientID", ""), study_uid=rec.get("StudyInstanceUID", ""),
        modality=rec.get("Modality", ""),
        image_count=as_int(meta.get("ImageCount")) or len(rec.get("files", [])),
        file_size=as_int(meta.get("FileSize")) or rec.get("bytes"),
        row=dict(meta), study=rec.get("study"), patient=rec.get("patient"),
    )


async def async_repair(config: Config, *, hub: Hub | None = None) -> RepairResult:
    """Verify every file of ``config.out_dir`` and repair what fails (see the module docstring)."""
    from harvester.api import make_source
    from harvester.unpack import read_dicom_ids

    hub = hub or Hub()
    state = HarvestState(config.out_dir)
    await anyio.to_thread.run_sync(state.open)
    result = RepairResult()
    try:
        bad: dict[str, list[dict[str, Any]]] = {}

        def scan() -> None:
            # Complete series, and those whose files went missing (recovery marked them failed
            # but kept the list of what they held): both can be mended file by file. Records
            # whose paths leave DIR were refused by ``state.open``; a link on the way is refused here.
            result.refused.extend(state.refused)
            for uid, rec in state.records.items():
                if not rec.get("files"):
                    continue
                for f in rec.get("files", []):
                    try:
                        path = inside(config.out_dir, f["path"])
                    except UnsafePathError as exc:
                        result.refused.append(f"series {uid}: {exc}; not repaired")
                        continue
                    if _file_md5(path) != f["md5"]:
                        bad.setdefault(uid, []).append(f)
                        result.damaged.append(f["path"])

        await anyio.to_thread.run_sync(scan)
        if not bad:
            return result
        async with make_session(config) as session:
            source = make_source(config, session)
            client: NBIAClient | None = getattr(source, "client", None)
            refetch: list[str] = []
            for uid, files in bad.items():
                rec = state.records[uid]
                ok = client is not None
                for f in files:
                    if not ok:
                        break
                    try:
                        data = await client.single_image(uid, f["SOPInstanceUID"], rec.get("Collection"))
                    except (RequestError, HarvesterError):
                        ok = False
                        break
                    if hashlib.md5(data).hexdigest() != f["md5"]:
                        ok = False
                        break

                    def replace(rel: str = f["path"], data: bytes = data, sop: str = f["SOPInstanceUID"]) -> bool:
                        target = inside(config.out_dir, rel)   # checked again just before the write
                        tmp = state.tmp_dir / f"repair-{hashlib.sha1(str(target).encode()).hexdigest()[:16]}"
                        tmp.write_bytes(data)
                        series, got_sop, _ = read_dicom_ids(tmp)
                        if series != uid or got_sop != sop:
                            tmp.unlink()
                            return False
                        # Into a folder reached without following links, so a folder swapped for a
                        # link since the check cannot take the file out of DIR.
                        with open_dir(config.out_dir, target.parent.relative_to(config.out_dir), create=True) as parent:
                            os.replace(tmp, target.name, dst_dir_fd=parent)  # atomic: old bad file or good one
                        return True

                    try:
                        replaced = await anyio.to_thread.run_sync(replace)
                    except UnsafePathError as exc:
                        result.refused.append(f"series {uid}: {exc}; not repaired")
                        replaced = False
                    if not replaced:
                        ok = False
                        break
                    result.repaired_files.append(f["path"])
                if not ok:
                    refetch.append(uid)
                elif rec.get("status") != "complete":
                    await anyio.to_thread.run_sync(state.restore, dict(rec, status="complete", error=None))
            if refetch:
                result.refetched_series = refetch
                tasks = [task_from_record(state.records[u]) for u in refetch]
                header = {k: v for k, v in state.header.items() if k not in ("started", "finished", "schema")}
                result.harvest = await Engine(config, source, state, hub).run(tasks, header,
                                                                               refetch=frozenset(refetch))
            else:
                header = {k: v for k, v in state.header.items() if k != "schema"}
                await anyio.to_thread.run_sync(state.write_manifest, header)
        return result
    finally:
        state.close()


# ---------------------------------------------------------------- status and exports

def _load_manifest(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "harvest.json"
    try:
        doc = json.loads(read_bytes(path))   # never through a link, never blocked on a FIFO
        if not isinstance(doc.get("series"), list):
            raise ValueError
        doc["series"] = usable_records(doc["series"], str(path))  # the others are reported and skipped
        return doc
    except FileNotFoundError:
        raise UsageError(f"{path}: not found", hint="give the output directory of a harvest") from None
    except (ValueError, OSError, AttributeError, RecursionError):
        raise ManifestError(f"{path}: unreadable or not a harvester manifest") from None


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


__all__ = ["SyncDiff", "SyncResult", "RepairResult", "async_sync", "async_repair", "read_status",
           "export_tcia", "export_csv", "diff_plan", "from_date_param", "now_iso"]
