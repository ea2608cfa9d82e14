"""Accounting: the events a harvest emits, and the numbers derived from them.

The engine calls ``Hub.emit(event)``; it never touches a display. ``Tally`` turns events into
numbers (series done, this run's bytes, the rate and the ETA); the displays of
``harvester.display`` and any subscriber a library user adds read those numbers. No event ever
carries a secret: ``Hub.emit`` redacts every message (the one point for text that is not a
``HarvesterError``'s, which redacts itself).

Rates and the ETA count only what THIS run moved, from its first download on: a rerun over a
tree that is mostly complete must not start at "166 MB/s" because of the bytes already on disk.
The live rate and the summary's rate are the same figure (``Tally.rate``).
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from harvester.redact import redact


@dataclass(frozen=True)
class Event:
    """One thing that happened. ``kind`` is one of:

    - ``plan`` (data: series, bytes, unavailable): the plan is known;
    - ``warning`` (message): said once, even with --quiet;
    - ``fetching`` (data: series, bytes, skipped, skipped_bytes): after the series already
      complete were skipped, what this run sets out to download;
    - ``start``, ``bytes`` (bytes off the wire), ``done`` (bytes, files), ``skip`` (bytes);
    - ``retry`` (one HTTP request), ``series_retry`` (the whole series, later in the run);
    - ``failed`` (message; data: collection, patient, description, kind): a series failed for
      this run, after its last attempt;
    - ``finish``: the run is over (the rate stops counting time);
    - ``verify`` (verify begins; again with files and bytes once it knows how many it will
      re-hash), ``checked`` (bytes, files: one file re-hashed).
    """

    kind: str
    series_uid: str = ""
    bytes: int = 0
    files: int = 0
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)


Subscriber = Callable[[Event], None]


@dataclass(frozen=True)
class Failure:
    """A series that failed in this run, named as a user names it."""

    series_uid: str
    message: str
    collection: str = ""
    patient: str = ""
    description: str = ""
    kind: str = ""          # the harvester.errors class name, when known

    @property
    def reason_class(self) -> str:
        return reason_class(self.kind, self.message)

    @property
    def detail(self) -> str:
        return short_detail(self.message)

    @property
    def name(self) -> str:
        """``LIDC-IDRI LIDC-IDRI-0001 "CT THORAX"``: what is known of collection, patient, description."""
        parts = [self.collection, self.patient, f'"{self.description}"' if self.description else ""]
        return " ".join(p for p in parts if p)


@dataclass
class Tally:
    """Numbers derived from events; safe to read at any time (a display thread reads them)."""

    total_series: int = 0
    total_bytes: int = 0
    done_series: int = 0
    done_bytes: int = 0            # verified bytes of completed series (this run)
    skipped_series: int = 0        # already complete before this run
    skipped_bytes: int = 0
    failed_series: int = 0
    unavailable_series: int = 0    # asked for by a cart or list, not given by the archive (planned out)
    received_bytes: int = 0        # everything off the wire in this run, retries included
    retries: int = 0
    series_retries: int = 0
    in_flight: int = 0             # series started and not settled (downloading, verifying or committing)
    planned: bool = False          # a "plan" event arrived
    fetch_series: int | None = None  # what this run set out to download ("fetching"), once known
    fetch_bytes: int | None = None
    finished: bool = False
    verifying: bool = False
    checked_files: int = 0
    checked_bytes: int = 0
    verify_files: int | None = None      # what verify will re-hash, once it knows ("verify" with counts)
    verify_bytes: int = 0
    started: float = -1.0                # when the tally began (its clock's time); set on creation
    fetch_started: float | None = None   # the first "start": from here on the rate counts
    ended: float | None = None           # "finish": the rate stops counting
    failures: list[Failure] = field(default_factory=list)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        if self.started < 0:
            self.started = self.clock()

    def __call__(self, ev: Event) -> None:
        k = ev.kind
        if k == "plan":
            self.planned = True
            self.total_series = ev.data.get("series", 0)
            self.total_bytes = ev.data.get("bytes", 0)
            self.unavailable_series = ev.data.get("unavailable", 0)
        elif k == "fetching":
            self.fetch_series = ev.data.get("series", 0)
            self.fetch_bytes = ev.data.get("bytes", 0)
        elif k == "start":
            if self.fetch_started is None:
                self.fetch_started = self.clock()
            self.in_flight += 1
        elif k == "bytes":
            self.received_bytes += ev.bytes
        elif k == "done":
            self.in_flight -= 1
            self.done_series += 1
            self.done_bytes += ev.bytes
        elif k == "skip":
            self.skipped_series += 1
            self.skipped_bytes += ev.bytes
        elif k == "retry":
            self.retries += 1
        elif k == "series_retry":
            self.in_flight -= 1
            self.series_retries += 1
        elif k == "failed":
            self.in_flight -= 1
            self.failed_series += 1
            d = ev.data
            self.failures.append(Failure(ev.series_uid, ev.message, str(d.get("collection") or ""),
                                         str(d.get("patient") or ""), str(d.get("description") or ""),
                                         str(d.get("kind") or "")))
        elif k == "verify":
            self.verifying = True
            if "files" in ev.data:
                self.verify_files, self.verify_bytes = int(ev.data["files"]), int(ev.data.get("bytes") or 0)
        elif k == "checked":
            self.checked_files += ev.files
            self.checked_bytes += ev.bytes
        elif k == "finish":
            self.finished = True
            self.ended = self.clock()

    @property
    def elapsed(self) -> float:
        """Seconds since the tally began (planning included)."""
        return max(1e-9, (self.ended or self.clock()) - self.started)

    @property
    def transfer_seconds(self) -> float:
        """Seconds since this run's first download began (0 before it)."""
        if self.fetch_started is None:
            return 0.0
        return max(0.0, (self.ended or self.clock()) - self.fetch_started)

    @property
    def rate(self) -> float:
        """This run's bytes per second since its first download: the bar's and the summary's figure."""
        seconds = self.transfer_seconds
        return self.received_bytes / seconds if seconds > 0 else 0.0

    @property
    def finished_series(self) -> int:
        return self.done_series + self.skipped_series + self.failed_series

    @property
    def to_fetch_bytes(self) -> int:
        """The bytes this run sets out to download (the plan's minus what was already complete)."""
        if self.fetch_bytes is not None:
            return self.fetch_bytes
        return max(0, self.total_bytes - self.skipped_bytes)

    @property
    def fetched_bytes(self) -> int:
        """This run's progress in bytes, for the bar: what arrived (or, when more, the verified size of
        the series done: a ZIP is smaller than its files), never past what it set out to fetch."""
        return min(self.to_fetch_bytes, max(self.received_bytes, self.done_bytes))

    def verify_eta(self) -> float | None:
        """Seconds verify has left: of the files and the bytes still to re-hash, whichever is
        further behind, at the rate so far (a tree of small files is bound by opening them, one of
        large ones by hashing them); None until a second has passed and something was checked."""
        if self.finished:
            return 0.0
        if self.verify_files is None or self.elapsed < 1.0 or not (self.checked_files or self.checked_bytes):
            return None
        left = max(0.0, 1.0 - self.checked_files / max(1, self.verify_files),
                   1.0 - self.checked_bytes / max(1, self.verify_bytes) if self.verify_bytes else 0.0)
        done = 1.0 - left
        return self.elapsed * left / done if done > 0 else None

    def eta(self) -> float | None:
        """Seconds left at this run's rate; None until a second of transfer and some bytes are in."""
        if self.finished:
            return 0.0
        if self.transfer_seconds < 1.0 or self.received_bytes == 0:
            return None
        return max(0.0, (self.to_fetch_bytes - self.fetched_bytes) / self.rate)


# ------------------------------------------------------------------ reasons, as a user reads them

#: harvester.errors class name -> the short class a summary shows before the detail
_REASON_CLASSES = {
    "IncompleteSeriesError": "truncated",
    "IntegrityError": "corrupt",
    "OversizeDownloadError": "oversize",
    "UnsafeArchiveError": "unsafe archive",
    "PermanentSeriesError": "refused",
    "PermanentRequestError": "refused",
    "ServerBusyError": "server busy",
    "DiskFullError": "disk full",
    "OutputNotWritableError": "not writable",
    "UnsafePathError": "unsafe path",
    "AuthError": "credentials",
}
_HTTP = re.compile(r"\bHTTP (\d{3})\b")
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s\"'<>]+", re.IGNORECASE)


def reason_class(kind: str, message: str) -> str:
    """A short class for a failure: ``truncated``, ``corrupt``, ``server error``, ``network``...

    From the error class the engine recorded; for a request that failed after its retries, from
    the HTTP status in the message (5xx a server error, 4xx refused) or else the network."""
    if kind in _REASON_CLASSES:
        return _REASON_CLASSES[kind]
    m = _HTTP.search(message)
    if kind in ("RetryableRequestError", "RequestError", "SeriesError", "") and m:
        return "server error" if m.group(1).startswith("5") else "refused"
    if kind in ("RetryableRequestError", "RequestError"):
        return "network"
    return "failed"


def short_detail(message: str) -> str:
    """The message without whole request URLs: each becomes its endpoint (``getImage``), which
    names the request without its parameters (already redacted; this keeps the line short)."""
    def endpoint(m: re.Match[str]) -> str:
        path = m.group(0).split("?", 1)[0].rstrip("/.,;:)")
        return path.rsplit("/", 1)[-1] or path
    return _URL.sub(endpoint, message)


# ------------------------------------------------------------------ figures as people read them

def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def human_duration(seconds: float | None) -> str:
    """``0.9s``, ``42s``, ``3m07s``, ``2h05m``; ``?`` when unknown. Tenths below 10 s, so that a short
    run does not read "received in 0s"."""
    if seconds is None:
        return "?"
    if seconds < 9.95:  # tenths below 10 s (from 9.95 on, .1f would print "10.0s")
        return f"{max(seconds, 0):.1f}s"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Hub:
    """Fans events out to the tally and any subscribers. Subscribers must be quick."""

    def __init__(self) -> None:
        self.tally = Tally()
        self._subs: list[Subscriber] = [self.tally]

    def subscribe(self, fn: Subscriber) -> None:
        self._subs.append(fn)

    def emit(self, ev: Event) -> None:
        if ev.message:  # the one redaction point, for messages built from something else than a HarvesterError
            ev = replace(ev, message=redact(ev.message))
        for fn in self._subs:
            fn(ev)
