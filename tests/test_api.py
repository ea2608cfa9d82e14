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
    assert p.to_dict()["series"] == len(normal_series(small_archive))
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


# ---------------------------------------------------------------- issue 19: the Python API as users expect

def test_readme_example_points_at_another_archive_with_api_url_or_the_environment(server, small_archive, tmp_path):
    """The README example could not be pointed at another archive (the API ignored
    HARVESTER_API_URL and the example never showed `api_url=`). `api_url=` works, and
    `Config.from_env` reads the environment as the CLI does, only when asked."""
    import json

    query = select_all(small_archive)
    plan = harvester.plan(query, api_url=server.base_url)
    totals = json.loads(plan.to_json())   # `Plan.to_json()` returned a dict: it is JSON text now
    assert totals == plan.to_dict() and totals["series"] == len(normal_series(small_archive))
    result = harvester.harvest(query, tmp_path / "lidc", api_url=server.base_url, **FAST)
    assert result.ok and harvester.verify(tmp_path / "lidc").ok
    config = harvester.Config.from_env({"HARVESTER_API_URL": server.base_url + "/"}, **FAST)
    assert config.api_url == server.base_url
    assert harvester.Config.from_env({}).api_url == harvester.Config().api_url
    assert harvester.plan(query, config).to_dict()["series"] == totals["series"]


@pytest.mark.parametrize("option", [{"workers": 0}, {"connections": 0}, {"retries": 0}, {"series_retries": -1},
                                    {"max_rate": 0}, {"workers": "8"}, {"read_timeout": 0}])
def test_invalid_arguments_raise_usage_error_as_the_cli_refuses_them(server, small_archive, tmp_path, option):
    """`workers=0` returned ok=False instead of an error."""
    out = tmp_path / "out"
    with pytest.raises(harvester.UsageError, match=f"^{next(iter(option))}="):
        harvester.harvest(select_all(small_archive), out, api_url=server.base_url, **option)
    assert not out.exists() and sum(server.stats.requests.values()) == 0   # refused before any request


def test_harvest_without_a_directory_raises_instead_of_writing_to_harvest(server, small_archive, tmp_path,
                                                                         monkeypatch):
    """`harvest(q)` with no directory wrote to ./harvest."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(harvester.UsageError, match="needs an output directory"):
        harvester.harvest(select_all(small_archive), api_url=server.base_url)
    assert list(tmp_path.iterdir()) == []
