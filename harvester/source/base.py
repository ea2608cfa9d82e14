"""The seam between the engine and an archive: where bytes come from.

An archive type (NBIA now, DICOMweb next) implements ``Source``. The engine only ever calls
these methods, so a new archive is one new module, not a fork of the engine (httpx's
transports, rclone's backends).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from harvester.models import Plan, SeriesTask, UnpackedSeries
from harvester.query import Query
from harvester.rate import RateLimiter


class Source(Protocol):
    """One archive. Implementations raise the classified errors of ``harvester.errors``."""

    #: HTTP requests sent and request-level retries so far (for summaries and benchmarks)
    requests: int
    retries: int
    #: called before each request-level retry with the error (``str`` is one line, no secrets)
    on_retry: Callable[[BaseException], None] | None

    async def plan(self, query: Query, *, details: bool = True) -> Plan:
        """Expand a query into the exact list of series tasks; listed series the archive does not
        give go to ``Plan.unavailable`` (``config.strict``: ``UnknownSelectionError``).

        ``details=False``: only the series and their sizes are wanted (``harvester plan``); a
        source may then skip the study and patient records layouts and the manifest use.
        """
        ...

    async def fetch_series(self, task: SeriesTask, *, partial: Path, staging: Path,
                           on_bytes: Callable[[int], None], rate: RateLimiter | None) -> UnpackedSeries:
        """Download one series and leave its verified files in ``staging`` (created).

        ``partial`` is a scratch file the source may use for the raw download. Raises
        ``SeriesError`` subclasses (retry the series later / give up), request errors, or
        ``FatalError``. The caller removes ``partial`` and ``staging`` on failure.
        """
        ...


class ClientBackedSource:
    """Mixin for sources whose request counters and retry hook live on ``self.client``."""

    client: Any

    @property
    def requests(self) -> int:
        return int(self.client.requests)

    @property
    def retries(self) -> int:
        return int(self.client.retries)

    @property
    def on_retry(self) -> Callable[[BaseException], None] | None:
        return self.client.on_retry  # type: ignore[no-any-return]

    @on_retry.setter
    def on_retry(self, fn: Callable[[BaseException], None] | None) -> None:
        self.client.on_retry = fn
