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

Spreading a series over connections pays only where one connection's link is slow against a
round trip: each instance then costs a request (a round trip and the client's CPU for it)
instead of a few ZIP bytes. The controller keeps what it needs to say so: the round trip
(``observe_latency``, the time to a ZIP's headers) and the bytes per second of one busy
connection (from each window: its throughput over the connections busy on average). A series
is spread only when one of its instances takes at least ``SPREAD_MIN_ROUND_TRIPS`` round trips
on one connection (a link capped per connection: issue 17's 1 MB/s, where a 64 KiB instance
takes 1.7 round trips of 30 ms); where the connections are fast against the latency (many
small series at 50 ms, 2.9 MB/s a connection: 0.4 round trips) one ZIP each is as fast and
costs a fiftieth of the requests. Before anything was measured, spare connections are used.

A large series (``harvester.config.PER_INSTANCE_MIN_BYTES``) is spread only when one connection
is slow against its size (``slow_for``): it would take more than ``SPREAD_MIN_SECONDS`` on one
connection. That is a per-connection cap (issue 17's 4 MB/s: 262 s for 1 GiB), which only
instances in parallel get past; where one connection fills the link (a 1 GB series on
loopback: 4 s) the ZIP is as fast and costs one request instead of one per instance. Before a
connection's throughput was measured, the source streams the ZIP and asks again once it has its
own figure (``harvester.source.nbia.source``).

Push-back is a share, not a single answer (``PushBackFilter``): an archive that fails one
request in forty with a 503 (a fault, an instance restarting) is not asking for fewer
connections; halving on each such answer, once a series is spread over a request per instance,
left a run on one or two connections for its last third. Only when overload answers are at
least ``OVERLOAD_SHARE`` of the last ``OVERLOAD_WINDOW`` requests is it a push-back (a wave of
429s, every request timing out), as client-side throttling schemes read an archive's
rejections (a ratio of rejected to sent requests).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator

import anyio

#: seconds of bytes one decision is made on; a few round trips of a slow archive
WINDOW = 0.5
#: a throughput this much higher (a fraction) counts as grown
GAIN = 0.10
#: windows a plateau or a push-back is held before connections are added again
HOLD = 6
#: a series is spread over spare connections only when one of its instances takes at least this
#: many round trips on one connection (see the module's docstring): 1.7 on issue 17's capped
#: link, 0.2-0.6 (0.4 at the median) for scenario a's small series at 50 ms
SPREAD_MIN_ROUND_TRIPS = 0.75
#: weight of a new round trip in the running average (``observe_latency``)
LATENCY_WEIGHT = 0.2
#: a large series is spread only when one connection would take longer than this for it
#: (``slow_for``): spreading saves at most that time, and costs a request per instance (and an
#: fsync each); a failed ZIP of the series costs at most this much to refetch
SPREAD_MIN_SECONDS = 20.0
#: overload answers (429, 503, timeouts) are a push-back when they are at least this share of
#: the last ``OVERLOAD_WINDOW`` requests sent (``PushBackFilter``): 6 of 40. An archive failing a
#: few percent of its requests at random reaches it about never (2.5% of 503s: 6 of 40 in
#: 0.06% of windows); one that throttles, a wave of 429s or timeouts, at once
OVERLOAD_SHARE = 0.15
OVERLOAD_WINDOW = 40


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
        #: the round trip (seconds to a ZIP's headers, a running average) and the bytes per
        #: second of one busy connection (the last window's), once measured: ``round_trips``
        self.latency: float | None = None
        self.per_connection: float | None = None
        self._busy_area = 0.0          # connection-seconds busy in this window
        self._busy_mark = self._window_start

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
            self._account_busy(-1)
            self.high_water = max(self.high_water, self.busy)
            try:
                yield
            finally:
                self._account_busy(0)

    def _account_busy(self, change: int) -> None:
        """Add the connection-seconds since the last change (``busy`` less ``change`` were busy
        meanwhile: the limiter already counts a connection just taken)."""
        now = self._clock()
        self._busy_area += (self.busy + change) * (now - self._busy_mark)
        self._busy_mark = now

    @contextlib.contextmanager
    def series_download(self, instance_bytes: float | None = None) -> Iterator[bool]:
        """Around one series' download (its slot taken): counts it among the series downloading,
        in the order they began (a slot limiter's count is of no use: every waiter takes its slot
        before the first one runs on), and gives whether to spread it: ``spare_for`` of that
        count, and (for instances of ``instance_bytes`` on average, when given) ``worth_spreading``."""
        self._downloading += 1
        try:
            yield self.spare_for(self._downloading) and (instance_bytes is None or self.worth_spreading(instance_bytes))
        finally:
            self._downloading -= 1

    def observe_latency(self, seconds: float) -> None:
        """A request's time to its headers: one round trip (a running average)."""
        if seconds < 0 or seconds != seconds:
            return
        self.latency = seconds if self.latency is None else \
            self.latency + LATENCY_WEIGHT * (seconds - self.latency)

    def round_trips(self, instance_bytes: float) -> float | None:
        """Round trips one instance of ``instance_bytes`` takes on one busy connection; None
        until both the round trip and a connection's throughput were measured."""
        if not self.latency or not self.per_connection:
            return None
        return instance_bytes / self.per_connection / self.latency

    def worth_spreading(self, instance_bytes: float) -> bool:
        """Whether instances of ``instance_bytes`` are worth a request each: they take at least
        ``SPREAD_MIN_ROUND_TRIPS`` round trips on one connection, or that is not known yet."""
        trips = self.round_trips(instance_bytes)
        return trips is None or trips >= SPREAD_MIN_ROUND_TRIPS

    def slow_for(self, series_bytes: float, rate: float | None = None, *, margin: float = 1.0) -> bool | None:
        """Whether one connection at ``rate`` bytes per second (default: the measured
        ``per_connection``) takes more than ``SPREAD_MIN_SECONDS`` (times ``margin``) for
        ``series_bytes``, so that a large series is worth spreading (see the module's
        docstring); None while no throughput is known."""
        rate = self.per_connection if rate is None else rate
        if not rate or rate <= 0:
            return None
        return series_bytes / rate > SPREAD_MIN_SECONDS * margin

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
        self._account_busy(0)
        busy = self._busy_area / elapsed   # connections busy on average over the window
        if busy >= 1 and self._window_bytes:
            self.per_connection = rate / busy
        self._busy_area = 0.0
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


class PushBackFilter:
    """Which overload answers (429, 503, a timeout) are a push-back: those that bring such
    answers to at least ``share`` of the last ``window`` requests sent (see the module's
    docstring). ``overloaded(sent)`` is told each one with the count of requests sent so far
    (a counter that only grows); after a push-back the count starts again, so one wave is one
    signal here too (the limits' cooldown still applies)."""

    def __init__(self, share: float = OVERLOAD_SHARE, window: int = OVERLOAD_WINDOW) -> None:
        self.window = max(1, window)
        self.needed = max(1, math.ceil(share * self.window))
        self._marks: deque[int] = deque()   # the request count at each recent overload answer
        #: overload answers heard and push-backs given (for the journal, tests)
        self.heard = self.signalled = 0

    def overloaded(self, sent: int) -> bool:
        """An overload answer arrived when ``sent`` requests had been sent: True when it is a
        push-back."""
        self.heard += 1
        self._marks.append(sent)
        while self._marks and self._marks[0] <= sent - self.window:
            self._marks.popleft()
        if len(self._marks) < self.needed:
            return False
        self._marks.clear()
        self.signalled += 1
        return True
