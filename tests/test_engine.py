"""The engine against our NBIA-compatible server on loopback: real HTTP, real DICOM, real files."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from harvest_helpers import assert_identical, harvest, manifest, normal_series, select_all
from harvester.api import verify_tree

V4_DATE = re.compile(r"\d{2}-\d{2}-\d{4}")


def test_full_harvest_is_byte_identical(server, small_archive, tmp_path):
    out = tmp_path / "out"
    result = harvest(server.base_url, out, select_all(small_archive))
    uids = normal_series(small_archive)
    assert result.ok, result.failed
    assert result.downloaded == len(uids)
    assert_identical(out, small_archive, uids)
    doc = manifest(out)
    assert doc["schema"] == "harvester/1"
    assert doc["totals"]["complete"] == len(uids) and doc["totals"]["failed"] == 0
    assert doc["finished"] and doc["started"]
    # one download per series, and no extra per-series metadata calls: getSeries rows carry the sizes
    assert all(n == 1 for n in server.stats.downloads.values())
    assert server.stats.requests.get("getSeriesSize", 0) == 0
    # metadata.csv for scripts that read the Data Retriever's output
    header = (out / "metadata.csv").read_text().splitlines()[0]
    assert header.startswith("Series UID,Collection,3rd Party Analysis")


def test_rerun_downloads_nothing(server, small_archive, tmp_path):
    out = tmp_path / "out"
    assert harvest(server.base_url, out, select_all(small_archive)).ok
    before = sum(server.stats.downloads.values())
    result = harvest(server.base_url, out, select_all(small_archive))
    assert result.ok and result.downloaded == 0
    assert result.skipped == len(normal_series(small_archive))
    assert sum(server.stats.downloads.values()) == before


def test_deleted_file_is_fetched_again(server, small_archive, tmp_path):
    out = tmp_path / "out"
    assert harvest(server.base_url, out, select_all(small_archive)).ok
    victim = manifest(out)["series"][0]
    (out / victim["files"][0]["path"]).unlink()
    # A plain rerun trusts harvest.json only when the files are there: recovery drops the record.
    result = harvest(server.base_url, out, select_all(small_archive))
    assert result.ok
    assert server.stats.downloads[victim["SeriesInstanceUID"]] == 2
    assert_identical(out, small_archive, normal_series(small_archive))


FAULTS = {
    "error": "error=0.4,seed=11",
    "throttle": "throttle=0.4,retry_after=0,seed=12",
    "reset": "reset=0.4,seed=13",
    "truncate": "truncate=0.5,seed=14",
    "corrupt": "corrupt=0.5,seed=15",
    "stall": "stall=0.4,stall_for=4s,seed=16",
    "all": "error=0.15,throttle=0.1,retry_after=0,reset=0.1,truncate=0.15,corrupt=0.1,stall=0.05,stall_for=4s,"
           "latency=5ms,seed=17",
}


@pytest.mark.parametrize("kind", list(FAULTS))
def test_faults_still_end_complete_and_identical(server, small_archive, tmp_path, kind):
    server.set_faults(FAULTS[kind])
    out = tmp_path / "out"
    result = harvest(server.base_url, out, select_all(small_archive), read_timeout=1.0, series_retries=8, retries=8)
    faults = server.stats.faults
    assert sum(faults.values()) > 0, "the fault was never injected: the test would prove nothing"
    assert result.ok, result.failed
    assert_identical(out, small_archive, normal_series(small_archive))


def test_corrupt_instance_is_repaired_alone(server, small_archive, tmp_path):
    server.set_faults("corrupt=1.0,seed=5")  # every download has one bad instance
    out = tmp_path / "out"
    result = harvest(server.base_url, out, select_all(small_archive))
    assert result.ok, result.failed
    assert server.stats.requests.get("getSingleImage", 0) >= 1
    assert all(n == 1 for n in server.stats.downloads.values()), "repair must not refetch whole series"
    assert_identical(out, small_archive, normal_series(small_archive))


def test_hostile_zips_fail_alone_and_write_nothing_outside(server, small_archive, tmp_path):
    hostile = [r for r in small_archive.records() if getattr(r, "hostile_kind", None)]
    assert hostile, "the archive has no hostile series"
    out = tmp_path / "deep" / "out"
    before = set(tmp_path.rglob("*"))
    query = select_all(small_archive)
    query["select"].append({"collection": hostile[0].row["Collection"]})
    result = harvest(server.base_url, out, query, series_retries=1)
    failed = dict(result.failed)
    for rec in hostile:
        assert rec.uid in failed, f"hostile series ({rec.hostile_kind}) was accepted"
        assert failed[rec.uid], "a failure needs a reason"
    assert_identical(out, small_archive, normal_series(small_archive))
    after = set(tmp_path.rglob("*"))
    outside = [p for p in after - before if not p.resolve().is_relative_to(out.resolve())
               and p != out.parent]
    assert not outside, outside
    assert not Path("/tmp/evil.dcm").exists()
    assert result.failed and not result.ok


def test_verify_catches_a_flipped_byte(server, small_archive, tmp_path):
    out = tmp_path / "out"
    assert harvest(server.base_url, out, select_all(small_archive)).ok
    assert verify_tree(out).ok
    victim = out / manifest(out)["series"][1]["files"][0]["path"]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = verify_tree(out)
    assert not result.ok
    assert len(result.problems) == 1 and "MD5" in result.problems[0]


@pytest.mark.parametrize("layout", ["classic", "flat", "descriptive",
                                    "{Collection}/{PatientID}/{StudyDate}-{StudyDescription}/{Modality}-{SeriesNumber}"])
def test_layouts_put_every_series_in_its_own_folder(server, small_archive, tmp_path, layout):
    out = tmp_path / "out"
    result = harvest(server.base_url, out, select_all(small_archive), layout=layout)
    assert result.ok
    recs = manifest(out)["series"]
    paths = [r["path"] for r in recs]
    assert len(set(paths)) == len(paths)
    for p in paths:
        assert not any(q != p and q.startswith(p + "/") for q in paths)
        assert ".." not in Path(p).parts and not os.path.isabs(p)
    if layout == "classic":
        r = recs[0]
        assert r["path"].endswith(f"/{r['StudyInstanceUID']}/{r['SeriesInstanceUID']}")
    assert_identical(out, small_archive, normal_series(small_archive))


def test_descriptive_layout_matches_data_retriever(server, small_archive, tmp_path):
    out = tmp_path / "out"
    assert harvest(server.base_url, out, select_all(small_archive), layout="descriptive").ok
    rec = manifest(out)["series"][0]
    parts = Path(rec["path"]).parts
    assert parts[0] == rec["Collection"] and len(parts) == 4
    assert parts[2].endswith(rec["StudyInstanceUID"][-5:])
    assert parts[3].endswith(rec["SeriesInstanceUID"][-5:])
    study_date = rec["study"]["StudyDate"] if rec.get("study") else rec["metadata"]["StudyDate"]
    assert V4_DATE.fullmatch(study_date)  # as v4 sends it, and as the Data Retriever names the folder
    assert parts[2].startswith(study_date + "-")


def test_manifest_paths_are_relative_and_complete(server, small_archive, tmp_path):
    out = tmp_path / "out"
    assert harvest(server.base_url, out, select_all(small_archive)).ok
    doc = json.loads((out / "harvest.json").read_text())
    for rec in doc["series"]:
        for key in ("SeriesInstanceUID", "Collection", "PatientID", "StudyInstanceUID", "Modality", "status",
                    "path", "bytes", "attempts", "error", "files"):
            assert key in rec
        assert rec["bytes"] == sum(f["size"] for f in rec["files"])
        for f in rec["files"]:
            assert not os.path.isabs(f["path"]) and f["path"].startswith(rec["path"] + "/")


# ---------------------------------------------------------------- the engine alone, against a fake Source
# No network: the fake source is scripted per series and leaves one small file in staging, as a
# real one leaves verified files. What is tested is the engine's own rules.

import hashlib  # noqa: E402
from typing import Any  # noqa: E402

import anyio  # noqa: E402

from harvester.config import Config  # noqa: E402
from harvester.engine import Engine  # noqa: E402
from harvester.errors import DiskFullError, PermanentRequestError, RetryableRequestError  # noqa: E402
from harvester.models import SeriesTask, UnpackedSeries, VerifiedFile  # noqa: E402
from harvester.events import Hub  # noqa: E402
from harvester.source.base import DownloadSlots, Source  # noqa: E402
from harvester.store.state import HarvestState  # noqa: E402


class FakeSource:
    """A ``Source`` without I/O of its own: ``script[uid]`` is the outcome of each attempt in
    turn (``"ok"``, an exception to raise, or ``"block"``: wait until cancelled); the last
    outcome repeats. Counts attempts and the peak of attempts in flight."""

    kind = "fake"

    def __init__(self, script: dict[str, list[Any]]) -> None:
        self.script = script
        self.attempts: dict[str, int] = {}
        self.in_flight = self.peak = 0
        self.requests = self.retries = 0
        self.on_retry: Any = None
        self.blocked = anyio.Event()

    async def plan(self, query: Any, *, details: bool = True) -> Any:
        raise AssertionError("the engine never plans")

    async def fetch_series(self, task: SeriesTask, *, partial: Path, staging: Path, on_bytes: Any,
                           rate: Any, sinks: Any) -> UnpackedSeries:
        n = self.attempts[task.series_uid] = self.attempts.get(task.series_uid, 0) + 1
        outcomes = self.script.get(task.series_uid, ["ok"])
        outcome = outcomes[min(n, len(outcomes)) - 1]
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await anyio.sleep(0)   # let the other workers start: the peak is what the engine allows
            if outcome == "block":
                self.blocked.set()
                await anyio.sleep_forever()
            if isinstance(outcome, BaseException):
                raise outcome
            staging.mkdir(parents=True)
            data = f"instance of {task.series_uid}".encode()
            (staging / "1.dcm").write_bytes(data)
            on_bytes(len(data))
            return UnpackedSeries(files=[VerifiedFile("1.dcm", len(data), hashlib.md5(data).hexdigest(),
                                                      f"{task.series_uid}.1")], license_text=None, repairs=[])
        finally:
            self.in_flight -= 1



def fake_task(uid: str) -> SeriesTask:
    return SeriesTask(series_uid=uid, collection="C", patient_id="P", study_uid="S", modality="CT", image_count=1,
                      file_size=None, row={"SeriesInstanceUID": uid, "Collection": "C", "SeriesNumber": uid})


def run_engine(out: Path, source: FakeSource, uids: list[str], **config: Any) -> Any:
    cfg = Config(out_dir=out, progress=False, quiet=True, backoff_base=0.001, backoff_max=0.002,
                 **{"workers": 2, "series_retries": 2, **config})
    hub = Hub()
    events: list[Any] = []
    hub.subscribe(events.append)
    state = HarvestState(out)
    state.open()
    try:
        result = anyio.run(lambda: Engine(cfg, source, state, hub).run([fake_task(u) for u in uids], {}))
    finally:
        state.close()
    return result, events


def test_the_fake_is_a_source_without_optional_abilities() -> None:
    fake = FakeSource({})
    assert isinstance(fake, Source)
    assert not isinstance(fake, DownloadSlots)


def test_engine_runs_every_task_with_at_most_workers_in_flight(tmp_path: Path) -> None:
    source = FakeSource({})
    uids = [f"1.{i}" for i in range(7)]
    result, _ = run_engine(tmp_path / "out", source, uids, workers=3)
    assert result.ok and result.downloaded == 7
    assert source.attempts == {u: 1 for u in uids}
    assert source.peak == 3, "a source without download slots holds a worker's slot for the whole attempt"
    doc = manifest(tmp_path / "out")
    assert [r["SeriesInstanceUID"] for r in doc["series"]] == uids   # harvest.json in the plan's order
    assert all((tmp_path / "out" / r["files"][0]["path"]).read_bytes() == f"instance of {r['SeriesInstanceUID']}"
               .encode() for r in doc["series"])


def test_engine_retries_a_series_then_settles_it(tmp_path: Path) -> None:
    flaky = RetryableRequestError("HTTP 503 from http://x/getImage", status=503, url="http://x/getImage")
    source = FakeSource({"1.1": [flaky, flaky, "ok"],                       # two retries, then fine
                         "1.2": [flaky],                                    # never: failed after the retries
                         "1.3": [PermanentRequestError("HTTP 404 from http://x", status=404, url="http://x")]})
    result, events = run_engine(tmp_path / "out", source, ["1.1", "1.2", "1.3", "1.4"], series_retries=2)
    assert source.attempts == {"1.1": 3, "1.2": 3, "1.3": 1, "1.4": 1}, "a permanent error is not retried"
    assert not result.ok
    assert sorted(uid for uid, _ in result.failed) == ["1.2", "1.3"]
    recs = {r["SeriesInstanceUID"]: r for r in manifest(tmp_path / "out")["series"]}
    assert recs["1.1"]["status"] == "complete" and recs["1.1"]["attempts"] == 3
    assert recs["1.2"]["status"] == "failed" and recs["1.2"]["error_kind"] == "RetryableRequestError"
    assert "HTTP 503" in recs["1.2"]["error"]
    assert recs["1.3"]["error_kind"] == "PermanentRequestError"
    retried = [e.series_uid for e in events if e.kind == "series_retry"]
    assert sorted(retried) == ["1.1", "1.1", "1.2", "1.2"]


def test_a_fatal_error_stops_the_run_and_keeps_what_is_committed(tmp_path: Path) -> None:
    source = FakeSource({"1.3": [DiskFullError("no space left on the output disk")]})
    result, _ = run_engine(tmp_path / "out", source, ["1.1", "1.2", "1.3"], workers=1)
    assert result.fatal and "no space" in result.fatal
    recs = {r["SeriesInstanceUID"]: r for r in manifest(tmp_path / "out")["series"]}
    assert recs["1.1"]["status"] == "complete" and recs["1.2"]["status"] == "complete"
    assert source.attempts["1.3"] == 1, "a fatal error is never retried"


def test_cancel_mid_series_leaves_no_staging_and_keeps_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    source = FakeSource({"1.2": ["block"]})
    cfg = Config(out_dir=out, progress=False, quiet=True, workers=2)
    state = HarvestState(out)
    state.open()

    async def main() -> None:
        hub = Hub()
        other_done = anyio.Event()
        hub.subscribe(lambda e: other_done.set() if e.kind == "done" and e.series_uid == "1.1" else None)
        async with anyio.create_task_group() as tg:
            async def run() -> None:
                await Engine(cfg, source, state, hub).run([fake_task(u) for u in ("1.1", "1.2")], {})
            tg.start_soon(run)
            await source.blocked.wait()
            await other_done.wait()   # the other worker committed its series
            tg.cancel_scope.cancel()

    try:
        anyio.run(main)
        assert state.complete("1.1") is not None
        assert state.complete("1.2") is None
        assert not state.staging_dir("1.2").exists(), "a cancelled series leaves no staging behind"
    finally:
        state.close()
    # the next run finds what is committed and does only the rest
    source = FakeSource({})
    result, _ = run_engine(out, source, ["1.1", "1.2"])
    assert result.ok and source.attempts == {"1.2": 1}
