"""The public Python API: the exported surface, sync and async use, inside a running loop."""
from __future__ import annotations

import pytest

import harvester
from harvest_helpers import FAST, assert_identical, normal_collections, normal_series, select_all

EXPECTED = {
    "AsyncMetadataClient", "AuthConfig", "AuthError", "Config", "DiskFullError", "Event", "FatalError",
    "HarvestResult", "HarvesterError", "Limits", "ManifestError", "MetadataClient", "Plan", "Query",
    "RepairResult", "SeriesError", "SeriesTask", "SyncDiff", "SyncResult", "UnknownSelectionError", "UsageError",
    "VerifyResult", "__version__", "aharvest", "aplan", "as_query", "async_repair", "async_sync", "harvest",
    "load_query", "make_config", "plan", "query_from_dict", "read_status", "repair", "sync", "to_dataframe",
    "verify",
}


def test_exported_names_change_only_on_purpose():
    assert set(harvester.__all__) == EXPECTED
    for name in EXPECTED:
        assert hasattr(harvester, name), name


def test_plan_and_harvest_from_plain_code(server, small_archive, tmp_path):
    query = select_all(small_archive)
    p = harvester.plan(query, api_url=server.base_url)
    assert p.to_json()["series"] == len(normal_series(small_archive))
    events = []
    result = harvester.harvest(query, tmp_path / "out", api_url=server.base_url, on_event=events.append, **FAST)
    assert result.ok and result.downloaded == len(normal_series(small_archive))
    kinds = {e.kind for e in events}
    assert {"plan", "start", "bytes", "done"} <= kinds
    assert sum(e.bytes for e in events if e.kind == "done") == result.totals["bytes"]
    assert harvester.verify(tmp_path / "out").ok
    assert_identical(tmp_path / "out", small_archive, normal_series(small_archive))


@pytest.mark.anyio
async def test_sync_api_works_inside_a_running_event_loop(server, small_archive, tmp_path):
    # As in Jupyter: a loop is running in this thread, and the plain function must still work.
    result = harvester.harvest(select_all(small_archive), tmp_path / "out", api_url=server.base_url, **FAST)
    assert result.ok
    meta = harvester.MetadataClient(server.base_url)
    assert set(normal_collections(small_archive)) <= set(meta.collections())


@pytest.mark.anyio
async def test_async_twins(server, small_archive, tmp_path):
    p = await harvester.aplan(select_all(small_archive), api_url=server.base_url)
    result = await harvester.aharvest(select_all(small_archive), tmp_path / "out", api_url=server.base_url, **FAST)
    assert result.ok and len(p.tasks) == result.downloaded
    async with harvester.AsyncMetadataClient(server.base_url) as meta:
        name = normal_collections(small_archive)[0]
        rows = await meta.series(Collection=name)
        assert {r["SeriesInstanceUID"] for r in rows} == {r.uid for r in small_archive.records()
                                                         if r.row["Collection"] == name}


def test_metadata_client_records_and_dataframe(server, small_archive):
    pd = pytest.importorskip("pandas")
    meta = harvester.MetadataClient(server.base_url)
    name = normal_collections(small_archive)[0]
    rows = meta.series(Collection=name)
    assert rows and all(isinstance(r, dict) for r in rows)
    frame = meta.series(Collection=name, dataframe=True)
    assert isinstance(frame, pd.DataFrame) and len(frame) == len(rows)
    assert "SeriesInstanceUID" in frame.columns
    with pytest.raises(harvester.UsageError):
        meta.series(collection=name)  # parameter names are the API's, case-sensitive


def test_bad_options_and_queries(tmp_path):
    with pytest.raises(TypeError):
        harvester.make_config(None, None, None, wokers=3)
    with pytest.raises(harvester.ManifestError):
        harvester.as_query({"select": [{"colection": "X"}]})
    with pytest.raises(harvester.ManifestError):
        harvester.as_query(tmp_path / "missing.yaml")
    q = harvester.as_query({"api": "http://127.0.0.1:1/nbia-api/services/v4", "layout": "flat",
                            "select": [{"collection": "X"}]})
    cfg = harvester.make_config(q, None, tmp_path, workers=3)
    assert cfg.api_url.endswith("/v4") and cfg.layout == "flat" and cfg.workers == 3 and cfg.out_dir == tmp_path
