"""Hostile query files at the command line: ``harvester plan``/``run`` never print a traceback;
a file that cannot be used is exit 2 with one ``harvester: error:`` line naming it, before
anything is created.

test_query.py fuzzes the parsers; here hypothesis drives the whole command (``cli.main`` in
process, the same code the ``harvester`` script runs) with file *bytes* of every type, and a
set of nasty files goes through real ``python -m harvester run`` processes.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harvester import cli
from harvester.server.app import ARCHIVE_KEY
from harvester.server.archive import Archive
from harvester.server.testing import ServerHandle, serve_in_thread

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
SUFFIXES = [".yaml", ".yml", ".json", ".tcia", ".csv", ".txt", ".tsv", ".YAML", "", ".zip"]
#: A marker a YAML tag would create if the loader ever executed it.
PWNED = Path("/tmp/harvester-yaml-pwned")

SNIPPETS = [
    "select:", "  - collection: SYN-LUNG-CT", "  - collection: NO-SUCH", "    modality: [CT, MR]",
    "  - series: [1.2.3]", "  - series: 1.2.3.4.5", "exclude: {modality: [SEG]}", "limit: 0", "limit: 1e309",
    "layout: '{Nope}'", "layout: ../../etc", "api: ftp://x", "source: gopher", "  - tcia: x.tcia",
    "  - csv: /etc/passwd", "  - tcia: /dev/zero", "  - csv: /proc/self/environ", "  - tcia: ../../../../../etc/shadow",
    "released_after: 2024-13-45", "- &a [*a]", "a: &a [*a, *a, *a]", "b: [*a, *a, *a, *a]", "<<: *a",
    "!!python/object/apply:os.system ['touch /tmp/harvester-yaml-pwned']",
    "? [unhashable]\n: key", "{\"select\": [{\"collection\": \"SYN-LUNG-CT\"}]}", "[" * 200, "]" * 200,
    "ListOfSeriesToDownload=", "ListOfSeriesToDownload=1.2.3", "downloadServerUrl=http://x", "1.2.3.4",
    "1.2.3.." , "SeriesInstanceUID,Collection", "Series UID", "\"1.2.3\",\"x\"", "\"unterminated", "\ufeff",
    "\r", "\t", "9" * 70, "x" * 5000, "\u202e", "select: !!binary aGVsbG8=", "select: !!set {a, b}",
    "select: [{collection: !!timestamp 2001-12-14}]", "%YAML 1.1", "---", "...", "#", "\\x00",
]


def json_values() -> st.SearchStrategy[object]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=30),
                        st.sampled_from(["SYN-LUNG-CT", "1.2.3", "select", "collection", "series", "../../x"]))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["select", "exclude", "limit", "api", "layout", "collection", "modality",
                                         "series", "tcia", "csv", "patients", "studies", "released_after",
                                         "source", "url", "x"]) | st.text(max_size=8), inner, max_size=4)),
        max_leaves=12)


def mutated(valid: list[tuple[str, bytes]]) -> st.SearchStrategy[tuple[str, bytes]]:
    """A valid query file, then a few insertions, deletions or byte flips (or none)."""
    @st.composite
    def build(draw: st.DrawFn) -> tuple[str, bytes]:
        suffix, data = draw(st.sampled_from(valid))
        buf = bytearray(data)
        for _ in range(draw(st.integers(0, 3))):
            at = draw(st.integers(0, len(buf)))
            kind = draw(st.sampled_from(["insert", "delete", "flip"]))
            if kind == "insert":
                buf[at:at] = draw(st.sampled_from(SNIPPETS)).encode("utf-8")
            elif kind == "delete":
                del buf[at:at + draw(st.integers(1, 8))]
            elif buf:
                buf[min(at, len(buf) - 1)] ^= 1 << draw(st.integers(0, 7))
        return suffix, bytes(buf)
    return build()


def file_bytes() -> st.SearchStrategy[bytes]:
    soup = st.lists(st.sampled_from(SNIPPETS), max_size=12).map(lambda lines: "\n".join(lines).encode("utf-8"))
    structured = json_values().flatmap(lambda v: st.sampled_from([
        json.dumps(v, allow_nan=True).encode(), yaml.safe_dump(v, allow_unicode=True).encode("utf-8")]))
    return st.one_of(st.binary(max_size=600), st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
                     soup, structured, soup.map(lambda b: b"\xef\xbb\xbf" + b.replace(b"\n", b"\r\n")),
                     soup.map(lambda b: b + b"\xff\xfe"), soup.map(lambda b: b + b"\x00"))


@pytest.fixture(scope="module")
def module_server(small_archive: Archive) -> Iterator[ServerHandle]:
    with serve_in_thread(small_archive) as handle:
        yield handle


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse: never for these arguments, but do not hide it
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def assert_usage_error_or_plan(code: int, out: str, err: str) -> None:
    """Exit 2 with one error line, or a plan: exit 0, or 1 when a list named series the archive
    does not have (each listed, with the archive's reason, on stderr)."""
    assert "Traceback" not in out + err
    assert code in (0, 1, 2), (code, out[-500:], err[-500:])
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("harvester: error: "), err
    else:
        plan = json.loads(out)
        assert isinstance(plan["series"], int)
        unavailable = [u["SeriesInstanceUID"] for u in plan.get("unavailable", [])]
        assert (code == 1) == bool(unavailable), (code, out[-500:])
        assert all(f"  unavailable: {uid}: " in err for uid in unavailable), err[-500:]
        assert "harvester: error" not in err


def test_plan_never_crashes_on_any_query_file(module_server, tmp_path_factory, figures):
    folder = tmp_path_factory.mktemp("fuzz")
    tried = {"examples": 0, "usage_errors": 0, "planned": 0}

    uid = sorted(r.uid for r in module_server.app[ARCHIVE_KEY].records() if r.row["Collection"] == "SYN-LUNG-CT")[0]
    valid = [(".yaml", b"select:\n  - collection: SYN-LUNG-CT\n    modality: CT\n"),
             (".json", b'{"select": [{"collection": "SYN-LUNG-CT"}], "limit": 2}'),
             (".tcia", f"downloadServerUrl=x\nListOfSeriesToDownload=\n{uid}\n".encode()),
             (".csv", f"Series UID,Collection\n{uid},SYN-LUNG-CT\n".encode()),
             (".txt", f"{uid}\n".encode())]
    files = st.one_of(st.tuples(st.sampled_from(SUFFIXES), file_bytes()), mutated(valid))

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(named=files)
    def check(named: tuple[str, bytes]) -> None:
        suffix, content = named
        tried["examples"] += 1
        path = folder / f"q{tried['examples']}{suffix}"
        path.write_bytes(content)
        code, out, err = run_main(["plan", str(path), "--api-url", module_server.base_url, "--json",
                                   "--retries", "1", "--timeout", "5"])
        assert_usage_error_or_plan(code, out, err)
        tried["usage_errors" if code == 2 else "planned"] += 1

    check()
    assert not PWNED.exists(), "a YAML tag was executed"
    assert tried["usage_errors"] > 0.3 * tried["examples"] and tried["planned"] > 0, tried
    figures.record("hostile", family="query files, hypothesis (plan, in process)", inputs=tried["examples"],
                   hypothesis_examples=tried["examples"], usage_errors=tried["usage_errors"], planned=tried["planned"])


NASTY_FILES: list[tuple[str, bytes]] = [
    ("binary.yaml", bytes(range(256)) * 4),
    ("nul.tcia", b"ListOfSeriesToDownload=\n1.2.3\x00\n"),
    ("latin1.csv", "SeriesInstanceUID\n1.2.3\n\xe9".encode("latin-1")),
    ("deep.json", b"[" * 100_000 + b"]" * 100_000),
    ("deep.yaml", b"select: " + b"[" * 100_000),
    ("laughs.yaml", b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                    b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
                    b"select: [{collection: SYN-LUNG-CT, modality: *d}]\n"),
    ("tag.yaml", b"select: !!python/object/apply:os.system ['touch /tmp/harvester-yaml-pwned']\n"),
    ("devzero.yaml", b"select:\n  - tcia: /dev/zero\n"),
    ("etc.yaml", b"select:\n  - csv: /etc/passwd\n"),
    ("huge-field.csv", b"SeriesInstanceUID\n" + b"1" * 2_000_000 + b"\n"),
    ("long-uid.tcia", b"ListOfSeriesToDownload=\n" + b"1." * 5000 + b"1\n"),
    ("cart-without-list.tcia", b"downloadServerUrl=x\nmanifestVersion=3.0\n"),
    ("unhashable.yaml", b"? [a, b]\n: c\n"),
    ("bom-crlf.tcia", b"\xef\xbb\xbfListOfSeriesToDownload=\r\n1.2.3..4\r\n"),
    ("empty.csv", b""),
    ("no-suffix", b"select: [{collection: SYN-LUNG-CT}]\n"),
]


def _one_gigabyte() -> None:
    """A regression that reads /dev/zero must fail here, not take the machine's memory."""
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


@pytest.mark.slow
def test_run_process_on_nasty_files_is_exit_2_with_one_line(module_server, tmp_path, figures):
    (tmp_path / "a-dir.yaml").mkdir()
    fifo = tmp_path / "fifo.tcia"
    os.mkfifo(fifo)
    paths = [tmp_path / "a-dir.yaml", fifo, tmp_path / "missing.yaml"]
    for name, content in NASTY_FILES:
        (tmp_path / name).write_bytes(content)
        paths.append(tmp_path / name)
    for path in paths:
        out = tmp_path / f"out-{path.name}"
        proc = subprocess.run([sys.executable, "-m", "harvester", "run", str(path), "-o", str(out), "--api-url",
                               module_server.base_url, "--no-progress"],
                              capture_output=True, text=True, env=ENV, timeout=120, stdin=subprocess.DEVNULL,
                              preexec_fn=_one_gigabyte)
        assert "Traceback" not in proc.stderr + proc.stdout, (path.name, proc.stderr[-3000:])
        assert proc.returncode == 2, (path.name, proc.returncode, proc.stderr[-1000:])
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("harvester: error: "), (path.name, proc.stderr)
        assert path.name in lines[0] or str(path) in lines[0], lines[0]
        assert len(lines[0]) < 600, "an error line must stay readable whatever the input"
        assert not out.exists(), f"{path.name}: output created for an unusable query"
    assert not PWNED.exists()
    assert sum(module_server.stats.downloads.values()) == 0
    figures.record("hostile", family="query files, nasty set (run, subprocess)", inputs=len(paths))
