"""Composition: open a harvest, plan and harvest a query, sync a tree with a query, repair it.

Everything here joins the parts (a source from ``harvester.source``, the engine, the state of
``harvester.store.state``) and adds no rule of its own; ``harvester.api`` is the facade over it.

* ``aplan``/``aharvest``: plan a query; plan and harvest it into an output directory
  (resumable, see ``harvester.engine``). ``open_harvest`` is the state and the source of one run.
* ``make_source``: the archive harvest.json or the config names (``config.source``).
* ``async_sync``: plan the query now, compare with ``harvest.json``, and fetch what is new,
  what changed on the server (ImageCount or FileSize differ, or the source's update feed lists
  it since the last successful sync) and what is missing or failed.
  With ``prune``, series no longer selected move to ``DIR/.harvester/trash/``. ``dry_run``
  only reports the difference. A changed series keeps its old copy until the new one is
  verified (``HarvestState.commit`` swaps them atomically).
* ``async_repair``: re-hash every file; refetch only the bad instances when the source can fetch
  one instance alone (``SingleInstanceFetch``), and the whole series otherwise or when an
  instance cannot be repaired alone. A series recorded failed, or whose files are all gone (its
  folder deleted), is refetched whole; all of it from the archive harvest.json records
  (``recorded_config``). A file whose recorded path is not strictly inside DIR
  (``../x``, absolute, through a link) is refused and reported (``RepairResult.refused``),
  never created or replaced.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import os
import re
import shutil
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from harvester.config import Config
from harvester.containment import inside, open_dir, open_nofollow
from harvester.dates import parse_archive_date
from harvester.engine import Engine, HarvestResult
from harvester.errors import DiskFullError, HarvesterError, RequestError, UnsafePathError, UsageError
from harvester.store.layout import check_layout
from harvester.models import Plan, SeriesRecord, SeriesTask, TaskStore
from harvester.display import api_hub
from harvester.events import Event, Hub, human_bytes
from harvester.query import Query, load_query, query_from_dict
from harvester.selection import empty_selectors
from harvester.source.auto import AutoSource
from harvester.source.base import PlanInto, SingleInstanceFetch, Source, UpdateFeed
from harvester.source.dicomweb import DICOMwebSource
from harvester.source.http import as_int, make_session, redact_url
from harvester.source.idc.source import IDCSource
from harvester.source.nbia import NBIAClient, NBIASource
from harvester.store.plan import PlanTable, plan_path
from harvester.store.shards import merge_leftovers
from harvester.store.state import HarvestState
from harvester.store.sink import RepairFile
from harvester.store.manifest import read_manifest, recorded_source
from harvester.unpack import read_dicom_ids


def make_source(config: Config, session: Any) -> Source:
    """The archive named by ``config.source``, on the given HTTP session."""
    if config.source == "dicomweb":
        return DICOMwebSource(config, session)
    if config.source == "idc":
        return IDCSource(config, session)
    if config.source == "auto":
        return AutoSource(config, session)
    return NBIASource(NBIAClient(config, session))


QueryLike = Query | dict[str, Any] | str | Path
#: what makes the engine of a run from its config, source, state and hub (``Engine`` itself by default)
EngineFactory = Callable[[Config, Source, HarvestState, Hub], Engine]


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
    return check_config(dataclasses.replace(config or Config(), **changes))


#: Config fields that are counts, and the least each may be (the CLI's --workers, --retries... limits)
_COUNTS = {"workers": 1, "connections": 1, "plan_concurrency": 1, "retries": 1, "series_retries": 0,
           "chunk_size": 1}


def check_config(config: Config) -> Config:
    """``config`` when its counts, rate and timeouts are ones the CLI accepts too. Raises
    ``UsageError`` naming the option (``workers=0``: at least 1), as the CLI refuses it (exit 2)."""
    for name, least in _COUNTS.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UsageError(f"{name}={value!r}: must be a whole number of at least {least}")
    if config.max_rate is not None and (isinstance(config.max_rate, bool) or not isinstance(config.max_rate, int)
                                        or config.max_rate < 1):
        raise UsageError(f"max_rate={config.max_rate!r}: must be a number of bytes/s of at least 1, or None")
    for name in ("read_timeout", "connect_timeout"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UsageError(f"{name}={value!r}: must be a number of seconds above 0")
    return config


async def aplan(query: QueryLike, config: Config | None = None, *, details: bool = True,
                **options: Any) -> Plan:
    """Expand ``query`` into the exact list of series tasks (``Plan.tasks``; totals in ``Plan.to_dict()``, as JSON text ``Plan.to_json()``).

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
                   on_event: Callable[[Event], None] | None = None, engine: EngineFactory = Engine,
                   **options: Any) -> HarvestResult:
    """Plan and harvest ``query`` into ``out`` (or ``config.out_dir``; one of them must be given);
    resumable, see ``harvester.engine``.

    Returns a ``HarvestResult`` (``ok``, ``totals``, ``failed`` and ``unavailable`` with reasons,
    counters). Raises ``UsageError`` for bad input (no directory, ``workers=0`` and the other
    arguments the CLI refuses, see ``check_config``; with ``strict=True``, for a series of a cart or
    list that the archive does not give) and ``FatalError`` only before the harvest starts; a
    fatal stop during the harvest is reported in ``result.fatal`` with everything verified kept.
    ``engine`` makes the engine that runs the plan (``harvester.cluster`` passes one that runs it
    on a Dask cluster).
    """
    if isinstance(out, Config):  # aharvest(query, config) reads naturally too
        config, out = out, None
    if out is None and config is None:
        # never a directory the caller did not name (the default ./harvest, in whatever the cwd is)
        raise UsageError("harvest needs an output directory", hint="give it: harvest(query, 'out/')")
    query = as_query(query)
    layout_given = config is not None or options.get("layout") is not None or bool(query.layout)
    config = make_config(query, config, out, **options)
    if not layout_given:
        config = dataclasses.replace(config, layout=None)   # the directory's, see ``resume_layout``
    if query.annotations and not config.annotations:   # the cart or manifest asks for them
        config = dataclasses.replace(config, annotations=True)
    if config.layout is not None:
        check_layout(config.layout)
    hub = hub or api_hub(config.progress, config.quiet)   # a live line in a notebook, nothing elsewhere
    if on_event is not None:
        hub.subscribe(on_event)
    async with open_harvest(config, recover=False) as (state, source):
        with PlanTable(plan_path(state.meta_dir)) as table:
            try:
                config = resume_layout(config, state.header)
                check_same_harvest(config, state.header)
            except BaseException:
                await anyio.to_thread.run_sync(state.recover)   # as open would have, before anything else
                raise
            plan = await plan_while_recovering(state, source, query, table)
            if on_plan is not None:
                on_plan(plan)
            hub.emit(plan_event(plan))
            emit_warnings(hub, plan)
            return await harvest_plan(engine(config, source, state, hub), plan,
                                      manifest_header(config, query, state))


async def plan_while_recovering(state: HarvestState, source: Source, query: Query, table: TaskStore) -> Plan:
    """``plan_into`` while ``state`` makes its pass over every series (``HarvestState.recover``,
    a stat of every recorded file: seconds at a million files) in a thread of its own: the two
    wait on different things (the archive, the disk). Returns when both are done; raises what
    the plan raised, else what the recovery raised."""
    failed: list[BaseException] = []

    def recover() -> None:
        try:
            state.recover()
        except BaseException as exc:   # noqa: BLE001 - re-raised below, in the caller's task
            failed.append(exc)

    thread = threading.Thread(target=recover, name="harvester-recover", daemon=True)
    thread.start()
    try:
        plan = await plan_into(source, query, table)
    finally:
        with anyio.CancelScope(shield=True):   # the state is used by no one else until it is done
            await anyio.to_thread.run_sync(thread.join)
    if failed:
        raise failed[0]
    return plan


async def plan_into(source: Source, query: Query, table: TaskStore) -> Plan:
    """``source``'s plan of ``query`` with its tasks in ``table`` (``Plan.stored``): written as
    the planner makes them by a source that can (``PlanInto``), else planned into a list, then
    stored and the list let go. Raises as ``Source.plan``."""
    if isinstance(source, PlanInto):
        return await source.plan_into(query, table)
    plan = await source.plan(query)
    tasks, plan.tasks = plan.tasks, []
    await anyio.to_thread.run_sync(table.add, tasks)
    plan.stored = table
    return plan


async def harvest_plan(engine: Engine, plan: Plan, header: dict[str, Any],
                       refetch: frozenset[str] = frozenset()) -> HarvestResult:
    """Run ``plan`` on ``engine`` (see ``Engine.run``) after recording its unavailable series in the
    state (harvest.json lists them; the next run looks them up again); the result names them, and
    is not ``ok`` while any is. Shared by ``aharvest`` and ``async_sync``.

    First the shards a killed cluster client left in DIR are merged (``merge_leftovers``), so a
    run of either kind skips what they committed."""
    state = engine.state
    _, left = await anyio.to_thread.run_sync(merge_leftovers, state)
    for line in left:
        engine.hub.emit(Event("warning", message=line))
    if engine.config.space_check:
        await anyio.to_thread.run_sync(check_free_space, engine.config, state, plan, refetch)
    await anyio.to_thread.run_sync(state.mark_unavailable,
                                   [(u.series_uid, u.origin, u.reason) for u in plan.unavailable])
    result = await engine.run(plan.stored if plan.stored is not None else plan.tasks, header, refetch=refetch)
    result.unavailable = [
        (u.series_uid, u.reason + ("; the copy already on disk is kept" if state.complete(u.series_uid) else ""))
        for u in plan.unavailable]
    return result


@contextlib.asynccontextmanager
async def open_harvest(config: Config, *, recover: bool = True) -> AsyncIterator[tuple[HarvestState, Source]]:
    """The output directory's state (opened and locked) and a source on one HTTP session; both
    closed on the way out. Shared by ``aharvest`` and ``async_sync``. ``recover=False``: the
    state's pass over every series is the caller's (``plan_while_recovering``).

    The folders that this call created are removed again when no series was recorded and the
    block either raised (a wrong URL, an unknown collection, Ctrl-C...) or wrote no harvest.json
    (``sync --dry-run``), so that a first run that did nothing leaves no directory behind. Only
    what this run created goes, deepest first, and a folder only while it is empty: a directory
    that existed before is never touched, nor anything another run put beside DIR meanwhile.
    """
    created = _missing_folders(config.out_dir)
    state = HarvestState(config.out_dir)
    raised = False
    try:
        # Inside the try: a Ctrl-C while the state opens in its thread is delivered when that
        # thread is done (it is not abandoned), i.e. by this await, and the folders this call
        # created must still go. Only under our own lock: a run that found DIR locked by another
        # (two first runs at once) removes nothing of the other's.
        await anyio.to_thread.run_sync(functools.partial(state.open, recover=recover))
        async with make_session(config) as session:
            yield state, make_source(config, session)
    except BaseException:
        raised = True
        raise
    finally:
        if (created and state.locked and not state.records and (raised or not state.manifest_path.exists())
                and not _kept_instances(state)):
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


def _kept_instances(state: HarvestState) -> bool:
    """Whether a series' verified instances are kept for a resume (``.harvester/instances/``): a
    first run interrupted in its first large series recorded no series, but its rerun continues
    from them, so the folder is not undone."""
    try:
        with os.scandir(state.meta_dir / "instances") as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    with os.scandir(entry.path) as files:
                        if any(True for _ in files):
                            return True
    except OSError:
        pass
    return False


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
    """What harvest.json records about the run: the archive (its kind and URL, without
    credentials; ``api_url`` too, which older readers know), query, layout, and the last sync,
    kept from the state so a plain ``run`` does not forget it."""
    url = redact_url(config.api_url)
    header = {"api_url": url, "source": {"kind": config.source, "url": url}, "query": query.to_json(),
              "layout": config.layout}
    if state.header.get("last_sync"):
        header["last_sync"] = state.header["last_sync"]
    return header


def _archive(kind: str, url: str | None) -> str:
    return f"{kind} {redact_url(url).rstrip('/') if url else '(no URL recorded)'}"


def _same_archive(kind: str, url: str | None, config: Config) -> bool:
    """Whether ``kind`` at ``url`` is ``config``'s archive: the same kind and URL, credentials
    and the port aside (a server restarted on another port, as ``harvester serve`` is, is the
    same archive), and for NBIA whatever API version the URL ends in (``.../services/v2`` and
    ``/v4`` are one archive)."""
    def key(kind: str, url: str | None) -> str:
        shown = re.sub(r"^(\w+ https?://[^/:]+):\d+", r"\1", _archive(kind, url))
        return re.sub(r"/services/v\d+$", "/services", shown) if kind in ("nbia", "auto") else shown
    return key(kind, url) == key(config.source, config.api_url)


def resume_layout(config: Config, header: dict[str, Any]) -> Config:
    """``config`` with a layout: when it names none (``layout=None``: no ``--layout``, none in the
    query), the one the directory's ``header`` records, so that a rerun resumes as it was;
    ``descriptive`` for a new directory. Raises ``UsageError`` for a recorded layout that is not one."""
    if config.layout is not None:
        return config
    recorded = header.get("layout")
    return dataclasses.replace(config, layout=check_layout(recorded) if isinstance(recorded, str) else "descriptive")


def check_same_harvest(config: Config, header: dict[str, Any]) -> None:
    """Refuse to add to a harvest of another archive (kind and URL, credentials aside) or layout
    than ``config``'s: the tree would mix two archives' series, or two layouts, under one
    harvest.json naming only the last. ``header`` is the directory's (``HarvestState.header``;
    empty for a new directory: nothing to compare). ``config.force`` skips the check: the
    records already there are kept as they are, complete series are not fetched again and stay
    in their folders, new ones go where this run's layout puts them, and harvest.json then names
    this run's archive and layout. Raises ``UsageError`` naming both."""
    if config.force or not (isinstance(header.get("source"), dict) or "api_url" in header):
        return
    kind, url = recorded_source(header)
    here = _archive(kind, url)
    asked = _archive(config.source, config.api_url)
    layout = header.get("layout")
    other_layout = isinstance(layout, str) and layout != config.layout
    same = _same_archive(kind, url, config)
    if same and not other_layout:
        return
    if not same:
        what, was, now = "archive", here, asked
        todo = "give the same --api-url (and --source)"
    else:
        what, was, now = "layout", str(layout), config.layout
        todo = "give the same --layout, or none"
    raise UsageError(f"{config.out_dir} holds a harvest of {what} {was}, not {now}",
                     hint=f"{todo} to resume it, another -o DIR for a new harvest, or --force to add to it "
                          "anyway (what is there is kept as it is)")


#: what a harvest writes beside the series' bytes: a few MiB at least, plus about 1 KiB per file
#: recorded (measured at 1 million files: the state database 24 B, the journal 150 B, harvest.json
#: 190 B, metadata.csv and the WAL the rest)
SPACE_RESERVE = 4 << 20
SPACE_PER_FILE = 1 << 10


def check_free_space(config: Config, state: HarvestState, plan: Plan, refetch: frozenset[str] = frozenset()) -> None:
    """Refuse to start when DIR's file system has less free space than the series still to fetch
    (their announced sizes) plus 5%, ``SPACE_RESERVE`` and ``SPACE_PER_FILE`` a file (blocking). A series fetched again
    (``refetch``) counts whole: its old copy stays until the new one is verified. Raises
    ``DiskFullError`` (nothing was fetched; ``--no-space-check`` or ``space_check=False``
    starts anyway and stops at the first full write, keeping what is verified)."""
    series = wanted = files = 0
    for uid, count, size in plan.sizes():   # streamed from a stored plan
        if uid in refetch or state.completed_bytes(uid) is None:
            series, wanted, files = series + 1, wanted + (size or 0), files + (count or 0)
    if not wanted:
        return
    needed = wanted + wanted // 20 + SPACE_RESERVE + SPACE_PER_FILE * files
    free = shutil.disk_usage(config.out_dir).free
    if free < needed:
        raise DiskFullError(
            f"{config.out_dir} has {human_bytes(free)} free, the {series:,} series to fetch need "
            f"{human_bytes(wanted)} (and a margin: {human_bytes(needed)} in all)",
            hint="free some space or choose another -o DIR, then run the same command again "
                 "(--no-space-check starts anyway)")


def recorded_config(config: Config, header: dict[str, Any]) -> Config:
    """``config`` for work on a harvest whose harvest.json header is ``header`` (sync, repair):
    when the header records another kind of archive than ``config.source`` names, that kind at
    its recorded URL (a source of one kind cannot read an archive of another); else ``config``
    as it is, so that a URL given with credentials keeps them. A file written before the source
    was recorded changes nothing: the caller's config decides, NBIA unless it says otherwise
    (those files came from NBIA, or from a DICOMweb harvest the caller names as such)."""
    if not isinstance(header.get("source"), dict):
        return config
    kind, url = recorded_source(header)
    if kind == config.source or not url:
        return config
    return dataclasses.replace(config, source=kind, api_url=url.rstrip("/"))


def recorded_header(out_dir: Path) -> dict[str, Any]:
    """The header of ``out_dir``'s harvest.json, or nothing when there is none or it cannot be
    read (the state then rebuilds it from the database)."""
    try:
        doc = read_manifest(out_dir)
    except HarvesterError:
        return {}
    return {k: v for k, v in doc.items() if k not in ("series", "totals")}


def plan_event(plan: Plan) -> Event:
    totals = plan.to_dict()
    return Event("plan", data={"series": totals["series"], "bytes": totals["bytes"],
                               "unavailable": len(plan.unavailable)})


def emit_warnings(hub: Hub, plan: Plan) -> None:
    """One "warning" event per warning of the plan (each is said once per plan)."""
    for warning in plan.warnings:
        hub.emit(Event("warning", message=warning))


# ---------------------------------------------------------------- sync

@dataclass
class SyncDiff:
    new: list[str] = field(default_factory=list)          # not harvested yet (or failed before)
    changed: list[str] = field(default_factory=list)      # complete here, different on the server
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)      # complete here, no longer selected

    def to_json(self) -> dict[str, Any]:
        return {"new": self.new, "changed": self.changed, "unchanged": len(self.unchanged), "removed": self.removed}


@dataclass
class SyncResult:
    diff: SyncDiff
    harvest: HarvestResult | None
    pruned: list[str]
    dry_run: bool
    #: (uid, reason) of the series the query's lists name that the archive does not give
    unavailable: list[tuple[str, str]] = field(default_factory=list)


def same_release(now: Any, recorded: Any) -> bool:
    """Whether two DateReleased values name the same day, whatever form each came in (a tree
    harvested from a v2 server and synced from v4 holds ``2015-05-27 00:00:00.0`` for the v4
    ``05-27-2015``); values that are not dates compare as text."""
    day_now, day_recorded = parse_archive_date(now), parse_archive_date(recorded)
    if day_now is not None and day_recorded is not None:
        return day_now == day_recorded
    return str(now or "") == str(recorded or "")


def diff_plan(state: HarvestState, plan: Plan, updated: set[str]) -> SyncDiff:
    """Compare what is on disk with what the query selects now."""
    diff = SyncDiff()
    selected = set()
    for task in plan.all_tasks():   # streamed from a stored plan
        selected.add(task.series_uid)
        # an index lookup of the columns first: only a complete series' record is parsed
        rec = state.complete(task.series_uid) if state.completed_bytes(task.series_uid) is not None else None
        if rec is None:
            diff.new.append(task.series_uid)
            continue
        meta = rec.get("metadata") or {}
        count_changed = task.image_count is not None and task.image_count != len(rec.get("files", []))
        size_changed = task.file_size is not None and as_int(meta.get("FileSize")) not in (None, task.file_size)
        released_changed = (not same_release(task.row.get("DateReleased"), meta.get("DateReleased"))
                            and task.series_uid in updated)
        if count_changed or size_changed or released_changed:
            diff.changed.append(task.series_uid)
        else:
            diff.unchanged.append(task.series_uid)
    # by the database's columns, streamed: the plan's UIDs are the only set held
    diff.removed = sorted(uid for uid in state.complete_uids() if uid not in selected)
    return diff


async def async_sync(query: Query, config: Config, *, prune: bool = False, dry_run: bool = False,
                     hub: Hub | None = None, engine: EngineFactory = Engine) -> SyncResult:
    """Bring ``config.out_dir`` up to date with ``query`` (see the module docstring); ``engine``
    as for ``aharvest``."""
    hub = hub or Hub()
    if query.annotations and not config.annotations:   # the cart or manifest asks for them
        config = dataclasses.replace(config, annotations=True)
    config = recorded_config(config, await anyio.to_thread.run_sync(recorded_header, config.out_dir))
    async with open_harvest(config) as (state, source):
        config = resume_layout(config, state.header)
        check_same_harvest(config, state.header)
        with PlanTable(plan_path(state.meta_dir)) as table:
            plan = await plan_into(source, query, table)
            updated: set[str] = set()
            if isinstance(source, UpdateFeed):
                try:
                    updated = await source.updated_since(state.header.get("last_sync"))
                except RequestError:
                    updated = set()  # counts and sizes still catch changed series
            diff = diff_plan(state, plan, updated)
            if dry_run:
                return SyncResult(diff=diff, harvest=None, pruned=[], dry_run=True,
                                  unavailable=[(u.series_uid, u.reason) for u in plan.unavailable])
            if prune and diff.removed and (empty := empty_selectors(plan.warnings)):
                # a selector that matches nothing is most often a typo (modality: MRI): pruning on
                # it would move everything it was meant to keep into the trash
                raise UsageError(f"--prune stopped before moving {len(diff.removed)} series to the trash: "
                                 f"{empty[0]}", hint="fix the selector (harvester plan QUERY shows what it "
                                 "matches), or leave it out; nothing was pruned")
            pruned = await anyio.to_thread.run_sync(_prune, state, diff.removed) if prune else []
            hub.emit(plan_event(plan))
            emit_warnings(hub, plan)
            result = await harvest_plan(engine(config, source, state, hub), plan,
                                        manifest_header(config, query, state), refetch=frozenset(diff.changed))
            return SyncResult(diff=diff, harvest=result, pruned=pruned, dry_run=False,
                              unavailable=result.unavailable)


def _prune(state: HarvestState, uids: list[str]) -> list[str]:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    pruned = []
    for uid in uids:
        rec = state.complete(uid)
        if rec is None:
            continue
        trash = Path(".harvester") / "trash" / stamp / rec["path"]
        state.forget(uid, rec["path"], str(trash))
        pruned.append(uid)
    return pruned


# ---------------------------------------------------------------- repair

@dataclass
class RepairResult:
    damaged: list[str] = field(default_factory=list)        # file paths that failed verification
    failed_series: list[str] = field(default_factory=list)   # recorded failed: refetched whole
    missing_series: list[str] = field(default_factory=list)  # every file gone (folder deleted): refetched whole
    repaired_files: list[str] = field(default_factory=list)  # fixed with getSingleImage
    refetched_series: list[str] = field(default_factory=list)
    harvest: HarvestResult | None = None
    still_bad: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)          # records or files whose paths leave DIR

    @property
    def ok(self) -> bool:
        return not self.still_bad and not self.refused and (self.harvest is None or self.harvest.ok)


def _file_md5(path: Path) -> str | None:
    try:
        md5 = hashlib.md5()
        with open(path, "rb", opener=open_nofollow) as fh:
            while chunk := fh.read(1 << 20):
                md5.update(chunk)
        return md5.hexdigest()
    except OSError:
        return None


def task_from_record(rec: dict[str, Any]) -> SeriesTask:
    """The task that fetches a recorded series again (``SeriesRecord.task``)."""
    return SeriesRecord.from_json(rec).task()


async def async_repair(config: Config, *, hub: Hub | None = None) -> RepairResult:
    """Verify every file of ``config.out_dir`` and repair what fails (see the module docstring)."""
    hub = hub or Hub()
    state = HarvestState(config.out_dir)
    await anyio.to_thread.run_sync(state.open)
    result = RepairResult()
    try:
        bad: dict[str, list[dict[str, Any]]] = {}
        #: series fetched again whole: failed with nothing recorded to mend, or every file gone
        whole: list[str] = []

        def scan() -> None:
            # Complete series, and those whose files went missing (recovery marked them failed
            # but kept the list of what they held): both can be mended file by file. Records
            # whose paths leave DIR were refused by ``state.open``; a link on the way is refused here.
            # A failed series without files is refetched whole; an unavailable one is left alone
            # (the archive does not give it: the next run or sync looks it up again).
            result.refused.extend(state.refused)
            for uid, rec in state.records.items():
                if not rec.get("files"):
                    if rec.get("status") == "failed":
                        whole.append(uid)
                        result.failed_series.append(uid)
                    continue
                gone = 0
                for f in rec.get("files", []):
                    try:
                        path = inside(config.out_dir, f["path"])
                    except UnsafePathError as exc:
                        result.refused.append(f"series {uid}: {exc}; not repaired")
                        continue
                    if _file_md5(path) != f["md5"]:
                        bad.setdefault(uid, []).append(f)
                        result.damaged.append(f["path"])
                        gone += not os.path.lexists(path)
                if gone and gone == len(rec["files"]):   # the folder deleted: one request, not one per file
                    del bad[uid]
                    del result.damaged[len(result.damaged) - gone:]
                    whole.append(uid)
                    result.missing_series.append(uid)

        await anyio.to_thread.run_sync(scan)
        if not bad and not whole:
            return result
        # the archive and the layout the harvest records: a refetched series goes where it was
        config = resume_layout(dataclasses.replace(recorded_config(config, state.header), layout=None), state.header)
        async with make_session(config) as session:
            source = make_source(config, session)
            refetch: list[str] = list(whole)
            for uid, files in bad.items():
                rec = state.records[uid]
                single = source if isinstance(source, SingleInstanceFetch) else None
                ok = single is not None   # a source that cannot fetch one instance alone refetches the series
                for f in files:
                    if single is None:
                        break
                    sop = f.get("SOPInstanceUID")
                    if not isinstance(sop, str) or not sop:   # a hostile or older record: no instance to ask for
                        ok = False
                        break
                    # streamed into a file of tmp/ as it arrives (an instance may be GBs), then
                    # checked and renamed over the damaged one
                    name = f"repair-{hashlib.sha1(f['path'].encode()).hexdigest()[:16]}"
                    fresh = await anyio.to_thread.run_sync(RepairFile, state.tmp_dir, name)
                    try:
                        await single.fetch_instance(task_from_record(rec), sop, fresh)
                    except (RequestError, HarvesterError):
                        fresh.abandon()
                        ok = False
                        break
                    except BaseException:
                        fresh.abandon()
                        raise

                    def replace(rel: str = f["path"], md5: str = f["md5"], sop: str = sop,
                                fresh: RepairFile = fresh) -> bool:
                        try:
                            if fresh.close() != md5:
                                return False
                            series, got_sop, _ = read_dicom_ids(fresh.path)
                            if series != uid or got_sop != sop:
                                return False
                            target = inside(config.out_dir, rel)   # checked again just before the rename
                            # Into a folder reached without following links, so a folder swapped for
                            # a link since the check cannot take the file out of DIR.
                            with open_dir(config.out_dir, target.parent.relative_to(config.out_dir),
                                          create=True) as parent:
                                os.replace(fresh.path, target.name, dst_dir_fd=parent)  # atomic: old bad file or good one
                            return True
                        finally:
                            fresh.abandon()   # nothing left once renamed; the refetch otherwise

                    try:
                        replaced = await anyio.to_thread.run_sync(replace)
                    except UnsafePathError as exc:
                        result.refused.append(f"series {uid}: {exc}; not repaired")
                        replaced = False
                    if not replaced:
                        ok = False
                        break
                    result.repaired_files.append(f["path"])
                if not ok:
                    refetch.append(uid)
                elif rec.get("status") != "complete":
                    await anyio.to_thread.run_sync(state.restore, dict(rec, status="complete", error=None))
            # a file of an earlier version learns which archive it came from
            recorded = {"source": {"kind": config.source, "url": redact_url(config.api_url)}}
            if refetch:
                result.refetched_series = refetch
                tasks = [task_from_record(state.records[u]) for u in refetch]
                header = {**recorded, **{k: v for k, v in state.header.items()
                                         if k not in ("started", "finished", "schema")}}
                result.harvest = await Engine(config, source, state, hub).run(tasks, header,
                                                                               refetch=frozenset(refetch))
            else:
                header = {**recorded, **{k: v for k, v in state.header.items() if k != "schema"}}
                await anyio.to_thread.run_sync(state.write_manifest, header)
        return result
    finally:
        state.close()
