"""Instance-level fetching and resume on NBIA (issue 17), against our loopback server.

Each series is fetched instance by instance (getSOPInstanceUIDs, getMD5HashForImage,
getSingleImage), several at once; the tree must be byte for byte the one the ZIP path writes,
under faults too, and an interrupted series must cost only the instances in flight: the
server's per-SOP counters of getSingleImage say what was fetched again.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from harvester.server.archive import Archive
from harvester.server.synthetic import SyntheticSpec, build_synthetic
from harvester.server.testing import ServerHandle, serve_in_thread
from harvester.store.sink import RESUME_JOURNAL, prune_resume_folders, resume_folder
from tests.harvest_helpers import REPO, assert_identical, harvest, manifest, normal_series, select_all


def tree(out: Path) -> dict[str, bytes]:
    """Every file of the DICOM tree (not .harvester, the exports or licenses) by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] not in (".harvester", "licenses")
            and p.name not in ("harvest.json", "metadata.csv")}


def files_of(out: Path) -> dict[str, list[tuple[str, int, str, str]]]:
    return {r["SeriesInstanceUID"]: sorted((f["path"], f["size"], f["md5"], f["SOPInstanceUID"]) for f in r["files"])
            for r in manifest(out)["series"]}


def test_instance_level_harvest_is_byte_identical_to_the_zip_path(server: ServerHandle, small_archive: Archive,
                                                                 tmp_path: Path) -> None:
    query = select_all(small_archive)
    uids = normal_series(small_archive)
    zipped = harvest(server.base_url, tmp_path / "zip", query, per_instance="never")
    assert zipped.ok
    assert server.stats.instances == {}
    server.stats.reset()
    single = harvest(server.base_url, tmp_path / "inst", query, per_instance="always")
    assert single.ok, single.failed
    # every instance came through getSingleImage exactly once, and no ZIP was asked for
    sops = {i.sop_uid for u in uids for i in small_archive.get(u).instances}
    assert server.stats.instances == {sop: 1 for sop in sops}
    assert server.stats.downloads == {}
    assert tree(tmp_path / "inst") == tree(tmp_path / "zip")
    assert files_of(tmp_path / "inst") == files_of(tmp_path / "zip")
    assert_identical(tmp_path / "inst", small_archive, uids)
    assert not any((tmp_path / "inst" / ".harvester" / "instances").iterdir())  # committed: nothing kept


def test_instance_level_harvest_under_faults_is_byte_identical(server: ServerHandle, small_archive: Archive,
                                                              tmp_path: Path) -> None:
    query = select_all(small_archive)
    uids = normal_series(small_archive)
    assert harvest(server.base_url, tmp_path / "zip", query, per_instance="never").ok
    server.set_faults("error=0.15,throttle=0.05,reset=0.15,seed=11")
    result = harvest(server.base_url, tmp_path / "inst", query, per_instance="always")
    faults = server.stats.faults
    assert result.ok, result.failed
    assert faults.get("error") and faults.get("reset")  # the faults did hit
    assert tree(tmp_path / "inst") == tree(tmp_path / "zip")
    assert files_of(tmp_path / "inst") == files_of(tmp_path / "zip")
    assert_identical(tmp_path / "inst", small_archive, uids)


# ---------------------------------------------------------------- resume

@pytest.fixture(scope="module")
def one_series_archive(tmp_path_factory: pytest.TempPathFactory) -> Archive:
    spec = SyntheticSpec.parse("collections=1,patients=1,studies=1,series=1,instances=16,size=48KiB,seed=5")
    return build_synthetic(spec, tmp_path_factory.mktemp("one-series"))


def journal_sops(out: Path, uid: str) -> list[str]:
    path = resume_folder(out / ".harvester" / "instances", uid) / RESUME_JOURNAL
    if not path.exists():
        return []
    sops = []
    for line in path.read_bytes().splitlines():
        try:
            sops.append(json.loads(line)["sop"])
        except (ValueError, KeyError):
            continue  # torn by the kill
    return sops


def test_a_failed_attempt_keeps_its_verified_instances_and_a_corrupted_one_is_refetched(
        one_series_archive: Archive, tmp_path: Path) -> None:
    archive = one_series_archive
    (uid,) = normal_series(archive)
    out = tmp_path / "out"
    total = len(archive.get(uid).instances)
    with serve_in_thread(archive, faults="total_rate=256KiB") as server:
        # once a third of the series is kept, every request fails: the attempt fails for good
        def outage() -> None:
            deadline = time.monotonic() + 120
            while len(journal_sops(out, uid)) < total // 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            server.set_faults("error=1")

        watcher = threading.Thread(target=outage, daemon=True)
        watcher.start()
        first = harvest(server.base_url, out, select_all(archive), per_instance="always", retries=1,
                        series_retries=0)
        watcher.join()
        assert not first.ok  # some request failed for good: the series failed
        kept = journal_sops(out, uid)
        assert total // 3 <= len(kept) < total
        fetched_before = server.stats.instances
        # one kept instance is damaged on disk, its size unchanged: it must not be trusted
        by_sop = {i.sop_uid: i for i in archive.get(uid).instances}
        damaged = kept[0]
        folder = resume_folder(out / ".harvester" / "instances", uid)
        (victim,) = [p for p in folder.iterdir() if p.name != RESUME_JOURNAL and p.read_bytes()
                     == by_sop[damaged].path.read_bytes()]
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
        server.set_faults(None)
        server.stats.reset()
        second = harvest(server.base_url, out, select_all(archive), per_instance="always")
        assert second.ok, second.failed
        again = server.stats.instances
    assert fetched_before  # the first attempt did fetch
    assert again.get(damaged) == 1                     # the damaged one was fetched again
    assert all(sop not in again for sop in kept[1:])   # the intact kept ones were not
    assert set(again) == set(by_sop) - set(kept[1:])
    assert_identical(out, archive, [uid])


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_kill_9_in_the_middle_of_a_series_then_rerun_refetches_no_verified_instance(
        one_series_archive: Archive, tmp_path: Path, how: signal.Signals) -> None:
    """kill -9, or Ctrl-C (which must not undo a first run whose only work is kept instances)."""
    archive = one_series_archive
    (uid,) = normal_series(archive)
    out = tmp_path / "out"
    q = tmp_path / "q.json"
    q.write_text(json.dumps(select_all(archive)))
    total = len(archive.get(uid).instances)
    # about 0.2 s an instance over two streams: the kill lands with the series half fetched
    with serve_in_thread(archive, faults="total_rate=256KiB") as server:
        proc = subprocess.Popen([sys.executable, "-m", "harvester", "run", str(q), "-o", str(out), "--api-url",
                                 server.base_url, "--per-instance", "always", "--workers", "1", "--no-progress",
                                 "--quiet"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 120
        while len(journal_sops(out, uid)) < total // 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(how)
        assert proc.wait(60) == (130 if how == signal.SIGINT else -signal.SIGKILL)
        proc.stderr.close()  # type: ignore[union-attr]
        kept = journal_sops(out, uid)
        assert total // 3 <= len(kept) < total
        assert not (out / "harvest.json").exists() or all(r["status"] != "complete" for r in manifest(out)["series"])
        server.set_faults(None)
        server.stats.reset()
        result = harvest(server.base_url, out, select_all(archive), per_instance="always")
        again = server.stats.instances
    assert result.ok, result.failed
    assert not set(kept) & set(again)          # no verified instance was fetched again
    assert len(again) == total - len(kept)     # every other one exactly once
    assert set(again.values()) == {1}
    assert_identical(out, archive, [uid])


def test_auto_fetches_only_large_series_instance_by_instance() -> None:
    from harvester.models import SeriesTask
    from harvester.source.nbia.source import per_instance

    def task(count: Any, size: Any) -> SeriesTask:
        return SeriesTask(series_uid="1.2", collection="C", patient_id="P", study_uid="1", modality="CT",
                          image_count=count, file_size=size, row={})

    assert per_instance(task(500, 1 << 30), "auto")
    assert not per_instance(task(500, 1 << 20), "auto")        # small: one ZIP
    assert not per_instance(task(1, 1 << 30), "auto")          # one instance: nothing in parallel
    assert per_instance(task(4, 1 << 30), "auto")              # 256 MiB instances: streamed, never held whole
    assert not per_instance(task(None, None), "auto")
    assert per_instance(task(None, None), "always")
    assert not per_instance(task(500, 1 << 30), "never")


def test_per_instance_is_an_option_of_run_and_sync() -> None:
    from harvester.cli import build_config, build_parser
    from tests.test_cli import assert_one_line_error, cli

    for command in ("run", "sync"):
        args = build_parser().parse_args([command, "q.yaml", "-o", "out", "--per-instance", "never"])
        assert build_config(args, {}).per_instance == "never"
        assert build_config(build_parser().parse_args([command, "q.yaml", "-o", "out"]), {}).per_instance == "auto"
    assert "--per-instance" in assert_one_line_error(cli("run", "q.yaml", "-o", "out", "--per-instance", "sometimes"))


@pytest.mark.anyio
@pytest.mark.parametrize("announced", ["more", "unknown series"])
async def test_an_instance_list_short_of_the_plan_fails_before_any_instance_is_fetched(
        server: ServerHandle, small_archive: Archive, tmp_path: Path, announced: str) -> None:
    from harvester.errors import IncompleteSeriesError
    from harvester.models import SeriesTask
    from harvester.source.nbia import NBIAClient, make_session
    from harvester.source.nbia.source import NBIASource
    from harvester.store.sink import StoreSinks
    from tests.harvest_helpers import test_config

    rec = small_archive.get(normal_series(small_archive)[0])
    uid = rec.uid if announced == "more" else "1.2.826.0.1.999"
    task = SeriesTask(series_uid=uid, collection=rec.row["Collection"], patient_id="P", study_uid="S",
                      modality="CT", image_count=len(rec.instances) + 1 if announced == "more" else None,
                      file_size=None, row={})
    config = test_config(server.base_url, tmp_path / "out", per_instance="always")
    async with make_session(config) as session:
        source = NBIASource(NBIAClient(config, session))
        with pytest.raises(IncompleteSeriesError, match="getSOPInstanceUIDs lists"):
            await source.fetch_series(task, partial=tmp_path / "p", staging=tmp_path / "staging",
                                      on_bytes=lambda n: None, rate=None,
                                      sinks=StoreSinks(config.limits, resume_root=tmp_path / "instances"))
    assert server.stats.instances == {}
    assert not (tmp_path / "staging").exists()


def test_kept_instances_of_a_series_committed_since_or_dropped_from_the_plan_are_removed(
        server: ServerHandle, small_archive: Archive, tmp_path: Path) -> None:
    uids = normal_series(small_archive)
    out = tmp_path / "out"
    root = out / ".harvester" / "instances"
    # what interrupted runs left: instances of a series the ZIP path now commits, and of one no
    # longer planned; and a link that is no resume folder
    committed, dropped = resume_folder(root, uids[0]), resume_folder(root, uids[1])
    for folder in (committed, dropped):
        folder.mkdir(parents=True)
        (folder / RESUME_JOURNAL).write_text("")
    outside = tmp_path / "outside"
    (outside / "keep.txt").parent.mkdir()
    (outside / "keep.txt").write_text("not ours")
    (root / "a-link").symlink_to(outside, target_is_directory=True)
    result = harvest(server.base_url, out, {"select": [{"series": [uids[0]]}]}, per_instance="never")
    assert result.ok, result.failed
    assert not root.exists() or list(root.iterdir()) == []
    assert (outside / "keep.txt").read_text() == "not ours"  # a link goes as a link
    # the folder of a series still to do stays for the next run
    todo = resume_folder(root, uids[2])
    todo.mkdir(parents=True)
    assert prune_resume_folders(root, [uids[2]]) == 0 and todo.is_dir()
    assert prune_resume_folders(root, []) == 1 and not todo.exists()
