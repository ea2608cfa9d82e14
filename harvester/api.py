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
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio

from harvester.config import Config
from harvester.containment import inside, open_nofollow, read_bytes
from harvester.engine import Engine, HarvestResult
from harvester.errors import ManifestError, UnsafePathError, UsageError
from harvester.layout import check_layout
from harvester.planner import Plan
from harvester.progress import Event, Hub
from harvester.query import Query, load_query, query_from_dict
from harvester.source.base import Source
from harvester.source.nbia import NBIAClient, NBIASource, make_session, redact_url
from harvester.state import HarvestState, usable_records


def make_source(config: Config, session: Any) -> Source:
    """The archive named by ``config.source``, on the given HTTP session."""
    if config.source == "dicomweb":
        from harvester.source.dicomweb import DICOMwebSource
        return DICOMwebSource(config, session)
    if config.source == "idc":
        from harvester.source.idc.source import IDCSource
        return IDCSource(config, session)
    if config.source == "auto":
        from harvester.source.auto import AutoSource
        return AutoSource(config, session)
    return NBIASource(NBIAClient(config, session))


QueryLike = Query | dict[str, Any] | str | Path


def as_query(query: QueryLike) -> Query:
    """A ``Query`` from a Query, a manifest-shaped dict, or a path. Raises ``ManifestError``."""
    if isinstance(query, Query):
        return query
    if isinstance(query, dict):
        return query_from_dict(query, origin="<dict>", base_dir=Path.cwd())
    if isinstance(query, (str, Path)):
        return load_query(query)
    raise TypeError(f"a query is a Query, a dict or a path, not {type(query).__name__}")


def make_config(query: Query | None = None, config: Config | None = None, out: str | Path | None = None,
                **options: Any) -> Config:
    """``config`` (or defaults, taking ``api``/``layout``/``source``/``url`` from the query) with
    ``out`` and ``options`` applied. Raises ``TypeError`` for an unknown option."""
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}; options are Config fields: {', '.join(sorted(fields))}")
    changes: dict[str, Any] = {}
    if config is None and query is not None:
        if query.source:
            changes["source"] = query.source
        if query.url or query.api:
            changes["api_url"] = (query.url or query.api or "").rstrip("/")
        if query.layout:
            changes["layout"] = query.layout
    if out is not None:
        changes["out_dir"] = Path(out)
    changes.update({k: v for k, v in options.items() if v is not None})
    if "api_url" in changes:
        changes["api_url"] = str(changes["api_url"]).rstrip("/")
    return dataclasses.replace(config or Config(), **changes)


async def aplan(query: QueryLike, config: Config | None = None, *, details: bool = True,
                **options: Any) -> Plan:
    """Expand ``query`` into the exact list of series tasks (``Plan.tasks``; totals in ``Plan.to_json()``).

    ``details=False`` skips the study and patient records of each task (two requests per
    collection on NBIA) when only the series and totals are wanted. Series of a cart or list
    that the archive does not give are in ``Plan.unavailable`` (with ``strict=True``: raises
    ``UnknownSelectionError``); selectors matching nothing are named in ``Plan.warnings``.
    """
    q = as_query(query)
    config = make_config(q, config, **options)
    async with make_session(config) as session:
        return await make_source(config, session).plan(q, details=details)


async def aharvest(query: QueryLike, out: str | Path | Config | None = None, *, config: Config | None = None,
                   hub: Hub | None = None, on_plan: Callable[[Plan], None] | None = None,
                   on_event: Callable[[Event], None] | None = None, **options: Any) -> HarvestResult:
    """Plan and harvest ``query`` into ``out`` (or ``config.out_dir``); resumable, see ``harvester.engine``.

    Returns a ``HarvestResult`` (``ok``, ``totals``, ``failed`` and ``unavailable`` with reasons,
    counters). Raises ``UsageError`` for bad input (with ``strict=True``, for a series of a cart or
    list that the archive does not give) and ``FatalError`` only before the harvest starts; a
    fatal stop during the harvest is reported in ``result.fatal`` with everything verified kept.
    """
    if isinstance(out, Config):  # aharvest(query, config) reads naturally too
        config, out = out, None
    query = as_query(query)
    config = make_config(query, config, out, **options)
    if query.annotations and not config.annotations:   # the cart or manifest asks for them
        config = dataclasses.replace(config, annotations=True)
    check_layout(config.layout)
    hub = hub or Hub()
    if on_event is not None:
        hub.subscribe(on_event)
    async with open_harvest(config) as (state, source):
        plan = await source.plan(query)
        if on_plan is not None:
            on_plan(plan)
        hub.emit(plan_event(plan))
        emit_warnings(hub, plan)
        return await harvest_plan(Engine(config, source, state, hub), plan, manifest_header(config, query, state))


async def harvest_plan(engine: Engine, plan: Plan, header: dict[str, Any],
                       refetch: frozenset[str] = frozenset()) -> HarvestResult:
    """Run ``plan`` on ``engine`` (see ``Engine.run``) after recording its unavailable series in the
    state (harvest.json lists them; the next run looks them up again); the result names them, and
    is not ``ok`` while any is. Shared by ``aharvest`` and ``harvester.mirror.async_sync``."""
    state = engine.state
    await anyio.to_thread.run_sync(state.mark_unavailable,
                                   [(u.series_uid, u.origin, u.reason) for u in plan.unavailable])
    result = await engine.run(plan.tasks, header, refetch=refetch)
    result.unavailable = [
        (u.series_uid, u.reason + ("; the copy already on disk is kept" if state.complete(u.series_uid) else ""))
        for u in plan.unavailable]
    return result


@contextlib.asynccontextmanager
async def open_harvest(config: Config) -> AsyncIterator[tuple[HarvestState, Source]]:
    """The output directory's state (opened and locked) and a source on one HTTP session; both
    closed on the way out. Shared by ``aharvest`` and ``harvester.mirror.async_sync``.

    The folders that this call created are removed again when no series was recorded and the
    block either raised (a wrong URL, an unknown collection, Ctrl-C...) or wrote no harvest.json
    (``sync --dry-run``), so that a first run that did nothing leaves no directory behind. Only
    what this run created goes, deepest first, and a folder only while it is empty: a directory
    that existed before is never touched, nor anything another run put beside DIR meanwhile.
    """
    created = _missing_folders(config.out_dir)
    state = HarvestState(config.out_dir)
    await anyio.to_thread.run_sync(state.open)
    raised = False
    try:
        async with make_session(config) as session:
            yield state, make_source(config, session)
    except BaseException:
        raised = True
        raise
    finally:
        if created and not state.records and (raised or not state.manifest_path.exists()):
            # Removed in place, not in a thread: this may run in a cancelled scope (Ctrl-C), where
            # an await would be cancelled too; with nothing recorded, there is little to remove.
            _remove_created(state, created)
        state.close()


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first (empty if ``path``
    exists): the folders a run into ``path`` creates."""
    path = path.absolute()
    missing = []
    while not os.path.lexists(path) and path.parent != path:
        missing.append(path)
        path = path.parent
    return missing


def _remove_created(state: HarvestState, created: list[Path]) -> None:
    """Undo a first run that recorded nothing: DIR's own files (``.harvester``, under the lock
    this run holds, and the manifests it wrote), then each folder in ``created`` while it is
    empty. Whatever else appeared inside them (another harvest next to DIR) stays."""
    shutil.rmtree(state.meta_dir, ignore_errors=True)   # never follows a link (refused on open anyway)
    for name in (state.manifest_path.name, "metadata.csv"):
        with contextlib.suppress(OSError):
            (state.out_dir / name).unlink()
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return   # not empty, or not ours to remove: nor are its parents


def manifest_header(config: Config, query: Query, state: HarvestState) -> dict[str, Any]:
    """What harvest.json records about the run: archive (without credentials), query, layout,
    and the last sync, kept from the state so a plain ``run`` does not forget it."""
    header = {"api_url": redact_url(config.api_url), "query": query.to_json(), "layout": config.layout}
    if state.header.get("last_sync"):
        header["last_sync"] = state.header["last_sync"]
    return header


def plan_event(plan: Plan) -> Event:
    totals = plan.to_json()
    return Event("plan", data={"series": totals["series"], "bytes": totals["bytes"],
                               "unavailable": len(plan.unavailable)})


def emit_warnings(hub: Hub, plan: Plan) -> None:
    """One "warning" event per warning of the plan (each is said once per plan)."""
    for warning in plan.warnings:
        hub.emit(Event("warning", message=warning))


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
    manifest = out_dir / "harvest.json"
    try:
        doc = json.loads(read_bytes(manifest))   # never through a link, never blocked on a FIFO
        if not isinstance(doc["series"], list):
            raise TypeError
    except FileNotFoundError:
        raise UsageError(f"{manifest}: not found", hint="verify takes the output directory of a harvest") from None
    except (ValueError, KeyError, TypeError, OSError, RecursionError):
        raise ManifestError(f"{manifest}: unreadable or not a harvester manifest") from None
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
                result.problems.append(f"{manifest.name} series #{index} ({rec.get('SeriesInstanceUID')}): {exc}")
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
    """Synchronous ``harvester.mirror.async_sync``: bring ``out`` up to date with ``query``."""
    from harvester.mirror import async_sync

    q = as_query(query)
    cfg = make_config(q, config, out, **options)
    hub = Hub()
    if on_event is not None:
        hub.subscribe(on_event)
    return run_sync(lambda: async_sync(q, cfg, prune=prune, dry_run=dry_run, hub=hub))


def repair(out: str | Path, *, config: Config | None = None, **options: Any) -> Any:
    """Synchronous ``harvester.mirror.async_repair``: refetch what fails verification."""
    from harvester.mirror import async_repair

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
