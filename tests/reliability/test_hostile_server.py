"""A hostile archive: getSeries rows with missing keys, wrong types, huge strings, ``../../x``,
NUL, Windows device names and numbers as strings, and ZIPs that lie in every header field.

Whatever the archive sends, the harvest either completes the series into sanitised paths inside
DIR or fails that series with a reason; it never prints a traceback, never writes outside DIR,
and never loses a series it had completed.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from harvest_helpers import harvest, manifest
from harvester.store.layout import safe_component
from harvester.store.state import series_key

from .handserver import HandArchive, RawEntry, deflated, dicom_series, honest_zip, md5_csv, raw_zip, serve_hand

COLLECTION = "HAND"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
MISSING = object()


@dataclass
class Case:
    label: str
    uid: Any                      # the SeriesInstanceUID value as the row carries it (any JSON)
    overrides: dict[str, Any]
    expect: str                   # complete | failed | either | absent


def base_row(uid: Any, files: list[tuple[str, bytes]], overrides: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "SeriesInstanceUID": uid, "StudyInstanceUID": "1.2.826.0.1.3680043.2.1125.1", "Collection": COLLECTION,
        "PatientID": "HAND-0001", "Modality": "CT", "SeriesNumber": 1, "SeriesDescription": "plain",
        "StudyDesc": "study", "StudyDate": "2020-01-02", "ImageCount": len(files),
        "FileSize": sum(len(d) for _, d in files),
    }
    for key, value in overrides.items():
        if value is MISSING:
            row.pop(key, None)
        else:
            row[key] = value
    return row


ROW_CASES = [
    Case("control-1", "1.2.826.0.1.3680043.2.1125.101", {}, "complete"),
    Case("control-2", "1.2.826.0.1.3680043.2.1125.102", {}, "complete"),
    Case("traversal in metadata", "1.2.826.0.1.3680043.2.1125.103",
         {"PatientID": "../../x", "StudyInstanceUID": "../../y", "SeriesDescription": "../../../etc/passwd",
          "StudyDesc": "../..", "SeriesNumber": "../1"}, "complete"),
    Case("windows device names", "1.2.826.0.1.3680043.2.1125.104",
         {"PatientID": "CON", "SeriesDescription": "NUL.txt", "StudyDesc": "AUX", "Modality": "LPT1",
          "StudyInstanceUID": "COM1"}, "complete"),
    Case("NUL and control characters", "1.2.826.0.1.3680043.2.1125.105",
         {"PatientID": "P\x00../x", "SeriesDescription": "\x00\x00\x1b[31m\t", "StudyDesc": "\r\n"}, "complete"),
    Case("huge strings", "1.2.826.0.1.3680043.2.1125.106",
         {"PatientID": "P" * 5000, "SeriesDescription": "D" * 200_000, "StudyDesc": "\u00e9" * 3000}, "complete"),
    Case("numbers as strings", "1.2.826.0.1.3680043.2.1125.107",
         {"ImageCount": "3.0", "FileSize": "__size__.0", "SeriesNumber": "007"}, "complete"),
    Case("wrong types", "1.2.826.0.1.3680043.2.1125.108",
         {"SeriesNumber": {"a": [1]}, "PatientID": 12345, "Modality": ["CT", "MR"], "StudyDate": True,
          "SeriesDescription": None, "ImageCount": None, "FileSize": "abc", "StudyInstanceUID": 1.5}, "complete"),
    Case("missing keys", "1.2.826.0.1.3680043.2.1125.109",
         {k: MISSING for k in ("StudyInstanceUID", "PatientID", "Modality", "SeriesNumber", "SeriesDescription",
                               "StudyDesc", "StudyDate", "ImageCount", "FileSize")}, "complete"),
    Case("negative and absurd counts", "1.2.826.0.1.3680043.2.1125.110",
         {"ImageCount": -3, "FileSize": "1e400"}, "complete"),
    Case("unicode tricks", "1.2.826.0.1.3680043.2.1125.111",
         {"PatientID": "\u202egnp.exe", "SeriesDescription": "e\u0301 \ufb01 \U0001f642", "StudyDesc": "\ufeff"},
         "complete"),
    Case("separators everywhere", "1.2.826.0.1.3680043.2.1125.112",
         {"PatientID": "a/b\\c:d*e?f|g<h>", "SeriesDescription": "C:\\Windows\\System32", "StudyDesc": "//srv/share"},
         "complete"),
    Case("dot names", "1.2.826.0.1.3680043.2.1125.113",
         {"PatientID": "..", "StudyDesc": ".", "SeriesDescription": "...", "StudyInstanceUID": "."}, "complete"),
    Case("count that lies", "1.2.826.0.1.3680043.2.1125.114", {"ImageCount": 999}, "failed"),
    Case("UID ../../x", "../../x", {}, "complete"),
    Case("UID CON", "CON", {}, "complete"),
    Case("UID as a JSON number", 12345, {}, "complete"),
    Case("UID with NUL", "1.2.3\x00../../x", {}, "either"),
    Case("UID 10000 characters", "9" * 10_000, {}, "either"),
    Case("UID with separators", "a/b\\c", {}, "either"),
    Case("UID with spaces", " 1.2.826.0.1.3680043.2.1125.115 ", {}, "either"),
    Case("empty UID", "", {}, "absent"),
]
#: getSeries rows that are not rows at all, or not for us; all must be ignored.
JUNK_ROWS: list[Any] = ["junk", 42, None, [1, 2], {}, {"seriesinstanceuid": "1.2.3.9", "collection": COLLECTION},
                        {"SeriesInstanceUID": None, "Collection": COLLECTION}]


def build_hand_archive(cases: list[Case]) -> tuple[HandArchive, dict[str, list[tuple[str, bytes]]]]:
    archive = HandArchive(collections=[COLLECTION])
    served: dict[str, list[tuple[str, bytes]]] = {}
    rows: list[Any] = []
    for case in cases:
        key = str(case.uid)
        files = dicom_series(key, seed=case.label)
        overrides = {k: (v.replace("__size__", str(sum(len(d) for _, d in files))) if isinstance(v, str) else v)
                     for k, v in case.overrides.items()}
        rows.append(base_row(case.uid, files, overrides))
        archive.zips[key] = honest_zip(files)
        archive.sizes[key] = [{"TotalSizeInBytes": f"{sum(len(d) for _, d in files)}.0", "ObjectCount": len(files)}]
        served[key] = files
    # the same series twice with other metadata (the first row wins), then junk
    rows.append(dict(rows[0], PatientID="A-DIFFERENT-PATIENT"))
    rows.extend(JUNK_ROWS)
    archive.series = rows
    return archive, served


def tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harvester", *args], capture_output=True, text=True, env=ENV,
                          timeout=300, stdin=subprocess.DEVNULL)


def check_outcomes(out: Path, cases: list[Case], served: dict[str, list[tuple[str, bytes]]]) -> dict[str, str]:
    """Every case ended as expected, completed ones byte-identical under safe paths inside DIR,
    failed ones with a reason and no file; returns label -> outcome."""
    recs = {r["SeriesInstanceUID"]: r for r in manifest(out)["series"]}
    root = out.resolve()
    outcomes: dict[str, str] = {}
    listed: set[Path] = set()
    for case in cases:
        key = str(case.uid)
        rec = recs.get(key)
        if case.expect == "absent":
            assert rec is None, f"{case.label}: planned although it has no usable UID"
            outcomes[case.label] = "absent"
            continue
        assert rec is not None, f"{case.label}: neither completed nor failed (silently dropped)"
        outcome = "complete" if rec["status"] == "complete" else "failed"
        outcomes[case.label] = outcome
        if case.expect != "either":
            assert outcome == case.expect, (case.label, rec.get("error"))
        if outcome == "failed":
            assert rec["error"] and rec["error"].strip(), f"{case.label}: failed without a reason"
            assert not rec["files"]
            continue
        want = sorted(hashlib.md5(d).hexdigest() for _, d in served[key])
        assert sorted(f["md5"] for f in rec["files"]) == want, case.label
        for part in PurePosixPath(rec["path"]).parts:
            assert part == safe_component(part) and part not in (".", ".."), (case.label, part)
            assert len(part.encode()) <= 120
        for f in rec["files"]:
            path = (out / f["path"]).resolve()
            assert path.is_relative_to(root), (case.label, f["path"])
            assert hashlib.md5(path.read_bytes()).hexdigest() == f["md5"]
            assert PurePosixPath(f["path"]).name == safe_component(PurePosixPath(f["path"]).name)
            listed.add(path)
    for path in out.rglob("*"):
        rel = path.relative_to(out)
        if path.is_file() and rel.parts[0] not in (".harvester", "licenses") and str(rel) not in (
                "harvest.json", "metadata.csv"):
            assert path.resolve() in listed, f"unlisted file under DIR: {rel}"
    return outcomes


def test_hostile_rows_complete_sanitised_or_fail_with_a_reason(tmp_path, figures):
    archive, served = build_hand_archive(ROW_CASES)
    work = tmp_path / "w"
    out = work / "d1" / "d2" / "d3" / "out"  # deep, so that a climb of up to four levels stays watched
    work.mkdir()
    query = work / "q.yaml"
    query.write_text(yaml.safe_dump({"select": [{"collection": COLLECTION}]}))
    before = tree(tmp_path)
    with serve_hand(archive) as url:
        proc = run_cli("run", str(query), "-o", str(out), "--api-url", url, "--series-retries", "1",
                       "--retries", "2", "--timeout", "5", "--no-progress", "--quiet")
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    outcomes = check_outcomes(out, ROW_CASES, served)
    failed_lines = [line for line in proc.stdout.splitlines() if line.startswith("  failed: ")]
    assert len(failed_lines) == sum(1 for o in outcomes.values() if o == "failed")
    outside = [p for p in tree(tmp_path) - before if not p.resolve().is_relative_to(out.resolve())
               and not out.resolve().is_relative_to(p.resolve())]
    assert not outside, outside
    doc = manifest(out)
    assert json.dumps(doc)  # the manifest stays valid JSON whatever the archive sent
    assert (out / "metadata.csv").read_text("utf-8").startswith("Series UID,")
    figures.record("hostile", family="getSeries rows (CLI run)", inputs=len(ROW_CASES) + len(JUNK_ROWS) + 1,
                   outcomes=outcomes)


def test_completed_series_survive_a_hostile_archive(tmp_path, figures):
    """Series completed once stay complete and untouched when the archive turns hostile: a rerun
    skips them, and a sync that sees them 'changed' keeps the old copy while the attack fails."""
    cases = [c for c in ROW_CASES if c.expect == "complete"]
    archive, served = build_hand_archive(cases)
    out = tmp_path / "out"
    query = tmp_path / "q.yaml"
    query.write_text(yaml.safe_dump({"select": [{"collection": COLLECTION}]}))
    flags = ["--api-url", "", "--series-retries", "1", "--retries", "2", "--timeout", "5", "--no-progress", "--quiet"]
    with serve_hand(archive) as url:
        flags[1] = url
        first = run_cli("run", str(query), "-o", str(out), *flags)
        assert first.returncode == 0, first.stdout[-2000:]
    complete = {r["SeriesInstanceUID"]: r for r in manifest(out)["series"] if r["status"] == "complete"}
    assert len(complete) == len(cases)
    snapshot = {f["path"]: f["md5"] for r in complete.values() for f in r["files"]}
    # the archive turns hostile: new counts and metadata, and every ZIP is now an attack
    for row in archive.series:
        if isinstance(row, dict) and row.get("SeriesInstanceUID") is not None:
            row.update(ImageCount=4, PatientID="../../changed", DateReleased="2099-01-01 00:00:00.0")
    for key, files in served.items():
        evil = RawEntry("../../../escaped.dcm", files[0][1])
        archive.zips[key] = honest_zip(files, extra=[evil], md5_files=files + [("escaped.dcm", files[0][1])])
    downloads = dict(archive.downloads)
    with serve_hand(archive) as url:
        flags[1] = url
        rerun = run_cli("run", str(query), "-o", str(out), *flags)
        assert rerun.returncode == 0 and archive.downloads == downloads, "a complete series was fetched again"
        synced = run_cli("sync", str(query), "-o", str(out), *[f for f in flags if f not in ("--series-retries", "1")])
    assert "Traceback" not in synced.stderr + synced.stdout
    # every refresh failed: exit 1, each listed with its reason, and the old copy is kept
    assert synced.returncode == 1, (synced.stdout[-2000:], synced.stderr[-2000:])
    refresh_failures = [line for line in synced.stdout.splitlines() if line.startswith("  failed: ")]
    assert len(refresh_failures) == len(cases)
    assert all("copy already on disk is kept" in line for line in refresh_failures)
    assert sum(archive.downloads.values()) > sum(downloads.values()), "sync did not try the changed series"
    after = {r["SeriesInstanceUID"]: r for r in manifest(out)["series"]}
    for uid in complete:
        assert after[uid]["status"] == "complete", f"{uid}: a verified copy was lost to a failed refresh"
    assert {f["path"]: f["md5"] for uid in complete for f in after[uid]["files"]} == snapshot
    for path, md5 in snapshot.items():
        assert hashlib.md5((out / path).read_bytes()).hexdigest() == md5
    assert not list(tmp_path.rglob("escaped.dcm"))
    figures.record("hostile", family="archive turns hostile after completion (run + sync)",
                   inputs=2 * len(cases), kept=len(complete))


@pytest.mark.parametrize("body", ["a string", 42, None, {"nested": {"deep": [1, 2]}}, [[["x"]]]],
                         ids=["string", "number", "null", "object", "nested-lists"])
def test_getseries_body_that_is_not_rows(tmp_path, body, figures):
    archive = HandArchive(series=body, collections=[COLLECTION])
    query = tmp_path / "q.yaml"
    query.write_text(yaml.safe_dump({"select": [{"collection": COLLECTION}]}))
    with serve_hand(archive) as url:
        proc = run_cli("run", str(query), "-o", str(tmp_path / "out"), "--api-url", url, "--retries", "2",
                       "--timeout", "5", "--no-progress", "--quiet")
    assert "Traceback" not in proc.stderr + proc.stdout
    if proc.returncode == 0:  # read as "no series": nothing to do, and it says so
        assert "0 planned, 0 complete (0 now, 0 before), 0 failed, 0 unavailable" in proc.stdout
    else:
        assert proc.returncode == 3, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("harvester: error:") and "getSeries" in lines[0]
    figures.record("hostile", family="getSeries bodies that are not rows", inputs=1)


# ------------------------------------------------------------------------------ ZIP entries

OTHER_SERIES = "1.2.826.0.1.3680043.2.1125.9999"  # as long as the UIDs of zip_cases' series


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def zip_cases() -> list[tuple[str, str, Any]]:
    """(label, expect, builder(files) -> ZIP bytes); every builder gets the series' 3 honest files."""
    def entries(files: list[tuple[str, bytes]], **changes: dict[str, Any]) -> list[RawEntry]:
        out = [RawEntry("LICENSE", b"CC BY 4.0\n")]
        for i, (name, data) in enumerate(files):
            out.append(RawEntry(**{"name": name, "data": data, **changes.get(str(i), {})}))
        return out

    def with_md5(es: list[RawEntry], files: list[tuple[str, bytes]]) -> bytes:
        return raw_zip(es + [RawEntry("md5hashes.csv", md5_csv(files))])

    def renamed(files: list[tuple[str, bytes]], names: list[str]) -> bytes:
        new = [(n, d) for n, (_, d) in zip(names, files)]
        return honest_zip(new)

    bomb_plain = bytes(8 << 20)
    return [
        ("wrong CRC", "failed", lambda f: with_md5(
            entries(f, **{"1": {"crc": zlib.crc32(f[1][1]) ^ 1}}), f)),
        ("right CRC, altered bytes (MD5 mismatch, repair refused)", "failed",
         lambda f: with_md5([RawEntry("LICENSE", b"x")] + [RawEntry(n, _flip_last(d) if i == 1 else d)
                                                             for i, (n, d) in enumerate(f)], f)),
        ("extreme ratio: 8 MiB of zeros in 8 KB", "failed", lambda f: honest_zip(
            f, extra=[RawEntry("1-04.dcm", deflated(bomb_plain), method=8, plain=bomb_plain)])),
        ("bomb whose header claims a small size", "failed", lambda f: with_md5(
            entries(f, **{"1": {"data": deflated(bytes(20 << 20)), "method": 8, "plain": f[1][1]}}), f)),
        ("declared size longer than the data", "failed", lambda f: with_md5(
            entries(f, **{"1": {"size": len(f[1][1]) + 100}}), f)),
        ("local and central names differ", "failed", lambda f: with_md5(
            entries(f, **{"1": {"local_name": "../../evil-local.dcm"}}), f)),
        ("encrypted flag", "failed", lambda f: with_md5(entries(f, **{"1": {"flags": 1}}), f)),
        ("unknown compression method", "failed", lambda f: with_md5(entries(f, **{"1": {"method": 99}}), f)),
        ("backslash traversal", "failed", lambda f: renamed(f, ["1-01.dcm", "..\\..\\evil-bs.dcm", "1-03.dcm"])),
        ("drive letter", "failed", lambda f: renamed(f, ["1-01.dcm", "C:\\evil-drive.dcm", "1-03.dcm"])),
        ("drive-relative", "failed", lambda f: renamed(f, ["1-01.dcm", "C:evil-drive2.dcm", "1-03.dcm"])),
        ("absolute path", "failed", lambda f: renamed(f, ["1-01.dcm", "/tmp/evil-abs-hand.dcm", "1-03.dcm"])),
        ("NUL in a name", "failed", lambda f: renamed(f, ["1-01.dcm", "1-02.dcm\x00../../x", "1-03.dcm"])),
        ("names equal but for case", "failed", lambda f: renamed(f, ["1-01.dcm", "1-01.DCM", "1-03.dcm"])),
        ("names equal once sanitised", "failed", lambda f: renamed(f, ["a*b.dcm", "a?b.dcm", "1-03.dcm"])),
        ("symlink posing as a .dcm", "failed", lambda f: with_md5(
            entries(f, **{"1": {"external_attr": (0o120777 << 16)}}), f)),
        ("no central directory", "failed", lambda f: raw_zip(entries(f), central=False)),
        ("ZIP signature then garbage", "failed", lambda f: b"PK\x03\x04" + hashlib.sha512(b"x").digest() * 40),
        ("empty ZIP", "failed", lambda f: raw_zip([])),
        ("same instance twice", "failed", lambda f: honest_zip([f[0], ("1-02.dcm", f[0][1]), f[2]])),
        ("no md5hashes.csv", "failed", lambda f: raw_zip(entries(f))),
        ("md5hashes.csv names other files", "failed", lambda f: raw_zip(
            entries(f) + [RawEntry("md5hashes.csv", md5_csv([("x" + n, d) for n, d in f]))])),
        ("not DICOM (MD5 listed)", "failed", lambda f: honest_zip([f[0], ("1-02.dcm", os.urandom(len(f[1][1]))), f[2]])),
        ("DICOM of another series", "failed", lambda f: honest_zip(  # same size: only the UID tells
            [f[0], ("1-02.dcm", dicom_series(OTHER_SERIES, 2, seed="other")[1][1]), f[2]])),
        ("Windows device names as file names", "complete", lambda f: renamed(f, ["CON", "nul.dcm", "com1.txt"])),
        ("400-character file name", "complete", lambda f: renamed(f, ["n" * 400 + ".dcm", "1-02.dcm", "1-03.dcm"])),
        ("entries in sub-folders", "complete", lambda f: renamed(f, ["a/b/1-01.dcm", "c/1-02.dcm", "1-03.dcm"])),
        ("unicode file names", "complete", lambda f: renamed(f, ["\u00e9\u202e.dcm", "\ufb01.dcm", "\U0001f642.dcm"])),
        ("directory entries", "complete", lambda f: raw_zip(
            [RawEntry("dir/", b""), RawEntry("dir/sub/", b"")] + entries(f)[1:] + [RawEntry("md5hashes.csv", md5_csv(f))])),
        ("deflated entries", "complete", lambda f: raw_zip(
            [RawEntry(n, deflated(d), method=8, plain=d) for n, d in f] + [RawEntry("md5hashes.csv", md5_csv(f))])),
        ("trailing dots and spaces", "either", lambda f: renamed(f, ["1-01.dcm. ", " 1-02.dcm", "1-03.dcm..."])),
    ]


def test_hostile_zip_entries_fail_alone_or_land_sanitised(tmp_path, figures):
    cases = zip_cases()
    archive = HandArchive(collections=[COLLECTION])
    uids: dict[str, str] = {}
    served: dict[str, list[tuple[str, bytes]]] = {}
    rows = []
    for n, (label, _, build) in enumerate(cases + [("control", "complete", honest_zip)]):
        uid = f"1.2.826.0.1.3680043.2.1125.2{n:03d}"
        files = dicom_series(uid, seed=label)
        uids[label], served[uid] = uid, files
        archive.zips[uid] = build(files)
        rows.append(base_row(uid, files, {"SeriesDescription": label}))
    archive.series = rows
    work = tmp_path / "w"
    out = work / "d1" / "d2" / "out"
    work.mkdir()
    before = tree(tmp_path)
    with serve_hand(archive) as url:
        result = harvest(url, out, {"select": [{"collection": COLLECTION}]}, series_retries=1, retries=2)
    failed = dict(result.failed)
    cases_as = [Case(label, uids[label], {}, expect) for label, expect, _ in cases] + [
        Case("control", uids["control"], {}, "complete")]
    outcomes = check_outcomes(out, cases_as, served)
    for label, expect, _ in cases:
        if outcomes[label] == "failed":
            assert failed.get(uids[label]), f"{label}: accepted, or failed without a reason"
    outside = [p for p in tree(tmp_path) - before if not p.resolve().is_relative_to(out.resolve())
               and not out.resolve().is_relative_to(p.resolve())]
    assert not outside, outside
    for name in ("evil-local.dcm", "evil-bs.dcm", "evil-drive.dcm", "evil-drive2.dcm"):
        assert not list(tmp_path.rglob(f"*{name}*")), name
    assert not Path("/tmp/evil-abs-hand.dcm").exists()
    assert not list((out / ".harvester" / "tmp").iterdir())
    reasons = {label: failed.get(uids[label], "") for label, _, _ in cases}
    figures.record("hostile", family="ZIP entries (hand-built, end to end)", inputs=len(cases), outcomes=outcomes,
                   reasons=reasons)


def test_series_key_is_safe_for_any_uid():
    for uid in ("../../x", "\x00", "CON", "9" * 10_000, "a/b\\c", ""):
        key = series_key(uid)
        assert key == safe_component(key) and len(key) == 20
