"""Shared machinery of the benchmarks: a served synthetic archive, a tool run in its own
process tree, and the checks applied to every tool's output in the same way.

* ``ServedArchive`` starts ``python -m harvester serve --synthetic SPEC --faults SPEC`` on
  loopback as a subprocess (a fresh one per tool, so every tool sees the same injected
  faults: decisions depend only on the seed and the per-URL request count) and reads its
  ``/_harvester/stats``; ``LinkMeter`` polls those stats to time the first and last byte. The
  server speaks the real wire format at its defaults (DEFLATED entries with data descriptors;
  ``wire_format`` reads it back from a real answer) and sends each file's deflate stream from
  its deflate cache (``DEFLATE_DIR``, filled by ``warm_cache``), so that compressing is not what
  every tool waits for.
* ``run_tool`` runs a command, samples the peak RSS of its whole process tree with psutil
  (nbiatoolkit forks workers) and returns wall time and output.
* ``check_output`` compares the files a tool left against the archive's instances by MD5:
  an instance is ``ok`` when a file with its exact bytes exists, ``corrupt`` when a file that
  claims its SOPInstanceUID has other bytes (or a file cannot be read as DICOM at all), and
  ``missing`` otherwise.

Nothing here asserts a timing; ``bench/run.py`` prints the figures and ratios.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import struct
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
PYTHON = sys.executable
#: The peer clients' interpreter: their own venv (``make peers``), since nbiatoolkit pins pydicom<3.
PEERS_PYTHON = os.environ.get("HARVESTER_PEERS_PYTHON") or str(REPO / ".venv-peers" / "bin" / "python")
CACHE_DIR = Path(os.environ.get("HARVESTER_BENCH_CACHE", REPO / ".cache" / "synthetic"))
OUT_DIR = Path(os.environ.get("HARVESTER_BENCH_OUT", BENCH / "out"))
#: Where ``harvester serve --cache-dir CACHE_DIR`` keeps its deflate streams (its default).
DEFLATE_DIR = CACHE_DIR / "deflate"
MIB = 1024 * 1024
GB = 1000 ** 3
#: Files a tool writes beside the DICOM files; not instances.
NOT_INSTANCES = {"LICENSE", "md5hashes.csv", "harvest.json", "metadata.csv"}
SKIP_DIRS = {".harvester", "licenses"}


def compile_trees(*trees: str | Path) -> None:
    """Byte-compile the ``harvester`` package of this checkout and of each of ``trees`` (a
    before tree), as ``pip install`` does for users: with PYTHONDONTWRITEBYTECODE set (as on
    some machines) every measured run would otherwise compile the package again (about 5% of
    a short run's CPU), which no installed harvester pays."""
    import compileall

    for tree in (Path(__file__).resolve().parent.parent, *map(Path, trees)):
        if (tree / "harvester").is_dir():
            compileall.compile_dir(str(tree / "harvester"), quiet=1)


def load_archive(spec: str) -> Any:
    """The synthetic archive of ``spec`` (generated into the cache on first use: minutes for GBs)."""
    sys.path.insert(0, str(REPO))
    from harvester.server.synthetic import SyntheticSpec, build_synthetic

    return build_synthetic(SyntheticSpec.parse(spec), CACHE_DIR)


def warm_cache(archive: Any) -> int:
    """Compute the deflate stream of every file the server will send (once: they persist in
    ``DEFLATE_DIR``), then read every file it will send or read, so that no tool pays for a cold
    page cache (the first tool of a scenario otherwise does: a run in which harvester went first
    measured the disk) nor for compression. Returns the number of streams computed now."""
    sys.path.insert(0, str(REPO))
    from harvester.server.deflatecache import DeflateCache

    cache = DeflateCache(DEFLATE_DIR, memory_bytes=0)
    entries = [(inst.path, inst.crc32) for rec in archive.records() if rec.prebuilt_zip is None
               for inst in rec.instances if inst.crc32 is not None]
    computed = cache.precompute(entries, threads=os.cpu_count() or 1)
    for rec in archive.records():
        paths = [inst.path for inst in rec.instances] + ([rec.prebuilt_zip] if rec.prebuilt_zip else [])
        paths += [cache.disk_path(inst.path, inst.crc32) for inst in rec.instances if inst.crc32 is not None]
        for path in paths:
            with open(path, "rb") as fh:
                while fh.read(MIB):
                    pass
    return computed


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, and SIGKILL if it has not ended within 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ServedArchive:
    """``harvester serve`` in a subprocess on 127.0.0.1; use as a context manager."""

    def __init__(self, spec: str, faults: str | None = None, log: Path | None = None) -> None:
        self.spec, self.faults, self.log = spec, faults, log
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = self.root_url = ""

    def __enter__(self) -> ServedArchive:
        cmd = [PYTHON, "-m", "harvester", "serve", "--synthetic", self.spec, "--cache-dir", str(CACHE_DIR)]
        if self.faults:
            cmd += ["--faults", self.faults]
        stderr = open(self.log, "w") if self.log else subprocess.DEVNULL  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
        if self.log:
            stderr.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http://127.0.0.1:"):
            self.proc.kill()
            raise RuntimeError(f"harvester serve did not print a loopback base URL (got {line!r})")
        self.base_url = line
        self.root_url = line.split("/nbia-api/")[0]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """User + system seconds the server has used so far."""
        times = psutil.Process(self.pid).cpu_times()
        return times.user + times.system

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.root_url + "/_harvester/stats", timeout=30) as resp:
            return json.loads(resp.read())

    def wire_format(self, series_uid: str) -> dict[str, int]:
        """Method and flags of the first local header of a real getImage answer (the real wire:
        method 8, DEFLATED; flags 0x0808, data descriptor and UTF-8 names). Counted by the
        server like any request: call it before a tool's ``before`` snapshot."""
        url = f"{self.base_url}/getImage?SeriesInstanceUID={urllib.parse.quote(series_uid)}"
        with urllib.request.urlopen(url, timeout=60) as resp:
            head = resp.read(30)
            while resp.read(MIB):
                pass
        signature, _, flags, method = struct.unpack_from("<IHHH", head)
        if signature != 0x04034B50:
            raise RuntimeError(f"getImage did not answer a ZIP (starts {head[:4]!r})")
        return {"method": method, "flags": flags}


class LinkMeter(threading.Thread):
    """Polls the server's byte counter to time the download phase (first byte to last byte)."""

    def __init__(self, server: ServedArchive, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.server, self.interval = server, interval
        self.first: float | None = None
        self.last: float | None = None
        self.bytes = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        try:
            sent = int(self.server.stats()["bytes_sent"])
        except OSError:
            return
        now = time.monotonic()
        if sent > 0 and self.first is None:
            self.first = now - self.interval / 2  # the first byte went out within the last interval
        if sent > self.bytes:
            self.last = now
        self.bytes = sent

    def stop(self) -> None:
        self._done.set()
        self.join()
        self._sample()

    @property
    def seconds(self) -> float | None:
        if self.first is None or self.last is None or self.last <= self.first:
            return None
        return self.last - self.first


class TreeRss(threading.Thread):
    """Peak resident set size of a process and all its descendants (summed per sample)."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            total = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.samples += 1
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


@dataclass
class ToolRun:
    returncode: int
    wall: float
    peak_rss: int
    cpu: float          # user + system seconds of the tool's process tree
    stdout: str
    stderr: str
    user: float = 0.0   # the two parts of ``cpu``
    system: float = 0.0


def _kill_tree(proc: subprocess.Popen[Any]) -> None:
    """Kill a tool that ran past its timeout, and its children."""
    try:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
    except psutil.Error:
        pass
    proc.kill()


def run_tool(cmd: list[str], cwd: Path, timeout: float = 3600) -> ToolRun:
    """Run ``cmd`` in its own process (tree) and measure it. Output goes to files in ``cwd``."""
    cwd.mkdir(parents=True, exist_ok=True)
    out_path, err_path = cwd / "tool.stdout", cwd / "tool.stderr"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)  # the tool and its reaped children
        started = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, env=env)
        sampler = TreeRss(proc.pid)
        sampler.start()
        # a blocking wait, the timeout on a timer: ``wait(timeout)`` polls with sleeps of up to
        # 50 ms, which rounded every wall time up to the next poll (scenario e's plan, 0.8 s,
        # came out as 0.82 or 0.87 s and nothing between)
        timer = threading.Timer(timeout, _kill_tree, (proc,))
        timer.start()
        try:
            code = proc.wait()
        finally:
            timer.cancel()
        wall = time.monotonic() - started
        sampler.stop()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return ToolRun(code, wall, sampler.peak, user + system, out_path.read_text(errors="replace"),
                   err_path.read_text(errors="replace"), user, system)


@dataclass
class OutputCheck:
    series: int = 0              # series asked for
    complete: int = 0            # series whose every instance is there byte for byte
    instances: int = 0
    ok: int = 0
    missing: int = 0
    corrupt: int = 0             # present under its SOPInstanceUID with other bytes, or unreadable
    bytes_ok: int = 0

    @property
    def incomplete(self) -> int:
        return self.series - self.complete


def check_output(root: Path, archive: Any, uids: list[str]) -> OutputCheck:
    """Compare every file under ``root`` with the archive's instances of ``uids`` (see module doc)."""
    wanted = [archive.get(uid) for uid in uids]
    by_md5: dict[str, Any] = {}
    by_sop: dict[str, Any] = {}
    for rec in wanted:
        for inst in rec.instances:
            by_md5[inst.md5] = inst
            by_sop[inst.sop_uid] = inst
    good: set[str] = set()
    bad: set[str] = set()
    unreadable = 0
    for path in _files(root):
        digest = _md5(path)
        inst = by_md5.get(digest)
        if inst is not None:
            good.add(inst.sop_uid)
            continue
        sop = _sop_uid(path)
        if sop is None:
            unreadable += 1
        elif sop in by_sop:
            bad.add(sop)
    result = OutputCheck(series=len(wanted))
    for rec in wanted:
        all_ok = True
        for inst in rec.instances:
            result.instances += 1
            if inst.sop_uid in good:
                result.ok += 1
                result.bytes_ok += inst.size
            else:
                all_ok = False
                if inst.sop_uid in bad:
                    result.corrupt += 1
                else:
                    result.missing += 1
        result.complete += all_ok
    # An unreadable file belongs to some instance that is not ok: count it as corrupt, not missing.
    moved = min(unreadable, result.missing)
    result.corrupt += moved
    result.missing -= moved
    return result


def _files(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            if name not in NOT_INSTANCES and not name.startswith("tool."):
                found.append(Path(dirpath) / name)
    return found


def _md5(path: Path) -> str:
    md5 = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(MIB):
            md5.update(chunk)
    return md5.hexdigest()


def _sop_uid(path: Path) -> str | None:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        return str(ds.SOPInstanceUID)
    except Exception:  # noqa: BLE001 - any failure means "not a readable DICOM file"
        return None


def request_count(before: dict[str, Any], after: dict[str, Any], endpoints: tuple[str, ...] | None = None) -> int:
    """Requests counted by the server between two stats snapshots (optionally only ``endpoints``)."""
    total = 0
    for name, count in after["requests"].items():
        if endpoints is None or name in endpoints:
            total += count - before["requests"].get(name, 0)
    return total


@dataclass
class Measurement:
    """One tool in one scenario: what the tables print."""

    tool: str
    setting: str
    wall: float
    peak_rss: int
    cpu: float
    server_cpu: float
    load: float            # 1-minute load average when the tool started (the machine is shared)
    bytes_sent: int
    link_seconds: float | None
    requests: int
    downloads: int
    retries: int | None
    check: OutputCheck | None
    returncode: int
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    runs: list[float] = field(default_factory=list)   # wall times of every repeat (this is the median one)

    @property
    def mib_s(self) -> float:
        return self.bytes_sent / MIB / self.wall if self.wall else 0.0

    @property
    def cpu_per_gb(self) -> float | None:
        """Client CPU-s per GB (10^9 bytes) the server sent it."""
        return self.cpu / (self.bytes_sent / GB) if self.bytes_sent else None

    @property
    def link_mib_s(self) -> float | None:
        return self.bytes_sent / MIB / self.link_seconds if self.link_seconds else None

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["mib_s"], doc["link_mib_s"], doc["cpu_per_gb"] = self.mib_s, self.link_mib_s, self.cpu_per_gb
        return doc


def set_aside(path: Path) -> None:
    """Move a tool's output tree (GBs, tens of thousands of files) out of the way, to be deleted
    by ``empty_trash`` once every measurement is done.

    Why not delete it now: on this machine's ext4 (no journal), creating a file right after many
    were deleted scans the recently deleted inodes (``recently_deleted`` in ext4_create; perf
    showed it as 40% of a run's samples), so a deletion between two tools would tax the second
    one's file creation for a few minutes. Renaming frees no inode. On tmpfs
    (``HARVESTER_BENCH_OUT=/dev/shm/...``: the client's CPU without the disk's write-back in its
    system time) the tree is deleted at once: tmpfs has no such scan, and memory would otherwise
    hold every run's output until the end.
    """
    if path.exists() and _fs_type(OUT_DIR) == "tmpfs":
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        trash = OUT_DIR / ".trash"
        trash.mkdir(parents=True, exist_ok=True)
        path.rename(trash / f"{path.name}-{time.time_ns()}")


def _fs_type(path: Path) -> str:
    """The type of the file system ``path`` is on (its longest mount point, ``psutil``)."""
    resolved = path.resolve()
    mounts = [p for p in psutil.disk_partitions(all=True) if resolved.is_relative_to(p.mountpoint)]
    return max(mounts, key=lambda p: len(p.mountpoint)).fstype if mounts else ""


def empty_trash() -> None:
    shutil.rmtree(OUT_DIR / ".trash", ignore_errors=True)
