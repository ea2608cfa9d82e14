"""The operations the CLI (and Python callers) use: plan, harvest, verify.

Each async function opens one HTTP session for its duration and closes it. Nothing here reads
argv or the environment: the ``Config`` comes in fully built.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio

from harvester.config import Config
from harvester.engine import Engine, HarvestResult
from harvester.errors import ManifestError, UsageError
from harvester.layout import check_layout
from harvester.planner import Plan
from harvester.progress import Hub
from harvester.query import Query
from harvester.source.base import Source
from harvester.source.nbia import NBIAClient, NBIASource, make_session, redact_url
from harvester.state import HarvestState


def make_source(config: Config, session: Any) -> Source:
    """The archive named by ``config.source``, on the given HTTP session."""
    if config.source == "dicomweb":
        from harvester.source.dicomweb import DICOMwebSource
        return DICOMwebSource(config, session)
    return NBIASource(NBIAClient(config, session))


async def aplan(query: Query, config: Config) -> Plan:
    """Expand ``query`` into series tasks (see ``harvester.planner``)."""
    async with make_session(config) as session:
        return await make_source(config, session).plan(query)


async def aharvest(query: Query, config: Config, *, hub: Hub | None = None,
                   on_plan: Callable[[Plan], None] | None = None) -> HarvestResult:
    """Plan and harvest ``query`` into ``config.out_dir``; resumable, see ``harvester.engine``."""
    check_layout(config.layout)
    hub = hub or Hub()
    state = HarvestState(config.out_dir)
    await anyio.to_thread.run_sync(state.open)
    try:
        async with make_session(config) as session:
            source = make_source(config, session)
            plan = await source.plan(query)
            if on_plan is not None:
                on_plan(plan)
            totals = plan.to_json()
            from harvester.progress import Event
            hub.emit(Event("plan", data={"series": totals["series"], "bytes": totals["bytes"]}))
            header = {"api_url": redact_url(config.api_url), "query": query.to_json(), "layout": config.layout}
            if state.header.get("last_sync"):
                header["last_sync"] = state.header["last_sync"]
            engine = Engine(config, source, state, hub)
            return await engine.run(plan.tasks, header)
    finally:
        state.close()


@dataclass
class VerifyResult:
    out_dir: Path
    series: int = 0
    files: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_tree(out_dir: Path, *, on_file: Callable[[int], None] | None = None) -> VerifyResult:
    """Re-hash every file listed in ``out_dir/harvest.json`` (blocking; run it in a thread).

    Raises ``UsageError`` when there is no readable harvest.json.
    """
    manifest = out_dir / "harvest.json"
    try:
        doc = json.loads(manifest.read_text("utf-8"))
        series = doc["series"]
    except FileNotFoundError:
        raise UsageError(f"{manifest}: not found", hint="verify takes the output directory of a harvest") from None
    except (ValueError, KeyError, TypeError, OSError):
        raise ManifestError(f"{manifest}: unreadable or not a harvester manifest") from None
    result = VerifyResult(out_dir=out_dir)
    root = out_dir.resolve()
    for rec in series:
        if not isinstance(rec, dict) or rec.get("status") != "complete":
            continue
        result.series += 1
        for f in rec.get("files", []):
            rel = str(f.get("path", ""))
            path = (out_dir / rel)
            if not path.resolve().is_relative_to(root):
                result.problems.append(f"{rel}: path leaves the output directory")
                continue
            try:
                md5 = hashlib.md5()
                size = 0
                with open(path, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        md5.update(chunk)
                        size += len(chunk)
            except FileNotFoundError:
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
    return result


def with_overrides(config: Config, **changes: Any) -> Config:
    return replace(config, **{k: v for k, v in changes.items() if v is not None})
