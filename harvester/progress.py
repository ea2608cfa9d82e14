"""Progress: events from the engine, accounting, and displays fed only by events.

The engine calls ``emit(event)``; it never touches a display. ``Tally`` turns events into
numbers; ``RichDisplay`` (a TTY), ``PlainDisplay`` (logs: one line every few seconds) and any
subscriber a library user adds read those numbers. No event ever carries a secret: messages
are built from redacted URLs and error texts.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from harvester.redact import redact


@dataclass(frozen=True)
class Event:
    """One thing that happened. ``kind`` is one of: plan, warning, start, bytes, done, skip, retry,
    series_retry, failed, finish."""

    kind: str
    series_uid: str = ""
    bytes: int = 0
    files: int = 0
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)


Subscriber = Callable[[Event], None]


@dataclass
class Tally:
    """Numbers derived from events; safe to read at any time."""

    total_series: int = 0
    total_bytes: int = 0
    done_series: int = 0
    done_bytes: int = 0            # verified bytes of completed series (this run)
    skipped_series: int = 0        # already complete before this run
    skipped_bytes: int = 0
    failed_series: int = 0
    unavailable_series: int = 0    # asked for by a cart or list, not given by the archive (planned out)
    received_bytes: int = 0        # everything off the wire, retries included
    retries: int = 0
    series_retries: int = 0
    in_flight: int = 0
    started: float = field(default_factory=time.monotonic)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, ev: Event) -> None:
        k = ev.kind
        if k == "plan":
            self.total_series = ev.data.get("series", 0)
            self.total_bytes = ev.data.get("bytes", 0)
            self.unavailable_series = ev.data.get("unavailable", 0)
        elif k == "start":
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
            self.failures.append((ev.series_uid, ev.message))

    @property
    def elapsed(self) -> float:
        return max(1e-9, time.monotonic() - self.started)

    @property
    def rate(self) -> float:
        return self.received_bytes / self.elapsed

    @property
    def finished_series(self) -> int:
        return self.done_series + self.skipped_series + self.failed_series

    def eta(self) -> float | None:
        remaining = self.total_bytes - self.skipped_bytes - self.done_bytes
        if self.rate <= 0 or self.done_bytes == 0:
            return None
        return max(0.0, remaining / self.rate)


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


class PlainDisplay:
    """One status line every ``interval`` seconds, and one line per failure; for logs and pipes."""

    def __init__(self, tally: Tally, stream: TextIO | None = None, interval: float = 10.0) -> None:
        self.tally, self.stream, self.interval = tally, stream or sys.stderr, interval
        self._last = 0.0

    def __call__(self, ev: Event) -> None:
        if ev.kind not in ("done", "failed", "skip"):
            return  # "bytes" arrives once per network chunk: return at once
        if ev.kind == "failed":
            print(f"failed: series {ev.series_uid}: {ev.message}", file=self.stream, flush=True)
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        t = self.tally
        unavailable = f", unavailable {t.unavailable_series}" if t.unavailable_series else ""
        return (f"series {t.finished_series}/{t.total_series} (failed {t.failed_series}{unavailable}), "
                f"{human_bytes(t.done_bytes + t.skipped_bytes)}/{human_bytes(t.total_bytes)}, "
                f"{human_bytes(t.rate)}/s, retries {t.retries + t.series_retries}, ETA {human_duration(t.eta())}")


class RichDisplay:
    """A live rich progress bar on a terminal: series, bytes, rate, ETA, retries, failures."""

    def __init__(self, tally: Tally) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.tally = tally
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.fields[series]}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[extra]}"), console=self.console, transient=False,
            refresh_per_second=4,
        )
        self.task_id = self.progress.add_task("harvest", total=None, series="series 0/0", extra="")

    def __enter__(self) -> RichDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, ev: Event) -> None:
        t = self.tally
        if ev.kind == "failed":
            from rich.markup import escape

            # UIDs and messages hold server text: "[red]" or "[/]" in it is text, not markup
            self.progress.console.print(f"[red]failed[/red] series {escape(ev.series_uid)}: {escape(ev.message)}",
                                        markup=True, highlight=False)
        self.progress.update(
            self.task_id,
            total=max(1, t.total_bytes),
            completed=min(t.total_bytes, t.skipped_bytes + t.received_bytes),  # live, retries included
            series=f"series {t.finished_series}/{t.total_series}",
            extra=f"retries {t.retries + t.series_retries}  failed {t.failed_series}  in flight {t.in_flight}"
                  + (f"  unavailable {t.unavailable_series}" if t.unavailable_series else ""),
        )
