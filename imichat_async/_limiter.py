"""How many requests may be in flight: one limiter per client, shared by all its searches.

Fixed mode is a plain semaphore of `limit` slots. Adaptive mode (AIMD, as TCP
does) halves the allowed in-flight count when the server says it is overloaded
(429, 503) and adds one slot per window of successful requests, never above
`limit`. An optional token bucket caps requests per second. No I/O here but
sleeping, and every wait is cancellation-safe: a cancelled waiter never keeps
a slot.

Who waits goes in a queue per group (one search), served round-robin across
groups, so one search cannot starve another; within a group the lowest rank
(the page the consumer needs first) goes first, so a retry of the head page
never waits behind later pages. Without a group or rank, first come first
served.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import time
from collections.abc import Hashable


class Limiter:
    """Slots for requests in flight; `peak` and `in_flight` are there for tests and stats."""

    def __init__(
        self,
        limit: int,
        *,
        adaptive: bool = False,
        min_limit: int = 1,
        rate_limit: float | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.max_limit = limit
        self.adaptive = adaptive
        self.min_limit = max(1, min(min_limit, limit))
        self._limit = float(limit)
        self._in_flight = 0
        self.peak = 0
        self.decreases = 0
        # group -> heap of (rank, arrival, future); groups with waiters, in serving order.
        self._queues: dict[Hashable, list[tuple[float, int, asyncio.Future[None]]]] = {}
        self._turns: collections.deque[Hashable] = collections.deque()
        self._arrivals = itertools.count()
        self._epoch = 0  # bumped at each decrease; a request started before it can't decrease again
        self._interval = 1.0 / rate_limit if rate_limit else 0.0
        self._next_start = 0.0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return sum(len(q) for q in self._queues.values())

    @property
    def limit(self) -> int:
        """Slots currently allowed (below `max_limit` while adapting down)."""
        return max(self.min_limit, int(self._limit))

    def __repr__(self) -> str:
        return f"<Limiter in_flight={self._in_flight} limit={self.limit}/{self.max_limit}>"

    async def acquire(self, group: Hashable = None, rank: float | None = None) -> int:
        """Wait for a slot; returns the epoch to hand back to `release`.

        `group` (a search) and `rank` (its page number) order the waiters: groups
        take turns, and within a group the lowest rank is served first (ties and
        no rank: first come).
        """
        if self._in_flight < self.limit and not self._turns:
            self._take()
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            arrival = next(self._arrivals)
            entry = (arrival if rank is None else rank, arrival, fut)
            queue = self._queues.get(group)
            if queue is None:
                queue = self._queues[group] = []
                self._turns.append(group)
            heapq.heappush(queue, entry)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._in_flight -= 1  # granted just as we were cancelled: give it back
                    self._wake()
                else:
                    self._forget(group, entry)
                raise
        if self._interval:
            try:
                await self._pace()
            except asyncio.CancelledError:
                self.release(self._epoch)
                raise
        return self._epoch

    def _take(self) -> None:
        self._in_flight += 1
        self.peak = max(self.peak, self._in_flight)

    def release(self, epoch: int, *, overloaded: bool = False, ok: bool = False) -> None:
        """Free a slot; in adaptive mode, feed back what the server said."""
        self._in_flight -= 1
        if self.adaptive:
            if overloaded:
                # One halving per epoch; an overload is never counted as a success.
                if epoch == self._epoch:
                    self._limit = max(float(self.min_limit), self._limit / 2)
                    self._epoch += 1
                    self.decreases += 1
            elif ok:
                self._limit = min(float(self.max_limit), self._limit + 1.0 / max(1.0, self._limit))
        self._wake()

    def _wake(self) -> None:
        while self._turns and self._in_flight < self.limit:
            group = self._turns.popleft()
            queue = self._queues[group]
            _, _, fut = heapq.heappop(queue)
            if queue:
                self._turns.append(group)  # its next waiter waits for its next turn
            else:
                del self._queues[group]
            if not fut.done():
                self._take()
                fut.set_result(None)

    def _forget(self, group: Hashable, entry: tuple[float, int, asyncio.Future[None]]) -> None:
        """Take a cancelled waiter out of its queue (and its group out of the turns if empty)."""
        queue = self._queues.get(group)
        if queue is None or entry not in queue:
            return
        queue.remove(entry)
        if queue:
            heapq.heapify(queue)
        else:
            del self._queues[group]
            self._turns.remove(group)

    async def _pace(self) -> None:
        now = time.monotonic()
        start = max(now, self._next_start)
        self._next_start = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)
