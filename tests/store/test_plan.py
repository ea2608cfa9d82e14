"""harvester.store.plan: a run's plan outside memory (the planner's tasks written as they come,
read back a batch at a time), and a harvest through it: nothing left behind, a killed run's file
no obstacle, the same tasks as the plan in memory."""
from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from harvest_helpers import manifest, normal_collections, test_config
from harvester.api import aharvest, aplan
from harvester.models import SeriesTask, TaskStore
from harvester.operations import make_source, plan_into
from harvester.query import query_from_dict
from harvester.source.base import PlanInto
from harvester.source.http import make_session
from harvester.store.plan import BATCH, PlanTable


def task(i: int, collection: str = "C") -> SeriesTask:
    uid = f"1.2.840.{i}"
    return SeriesTask(series_uid=uid, collection=collection, patient_id=f"P-{i // 3}", study_uid=f"{uid}.0",
                      modality="CT" if i % 2 else "MR", image_count=i if i % 5 else None,
                      file_size=1000 * i if i % 7 else None,
                      row={"SeriesInstanceUID": uid, "SeriesDescription": f"ser\u00efe {i}", "Nested": {"k": [i]}},
                      study={"StudyInstanceUID": f"{uid}.0", "StudyDate": "2001-02-03"} if i % 3 else None,
                      patient={"PatientId": f"P-{i // 3}"} if i % 4 else None)


def fields(t: SeriesTask) -> tuple[object, ...]:
    return (t.series_uid, t.collection, t.patient_id, t.study_uid, t.modality, t.image_count, t.file_size,
            t.row, t.study, t.patient)


def test_a_plan_table_gives_its_tasks_back_in_order_a_batch_at_a_time(tmp_path: Path) -> None:
    tasks = [task(i, "A" if i < 400 else "B") for i in range(1, 601)]
    with PlanTable(tmp_path / "plan.db") as table:
        assert isinstance(table, TaskStore)
        table.add(iter(tasks[:300]))            # consumed as they come
        table.add(tasks[250:])                  # 50 already there: not added twice
        assert len(table) == 600
        batches = list(table.batches())
        assert [len(b) for b in batches] == [BATCH, BATCH, 600 - 2 * BATCH]
        assert [fields(t) for b in batches for t in b] == [fields(t) for t in tasks]
        assert list(table.uids()) == [t.series_uid for t in tasks]
        assert [fields(t) for t in table] == [fields(t) for t in tasks]
        totals = table.totals()
        assert {k: (v.series, v.images, v.bytes) for k, v in totals.items()} == {
            c: (sum(1 for t in tasks if t.collection == c), sum(t.image_count or 0 for t in tasks if t.collection == c),
                sum(t.file_size or 0 for t in tasks if t.collection == c)) for c in "AB"}
    assert not (tmp_path / "plan.db").exists()      # scratch: gone with the run


def test_a_plan_table_starts_empty_over_what_a_killed_run_left(tmp_path: Path) -> None:
    (tmp_path / "plan.db").write_bytes(b"torn by a kill -9" * 100)
    (tmp_path / "plan.db-journal").write_bytes(b"x")
    with PlanTable(tmp_path / "plan.db") as table:
        assert len(table) == 0 and list(table.batches()) == []
        table.add([task(1)])
        assert [t.series_uid for t in table] == ["1.2.840.1"]
    assert not (tmp_path / "plan.db-journal").exists()


def test_the_streamed_plan_is_the_plan_in_memory(server, small_archive, tmp_path: Path) -> None:
    query = query_from_dict({"select": [{"collection": c} for c in normal_collections(small_archive)]},
                            origin="test", base_dir=tmp_path)
    config = test_config(server.base_url, tmp_path / "out")
    in_memory = anyio.run(aplan, query, config)

    async def stored() -> tuple[list[tuple[object, ...]], dict[str, object], int]:
        async with make_session(config) as session:
            source = make_source(config, session)
            assert isinstance(source, PlanInto)
            with PlanTable(tmp_path / "plan.db") as table:
                plan = await plan_into(source, query, table)
                assert plan.tasks == [] and plan.stored is table
                return [fields(t) for t in table], plan.to_dict(), plan.series

    got, totals, series = anyio.run(stored)
    assert got == [fields(t) for t in in_memory.tasks]
    assert totals == in_memory.to_dict() and series == len(in_memory.tasks) > 0


def test_a_harvest_plans_into_its_own_folder_and_leaves_no_plan_behind(server, small_archive, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / ".harvester").mkdir(parents=True)
    (out / ".harvester" / "plan.db").write_bytes(b"left by a run killed while it planned")
    name = normal_collections(small_archive)[0]
    query = query_from_dict({"select": [{"collection": name}]}, origin="test", base_dir=tmp_path)
    result = anyio.run(lambda: aharvest(query, test_config(server.base_url, out, workers=2)))
    assert result.ok and result.downloaded == len([r for r in small_archive.records() if r.row["Collection"] == name])
    assert not (out / ".harvester" / "plan.db").exists()
    assert [s["status"] for s in manifest(out)["series"]] == ["complete"] * result.downloaded
    again = anyio.run(lambda: aharvest(query, test_config(server.base_url, out)))
    assert again.ok and again.downloaded == 0 and again.skipped == result.downloaded


@pytest.mark.parametrize("kind", ["list", "stored"])
def test_the_engine_takes_a_list_or_a_stored_plan_larger_than_a_batch(tmp_path: Path, kind: str) -> None:
    from test_engine import FakeSource, fake_task  # the scripted source
    from harvester.config import Config
    from harvester.engine import Engine
    from harvester.errors import RetryableRequestError
    from harvester.events import Hub
    from harvester.store.state import HarvestState

    uids = [f"1.{i}" for i in range(BATCH * 2 + 10)]
    flaky = RetryableRequestError("HTTP 503 from http://x/getImage", status=503, url="http://x/getImage")
    source = FakeSource({uids[3]: [flaky, "ok"], uids[-1]: [flaky, flaky, "ok"]})
    out = tmp_path / "out"
    cfg = Config(out_dir=out, progress=False, quiet=True, backoff_base=0.001, backoff_max=0.002, workers=3,
                 series_retries=2)
    state = HarvestState(out)
    state.open()
    try:
        with PlanTable(tmp_path / "plan.db") as table:
            table.add(fake_task(u) for u in uids)
            tasks = table if kind == "stored" else [fake_task(u) for u in uids]
            result = anyio.run(lambda: Engine(cfg, source, state, Hub()).run(tasks, {}))
            assert result.ok and result.downloaded == len(uids)
            assert source.attempts == {u: {uids[3]: 2, uids[-1]: 3}.get(u, 1) for u in uids}
            assert source.peak == 3
            again = anyio.run(lambda: Engine(cfg, source, state, Hub()).run(tasks, {}))
            assert again.ok and again.downloaded == 0 and again.skipped == len(uids)
    finally:
        state.close()
    assert [r["SeriesInstanceUID"] for r in manifest(out)["series"]] == uids   # in the plan's order
    assert json.loads((out / "harvest.json").read_text())["totals"]["complete"] == len(uids)
