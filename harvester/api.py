"""The public Python API: what notebooks, pipelines and the CLI use.

Async functions (``aplan``, ``aharvest``, ``async_sync``...) are for asyncio/anyio code; the
plain ones (``plan``, ``harvest``, ``verify``, ``sync``, ``repair``) work from scripts and also
from inside a running event loop such as Jupyter's (they then run on a private loop in a
worker thread and block until done). A query may be a ``Query``, a dict shaped like a query
manifest, or the path of a manifest, ``.tcia`` cart or UID list. Options are ``Config`` field
names (``api_url``, ``workers``, ``layout``, ``retries``, ...); an unknown option raises
``TypeError``. Nothing here reads argv or the environment.

Progress: pass ``on_event=callable`` to receive every ``harvester.events.Event``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio

from harvester import cluster as cluster_harvest
from harvester.config import Config
from harvester.engine import HarvestResult
from harvester.models import Plan
from harvester.operations import (
    QueryLike,
    RepairResult,
    SyncDiff,
    SyncResult,
    aharvest,
    aplan,
    as_query,
    async_repair,
    async_sync,
    make_config,
    make_source,
)
from harvester.events import Event, Hub
from harvester.source.nbia import NBIAClient, make_session
from harvester.store.tree import VerifyResult, verify_tree


T = TypeVar("T")


def run_sync(fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async function to completion from synchronous code.

    Without a running event loop: ``anyio.run``. Inside one (Jupyter, an async framework):
    on a private loop in a worker thread, blocking the caller until done, so the caller's
    loop is never re-entered.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.run(fn)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="harvester") as pool:
        return pool.submit(anyio.run, fn).result()


def plan(query: QueryLike, config: Config | None = None, **options: Any) -> Plan:
    """Synchronous ``aplan``."""
    return run_sync(lambda: aplan(query, config, **options))


def harvest(query: QueryLike, out: str | Path | None = None, *, config: Config | None = None,
            on_event: Callable[[Event], None] | None = None, cluster: str | None = None,
            **options: Any) -> HarvestResult:
    """Synchronous ``aharvest``: plan and harvest ``query`` into ``out``; with ``cluster``
    (``local:N`` or ``tcp://host:8786``) on Dask distributed (``harvester.cluster``)."""
    if cluster is not None:
        cluster_harvest.require_dask()
        return run_sync(lambda: cluster_harvest.aharvest(query, out, config=config, on_event=on_event,
                                                         cluster=cluster, **options))
    return run_sync(lambda: aharvest(query, out, config=config, on_event=on_event, **options))


def verify(out: str | Path) -> VerifyResult:
    """Re-hash every file of a harvest against its records (``VerifyResult.problems``)."""
    return verify_tree(Path(out))


def sync(query: QueryLike, out: str | Path, *, prune: bool = False, dry_run: bool = False,
         config: Config | None = None, on_event: Callable[[Event], None] | None = None, cluster: str | None = None,
         **options: Any) -> Any:
    """Synchronous ``async_sync``: bring ``out`` up to date with ``query``; ``cluster`` as for ``harvest``."""
    q = as_query(query)
    cfg = make_config(q, config, out, **options)
    hub = Hub()
    if on_event is not None:
        hub.subscribe(on_event)
    if cluster is not None:
        cluster_harvest.require_dask()
        return run_sync(lambda: cluster_harvest.async_sync(q, cfg, prune=prune, dry_run=dry_run, hub=hub,
                                                           cluster=cluster))
    return run_sync(lambda: async_sync(q, cfg, prune=prune, dry_run=dry_run, hub=hub))


def repair(out: str | Path, *, config: Config | None = None, **options: Any) -> Any:
    """Synchronous ``async_repair``: refetch what fails verification."""
    cfg = make_config(None, config, out, **options)
    return run_sync(lambda: async_repair(cfg))


def to_dataframe(rows: list[dict[str, Any]]) -> Any:
    """Rows as a pandas DataFrame; pandas is optional and only imported here."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("to_dataframe needs pandas: pip install pandas (harvester itself does not)") from None
    return pd.DataFrame(rows)


class AsyncMetadataClient:
    """The archive's query endpoints as plain records, for asyncio/anyio code::

        async with AsyncMetadataClient(api_url) as meta:
            rows = await meta.series(Collection="LIDC-IDRI", Modality="CT")

    Parameter names are the API's own (case-sensitive); unknown ones raise ``UsageError``.
    """

    def __init__(self, api_url: str | None = None, *, config: Config | None = None, **options: Any) -> None:
        self.config = make_config(None, config, None, **({"api_url": api_url} if api_url else {}), **options)
        self._session: Any = None
        self._client: NBIAClient | None = None

    async def __aenter__(self) -> AsyncMetadataClient:
        self._session = make_session(self.config)
        self._client = NBIAClient(self.config, self._session)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        self._session = self._client = None

    async def query(self, endpoint: str, **params: Any) -> list[dict[str, Any]]:
        if self._client is None:
            async with self:
                return await self.query(endpoint, **params)
        return await self._client.query(endpoint, params)

    async def collections(self) -> list[str]:
        return sorted({str(r["Collection"]) for r in await self.query("getCollectionValues") if r.get("Collection")})

    async def modalities(self, **params: Any) -> list[dict[str, Any]]:
        return await self.query("getModalityValues", **params)

    async def body_parts(self, **params: Any) -> list[dict[str, Any]]:
        return await self.query("getBodyPartValues", **params)

    async def manufacturers(self, **params: Any) -> list[dict[str, Any]]:
        return await self.query("getManufacturerValues", **params)

    async def patients(self, **params: Any) -> list[dict[str, Any]]:
        return await self.query("getPatient", **params)

    async def studies(self, **params: Any) -> list[dict[str, Any]]:
        return await self.query("getPatientStudy", **params)

    async def series(self, **params: Any) -> list[dict[str, Any]]:
        return await self.query("getSeries", **params)

    async def updated_series(self, fromDate: str) -> list[dict[str, Any]]:  # noqa: N803 - the API's name
        return await self.query("getUpdatedSeries", fromDate=fromDate)

    async def series_size(self, SeriesInstanceUID: str) -> list[dict[str, Any]]:  # noqa: N803
        return await self.query("getSeriesSize", SeriesInstanceUID=SeriesInstanceUID)

    async def sop_instance_uids(self, SeriesInstanceUID: str) -> list[dict[str, Any]]:  # noqa: N803
        return await self.query("getSOPInstanceUIDs", SeriesInstanceUID=SeriesInstanceUID)


class MetadataClient:
    """Synchronous twin of ``AsyncMetadataClient`` (works in plain scripts and in Jupyter).

    Every method also takes ``dataframe=True`` to get a pandas DataFrame instead of records.
    """

    def __init__(self, api_url: str | None = None, *, config: Config | None = None, **options: Any) -> None:
        self._async = AsyncMetadataClient(api_url, config=config, **options)

    def _call(self, name: str, dataframe: bool, *args: Any, **params: Any) -> Any:
        async def go() -> Any:
            async with AsyncMetadataClient(config=self._async.config) as meta:
                return await getattr(meta, name)(*args, **params)

        rows = run_sync(go)
        return to_dataframe(rows) if dataframe else rows

    def query(self, endpoint: str, *, dataframe: bool = False, **params: Any) -> Any:
        return self._call("query", dataframe, endpoint, **params)

    def collections(self) -> list[str]:
        return self._call("collections", False)

    def modalities(self, *, dataframe: bool = False, **params: Any) -> Any:
        return self._call("modalities", dataframe, **params)

    def body_parts(self, *, dataframe: bool = False, **params: Any) -> Any:
        return self._call("body_parts", dataframe, **params)

    def manufacturers(self, *, dataframe: bool = False, **params: Any) -> Any:
        return self._call("manufacturers", dataframe, **params)

    def patients(self, *, dataframe: bool = False, **params: Any) -> Any:
        return self._call("patients", dataframe, **params)

    def studies(self, *, dataframe: bool = False, **params: Any) -> Any:
        return self._call("studies", dataframe, **params)

    def series(self, *, dataframe: bool = False, **params: Any) -> Any:
        return self._call("series", dataframe, **params)

    def updated_series(self, fromDate: str, *, dataframe: bool = False) -> Any:  # noqa: N803
        return self._call("updated_series", dataframe, fromDate)

    def series_size(self, SeriesInstanceUID: str) -> Any:  # noqa: N803
        return self._call("series_size", False, SeriesInstanceUID)

    def sop_instance_uids(self, SeriesInstanceUID: str, *, dataframe: bool = False) -> Any:  # noqa: N803
        return self._call("sop_instance_uids", dataframe, SeriesInstanceUID)


#: the facade: the composition of ``harvester.operations`` and the synchronous twins defined here
__all__ = ["AsyncMetadataClient", "MetadataClient", "QueryLike", "RepairResult", "SyncDiff", "SyncResult",
           "VerifyResult", "aharvest", "aplan", "as_query", "async_repair", "async_sync", "harvest", "make_config",
           "make_source", "plan", "repair", "run_sync", "sync", "to_dataframe", "verify", "verify_tree"]
