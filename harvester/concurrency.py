"""The connection controller (``--max-connections``): how many connections move bytes at once.

A leaf, beside ``rate.py``: the engine makes one per run and hands it to the source, which holds
one of its connections for each body it streams (a series ZIP, one instance), so the count is
of connections carrying bytes, whatever series they belong to. ``--workers`` stays the cap on
series in flight; the connections a series' ZIP leaves free go to instance-level fetching
(``spare_for``: the few series left are spread over them).

The controller finds the link by itself, as a TCP sender does (and as rclone's ``--transfers``
cannot): it counts the bytes that arrive, and at the end of each window in which connections
were wanted but none was free (``starved``), it compares the window's throughput with the one
before the last increase:

* it grew by at least ``gain``: add connections (a quarter more, at least one) up to ``ceiling``;
* it did not: the link was full before that increase; go back to the count before it and hold
  it for ``hold`` windows, then probe again (the link's share may have changed);
* push-back (429, 503, a timeout: ``push_back``): halve, at least one, once per ``cooldown``
  (a wave of 429s seen by every stream at once is one signal), and hold.

A window in which no request waited for a connection says nothing about the link (the demand
was below the limit), so it changes nothing. ``Retry-After`` is the HTTP layer's
(``harvester.source.http.HostGate`` pauses every request to the host).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator

import anyio

#: seconds of bytes one decision is made on; a few round trips of a slow archive
WINDOW = 0.5
#: a throughput this much higher (a fraction) counts as grown
GAIN = 0.10
#: windows a plateau or a push-back is held before connections are added again
HOLD = 6


class ConnectionController:
    """Connections that move bytes, at most ``limit`` at once, ``limit`` found between 1 and
    ``ceiling`` from the throughput (see the module's docstring). ``clock`` is injectable for
    tests; every method is called from the event loop's thread."""

    def __init__(self, start: int, ceiling: int, *, window: float = WINDOW, gain: float = GAIN, hold: int = HOLD,
                 cooldown: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ceiling = max(1, ceiling)
        self.limiter = anyio.CapacityLimiter(min(max(1, start), self.ceiling))
        self.window, self.gain, self.hold, self.cooldown = window, gain, hold, cooldown
        self._clock = clock
        self._window_start = clock()
        self._window_bytes = 0
        self._starved = False          # a request waited for a connection in this window
        self._before: float | None = None  # throughput of the window before the last increase
        self._from = 0                 # the limit before the last increase
        self._held = 0                 # windows still to hold before adding connections
        self._last_push: float | None = None
        #: series of the run not settled yet (the engine keeps it): with ``spare_for``
        self.unsettled = 0
        self._downloading = 0          # series inside ``series_download``
        #: the most connections that moved bytes at once, and decisions taken (for the journal, tests)
        self.high_water = 0
        self.grown = self.shrunk = 0

    @property
    def limit(self) -> int:
        return int(self.limiter.total_tokens)

    @property
    def busy(self) -> int:
        return int(self.limiter.borrowed_tokens)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[None]:
        """Hold one connection while a body streams; waits while ``limit`` are busy."""
        if self.limiter.available_tokens < 1:
            self._starved = True
        async with self.limiter:
            self.high_water = max(self.high_water, self.busy)
            yield

    @contextlib.contextmanager
    def series_download(self) -> Iterator[bool]:
        """Around one series' download (its slot taken): counts it among the series downloading,
        in the order they began (a slot limiter's count is of no use: every waiter takes its slot
        before the first one runs on), and gives ``spare_for`` of that count."""
        self._downloading += 1
        try:
            yield self.spare_for(self._downloading)
        finally:
            self._downloading -= 1

    def spare_for(self, downloading: int) -> bool:
        """Whether a series about to download should be spread over several connections: the
        series left to start (``unsettled`` less the ``downloading`` ones, this one among them)
        are fewer than the connections, so one ZIP each would leave some idle. False before the
        engine counted the run's series."""
        return self.unsettled > 0 and self.unsettled - downloading < self.limit

    def add_bytes(self, n: int) -> None:
        """Count ``n`` bytes received; at the end of a window, decide."""
        self._window_bytes += n
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed < self.window:
            return
        rate = self._window_bytes / elapsed
        starved = self._starved or self.limiter.statistics().tasks_waiting > 0
        self._window_start, self._window_bytes, self._starved = now, 0, False
        if not starved:
            return  # the demand stayed below the limit: nothing learnt about the link
        if self._held > 0:
            self._held -= 1
            return
        if self._before is not None and rate < self._before * (1 + self.gain):
            # a plateau: the last increase did not pay; back to the count before it, held, then
            # probed again from the throughput found then
            self._before = None
            self._held = self.hold
            self._set(self._from)
            return
        if self.limit < self.ceiling:
            self._before, self._from = rate, self.limit
            self._set(min(self.ceiling, self.limit + max(1, self.limit // 4)))
            self.grown += 1

    def push_back(self) -> None:
        """The archive pushed back (429, 503, a timeout): halve the connections, once per cooldown."""
        now = self._clock()
        self._held = self.hold
        self._before = None  # any increase in flight is void
        if self._last_push is not None and now - self._last_push < self.cooldown:
            return
        self._last_push = now
        self._set(max(1, math.floor(self.limit / 2)))
        self.shrunk += 1

    def _set(self, limit: int) -> None:
        # CapacityLimiter: raising wakes waiters at once; lowering lets the borrowed ones finish
        self.limiter.total_tokens = limit
