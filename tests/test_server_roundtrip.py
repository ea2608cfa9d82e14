"""Backend (a) against the real client: harvest our server, re-publish the output directory
with ``load_harvest_dir``, and harvest that again. Rows and bytes must survive both trips."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import anyio

from harvester.api import aharvest
from harvester.config import Config
from harvester.query import query_from_dict
from harvester.server.archive import Archive, load_harvest_dir, wire_row
from harvester.server.testing import serve_in_thread


def _harvest(base_url: str, out: Path, archive: Archive) -> int:
    collections = sorted({r.row["Collection"] for r in archive.records() if r.hostile_kind is None})
    query = query_from_dict({"select": [{"collection": c} for c in collections]}, origin="test")
    config = Config(api_url=base_url, out_dir=out, workers=4, retries=2, series_retries=1, backoff_base=0.01,
                    backoff_max=0.05, read_timeout=10.0, progress=False, quiet=True)
    result = anyio.run(aharvest, query, config)
    assert result.ok, result.failed
    return int(result.downloaded)


def test_harvest_republish_harvest(small_archive: Archive, tmp_path: Path) -> None:
    honest = [r for r in small_archive.records() if r.hostile_kind is None]
    with serve_in_thread(small_archive) as handle:
        assert _harvest(handle.base_url, tmp_path / "first", small_archive) == len(honest)
    republished = load_harvest_dir(tmp_path / "first")
    assert sorted(republished.series) == sorted(r.uid for r in honest)
    for original in honest:
        copy = republished.series[original.uid]
        assert wire_row(copy.row) == wire_row(original.row)  # the same on the wire (dates are kept as received)
        assert copy.patient == original.patient
        assert copy.study["StudyInstanceUID"] == original.study["StudyInstanceUID"]
        assert sorted(i.md5 for i in copy.instances) == sorted(i.md5 for i in original.instances)
        assert {i.sop_uid for i in copy.instances} == {i.sop_uid for i in original.instances}
    with serve_in_thread(republished) as handle:
        assert _harvest(handle.base_url, tmp_path / "second", republished) == len(honest)
        assert set(handle.stats.downloads) == {r.uid for r in honest}
    second = load_harvest_dir(tmp_path / "second")
    assert {uid: sorted(i.md5 for i in r.instances) for uid, r in second.series.items()} == {
        r.uid: sorted(i.md5 for i in r.instances) for r in honest}
    # serve reads the records through the state database: a harvest.json that lists fewer
    # series (a kill -9 before its export) hides nothing; without .harvester, harvest.json it is
    manifest = tmp_path / "first" / "harvest.json"
    doc = json.loads(manifest.read_text("utf-8"))
    doc["series"] = doc["series"][:1]
    manifest.write_text(json.dumps(doc), "utf-8")
    assert sorted(load_harvest_dir(tmp_path / "first").series) == sorted(r.uid for r in honest)
    shutil.rmtree(tmp_path / "first" / ".harvester")
    assert list(load_harvest_dir(tmp_path / "first").series) == [doc["series"][0]["SeriesInstanceUID"]]
