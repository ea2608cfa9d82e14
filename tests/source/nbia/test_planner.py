"""The planner against our loopback server: every selector and input format, faults while planning."""
from __future__ import annotations

import dataclasses
import datetime as dt
import re

import anyio
import pytest

from harvest_helpers import manifest, normal_collections, normal_series, test_config
from harvester.source.nbia import planner as planner_module
from harvester.api import aharvest, aplan
from harvester.dates import parse_archive_date
from harvester.errors import UnknownSelectionError
from harvester.store.layout import series_path
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
    totals = p.to_dict()
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


V4_DATE = re.compile(r"\d{2}-\d{2}-\d{4}")
V2_DATE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d+")


def _released(rec):
    return parse_archive_date(rec.row["DateReleased"])


@pytest.mark.parametrize("version,form", [("v4", V4_DATE), ("v2", V2_DATE)])
def test_released_after_reads_each_versions_dates(server, small_archive, tmp_path, version, form):
    """v4 sends DateReleased as MM-DD-YYYY (which used to keep every series), v2 as a stamp."""
    name = normal_collections(small_archive)[0]
    recs = [r for r in small_archive.records() if r.row["Collection"] == name]
    days = sorted({_released(r) for r in recs})
    cut = days[len(days) // 2]  # a day a series was released on: that one is not after it
    want = sorted(r.uid for r in recs if _released(r) > cut)
    assert 0 < len(want) < len(recs) and any(_released(r) == cut for r in recs)
    config = test_config(server.url("", version).rstrip("/"), tmp_path / "out")
    p = anyio.run(aplan, query_from_dict({"select": [{"collection": name, "released_after": cut.isoformat()}]},
                                         origin="test"), config)
    assert sorted(t.series_uid for t in p.tasks) == want
    assert all(form.fullmatch(t.row["DateReleased"]) for t in p.tasks)  # as that version sent them
    assert p.warnings == []


def test_released_after_keeps_unreadable_dates_and_says_so_once(small_archive, tmp_path):
    name = normal_collections(small_archive)[0]
    recs = [r for r in small_archive.records() if r.row["Collection"] == name]
    odd = {recs[0].uid: "sometime in 2020", recs[1].uid: None}  # unreadable, and absent

    def with_date(rec):
        row = {k: v for k, v in rec.row.items() if k != "DateReleased"}
        return dataclasses.replace(rec, row=row if odd[rec.uid] is None else {**row, "DateReleased": odd[rec.uid]})

    archive = Archive([with_date(r) if r.uid in odd else r for r in small_archive.records()])
    last = max(_released(r) for r in recs if r.uid not in odd)  # no dated series is after it
    query = {"select": [{"collection": name, "released_after": last.isoformat()},
                        {"collection": normal_collections(small_archive)[1]}]}  # no date filter: not counted
    events = []
    with serve_in_thread(archive) as srv:
        result = anyio.run(lambda: aharvest(query_from_dict(query, origin="test"),
                                            test_config(srv.base_url, tmp_path / "out"), on_event=events.append))
    assert result.ok
    done = {s["SeriesInstanceUID"] for s in manifest(tmp_path / "out")["series"] if s["status"] == "complete"}
    assert done & {r.uid for r in recs} == set(odd)
    warnings = [e.message for e in events if e.kind == "warning"]
    assert warnings == [planner_module.undated_warning(2)] and "2 series" in warnings[0]


def test_plan_is_the_same_when_numbers_arrive_as_strings(small_archive, tmp_path):
    data = {"select": [{"collection": c} for c in normal_collections(small_archive)]}
    plans = []
    for as_strings in (False, True):
        with serve_in_thread(small_archive, numbers_as_strings=as_strings) as srv:
            plans.append(plan(srv, tmp_path, data))
    numbers, strings = plans
    assert all(isinstance(t.row["FileSize"], str) for t in strings.tasks)  # they did arrive as strings
    assert all(isinstance(t.row["FileSize"], int) for t in numbers.tasks)
    assert strings.to_dict() == numbers.to_dict() and numbers.to_dict()["bytes"] > 0
    assert [(t.series_uid, t.image_count, t.file_size) for t in strings.tasks] == [
        (t.series_uid, t.image_count, t.file_size) for t in numbers.tasks]
    for layout in ("descriptive", "classic"):
        assert [series_path(t.layout_fields(), layout) for t in strings.tasks] == [
            series_path(t.layout_fields(), layout) for t in numbers.tasks]


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


def test_unknown_series_is_unavailable_and_strict_refuses_it(server, small_archive, tmp_path):
    """A UID the archive has no row for is listed with the archive's answer (no longer an error);
    ``strict`` keeps the old refusal."""
    ghost = "1.2.3.4.5.6.7.8.9"
    p = plan(server, tmp_path, {"select": [{"series": [ghost]}]})
    assert p.tasks == []
    assert [(u.series_uid, u.origin) for u in p.unavailable] == [(ghost, "test: select[0]")]
    assert "no row" in p.unavailable[0].reason
    assert p.warnings == [f"selector 1 (series: {ghost}) matches no series"]
    assert p.to_dict()["unavailable"] == [{"SeriesInstanceUID": ghost, "origin": "test: select[0]",
                                           "reason": p.unavailable[0].reason}]
    with pytest.raises(UnknownSelectionError) as err:
        plan(server, tmp_path, {"select": [{"series": [ghost]}]}, strict=True)
    assert ghost in str(err.value) and "--strict" in err.value.one_line()
    with pytest.raises(UnknownSelectionError) as err:
        plan(server, tmp_path, {"select": [{"series": [ghost]}, {"series": ["1.2.3.5"]}, {"series": ["1.2.3.6"]}]},
             strict=True)
    assert str(err.value) == f"test: select[0]: the archive has no series {ghost}; 2 more in other selectors"


def test_partial_list_plans_the_rest(server, small_archive, tmp_path):
    """3 existing UIDs and 1 withdrawn: the 3 are planned, the 1 named; a UID that another selector
    finds is not unavailable."""
    name = normal_collections(small_archive)[0]
    uids = rows(small_archive, Collection=name)[:3]
    ghost = "1.2.3.999.1"
    p = plan(server, tmp_path, {"select": [{"series": [uids[0], ghost, *uids[1:]]}]})
    assert sorted(t.series_uid for t in p.tasks) == sorted(uids)
    assert [u.series_uid for u in p.unavailable] == [ghost] and p.warnings == []
    both = plan(server, tmp_path, {"select": [{"series": [ghost]}, {"collection": name}]})
    assert [u.series_uid for u in both.unavailable] == [ghost]
    assert plan(server, tmp_path, {"select": [{"series": uids}]}).unavailable == []


def test_the_api_harvests_a_partial_list_or_refuses_it_with_strict(server, small_archive, tmp_path):
    """harvest(): the result names the unavailable series and is not ok; strict=True raises before
    any download."""
    from harvester.api import harvest

    uids = rows(small_archive, Collection=normal_collections(small_archive)[0])[:3]
    ghost = "1.2.3.999.7"
    cart = tmp_path / "cart.csv"
    cart.write_text("SeriesInstanceUID\n" + "\n".join([ghost, *uids]) + "\n")
    options = {k: v for k, v in vars(test_config(server.base_url, tmp_path)).items() if k not in ("out_dir",)}
    with pytest.raises(UnknownSelectionError, match=ghost):
        harvest(cart, tmp_path / "strict", **{**options, "strict": True})
    assert server.stats.downloads == {} and not (tmp_path / "strict").exists()
    result = harvest(cart, tmp_path / "out", **options)
    assert not result.ok and result.failed == [] and result.fatal is None
    assert [(uid, "no row" in why) for uid, why in result.unavailable] == [(ghost, True)]
    assert result.totals["complete"] == 3 and result.totals["unavailable"] == 1
    assert sorted(server.stats.downloads) == sorted(uids)


def test_refused_series_records_the_servers_text(small_archive, tmp_path):
    """NBIA says "no" to a restricted series with HTTP 400 and a text (typed application/json): the
    reason is that text, on one line and bounded, with the URL; the rest is planned."""
    from aiohttp import ClientSession, web

    name = normal_collections(small_archive)[0]
    uids = rows(small_archive, Collection=name)[:2]
    restricted = "1.2.3.777.1"
    denial = "Access denied:\n user nbia_guest may not see series " + restricted + " " + "x" * 500

    async def main():
        with serve_in_thread(small_archive) as upstream:
            async with ClientSession() as session:
                async def proxy(request):
                    if request.query.get("SeriesInstanceUID") == restricted:
                        return web.Response(status=400, text=denial, content_type="application/json")
                    async with session.get(upstream.root_url + request.path_qs) as resp:
                        return web.Response(status=resp.status, body=await resp.read(),
                                            content_type=resp.content_type)

                app = web.Application()
                app.router.add_get("/{tail:.*}", proxy)
                runner = web.AppRunner(app)
                await runner.setup()
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                port = site._server.sockets[0].getsockname()[1]
                try:
                    query = query_from_dict({"select": [{"series": [*uids, restricted]}]}, origin="cart")
                    return await aplan(query, test_config(f"http://127.0.0.1:{port}/nbia-api/services/v4",
                                                          tmp_path / "out"))
                finally:
                    await runner.cleanup()

    p = anyio.run(main)
    assert sorted(t.series_uid for t in p.tasks) == sorted(uids)
    (u,) = p.unavailable
    assert u.series_uid == restricted
    assert "HTTP 400" in u.reason and "Access denied: user nbia_guest may not see series" in u.reason
    assert "\n" not in u.reason and len(u.reason) < 400 and u.reason.endswith("...")


def test_selectors_match_case_insensitively_as_the_server_does(server, small_archive, tmp_path):
    """The server compares UPPER(column) = UPPER(value): so does the local check, for one value
    (narrowed on the server), for several (checked locally only), for the collection and for
    exclusions."""
    names = normal_collections(small_archive)
    name = names[0]
    modalities = sorted({r.row["Modality"] for r in small_archive.records() if r.row["Collection"] == name})
    modality = modalities[0]
    assert modality != modality.lower()
    exact = plan(server, tmp_path, {"select": [{"collection": name, "modality": modality}]})
    assert exact.tasks and sorted(t.series_uid for t in exact.tasks) == rows(small_archive, Collection=name,
                                                                             Modality=modality)
    lower = plan(server, tmp_path, {"select": [{"collection": name, "modality": modality.lower()}]})
    assert lower.tasks == exact.tasks and lower.warnings == []
    several = plan(server, tmp_path, {"select": [{"collection": name, "modality": [m.lower() for m in modalities]}]})
    assert sorted(t.series_uid for t in several.tasks) == rows(small_archive, Collection=name)
    folded_name = plan(server, tmp_path, {"select": [{"collection": name.lower(), "modality": modality}]})
    assert folded_name.tasks == exact.tasks
    assert {t.collection for t in folded_name.tasks} == {name}  # the archive's spelling
    excluded = plan(server, tmp_path, {"select": [{"collection": name}], "exclude": {"modality": modality.lower()}})
    assert excluded.tasks and all(t.modality != modality for t in excluded.tasks)


def test_a_selector_matching_nothing_is_named_in_a_warning(server, small_archive, tmp_path):
    name = normal_collections(small_archive)[0]
    p = plan(server, tmp_path, {"select": [{"collection": name}, {"collection": name, "modality": "NOSUCH"}]})
    assert p.tasks
    assert p.warnings == [f"selector 2 (collection: {name}, modality: NOSUCH) matches no series"]
    assert p.to_dict()["warnings"] == p.warnings


def test_patients_alone_and_studies_alone(server, small_archive, tmp_path):
    """getSeries takes PatientID alone or StudyInstanceUID alone: no collection needed."""
    names = normal_collections(small_archive)
    recs = [small_archive.get(u) for u in normal_series(small_archive)]
    patients = sorted({(r.row["Collection"], r.row["PatientID"]) for r in recs})
    picked = [next(p for c, p in patients if c == names[0]), next(p for c, p in patients if c == names[1])]
    p = plan(server, tmp_path, {"select": [{"patients": picked}]})
    want = sorted(r.uid for r in recs if r.row["PatientID"] in picked)
    assert want and sorted(t.series_uid for t in p.tasks) == want
    assert {t.collection for t in p.tasks} == set(names[:2])
    assert all(t.study is not None for t in p.tasks)  # enriched as any other selector's
    modality = recs[0].row["Modality"]
    p = plan(server, tmp_path, {"select": [{"patients": picked, "modality": modality.lower()}]})
    assert sorted(t.series_uid for t in p.tasks) == sorted(r.uid for r in recs if r.row["PatientID"] in picked
                                                           and r.row["Modality"] == modality)
    studies = sorted({r.row["StudyInstanceUID"] for r in recs})[:2]
    p = plan(server, tmp_path, {"select": [{"studies": studies}]})
    assert sorted(t.series_uid for t in p.tasks) == sorted(r.uid for r in small_archive.records()
                                                           if r.row["StudyInstanceUID"] in studies)
    p = plan(server, tmp_path, {"select": [{"patients": ["NO-SUCH-PATIENT"]}]})
    assert p.tasks == [] and p.warnings == ["selector 1 (patients: NO-SUCH-PATIENT) matches no series"]


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
    """Swept or looked up, the unknown UIDs are listed in the cart's order and the rest planned;
    ``strict`` refuses naming three of them."""
    archive, server = cart_server
    uids = cart_uids(archive, normal_collections(archive))
    ghosts = [f"1.2.3.999.{i}" for i in range(4)]
    cart = {"select": [{"series": uids[:3] + ghosts + uids[3:]}]}
    p = plan(server, tmp_path, cart)
    assert sorted(t.series_uid for t in p.tasks) == sorted(uids)
    assert [u.series_uid for u in p.unavailable] == ghosts
    with pytest.raises(UnknownSelectionError) as err:
        plan(server, tmp_path, cart, strict=True)
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
