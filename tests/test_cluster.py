"""One harvest on Dask distributed (harvester.cluster): a real LocalCluster of 2 processes against
our NBIA server on loopback, real files, real SQLite."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import dask
import distributed   # in the test extra: CI runs these, never skips them
import pytest

from harvester import cluster
from harvester.api import sync
from harvester.cli import main
from harvester.models import SeriesTask
from harvester.query import query_from_dict
from harvester.server.archive import Archive
from harvester.server.synthetic import SyntheticSpec, build_synthetic
from harvester.server.testing import ServerHandle, serve_in_thread
from harvester.store import shards
from harvester.store.state import HarvestState

from harvest_helpers import FAST, harvest, normal_series, run_events, select_all, test_config
from harvest_helpers import commits as run_commits  # the name commits is this module's Counter


SPEC = "collections=2,patients=4,studies=1,series=2,instances=4,size=8KiB,modalities=CT+MR,seed=18"
#: the cluster's limit on downloads in flight (--connections); each worker would run 3 alone
HOST_LIMIT = 2
CLUSTER = dict(FAST, workers=3, connections=HOST_LIMIT)
ENV = {k: v for k, v in os.environ.items() if not k.startswith("HARVESTER_")}


@pytest.fixture(scope="module")
def archive(synthetic_cache: Path) -> Archive:
    return build_synthetic(SyntheticSpec.parse(SPEC), synthetic_cache)


@pytest.fixture(scope="module")
def nbia(archive: Archive) -> Iterator[ServerHandle]:
    with serve_in_thread(archive) as handle:
        yield handle


@pytest.fixture
def server(nbia: ServerHandle) -> ServerHandle:
    nbia.set_faults(None)
    nbia.stats.reset()
    return nbia


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[Any]:
    """Two worker processes, one thread each; leases of a dead worker lapse in 5 s (not 30; a live
    worker renews its own every 0.5 s, so even a loaded machine does not lose them)."""
    with dask.config.set({"distributed.scheduler.locks.lease-timeout": "5s",
                          "distributed.scheduler.locks.lease-validation-interval": "0.5s"}):
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=":0") as local, distributed.Client(local) as client:
            yield local, client


def on_cluster(dask_cluster: Any, out: Path, base_url: str, query: dict[str, Any], **overrides: Any) -> Any:
    local, _ = dask_cluster
    config = test_config(base_url, out, **{**CLUSTER, **overrides})
    q = query_from_dict(query, origin="test")
    return anyio.run(lambda: cluster.aharvest(q, config, cluster=local.scheduler_address))


def tree(out: Path) -> dict[str, bytes]:
    """Every file of a harvest but its state and the exports that hold times."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".harvester" not in p.relative_to(out).parts
            and p.name not in ("harvest.json", "metadata.csv")}


def commits(out: Path) -> Counter[str]:
    """Commit events per series in the harvest's database (a merge records each shard's commit once)."""
    return Counter(run_commits(out))


def shard_commits(out: Path) -> set[str]:
    """The series the shards under ``out`` committed, read from their own databases (not merged yet)."""
    root = out / ".harvester" / "shards"
    dbs = sorted(root.glob("*/state.db")) if root.is_dir() else []
    return {event["uid"] for db in dbs for event in run_events(out, db) if event["event"] == "commit"}


def complete(out: Path) -> set[str]:
    state = HarvestState(out)
    state.read()
    try:
        return {u for u, r in state.records.items() if r.get("status") == "complete"}
    finally:
        state.close()


def test_a_cluster_harvest_is_the_single_process_tree_with_faults_and_one_harvest_after(
        dask_cluster: Any, server: ServerHandle, archive: Archive, tmp_path: Path) -> None:
    """Byte for byte the tree one process makes, with faults on; never more than the host limit
    of downloads in flight (each worker alone would run 3); status, verify, export and a later
    single-process run see one harvest."""
    query = select_all(archive)
    uids = set(normal_series(archive))
    faults = "error=0.1,throttle=0.1,reset=0.05,truncate=0.05,corrupt=0.05,seed=18"
    server.set_faults(faults)
    alone = harvest(server.base_url, tmp_path / "alone", query)
    assert alone.ok, alone.failed
    # the same faults, and a rate: each ZIP takes long enough that downloads overlap, and the host
    # limit is put to the test
    server.set_faults(faults + ",rate=512KiB")
    server.stats.reset()
    result = on_cluster(dask_cluster, tmp_path / "cluster", server.base_url, query)
    assert result.ok, result.failed
    out = tmp_path / "cluster"
    assert tree(out) == tree(tmp_path / "alone") and len(tree(out)) >= 4 * len(uids)
    assert result.downloaded == len(uids) and result.totals["complete"] == len(uids)
    assert 1 <= server.stats.downloads_in_flight_peak <= HOST_LIMIT
    assert sum(server.stats.faults.values()) > 0     # the faults did hit the cluster's requests
    assert complete(out) == uids and set(commits(out).values()) == {1}
    assert not any((out / ".harvester" / "shards").iterdir())   # every shard merged and removed

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "harvester", *args], capture_output=True, text=True,
                              timeout=120, env=ENV, stdin=subprocess.DEVNULL)
    status = cli("status", str(out), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["totals"]["complete"] == len(uids)
    verify = cli("verify", str(out))
    assert verify.returncode == 0 and f"{len(uids)} intact" in verify.stdout, verify.stdout
    exported = cli("export", str(out), "--csv", str(tmp_path / "all.csv"))
    assert exported.returncode == 0, exported.stderr
    assert all(u in (tmp_path / "all.csv").read_text() for u in uids)
    server.set_faults(None)
    server.stats.reset()
    again = harvest(server.base_url, out, query)
    assert again.ok and again.skipped == len(uids) and server.stats.downloads == {}

    # sync on the cluster fetches a series whose folder was deleted, and only it
    folder = out / json.loads((out / "harvest.json").read_text())["series"][0]["path"]
    gone = next(r["SeriesInstanceUID"] for r in json.loads((out / "harvest.json").read_text())["series"]
                if out / r["path"] == folder)
    shutil.rmtree(folder)
    local, _ = dask_cluster
    synced = sync(select_all(archive), out, cluster=local.scheduler_address,
                  config=test_config(server.base_url, out, **CLUSTER))
    assert synced.harvest.ok and server.stats.downloads == {gone: 1}
    assert tree(out) == tree(tmp_path / "alone")


def test_a_worker_killed_mid_harvest_ends_complete_without_a_second_commit(
        dask_cluster: Any, server: ServerHandle, archive: Archive, tmp_path: Path) -> None:
    """SIGKILL of a worker while series stream: Dask re-runs its shard, which skips what it
    committed; every series ends complete, committed once, fetched again only if it was in flight."""
    _, client = dask_cluster
    uids = set(normal_series(archive))
    server.set_faults("rate=96KiB")    # about 0.4 s a series: the kill lands mid-harvest
    pids = client.run(os.getpid)
    killed = threading.Event()

    def kill_when_some_are_done() -> None:
        while sum(server.stats.downloads.values()) < 4:
            if done.is_set():
                return
            threading.Event().wait(0.02)
        os.kill(next(iter(pids.values())), signal.SIGKILL)
        killed.set()

    done = threading.Event()
    killer = threading.Thread(target=kill_when_some_are_done, daemon=True)
    killer.start()
    try:
        result = on_cluster(dask_cluster, tmp_path / "out", server.base_url, select_all(archive))
    finally:
        done.set()
        killer.join(10)
    assert killed.is_set()
    out = tmp_path / "out"
    if not result.ok:   # a shard Dask gave up on: the rerun fetches what it left
        result = on_cluster(dask_cluster, out, server.base_url, select_all(archive))
    assert result.ok, result.failed
    assert complete(out) == uids and set(commits(out).values()) == {1}
    assert server.stats.downloads_in_flight_peak <= HOST_LIMIT   # a dead worker's leases lapse, never doubled
    # only what the dead worker had streaming is fetched twice
    assert sum(server.stats.downloads.values()) - len(uids) <= CLUSTER["workers"]
    client.wait_for_workers(2, timeout=60)   # the nanny restarts it, for the next test


@pytest.mark.parametrize("rerun_on", ["cluster", "one process"])
def test_the_client_killed_and_rerun_ends_complete_without_a_second_commit(
        dask_cluster: Any, server: ServerHandle, archive: Archive, tmp_path: Path, rerun_on: str) -> None:
    """The client (and with it its local:2 cluster) SIGKILLed mid-harvest: the rerun, on the
    cluster or in one process, merges the shards it left, fetches only the rest, and every series
    is committed once."""
    local, _ = dask_cluster
    uids = set(normal_series(archive))
    manifest = tmp_path / "q.json"
    manifest.write_text(json.dumps(select_all(archive)))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "harvester", "run", str(manifest), "-o", str(out), "--api-url", server.base_url,
            "--workers", "2", "--connections", str(HOST_LIMIT), "--retries", "6", "--no-progress", "-q"]
    server.set_faults("rate=96KiB")
    proc = subprocess.Popen([*args, "--cluster", "local:2"], env=ENV, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    def committed() -> tuple[set[str], set[str]]:   # in shards not merged yet, in the harvest's database
        return shard_commits(out), set(run_commits(out))

    try:   # killed once some series are committed and a shard holds one (not after requests begun)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            in_shards, merged = committed()
            if in_shards and len(in_shards | merged) >= 2:
                # frozen, then looked at again: the client merges each finished shard (and removes
                # it), so one look and then the kill raced a merge in between
                os.killpg(proc.pid, signal.SIGSTOP)
                in_shards, merged = committed()
                if in_shards and len(in_shards | merged) >= 2:
                    break
                os.killpg(proc.pid, signal.SIGCONT)
            threading.Event().wait(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)   # the client's machine gone: its workers with it
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    in_shards, merged = committed()
    left = in_shards | merged
    assert in_shards and len(left) < len(uids)   # a shard's commit is left for the rerun to merge
    server.set_faults(None)
    before = server.stats.downloads
    again = [*args, "--cluster", local.scheduler_address] if rerun_on == "cluster" else args
    rerun = subprocess.run(again, env=ENV, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    assert complete(out) == uids and set(commits(out).values()) == {1}
    assert not any((out / ".harvester" / "shards").iterdir())
    # the rerun fetched what no shard had committed, and nothing else (a request the killed run
    # sent may be counted after the kill: per series, not a total, is what is compared)
    fetched = {u for u, n in server.stats.downloads.items() if n > before.get(u, 0)}
    assert fetched == uids - left


def test_cluster_without_dask_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)   # import distributed -> ImportError
    manifest = tmp_path / "q.json"
    manifest.write_text(json.dumps({"select": [{"collection": "X"}]}))
    code = main(["run", str(manifest), "-o", str(tmp_path / "out"), "--cluster", "local:2",
                 "--api-url", "http://127.0.0.1:9/nbia-api/services/v4"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'harvester[dask]'" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec", ["local:0", "local:x", "tcp://", "http://h:8786", "tcp://h:port", "somewhere"])
def test_a_bad_cluster_address_is_a_usage_error(spec: str) -> None:
    with pytest.raises(cluster.UsageError):
        cluster.parse_cluster(spec)


def test_cluster_addresses() -> None:
    assert cluster.parse_cluster("local:3") == ("local", 3)
    assert cluster.parse_cluster("tcp://10.0.0.1:8786") == ("scheduler", "tcp://10.0.0.1:8786")


def test_shards_are_balanced_by_bytes_and_series_and_keep_the_plan_order() -> None:
    sizes = [100, 1, 1, 1, 50, 50, 1, 1]
    tasks = [SeriesTask(series_uid=f"1.{i}", collection="C", patient_id="P", study_uid="S", modality="CT",
                        file_size=s, image_count=1, row={}) for i, s in enumerate(sizes)]
    shards = cluster.cut_shards(tasks, 3)
    assert sorted(t.series_uid for s in shards for t in s) == sorted(t.series_uid for t in tasks)
    loads = sorted(sum(t.file_size or 0 for t in s) for s in shards)
    assert loads == [51, 52, 102] or max(loads) - min(loads) <= 51
    for s in shards:
        order = [int(t.series_uid.split(".")[1]) for t in s]
        assert order == sorted(order)
    assert len(cluster.cut_shards(tasks[:2], 5)) == 2


class FakeVariable:
    """A ``distributed.Variable`` without a scheduler (a unit: no I/O)."""

    def __init__(self) -> None:
        self.value: Any = None
        self.set_once = threading.Event()

    def set(self, value: Any) -> None:
        self.value = value
        self.set_once.set()

    def get(self, timeout: Any = None) -> Any:
        if self.value is None:
            raise TimeoutError
        return self.value


class FakeLocalGate:
    def __init__(self) -> None:
        self.pushed: list[float] = []

    def push(self, seconds: float) -> None:
        self.pushed.append(seconds)

    async def wait(self) -> None:
        pass


def test_a_retry_after_seen_by_one_worker_holds_back_the_others() -> None:
    """The shared back-off: worker A's 429 (Retry-After 30 s) pauses A and, through the variable,
    B, which never saw it; capped by max_retry_after; nothing published: no wait."""
    variable = FakeVariable()
    local_a = FakeLocalGate()
    a = cluster.SharedGate(local_a, variable, cap=20.0)
    b = cluster.SharedGate(FakeLocalGate(), variable, cap=20.0)
    assert anyio.run(b.delay) == 0.0
    a.push(30.0)
    assert local_a.pushed == [30.0]
    assert variable.set_once.wait(10)
    b._read_at = float("-inf")   # B's cached read is stale (BACKOFF_FRESH later)
    assert 19.0 < anyio.run(b.delay) <= 20.0
    variable.value = "hostile"   # a value that is not a time is no back-off
    assert anyio.run(cluster.SharedGate(FakeLocalGate(), variable, cap=20.0).delay) == 0.0


def record(uid: str, path: str, data: bytes) -> dict[str, Any]:
    import hashlib

    return {"SeriesInstanceUID": uid, "Collection": "C", "PatientID": "P", "StudyInstanceUID": "S",
            "Modality": "CT", "status": "complete", "path": path, "bytes": len(data), "attempts": 1,
            "error": None, "files": [{"path": f"{path}/1-1.dcm", "size": len(data),
                                      "md5": hashlib.md5(data).hexdigest()}]}


def test_merging_takes_a_finished_shard_leaves_a_busy_one_and_refuses_a_hostile_record(tmp_path: Path) -> None:
    """A finished shard's commit joins the harvest's database and its folder goes; a shard whose
    lock is held (its task still runs) is left for later; a shard record whose folder lies in
    .harvester/ (a forged journal line) is never merged."""
    out = tmp_path / "out"
    main_state = HarvestState(out)
    main_state.open()
    try:
        root = shards.shards_dir(main_state)
        done = shards.ShardState(out, root / "r-0000", {"1.1": "C/P/one"})
        done.open()
        staging = done.staging_dir("1.1")
        staging.mkdir(parents=True)
        (staging / "1-1.dcm").write_bytes(b"DICM one")
        done.commit(record("1.1", "C/P/one", b"DICM one"), staging)
        done.close()
        (root / "r-0001").mkdir()
        forged = record("1.2", ".harvester/evil", b"x")
        (root / "r-0001" / "journal.jsonl").write_text(json.dumps({"event": "commit", "series": forged}) + "\n")
        busy = shards.ShardState(out, root / "r-0002")
        busy.open()   # holds its lock, as a running task does
        try:
            merged, left = shards.merge_leftovers(main_state)
        finally:
            busy.close()
        assert merged == ["1.1"] and main_state.complete("1.1") is not None
        assert (out / "C/P/one/1-1.dcm").read_bytes() == b"DICM one"
        assert main_state.records.get("1.2") is None
        assert len(left) == 1 and "r-0002" in left[0] and "another harvester is running" in left[0]
        assert sorted(p.name for p in root.iterdir()) == ["r-0002"]
        assert shards.merge_leftovers(main_state) == ([], []) and not any(root.iterdir())
    finally:
        main_state.close()


def test_the_command_on_a_local_cluster_exits_when_done(server: ServerHandle, archive: Archive,
                                                         tmp_path: Path) -> None:
    """``harvester run --cluster local:2`` as a user runs it: the harvest done, the command ends
    with 0 (it hung after its summary once: Dask's idle offload thread was joined before its
    pool was told to stop, see ``cli.exit_now``)."""
    manifest = tmp_path / "q.json"
    manifest.write_text(json.dumps(select_all(archive)))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "harvester", "run", str(manifest), "-o", str(out), "--api-url",
                          server.base_url, "--workers", "2", "--connections", str(HOST_LIMIT), "--no-progress", "-q",
                          "--cluster", "local:2"], env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stderr
    assert complete(out) == set(normal_series(archive)) and set(commits(out).values()) == {1}
