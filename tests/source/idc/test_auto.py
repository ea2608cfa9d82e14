"""``source: auto``: NBIA's plan, each series from IDC when the index has it with the same
instance count, from NBIA otherwise; one tree, byte-identical to the archive, and harvest.json
says where each series came from."""
from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import anyio

from harvest_helpers import FAST, assert_identical, normal_series, select_all
from harvester.api import aharvest
from harvester.config import Config
from harvester.query import query_from_dict
from harvester.server.testing import ServerHandle

from .conftest import BUCKET, Moto, S3Proxy, write_index
from .test_harvest import run_cli


def mirror_in_idc(moto: Moto, archive: Any, uids: list[str], *, counts: dict[str, int] | None = None) -> list[dict]:
    """Put the archive's files of ``uids`` in the bucket, IDC-shaped, and return their index rows
    (``counts``: an instanceCount other than the real one, as for a series that changed)."""
    rows = []
    for uid in uids:
        rec = archive.get(uid)
        prefix = str(uuid.UUID(bytes=hashlib.md5(("auto" + uid).encode()).digest(), version=4))
        for inst in rec.instances:
            moto.client.put_object(Bucket=BUCKET, Key=f"{prefix}/{inst.sop_uid}.dcm", Body=inst.path.read_bytes(),
                                   ACL="public-read")
        rows.append({"collection_id": rec.row["Collection"].lower().replace("-", "_"), "PatientID": rec.row["PatientID"],
                     "StudyInstanceUID": rec.row["StudyInstanceUID"], "SeriesInstanceUID": uid,
                     "Modality": rec.row.get("Modality"), "aws_bucket": BUCKET, "crdc_series_uuid": prefix,
                     "instanceCount": (counts or {}).get(uid, len(rec.instances)),
                     "series_size_MB": rec.total_bytes / 1_000_000.})
    return rows


def test_auto_takes_each_series_from_where_it_is(small_archive: Any, server: ServerHandle, moto: Moto,
                                                 proxy: S3Proxy, tmp_path: Path) -> None:
    uids = normal_series(small_archive)
    in_idc, changed = uids[:2], uids[2]
    index = write_index(tmp_path / "idx" / "idc_index.parquet",
                        mirror_in_idc(moto, small_archive, [*in_idc, changed],
                                      counts={changed: len(small_archive.get(changed).instances) + 1}))
    proxy.set_faults("error=0.1,reset=0.1,seed=4")
    out = tmp_path / "out"
    config = Config(source="auto", api_url=server.base_url, endpoint_url=proxy.url, idc_index=index, out_dir=out,
                    **{**FAST, "read_timeout": 60.0})   # no stall injected; moto may be slow under load
    result = anyio.run(aharvest, query_from_dict(select_all(small_archive), origin="test"), config)
    assert result.ok, result.failed
    assert_identical(out, small_archive, uids)
    sources = {r["SeriesInstanceUID"]: r["metadata"]["source"] for r in json.loads((out / "harvest.json").read_text())["series"]}
    assert {u for u, s in sources.items() if s == "idc"} == set(in_idc)
    assert sources[changed] == "nbia"   # another instance count: not the same series
    served = server.stats.downloads
    assert not any(served.get(u) for u in in_idc)
    assert all(served.get(u) for u in uids if u not in in_idc)


def test_plan_shows_the_split(small_archive: Any, server: ServerHandle, moto: Moto, tmp_path: Path) -> None:
    uids = normal_series(small_archive)
    index = write_index(tmp_path / "idx" / "idc_index.parquet", mirror_in_idc(moto, small_archive, uids[:3]))
    query = tmp_path / "q.json"
    query.write_text(json.dumps({"source": "auto", **select_all(small_archive)}))
    done = run_cli("plan", str(query), "--api-url", server.base_url, "--endpoint-url", moto.endpoint,
                   "--idc-index", str(index), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sources"] == {"idc": 3, "nbia": len(uids) - 3}
