"""What a harvest tree holds, for people and tools: ``read_status``, ``export_tcia``,
``export_csv``. Each reads harvest.json through ``harvester.store.manifest.read_manifest``
(``UsageError`` when absent, ``ManifestError`` when unreadable) and skips unusable records.

Sync and repair live in ``harvester.operations``.
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import os
from pathlib import Path
from typing import Any

from harvester.redact import redact
from harvester.store.state import now_iso, usable_records, write_output
from harvester.store.manifest import read_manifest

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


__all__ = ["read_status", "export_tcia", "export_csv", "now_iso"]
