"""The readers of a harvest (verify, status, report, the exports, sync's diff) read the state
database series by series: their memory does not grow with the number of files recorded, and
what they print is what they printed when they read harvest.json whole."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harvester.display import status_line
from harvester.events import Event, Tally
from harvester.report import render_report
from harvester.store.state import HarvestState
from harvester.store.tree import export_csv, export_tcia, read_status, verify_tree

FILES = 2          # files per series: small, so that the records (not the bytes) are what grows
BODY = b"x" * 8
MD5 = hashlib.md5(BODY).hexdigest()


def _record(i: int) -> dict[str, Any]:
    uid = f"1.2.826.0.1.3680043.10.{i}"
    path = f"C{i % 3}/P{i:05d}/{uid}"
    files = [{"path": f"{path}/1-{k}.dcm", "size": len(BODY), "md5": MD5, "SOPInstanceUID": f"{uid}.{k}"}
             for k in range(1, FILES + 1)]
    failed = i % 50 == 7 and i < 300   # the same six failed series at every size
    return {"SeriesInstanceUID": uid, "Collection": f"C{i % 3}", "PatientID": f"P{i:05d}",
            "StudyInstanceUID": f"{uid}.0", "Modality": "CT" if i % 2 else "MR",
            "status": "failed" if failed else "complete", "path": path, "bytes": len(BODY) * FILES,
            "attempts": 1, "error": "network (retry later)" if failed else None,
            "completed": f"2026-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}.000Z",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "files": [] if failed else files,
            "metadata": {"SeriesInstanceUID": uid, "SeriesDescription": f"series {i}"}}


def _harvest(out: Path, series: int) -> Path:
    """A harvest of ``series`` records (six of them failed, one in 50 of the first 300) with their files, recorded in one
    transaction (with a run event and a commit event each, as a run writes them), exported."""
    state = HarvestState(out)
    state.open()
    try:
        db = state.db
        assert db is not None
        with db.transaction():
            db.add_event("run", "2026-01-01T00:00:00.000Z", {"series": series, "todo": series})
            for i in range(series):
                rec = _record(i)
                db.put(rec["SeriesInstanceUID"], rec, "the state database")
                db.add_event(rec["status"] if rec["status"] == "failed" else "commit", rec["completed"],
                             {"uid": rec["SeriesInstanceUID"], "status": rec["status"], "bytes": rec["bytes"],
                              "attempts": 1})
                for f in rec["files"]:
                    (out / f["path"]).parent.mkdir(parents=True, exist_ok=True)
                    (out / f["path"]).write_bytes(BODY)
        state.write_manifest({"api_url": "https://nbia.example/v4", "layout": "nbia", "started": "2026-01-01T00:00:00Z",
                              "finished": "2026-01-01T01:00:00Z", "last_sync": "2026-01-01T00:00:00Z"})
    finally:
        state.close()
    return out


@pytest.fixture(scope="module")
def harvests(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same harvest at two sizes, the second four times the first (and well past the
    database reader's batch of 256 rows)."""
    base = tmp_path_factory.mktemp("readers")
    return _harvest(base / "small", 300), _harvest(base / "large", 1200)


#: run in a process of its own by ``_peak``: this module's reader ``name`` over ``out``, once to
#: warm imports and caches, then again under tracemalloc; prints the peak
_PEAK = """
import importlib.util, sys, tracemalloc
from pathlib import Path
spec = importlib.util.spec_from_file_location("readers_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
read, out = module.READERS[sys.argv[2]], Path(sys.argv[3])
read(out)
tracemalloc.start()
read(out)
print(tracemalloc.get_traced_memory()[1])
"""


def _peak(name: str, out: Path) -> int:
    """The peak of Python memory of reader ``name`` over ``out``, in a process of its own: in the
    suite's process the other tests' threads and a large old heap (whose garbage waits for a
    rare full collection) were counted with it (one CI run measured verify at 7x)."""
    proc = subprocess.run([sys.executable, "-c", _PEAK, __file__, name, str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


READERS: dict[str, Callable[[Path], Any]] = {
    "verify": verify_tree,
    "status": read_status,
    "report": render_report,
    "export --csv": lambda out: export_csv(out, out.parent / f"{out.name}.csv"),
    "export --tcia": lambda out: export_tcia(out, out.parent / f"{out.name}.tcia"),
}


@pytest.fixture(scope="module")
def sized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two harvests for the memory test, the second four times the first, both several times the
    database reader's batch of 256 rows: a reader holds a batch or two whatever the size, so with
    a first size near one batch (300) the two peaks differed by the second batch's rows alone
    (1.9-2.0x for the report), not by anything held per series."""
    base = tmp_path_factory.mktemp("sized")
    return _harvest(base / "small", 600), _harvest(base / "large", 2400)


@pytest.mark.parametrize("name", list(READERS))
def test_a_reader_holds_no_record_per_series(sized: tuple[Path, Path], name: str) -> None:
    """Four times the series (and files) recorded: the reader's peak of Python memory grows by
    far less than four times (reading harvest.json whole, or keeping every record, grew about
    fourfold: 3.5-4x here). A reader holds one line per failed series (the report's and verify's
    failure lists): both sizes have the same six, so what grows is only what is held per series."""
    small, large = sized
    peaks = [_peak(name, out) for out in (small, large)]   # imports and caches warmed: the reading alone
    assert peaks[1] < 2 * peaks[0], (name, peaks)


def test_what_the_readers_say_is_what_harvest_json_says(harvests: tuple[Path, Path], tmp_path: Path) -> None:
    """status, verify and the report from the database are the same as from harvest.json
    alone (the same harvest without its .harvester, as a DIR sent without it is read)."""
    small, _ = harvests
    alone = tmp_path / "alone"
    shutil.copytree(small, alone, ignore=shutil.ignore_patterns(".harvester"))
    from_db, from_json = read_status(small), read_status(alone)
    assert {**from_db, "dir": None, "disk_bytes": None} == {**from_json, "dir": None, "disk_bytes": None}
    assert from_db["totals"] == {"series": 300, "complete": 294, "failed": 6, "unavailable": 0,
                                 "files": 588, "bytes": 588 * len(BODY)}
    v_db, v_json = verify_tree(small), verify_tree(alone)
    assert (v_db.summary(), v_db.files, v_db.bytes) == (v_json.summary(), v_json.files, v_json.bytes)
    assert v_db.summary() == "300 series checked: 294 intact, 6 failed, 0 missing, 0 damaged files, 0 extra files"
    assert [r["SeriesInstanceUID"] for r in v_db.failed] == [r["SeriesInstanceUID"] for r in v_json.failed]
    page_db, page_json = render_report(small), render_report(alone)
    for ident in ('id="by-collection"', 'id="by-modality"', 'id="failures"', 'id="total-files"'):
        start = page_db.index(ident)
        end = page_db.index("</table>" if "total" not in ident else "</div></div>", start)
        assert page_db[start:end] == page_json[page_json.index(ident):page_json.index(ident) + end - start]


def test_verify_says_what_it_will_check_before_it_reads_a_file(harvests: tuple[Path, Path]) -> None:
    """The totals (from the database's columns) come first, then one call per file; they add
    up to them."""
    small, _ = harvests
    calls: list[tuple[str, int, int]] = []
    result = verify_tree(small, on_total=lambda files, size: calls.append(("total", files, size)),
                         on_file=lambda size: calls.append(("file", 1, size)))
    assert calls[0] == ("total", 588, 588 * len(BODY)) and all(kind == "file" for kind, *_ in calls[1:])
    assert len(calls) - 1 == result.files == 588 and sum(size for *_, size in calls[1:]) == result.bytes


def test_verify_reports_extra_files_but_not_a_series_folder_inside_another(harvests: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    """Extra files are found without a set of every recorded path: a file no record lists is
    extra, a series folder below another's is that series' (the database knows its folders)."""
    small, _ = harvests
    out = tmp_path / "extra"
    shutil.copytree(small, out)
    rec = _record(1)
    (out / rec["path"] / "stray.txt").write_bytes(b"?")
    (out / rec["path"] / "sub").mkdir()
    (out / rec["path"] / "sub" / "deeper.dcm").write_bytes(b"?")
    result = verify_tree(out)
    assert sorted(result.extra) == [f"{rec['path']}/stray.txt", f"{rec['path']}/sub/deeper.dcm"]
    assert result.damaged_series == 1 and result.intact == 293


def test_the_verify_line_counts_against_the_totals_with_an_eta() -> None:
    """Once verify knows what it will check, the line is done/total in files and bytes, with an
    ETA from whichever of the two is further behind; before that, the counts alone."""
    now = [0.0]
    tally = Tally(clock=lambda: now[0])
    tally(Event("verify"))
    tally(Event("checked", bytes=10, files=1))
    assert status_line(tally, 100)[1].startswith("verify: 1 files  10 B checked")
    tally(Event("verify", data={"files": 100, "bytes": 1000}))
    for _ in range(24):
        tally(Event("checked", bytes=10, files=1))
    now[0] = 10.0
    bar, line = status_line(tally, 100)
    # 25 of 100 files but only 250 of 1,000 bytes: a quarter done in 10 s, 30 s left
    assert line.startswith("verify: 25/100 files  250 B/1.0 KB checked") and "ETA 30s" in line, line
    assert bar > 0
    assert status_line(tally, 100, bar=False)[0] == 0   # a pipe or --no-progress: no bar
    tally(Event("checked", bytes=740, files=1))            # bytes ahead now: files set the pace
    assert tally.verify_eta() == pytest.approx(10.0 * (74 / 26))
    tally(Event("finish"))
    assert tally.verify_eta() == 0.0


def test_an_unusable_row_is_reported_once_and_left_out_by_every_streamed_reader(
        harvests: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Rows are checked as they are streamed (not by a pass of their own): a hostile database's
    row (another series' record, not JSON, a wrong type) is named once per reader and counted
    nowhere."""
    import contextlib
    import json
    import sqlite3
    import zlib

    small, _ = harvests
    out = tmp_path / "hostile"
    shutil.copytree(small, out)
    bad = {_record(i)["SeriesInstanceUID"]: blob for i, blob in (
        (0, zlib.compress(json.dumps(_record(1)).encode())),                    # names another series
        (2, b"not zlib"),                                                         # not a record at all
        (3, zlib.compress(json.dumps({**_record(3), "bytes": "many"}).encode())))}  # a wrong type
    with contextlib.closing(sqlite3.connect(out / ".harvester" / "state.db")) as db, db:
        for uid, blob in bad.items():
            db.execute("UPDATE series SET record=? WHERE uid=?", (blob, uid))
    for name, read in {"status": read_status, "verify": verify_tree, "report": render_report,
                       "export --csv": READERS["export --csv"]}.items():
        caplog.clear()
        got = read(out)
        named = [r.getMessage() for r in caplog.records if "; not used" in r.getMessage()]
        assert sorted(uid for uid in bad for line in named if f"series {uid}:" in line) == sorted(bad), (name, named)
        if name == "status":
            assert got["totals"]["series"] == 297 and got["totals"]["files"] == 582, got["totals"]
        if name == "verify":
            assert got.checked == 297 and got.files == 582 and got.ok is False   # 6 failed, as before


def test_verify_is_not_ok_when_a_record_could_not_be_used(harvests: tuple[Path, Path], tmp_path: Path) -> None:
    """A row that is not a record (state.db) or a harvest.json entry that is not one was warned
    about and skipped, and verify still said ok (exit 0): a series it could not vouch for."""
    import json
    import sqlite3

    small, _ = harvests
    out = tmp_path / "row"
    shutil.copytree(small, out)
    baseline = verify_tree(out)
    assert baseline.refused == []
    with sqlite3.connect(out / ".harvester" / "state.db") as conn:
        conn.execute("UPDATE series SET record=x'deadbeef' WHERE seq=(SELECT MIN(seq) FROM series "
                     "WHERE status='complete')")
    result = verify_tree(out)
    assert len(result.refused) == 1 and "not used" in result.refused[0] and not result.ok
    assert "1 record not usable" in result.summary()
    listed = tmp_path / "listed"
    shutil.copytree(small, listed)
    (listed / ".harvester" / "state.db").unlink()
    doc = json.loads((listed / "harvest.json").read_text())
    doc["series"] = [s for s in doc["series"] if s["status"] == "complete"]   # a harvest that was ok
    (listed / "harvest.json").write_text(json.dumps(doc))
    assert verify_tree(listed).ok
    doc["series"][3] = "not a record"
    (listed / "harvest.json").write_text(json.dumps(doc))
    result = verify_tree(listed)
    assert not result.ok and len(result.refused) == 1 and "series record 4" in result.refused[0]
