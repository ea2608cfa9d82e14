"""The bytes of whole objects held in memory at once, shared by every series of a run.

A series holds its whole objects from the moment their GET starts until the sink has written
them (arriving, waiting for the writer, in the batch being written). Bounded per series only
(``OBJECTS_IN_FLIGHT`` + ``OBJECTS_WAITING`` + a batch), 24 series in flight held about 400
objects of 512 KiB (peak RSS 380 MiB against s5cmd's 78), and their buffers could never all be
used again (``keepalive.Buffers`` keeps only so many spares), so every object past the spares
cost a fresh buffer: zeroing and a page fault per 4 KiB, on the loop thread. One budget for the
run bounds both: the memory held is the budget, and every buffer it admits is used again.

Who goes first: the series that started first (then, within a series, first come, first
served), so series finish one after another, each committed while the next ones download,
rather than all at once at the end of the run (and a kill -9 loses the fewest bytes of series
not yet committed); no waiter is passed by one behind it in that order, so a large object is
not starved by small ones. An object larger than the whole budget waits until it is alone, then goes. Not
thread-safe: the event loop's thread only.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
from collections.abc import Iterator

import anyio

#: bytes of whole objects in memory at once, for the whole run (every series together)
OBJECT_BYTES_IN_FLIGHT = 64 << 20


class ByteBudget:
    """Up to ``total`` bytes held at once (see the module docstring)."""

    def __init__(self, total: int = OBJECT_BYTES_IN_FLIGHT) -> None:
        self.total = max(1, total)
        self.free = self.total
        # (rank, arrival, bytes, event): the lowest rank first, then the earliest arrival
        self._waiters: list[tuple[int, int, int, anyio.Event]] = []
        self._arrivals = itertools.count()
        self._ranks = itertools.count()

    def rank(self) -> int:
        """A rank for the next series to start: lower ranks are served first."""
        return next(self._ranks)

    async def acquire(self, n: int, rank: int = 0) -> int:
        """Wait until ``n`` bytes (at most ``total``) are free and no waiter of a lower ``rank``,
        or of the same rank and earlier, is left; take them. Returns what was taken, to be given
        to ``release``. A cancelled wait takes nothing."""
        n = min(max(0, n), self.total)
        if not self._waiters and n <= self.free:
            self.free -= n
            return n
        entry = (rank, next(self._arrivals), n, anyio.Event())
        heapq.heappush(self._waiters, entry)
        self._wake()                     # it may be first in the order now, and fit
        try:
            await entry[3].wait()
        except BaseException:
            if entry[3].is_set():        # granted as the wait was cancelled: give it back
                self.release(n)
            else:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
                self._wake()             # those behind it may fit now
            raise
        return n

    def release(self, n: int) -> None:
        self.free = min(self.total, self.free + n)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][2] <= self.free:
            _, _, n, event = heapq.heappop(self._waiters)
            self.free -= n
            event.set()


class SeriesShare:
    """What one series holds of a ``ByteBudget``: each object's bytes are taken before its GET
    and given back once written (``give_back``), and whatever is still held when the series
    ends, however it ends (an error, a cancellation with objects still waiting), goes back at
    ``close``. The event loop's thread only."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.rank = budget.rank()   # its place in the order of series started
        self.held = 0

    async def take(self, n: int) -> int:
        got = await self.budget.acquire(n, self.rank)
        self.held += got
        return got

    def give_back(self, n: int) -> None:
        n = min(n, self.held)
        self.held -= n
        self.budget.release(n)

    def close(self) -> None:
        self.give_back(self.held)

    @contextlib.contextmanager
    def open(self) -> Iterator[SeriesShare]:
        try:
            yield self
        finally:
            self.close()
