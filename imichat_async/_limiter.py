"""How many requests may be in flight, and how fast they go: one limiter per client.

Fixed mode is a plain semaphore of `limit` slots. Adaptive mode (AIMD, as TCP
does) halves the allowed in-flight count when the server says it is overloaded
(429, 503) and adds one slot per window of successful requests, never above
`limit`.

An optional send rate (`_rate.SendRate`: a fixed `rate_limit`, or one learned
from throttles) gates the same queue: a request is granted when a slot is free
*and* the rate has a token for it, so one held back by the rate holds no slot
and no connection, and a lower rate applies at once to every request not yet
sent. While the next grant waits for a token, one waiter (the keeper) sleeps
until the token is due, then grants to whoever is first in line *then*: a head
page that arrives during the wait still goes first. No I/O here but sleeping,
and every wait is cancellation-safe: a cancelled waiter never keeps a slot.

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
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from ._rate import SendRate

MAX_KEEP = 0.05  # seconds the keeper sleeps at most before asking the rate again (it may rise)


class _Waiter:
    """One request in line: `fut` resolves to None when granted, or to seconds to keep time for."""

    __slots__ = ("fut", "granted")

    def __init__(self, fut: asyncio.Future[float | None]) -> None:
        self.fut = fut
        self.granted = False


_Entry = tuple[float, int, _Waiter]  # (rank, arrival, waiter): arrival is unique, so no tie


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
        self._slots = limit  # int(self._limit), at least min_limit: read on every acquire
        self._in_flight = 0
        self.peak = 0
        self.decreases = 0
        # group -> heap of (rank, arrival, waiter); groups with waiters, in serving order.
        self._queues: dict[Hashable, list[_Entry]] = {}
        self._turns: collections.deque[Hashable] = collections.deque()
        self._arrivals = itertools.count()
        self._epoch = 0  # bumped at each decrease; a request started before it can't decrease again
        # -- send rate (see _rate.py): a grant also takes one of its tokens
        self.rate = SendRate(rate_limit) if rate_limit is not None else send_rate
        self._keeper: _Waiter | None = None  # the waiter sleeping until the next token
        self._sleep = sleep

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Requests queued for a slot or a token."""
        return sum(len(q) for q in self._queues.values())

    @property
    def limit(self) -> int:
        """Slots currently allowed (below `max_limit` while adapting down)."""
        return self._slots

    def __repr__(self) -> str:
        return f"<Limiter in_flight={self._in_flight} limit={self.limit}/{self.max_limit}>"

    async def acquire(self, group: Hashable = None, rank: float | None = None) -> int:
        """Wait for a slot and a token of the send rate; returns the ticket for `release`.

        `group` (a search) and `rank` (its page number) order the waiters: groups
        take turns, and within a group the lowest rank is served first (ties and
        no rank: first come). The ticket is the epoch (adaptive concurrency), or
        with a learned send rate the rate's ticket (see `SendRate.feedback`).
        """
        if not self._turns and self._in_flight < self._slots and self._token():
            self._take()
            return self._ticket()
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future())
        arrival = next(self._arrivals)
        entry = (arrival if rank is None else rank, arrival, waiter)
        queue = self._queues.get(group)
        if queue is None:
            queue = self._queues[group] = []
            self._turns.append(group)
        heapq.heappush(queue, entry)
        self._wake()  # a slot may be free, the token not yet: someone must keep time
        try:
            while not waiter.granted:
                delay = await waiter.fut
                if waiter.granted:
                    break
                # The keeper: sleep until the token is due, then grant whoever is first then.
                assert delay is not None
                waiter.fut = loop.create_future()
                await self._sleep(delay)
                self._keeper = None
                self._wake()
        except asyncio.CancelledError:
            if self._keeper is waiter:
                self._keeper = None
            if waiter.granted:
                self._in_flight -= 1  # granted just as we were cancelled: give it back
            else:
                self._forget(group, entry)
            self._wake()
            raise
        if self._keeper is waiter:  # granted before it could sleep: someone else keeps time
            self._keeper = None
            self._wake()
        return self._ticket()

    def _token(self) -> bool:
        """Take a token of the send rate if one is there (always, without a rate)."""
        return self.rate is None or self.rate.delay() <= 0

    def _ticket(self) -> int:
        rate = self.rate
        if rate is not None and rate.adaptive:
            return rate.sent()  # the rate learns from send times
        return self._epoch

    def _take(self) -> None:
        self._in_flight += 1
        self.peak = max(self.peak, self._in_flight)

    def release(
        self, epoch: int, *, overloaded: bool = False, ok: bool = False, throttled: bool = False
    ) -> None:
        """Free a slot; feed back what the server said to adaptive modes.

        `overloaded` (429, 503) halves adaptive concurrency; `throttled` (429, or
        503 with Retry-After) is what lowers a learned send rate.
        """
        self._in_flight -= 1
        if self.rate is not None:
            self.rate.feedback(epoch, throttled=throttled, ok=ok and not throttled)
        if self.adaptive:
            if overloaded:
                # One halving per epoch; an overload is never counted as a success.
                if epoch == self._epoch:
                    self._set_limit(max(float(self.min_limit), self._limit / 2))
                    self._epoch += 1
                    self.decreases += 1
            elif ok:
                self._set_limit(
                    min(float(self.max_limit), self._limit + 1.0 / max(1.0, self._limit))
                )
        self._wake()

    def _set_limit(self, limit: float) -> None:
        self._limit = limit
        self._slots = max(self.min_limit, int(limit))

    def _wake(self) -> None:
        """Grant the free slots to the first in line while the rate has tokens.

        When it has none, the first in line becomes the keeper (unless there is
        one): it sleeps until the token is due and calls this again.
        """
        rate = self.rate
        while self._turns and self._in_flight < self._slots:
            if rate is not None:
                wait = rate.delay()
                if wait > 0:
                    if self._keeper is None:
                        keeper = self._queues[self._turns[0]][0][2]
                        if not keeper.fut.done():  # done: cancelled, its handler wakes us
                            self._keeper = keeper
                            keeper.fut.set_result(min(wait, MAX_KEEP))
                    return
            group = self._turns.popleft()
            queue = self._queues[group]
            _, _, waiter = heapq.heappop(queue)
            if queue:
                self._turns.append(group)  # its next waiter waits for its next turn
            else:
                del self._queues[group]
            self._take()
            waiter.granted = True
            if not waiter.fut.done():
                waiter.fut.set_result(None)

    def _forget(self, group: Hashable, entry: _Entry) -> None:
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
