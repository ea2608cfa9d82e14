"""Disk full and unwritable output: exit 3 with one clear line, verified series kept, and a rerun
after the problem is fixed completes without fetching the kept series again.

Two ways to fill the disk: a real 3 MB tmpfs (needs root; skipped otherwise) for ENOSPC, and a
file-size limit (``RLIMIT_FSIZE`` in the child, SIGXFSZ ignored) for EFBIG, which works anywhere.
"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from harvest_helpers import assert_identical, harvest, manifest, normal_series, select_all
from harvester.api import verify_tree
from harvester.server.archive import Archive
from harvester.server.synthetic import SyntheticSpec, build_synthetic
from harvester.server.testing import serve_in_thread

from .crash import check_tree

#: 20 series of ~260 KB: about 5 MB in all, so a 3 MB filesystem fills part-way.
BIG_SPEC = "collections=1,patients=4,studies=1,series=5,instances=4,size=64KiB,seed=63"
#: 24 series of ~10 KB: small files, a state database and a harvest.json that grow with every series.
SMALL_SPEC = "collections=1,patients=4,studies=1,series=6,instances=2,size=4KiB,seed=64"
#: 24 series of 60 small files: harvest.json (every file listed, indented) outgrows every state
#: file (the journal, the compressed state database, its WAL bounded by checkpoints).
MANY_FILES_SPEC = "collections=1,patients=4,studies=1,series=6,instances=60,size=1KiB,seed=65"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}


@pytest.fixture(scope="module")
def big_archive(synthetic_cache: Path) -> Archive:
    return build_synthetic(SyntheticSpec.parse(BIG_SPEC), synthetic_cache)


@pytest.fixture(scope="module")
def small_files_archive(synthetic_cache: Path) -> Archive:
    return build_synthetic(SyntheticSpec.parse(SMALL_SPEC), synthetic_cache)


@pytest.fixture(scope="module")
def many_files_archive(synthetic_cache: Path) -> Archive:
    return build_synthetic(SyntheticSpec.parse(MANY_FILES_SPEC), synthetic_cache)


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` for the block; skips the test when mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)
        if os.path.ismount(path):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def run_cli(query: Path, out: Path, base_url: str, *extra: str, fsize: int | None = None
            ) -> subprocess.CompletedProcess[str]:
    def limit() -> None:  # in the child, before exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        [sys.executable, "-m", "harvester", "run", str(query), "-o", str(out), "--api-url", base_url,
         "--workers", "2", "--timeout", "5", "--no-progress", "--quiet", *extra],
        capture_output=True, text=True, env=ENV, timeout=300, stdin=subprocess.DEVNULL,
        preexec_fn=limit if fsize is not None else None)


def write_query(tmp_path: Path, archive: Archive) -> Path:
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(select_all(archive)))
    return path


def one_error_line(proc: subprocess.CompletedProcess[str], code: int = 3) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout[-1500:], proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("harvester: error: ")
    return lines[0]


def assert_disk_full_line(line: str) -> None:
    assert "disk full" in line and "free some space" in line and "run the same command again" in line, line
    assert "verified series are kept" in line


def kept_series(out: Path, archive: Archive) -> set[str]:
    """What survived the fatal stop: harvest.json and the state database agree with the tree; returns the
    series complete on disk (or recoverable), which a rerun must not fetch again."""
    must_skip = check_tree(out, archive)
    result = verify_tree(out)
    assert result.files_ok, (result.problems[:5], result.extra[:5])  # the series the stop cut off are missing
    listed = {r["SeriesInstanceUID"] for r in manifest(out)["series"] if r["status"] == "complete"}
    assert listed <= must_skip
    return must_skip


@pytest.mark.slow
def test_disk_full_on_a_small_filesystem_then_resume(big_archive, tmp_path, figures):
    query = write_query(tmp_path, big_archive)
    with tmpfs(tmp_path / "fs", "size=3m") as fs, serve_in_thread(big_archive) as srv:
        out = fs / "out"
        # past the free-space check (the plan is larger than the 3 MB filesystem): the disk that
        # fills up mid-run, as when something else writes to it meanwhile
        proc = run_cli(query, out, srv.base_url, "--no-space-check")
        line = one_error_line(proc)
        assert_disk_full_line(line)
        kept = kept_series(out, big_archive)
        assert kept, "nothing was verified before the disk filled: the test would prove little"
        assert len(kept) < len(normal_series(big_archive))
        before = srv.stats.downloads
        # free some space: the filesystem grows (as if the user deleted something), then rerun
        subprocess.run(["mount", "-o", "remount,size=64m", str(fs)], check=True)
        again = run_cli(query, out, srv.base_url)
        assert again.returncode == 0, again.stderr
        after = srv.stats.downloads
        assert all(after[u] == before[u] for u in kept), "a series kept through the disk-full stop was fetched again"
        assert_identical(out, big_archive, normal_series(big_archive))
    figures.record("disk", case="tmpfs ENOSPC", kept=len(kept), series=len(normal_series(big_archive)),
                   message=line)


@pytest.mark.slow
def test_file_size_limit_is_disk_full_then_resume(small_files_archive, tmp_path, figures):
    """EFBIG (a quota or file-size limit): the state database and harvest.json outgrow the limit mid-run."""
    query = write_query(tmp_path, small_files_archive)
    out = tmp_path / "out"
    with serve_in_thread(small_files_archive) as srv:
        proc = run_cli(query, out, srv.base_url, fsize=128 * 1024)
        line = one_error_line(proc)
        assert_disk_full_line(line)
        kept = kept_series(out, small_files_archive)
        assert kept and len(kept) < len(normal_series(small_files_archive))
        before = srv.stats.downloads
        again = run_cli(query, out, srv.base_url)
        assert again.returncode == 0, again.stderr
        after = srv.stats.downloads
        assert all(after[u] == before[u] for u in kept)
        assert_identical(out, small_files_archive, normal_series(small_files_archive))
    figures.record("disk", case="RLIMIT_FSIZE EFBIG", kept=len(kept),
                   series=len(normal_series(small_files_archive)), message=line)


@pytest.mark.slow
def test_disk_full_while_writing_the_final_manifest_is_not_success(many_files_archive, tmp_path, figures):
    """Every series verified and recorded, then harvest.json cannot be rewritten: that is a fatal
    stop (exit 3), not a success with a stale manifest; the rerun finishes it without downloading."""
    query = write_query(tmp_path, many_files_archive)
    out = tmp_path / "out"
    uids = normal_series(many_files_archive)
    with serve_in_thread(many_files_archive) as srv:
        # a first run, to learn the sizes of the state and of the final harvest.json
        probe = tmp_path / "probe"
        assert harvest(srv.base_url, probe, select_all(many_files_archive)).ok
        # the largest state file: the database, or its WAL (at most 64 pages between checkpoints,
        # and one commit)
        state = max((probe / ".harvester" / "state.db").stat().st_size, 80 * 4096)
        final_manifest = (probe / "harvest.json").stat().st_size
        assert state < final_manifest, (state, final_manifest)
        limit = (state + final_manifest) // 2  # the state fits, the final harvest.json does not
        before = srv.stats.downloads
        proc = run_cli(query, out, srv.base_url, fsize=limit)
        line = one_error_line(proc)
        assert_disk_full_line(line)
        kept = kept_series(out, many_files_archive)
        assert kept == set(uids)
        again = run_cli(query, out, srv.base_url)
        assert again.returncode == 0, again.stderr
        after = srv.stats.downloads
        assert all(after[u] == before[u] + 1 for u in uids), "the rerun downloaded again"
        assert_identical(out, many_files_archive, uids)
    figures.record("disk", case="final harvest.json EFBIG", kept=len(kept), series=len(uids), message=line)


def test_output_under_a_regular_file_is_one_clear_error(small_files_archive, tmp_path, figures):
    query = write_query(tmp_path, small_files_archive)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with serve_in_thread(small_files_archive) as srv:
        for out in (blocker / "out", blocker):
            proc = run_cli(query, out, srv.base_url)
            line = one_error_line(proc)
            assert str(blocker) in line and "-o DIR" in line, line
            assert sum(srv.stats.downloads.values()) == 0
    assert blocker.read_text() == "not a directory"
    figures.record("disk", case="output under a regular file", message=line.replace(str(tmp_path), "<tmp>"))


def test_read_only_output_is_one_clear_error(small_files_archive, tmp_path, figures):
    query = write_query(tmp_path, small_files_archive)
    with serve_in_thread(small_files_archive) as srv:
        # an existing harvest, then its filesystem turns read-only (a read-only bind mount of it)
        out = tmp_path / "out"
        assert harvest(srv.base_url, out, select_all(small_files_archive)).ok
        before = (out / "harvest.json").read_bytes()
        with tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
            proc = run_cli(query, ro / "out", srv.base_url)
            line = one_error_line(proc)
            assert "cannot write" in line and "-o DIR" in line, line
        bind = subprocess.run(["mount", "--bind", "-o", "ro", str(out), str(out)], capture_output=True, text=True)
        if bind.returncode != 0:
            pytest.skip(f"read-only bind mount not permitted: {bind.stderr.strip()}")
        try:
            proc = run_cli(query, out, srv.base_url)
            bind_line = one_error_line(proc)
            assert "cannot write" in bind_line, bind_line
        finally:
            subprocess.run(["umount", str(out)], capture_output=True)
        assert (out / "harvest.json").read_bytes() == before
        assert_identical(out, small_files_archive, normal_series(small_files_archive))
    figures.record("disk", case="read-only output (tmpfs mounted ro; a ro bind mount of a harvest too)",
                   message=line.replace(str(tmp_path), "<tmp>"))
