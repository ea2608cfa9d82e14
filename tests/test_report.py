"""The HTML report of a real harvest (with the HOSTILE collection's failures): its numbers match
harvest.json, failures are listed with their reasons, untrusted text stays text, the page is
self-contained, missing run events, a torn old journal and empty harvests are handled, and Chromium renders it."""
from __future__ import annotations

import html
import json
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

import harvester.engine
from harvester.errors import ManifestError, UsageError
from harvester.report import render_report, write_report
from harvester.server.testing import serve_in_thread
from harvester.store.db import DB_NAME, StateDB
from harvester.store.state import HarvestState

from harvest_helpers import harvest, manifest, normal_series, run_events, select_all

ARTIFACTS = Path(__file__).parent / "artifacts"
# A download cap that spreads the harvest over a few seconds (several time buckets) and a few
# HTTP 500s so the retries chart has real data.
FAULTS = "total_rate=300KiB,error=0.05,seed=3"


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module")
def harvested(small_archive: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real harvest of every collection plus HOSTILE (whose series all fail), with a progress
    checkpoint recorded every 0.3 s instead of every 30 s."""
    out = tmp_path_factory.mktemp("report") / "harvest"
    query = select_all(small_archive)
    query["select"].append({"collection": "HOSTILE"})
    with pytest.MonkeyPatch.context() as mp, serve_in_thread(small_archive, faults=FAULTS) as server:
        mp.setattr(harvester.engine, "MANIFEST_EVERY", 0.3)
        result = harvest(server.base_url, out, query)
    assert result.failed, "the HOSTILE collection should have failed"
    return out


@pytest.fixture
def copy_of(harvested: Path, tmp_path: Path) -> Path:
    """A private copy of the harvest, for tests that damage it."""
    dst = tmp_path / "harvest"
    shutil.copytree(harvested, dst, symlinks=True)
    return dst


TOTAL = "\0total"
_VOID = {"meta", "link", "br", "hr", "img", "input", "wbr"}


class _Tables(HTMLParser):
    """Rows of every ``<table id=...>`` ({data-name or data-uid, or TOTAL for the total row:
    {data-key: data-value}}), the text
    of elements with an id, and the data-value of every time-chart bar and dot, by class."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict[str, dict[str, int]]] = {}
        self.text: dict[str, str] = {}
        self.marks: dict[str, list[float]] = {}
        self._table: str | None = None
        self._row: dict[str, int] | None = None
        self._open: list[tuple[str, str]] = []  # (tag, id or "") of every open element

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table] = {}
        elif tag == "tr" and self._table and {"data-name", "data-uid", "data-total"} & set(a):
            key = a["data-name"] if "data-name" in a else a.get("data-uid", TOTAL)
            self._row = self.tables[self._table].setdefault(key, {})
        elif tag == "td" and self._row is not None and "data-key" in a:
            self._row[a["data-key"]] = int(a["data-value"])
        if tag in ("rect", "circle") and "data-value" in a:
            self.marks.setdefault(a["class"], []).append(float(a["data-value"]))
        if tag not in _VOID:
            self._open.append((tag, a.get("id", "")))
            if a.get("id"):
                self.text[a["id"]] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        if tag == "tr":
            self._row = None
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        for _, ident in self._open:
            if ident:
                self.text[ident] += data


def parse(page: str) -> _Tables:
    parser = _Tables()
    parser.feed(page)
    return parser


def expected_groups(doc: dict[str, Any], key: str) -> dict[str, dict[str, int]]:
    """What the per-collection/modality tables must say, computed from harvest.json directly."""
    out: dict[str, dict[str, int]] = {}
    for rec in doc["series"]:
        g = out.setdefault(rec[key], dict(series=0, complete=0, failed=0, files=0, bytes=0))
        g["series"] += 1
        ok = rec["status"] == "complete"
        g["complete" if ok else "failed"] += 1
        g["files"] += len(rec["files"]) if ok else 0
        g["bytes"] += rec["bytes"] if ok else 0
    return out


def as_before_the_database(out: Path, events: list[dict[str, Any]], torn: str = "") -> None:
    """Make ``out`` a harvest as versions before the state database left it: harvest.json and a
    journal of ``events`` (then ``torn``, the start of a line a kill -9 cut), no state.db."""
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (out / ".harvester" / name).unlink(missing_ok=True)
    (out / ".harvester" / "journal.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + torn, "utf-8")


# ------------------------------------------------------------------ content
def test_numbers_per_collection_and_modality_match_the_manifest(harvested: Path, small_archive: Any) -> None:
    doc = manifest(harvested)
    page = parse(render_report(harvested))
    for table, key in (("by-collection", "Collection"), ("by-modality", "Modality")):
        rows = page.tables[table]
        want = expected_groups(doc, key)
        assert {k: v for k, v in rows.items() if k != TOTAL} == want
        assert rows[TOTAL] == {f: sum(g[f] for g in want.values()) for f in ("series", "complete", "failed", "files", "bytes")}
    # And against the archive itself: every honest series complete, every HOSTILE one failed.
    by_coll = page.tables["by-collection"]
    hostile = [r for r in small_archive.records() if r.hostile_kind is not None]
    assert by_coll["HOSTILE"]["failed"] == by_coll["HOSTILE"]["series"] == len(hostile) > 0
    assert sum(r["complete"] for r in by_coll.values()) - by_coll[TOTAL]["complete"] == len(normal_series(small_archive))
    totals = doc["totals"]
    assert page.text["total-series-complete"].startswith(f"Series complete{totals['complete']:,}")
    assert page.text["total-series-failed"].startswith(f"Series failed{totals['failed']:,}")
    assert page.text["total-files"].startswith(f"Files{totals['files']:,}")
    assert f"{totals['bytes']:,} bytes harvested" in page.text["total-bytes"]
    assert page.text["started"] == doc["started"][:19].replace("T", " ") + " UTC"
    assert page.text["finished"] == doc["finished"][:19].replace("T", " ") + " UTC"
    assert page.text["last-sync"].startswith("never")  # failures: no run completed everything


def test_failures_are_listed_with_their_reasons(harvested: Path) -> None:
    doc = manifest(harvested)
    page_html = render_report(harvested)
    failed = {r["SeriesInstanceUID"]: r for r in doc["series"] if r["status"] != "complete"}
    rows = parse(page_html).tables["failures"]
    assert set(rows) == set(failed)
    assert parse(page_html).text["sec-failures"] == f"Failures ({len(failed)})"
    for rec in failed.values():
        assert html.escape(rec["error"], quote=True) in page_html
    assert "symbolic link" in page_html and "zip bomb" in page_html


def test_untrusted_text_is_escaped(copy_of: Path) -> None:
    doc = manifest(copy_of)
    failed = next(r for r in doc["series"] if r["status"] != "complete")
    complete = next(r for r in doc["series"] if r["status"] == "complete")
    failed["metadata"]["SeriesDescription"] = "<script>alert(1)</script>"
    failed["error"] = 'bad "quote" <img src=x onerror=alert(2)> & more'
    complete["Modality"] = '"><svg onload=alert(3)>'
    (copy_of / "harvest.json").write_text(json.dumps(doc), "utf-8")
    # the report reads the records from the state database (harvest.json is its export): there too
    db = StateDB(copy_of / ".harvester" / DB_NAME)
    db.open()
    try:
        for rec in (failed, complete):
            db.put(rec["SeriesInstanceUID"], rec, "test")
    finally:
        db.close()

    page_html = render_report(copy_of)
    assert "<script" not in page_html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page_html
    assert "<img" not in page_html and "&lt;img src=x onerror=alert(2)&gt; &amp; more" in page_html
    assert "onload=alert(3)>" not in page_html and "&quot;&gt;&lt;svg onload=alert(3)&gt;" in page_html
    # The archive's own hostile metadata: a PatientID with '<h>' and ANSI escapes.
    assert "g<h>" not in page_html and "g&lt;h&gt;" in page_html
    assert "\x1b" not in page_html and "\\x1b[31mRED" in page_html
    # The hostile modality is a row key (and a chart label), still as text.
    assert '"><svg onload=alert(3)>' in parse(page_html).tables["by-modality"]


def test_page_is_self_contained(harvested: Path) -> None:
    page_html = render_report(harvested)
    assert "http://127.0.0.1" in page_html  # the archive's URL is shown, as text ...
    resource = re.compile(r"""(?:\b(?:src|href|srcset|action|xlink:href)\s*=\s*["']?\s*(?:https?:)?//)"""
                          r"""|url\(\s*["']?\s*(?:https?:)?//|@import""", re.I)
    assert not resource.search(page_html)  # ... but nothing is loaded from anywhere
    for tag in ("<script", "<link", "<img", "<iframe", "<object", "<embed"):
        assert tag not in page_html.lower()
    assert "Content-Security-Policy" in page_html and "default-src 'none'" in page_html
    assert page_html.count("<svg") == 8  # 3 bar charts x (collection, modality) + throughput + retries


def test_time_series_come_from_the_run_events(harvested: Path) -> None:
    events = run_events(harvested)
    committed = sum(e["bytes"] for e in events if e["event"] == "commit")
    progress = [e for e in events if e["event"] == "progress"]
    assert len(progress) >= 2, "the capped harvest should last several checkpoints"
    marks = parse(render_report(harvested)).marks
    assert sum(marks["bar committed"]) == pytest.approx(committed)
    assert committed == manifest(harvested)["totals"]["bytes"]  # one run, nothing committed twice
    # One run: the cumulative counters' last value is the total, spread over the buckets.
    # data-value carries 3 decimals per bucket: the sum may be off by half a thousandth per bucket
    assert sum(marks["dot received"]) == pytest.approx(progress[-1]["received_bytes"],
                                                       abs=0.0005 * len(marks["dot received"]) + 1e-9)
    assert progress[-1]["retries"] > 0, "the injected HTTP 500s should have caused retries"
    assert sum(marks["bar retries"]) == pytest.approx(progress[-1]["retries"],
                                                      abs=0.0005 * len(marks["bar retries"]) + 1e-9)
    assert len(marks["bar committed"]) >= 2  # several buckets, not one lump


def test_progress_counters_restart_with_each_run_and_a_torn_line_is_skipped(copy_of: Path) -> None:
    """Two runs an hour apart (of a harvest made before the database: its journal is read): each
    run's counters start from zero, the deltas are spread over their interval, and a line torn by
    kill -9 is reported, not fatal."""
    base = "2030-01-01T00:00:00Z"
    lines = [
        {"event": "run", "t": base, "series": 1, "todo": 1},
        {"event": "progress", "t": "2030-01-01T00:00:29Z", "received_bytes": 3000, "retries": 1, "done": 0, "failed": 0},
        {"event": "progress", "t": "2030-01-01T00:00:59Z", "received_bytes": 9000, "retries": 4, "done": 1, "failed": 0},
        {"event": "run", "t": "2030-01-01T01:00:00Z", "series": 1, "todo": 0},
        {"event": "progress", "t": "2030-01-01T01:00:29Z", "received_bytes": 12000, "retries": 6, "done": 0, "failed": 0},
    ]
    as_before_the_database(copy_of, lines, torn='{"event": "commit", "t": "2030-01-01T01:')
    page_html = render_report(copy_of)
    marks = parse(page_html).marks
    # The second run's 12000 counts from its own start (not as 12000 - 9000).
    assert sum(marks["dot received"]) == pytest.approx(9000 + 12000)
    assert sum(marks["bar retries"]) == pytest.approx(4 + 6)
    # An hour and half a minute: 2-minute buckets, one per run.
    assert "Bytes per 2 min bucket" in page_html
    assert sorted(marks["dot received"]) == pytest.approx([9000, 12000])
    assert "1 unreadable journal line skipped" in page_html
    assert "bar committed" not in marks  # the only commit line is the torn one


@pytest.mark.parametrize("damage", ["missing", "unreadable"])
def test_missing_or_unreadable_run_events(copy_of: Path, damage: str) -> None:
    shutil.rmtree(copy_of / ".harvester")
    if damage == "unreadable":
        (copy_of / ".harvester" / "state.db").mkdir(parents=True)  # not a regular file: refused
    page_html = render_report(copy_of)
    page = parse(page_html)
    assert page.text["journal-status"].startswith(
        "No run events" if damage == "missing" else "The run events could not be read")
    assert "completion times in harvest.json" in page.text["journal-status"]
    assert sum(page.marks["bar committed"]) == pytest.approx(manifest(copy_of)["totals"]["bytes"])
    assert "dot received" not in page.marks and "bar retries" not in page.marks
    assert set(page.tables["failures"]) == {r["SeriesInstanceUID"] for r in manifest(copy_of)["series"]
                                            if r["status"] != "complete"}


def test_empty_harvest(tmp_path: Path) -> None:
    state = HarvestState(tmp_path)
    state.open()
    state.write_manifest({"api_url": "http://127.0.0.1:1/v4", "layout": "descriptive"})
    state.close()
    page_html = render_report(tmp_path)
    page = parse(page_html)
    assert page.tables["by-collection"] == {TOTAL: dict(series=0, complete=0, failed=0, files=0, bytes=0)}
    assert page.text["empty"] == "This harvest holds no series yet."
    assert page.text["no-timeline"].startswith("Nothing was committed yet")
    assert page.text["no-failures"] == "No series failed."
    assert page.text["total-files"].startswith("Files0")
    assert page_html.count("<svg") == 6  # the bar charts, each saying "nothing harvested"
    assert page_html.count("nothing harvested") == 6


def test_no_manifest_is_a_usage_error_and_a_broken_one_a_manifest_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="holds no harvest.json") as info:
        render_report(tmp_path)
    assert not isinstance(info.value, ManifestError)
    with pytest.raises(UsageError, match="holds no harvest.json"):
        render_report(tmp_path / "does-not-exist")
    for content in (b'{"series": [', b"\xff\xfe not utf-8", b"[]", b'{"series": {}}'):
        (tmp_path / "harvest.json").write_bytes(content)
        with pytest.raises(ManifestError, match="harvest.json"):
            render_report(tmp_path)


def test_write_report_default_and_target(harvested: Path, tmp_path: Path) -> None:
    default = write_report(harvested)
    try:
        assert default == harvested / "report.html"
        assert default.read_text("utf-8").startswith("<!DOCTYPE html>")
        target = write_report(harvested, tmp_path / "elsewhere.html")
        assert target == tmp_path / "elsewhere.html"
        assert parse(target.read_text("utf-8")).tables == parse(default.read_text("utf-8")).tables
        assert [p.name for p in harvested.iterdir() if p.name.endswith(".tmp")] == []
    finally:
        default.unlink()


# ------------------------------------------------------------------ in a real browser
def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium package is not installed (apt-get install -y chromium): "
                    "the report's browser test cannot run")
    return path


def _run_chromium(binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def _png_rows(data: bytes) -> Iterator[bytes]:
    """The filtered scanlines of an 8-bit RGB(A) PNG (enough to tell a blank image from a page)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + width * channels
    assert len(raw) == stride * height
    for y in range(height):
        yield raw[y * stride:(y + 1) * stride]


def test_chromium_renders_the_report(harvested: Path) -> None:
    binary = _chromium()
    report = write_report(harvested, harvested.parent / "report.html")
    doc = manifest(harvested)

    dom = _run_chromium(binary, "--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = parse(dom.stdout)
    assert dom.stdout.count("<svg") == 8 and dom.stdout.count("<rect") >= 10
    assert "<script" not in dom.stdout.lower()
    assert page.text["total-files"].startswith(f"Files{doc['totals']['files']:,}")
    assert page.text["total-series-failed"].startswith(f"Series failed{doc['totals']['failed']:,}")
    assert page.tables["by-collection"] == parse(report.read_text("utf-8")).tables["by-collection"]

    ARTIFACTS.mkdir(exist_ok=True)
    png = ARTIFACTS / "report.png"
    png.unlink(missing_ok=True)
    shot = _run_chromium(binary, f"--screenshot={png}", "--window-size=1280,2000", report.as_uri())
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    data = png.read_bytes()
    assert struct.unpack(">II", data[16:24]) == (1280, 2000)
    rows = list(_png_rows(data))
    # Not a blank page: many distinct scanlines (text, tables, bars), not one repeated background row.
    assert len(set(rows)) > 500
