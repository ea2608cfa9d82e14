"""The run's budget of whole objects in memory (``harvester.source.idc.budget``): the bound, its
order, cancellation, and that a series gives back what it held however it ends (end to end
against moto, through the fault proxy)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web

from harvester.query import query_from_dict
from harvester.source.http import make_session
from harvester.source.idc import s3 as idc_s3
from harvester.source.idc.budget import ByteBudget, SeriesShare
from harvester.source.idc.source import IDCSource
from harvester.store.sink import StoreSinks

from .conftest import Cohort, Moto, S3Proxy, write_index
from .test_harvest import assert_bucket_identical, idc_config
from .test_hostile import one_series


@pytest.mark.anyio
async def test_the_budget_is_never_exceeded_and_waiters_go_in_order() -> None:
    budget = ByteBudget(100)
    order: list[str] = []

    async def take(name: str, n: int) -> None:
        await budget.acquire(n)
        order.append(name)

    assert await budget.acquire(70) == 70
    async with anyio.create_task_group() as tg:
        tg.start_soon(take, "big", 60)       # waits: 30 free
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(take, "small", 10)     # would fit, but the big one was first
        await anyio.wait_all_tasks_blocked()
        assert order == [] and budget.free == 30
        budget.release(70)
    assert order == ["big", "small"] and budget.free == 30


@pytest.mark.anyio
async def test_the_series_that_started_first_is_served_first() -> None:
    budget = ByteBudget(100)
    first, second = SeriesShare(budget), SeriesShare(budget)
    order: list[str] = []

    async def take(name: str, share: SeriesShare, n: int) -> None:
        await share.take(n)
        order.append(name)

    held = await second.take(100)
    async with anyio.create_task_group() as tg:
        tg.start_soon(take, "second again", second, 50)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(take, "first", first, 60)   # later, but of the series started earlier
        await anyio.wait_all_tasks_blocked()
        assert order == []
        second.give_back(held)
        await anyio.wait_all_tasks_blocked()
        assert order == ["first"] and budget.free == 40   # 50 do not fit: the second series waits
        first.close()
    assert order == ["first", "second again"] and budget.free == 50
    second.close()
    assert budget.free == 100


@pytest.mark.anyio
async def test_an_object_larger_than_the_budget_waits_to_go_alone() -> None:
    budget = ByteBudget(100)
    held = await budget.acquire(1)
    got: list[int] = []

    async def huge() -> None:
        got.append(await budget.acquire(1000))

    async with anyio.create_task_group() as tg:
        tg.start_soon(huge)
        await anyio.wait_all_tasks_blocked()
        assert got == []
        budget.release(held)
    assert got == [100] and budget.free == 0
    budget.release(100)
    assert budget.free == 100


@pytest.mark.anyio
async def test_a_cancelled_wait_takes_nothing_and_lets_the_next_go() -> None:
    budget = ByteBudget(100)
    await budget.acquire(50)
    got: list[str] = []
    scope = anyio.CancelScope()

    async def take(name: str, n: int, within: anyio.CancelScope | None = None) -> None:
        with within or anyio.CancelScope():
            await budget.acquire(n)
            got.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(take, "big", 90, scope)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(take, "next", 40)   # fits, but waits behind the big one
        await anyio.wait_all_tasks_blocked()
        assert got == []
        scope.cancel()
    assert got == ["next"] and budget.free == 10


@pytest.mark.anyio
async def test_a_series_gives_back_what_it_still_holds_when_it_ends() -> None:
    budget = ByteBudget(100)
    with pytest.raises(RuntimeError):
        with SeriesShare(budget).open() as share:
            await share.take(30)
            await share.take(30)
            share.give_back(30)
            assert budget.free == 70
            raise RuntimeError("the series failed with an object still waiting for the writer")
    assert budget.free == 100


def test_a_budget_smaller_than_one_object_still_harvests_everything(cohort: Cohort, proxy: S3Proxy, tmp_path: Path,
                                                                    monkeypatch: Any) -> None:
    """Every object alone in memory (the budget clamps a larger one to the whole budget), with
    faults on: the same byte-identical tree."""
    from harvester.api import aharvest

    monkeypatch.setattr(idc_s3, "OBJECT_BYTES_IN_FLIGHT", 1)
    proxy.set_faults("error=0.1,reset=0.1,truncate=0.1,seed=7")
    out = tmp_path / "out"
    query = query_from_dict({"select": [{"collection": "IDC-Alpha"}, {"collection": "idc_beta"}]})
    result = anyio.run(aharvest, query, idc_config(proxy.url, out, cohort.index, retries=10))
    assert result.ok, result.failed
    assert_bucket_identical(out, cohort, [s.uid for s in cohort.series])


def test_a_failed_series_gives_its_budget_back(moto: Moto, proxy: S3Proxy, tmp_path: Path) -> None:
    """A series that fails on a corrupt object while another of its objects is arriving (held
    unanswered: the writer raised, the lanes were cancelled): the budget is whole again, and the
    next series, fetched by the same client, is not starved of it."""
    bad, _ = one_series(moto, tmp_path, 41)
    good, _ = one_series(moto, tmp_path / "good", 42)
    index = write_index(tmp_path / "both" / "idc_index.parquet", [bad.row, good.row])
    key, held = list(bad.objects)[:2]

    def corrupt(request: web.Request) -> web.StreamResponse | None:
        if request.path.endswith(key):
            data = bytearray(bad.objects[key])
            data[-1] ^= 0xFF
            return web.Response(body=bytes(data))
        return None

    proxy.override = corrupt
    proxy.hold = held   # its GET holds its bytes of the budget until the failure cancels it
    config = idc_config(proxy.url, tmp_path / "out", index, retries=1)

    async def fetch() -> tuple[list[str], int, int]:
        async with make_session(config) as session:
            source = IDCSource(config, session)
            plan = await source.plan(query_from_dict({"select": [{"series": [bad.uid, good.uid]}]}))
            outcomes = []
            for n, task in enumerate(sorted(plan.tasks, key=lambda t: t.series_uid != bad.uid)):
                staging = tmp_path / f"staging{n}"
                try:
                    got = await source.fetch_series(task, partial=tmp_path / "p", staging=staging,
                                                    on_bytes=lambda n: None, rate=None,
                                                    sinks=StoreSinks(config.limits))
                    outcomes.append(f"{len(got.files)} files")
                except Exception as exc:   # noqa: BLE001 - the failure is the point
                    outcomes.append(str(exc))
            return outcomes, source.client.budget.free, source.client.budget.total

    outcomes, free, total = anyio.run(fetch)
    assert "does not match its ETag" in outcomes[0]
    assert outcomes[1] == f"{len(good.objects)} files"
    assert free == total
