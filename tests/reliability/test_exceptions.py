"""Every exception classified: redirect loops, redirects to file:, ftp:, an invalid URL or another
host, 2 MB response headers, invalid UTF-8 JSON, a Content-Encoding that does not decode, server
text holding rich markup, and journal or harvest.json lines of the right syntax but the wrong
types. Each gives one line (a failed series, or ``harvester: error:`` and exit 3), never a
traceback, from every CLI command run with ``-X faulthandler``; a rerun against the healthy
server completes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from aiohttp import web
from yarl import URL

from harvester.errors import PermanentRequestError
from harvester.progress import Event, RichDisplay, Tally
from harvester.source.http import check_redirect

from .hostile import (
    assert_rerun_completes,
    build_hostile,
    cli,
    error_lines,
    failed_lines,
    run_args,
    scan,
    serve_hostile,
    statuses,
)


def redirect_to(target: str):
    async def answer(request: web.Request) -> web.Response:
        location = target.replace("{self}", str(request.url)).replace("{port}", str(request.url.port))
        return web.Response(status=302, headers={"Location": location})
    return answer


REDIRECTS = {
    "loop": ("{self}", "redirects in a loop"),
    "file:": ("file:///etc/passwd", "file: URL, which is never followed"),
    "ftp:": ("ftp://127.0.0.1/x.json", "ftp: URL, which is never followed"),
    "invalid URL": ("http://[::1", "invalid URL"),
    "another host": ("http://localhost:{port}/nbia-api/services/v4/getSeries", "another host"),
}


@pytest.mark.parametrize("name", list(REDIRECTS))
def test_refused_redirect_is_one_line_exit_3(tmp_path: Path, name: str, figures) -> None:
    target, expect = REDIRECTS[name]
    h = build_hostile(2)
    h.attacks["getSeries"] = redirect_to(target)
    out = tmp_path / "out"
    with serve_hostile(h):
        run = cli(*run_args(h, tmp_path, out))
        assert run.returncode == 3, (run.stdout[-2000:], run.stderr[-2000:])
        lines = error_lines(run)
        assert len(lines) == 1 and expect in lines[0], run.stderr
        assert "/etc/passwd" not in run.stderr
        scan(out, run)
        assert_rerun_completes(h, tmp_path, out)
    figures.record("issue14", family=f"exceptions: redirect ({name})", attacks=1, outcome="one line, exit 3",
                   message=lines[0][:200])


def test_same_origin_redirect_is_followed(tmp_path: Path) -> None:
    h = build_hostile(1)
    uid = h.uids[0]
    honest = h.archive.zips[uid]

    async def moved(request: web.Request) -> web.Response:
        if "hop" not in request.query:
            return web.Response(status=307, headers={"Location": str(request.rel_url.update_query(hop="1"))})
        return web.Response(body=honest, content_type="application/octet-stream")

    h.attacks[uid] = moved
    with serve_hostile(h):
        run = cli(*run_args(h, tmp_path, tmp_path / "out"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert h.hits[uid] == 2


async def huge_headers(request: web.Request) -> web.Response:
    return web.Response(body=b"PK\x03\x04", headers={"X-Padding": "a" * (2 << 20)})


async def bad_gzip(request: web.Request) -> web.Response:
    return web.Response(body=b"PK\x03\x04 this is not gzip at all" * 100, headers={"Content-Encoding": "gzip"},
                        content_type="application/octet-stream")


async def brotli_unknown(request: web.Request) -> web.Response:
    return web.Response(body=b"\x8b\x02\x80hello\x03" * 100, headers={"Content-Encoding": "br"},
                        content_type="application/octet-stream")


async def markup_text(request: web.Request) -> web.Response:
    return web.Response(status=400, text="access [red]denied[/] [/] [bold", content_type="application/json")


SERIES_ATTACKS = {"2 MB response headers": (huge_headers, "headers too long"),
                  "gzip that is not gzip": (bad_gzip, "Content-Encoding cannot be decoded"),
                  "br without a decoder": (brotli_unknown, "Content-Encoding cannot be decoded"),
                  "rich markup in the server's text": (markup_text, "[red]denied[/]")}


def test_series_attacks_fail_the_series_with_one_line(tmp_path: Path, figures) -> None:
    h = build_hostile(len(SERIES_ATTACKS) + 1)
    for uid, (attack, _) in zip(h.uids, SERIES_ATTACKS.values()):
        h.attacks[uid] = attack
    out = tmp_path / "out"
    with serve_hostile(h):
        run = cli(*run_args(h, tmp_path, out, "--retries", "1"))
        assert run.returncode == 1, (run.stdout[-2000:], run.stderr[-2000:])
        failed = {line.split(": ", 2)[1]: line for line in failed_lines(run)}
        assert len(failed) == len(SERIES_ATTACKS), run.stdout
        for uid, (name, (_, expect)) in zip(h.uids, SERIES_ATTACKS.items()):
            assert expect in failed[uid], (name, failed[uid])
        assert statuses(out)[h.uids[-1]] == "complete"
        scan(out, run)
        assert_rerun_completes(h, tmp_path, out)
    figures.record("issue14", family="exceptions: hostile HTTP answers to getImage", attacks=len(SERIES_ATTACKS),
                   outcome="series failed with one line; exit 1; rerun completes",
                   messages={name: failed[uid].split(": ", 2)[-1][:160]
                             for uid, name in zip(h.uids, SERIES_ATTACKS)})


async def not_utf8(request: web.Request) -> web.Response:
    return web.Response(body=b'[{"SeriesInstanceUID": "1.2.\xff\xfe", "Collection": "HOSTILE"}]',
                        content_type="application/json")


def test_json_that_is_not_utf8_is_one_line_exit_3(tmp_path: Path) -> None:
    h = build_hostile(1)
    h.attacks["getSeries"] = not_utf8
    out = tmp_path / "out"
    with serve_hostile(h):
        run = cli(*run_args(h, tmp_path, out))
        assert run.returncode == 3, run.stderr[-2000:]
        lines = error_lines(run)
        assert len(lines) == 1 and "not valid UTF-8" in lines[0], run.stderr
        scan(out, run)
        assert_rerun_completes(h, tmp_path, out)


def test_markup_in_archive_text_is_shown_not_parsed(tmp_path: Path) -> None:
    """A collection named like rich markup: the query table prints it (it used to raise MarkupError)."""
    h = build_hostile(1)
    h.archive.collections = ["[/]", "[red]x", "a[/b]"]
    with serve_hostile(h):
        proc = cli("query", "getCollectionValues", "--api-url", h.base_url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[/]" in proc.stdout and "Traceback" not in proc.stderr


def test_rich_display_prints_markup_in_a_message_as_text() -> None:
    display = RichDisplay(Tally())
    with display:
        display(Event("failed", "1.2.[/]3", message="HTTP 400: access [red]denied[/] [/] [bold"))


# ------------------------------------------------------------------------------ harvest directories

#: journal lines of the right syntax (JSON) and the wrong types
BAD_JOURNAL_LINES = [
    {"event": "commit", "series": {"SeriesInstanceUID": ["not", "a", "string"], "status": "complete"}},
    {"event": "commit", "series": {"SeriesInstanceUID": "9.1", "status": "complete", "path": "x", "files": "abc"}},
    {"event": "commit", "series": {"SeriesInstanceUID": "9.2", "status": "complete", "path": "x",
                                   "files": [{"path": "x/a.dcm", "size": "12", "md5": "0" * 32}]}},
    {"event": "commit", "series": {"SeriesInstanceUID": "9.3", "status": "complete", "path": ["x"], "files": []}},
    {"event": "commit", "series": {"SeriesInstanceUID": "9.4", "status": 1, "bytes": "many"}},
    {"event": "failed", "series": {"SeriesInstanceUID": "9.5", "status": "failed", "metadata": [1, 2]}},
    {"event": "commit", "series": [1, 2, 3]},
    {"event": "forget", "uid": {"a": 1}, "path": 3, "trash": None},
    {"event": "commit", "series": {"SeriesInstanceUID": "9.6", "status": "complete", "path": "x",
                                   "files": [{"path": "x/a.dcm", "size": 12, "md5": 5}]}},
]
BAD_MANIFEST_RECORDS = [
    {"SeriesInstanceUID": "8.1", "status": "complete", "path": "x", "files": {"a": 1}, "bytes": "many"},
    {"SeriesInstanceUID": 81, "status": "complete"},
    "a string where a record goes",
    {"SeriesInstanceUID": "8.2", "status": "complete", "path": "y", "files": [["x", 1]]},
    {"SeriesInstanceUID": "8.3", "status": "failed", "error": {"why": "a dict"}},
]


def test_malformed_journal_and_manifest_lines_are_reported_and_skipped(tmp_path: Path, figures) -> None:
    h = build_hostile(2)
    out = tmp_path / "out"
    with serve_hostile(h):
        first = cli(*run_args(h, tmp_path, out))
        assert first.returncode == 0, first.stderr[-2000:]
        journal = out / ".harvester" / "journal.jsonl"
        assert not journal.exists()    # no journal is written: these lines are an older version's
        good_lines = 0
        with open(journal, "a", encoding="utf-8") as fh:
            for line in BAD_JOURNAL_LINES:
                fh.write(json.dumps(line) + "\n")
            fh.write("[" * 200_000 + "]" * 200_000 + "\n")  # right syntax, nested past the parser
        doc = json.loads((out / "harvest.json").read_text("utf-8"))
        doc["series"] += BAD_MANIFEST_RECORDS
        doc.update(last_sync=5, started=["not", "a", "time"], finished={"a": 1})  # header fields of the wrong type
        (out / "harvest.json").write_text(json.dumps(doc))
        # With the state database the readers read their records there (harvest.json is its
        # export, not read); the same DIR without it (an older harvest, or one sent without its
        # state) is read from harvest.json and its journal: each bad record is reported there.
        alone = tmp_path / "alone"
        shutil.copytree(out, alone, ignore=shutil.ignore_patterns("state.db*"))
        readers = [cli("status", str(d)) for d in (out, alone)] + [
            cli(*args) for d in (out, alone) for args in (("status", str(d), "--json"), ("verify", str(d)),
                                                           ("report", str(d)),
                                                           ("export", str(d), "--csv", str(tmp_path / "e.csv")))]
        for proc in readers:
            # verify cannot vouch for a series whose record it could not use: it says so, exit 1
            unvouched = "verify" in proc.args and str(alone) in proc.args
            assert proc.returncode == (1 if unvouched else 0), (proc.args, proc.stdout[-1500:], proc.stderr[-1500:])
            if unvouched:
                assert f"{len(BAD_MANIFEST_RECORDS)} records not usable" in proc.stdout, proc.stdout
            warned = [line for line in proc.stderr.splitlines() if "harvest.json: series record" in line]
            assert len(warned) == (len(BAD_MANIFEST_RECORDS) if str(alone) in proc.args else 0), (proc.args,
                                                                                                  proc.stderr)
        resume = cli(*run_args(h, tmp_path, out))
        doc = json.loads((out / "harvest.json").read_text("utf-8"))
        doc.update(last_sync=5, series=doc["series"] + BAD_MANIFEST_RECORDS)  # and again for sync
        (out / "harvest.json").write_text(json.dumps(doc))
        sync = cli("sync", str(h.query_file(tmp_path)), "-o", str(out), "--api-url", h.base_url, "--retries", "2",
                   "--timeout", "5", "--no-progress")
        for proc, reported in ((resume, True), (sync, False)):
            assert proc.returncode == 0, (proc.args, proc.stdout[-1500:], proc.stderr[-1500:])
            lines = [line for line in proc.stderr.splitlines() if "journal.jsonl line" in line]
            numbers = {int(line.split("journal.jsonl line ")[1].split(":")[0]) for line in lines}
            # each line is reported once, by the run that reads it into the state database
            expected = set(range(good_lines + 1, good_lines + len(BAD_JOURNAL_LINES) + 2)) if reported else set()
            assert numbers == expected, proc.stderr
        scan(out, *readers, resume, sync)
    assert set(statuses(out).values()) == {"complete"} and set(statuses(out)) == set(h.uids)
    figures.record("issue14", family="exceptions: malformed journal and harvest.json lines",
                   attacks=len(BAD_JOURNAL_LINES) + 1 + len(BAD_MANIFEST_RECORDS) + 3,  # + 3 header fields
                   outcome="reported with the line or record number, skipped; status/verify/report/export/run/sync "
                           "exit 0 without a traceback")


# ------------------------------------------------------------------------------ units (no I/O)

@pytest.mark.parametrize("current,location,cross,ok", [
    ("https://a.example/x", "/y", False, True),
    ("https://a.example/x", "https://a.example:443/z", False, True),
    ("https://a.example/x", "http://a.example/y", False, False),      # downgrade
    ("https://a.example/x", "http://a.example/y", True, False),       # downgrade, even cross-origin allowed
    ("https://a.example/x", "https://b.example/y", False, False),     # another origin
    ("https://a.example/x", "https://b.example/y", True, True),       # allowed by the flag (https)
    ("http://a.example/x", "http://b.example/y", True, False),        # the flag is https only
    ("http://a.example/x", "https://a.example/y", False, True),       # the upgrade to https on the same host
    ("http://a.example/x", "https://b.example/y", False, False),      # an upgrade, but to another host
    ("https://a.example/x", "file:///etc/passwd", True, False),
    ("https://a.example/x", "javascript:alert(1)", True, False),
    ("https://a.example/x", "http://[::1", True, False),
    ("https://a.example/x", "https://u:p@a.example/y", False, False),  # credentials in the target
    ("https://a.example/x", "https://u@a.example/y", True, False),
])
def test_check_redirect_policy(current: str, location: str, cross: bool, ok: bool) -> None:
    if ok:
        assert check_redirect(URL(current), location, cross_origin=cross, shown=current).host
    else:
        with pytest.raises(PermanentRequestError):
            check_redirect(URL(current), location, cross_origin=cross, shown=current)


# ------------------------------------------------------------------------------ every command

async def deep_json(request: web.Request) -> web.Response:
    return web.Response(body=b"[" * 200_000 + b"]" * 200_000, content_type="application/json")


async def busy_forever(request: web.Request) -> web.Response:
    return web.Response(status=503, text="maintenance", headers={"Retry-After": "inf"})


async def huge_header_json(request: web.Request) -> web.Response:
    return web.Response(body=b"[]", headers={"X-Padding": "b" * (2 << 20)}, content_type="application/json")


METADATA_ATTACKS = {"redirect loop": redirect_to("{self}"), "redirect to file:": redirect_to("file:///etc/passwd"),
                    "JSON nested 200,000 deep": deep_json, "invalid UTF-8": not_utf8,
                    "Retry-After: inf": busy_forever, "2 MB headers": huge_header_json,
                    "markup in a 400": markup_text}


def test_every_network_command_against_hostile_metadata_is_one_line(tmp_path: Path, figures) -> None:
    """run, sync, plan, plan --json and query (json, csv and table) against each hostile getSeries:
    exit 3 (or 2 for the 400), one ``harvester: error:`` line, no traceback (-X faulthandler)."""
    h = build_hostile(1)
    query = h.query_file(tmp_path)
    tried = 0
    with serve_hostile(h):
        net = ["--api-url", h.base_url, "--retries", "1", "--timeout", "5", "--max-retry-after", "5"]
        for name, attack in METADATA_ATTACKS.items():
            h.attacks["getSeries"] = attack
            out = tmp_path / f"out-{tried}"
            commands = [["run", str(query), "-o", str(out), "--no-progress", *net],
                        ["sync", str(query), "-o", str(out), "--no-progress", *net],
                        ["plan", str(query), *net], ["plan", str(query), "--json", *net],
                        *(["query", "getSeries", "Collection=HOSTILE", "--format", fmt, *net]
                          for fmt in ("json", "csv", "table"))]
            for args in commands:
                proc = cli(*args)
                tried += 1
                assert proc.returncode in (2, 3), (name, args[0], proc.returncode, proc.stderr[-1500:])
                lines = error_lines(proc)
                assert len(lines) == 1, (name, args[0], proc.stderr[-1500:])
                assert "Traceback" not in proc.stderr + proc.stdout, (name, args[0])
        h.attacks.clear()
        healthy = cli("run", str(query), "-o", str(tmp_path / "healthy"), "--no-progress", *net)
        assert healthy.returncode == 0, healthy.stderr[-1500:]
    figures.record("issue14", family="exceptions: every network command against hostile metadata",
                   attacks=len(METADATA_ATTACKS), commands=tried,
                   outcome=f"one line, exit 2 or 3, no traceback ({tried} command runs)")
