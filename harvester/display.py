"""Drawing, fed only by events: a live line on a terminal, periodic plain lines elsewhere.

Both displays read a ``harvester.events.Tally`` and format it with :func:`status_line`, which
fits any width: at 80 columns nothing wraps, and a narrower terminal loses the optional parts
(the bar, in flight, retries) before the figures that matter (series, bytes, rate, ETA).

- ``LiveDisplay``: a terminal that can move its cursor (and a Jupyter notebook, through rich's
  own Jupyter support; ``api_hub`` gives the API's calls one there): one line redrawn four
  times a second by rich's refresh thread.
- ``PlainDisplay``: a dumb terminal (``TERM=dumb``), a pipe or a log file: one status line every
  ``interval`` seconds from a ticker thread, whether or not any series finished meanwhile.

Every piece of text from outside (UIDs, descriptions, server messages) is shown as text: rich
``Text`` objects, never markup, so ``[red]x[/bold]``, ``[link=...]`` or ``:thumbs_up:`` in a
server's message is printed as sent, and control characters are made visible (``printable``)
so a server cannot move the cursor or retitle the terminal.
"""
from __future__ import annotations

import os
import sys
import textwrap
import threading
import time
from typing import Any, TextIO

from harvester.events import Event, Failure, Hub, Tally, human_bytes, human_duration
from harvester.redact import printable  # noqa: F401  (display's name for it since the start)

BAR_MIN, BAR_MAX = 10, 30
BAR_PRIORITY = 3   # the bar goes after in flight, retries and unavailable, before failures


def terminal_width(stream: Any) -> int | None:
    """The columns of ``stream`` when it is a terminal (None for a pipe or a file)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else None
    except (AttributeError, ValueError, OSError):
        return None


def wrapped(line: str, width: int | None) -> str:
    """``line`` folded at ``width`` (continuations indented) on a terminal; whole when ``width`` is
    None (a pipe, a log), so a script reading ``failed: UID: ...`` gets one line per series."""
    if not width or len(line) <= width:
        return line
    return textwrap.fill(line, width=width, subsequent_indent="      ", break_long_words=True,
                         break_on_hyphens=False)


def failure_line(f: Failure) -> str:
    """``failed: <uid>: LIDC-IDRI LIDC-IDRI-0001 "CT": corrupt: <detail>``, printable."""
    name = f"{f.name}: " if f.name else ""
    return printable(f"failed: {f.series_uid}: {name}{f.reason_class}: {f.detail}")


def resume_line(tally: Tally) -> str | None:
    """``resuming: 23 of 120 series already complete, 97 to fetch, 750.0 MB`` (None on a first run)."""
    if not tally.skipped_series or tally.fetch_series is None:
        return None
    return (f"resuming: {tally.skipped_series:,} of {tally.total_series:,} series already complete, "
            f"{tally.fetch_series:,} to fetch, {human_bytes(tally.to_fetch_bytes)}")


def _phase(t: Tally) -> str:
    if t.checked_files or t.verifying:
        return "verify"
    return "harvest" if t.planned else "planning"


def status_parts(t: Tally) -> list[tuple[int, str]]:
    """The parts of the status line in display order, each with its priority (0 is kept longest)."""
    phase = _phase(t)
    if phase == "planning":
        return [(0, f"planning: asking the archive which series match ... {human_duration(t.elapsed)}")]
    if phase == "verify":
        rate = t.checked_bytes / t.elapsed
        if t.verify_files is None:    # the totals are not known yet
            return [(0, f"verify: {t.checked_files:,} files"), (0, f"{human_bytes(t.checked_bytes)} checked"),
                    (1, f"{human_bytes(rate)}/s"), (2, human_duration(t.elapsed))]
        return [(0, f"verify: {t.checked_files:,}/{t.verify_files:,} files"),
                (0, f"{human_bytes(t.checked_bytes)}/{human_bytes(t.verify_bytes)} checked"),
                (1, f"{human_bytes(rate)}/s"), (1, f"ETA {human_duration(t.verify_eta())}"),
                (2, human_duration(t.elapsed))]
    parts = [(0, f"{t.finished_series:,}/{t.total_series:,} series"),
             (0, f"{human_bytes(t.fetched_bytes)}/{human_bytes(t.to_fetch_bytes)}"),
             (1, f"{human_bytes(t.rate)}/s"), (1, f"ETA {human_duration(t.eta())}")]
    if t.failed_series:
        parts.append((2, f"{t.failed_series:,} failed"))
    if t.unavailable_series:
        parts.append((4, f"{t.unavailable_series:,} unavailable"))
    if t.retries + t.series_retries:
        parts.append((5, f"{t.retries + t.series_retries:,} retries"))
    parts.append((6, f"{t.in_flight:,} in flight"))
    return parts


def status_line(t: Tally, width: int, *, bar: bool = True) -> tuple[int, str]:
    """The status line fitted to ``width`` columns: ``(bar_width, text)``; the caller draws a bar
    of ``bar_width`` cells (0: none) and one space before ``text``. When the width runs out the
    parts go by priority: in flight, retries, unavailable, then the bar, then failures, rate and
    ETA; what is left is cut, so the line is never wider than ``width``."""
    parts = status_parts(t)
    with_bar = bar and (_phase(t) == "harvest" or (_phase(t) == "verify" and t.verify_files is not None))
    sep = "  "
    text, bar_on = "", False
    for level in range(8, 0, -1):   # keep the parts whose priority is below level
        text = sep.join(p for prio, p in parts if prio < level)
        bar_on = with_bar and level > BAR_PRIORITY
        if len(text) + (BAR_MIN + 1 if bar_on else 0) <= width:
            break
    if len(text) > width:
        text = text[:max(0, width - 1)] + "…" if width > 0 else ""
    if bar_on and len(text) + BAR_MIN + 1 <= width:
        return min(BAR_MAX, width - len(text) - 1), text
    return 0, text


def _bar_filled(t: Tally, width: int) -> int:
    """The filled cells of a bar ``width`` wide: a harvest by bytes; a verify by files and by
    bytes, whichever is further behind (what its ETA counts by too)."""
    if _phase(t) == "verify":
        if t.finished:
            return width
        done = [t.checked_files / max(1, t.verify_files or 0)]
        if t.verify_bytes:
            done.append(t.checked_bytes / t.verify_bytes)
        return min(width, int(width * min(done)))
    if t.finished and not t.failed_series:
        return width
    return width * t.fetched_bytes // max(1, t.to_fetch_bytes)


class LiveDisplay:
    """A live status line on a terminal or in a notebook, redrawn by rich's refresh thread.

    A context manager; failures and the resume line are printed above the live line as they
    happen (as text, never markup)."""

    def __init__(self, tally: Tally, console: Any = None, *, transient: bool = False) -> None:
        from rich.console import Console

        self.tally, self.transient = tally, transient
        self.console = console or Console(stderr=True, highlight=False)
        self._live: Any = None

    def __enter__(self) -> LiveDisplay:
        from rich.live import Live

        # stdout and stderr are routed above the live line while it runs (rich's FileProxy): a
        # warning or a log line printed meanwhile gets a line of its own instead of being glued
        # to the live line.
        self._live = Live(self, console=self.console, refresh_per_second=4, transient=self.transient,
                          redirect_stdout=True, redirect_stderr=True)
        self._live.start(refresh=True)   # the first frame at once: a short plan shows it is working too
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            if _phase(self.tally) == "planning":
                self._live.transient = True   # a plan that failed (or plan's own line): nothing to keep
            self._live.stop()   # draws the last frame: the final counts stay on screen

    def __rich__(self) -> Any:
        from rich.text import Text

        t = self.tally
        bar_width, text = status_line(t, max(1, self.console.width))
        line = Text(no_wrap=True, overflow="crop")
        if bar_width:
            filled = _bar_filled(t, bar_width)
            line.append("━" * filled, style="green")
            line.append("━" * (bar_width - filled), style="grey37")
            line.append(" ")
        line.append(text)
        return line

    def print(self, text: str, style: str | None = None) -> None:
        """``text`` above the live line, as text (never markup); ``style`` colours its first word."""
        from rich.text import Text

        head, sep, rest = printable(text).partition(": ")
        self.console.print(Text(head, style=style or "") + Text(sep + rest), highlight=False)

    def __call__(self, ev: Event) -> None:
        if ev.kind == "failed" and self.tally.failures:
            self.print(failure_line(self.tally.failures[-1]), style="red")
        elif ev.kind == "fetching":
            line = resume_line(self.tally)
            if line:
                self.print(line)


class PlainDisplay:
    """One status line every ``interval`` seconds (and one per failure), for dumb terminals, pipes
    and logs. A context manager: the ticker thread runs inside the ``with`` block; without one
    (a subscriber only) a line is printed when a series settles and ``interval`` has passed."""

    def __init__(self, tally: Tally, stream: TextIO | None = None, interval: float = 10.0) -> None:
        self.tally, self.stream, self.interval = tally, stream, interval
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stderr  # looked up late: a test or a wrapper may swap stderr
        with self._lock:
            try:
                print(wrapped(text, terminal_width(stream)), file=stream, flush=True)
            except (OSError, ValueError):
                pass  # a closed pipe: the harvest goes on, and its summary says the rest

    def line(self) -> str:
        """The status line, fitted to the terminal (80 columns in a pipe or a log)."""
        return status_line(self.tally, terminal_width(self.stream or sys.stderr) or 80, bar=False)[1]

    def tick(self) -> None:
        self._last = time.monotonic()
        self._write(self.line())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    def __enter__(self) -> PlainDisplay:
        self._thread = threading.Thread(target=self._run, name="harvester-status", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __call__(self, ev: Event) -> None:
        if ev.kind == "failed" and self.tally.failures:
            self._write(failure_line(self.tally.failures[-1]))
        elif ev.kind == "fetching":
            line = resume_line(self.tally)
            if line:
                self._write(line)
        if self._thread is None and ev.kind in ("done", "failed", "skip") \
                and time.monotonic() - self._last >= self.interval:
            self.tick()


def use_live(stream: TextIO, env: dict[str, str]) -> bool:
    """Whether ``stream`` is a terminal that can redraw a line: a TTY whose TERM is not dumb."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and env.get("TERM", "") not in ("", "dumb", "unknown")


def in_notebook() -> bool:
    """Running inside a Jupyter kernel (where rich draws its live display as a widget)."""
    shell = sys.modules.get("IPython")
    try:
        ip = shell.get_ipython() if shell is not None else None  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - any IPython oddity means "not a notebook"
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


class _AutoLive:
    """A ``LiveDisplay`` started by the "plan" event and stopped by "finish": the API's progress in
    a notebook, where no ``with`` block surrounds the harvest."""

    def __init__(self, tally: Tally, console: Any = None) -> None:
        self.display = LiveDisplay(tally, console)
        self.running = False

    def __call__(self, ev: Event) -> None:
        if ev.kind == "plan" and not self.running:
            self.display.__enter__()
            self.running = True
        if self.running:
            self.display(ev)
        if ev.kind == "finish" and self.running:
            self.running = False
            self.display.__exit__(None, None, None)


def api_hub(progress: bool, quiet: bool = False, *, notebook: bool | None = None, console: Any = None) -> Hub:
    """The hub of an API call that was given none: in a Jupyter notebook with ``progress`` (the
    Config default) and not ``quiet``, it draws the live line through rich's Jupyter support
    (ipywidgets); anywhere else it draws nothing, so scripts and pipelines stay silent."""
    hub = Hub()
    if progress and not quiet and (in_notebook() if notebook is None else notebook):
        hub.subscribe(_AutoLive(hub.tally, console))
    return hub
