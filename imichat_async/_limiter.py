"""How many requests may be in flight: one limiter per client, shared by all its searches.

Fixed mode is a plain semaphore of `limit` slots. Adaptive mode (AIMD, as TCP
does) halves the allowed in-flight count when the server says it is overloaded
(429, 503) and adds one slot per window of successful requests, never above
`limit`.

An optional send rate (`_rate.SendRate`: a fixed `rate_limit`, or one learned
from throttles) is waited for first, in arrival order, *before* taking a slot:
a request held back by the rate holds no slot and no connection. No I/O here
but sleeping, and every wait is cancellation-safe: a cancelled waiter never
keeps a slot.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

from ._rate import SendRate


class Limiter:
    """Slots for requests in flight; `peak` and `in_flight` are there for tests and stats."""

    def __init__(
        self,
        limit: int,
        *,
        adaptive: bool = False,
        min_limit: int = 1,
        rate_limit: float | None = None,
        send_rate: SendRate | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if rate_limit is not None and send_rate is not None:
            raise ValueError("give rate_limit or send_rate, not both")
        if send_rate is not None and send_rate.adaptive and adaptive:
            raise ValueError("adapt the rate or the concurrency, not both")
        self.max_limit = limit
        self.adaptive = adaptive
        self.min_limit = max(1, min(min_limit, limit))
        self._limit = float(limit)
        self._in_flight = 0
        self.peak = 0
        self.decreases = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._epoch = 0  # bumped at each decrease; a request started before it can't decrease again
        # -- send rate (see _rate.py): waited for before a slot is taken
        self.rate = SendRate(rate_limit) if rate_limit is not None else send_rate
        self._rate_turn = asyncio.Lock()  # FIFO: one waiter at a time sleeps for a token
        self._sleep = sleep

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def limit(self) -> int:
        """Slots currently allowed (below `max_limit` while adapting down)."""
        return max(self.min_limit, int(self._limit))

    def __repr__(self) -> str:
        return f"<Limiter in_flight={self._in_flight} limit={self.limit}/{self.max_limit}>"

    async def acquire(self) -> int:
        """Wait for the send rate, then for a slot; returns the epoch to hand back to `release`.

        With a send rate, requests take turns (first come, first served): the one
        whose turn it is waits for a token holding no slot, then for a slot; the
        others wait behind it, holding neither. So no more requests get past the
        rate than there are slots to send them, and a lower rate applies at once
        to every request not yet sent. With an adaptive send rate the return
        value is the rate's ticket (see `SendRate.feedback`).
        """
        rate = self.rate
        if rate is None:
            await self._acquire_slot()
            return self._epoch
        async with self._rate_turn:
            while (wait := rate.delay()) > 0:
                await self._sleep(wait)
            await self._acquire_slot()
        if rate.adaptive:
            return rate.sent()  # a ticket: the rate learns from send times
        return self._epoch

    async def _acquire_slot(self) -> None:
        if self._in_flight < self.limit and not self._waiters:
            self._take()
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._in_flight -= 1  # granted just as we were cancelled: give it back
                    self._wake()
                else:
                    with suppress(ValueError):
                        self._waiters.remove(fut)
                raise

    def _take(self) -> None:
        self._in_flight += 1
        self.peak = max(self.peak, self._in_flight)

    def release(
        self, epoch: int, *, overloaded: bool = False, ok: bool = False, throttled: bool = False
    ) -> None:
        """Free a slot; in adaptive mode, feed back what the server said.

        `throttled` (429, or 503 with Retry-After) is what lowers an adaptive send rate.
        """
        self._in_flight -= 1
        if self.rate is not None:
            self.rate.feedback(epoch, throttled=throttled, ok=ok and not throttled)
        if self.adaptive:
            if overloaded and epoch == self._epoch:
                self._limit = max(float(self.min_limit), self._limit / 2)
                self._epoch += 1
                self.decreases += 1
            elif ok:
                self._limit = min(float(self.max_limit), self._limit + 1.0 / max(1.0, self._limit))
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._in_flight < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self._take()
                fut.set_result(None)
