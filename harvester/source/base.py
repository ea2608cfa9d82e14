"""The seam between the engine and an archive: where bytes come from.

An archive type (``source/nbia/``, ``source/dicomweb/``) implements ``Source``. The engine and
the operations only ever call these methods, so a new archive is one new package, not a fork
of the engine (httpx's transports, rclone's backends).

Abilities only some archives have are protocols of their own (rclone's ``fs/features.go``),
checked with ``isinstance`` against these ``runtime_checkable`` classes, never with ``hasattr``:

* ``SingleInstanceFetch``: one instance by its SOPInstanceUID (NBIA's getSingleImage); repair
  refetches the whole series from a source without it.
* ``UpdateFeed``: the series released or updated since a time (NBIA's getUpdatedSeries); sync
  then relies on counts and sizes alone.
* ``DownloadSlots``: the source holds the engine's download limiter only while bytes move, so
  that verifying never keeps a connection slot (the engine holds it for the whole series
  otherwise).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import anyio

from harvester.models import Plan, SeriesTask, UnpackedSeries
from harvester.query import Query
from harvester.rate import RateLimiter


@runtime_checkable
class Source(Protocol):
    """One archive. Implementations raise the classified errors of ``harvester.errors``."""

    #: the archive type harvest.json records (``"nbia"``, ``"dicomweb"``: ``config.SOURCES``)
    kind: str

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


@runtime_checkable
class SingleInstanceFetch(Protocol):
    """A source that can fetch one instance alone."""

    async def fetch_instance(self, task: SeriesTask, sop_uid: str) -> bytes:
        """The bytes of instance ``sop_uid`` of ``task``'s series, as the archive stores it (the
        caller checks MD5 and header). Raises the request errors of ``harvester.errors``."""
        ...


@runtime_checkable
class UpdateFeed(Protocol):
    """A source that can say which series changed since the last sync."""

    async def updated_since(self, last_sync: str | None) -> set[str]:
        """SeriesInstanceUIDs released or updated since ``last_sync`` (harvest.json's ISO time;
        empty when None or unreadable). Raises request errors."""
        ...


@runtime_checkable
class DownloadSlots(Protocol):
    """A source that holds the engine's download limiter only while bytes move."""

    download_limiter: anyio.CapacityLimiter | None


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
