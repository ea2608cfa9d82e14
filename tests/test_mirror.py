"""Mirroring: sync against an archive that grows and changes, prune, dry run, repair, status, export."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import yaml

from harvest_helpers import assert_identical, commits, kill_after_progress, manifest, test_config
from harvester.api import verify_tree
from harvester.errors import UsageError
from harvester.store.tree import export_csv, export_tcia, read_status
from harvester.operations import async_repair, async_sync
from harvester.source.nbia.source import from_date_param
from harvester.query import load_query, query_from_dict
from harvester.server.archive import Archive
from harvester.server.synthetic import SyntheticSpec, build_synthetic
from harvester.server.testing import serve_in_thread

BEFORE = "collections=1,patients=2,studies=1,series=2,instances=3,size=4KiB,seed=21"
AFTER = "collections=1,patients=3,studies=2,series=2,instances=3,size=4KiB,seed=21"  # a superset of BEFORE


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    cache = Path(os.environ.get("HARVESTER_TEST_CACHE") or tmp_path_factory.mktemp("syn"))
    before = build_synthetic(SyntheticSpec.parse(BEFORE), cache)
    grown = build_synthetic(SyntheticSpec.parse(AFTER), cache)
    assert {r.uid for r in before.records()} < {r.uid for r in grown.records()}
    today = dt.date.today().isoformat() + " 00:00:00.0"
    records = []
    old = sorted(r.uid for r in before.records())
    shrunk, rereleased = old[0], old[1]
    for rec in grown.records():
        if rec.uid == shrunk:  # the server dropped an instance: ImageCount and FileSize change
            inst = rec.instances[:-1]
            row = dict(rec.row, ImageCount=len(inst), FileSize=sum(i.size for i in inst), DateReleased=today)
            rec = dataclasses.replace(rec, row=row, instances=inst)
        elif rec.uid == rereleased:  # same counts, re-released: only getUpdatedSeries tells
            rec = dataclasses.replace(rec, row=dict(rec.row, DateReleased=today))
        records.append(rec)
    return before, Archive(records), shrunk, rereleased


def query_all(archive) -> dict:
    return {"select": [{"collection": c} for c in sorted({r.row["Collection"] for r in archive.records()})]}


def sync(base_url, out, query, **kw):
    config = test_config(base_url, out)
    return anyio.run(lambda: async_sync(query_from_dict(query, origin="test"), config, **kw))


def test_from_date_formats():
    day = dt.date(2024, 3, 7)
    assert from_date_param(day, "http://h/nbia-api/services/v4") == "03-07-2024"
    assert from_date_param(day, "http://h/nbia-api/services/v2") == "07/03/2024"
    assert from_date_param(day, "http://h/nbia-api/services/v1") == "07/03/2024"


def test_dry_run_into_a_new_directory_creates_nothing(archives, tmp_path):
    before, *_ = archives
    out = tmp_path / "new" / "mirror"
    with serve_in_thread(before) as srv:
        dry = sync(srv.base_url, out, query_all(before), dry_run=True)
    assert sorted(dry.diff.new) == sorted(r.uid for r in before.records())
    assert not (tmp_path / "new").exists()


def test_sync_fetches_exactly_what_is_new_or_changed(archives, tmp_path):
    before, after, shrunk, rereleased = archives
    out = tmp_path / "mirror"
    with serve_in_thread(before) as srv:
        first = sync(srv.base_url, out, query_all(before))
        assert first.harvest.ok
    assert manifest(out)["last_sync"]
    with serve_in_thread(after) as srv:
        dry = sync(srv.base_url, out, query_all(after), dry_run=True)
        new = sorted({r.uid for r in after.records()} - {r.uid for r in before.records()})
        assert sorted(dry.diff.new) == new
        assert sorted(dry.diff.changed) == sorted([shrunk, rereleased])
        assert dry.diff.removed == []
        assert srv.stats.downloads == {}, "a dry run downloads nothing"
        assert json.loads((out / "harvest.json").read_text())["totals"]["complete"] == len(before.records())

        result = sync(srv.base_url, out, query_all(after))
        assert result.harvest.ok, result.harvest.failed
        assert sorted(srv.stats.downloads) == sorted(new + [shrunk, rereleased])
        assert all(n == 1 for n in srv.stats.downloads.values())
        assert srv.stats.requests.get("getUpdatedSeries", 0) >= 1
    assert_identical(out, after, sorted(r.uid for r in after.records()))
    assert verify_tree(out).ok
    # a third sync against the same archive has nothing to do
    with serve_in_thread(after) as srv:
        again = sync(srv.base_url, out, query_all(after))
        assert again.harvest.ok and srv.stats.downloads == {}


def test_sync_reads_release_dates_in_either_versions_form(archives, tmp_path):
    """A tree harvested through /v2/ records DateReleased as '2026-01-02 00:00:00.0'; v4 sends the
    same day as '01-02-2026'. Listed by getUpdatedSeries, such a series is still unchanged."""
    before, _, _, _ = archives
    today = dt.date.today().isoformat() + " 00:00:00.0"  # released now: getUpdatedSeries lists it
    fresh = Archive([dataclasses.replace(r, row=dict(r.row, DateReleased=today)) for r in before.records()])
    out = tmp_path / "mirror"
    with serve_in_thread(fresh) as srv:
        assert sync(srv.url("", "v2").rstrip("/"), out, query_all(fresh)).harvest.ok
        recorded = {s["metadata"]["DateReleased"] for s in manifest(out)["series"]}
        assert recorded == {today}
        dry = sync(srv.base_url, out, query_all(fresh), dry_run=True)
        assert srv.stats.requests.get("getUpdatedSeries", 0) == 1  # the v4 sync asked, and it listed them all
    assert dry.diff.changed == [] and dry.diff.new == []
    assert len(dry.diff.unchanged) == len(fresh)


def test_prune_moves_unselected_series_to_trash(archives, tmp_path):
    before, _after, _s, _r = archives
    out = tmp_path / "mirror"
    with serve_in_thread(before) as srv:
        assert sync(srv.base_url, out, query_all(before)).harvest.ok
        patient = sorted({r.row["PatientID"] for r in before.records()})[0]
        keep = {"select": [{"collection": before.records()[0].row["Collection"], "patients": [patient]}]}
        dropped = sorted(r.uid for r in before.records() if r.row["PatientID"] != patient)
        dry = sync(srv.base_url, out, keep, prune=True, dry_run=True)
        assert sorted(dry.diff.removed) == dropped
        paths = {r["SeriesInstanceUID"]: r["path"] for r in manifest(out)["series"]}
        assert all((out / paths[u]).exists() for u in dropped), "dry run must not move anything"
        no_prune = sync(srv.base_url, out, keep)
        assert no_prune.pruned == [] and all((out / paths[u]).exists() for u in dropped)
        result = sync(srv.base_url, out, keep, prune=True)
        assert sorted(result.pruned) == dropped
    listed = {r["SeriesInstanceUID"] for r in manifest(out)["series"]}
    assert not listed & set(dropped)
    for uid in dropped:
        assert not (out / paths[uid]).exists()
        trashed = list((out / ".harvester" / "trash").rglob(Path(paths[uid]).name))
        assert trashed, f"{uid} is not in the trash"
    assert verify_tree(out).ok


def test_prune_stops_when_a_selector_matches_nothing(archives, tmp_path):
    """A typo (modality: MRI for MR) made a selector match nothing, and --prune moved every series
    it was meant to keep into the trash, with a warning. Now nothing moves: a usage error."""
    before, *_ = archives
    out = tmp_path / "mirror"
    with serve_in_thread(before) as srv:
        assert sync(srv.base_url, out, query_all(before)).harvest.ok
        collection = before.records()[0].row["Collection"]
        typo = {"select": [{"collection": collection, "modality": "MRI"}]}
        paths = [r["path"] for r in manifest(out)["series"]]
        with pytest.raises(UsageError, match="--prune stopped .* selector 1 .* matches no series"):
            sync(srv.base_url, out, typo, prune=True)
        assert all((out / p).is_dir() for p in paths) and not (out / ".harvester" / "trash").exists()
        assert len(manifest(out)["series"]) == len(paths)
        assert sync(srv.base_url, out, typo, prune=True, dry_run=True).diff.removed   # a dry run still shows it
    assert verify_tree(out).ok


def test_repair_refetches_one_instance(archives, tmp_path):
    before, *_ = archives
    out = tmp_path / "mirror"
    with serve_in_thread(before) as srv:
        assert sync(srv.base_url, out, query_all(before)).harvest.ok
        rec = manifest(out)["series"][0]
        victim = out / rec["files"][1]["path"]
        data = bytearray(victim.read_bytes())
        data[-3] ^= 0x55
        victim.write_bytes(bytes(data))
        missing = out / manifest(out)["series"][1]["files"][0]["path"]
        missing.unlink()
        downloads = dict(srv.stats.downloads)
        config = test_config(srv.base_url, out)
        rep = anyio.run(lambda: async_repair(config))
        assert sorted(rep.damaged) == sorted([str(victim.relative_to(out)), str(missing.relative_to(out))])
        assert len(rep.repaired_files) == 2 and rep.refetched_series == []
        assert srv.stats.requests.get("getSingleImage", 0) == 2
        assert srv.stats.downloads == downloads, "repair must not refetch whole series"
    assert verify_tree(out).ok
    assert_identical(out, before, sorted(r.uid for r in before.records()))


def test_status_and_exports(archives, tmp_path):
    before, *_ = archives
    out = tmp_path / "mirror"
    with serve_in_thread(before) as srv:
        assert sync(srv.base_url, out, query_all(before)).harvest.ok
    st = read_status(out)
    (name, c), = st["collections"].items()
    assert c["complete"] == len(before.records()) and c["failed"] == 0
    assert c["files"] == sum(len(r.instances) for r in before.records())
    assert st["last_sync"] and st["disk_bytes"] >= c["bytes"] > 0
    cart = tmp_path / "out.tcia"
    assert export_tcia(out, cart) == len(before.records())
    q = load_query(cart)  # our own cart parser reads it back: the portal's format
    assert sorted(q.selectors[0].series) == sorted(r.uid for r in before.records())
    table = tmp_path / "out.csv"
    export_csv(out, table)
    rows = table.read_text().splitlines()
    assert rows[0].startswith("SeriesInstanceUID,Collection") and len(rows) == 1 + len(before.records())


@pytest.mark.slow
def test_sync_killed_and_rerun_ends_like_an_uninterrupted_one(archives, tmp_path):
    before, after, *_ = archives
    q = tmp_path / "q.yaml"
    q.write_text(yaml.safe_dump(query_all(after)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    with serve_in_thread(before) as srv:
        for out in (reference, killed):
            assert sync(srv.base_url, out, query_all(before)).harvest.ok
    with serve_in_thread(after, faults="latency=20ms,seed=4") as srv:
        # Two workers limited to 24 KB/s in all: the 120 KB sync takes about five seconds, so the kills,
        # each at a random moment after the run's first commit, land mid-run. (The server's per-download
        # rate would not slow series this small: they fit in its burst.)
        args = [sys.executable, "-m", "harvester", "sync", str(q), "--api-url", srv.base_url, "--timeout", "5",
                "--workers", "2", "--max-rate", "24KB", "--no-progress", "--quiet"]
        assert subprocess.run([*args, "-o", str(reference)], env=env, capture_output=True, timeout=300).returncode == 0
        rng = random.Random(7)
        kills, start = 0, len(commits(killed))
        for _ in range(3):
            proc = subprocess.Popen([*args, "-o", str(killed)], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            kills += kill_after_progress(proc, killed, rng.uniform(0, 0.3))
        assert kills == 3
        to_fetch = len(after.records()) - len(before.records()) + 2  # new, plus shrunk and rereleased
        assert len(commits(killed)) - start < to_fetch, "the kills should land mid-sync"
        final = subprocess.run([*args, "-o", str(killed)], env=env, capture_output=True, text=True, timeout=300)
        assert final.returncode == 0, final.stderr

    def state(out: Path) -> dict:
        return {r["SeriesInstanceUID"]: (r["status"], r["path"], sorted((f["path"], f["md5"]) for f in r["files"]))
                for r in manifest(out)["series"]}

    assert state(killed) == state(reference)
    assert verify_tree(killed).ok
    assert_identical(killed, after, sorted(r.uid for r in after.records()))


def test_repair_refetches_the_series_when_a_record_names_no_instance(archives, tmp_path):
    """A file record without a usable SOPInstanceUID (hand-edited, or hostile) cannot be asked
    for alone: the series is refetched whole, never a KeyError."""
    before, *_ = archives
    out = tmp_path / "mirror"
    with serve_in_thread(before) as srv:
        assert sync(srv.base_url, out, query_all(before)).harvest.ok
        doc = manifest(out)
        rec = doc["series"][0]
        victim = out / rec["files"][0]["path"]
        victim.write_bytes(b"damaged")
        del rec["files"][0]["SOPInstanceUID"]
        rec["files"][1]["SOPInstanceUID"] = ["not", "a", "uid"]
        (out / "harvest.json").write_text(json.dumps(doc))
        # the state database and the journal go: harvest.json is then what the state reads (as a
        # harvest made before the database, or a DIR someone sent without its .harvester)
        for name in ("journal.jsonl", "state.db", "state.db-wal", "state.db-shm"):
            (out / ".harvester" / name).unlink(missing_ok=True)
        rep = anyio.run(lambda: async_repair(test_config(srv.base_url, out)))
        assert rep.refetched_series == [rec["SeriesInstanceUID"]] and rep.repaired_files == []
        assert rep.harvest is not None and rep.harvest.ok
        assert srv.stats.requests.get("getSingleImage", 0) == 0
    assert verify_tree(out).ok
