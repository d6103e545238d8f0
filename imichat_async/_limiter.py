"""How many requests may be in flight, how fast they go, and who goes next: one per client.

A thin composition of three parts, each readable and tested alone:

- `_slots.Slots`: the requests in flight, a fixed bound or adapted (AIMD).
- `_gate.RateGate`: an optional send rate (`_gate.SendRateLike`: a fixed
  `rate_limit`, a learned rate, or one shared with other processes) whose
  token each grant also takes, and the waiter keeping time for the next one.
- `_sched.Scheduler`: who of those waiting is served next (the search with
  the fewest pages left, aging, background after interactive; within a
  search its lowest page).

A request is granted when a slot is free and the rate has a token; `acquire`
returns a `Ticket` (the slot's epoch, the rate's ticket) that `release`
takes back with what the server said. No I/O here but sleeping, and every
wait is cancellation-safe: a cancelled waiter never keeps a slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from . import _gate, _sched, _slots
from ._gate import SendRateLike, Waiter
from ._rate import SendRate
from ._sched import Flow, Priority

# The parts are reached through their modules (`_slots.Slots`), so that a mutant of one
# (scripts/mutation.py) is the one a limiter built in the tests uses.

__all__ = ["Limiter", "Ticket"]


class Ticket:
    """What `acquire` granted, for `release`: the slot's epoch and the send rate's ticket."""

    __slots__ = ("epoch", "sent")

    def __init__(self, epoch: int, sent: int | None) -> None:
        self.epoch = epoch  # adaptive concurrency: one halving per epoch
        self.sent = sent  # the send rate's ticket (None without a rate)

    def __repr__(self) -> str:
        return f"Ticket(epoch={self.epoch}, sent={self.sent})"


class Limiter:
    """Slots, send rate and order of service for a client's requests.

    `peak`, `in_flight`, `waiting`, `limit` and `decreases` are there for tests and stats.
    """

    def __init__(
        self,
        limit: int,
        *,
        adaptive: bool = False,
        min_limit: int = 1,
        rate_limit: float | None = None,
        send_rate: SendRateLike | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        if rate_limit is not None and send_rate is not None:
            raise ValueError("give rate_limit or send_rate, not both")
        if send_rate is not None and send_rate.adaptive and adaptive:
            raise ValueError("adapt the rate or the concurrency, not both")
        self.slots = _slots.Slots(limit, adaptive=adaptive, min_limit=min_limit)
        self.gate = _gate.RateGate(
            SendRate(rate_limit) if rate_limit is not None else send_rate, sleep
        )
        self.sched: _sched.Scheduler[Waiter] = _sched.Scheduler(horizon=limit)

    # -- read by stats, the fetch path's hedging rule and tests (the parts have the rest) -----

    @property
    def rate(self) -> SendRateLike | None:
        """The send rate whose tokens the grants take, if any."""
        return self.gate.rate

    @property
    def backing_off(self) -> bool:
        """Holding back now: a send rate in force, or adaptive concurrency below its ceiling.

        The fetch path's hedging rule: no duplicate request then. Under a rate (given,
        or learned from a throttle) a duplicate takes a token a new page would have
        used, and the head page it would duplicate is most likely waiting out a
        `Retry-After` that the server asked to be kept.
        """
        rate = self.gate.rate
        if rate is not None and rate.rate is not None:
            return True
        slots = self.slots
        return slots.adaptive and slots.limit < slots.max_limit

    @property
    def limit(self) -> int:
        """Slots currently allowed (below `slots.max_limit` while adapting down)."""
        return self.slots.limit

    @property
    def in_flight(self) -> int:
        return self.slots.in_flight

    @property
    def waiting(self) -> int:
        """Requests queued for a slot or a token."""
        return len(self.sched)

    @property
    def decreases(self) -> int:
        """Halvings of adaptive concurrency so far."""
        return self.slots.decreases

    @property
    def peak(self) -> int:
        """The most requests in flight at once (a test may reset it to 0)."""
        return self.slots.peak

    @peak.setter
    def peak(self, value: int) -> None:
        self.slots.peak = value

    def __repr__(self) -> str:
        slots = self.slots
        return f"<Limiter in_flight={slots.in_flight} limit={slots.limit}/{slots.max_limit}>"

    # -- granting ---------------------------------------------------------------------------

    def flow(
        self, priority: Priority = "interactive", *, first: int = 1, cap: int | None = None
    ) -> Flow[Waiter]:
        """A new search, to pass as the `group` of its requests (see `_sched`).

        `first` is its first page, `cap` the most pages it will request; the
        fetch path sizes it with `Flow.ends_at(last page)` once the server tells.
        """
        return self.sched.flow(priority, first=first, cap=cap)

    async def acquire(self, group: Hashable = None, rank: float | None = None) -> Ticket:
        """Wait for a slot and a token of the send rate; returns the ticket for `release`.

        `group` (a search: a `Flow` from `flow()`, or any hashable) and `rank`
        (its page number) order the waiters: see `_sched`.
        """
        slots, gate, sched = self.slots, self.gate, self.sched
        if not sched and slots.free() and gate.delay() <= 0:
            sched.granted(group)
            return Ticket(slots.take(), gate.sent())
        loop = asyncio.get_running_loop()
        waiter = _gate.Waiter(loop.create_future())
        flow, entry = sched.push(group, rank, waiter)
        self._wake()  # a slot may be free, the token not yet: someone must keep time
        try:
            while not waiter.granted:
                delay = await waiter.fut
                if waiter.granted:
                    break
                assert delay is not None  # the keeper: sleep until the token is due
                await gate.keep(waiter, delay)
                self._wake()
        except asyncio.CancelledError:
            gate.relieve(waiter)
            if waiter.granted:
                slots.give_back()  # granted just as we were cancelled: give it back
            else:
                sched.remove(flow, entry)
            self._wake()
            raise
        if gate.relieve(waiter):  # granted before it could sleep: someone else keeps time
            self._wake()
        return Ticket(slots.epoch, gate.sent())

    def release(
        self, ticket: Ticket, *, overloaded: bool = False, ok: bool = False, throttled: bool = False
    ) -> None:
        """Free a slot; feed back what the server said to adaptive modes.

        `overloaded` (429, 503) halves adaptive concurrency; `throttled` (429, or
        503 with Retry-After) is what lowers a learned send rate.
        """
        self.slots.release(ticket.epoch, overloaded=overloaded, ok=ok)
        self.gate.feedback(ticket.sent, throttled=throttled, ok=ok)
        self._wake()

    def _wake(self) -> None:
        """Grant the free slots to the first in line while the rate has tokens.

        When it has none, the first in line keeps time for the next token
        (unless someone does): it sleeps until it is due and calls this again.
        """
        slots, gate, sched = self.slots, self.gate, self.sched
        while sched and slots.free():
            if gate.rate is not None:
                wait = gate.delay()
                if wait > 0:
                    gate.appoint(sched.peek(), wait)
                    return
            waiter = sched.pop()
            slots.take()
            waiter.granted = True
            if not waiter.fut.done():
                waiter.fut.set_result(None)
