"""The bandwidth cap (``--max-rate``): one token bucket shared by every download of a run.

A leaf: the engine makes it, every source consumes it, and neither imports the other for it.
"""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio


class RateLimiter:
    """A token bucket shared by all downloads: at most ``rate`` bytes per second in total.

    ``consume(n)`` returns once ``n`` more bytes may be taken; callers take what they received,
    so the socket is read no faster than the rate (TCP flow control slows the sender). The
    bucket holds at most one second's worth (the burst); a chunk larger than that drives it
    negative, and later callers wait until it has refilled. So over any interval of ``t``
    seconds at most ``rate * t`` bytes plus one burst and one chunk are let through.
    ``rate`` may be changed while running. ``clock``/``sleep`` are injectable for tests.
    ``consumed`` counts every byte taken (for accounting and tests).
    """

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = anyio.sleep) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self._clock, self._sleep = clock, sleep
        self._tokens = self.rate
        self._stamp = clock()
        self._lock = anyio.Lock()
        self.consumed = 0

    async def consume(self, n: int) -> None:
        needed = min(n, self.rate)  # a chunk larger than the burst waits for a full bucket
        async with self._lock:  # FIFO-ish fairness: one waiter refills at a time
            while True:
                now = self._clock()
                self._tokens = min(self.rate, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                # one byte of slack: a sleep computed to the exact deficit may land a rounding
                # error short, and must not turn into an endless series of tiny sleeps
                if self._tokens + 1.0 >= needed:
                    self._tokens -= n  # may go negative for a chunk larger than the burst
                    self.consumed += n
                    return
                await self._sleep((needed - self._tokens) / self.rate)
