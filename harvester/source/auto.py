"""``source: auto``: plan with NBIA, then take each series from IDC's buckets when the IDC index
has the same SeriesInstanceUID with the same instance count, and from NBIA otherwise (NLST,
restricted, or newer than the index).

The plan is NBIA's, exactly as the manifest says (carts, collections, UID lists, unavailable
series, warnings); the IDC index is then asked for the planned UIDs only. A series taken from
IDC keeps NBIA's row and gains IDC's location (``crdc_series_uuid``, ``aws_bucket``) and
``source: idc``, its size becomes IDC's (what its objects hold, exact to the byte); the others
get ``source: nbia``. harvest.json records that field with each series (``metadata.source``).

Raises what ``NBIASource`` and ``IDCSource`` raise.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from harvester.concurrency import ConnectionController
from harvester.config import Config
from harvester.models import Plan, SeriesTask
from harvester.query import Query, Selector
from harvester.source.base import Sinks
from harvester.source.idc import index as idc_index
from harvester.source.idc.source import IDCSource
from harvester.source.nbia import NBIAClient, NBIASource
from harvester.models import UnpackedSeries

#: What an IDC row adds to NBIA's row of the same series.
IDC_FIELDS = ("collection_id", "crdc_series_uuid", "aws_bucket", "source_DOI")


class AutoSource:
    """NBIA's plan, each series fetched from IDC or NBIA (see the module docstring)."""

    def __init__(self, config: Config, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.nbia = NBIASource(NBIAClient(config, session))
        self.idc = IDCSource(config, session)

    @property
    def download_limiter(self) -> anyio.CapacityLimiter | None:
        """Set by the engine, as for NBIA: the NBIA source holds it while its ZIP streams, an IDC
        series for its whole fetch (its GETs are its download)."""
        return self.nbia.download_limiter

    @download_limiter.setter
    def download_limiter(self, limiter: anyio.CapacityLimiter | None) -> None:
        self.nbia.download_limiter = limiter

    @property
    def connections(self) -> ConnectionController | None:
        """Set by the engine, as for NBIA (an IDC series does not use it)."""
        return self.nbia.connections

    @connections.setter
    def connections(self, controller: ConnectionController | None) -> None:
        self.nbia.connections = controller

    @property
    def requests(self) -> int:
        return self.nbia.requests + self.idc.requests

    @property
    def retries(self) -> int:
        return self.nbia.retries + self.idc.retries

    @property
    def on_retry(self) -> Callable[[BaseException], None] | None:
        return self.nbia.on_retry

    @on_retry.setter
    def on_retry(self, fn: Callable[[BaseException], None] | None) -> None:
        self.nbia.on_retry = self.idc.on_retry = fn

    async def plan(self, query: Query, *, details: bool = True) -> Plan:
        plan = await self.nbia.plan(query, details=details)
        path = Path(self.config.idc_index) if self.config.idc_index else idc_index.default_index()
        wanted = Query(selectors=(Selector(origin="auto", series=tuple(t.series_uid for t in plan.tasks)),))
        found = await anyio.to_thread.run_sync(idc_index.select, path, wanted) if plan.tasks else None
        in_idc = {r["SeriesInstanceUID"]: r for r in found.rows} if found else {}
        plan.tasks = [self._choose(t, in_idc.get(t.series_uid)) for t in plan.tasks]
        return plan

    @staticmethod
    def _choose(task: SeriesTask, idc_row: dict[str, Any] | None) -> SeriesTask:
        if idc_row is None or task.image_count is None or idc_row["ImageCount"] != task.image_count:
            return dataclasses.replace(task, row={**task.row, "source": "nbia"})
        row = {**task.row, "source": "idc", **{k: idc_row[k] for k in IDC_FIELDS if k in idc_row}}
        return dataclasses.replace(task, row=row, file_size=idc_row["FileSize"])

    async def fetch_series(self, task: SeriesTask, *, partial: Path, staging: Path,
                           on_bytes: Callable[[int], None], rate: Any, sinks: Sinks) -> UnpackedSeries:
        if task.row.get("source") != "idc":
            return await self.nbia.fetch_series(task, partial=partial, staging=staging, on_bytes=on_bytes,
                                                rate=rate, sinks=sinks)
        async with self.download_limiter or contextlib.nullcontext():
            return await self.idc.fetch_series(task, partial=partial, staging=staging, on_bytes=on_bytes, rate=rate,
                                               sinks=sinks)
