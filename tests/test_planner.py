"""The planner against our loopback server: every selector and input format, faults while planning."""
from __future__ import annotations

import dataclasses
import datetime as dt

import anyio
import pytest

from harvest_helpers import normal_collections, test_config
from harvester import planner as planner_module
from harvester.api import aplan
from harvester.errors import UnknownSelectionError
from harvester.query import load_query, query_from_dict
from harvester.server.archive import Archive
from harvester.server.synthetic import SyntheticSpec, build_synthetic
from harvester.server.testing import serve_in_thread


def plan(server, tmp_path, data, **overrides):
    return anyio.run(aplan, query_from_dict(data, origin="test", base_dir=tmp_path),
                     test_config(server.base_url, tmp_path / "out", **overrides))


def rows(archive, **match):
    return sorted(r.uid for r in archive.records()
                  if all(str(r.row.get(k)) == v for k, v in match.items()))


def test_collection_selects_all_its_series(server, small_archive, tmp_path):
    name = normal_collections(small_archive)[0]
    p = plan(server, tmp_path, {"select": [{"collection": name}]})
    assert sorted(t.series_uid for t in p.tasks) == rows(small_archive, Collection=name)
    totals = p.to_json()
    want = [small_archive.get(u) for u in rows(small_archive, Collection=name)]
    assert totals["images"] == sum(len(r.instances) for r in want)
    assert totals["bytes"] == sum(sum(i.size for i in r.instances) for r in want)
    assert totals["collections"][name]["series"] == len(want)
    task = p.tasks[0]
    assert task.study is not None and task.patient is not None  # enriched for layouts and the manifest


def test_filters_narrow_the_selection(server, small_archive, tmp_path):
    name = normal_collections(small_archive)[0]
    recs = [r for r in small_archive.records() if r.row["Collection"] == name]
    modality = recs[0].row["Modality"]
    p = plan(server, tmp_path, {"select": [{"collection": name, "modality": modality}]})
    assert sorted(t.series_uid for t in p.tasks) == rows(small_archive, Collection=name, Modality=modality)
    patient = recs[0].row["PatientID"]
    p = plan(server, tmp_path, {"select": [{"collection": name, "patients": [patient]}]})
    assert sorted(t.series_uid for t in p.tasks) == rows(small_archive, Collection=name, PatientID=patient)
    study = recs[0].row["StudyInstanceUID"]
    p = plan(server, tmp_path, {"select": [{"collection": name, "studies": [study]}]})
    assert sorted(t.series_uid for t in p.tasks) == rows(small_archive, StudyInstanceUID=study)
    body = recs[0].row.get("BodyPartExamined")
    if body:
        p = plan(server, tmp_path, {"select": [{"collection": name, "body_part": body}]})
        assert sorted(t.series_uid for t in p.tasks) == rows(small_archive, Collection=name, BodyPartExamined=body)


def test_released_after(server, small_archive, tmp_path):
    name = normal_collections(small_archive)[0]
    recs = [r for r in small_archive.records() if r.row["Collection"] == name]
    dates = sorted(str(r.row["DateReleased"])[:10] for r in recs)
    cut = dates[len(dates) // 2]
    p = plan(server, tmp_path, {"select": [{"collection": name, "released_after": cut}]})
    want = sorted(r.uid for r in recs if dt.date.fromisoformat(str(r.row["DateReleased"])[:10])
                  > dt.date.fromisoformat(cut))
    assert sorted(t.series_uid for t in p.tasks) == want


def test_union_exclude_limit_and_dedup(server, small_archive, tmp_path):
    names = normal_collections(small_archive)
    uid = rows(small_archive, Collection=names[0])[0]
    data = {"select": [{"collection": names[0]}, {"collection": names[1]}, {"series": [uid]}]}
    p = plan(server, tmp_path, data)
    want = rows(small_archive, Collection=names[0]) + rows(small_archive, Collection=names[1])
    assert sorted(t.series_uid for t in p.tasks) == sorted(want)
    modality = small_archive.get(uid).row["Modality"]
    p = plan(server, tmp_path, {**data, "exclude": {"modality": [modality]}})
    assert all(t.modality != modality for t in p.tasks)
    p = plan(server, tmp_path, {**data, "limit": 3})
    assert len(p.tasks) == 3


def test_cart_and_csv_inputs(server, small_archive, tmp_path):
    uids = rows(small_archive, Collection=normal_collections(small_archive)[0])[:3]
    cart = tmp_path / "cart.tcia"
    cart.write_text("downloadServerUrl=https://example.invalid/x\nincludeAnnotation=true\nnoOfrRetry=4\n"
                    "databasketId=manifest-1.tcia\nmanifestVersion=3.0\nListOfSeriesToDownload=\n"
                    + "\n".join(uids) + "\n")
    p = anyio.run(aplan, load_query(cart), test_config(server.base_url, tmp_path / "o"))
    assert sorted(t.series_uid for t in p.tasks) == sorted(uids)
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("Series UID,Collection\n" + "".join(f"{u},x\n" for u in uids))
    p = anyio.run(aplan, load_query(csv_file), test_config(server.base_url, tmp_path / "o"))
    assert sorted(t.series_uid for t in p.tasks) == sorted(uids)
    p = plan(server, tmp_path, {"select": [{"tcia": "cart.tcia"}, {"csv": "list.csv"}]})
    assert sorted(t.series_uid for t in p.tasks) == sorted(uids)


def test_unknown_collection_suggests_close_matches(server, small_archive, tmp_path):
    name = normal_collections(small_archive)[0]
    with pytest.raises(UnknownSelectionError) as err:
        plan(server, tmp_path, {"select": [{"collection": name.lower() + "x"}]})
    assert name in str(err.value) and "did you mean" in str(err.value)


def test_unknown_series_is_a_clear_error(server, small_archive, tmp_path):
    with pytest.raises(UnknownSelectionError) as err:
        plan(server, tmp_path, {"select": [{"series": ["1.2.3.4.5.6.7.8.9"]}]})
    assert "1.2.3.4.5.6.7.8.9" in str(err.value)


@pytest.mark.parametrize("faults", ["error=0.4,seed=1", "throttle=0.4,retry_after=0,seed=2", "reset=0.4,seed=3",
                                    "error=0.2,reset=0.2,throttle=0.2,retry_after=0,latency=5ms,seed=4"])
def test_plan_is_exact_despite_faults(server, small_archive, tmp_path, faults):
    data = {"select": [{"collection": c} for c in normal_collections(small_archive)]}
    clean = plan(server, tmp_path, data)
    server.set_faults(faults)
    faulty = plan(server, tmp_path, data, retries=10)
    assert sum(server.stats.faults.values()) > 0
    assert [t.series_uid for t in faulty.tasks] == [t.series_uid for t in clean.tasks]
    assert faulty.to_json() == clean.to_json()
    assert faulty.retries > 0


def test_totals_only_plan_skips_study_details(server, small_archive, tmp_path):
    """`harvester plan` only counts: the same tasks and totals, without getPatientStudy/getPatient."""
    name = normal_collections(small_archive)[0]
    query = query_from_dict({"select": [{"collection": name}]}, origin="test", base_dir=tmp_path)
    config = test_config(server.base_url, tmp_path / "out")
    before = dict(server.stats.requests)
    lean = anyio.run(lambda: aplan(query, config, details=False))
    after = dict(server.stats.requests)
    full = anyio.run(aplan, query, config)
    for endpoint in ("getPatientStudy", "getPatient"):
        assert after.get(endpoint, 0) == before.get(endpoint, 0), endpoint
    assert server.stats.requests.get("getPatientStudy", 0) > after.get("getPatientStudy", 0)
    assert [t.series_uid for t in lean.tasks] == [t.series_uid for t in full.tasks]
    assert lean.to_json() == full.to_json()
    assert all(t.study is None and t.patient is None for t in lean.tasks)
    assert lean.requests == full.requests - 2
    assert repr(lean) == f"Plan({len(lean.tasks)} series, {lean.requests} requests, 0 retries)"


# ---------------------------------------------------------------- long lists of series UIDs (carts)

CART_SPEC = "collections=3,patients=12,studies=1,series=2,instances=1,size=1KiB,seed=11"  # 72 series


@pytest.fixture(scope="module")
def cart_server(synthetic_cache):
    archive = build_synthetic(SyntheticSpec.parse(CART_SPEC), synthetic_cache)
    with serve_in_thread(archive) as handle:
        yield archive, handle


def cart_uids(archive, collections):
    """The series of ``collections``, interleaved, so that the first lookups meet every one of them."""
    by_collection = [rows(archive, Collection=c) for c in collections]
    return [uid for group in zip(*by_collection, strict=True) for uid in group]


def series_plan(server, tmp_path, uids, **overrides):
    before = server.stats.requests.get("getSeries", 0)
    p = plan(server, tmp_path, {"select": [{"series": uids}]}, **overrides)
    return p, server.stats.requests.get("getSeries", 0) - before


def test_long_cart_is_answered_by_listing_its_collections(cart_server, tmp_path, monkeypatch):
    """40 UIDs from 2 of 3 collections: 8 lookups meet both collections, 2 listings answer the rest;
    the plan is the one that 40 lookups give."""
    archive, server = cart_server
    names = normal_collections(archive)
    uids = cart_uids(archive, names[:2])[:40]
    assert len(uids) == 40 >= planner_module.SWEEP_MIN_PENDING
    swept, swept_requests = series_plan(server, tmp_path, uids)
    assert sorted(t.series_uid for t in swept.tasks) == sorted(uids)
    assert swept_requests == 8 + 2
    monkeypatch.setattr(planner_module, "SWEEP_MIN_PENDING", 10**9)
    looked_up, lookup_requests = series_plan(server, tmp_path, uids)
    assert lookup_requests == 40
    assert swept.tasks == looked_up.tasks
    assert swept.to_json() == looked_up.to_json()


def test_short_list_is_looked_up_one_by_one(cart_server, tmp_path):
    archive, server = cart_server
    uids = cart_uids(archive, normal_collections(archive)[:2])[:planner_module.SWEEP_MIN_PENDING - 1]
    p, requests = series_plan(server, tmp_path, uids)
    assert sorted(t.series_uid for t in p.tasks) == sorted(uids) and requests == len(uids)


def test_long_cart_with_unknown_uids_names_them(cart_server, tmp_path):
    archive, server = cart_server
    uids = cart_uids(archive, normal_collections(archive))
    ghosts = [f"1.2.3.999.{i}" for i in range(4)]
    with pytest.raises(UnknownSelectionError) as err:
        plan(server, tmp_path, {"select": [{"series": uids[:3] + ghosts + uids[3:]}]})
    text = str(err.value)
    assert all(g in text for g in ghosts[:3]) and "and 1 more" in text


def test_long_cart_is_exact_despite_faults(cart_server, tmp_path):
    archive, server = cart_server
    uids = cart_uids(archive, normal_collections(archive))
    clean, _ = series_plan(server, tmp_path, uids)
    server.set_faults("error=0.3,reset=0.2,throttle=0.2,retry_after=0,seed=6")
    try:
        faulty, _ = series_plan(server, tmp_path, uids, retries=12)
    finally:
        server.set_faults(None)
    assert faulty.retries > 0
    assert faulty.tasks == clean.tasks and sorted(t.series_uid for t in clean.tasks) == sorted(uids)


def test_nlst_is_never_listed_whole(synthetic_cache, tmp_path):
    """NLST holds over 200,000 series: a long NLST cart is looked up UID by UID, never swept."""
    base = build_synthetic(SyntheticSpec.parse(CART_SPEC), synthetic_cache)
    records = [dataclasses.replace(r, row=dict(r.row, Collection="NLST")) for r in base.records()]
    with serve_in_thread(Archive(records)) as server:
        uids = sorted(r.uid for r in records)[:40]
        p, requests = series_plan(server, tmp_path, uids)
        assert sorted(t.series_uid for t in p.tasks) == sorted(uids) and requests == len(uids)
        assert {t.collection for t in p.tasks} == {"NLST"}
