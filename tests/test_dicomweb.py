"""The DICOMweb source against a real Orthanc with its DICOMweb plugin, on loopback.

Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``) is started by the session
fixture with its own configuration, storage and port, and loaded through its REST API with
the small synthetic archive (a copy of each file carrying its collection in
ClinicalTrialProtocolID) and pydicom's real sample files (unchanged). The tests skip with a
reason when the binaries are missing; the multipart parser tests run everywhere.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import glob
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pydicom
import pytest

from harvester.store.sink import StoreSinks
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from harvest_helpers import commits, kill_after_progress, manifest
from harvester.api import aharvest, aplan
from harvester.config import AuthConfig, Config
from harvester.errors import (
    AuthError,
    IncompleteSeriesError,
    IntegrityError,
    PermanentRequestError,
    UnknownSelectionError,
    UsageError,
)
from harvester.query import query_from_dict
from harvester.source.dicomweb import DICOMwebSource, MultipartError, MultipartParser, multipart_boundary
from harvester.source.nbia import make_session

USER = "harvester"
PLUGIN_CANDIDATES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so*",
                     "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so")
SAMPLES = "PYDICOM-SAMPLES"


# ---------------------------------------------------------------- Orthanc on loopback

def find_orthanc() -> tuple[str, str] | None:
    """(Orthanc binary, DICOMweb plugin) or None when either is missing."""
    binary = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if os.access(p, os.X_OK)), None)
    plugin = next((hit for pattern in PLUGIN_CANDIDATES for hit in sorted(glob.glob(pattern))), None)
    return (binary, plugin) if binary and plugin else None


def _die_with_parent() -> None:
    """In the child before exec: Linux sends it SIGTERM when the test process dies, so an Orthanc
    never outlives a killed pytest (the fixture's cleanup does not run then)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OrthancProcess:
    """One Orthanc with the DICOMweb plugin: loopback only, HTTP basic auth, its own storage.

    ``start()`` waits (with a deadline) until ``/system`` answers; ``stop()`` ends it and
    ``start()`` again brings it back on the same port with the same storage.
    """

    binary: str
    plugin: str
    workdir: Path
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def root(self) -> str:
        return f"{self.base}/dicom-web"

    @property
    def log(self) -> Path:
        return self.workdir / "orthanc.log"

    def write_config(self) -> Path:
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "harvester-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": self.port, "DicomServerEnabled": False, "DicomPort": free_port(),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: self.password}, "Plugins": [self.plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "SaveJobs": False,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        return path

    def start(self, timeout: float = 30.0) -> None:
        config = self.write_config()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([self.binary, str(config)], cwd=self.workdir, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # readiness polling, the one permitted wait
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                self.get("/system", timeout=1)
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self, timeout: float = 20.0, *, kill: bool = False) -> None:
        """SIGTERM (Orthanc finishes the requests in flight), or SIGKILL with ``kill`` (a crash)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _request(self, path: str, data: bytes | None = None, timeout: float = 30) -> bytes:
        token = base64.b64encode(f"{USER}:{self.password}".encode()).decode()
        req = urllib.request.Request(self.base + path, data=data, method="POST" if data is not None else "GET",
                                     headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return bytes(resp.read())

    def get(self, path: str, timeout: float = 30) -> bytes:
        return self._request(path, timeout=timeout)

    def upload(self, data: bytes) -> str:
        """POST one DICOM file; returns Orthanc's instance id."""
        answer = json.loads(self._request("/instances", data))
        assert answer.get("Status") in ("Success", "AlreadyStored"), answer
        return str(answer["ID"])


def with_collection(path: Path, collection: str) -> bytes:
    """The file's bytes with ClinicalTrialProtocolID set to ``collection``."""
    import io

    ds = pydicom.dcmread(str(path))
    ds.ClinicalTrialProtocolID = collection
    buf = io.BytesIO()
    if int(pydicom.__version__.split(".")[0]) >= 3:  # write_like_original is deprecated in pydicom 3
        ds.save_as(buf, enforce_file_format=False)
    else:
        ds.save_as(buf, write_like_original=True)
    return buf.getvalue()


@dataclass
class Loaded:
    """What the fixture put into Orthanc: per series, SOPInstanceUID -> (Orthanc id, bytes sent)."""

    orthanc: OrthancProcess
    series: dict[str, dict[str, tuple[str, bytes]]]
    rows: dict[str, dict[str, Any]]          # SeriesInstanceUID -> the archive's getSeries row

    def uids(self, **match: str) -> list[str]:
        return sorted(u for u, r in self.rows.items() if all(r.get(k) == v for k, v in match.items()))

    @property
    def collections(self) -> list[str]:
        return sorted({r["Collection"] for r in self.rows.values() if r["Collection"] != SAMPLES})


@pytest.fixture(scope="session")
def orthanc(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    found = find_orthanc()
    if found is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed "
                    "(Debian: apt-get install orthanc orthanc-dicomweb); DICOMweb tests skipped")
    small_archive = request.getfixturevalue("small_archive")  # built only when it will be used
    server = OrthancProcess(*found, workdir=tmp_path_factory.mktemp("orthanc"))
    server.start()
    try:
        series: dict[str, dict[str, tuple[str, bytes]]] = {}
        rows: dict[str, dict[str, Any]] = {}
        for record in small_archive.records():
            if record.hostile_kind is not None:
                continue
            collection = record.row["Collection"]
            rows[record.uid] = dict(record.row)
            for inst in record.instances:
                # pydicom's samples go in unchanged (real files, odd preambles, compressed pixels);
                # synthetic copies carry their collection in the collection attribute.
                data = inst.path.read_bytes() if collection == SAMPLES else with_collection(inst.path, collection)
                series.setdefault(record.uid, {})[inst.sop_uid] = (server.upload(data), data)
        yield Loaded(server, series, rows)
    finally:
        server.stop()


FAST = dict(workers=4, connections=8, retries=6, series_retries=3, backoff_base=0.01, backoff_max=0.1,
            read_timeout=5.0, connect_timeout=5.0, progress=False, quiet=True)


def dw_config(loaded: Loaded, out: Path, **overrides: Any) -> Config:
    auth = AuthConfig(token_url="unused", username=USER, password=loaded.orthanc.password)
    return Config(source="dicomweb", api_url=loaded.orthanc.root, out_dir=out, auth=auth, **{**FAST, **overrides})


def dw_harvest(loaded: Loaded, out: Path, query: dict[str, Any], **overrides: Any) -> Any:
    return anyio.run(aharvest, query_from_dict(query, origin="test"), dw_config(loaded, out, **overrides))


def everything(loaded: Loaded) -> dict[str, Any]:
    return {"select": [{"collection": c} for c in loaded.collections]
            + [{"series": loaded.uids(Collection=SAMPLES)}]}


def assert_identical_to_orthanc(out: Path, loaded: Loaded, uids: list[str]) -> None:
    """Exactly ``uids`` are complete; every file is the bytes Orthanc stores (``/instances/{id}/file``)
    and the bytes that were uploaded; nothing unlisted is in the tree and no temp file is left."""
    doc = manifest(out)
    recs = {r["SeriesInstanceUID"]: r for r in doc["series"]}
    assert sorted(u for u, r in recs.items() if r["status"] == "complete") == sorted(uids)
    listed: set[Path] = set()
    for uid in uids:
        files = {f["SOPInstanceUID"]: f for f in recs[uid]["files"]}
        assert sorted(files) == sorted(loaded.series[uid]), uid
        for sop, (orthanc_id, sent) in loaded.series[uid].items():
            path = out / files[sop]["path"]
            data = path.read_bytes()
            assert data == loaded.orthanc.get(f"/instances/{orthanc_id}/file"), files[sop]["path"]
            assert data == sent
            listed.add(path.resolve())
    for path in out.rglob("*"):
        rel = path.relative_to(out)
        if path.is_file() and rel.parts[0] != ".harvester" and str(rel) not in ("harvest.json", "metadata.csv"):
            assert path.resolve() in listed, f"unlisted file in the tree: {rel}"
    tmp = out / ".harvester" / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir()), list(tmp.iterdir())


# ---------------------------------------------------------------- harvests

def test_harvest_is_byte_identical_to_orthanc(orthanc, tmp_path):
    out = tmp_path / "out"
    uids = sorted(orthanc.series)
    result = dw_harvest(orthanc, out, everything(orthanc))
    assert result.ok, result.failed
    assert result.downloaded == len(uids)
    assert_identical_to_orthanc(out, orthanc, uids)
    recs = {r["SeriesInstanceUID"]: r for r in manifest(out)["series"]}
    # the descriptive layout is filled from QIDO-RS: collection, patient, study date/ID/description
    some = orthanc.uids(Collection=orthanc.collections[0])[0]
    row = orthanc.rows[some]
    parts = recs[some]["path"].split("/")
    assert parts[:2] == [row["Collection"], row["PatientID"]]
    month_day_year = "-".join(reversed(row["StudyDate"].split("-", 1)))  # 2003-05-17 -> 05-17-2003
    # the Data Retriever's rules: descriptions reduced to [A-Za-z0-9 .-], SeriesNumber as a decimal
    assert parts[2].startswith(f"{month_day_year}-1000-")
    assert "".join(c for c in row["StudyDesc"] if c.isascii() and (c.isalnum() or c in " .-")) in parts[2]
    assert parts[3].startswith(f"{int(row['SeriesNumber'])}.000000-")
    assert recs[some]["metadata"]["ImageCount"] == len(orthanc.series[some])
    assert recs[some]["metadata"]["Manufacturer"] == row["Manufacturer"]
    # series without the collection attribute (pydicom's samples) land under a named folder
    sample = orthanc.uids(Collection=SAMPLES)[0]
    assert recs[sample]["Collection"] == "NO-COLLECTION"


def test_selectors_patients_modality_series(orthanc, tmp_path):
    collection = orthanc.collections[0]
    patient = orthanc.rows[orthanc.uids(Collection=collection)[0]]["PatientID"]
    other = orthanc.collections[1]
    series = orthanc.uids(Collection=SAMPLES)[:2]
    query = {"select": [{"collection": collection, "patients": [patient]},
                        {"collection": other, "modality": "MR"},
                        {"series": series}],
             "exclude": {"series": [orthanc.uids(Collection=SAMPLES)[0]]}}
    expected = sorted(set(orthanc.uids(Collection=collection, PatientID=patient))
                      | set(orthanc.uids(Collection=other, Modality="MR")) | set(series[1:]))
    # the selection is neither everything nor empty, or the test would prove little
    assert 0 < len(expected) < len(orthanc.series)
    assert orthanc.uids(Collection=other, Modality="CT")
    plan = anyio.run(aplan, query_from_dict(query, origin="test"), dw_config(orthanc, tmp_path / "plan"))
    assert sorted(t.series_uid for t in plan.tasks) == expected
    assert all(t.file_size is None and t.image_count == len(orthanc.series[t.series_uid]) for t in plan.tasks)
    out = tmp_path / "out"
    result = dw_harvest(orthanc, out, query)
    assert result.ok, result.failed
    assert_identical_to_orthanc(out, orthanc, expected)


def test_a_list_of_series_uids_is_looked_up_in_batches(orthanc, tmp_path, monkeypatch):
    """UID list matching: one QIDO query per 32 UIDs instead of one per UID, and the same plan. A
    service that refuses lists (4xx) or answers them with nothing gets single lookups instead."""
    uids = sorted(orthanc.series)
    assert len(uids) > 3
    query = query_from_dict({"select": [{"series": uids}]}, origin="t")
    config = dw_config(orthanc, tmp_path / "p")
    batched = anyio.run(aplan, query, config)
    assert sorted(t.series_uid for t in batched.tasks) == uids

    real_search = DICOMwebSource._search_series

    async def refuse_lists(self, path, params, collection):
        if any("," in value for _, value in params):
            self.client.requests += 1  # the refused query was still sent
            raise PermanentRequestError("HTTP 400 from the service: no UID list matching", status=400)
        return await real_search(self, path, params, collection)

    monkeypatch.setattr(DICOMwebSource, "_search_series", refuse_lists)
    single = anyio.run(aplan, query, config)
    assert single.tasks == batched.tasks
    # fewer than 32 series: one list query, against the refused one plus one query per UID
    assert single.requests - batched.requests == len(uids), (single.requests, batched.requests)
    monkeypatch.undo()
    # a UID no query answers is unavailable, the rest planned; strict refuses (the old behaviour)
    ghost = "1.2.3.4.5.6.7.8.9.10"
    with_ghost = query_from_dict({"select": [{"series": [*uids, ghost]}]}, origin="t")
    partial = anyio.run(aplan, with_ghost, config)
    assert partial.tasks == batched.tasks
    assert [u.series_uid for u in partial.unavailable] == [ghost] and "no row" in partial.unavailable[0].reason
    with pytest.raises(UnknownSelectionError, match=ghost):
        anyio.run(aplan, with_ghost, dataclasses.replace(config, strict=True))


def test_patients_alone_studies_alone_and_case_insensitive_filters(orthanc, tmp_path):
    """A PACS has no collections: patients alone (QIDO-RS PatientID=) and studies alone
    (StudyInstanceUID) plan exactly their series, across collections; filters compare
    case-insensitively, as NBIA's do."""
    config = dw_config(orthanc, tmp_path / "p")

    def planned(*selectors: dict[str, Any]) -> list[str]:
        query = query_from_dict({"select": list(selectors)}, origin="t")
        return sorted(t.series_uid for t in anyio.run(aplan, query, config).tasks)

    first, second = (orthanc.rows[orthanc.uids(Collection=c)[0]] for c in orthanc.collections[:2])
    patients = [first["PatientID"], second["PatientID"]]
    want = sorted(set(orthanc.uids(PatientID=patients[0])) | set(orthanc.uids(PatientID=patients[1])))
    assert want and len(want) < len(orthanc.series)
    assert planned({"patients": patients}) == want
    study = first["StudyInstanceUID"]
    assert planned({"studies": [study]}) == orthanc.uids(StudyInstanceUID=study) != []
    other = orthanc.collections[1]
    mr = orthanc.uids(Collection=other, Modality="MR")
    assert mr and planned({"collection": other, "modality": "mr"}) == mr == planned({"collection": other,
                                                                                      "modality": "MR"})
    manufacturer = orthanc.rows[mr[0]]["Manufacturer"]
    assert planned({"collection": other, "manufacturer": manufacturer.swapcase()}) == \
        orthanc.uids(Collection=other, Manufacturer=manufacturer)


def test_rerun_downloads_nothing(orthanc, tmp_path):
    out = tmp_path / "out"
    uids = sorted(orthanc.series)
    assert dw_harvest(orthanc, out, everything(orthanc)).ok
    again = dw_harvest(orthanc, out, everything(orthanc))
    assert again.ok and again.downloaded == 0 and again.skipped == len(uids)
    assert again.bytes_received == 0
    assert_identical_to_orthanc(out, orthanc, uids)


def test_unknown_selections_and_released_after_are_usage_errors(orthanc, tmp_path):
    config = dw_config(orthanc, tmp_path)
    with pytest.raises(UnknownSelectionError, match="1.2.3.4.5"):
        anyio.run(aplan, query_from_dict({"select": [{"series": ["1.2.3.4.5"]}]}, origin="t"),
                  dataclasses.replace(config, strict=True))
    with pytest.raises(UnknownSelectionError, match="ClinicalTrialProtocolID"):
        anyio.run(aplan, query_from_dict({"select": [{"collection": "NO-SUCH"}]}, origin="t"), config)
    # a known collection whose filter matches nothing is an empty plan and a warning, not an error
    empty = {"select": [{"collection": orthanc.collections[0], "modality": "PT"}]}
    nothing = anyio.run(aplan, query_from_dict(empty, origin="t"), config)
    assert nothing.tasks == []
    assert nothing.warnings == [f"selector 1 (collection: {orthanc.collections[0]}, modality: PT) matches no series"]
    with pytest.raises(UsageError, match="released_after"):
        anyio.run(aplan, query_from_dict({"select": [{"collection": orthanc.collections[0],
                                                      "released_after": "2020-01-01"}]}, origin="t"), config)


def test_wrong_password_is_fatal_and_never_shown(orthanc, tmp_path):
    wrong = "not-the-password-" + secrets.token_hex(4)
    config = Config(source="dicomweb", api_url=orthanc.orthanc.root, out_dir=tmp_path,
                    auth=AuthConfig(token_url="unused", username=USER, password=wrong), **FAST)
    with pytest.raises(AuthError) as info:
        anyio.run(aplan, query_from_dict(everything(orthanc), origin="t"), config)
    assert "401" in str(info.value)
    assert wrong not in info.value.one_line() and orthanc.orthanc.password not in info.value.one_line()


def test_count_mismatch_and_unknown_series_fail_the_series(orthanc, tmp_path):
    """The instance count from QIDO-RS is enforced both ways; a 404 is permanent."""
    async def fetch(image_count: int, series_uid: str | None = None) -> Any:
        config = dw_config(orthanc, tmp_path)
        query = query_from_dict({"select": [{"series": [uid]}]}, origin="t")
        async with make_session(config) as session:
            source = DICOMwebSource(config, session)
            (task,) = (await source.plan(query)).tasks
            from dataclasses import replace
            task = replace(task, image_count=image_count, series_uid=series_uid or task.series_uid)
            staging = tmp_path / f"staging-{image_count}-{bool(series_uid)}"
            return await source.fetch_series(task, partial=tmp_path / "p", staging=staging,
                                             on_bytes=lambda n: None, rate=None, sinks=StoreSinks(config.limits))

    uid = next(u for u in sorted(orthanc.series) if len(orthanc.series[u]) >= 3)
    count = len(orthanc.series[uid])
    assert len(anyio.run(fetch, count).files) == count
    with pytest.raises(IncompleteSeriesError, match=f"{count} of {count + 1}"):
        anyio.run(fetch, count + 1)
    with pytest.raises(IntegrityError, match="more than"):
        anyio.run(fetch, count - 1)
    with pytest.raises(PermanentRequestError, match="404"):
        anyio.run(fetch, count, "1.2.3.999")


# ---------------------------------------------------------------- interruptions

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}


@pytest.mark.slow
def test_kill_9_then_rerun_completes(orthanc, tmp_path):
    """kill -9 of the CLI mid-harvest, several times; the rerun completes; no series is committed twice."""
    query = tmp_path / "q.yaml"
    query.write_text(yaml.safe_dump(everything(orthanc)))
    out = tmp_path / "out"
    env = {**ENV, "ORTHANC_PASSWORD": orthanc.orthanc.password}
    args = [sys.executable, "-m", "harvester", "run", str(query), "-o", str(out), "--source", "dicomweb",
            "--url", orthanc.orthanc.root, "--user", USER, "--password-env", "ORTHANC_PASSWORD",
            "--workers", "2", "--timeout", "5", "--retries", "6", "--no-progress", "--quiet"]
    total = sum(len(d) for s in orthanc.series.values() for _, d in s.values())
    rng = random.Random(7)
    kills = 0
    for _ in range(3):
        # about five seconds for the whole harvest, so that each run is killed mid-harvest
        proc = subprocess.Popen([*args, "--max-rate", str(total // 5)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        kills += kill_after_progress(proc, out, rng.uniform(0, 0.4), wait=30)
    assert kills == 3
    partial = set(commits(out))
    assert 0 < len(partial) < len(orthanc.series), "the kills should land mid-harvest"
    final = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stdout + final.stderr
    committed = commits(out)
    assert sorted(committed) == sorted(set(committed)), "a series was committed twice"
    assert_identical_to_orthanc(out, orthanc, sorted(orthanc.series))


def _reset_the_next_connection(port: int, timeout: float) -> None:
    """Listen on ``port`` (Orthanc's, while it is down) and reset the first connection made to
    it: the harvester's next request meets the crash whatever the timing. Without it the kill
    could land while every answer in flight was already in the client's socket buffer and
    Orthanc be back before the next request (aiohttp retries a dead keep-alive connection
    itself): no retry at all, as one CI run saw."""
    import struct

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(8)
        listener.settimeout(timeout)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            pytest.fail(f"the harvester made no connection in the {timeout:.0f} s Orthanc was down")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
        conn.close()


@pytest.mark.slow
def test_orthanc_restart_mid_harvest_still_completes(orthanc, tmp_path):
    """Orthanc crashes (SIGKILL) while a harvest runs, cutting downloads and refusing connections
    (the next connection made while it is down is reset), and comes back on the same port and
    storage; request and series retries carry the harvest to the end."""
    out = tmp_path / "out"
    total = sum(len(d) for s in orthanc.series.values() for _, d in s.values())
    config = dw_config(orthanc, out, workers=2, read_timeout=1.0, retries=60, series_retries=10,
                       backoff_base=0.05, backoff_max=0.3, max_rate=total // 6)
    query = query_from_dict(everything(orthanc), origin="test")
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = anyio.run(aharvest, query, config)
        except BaseException as exc:  # reported by the assertions below
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 20
    while not commits(out) and time.monotonic() < deadline and worker.is_alive():
        time.sleep(0.02)
    assert worker.is_alive() and 0 < len(commits(out)) < len(orthanc.series), "restart must land mid-harvest"
    orthanc.orthanc.stop(kill=True)
    committed_while_down = len(commits(out))
    _reset_the_next_connection(orthanc.orthanc.port, timeout=30)
    orthanc.orthanc.start()
    worker.join(120)
    assert not worker.is_alive()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.ok, result.failed
    assert result.retries > 0, "the restart should have forced retries"
    assert committed_while_down < len(orthanc.series)
    assert_identical_to_orthanc(out, orthanc, sorted(orthanc.series))


# ---------------------------------------------------------------- the multipart parser

def _encode(parts: list[tuple[dict[str, str], bytes]], boundary: str, preamble: bytes = b"") -> bytes:
    body = preamble
    for i, (headers, data) in enumerate(parts):
        body += (b"\r\n" if i or preamble else b"") + f"--{boundary}\r\n".encode()
        body += b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n" + data
    return body + f"\r\n--{boundary}--\r\nepilogue".encode()


def _parse(body: bytes, boundary: str, cuts: list[int]) -> list[tuple[dict[str, str], bytes]]:
    parser = MultipartParser(boundary)
    parts: list[tuple[dict[str, str], bytes]] = []
    edges = sorted({0, len(body), *[c % (len(body) + 1) for c in cuts]})
    for a, b in zip(edges, edges[1:]):
        for kind, payload in parser.feed(body[a:b]):
            if kind == "headers":
                parts.append((payload, b""))
            elif kind == "data":
                assert payload, "empty data events are noise"
                parts[-1] = (parts[-1][0], parts[-1][1] + payload)
    parser.close()
    return parts


BOUNDARY = "b0undary-7f3a"
# bodies full of near-misses: CRLFs, dashes and prefixes of the delimiter
_tricky = st.lists(st.sampled_from([b"\r\n", b"--", b"\r\n--", b"\r\n--b0und", b"b0undary-7f3", b"\x00", b"DICM",
                                    b"x" * 50]), max_size=12).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.tuples(st.dictionaries(st.sampled_from(["Content-Type", "Content-Length", "X-A"]),
                                                st.text("abc/; =", max_size=20).map(str.strip), max_size=3),
                                _tricky), min_size=1, max_size=5),
       cuts=st.lists(st.integers(0, 10_000), max_size=12), preamble=st.sampled_from([b"", b"preamble text"]))
def test_multipart_parser_any_chunking(parts, cuts, preamble):
    body = _encode(parts, BOUNDARY, preamble)
    lowered = [({k.lower(): v for k, v in h.items()}, d) for h, d in parts]
    assert _parse(body, BOUNDARY, cuts) == lowered


@settings(max_examples=100, deadline=None)
@given(data=_tricky, cut=st.integers(1, 10_000))
def test_multipart_parser_truncated_body_raises(data, cut):
    body = _encode([({"Content-Type": "application/dicom"}, data)], BOUNDARY)
    end = body.index(f"--{BOUNDARY}--".encode()) + len(BOUNDARY) + 3
    with pytest.raises(MultipartError):
        _parse(body[: cut % end], BOUNDARY, [])


def test_multipart_parser_memory_is_bounded():
    parser = MultipartParser(BOUNDARY)
    parser.feed(f"--{BOUNDARY}\r\n\r\n".encode())
    received = 0
    for _ in range(64):
        for kind, payload in parser.feed(b"\xff" * 65536):
            received += len(payload) if kind == "data" else 0
        assert len(parser._buf) < len(BOUNDARY) + 4  # only a possible delimiter prefix is held
    assert received > 64 * 65536 - 100


def test_multipart_boundary_parsing():
    assert multipart_boundary('multipart/related; type="application/dicom"; boundary="a b:c"') == \
        ("multipart/related", "a b:c")
    assert multipart_boundary("multipart/related; boundary=xyz") == ("multipart/related", "xyz")
    assert multipart_boundary("text/html; charset=utf-8") == ("text/html", None)


@pytest.mark.parametrize("named", [False, True], ids=["recorded-source", "source-named"])
def test_verify_repair_of_a_dicomweb_harvest_refetches_the_series(orthanc, tmp_path, named):
    """harvest.json records the source; ``verify --repair`` (without --source the file says
    dicomweb; with it, an AttributeError before) builds a DICOMweb source, which cannot fetch
    one instance alone, so the damaged series is refetched whole: no traceback, and the tree
    is Orthanc's bytes again."""
    uid = orthanc.uids(Collection=orthanc.collections[0])[0]
    out = tmp_path / "out"
    assert dw_harvest(orthanc, out, {"select": [{"series": [uid]}]}).ok
    doc = manifest(out)
    assert doc["source"] == {"kind": "dicomweb", "url": orthanc.orthanc.root}
    damaged = out / doc["series"][0]["files"][0]["path"]
    damaged.write_bytes(b"not the instance Orthanc stores")
    env = {**ENV, "ORTHANC_PASSWORD": orthanc.orthanc.password}
    named_args = ["--source", "dicomweb", "--url", orthanc.orthanc.root] if named else []
    proc = subprocess.run([sys.executable, "-m", "harvester", "verify", str(out), "--repair", "--user", USER,
                           "--password-env", "ORTHANC_PASSWORD", "--timeout", "5", *named_args],
                          env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"refetched series: {uid}" in proc.stdout
    assert orthanc.orthanc.password not in proc.stdout + proc.stderr
    assert_identical_to_orthanc(out, orthanc, [uid])
