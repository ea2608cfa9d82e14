"""A visual harvest report: one self-contained HTML page about what an output directory holds.

``render_report(DIR)`` reads the series records (what is there: totals, per collection and per
modality, failures and their reasons), streamed once from ``DIR/.harvester/state.db``
(``harvester.store.tree.read_records``; harvest.json for a harvest made before the database),
and the run events of the database (``HarvestState.events``: those of an old journal for a
harvest made before the database; when it came: bytes committed per time bucket from ``commit``
events, summed by a second pass over the events, bytes received and retries from ``progress``
events, series re-attempts from the ``attempts`` of ``commit``/``failed`` events). Memory holds
counts per group and per time bucket, and one short entry per failed series, whatever the number
of files. ``write_report`` writes the page atomically to ``DIR/report.html`` or a chosen file.

The page works offline and forever: inline CSS, inline SVG charts drawn here (no plotting
library), no script, no font or image from anywhere, and a Content-Security-Policy that
forbids all of them should a browser ever be tricked into trying. Everything read from the
manifest or the run events is untrusted (it came from an archive's metadata): every string goes
through ``_text``, which HTML-escapes it and makes control characters visible.

Missing run events (a DIR copied without ``.harvester/``), an unreadable state or a torn old
journal (kill -9 mid-line) is not an error: the report says what it could not read and falls
back to the records' completion times for throughput. ``render_report`` raises ``UsageError``
when DIR holds neither a state database nor a ``harvest.json``, and ``ManifestError`` when,
without a database, harvest.json cannot be read or is not a harvest manifest.
"""
from __future__ import annotations

import datetime as dt
import html
import json
import math
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harvester.events import human_bytes
from harvester.redact import redact
from harvester.errors import FatalError, HarvesterError, UnsafePathError
from harvester.store.db import DB_NAME
from harvester.store.manifest import read_manifest
from harvester.store.state import (HarvestState, atomic_write, now_iso, record_problem, usable_records,
                                    write_output)
from harvester.store.tree import read_records

REPORT_NAME = "report.html"
#: Time charts aim for at most this many buckets; the bucket is the smallest "nice" duration that fits.
MAX_BUCKETS = 60
_NICE_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200,
               86400, 2 * 86400, 7 * 86400, 30 * 86400)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_UTC = dt.timezone.utc


# ------------------------------------------------------------------ public API
def render_report(out_dir: Path) -> str:
    """The HTML report of ``out_dir`` as one string.

    The records are streamed from the state database once (``read_records``; harvest.json for a
    harvest made before the database): memory holds the counts per collection and modality and
    one short entry per failed series, whatever the number of files.

    Raises ``UsageError`` when ``out_dir`` holds neither a state database nor a harvest.json,
    and ``ManifestError`` when, without a database, harvest.json cannot be read or is not a
    harvest manifest. Missing or damaged run events are reported on the page, not raised.
    """
    out_dir = Path(out_dir)
    journal = _read_events(out_dir)
    from_manifest = journal.status != "ok"  # no run events (or unreadable): the records' completion times
    commits = journal.commits if from_manifest else None
    try:
        with read_records(out_dir) as (state, doc):
            summary = _Summary.of((rec for _, rec in state.checked_items()), commits=commits)
            if doc is None:
                doc = dict(state.header)
                summary.skipped = len(state.records.hidden)
            else:
                series = doc.get("series", [])   # read_records reported each unusable one already
                summary.skipped = sum(record_problem(r) is not None for r in series) \
                    if isinstance(series, list) else 0
    except (UnsafePathError, FatalError):
        # The state cannot be read (a link, not a file, damaged): the page says so under the run
        # events and shows what harvest.json lists, as it can (UsageError, ManifestError otherwise).
        doc = read_manifest(out_dir)
        records = usable_records(doc.get("series", []), str(out_dir / "harvest.json"))
        summary = _Summary.of(records, commits=commits)
        summary.skipped = len(doc.get("series", [])) - len(records)
    if from_manifest:
        journal.commits_from_manifest = bool(journal.commits)
    disk = _disk_use(out_dir)
    return _Page(out_dir, doc, summary, journal, disk).render()


def write_report(out_dir: Path, target: Path | None = None) -> Path:
    """Render the report of ``out_dir`` and write it to ``target`` (``-`` for stdout, a symlink
    or device written through: see ``write_output``), or atomically to ``out_dir/report.html``,
    replacing whatever is there (a harvest directory is not trusted to hold a safe link);
    returns the path written.

    Raises what ``render_report`` raises, and ``OutputNotWritableError``/``DiskFullError``
    when the target cannot be written.
    """
    out_dir = Path(out_dir)
    page = render_report(out_dir)
    if target is not None:
        write_output(target, page.encode("utf-8"), option="-o")
        return Path(target)
    path = out_dir / REPORT_NAME
    atomic_write(path, page.encode("utf-8"))
    return path


# ------------------------------------------------------------------ reading
#: (from, to, amount): a progress counter's increase between two journal events.
_Interval = tuple[dt.datetime, dt.datetime, int]


@dataclass
class _Journal:
    """What the report takes from the run events: (time, amount) points per time series."""

    status: str = "missing"            # "missing", "unreadable: ..." or "ok"
    lines: int = 0                     # events read
    torn: int = 0                      # old journal lines that are not a JSON object (kill -9 mid-write)
    runs: list[dt.datetime] = field(default_factory=list)
    #: bytes committed, as (time, bytes) points: only those of the records' completion times (a
    #: harvest without run events); the run events' commits are summed into the chart's buckets
    #: by a second pass over the events (``commit_sums``), so none is held per series
    commits: list[tuple[dt.datetime, int]] = field(default_factory=list)
    commits_from_manifest: bool = False
    commit_span: tuple[dt.datetime, dt.datetime] | None = None    # first and last commit event
    commit_sums: Any = None            # _Grid -> bytes committed per bucket (the run events' commits)
    received: list[_Interval] = field(default_factory=list)    # progress deltas over their interval
    retries: list[_Interval] = field(default_factory=list)
    reattempts: list[tuple[dt.datetime, int]] = field(default_factory=list)     # attempts - 1
    progress_events: int = 0
    first: dt.datetime | None = None
    last: dt.datetime | None = None


def _read_events(out_dir: Path) -> _Journal:
    """Stream the run events (``HarvestState.events``, read only: no lock, nothing written) into
    time series.

    ``progress`` counters are cumulative within a run and restart at each ``run`` event, so a
    point is the increase since the previous event of the same run (a drop means a run whose
    ``run`` event was lost, and counts from zero), kept with the interval it accrued over so the
    chart spreads it instead of piling 30 s of bytes into one bucket.
    """
    j = _Journal()
    meta = out_dir / ".harvester"
    if not any(p.exists() or p.is_symlink() for p in (meta / DB_NAME, meta / "journal.jsonl")):
        return j
    state = HarvestState(out_dir)
    try:
        _add_events(state, j)
    except (HarvesterError, OSError) as exc:
        return _Journal(status="unreadable: " + redact(
            exc.one_line() if isinstance(exc, HarvesterError) else exc.strerror or str(exc)))
    finally:
        state.close()
    j.status = "ok"
    j.commit_sums = lambda grid: _commit_sums(out_dir, grid)
    return j


def _commit_events(state: HarvestState) -> Iterator[tuple[dt.datetime, int]]:
    """(time, bytes) of every ``commit`` event with a readable time, streamed."""
    for event in state.read_events():
        if event.get("event") == "commit" and (t := _parse_time(event.get("t"))) is not None:
            yield t, _int(event.get("bytes"))


def _commit_sums(out_dir: Path, grid: _Grid) -> list[float]:
    """The bytes of the commit events per bucket of ``grid``: the events streamed again (the
    first pass kept only their span). Should they no longer be readable, nothing is charted."""
    state = HarvestState(out_dir)
    try:
        return grid.sum(_commit_events(state))
    except (HarvesterError, OSError):
        return [0.0] * grid.count
    finally:
        state.close()


def _add_events(state: HarvestState, j: _Journal) -> None:
    prev_received = prev_retries = 0
    since: dt.datetime | None = None
    for event in state.read_events():
        j.lines += 1
        t = _parse_time(event.get("t"))
        if t is None:
            continue
        j.first = t if j.first is None else min(j.first, t)
        j.last = t if j.last is None else max(j.last, t)
        kind = event.get("event")
        if kind == "run":
            j.runs.append(t)
            prev_received = prev_retries = 0
            since = t
        elif kind in ("commit", "failed"):
            if kind == "commit":
                first, last = j.commit_span or (t, t)
                j.commit_span = (min(first, t), max(last, t))
            if _int(event.get("attempts")) > 1:
                j.reattempts.append((t, _int(event.get("attempts")) - 1))
        elif kind == "progress":
            j.progress_events += 1
            received, retries = _int(event.get("received_bytes")), _int(event.get("retries"))
            start = since if since is not None and since <= t else t
            j.received.append((start, t, received - prev_received if received >= prev_received else received))
            j.retries.append((start, t, retries - prev_retries if retries >= prev_retries else retries))
            prev_received, prev_retries, since = received, retries, t
    j.torn = state.torn_lines


def _disk_use(out_dir: Path) -> tuple[int, int]:
    """(bytes allocated on disk under ``out_dir``, entries that could not be read), like ``du``:
    symlinks are not followed and hard-linked files count once (only those are remembered)."""
    seen: set[tuple[int, int]] = set()
    total = unreadable = 0
    errors: list[OSError] = []
    for root, dirs, files in os.walk(out_dir, onerror=errors.append):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                unreadable += 1
                continue
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):   # only a linked file can be met twice
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return total, unreadable + len(errors)


def _parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t.replace(tzinfo=_UTC) if t.tzinfo is None else t.astimezone(_UTC)


def _int(value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        return 0
    return max(n, 0)


# ------------------------------------------------------------------ aggregation
@dataclass
class _Group:
    series: int = 0
    complete: int = 0
    failed: int = 0
    files: int = 0
    bytes: int = 0


#: What the failures table shows of a failed series (all of a record it keeps).
_FAILURE_FIELDS = ("SeriesInstanceUID", "Collection", "Modality", "PatientID", "attempts", "error")


@dataclass
class _Summary:
    """What the page shows of the records, counted in one streamed pass: totals, a group per
    collection and per modality (files and bytes count complete series only, as harvest.json's
    totals), and a short entry per failed series."""

    records: int = 0
    complete: int = 0
    files: int = 0
    bytes: int = 0
    skipped: int = 0                  # entries that are not usable series records
    groups: dict[str, dict[str, _Group]] = field(default_factory=lambda: {"Collection": {}, "Modality": {}})
    failed: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, records: Iterable[dict[str, Any]],
           commits: list[tuple[dt.datetime, int]] | None = None) -> _Summary:
        """Count ``records``; with ``commits``, each complete record's completion time is added
        to it (the timeline of a harvest without run events)."""
        s = cls()
        for rec in records:
            s.records += 1
            meta = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
            complete = rec.get("status") == "complete"
            files = len(rec["files"]) if complete and isinstance(rec.get("files"), list) else 0
            size = _int(rec.get("bytes")) if complete else 0
            for key, groups in s.groups.items():
                g = groups.setdefault(str(rec.get(key) or meta.get(key) or "(none)"), _Group())
                g.series += 1
                if complete:
                    g.complete += 1
                    g.files += files
                    g.bytes += size
                else:
                    g.failed += 1
            if complete:
                s.complete += 1
                s.files += files
                s.bytes += size
                if commits is not None and (t := _parse_time(rec.get("completed"))):
                    commits.append((t, size))
            else:
                entry = {k: rec.get(k) for k in _FAILURE_FIELDS}
                entry["metadata"] = {k: meta.get(k) for k in ("Modality", "PatientID", "SeriesDescription")}
                s.failed.append(entry)
        return s

    def by(self, key: str) -> dict[str, _Group]:
        return dict(sorted(self.groups[key].items()))


def _bucket_step(first: dt.datetime, last: dt.datetime) -> int:
    span = max(1.0, (last - first).total_seconds() + 1)
    for step in _NICE_STEPS:
        if span / step <= MAX_BUCKETS:
            return step
    return math.ceil(span / MAX_BUCKETS / 86400) * 86400


@dataclass
class _Grid:
    """Time buckets of ``step`` seconds from ``start`` (aligned to the step, UTC)."""

    start: dt.datetime
    step: int
    count: int

    @classmethod
    def spanning(cls, times: list[dt.datetime]) -> _Grid | None:
        if not times:
            return None
        first, last = min(times), max(times)
        step = _bucket_step(first, last)
        start_s = math.floor(first.timestamp() / step) * step
        # ``spread`` lets an interval run one second past its last timestamp: cover that too.
        count = int((last.timestamp() + 1 - 1e-9 - start_s) // step) + 1
        return cls(dt.datetime.fromtimestamp(start_s, _UTC), step, count)

    def _index(self, seconds: float) -> int:
        return min(self.count - 1, max(0, int((seconds - self.start.timestamp()) // self.step)))

    def sum(self, points: Iterable[tuple[dt.datetime, int]]) -> list[float]:
        values = [0.0] * self.count
        for t, v in points:
            values[self._index(t.timestamp())] += v
        return values

    def spread(self, intervals: list[_Interval]) -> list[float]:
        """Each amount shared among the buckets its interval overlaps, in proportion. Journal
        times may be whole seconds (older journals), so an interval ends one second after its
        last timestamp."""
        values = [0.0] * self.count
        base = self.start.timestamp()
        for a, b, v in intervals:
            lo, hi = a.timestamp(), b.timestamp() + 1
            for i in range(self._index(lo), self._index(hi - 1e-9) + 1):
                b_lo, b_hi = base + i * self.step, base + (i + 1) * self.step
                values[i] += v * max(0.0, min(hi, b_hi) - max(lo, b_lo)) / (hi - lo)
        return values

    def at(self, i: float) -> dt.datetime:
        return self.start + dt.timedelta(seconds=i * self.step)


# ------------------------------------------------------------------ formatting
def _text(value: Any) -> str:
    """Untrusted text, safe in HTML content and in quoted attributes: escaped, with control
    characters shown as ``\\xNN`` and lone surrogates as ``\\udNNN``."""
    s = value if isinstance(value, str) else ("" if value is None else str(value))
    s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    s = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", s)
    return html.escape(s, quote=True)


def _when(t: Any) -> str:
    parsed = t if isinstance(t, dt.datetime) else _parse_time(t)
    if parsed is None:
        return "—" if not t else _text(t)
    return parsed.strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d {h}h{m:02d}m"
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _step_name(step: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if step >= size and step % size == 0:
            return f"{step // size} {unit}"
    return f"{step} s"


def _count(n: int) -> str:
    return f"{n:,}"


def _nice_ceiling(v: float) -> float:
    """The smallest 1, 2 or 5 x 10^k that is >= v (1 for v <= 0)."""
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 5, 10):
        if m * exp >= v:
            return float(m * exp)
    return float(10 * exp)  # pragma: no cover


def _short(label: str, limit: int = 20) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


# ------------------------------------------------------------------ SVG charts
_COLORS = {"complete": "#2f855a", "failed": "#c53030", "files": "#2b6cb0", "bytes": "#6b46c1",
           "committed": "#2b6cb0", "received": "#dd6b20", "retries": "#c53030", "reattempts": "#805ad5"}


def _hbar_chart(title: str, rows: list[tuple[str, list[tuple[int, str]]]], fmt: Any, cls: str) -> str:
    """Horizontal bars, one row per label; a row may stack several (value, colour key) segments."""
    width, label_w, value_w, row_h, top = 380, 130, 78, 22, 26
    bar_w = width - label_w - value_w
    height = top + row_h * max(1, len(rows)) + 6
    peak = max([sum(v for v, _ in segs) for _, segs in rows] + [1])
    out = [f'<svg class="chart {cls}" role="img" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">'
           f'<title>{_text(title)}</title>',
           f'<text class="ctitle" x="0" y="15">{_text(title)}</text>']
    if not rows:
        out.append(f'<text class="empty" x="{label_w}" y="{top + 14}">nothing harvested</text>')
    for i, (label, segs) in enumerate(rows):
        y = top + i * row_h
        total = sum(v for v, _ in segs)
        out.append(f'<g><title>{_text(label)}: {_text(fmt(total))}</title>'
                   f'<text class="label" x="{label_w - 6}" y="{y + 14}" text-anchor="end">{_text(_short(label))}</text>')
        x = float(label_w)
        for value, color in segs:
            w = bar_w * value / peak
            if w > 0:
                out.append(f'<rect class="bar {color}" x="{x:.1f}" y="{y + 3}" width="{max(w, 1):.1f}" '
                           f'height="{row_h - 6}" fill="{_COLORS[color]}"/>')
            x += w
        out.append(f'<text class="value" x="{x + 5:.1f}" y="{y + 14}">{_text(fmt(total))}</text></g>')
    out.append("</svg>")
    return "".join(out)


def _time_chart(cls: str, title: str, grid: _Grid, bars: tuple[str, list[int]] | None,
                line: tuple[str, list[int]] | None, fmt: Any) -> str:
    """Bars (one per bucket) and/or a line with dots over the same buckets, with a y scale and
    time ticks. ``bars``/``line`` are (colour key, values)."""
    width, height, left, right, top, bottom = 1100, 230, 80, 16, 28, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    values = (bars[1] if bars else []) + (line[1] if line else [])
    ymax = _nice_ceiling(max(values + [0]))
    slot = plot_w / grid.count
    out = [f'<svg class="chart {cls}" role="img" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">'
           f'<title>{_text(title)}</title><text class="ctitle" x="{left}" y="16">{_text(title)}</text>']
    for frac in (0, 0.5, 1):
        y = top + plot_h * (1 - frac)
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_text(fmt(ymax * frac))}</text>')
    ticks = min(grid.count, 6)
    for k in range(ticks + 1):
        i = grid.count * k / ticks
        x = left + slot * i
        t = grid.at(i)
        label = t.strftime("%H:%M:%S") if grid.step < 60 else t.strftime("%m-%d %H:%M")
        anchor = "start" if k == 0 else ("end" if k == ticks else "middle")
        out.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}"/>'
                   f'<text class="tick" x="{x:.1f}" y="{top + plot_h + 17}" text-anchor="{anchor}">{label}</text>')
    if bars:
        key, vals = bars
        for i, v in enumerate(vals):
            if v <= 0:
                continue
            h = max(1.0, plot_h * v / ymax)
            out.append(f'<rect class="bar {key}" x="{left + slot * i + slot * 0.1:.1f}" y="{top + plot_h - h:.1f}" '
                       f'width="{max(slot * 0.8, 1):.1f}" height="{h:.1f}" fill="{_COLORS[key]}" data-value="{v:.3f}">'
                       f'<title>{_when(grid.at(i))}: {_text(fmt(v))}</title></rect>')
    if line:
        key, vals = line
        pts = [(left + slot * (i + 0.5), top + plot_h * (1 - v / ymax)) for i, v in enumerate(vals)]
        out.append(f'<polyline class="line {key}" fill="none" stroke="{_COLORS[key]}" stroke-width="2" points="'
                   + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        for i, (x, y) in enumerate(pts):
            if vals[i] > 0:
                out.append(f'<circle class="dot {key}" cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{_COLORS[key]}" '
                           f'data-value="{vals[i]:.3f}">'
                           f'<title>{_when(grid.at(i))}: {_text(fmt(vals[i]))}</title></circle>')
    out.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}"/></svg>')
    return "".join(out)


# ------------------------------------------------------------------ the page
_CSS = """
:root{color-scheme:light}
*{box-sizing:border-box}
body{margin:0;background:#f4f5f7;color:#1a202c;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1180px;margin:0 auto;padding:20px 24px 40px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 10px;padding-bottom:4px;border-bottom:1px solid #cbd5e0}
.sub{color:#4a5568;margin:0 0 14px;overflow-wrap:anywhere}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:12px}
.card{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:12px 14px}
.card .k{color:#4a5568;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:24px;font-weight:600;margin-top:2px}
.card .n{color:#718096;font-size:12px}
.card.bad .v{color:#c53030}.card.good .v{color:#2f855a}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:14px 0 0;background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:12px 14px}
dl.meta dt{color:#4a5568}dl.meta dd{margin:0;overflow-wrap:anywhere}
pre{margin:0;white-space:pre-wrap;overflow-wrap:anywhere;font-size:12px}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #e2e8f0}
th,td{padding:5px 9px;border-bottom:1px solid #edf2f7;text-align:left;vertical-align:top;overflow-wrap:break-word}
th{background:#edf2f7;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.total td{font-weight:600;border-top:2px solid #cbd5e0}
td.reason{color:#9b2c2c}
.uid{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;word-break:break-all;min-width:12em}
td.reason{min-width:18em}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:12px;margin-top:12px;align-items:start}
.charts svg{width:100%;height:auto}
.charts svg,.wide{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:6px}
.wide{width:100%;height:auto;margin-top:8px}
svg text{font:12px system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;fill:#2d3748}
svg .ctitle{font-weight:600;font-size:13px}
svg .tick{fill:#718096;font-size:11px}
svg .empty{fill:#a0aec0}
svg .grid{stroke:#e2e8f0}svg .axis{stroke:#a0aec0}
.legend span{display:inline-block;margin-right:16px}
.legend i{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.note{color:#4a5568;margin:6px 0}
.warn{color:#9c4221}
footer{color:#718096;margin-top:30px;font-size:12px}
"""


class _Page:
    def __init__(self, out_dir: Path, doc: dict[str, Any], summary: _Summary, journal: _Journal,
                 disk: tuple[int, int]) -> None:
        self.out_dir, self.doc, self.summary = out_dir, doc, summary
        self.journal, self.disk = journal, disk
        self.failed = summary.failed

    def render(self) -> str:
        parts = [
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
            # No script, no network: a page that someone opens in a year, offline, must still
            # work, and escaped metadata must never get a second chance to run.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "style-src 'unsafe-inline'; img-src data:\">",
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
            f"<title>Harvest report: {_text(self.out_dir.name or str(self.out_dir))}</title>",
            f"<style>{_CSS}</style></head><body><main>",
            *self._header(), *self._totals(),
            *self._groups("by-collection", "Per collection", "Collection"),
            *self._groups("by-modality", "Per modality", "Modality"),
            *self._timeline(), *self._failures(),
            f"<footer>Generated {_when(now_iso())} by harvester from harvest.json and the run events "
            f"in {_text(str(self.out_dir))}.</footer>",
            "</main></body></html>\n",
        ]
        return "".join(parts)

    def _header(self) -> Iterator[str]:
        doc = self.doc
        yield f"<h1>Harvest report: {_text(self.out_dir.name or str(self.out_dir))}</h1>"
        yield f'<p class="sub">{_text(str(self.out_dir.resolve()))}</p>'
        rows = [("Started", _when(doc.get("started")), "started"),
                ("Finished", _when(doc.get("finished")) if doc.get("finished") or not doc.get("started")
                 else "not finished (running, or interrupted)", "finished"),
                ("Last sync", _when(doc.get("last_sync")) if doc.get("last_sync")
                 else "never (no run has completed everything asked for)", "last-sync"),
                ("Runs recorded", _count(len(self.journal.runs)), "runs"),
                ("Archive", _text(doc.get("api_url")) or "—", "api-url"),
                ("Layout", _text(doc.get("layout")) or "—", "layout")]
        yield '<dl class="meta">'
        for name, value, ident in rows:
            yield f'<dt>{name}</dt><dd id="{ident}">{value}</dd>'
        if doc.get("query") is not None:
            query = json.dumps(doc.get("query"), ensure_ascii=False, default=str)
            yield f"<dt>Query</dt><dd><pre>{_text(query)}</pre></dd>"
        yield "</dl>"

    def _totals(self) -> Iterator[str]:
        summary = self.summary
        files, size = summary.files, summary.bytes
        disk, unreadable = self.disk
        cards = [("series-complete", "Series complete", _count(summary.complete),
                  f"of {_count(summary.records)} in harvest.json", "good" if summary.complete else ""),
                 ("series-failed", "Series failed", _count(len(self.failed)),
                  "listed below with reasons" if self.failed else "none", "bad" if self.failed else ""),
                 ("files", "Files", _count(files), "verified DICOM files", ""),
                 ("bytes", "Bytes", human_bytes(size), f"{_count(size)} bytes harvested", ""),
                 ("disk-use", "Disk use of DIR", human_bytes(disk),
                  "everything under DIR" + (f"; {unreadable} entries unreadable" if unreadable else ""), "")]
        yield "<h2 id=\"sec-totals\">Totals</h2><div class=\"cards\">"
        for ident, name, value, note, cls in cards:
            yield (f'<div class="card {cls}" id="total-{ident}"><div class="k">{name}</div>'
                   f'<div class="v">{value}</div><div class="n">{note}</div></div>')
        yield "</div>"
        if summary.skipped:
            yield (f'<p class="note warn">{summary.skipped} entries of harvest.json are not series records and were '
                   'ignored.</p>')
        if not summary.records:
            yield '<p class="note" id="empty">This harvest holds no series yet.</p>'

    def _groups(self, ident: str, title: str, key: str) -> Iterator[str]:
        groups = self.summary.by(key)
        yield f'<h2 id="sec-{ident}">{title}</h2>'
        yield (f'<table id="{ident}"><thead><tr><th>{key}</th><th class="num">Series</th><th class="num">Complete</th>'
               '<th class="num">Failed</th><th class="num">Files</th><th class="num">Bytes</th></tr></thead><tbody>')
        total = _Group()
        for name, g in groups.items():
            for f in ("series", "complete", "failed", "files", "bytes"):
                setattr(total, f, getattr(total, f) + getattr(g, f))
            yield self._group_row(name, g, "")
        yield self._group_row("All", total, "total") + "</tbody></table>"
        rows = list(groups.items())
        yield '<div class="charts">'
        yield _hbar_chart(f"Series per {key.lower()}",
                          [(n, [(g.complete, "complete"), (g.failed, "failed")]) for n, g in rows], _count, "series")
        yield _hbar_chart(f"Files per {key.lower()}", [(n, [(g.files, "files")]) for n, g in rows], _count, "files")
        yield _hbar_chart(f"Bytes per {key.lower()}", [(n, [(g.bytes, "bytes")]) for n, g in rows], human_bytes, "bytes")
        yield "</div>"
        yield _legend([("complete", "complete series"), ("failed", "failed series")])

    @staticmethod
    def _group_row(name: str, g: _Group, cls: str) -> str:
        cells = "".join(f'<td class="num" data-key="{f}" data-value="{getattr(g, f)}">{_count(getattr(g, f))}</td>'
                        for f in ("series", "complete", "failed", "files"))
        # The total row is marked apart: a collection may well be called "All".
        mark = 'data-total="1"' if cls == "total" else f'data-name="{_text(name)}"'
        return (f'<tr class="{cls}" {mark}><td>{_text(name)}</td>{cells}'
                f'<td class="num" data-key="bytes" data-value="{g.bytes}" title="{_count(g.bytes)} bytes">'
                f"{human_bytes(g.bytes)}</td></tr>")

    def _timeline(self) -> Iterator[str]:
        j = self.journal
        yield '<h2 id="sec-timeline">Throughput and retries over time</h2>'
        if j.status == "missing":
            yield '<p class="note warn" id="journal-status">No run events (no .harvester/state.db): ' \
                  "the time series below come from the completion times in harvest.json only.</p>"
        elif j.status != "ok":
            yield (f'<p class="note warn" id="journal-status">The run events could not be read ({_text(j.status)}): '
                   "the time series below come from the completion times in harvest.json only.</p>")
        else:
            torn = (f"; {j.torn} unreadable journal line{'s' if j.torn != 1 else ''} skipped (a torn write "
                    "from an interrupted run)" if j.torn else "")
            span = f", {_when(j.first)} to {_when(j.last)}" if j.first and j.last else ""
            yield (f'<p class="note{" warn" if j.torn else ""}" id="journal-status">Run events: {_count(j.lines)}'
                   f"{span}{torn}.</p>")
        grid = _Grid.spanning([t for t, _ in j.commits + j.reattempts] + list(j.commit_span or ())
                              + [t for a, b, _ in j.received + j.retries for t in (a, b)])
        if grid is None:
            yield '<p class="note" id="no-timeline">Nothing was committed yet: no time series to draw.</p>'
            return
        committed = grid.sum(j.commits) if j.commit_sums is None else j.commit_sums(grid)
        received = grid.spread(j.received) if j.received else None
        step = _step_name(grid.step)
        yield _time_chart("throughput wide", f"Bytes per {step} bucket", grid, ("committed", committed),
                          ("received", received) if received else None, human_bytes)
        legend = [("committed", "committed (verified series, at their commit"
                   + (" time in harvest.json)" if j.commits_from_manifest else " in the run events)"))]
        if received:
            legend.append(("received", "received from the network (progress events)"))
        yield _legend(legend)
        window = grid.count * grid.step
        total_committed = sum(committed)
        yield (f'<p class="note" id="throughput-summary">{human_bytes(total_committed)} committed in the '
               f"{_duration(window)} charted ({human_bytes(total_committed / window)}/s on average)"
               + (f"; {human_bytes(sum(received))} received." if received else ".") + "</p>")
        if not j.received:
            yield ('<p class="note">No progress events recorded (they are written every 30 s of a run), '
                   "so received bytes and request retries are not shown.</p>")
        retries = grid.spread(j.retries) if any(v for _, _, v in j.retries) else None
        reattempts = grid.sum(j.reattempts)
        yield _time_chart("retries wide", f"Retries per {step} bucket", grid,
                          ("retries", retries) if retries else None, ("reattempts", reattempts), _count_tick)
        legend = [("reattempts", "series re-attempts (attempts beyond the first, at the series' commit or failure)")]
        if retries:
            legend.insert(0, ("retries", "request and series retries (progress events)"))
        yield _legend(legend)

    def _failures(self) -> Iterator[str]:
        yield f'<h2 id="sec-failures">Failures ({_count(len(self.failed))})</h2>'
        if not self.failed:
            yield '<p class="note" id="no-failures">No series failed.</p>'
            return
        reasons: dict[str, int] = {}
        for r in self.failed:
            reason = _reason_kind(r.get("error"))
            reasons[reason] = reasons.get(reason, 0) + 1
        yield '<p class="note">By reason: ' + "; ".join(
            f"{_text(k)} ({n})" for k, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))) + "</p>"
        yield ('<table id="failures"><thead><tr><th>Collection</th><th>Modality</th><th>Patient</th>'
               '<th>Series description</th><th>Series UID</th><th class="num">Attempts</th><th>Reason</th>'
               "</tr></thead><tbody>")
        for r in sorted(self.failed, key=lambda r: (str(r.get("Collection")), str(r.get("SeriesInstanceUID")))):
            meta = r.get("metadata") if isinstance(r.get("metadata"), dict) else {}
            yield (f'<tr data-uid="{_text(r.get("SeriesInstanceUID"))}"><td>{_text(r.get("Collection"))}</td>'
                   f'<td>{_text(r.get("Modality") or meta.get("Modality"))}</td>'
                   f'<td>{_text(r.get("PatientID") or meta.get("PatientID"))}</td>'
                   f'<td>{_text(meta.get("SeriesDescription"))}</td>'
                   f'<td class="uid">{_text(r.get("SeriesInstanceUID"))}</td>'
                   f'<td class="num">{_int(r.get("attempts"))}</td>'
                   f'<td class="reason">{_text(redact(str(r.get("error") or "failed (no reason recorded)")))}'
                   "</td></tr>")
        yield "</tbody></table>"


def _count_tick(v: float) -> str:
    return f"{v:,.0f}" if v == int(v) else f"{v:,.1f}"


def _reason_kind(error: Any) -> str:
    """The reason without its specifics, to count failures alike: the hint in parentheses at
    the end (errors.HarvesterError.one_line) names the class of failure."""
    text = str(error or "no reason recorded")
    hint = re.search(r"\(([^()]*)\)\s*$", text)
    return hint.group(1) if hint else text


def _legend(items: list[tuple[str, str]]) -> str:
    return '<p class="legend">' + "".join(
        f'<span><i style="background:{_COLORS[key]}"></i>{_text(label)}</span>' for key, label in items) + "</p>"
