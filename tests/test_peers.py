"""The peer clients users would pick instead work against our server unchanged.

The peers run in their own venv (``make peers`` builds ``.venv-peers``; nbiatoolkit pins
pydicom<3 while the test venv runs pydicom 3, as users get it), so each test runs the peer's
code as a subprocess of that interpreter, against the in-process server on loopback, and checks
what it returned and the files it wrote here. Without the venv the tests skip, unless
``HARVESTER_REQUIRE_PEERS`` is set (``make test`` sets it), where they fail.

tcia_utils builds URLs from ``setApiUrl`` (replaced by one returning our v4 base); nbiatoolkit
takes its base from an Enum member, which we replace with any object that has ``.value``, and
asks for an OAuth token at ``<base>oauth/token`` before every call.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from harvester.dates import parse_archive_date
from harvester.server.archive import Archive, SeriesRecord
from harvester.server.testing import ServerHandle
from harvest_helpers import peers_python

pytestmark = pytest.mark.peers

RESULT = "PEER-RESULT "  # the peers print progress of their own: the result is the line with this prefix


def run_peer(prelude: str, code: str, **inputs: Any) -> Any:
    """Run ``prelude`` then ``code`` in the peers' venv with ``inputs`` as the dict ``IN``;
    ``code`` sets ``OUT``, which comes back decoded from JSON."""
    script = "\n".join(["import json, sys", "IN = json.loads(sys.argv[1])", textwrap.dedent(prelude),
                        textwrap.dedent(code), f"print({RESULT!r} + json.dumps(OUT))"])
    proc = subprocess.run([peers_python(), "-c", script, json.dumps(inputs)], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL, cwd=inputs.get("cwd"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    assert lines, proc.stdout[-3000:]
    return json.loads(lines[-1][len(RESULT):])


TCIA = """
    import logging
    from tcia_utils import nbia
    logging.getLogger("tcia_utils").setLevel(logging.ERROR)
    nbia.setApiUrl = lambda endpoint, api_url="": IN["base"] + "/"
"""

NBIATOOLKIT = """
    import types
    import nbiatoolkit
    from nbiatoolkit.utils import NBIA_ENDPOINTS
    client = nbiatoolkit.NBIAClient(log_level="ERROR")
    client._base_url = types.SimpleNamespace(value=IN["services"])  # picklable for its process pool
    client._oauth2_client.base_url = IN["services"]
    # never used as a context manager: its __exit__ logs out at the real host
"""


def normal(archive: Archive) -> list[SeriesRecord]:
    return [r for r in archive.records() if r.row["Collection"].startswith("SYN-")]


def md5s_under(root: Path) -> set[str]:
    return {hashlib.md5(p.read_bytes()).hexdigest() for p in root.rglob("*.dcm")}


def test_tcia_utils_queries(server: ServerHandle, small_archive: Archive) -> None:
    rec = normal(small_archive)[0]
    got = run_peer(TCIA, """
        uid, collection = IN["uid"], IN["collection"]
        OUT = {
            "collections": [c["Collection"] for c in nbia.getCollections()],
            "series": [r["SeriesInstanceUID"] for r in nbia.getSeries(collection=collection, modality=IN["modality"])],
            "size": nbia.getSeriesSize(uid),
            "sops": [s["SOPInstanceUID"] for s in nbia.getSopInstanceUids(uid)],
            "patients": bool(nbia.getPatient(collection=collection)),
            "studies": bool(nbia.getStudy(collection, patientId=IN["patient"])),
            "updated": [r["SeriesInstanceUID"] for r in nbia.getUpdatedSeries("2022/01/01")],
        }
    """, base=server.base_url, uid=rec.uid, collection=rec.row["Collection"], modality=rec.row["Modality"],
        patient=rec.row["PatientID"])
    assert set(got["collections"]) == set(small_archive.collections())
    assert rec.uid in got["series"]
    assert got["size"] == [{"TotalSizeInBytes": rec.total_bytes, "ObjectCount": 4}]
    assert got["sops"] == [i.sop_uid for i in rec.instances]
    assert got["patients"] and got["studies"]
    cutoff = dt.date(2022, 1, 1)  # tcia_utils sends MM-DD-YYYY to v4
    assert set(got["updated"]) == {
        r.uid for r in small_archive.records() if parse_archive_date(r.row["DateReleased"]) > cutoff}


@pytest.mark.parametrize("hash_", ["", "y"])
def test_tcia_utils_download_is_byte_identical(server: ServerHandle, small_archive: Archive, tmp_path: Path,
                                               hash_: str) -> None:
    recs = normal(small_archive)[:3]
    run_peer(TCIA, """
        nbia.downloadSeries(IN["uids"], input_type="list", path=IN["path"], hash=IN["hash"])
        OUT = True
    """, base=server.base_url, uids=[r.uid for r in recs], path=str(tmp_path), hash=hash_)
    for rec in recs:
        folder = tmp_path / rec.uid
        files = sorted(folder.glob("*.dcm"))
        assert [f.read_bytes() for f in files] == [i.path.read_bytes() for i in rec.instances]
        # hash=y asks getImageWithMD5Hash, which (as on the real service) carries no LICENSE
        assert (folder / "LICENSE").is_file() == (hash_ == "")
        assert ((folder / "md5hashes.csv").is_file()) == (hash_ == "y")


def test_tcia_utils_single_image(server: ServerHandle, small_archive: Archive, tmp_path: Path) -> None:
    rec = normal(small_archive)[1]
    inst = rec.instances[0]
    run_peer(TCIA, """
        nbia.downloadImage(IN["uid"], IN["sop"], path=IN["path"])
        OUT = True
    """, base=server.base_url, uid=rec.uid, sop=inst.sop_uid, path=str(tmp_path))
    assert (tmp_path / rec.uid / f"{inst.sop_uid}.dcm").read_bytes() == inst.path.read_bytes()


def services(server: ServerHandle) -> str:
    return server.root_url + "/nbia-api/services/"


def test_nbiatoolkit_queries(server: ServerHandle, small_archive: Archive) -> None:
    rec = normal(small_archive)[2]
    got = run_peer(NBIATOOLKIT, """
        OUT = {
            "collections": [c["Collection"] for c in client.query_api(NBIA_ENDPOINTS.GET_COLLECTIONS)],
            "series": [r["SeriesInstanceUID"] for r in client.getSeries(Collection=IN["collection"],
                                                                          PatientID=IN["patient"])],
            "patients": [p["PatientId"] for p in client.getPatients(Collection=IN["collection"])],
            "new": [r["SeriesInstanceUID"] for r in client.getNewSeries("2022-01-01")],
        }
    """, services=services(server), collection=rec.row["Collection"], patient=rec.row["PatientID"])
    assert set(got["collections"]) == set(small_archive.collections())  # v2/getCollectionValues
    assert rec.uid in got["series"]
    assert rec.row["PatientID"] in got["patients"]
    assert set(got["new"]) == {  # nbiatoolkit sends DD/MM/YYYY to v2
        r.uid for r in small_archive.records() if r.row["DateReleased"][:10] > "2022-01-01"}
    assert server.stats.requests["oauth/token"] >= 1


def test_nbiatoolkit_download_is_byte_identical(server: ServerHandle, small_archive: Archive, tmp_path: Path) -> None:
    recs = normal(small_archive)[:2]
    ok = run_peer(NBIATOOLKIT, """
        OUT = bool(client.downloadSeries(IN["uids"], downloadDir=IN["path"]))
    """, services=services(server), uids=[r.uid for r in recs], path=str(tmp_path / "dl"), cwd=str(tmp_path))
    assert ok
    assert md5s_under(tmp_path / "dl") == {i.md5 for r in recs for i in r.instances}
