"""harvester: async, concurrent, resumable harvesting of public medical-imaging archives.

The public API (everything a notebook or pipeline needs; the CLI is a thin layer over it)::

    import harvester

    plan = harvester.plan({"select": [{"collection": "LIDC-IDRI", "modality": "CT"}]})
    print(plan.to_dict())                                   # series, images, bytes per collection
    result = harvester.harvest("query.yaml", "out/", workers=8, on_event=print)
    print(result.ok, result.totals, result.failed)
    harvester.verify("out/").problems                       # re-hash every file

    meta = harvester.MetadataClient()                       # the archive's query endpoints
    meta.series(Collection="LIDC-IDRI", dataframe=True)     # a DataFrame when pandas is installed

Async twins for asyncio/anyio code: ``aplan``, ``aharvest``, ``AsyncMetadataClient``,
``async_sync``, ``async_repair``.
"""
from harvester.api import (
    AsyncMetadataClient,
    MetadataClient,
    VerifyResult,
    aharvest,
    aplan,
    as_query,
    harvest,
    make_config,
    plan,
    repair,
    sync,
    to_dataframe,
    verify,
)
from harvester.config import AuthConfig, Config, Limits
from harvester.engine import HarvestResult
from harvester.errors import (
    AuthError,
    DiskFullError,
    FatalError,
    HarvesterError,
    ManifestError,
    SeriesError,
    UnknownSelectionError,
    UsageError,
)
from harvester.models import Plan, SeriesTask
from harvester.operations import RepairResult, SyncDiff, SyncResult, async_repair, async_sync
from harvester.events import Event
from harvester.query import Query, load_query, query_from_dict
from harvester.store.tree import read_status

__version__ = "0.1.0"

__all__ = [
    "AsyncMetadataClient", "AuthConfig", "AuthError", "Config", "DiskFullError", "Event", "FatalError",
    "HarvestResult", "HarvesterError", "Limits", "ManifestError", "MetadataClient", "Plan", "Query",
    "RepairResult", "SeriesError", "SeriesTask", "SyncDiff", "SyncResult", "UnknownSelectionError", "UsageError",
    "VerifyResult", "__version__", "aharvest", "aplan", "as_query", "async_repair", "async_sync", "harvest",
    "load_query", "make_config", "plan", "query_from_dict", "read_status", "repair", "sync", "to_dataframe",
    "verify",
]
