"""Throughput and peak RSS of ``harvester run --source dicomweb`` on one large series from Orthanc.

Builds (once, cached) a synthetic series of 100 x 4 MB instances, starts Orthanc with its
DICOMweb plugin on a loopback port (the launcher of ``tests/test_dicomweb.py``), uploads the
series, then ``--repeat`` times (default 3):

1. peer A: one streaming WADO-RS download with urllib, bytes discarded (what this Orthanc
   gives a single connection: the ceiling);
2. peer B: ``curl -o file`` of the same body (a download to disk, like ours but unverified);
3. ``python -m harvester run series.txt --source dicomweb --url ...`` as a subprocess, its RSS
   sampled every 5 ms with psutil; the harvest is checked (MD5 of every file against the source).

Prints MiB/s per run and the medians, harvester / curl as a ratio, and the peak RSS.

    .venv/bin/python bench/dicomweb_large.py [--spec collections=1,...,instances=100,size=4MiB]

Needs Debian's orthanc and orthanc-dicomweb. Timings are informative; the figure that must not
grow with the series size is the peak RSS (the multipart body is parsed as a stream).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from harvester.server.synthetic import SyntheticSpec, build_synthetic  # noqa: E402
from server_rss import RssSampler  # noqa: E402  (bench/ is on sys.path as the script's folder)
from test_dicomweb import USER, OrthancProcess, find_orthanc  # noqa: E402

SPEC = "collections=1,patients=1,studies=1,series=1,instances=100,size=4MiB,seed=0"
MB = 1024 * 1024
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def peer_download(orthanc: OrthancProcess, study: str, series: str) -> tuple[int, float, str]:
    """Stream the WADO-RS body with urllib (bytes discarded): (bytes, seconds, Content-Encoding)."""
    token = base64.b64encode(f"{USER}:{orthanc.password}".encode()).decode()
    req = urllib.request.Request(f"{orthanc.root}/studies/{study}/series/{series}",
                                 headers={"Accept": WADO_ACCEPT, "Authorization": f"Basic {token}"})
    start = time.monotonic()
    received = 0
    with urllib.request.urlopen(req, timeout=300) as resp:
        encoding = resp.headers.get("Content-Encoding", "identity")
        while chunk := resp.read(MB):
            received += len(chunk)
    return received, time.monotonic() - start, encoding


def curl_to_file(orthanc: OrthancProcess, study: str, series: str, target: Path) -> float | None:
    """Seconds for curl to save the WADO-RS body to ``target`` (None without curl)."""
    curl = shutil.which("curl")
    if curl is None:
        return None
    start = time.monotonic()
    subprocess.run([curl, "-sSf", "-o", str(target), "-K", "-", "-H", f"Accept: {WADO_ACCEPT}",
                    f"{orthanc.root}/studies/{study}/series/{series}"],
                   input=f'user = "{USER}:{orthanc.password}"\n', text=True, check=True)
    seconds = time.monotonic() - start
    target.unlink()
    return seconds


def harvest_once(orthanc: OrthancProcess, uids: Path, out: Path) -> tuple[float, int, str]:
    """(seconds, peak RSS, summary line) of one ``harvester run`` subprocess."""
    cmd = [sys.executable, "-m", "harvester", "run", str(uids), "-o", str(out), "--source", "dicomweb",
           "--url", orthanc.root, "--user", USER, "--password-env", "ORTHANC_PASSWORD", "--no-progress", "--quiet"]
    env = {**os.environ, "ORTHANC_PASSWORD": orthanc.password}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = RssSampler(proc.pid)
    sampler.start()
    output, _ = proc.communicate(timeout=600)
    elapsed = time.monotonic() - start
    sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"harvester run failed ({proc.returncode}):\n{output}")
    lines = output.strip().splitlines()
    return elapsed, sampler.peak, lines[-2] if len(lines) >= 2 else output.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "synthetic")
    parser.add_argument("--spec", default=SPEC)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each peer and of the harvester")
    parser.add_argument("--workdir", type=Path, default=None, help="where Orthanc's storage and the harvest go")
    args = parser.parse_args()

    found = find_orthanc()
    if found is None:
        print("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
        return 2
    archive = build_synthetic(SyntheticSpec.parse(args.spec), args.cache_dir)
    (record,) = [r for r in archive.records() if r.hostile_kind is None]
    study, series = record.row["StudyInstanceUID"], record.uid
    size = sum(i.path.stat().st_size for i in record.instances)
    mib = size / MB
    print(f"series: {len(record.instances)} instances, {mib:.0f} MiB")

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        (work / "orthanc").mkdir()
        orthanc = OrthancProcess(*found, workdir=work / "orthanc")
        orthanc.start()
        try:
            start = time.monotonic()
            for inst in record.instances:
                orthanc.upload(inst.path.read_bytes())
            print(f"uploaded to Orthanc in {time.monotonic() - start:.1f}s")
            uids = work / "series.txt"
            uids.write_text(series + "\n")
            discard, curl, runs, peaks = [], [], [], []
            for n in range(args.repeat):
                received, seconds, encoding = peer_download(orthanc, study, series)
                assert received > size and encoding == "identity", (received, encoding)
                discard.append(seconds)
                c = curl_to_file(orthanc, study, series, work / "curl.out")
                if c is not None:
                    curl.append(c)
                out = work / f"out{n}"
                elapsed, peak, summary = harvest_once(orthanc, uids, out)
                doc = json.loads((out / "harvest.json").read_text())
                by_sop = {f["SOPInstanceUID"]: f for f in doc["series"][0]["files"]}
                for inst in record.instances:
                    data = (out / by_sop[inst.sop_uid]["path"]).read_bytes()
                    assert hashlib.md5(data).hexdigest() == inst.md5, inst.sop_uid
                shutil.rmtree(out)
                runs.append(elapsed)
                peaks.append(peak)
                print(f"run {n + 1}: urllib discard {mib / seconds:.0f} MiB/s"
                      + (f", curl to file {mib / c:.0f} MiB/s" if c else "")
                      + f", harvester {mib / elapsed:.0f} MiB/s ({elapsed:.2f}s), peak RSS {peak / MB:.0f} MiB")
                print(f"       {summary}")
        finally:
            orthanc.stop()
    med = statistics.median
    rate = mib / med(runs)
    print(f"median: urllib discard {mib / med(discard):.0f} MiB/s"
          + (f", curl to file {mib / med(curl):.0f} MiB/s" if curl else "")
          + f", harvester run {rate:.0f} MiB/s (whole process: start-up, plan, fetch, MD5, verify, commit)")
    if curl:
        print(f"harvester / curl-to-file: {med(curl) / med(runs):.2f}")
    print(f"peak RSS of harvester run: {max(peaks) / MB:.0f} MiB for a {mib:.0f} MiB series "
          f"(every file MD5-identical to the source)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
