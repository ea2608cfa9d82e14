"""The selection rules every source shares: from the rows each selector found to the ordered,
de-duplicated series of a plan.

* ``matches``: a row is checked locally against its selector (a server that ignores a
  matching key cannot widen the harvest), ``released_after`` included;
* ``select_rows``: the union of the selectors' rows, de-duplicated by SeriesInstanceUID (the
  first selector's row wins), the query's exclusions, one order (collection, patient, study,
  series) and the limit; a listed series another selector found is not unavailable, and with
  ``strict`` an unavailable one raises ``UnknownSelectionError`` (``refuse_unavailable``);
* ``empty_selector_warnings``: one warning per selector that matched nothing;
* ``gather_limited``, ``rows_by_uid``: bounded concurrent lookups, first error surfaced.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio

from harvester.dates import parse_archive_date
from harvester.errors import UnknownSelectionError
from harvester.models import UnavailableSeries
from harvester.query import Query, Selector

T = TypeVar("T")

#: the rows of one selector, and the series of its list the archive did not give
SelectorResult = tuple[list[dict[str, Any]], list[UnavailableSeries]]


@dataclass
class Selection:
    """What ``select_rows`` made of the selectors' results."""

    rows: list[dict[str, Any]]               # ordered, de-duplicated, excluded, limited
    unavailable: list[UnavailableSeries]     # in the lists' order, none that another selector found
    batches: list[list[dict[str, Any]]]      # each selector's rows, as found (for the warnings)


def series_order(row: dict[str, Any]) -> tuple[str, str, str, str]:
    """The order of a plan: collection, patient, study, series."""
    return (str(row.get("Collection", "")), str(row.get("PatientID", "")), str(row.get("StudyInstanceUID", "")),
            str(row.get("SeriesInstanceUID", "")))


def select_rows(query: Query, results: Sequence[SelectorResult], *, strict: bool, archive: str,
                hint: str) -> Selection:
    """The plan's rows from each selector's ``(rows, unavailable)`` (see the module docstring).
    Raises ``UnknownSelectionError`` when ``strict`` and a listed series is unavailable
    (``archive`` and ``hint`` word the message)."""
    batches = [found for found, _ in results]
    found = {str(row.get("SeriesInstanceUID") or "") for batch in batches for row in batch}
    unavailable: dict[str, UnavailableSeries] = {}
    for _, missing in results:
        for u in missing:
            if u.series_uid not in found:   # a cart and a collection may overlap
                unavailable.setdefault(u.series_uid, u)
    if strict:
        refuse_unavailable(list(unavailable.values()), archive=archive, hint=hint)
    rows: dict[str, dict[str, Any]] = {}
    for batch in batches:
        for row in batch:
            uid = str(row.get("SeriesInstanceUID") or "")
            if uid and uid not in rows and not query.exclude.excludes(row):
                rows[uid] = row
    ordered = sorted(rows.values(), key=series_order)
    if query.limit is not None:
        ordered = ordered[: query.limit]
    return Selection(ordered, list(unavailable.values()), batches)


def matches(row: dict[str, Any], sel: Selector) -> bool:
    """Whether a row the archive sent is one ``sel`` selects: its filters (``Selector.matches``,
    case-insensitive as the archives compare) and its ``released_after`` date."""
    return sel.matches(row) and not (sel.released_after and not released_after(row, sel.released_after))


async def gather_limited(calls: Iterable[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Run the calls concurrently, at most ``limit`` at a time; results in input order.

    The first exception cancels the rest and propagates (anyio task-group semantics).
    """
    calls = list(calls)
    results: list[Any] = [None] * len(calls)
    limiter = anyio.CapacityLimiter(max(1, limit))

    async def run(i: int, call: Callable[[], Awaitable[T]]) -> None:
        async with limiter:
            results[i] = await call()

    try:
        async with anyio.create_task_group() as tg:
            for i, call in enumerate(calls):
                tg.start_soon(run, i, call)
    except BaseExceptionGroup as group:  # surface the first real error, not the group
        raise first_error(group) from None
    return results


async def rows_by_uid(uids: list[str], lookup: Callable[[str], Callable[[], Awaitable[list[dict[str, Any]]]]],
                      limit: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of every series UID, ``limit`` lookups at a time, and the UIDs that had none
    (in the order given)."""
    results = await gather_limited([lookup(uid) for uid in uids], limit)
    missing = [uid for uid, rows in zip(uids, results) if not rows]
    return [r for rows in results for r in rows], missing


def unknown_series_message(missing: list[str], origin: str, archive: str) -> str:
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    return f"{origin}: {archive} has no series {', '.join(missing[:3])}{more}"


def refuse_unavailable(unavailable: list[UnavailableSeries], *, archive: str, hint: str) -> None:
    """``strict``: raise ``UnknownSelectionError`` naming up to three unavailable series of the first
    selector that has any (and how many other selectors' there are), so that nothing is
    downloaded. Returns when none is unavailable."""
    if not unavailable:
        return
    origin = unavailable[0].origin
    first = [u.series_uid for u in unavailable if u.origin == origin]
    others = len(unavailable) - len(first)
    message = unknown_series_message(first, origin, archive)
    raise UnknownSelectionError(message + (f"; {others} more in other selectors" if others else ""), hint=hint)


EMPTY_SELECTOR = "matches no series"


def empty_selector_warnings(selectors: tuple[Selector, ...], batches: list[list[dict[str, Any]]]) -> list[str]:
    """One warning per selector that matched no series, numbered from 1 as the user counts."""
    return [f"selector {i} ({sel.describe()}) {EMPTY_SELECTOR}"
            for i, (sel, rows) in enumerate(zip(selectors, batches), start=1) if not rows]


def empty_selectors(warnings: list[str]) -> list[str]:
    """The warnings of ``empty_selector_warnings`` among a plan's warnings."""
    return [w for w in warnings if w.startswith("selector ") and w.endswith(EMPTY_SELECTOR)]


def first_error(group: BaseExceptionGroup) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_error(exc)
        return exc
    return group  # pragma: no cover


def released_after(row: dict[str, Any], when: dt.date) -> bool:
    """Whether the row's DateReleased (any format the API has sent) is after ``when``. A row whose
    date cannot be read is kept rather than silently lost; the planner counts and names them."""
    released = parse_archive_date(row.get("DateReleased"))
    return released is None or released > when
