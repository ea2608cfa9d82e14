"""The bytes of whole objects held in memory at once, shared by every series of a run.

A series holds its whole objects from the moment their GET starts until the sink has written
them (arriving, waiting for the writer, in the batch being written). Bounded per series only
(``OBJECTS_IN_FLIGHT`` + ``OBJECTS_WAITING`` + a batch), 24 series in flight held about 400
objects of 512 KiB (peak RSS 380 MiB against s5cmd's 78), and their buffers could never all be
used again (``keepalive.Buffers`` keeps only so many spares), so every object past the spares
cost a fresh buffer: zeroing and a page fault per 4 KiB, on the loop thread. One budget for the
run bounds both: the memory held is the budget, and every buffer it admits is used again.

Fair: waiters are served first come, first served (a large object is not starved by small
ones); an object larger than the whole budget waits until it is alone, then goes. Not
thread-safe: the event loop's thread only.
"""
from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator

import anyio

#: bytes of whole objects in memory at once, for the whole run (every series together)
OBJECT_BYTES_IN_FLIGHT = 64 << 20


class ByteBudget:
    """Up to ``total`` bytes held at once (see the module docstring)."""

    def __init__(self, total: int = OBJECT_BYTES_IN_FLIGHT) -> None:
        self.total = max(1, total)
        self.free = self.total
        self._waiters: deque[tuple[int, anyio.Event]] = deque()

    async def acquire(self, n: int) -> int:
        """Wait until ``n`` bytes (at most ``total``) are free and take them; returns what was
        taken, to be given to ``release``. A cancelled wait takes nothing."""
        n = min(max(0, n), self.total)
        if not self._waiters and n <= self.free:
            self.free -= n
            return n
        entry = (n, anyio.Event())
        self._waiters.append(entry)
        try:
            await entry[1].wait()
        except BaseException:
            if entry[1].is_set():        # granted as the wait was cancelled: give it back
                self.release(n)
            else:
                self._waiters.remove(entry)
                self._wake()             # those behind it may fit now
            raise
        return n

    def release(self, n: int) -> None:
        self.free = min(self.total, self.free + n)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            n, event = self._waiters.popleft()
            self.free -= n
            event.set()


class SeriesShare:
    """What one series holds of a ``ByteBudget``: each object's bytes are taken before its GET
    and given back once written (``give_back``), and whatever is still held when the series
    ends, however it ends (an error, a cancellation with objects still waiting), goes back at
    ``close``. The event loop's thread only."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.held = 0

    async def take(self, n: int) -> int:
        got = await self.budget.acquire(n)
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
