"""The public Python API: what notebooks, pipelines and the CLI use.

Async functions (``aplan``, ``aharvest``, ``async_sync``...) are for asyncio/anyio code; the
plain ones (``plan``, ``harvest``, ``verify``, ``sync``, ``repair``) work from scripts and also
from inside a running event loop such as Jupyter's (they then run on a private loop in a
worker thread and block until done). A query may be a ``Query``, a dict shaped like a query
manifest, or the path of a manifest, ``.tcia`` cart or UID list. Options are ``Config`` field
names (``api_url``, ``workers``, ``layout``, ``retries``, ...); an unknown option raises
``TypeError``. Nothing here reads argv or the environment.

Progress: pass ``on_event=callable`` to receive every ``harvester.progress.Event``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio

from harvester.config import Config
from harvester.containment import inside, open_nofollow
from harvester.engine import HarvestResult
from harvester.errors import UnsafePathError
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
from harvester.progress import Event, Hub
from harvester.source.nbia import NBIAClient, make_session
from harvester.store.state import HarvestState
from harvester.store.manifest import read_manifest


@dataclass
class VerifyResult:
    """What ``verify_tree`` found. ``ok`` only when every series the harvest planned is there and
    intact: none failed, unavailable or missing, no damaged file, no extra file."""

    out_dir: Path
    series: int = 0          # complete series whose files were re-hashed
    files: int = 0           # files re-hashed
    bytes: int = 0
    problems: list[str] = field(default_factory=list)   # one per damaged file: "<path>: <what>"
    intact: int = 0          # complete series with every file as recorded and nothing else
    failed: list[dict[str, Any]] = field(default_factory=list)       # records the harvest did not complete
    unavailable: list[dict[str, Any]] = field(default_factory=list)  # records the archive could not serve
    missing: int = 0         # planned series absent: all files gone, or never finished by the last run
    extra: list[str] = field(default_factory=list)      # files in series folders that no record lists
    damaged_series: int = 0  # complete series with damaged or extra files (but not all of them gone)

    @property
    def checked(self) -> int:
        """Series checked: every series harvest.json records, plus those the last run left unfinished."""
        return self.intact + len(self.failed) + len(self.unavailable) + self.missing + self.damaged_series

    @property
    def files_ok(self) -> bool:
        """Every file that is recorded complete is intact and no series folder holds anything else."""
        return not self.problems and not self.extra

    @property
    def ok(self) -> bool:
        return self.files_ok and not self.failed and not self.unavailable and not self.missing

    def summary(self) -> str:
        """``58 series checked: 53 intact, 5 failed, 0 missing, 0 damaged files, 1 extra file``."""
        def n(count: int, what: str) -> str:
            return f"{count} {what}{'' if count == 1 else 's'}"
        unavailable = f", {len(self.unavailable)} unavailable" if self.unavailable else ""
        return (f"{self.checked} series checked: {self.intact} intact, {len(self.failed)} failed{unavailable}, "
                f"{self.missing} missing, {n(len(self.problems), 'damaged file')}, {n(len(self.extra), 'extra file')}")


def verify_tree(out_dir: Path, *, on_file: Callable[[int], None] | None = None) -> VerifyResult:
    """Re-hash every file listed in ``out_dir/harvest.json`` (and in journal commits it does not
    list yet), look for files no record lists in the series folders, and count the series that
    are failed, unavailable or missing (blocking; run it in a thread). Reads only: nothing in
    ``out_dir`` is changed.

    A file path that is not strictly inside DIR, or reaches its file through a symbolic link, is
    a problem naming the record; it is never opened. Raises ``UsageError`` when there is no
    harvest.json, ``ManifestError`` when it is unreadable.
    """
    read_manifest(out_dir)   # UsageError when absent, ManifestError when unreadable (the state rebuilds those)
    # The journal holds commits that harvest.json (rewritten at checkpoints) may not list yet
    # after a kill -9: the records are what the next run would start from.
    state = HarvestState(out_dir)
    journal_problem: str | None = None
    try:
        state.read()   # harvest.json's usable records (the others are reported), then the journal's
    except UnsafePathError as exc:  # the journal is a link or not a regular file: never read
        journal_problem = str(exc)
    except OSError:
        pass  # an unreadable journal: what harvest.json lists is all there is to check
    series = list(state.records.values())
    result = VerifyResult(out_dir=out_dir)
    if journal_problem:
        result.problems.append(journal_problem)
    root = out_dir.resolve()
    complete = [rec for rec in series if isinstance(rec, dict) and rec.get("status") == "complete"]
    for rec in series:
        if not isinstance(rec, dict) or rec.get("status") == "complete":
            continue
        (result.unavailable if rec.get("status") == "unavailable" else result.failed).append(rec)
    # Every path a complete record lists, and every series folder: what the folders may hold.
    listed = {os.path.normpath(str(f.get("path", ""))) for rec in complete for f in _files(rec)}
    folders = {os.path.normpath(str(rec.get("path") or ".")) for rec in complete}
    for rec in complete:
        result.series += 1
        problems_before, files = len(result.problems), _files(rec)
        gone = 0
        for f in files:
            rel = str(f.get("path", ""))
            try:
                path = inside(out_dir, rel)
            except UnsafePathError as exc:
                where = state.origin(str(rec.get("SeriesInstanceUID")))
                result.problems.append(f"{where} ({rec.get('SeriesInstanceUID')}): {exc}")
                continue
            try:
                md5 = hashlib.md5()
                size = 0
                with open(path, "rb", opener=open_nofollow) as fh:
                    while chunk := fh.read(1 << 20):
                        md5.update(chunk)
                        size += len(chunk)
            except FileNotFoundError:
                gone += 1
                result.problems.append(f"{rel}: missing")
                continue
            except OSError as exc:
                result.problems.append(f"{rel}: unreadable ({exc.strerror})")
                continue
            result.files += 1
            result.bytes += size
            if on_file is not None:
                on_file(size)
            if size != f.get("size"):
                result.problems.append(f"{rel}: size {size}, expected {f.get('size')}")
            elif md5.hexdigest() != f.get("md5"):
                result.problems.append(f"{rel}: MD5 mismatch (series {rec.get('SeriesInstanceUID')})")
        extra = _extra_files(out_dir, root, str(rec.get("path") or ""), listed, folders)
        result.extra += extra
        if files and gone == len(files) and not extra:
            # The whole series is gone (its folder deleted): a missing series, not damaged files.
            del result.problems[problems_before:]
            result.missing += 1
        elif len(result.problems) > problems_before or extra:
            result.damaged_series += 1
        else:
            result.intact += 1
    # What harvest.json itself lists is read by other tools too (and the journal may have replaced
    # it for the next run): a path of it that leaves DIR is reported under its own origin as well.
    for index, rec in state.listed:
        if state.records.get(str(rec.get("SeriesInstanceUID"))) == rec:
            continue  # the same record was checked above, under the origin the next run reads it from
        for f in _files(rec):
            try:
                inside(out_dir, str(f.get("path", "")))
            except UnsafePathError as exc:
                result.problems.append(f"harvest.json series #{index} ({rec.get('SeriesInstanceUID')}): {exc}")
    # An interrupted run (kill -9, Ctrl-C, a fatal stop) leaves series it never finished.
    todo, finished = _last_run(state.journal_path)
    result.missing += max(0, todo - len(finished))
    return result


def _files(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The file entries of a record (harvest.json is not trusted to hold the right types)."""
    files = rec.get("files")
    return [f for f in files if isinstance(f, dict)] if isinstance(files, list) else []


def _extra_files(out_dir: Path, root: Path, folder: str, listed: set[str], folders: set[str]) -> list[str]:
    """Files under the series folder ``folder`` (relative to ``out_dir``) that no complete record
    lists; folders of other series inside it are theirs to check. Symlinks are reported, never
    followed, and a folder that leaves ``out_dir`` is not walked."""
    base = out_dir / folder
    if not folder or not base.resolve().is_relative_to(root) or base.is_symlink() or not base.is_dir():
        return []
    extra = []
    for dirpath, dirnames, filenames in os.walk(base):  # never follows a symlinked folder
        rel_dir = os.path.relpath(dirpath, out_dir)
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = sorted(d for d in dirnames if d not in links and os.path.join(rel_dir, d) not in folders)
        for name in sorted(filenames + links):
            rel = os.path.join(rel_dir, name)
            if rel not in listed:
                extra.append(rel)
    return extra


def _last_run(journal: Path) -> tuple[int, set[str]]:
    """How many series the last run set out to fetch (its ``run`` line's ``todo``), and the
    series it committed or recorded as failed after that line."""
    todo, finished = 0, set()
    try:
        fh = open(journal, "rb", opener=open_nofollow)
    except OSError:
        return 0, set()
    with fh:
        for line in fh:
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a torn last line from a kill -9
            if not isinstance(event, dict):
                continue
            if event.get("event") == "run":
                todo = event["todo"] if isinstance(event.get("todo"), int) else 0
                finished = set()
            elif event.get("event") in ("commit", "failed") and isinstance(event.get("series"), dict):
                finished.add(str(event["series"].get("SeriesInstanceUID")))
    return todo, finished


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
            on_event: Callable[[Event], None] | None = None, **options: Any) -> HarvestResult:
    """Synchronous ``aharvest``: plan and harvest ``query`` into ``out``."""
    return run_sync(lambda: aharvest(query, out, config=config, on_event=on_event, **options))


def verify(out: str | Path) -> VerifyResult:
    """Re-hash every file of a harvest against its harvest.json (``VerifyResult.problems``)."""
    return verify_tree(Path(out))


def sync(query: QueryLike, out: str | Path, *, prune: bool = False, dry_run: bool = False,
         config: Config | None = None, on_event: Callable[[Event], None] | None = None, **options: Any) -> Any:
    """Synchronous ``async_sync``: bring ``out`` up to date with ``query``."""
    q = as_query(query)
    cfg = make_config(q, config, out, **options)
    hub = Hub()
    if on_event is not None:
        hub.subscribe(on_event)
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
