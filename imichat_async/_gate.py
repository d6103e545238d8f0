"""The send-rate gate: a token of the client's send rate before each grant, and who keeps time.

The rate itself is any object with the `SendRateLike` interface: `_rate.SendRate`
(a fixed `rate_limit`, or one learned from throttles), or a rate shared with
other processes. A request is granted when a slot is free *and* the rate has a
token for it, so one held back by the rate holds no slot and no connection,
and a lower rate applies at once to every request not yet sent. While the
next grant waits for a token, one waiter (the keeper) sleeps until the token
is due, then the limiter grants to whoever is first in line *then*: a head
page that arrives during the wait still goes first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

MAX_KEEP = 0.05  # seconds the keeper sleeps at most before asking the rate again (it may rise)


class SendRateLike(Protocol):
    """What the limiter asks of a send rate (`_rate.SendRate` is one).

    `delay()` before each grant: seconds until a token (<= 0: a token was
    taken, send now); `sent()` as the request goes: a ticket; `feedback()`
    with that ticket once answered: `throttled` (429, or 503 with
    Retry-After), `ok` (accepted: an answer that is neither a throttle nor a
    5xx). `adaptive`: it learns from feedback; `rate`: requests/s allowed now
    (None: no bound in force).
    """

    @property
    def adaptive(self) -> bool: ...

    @property
    def rate(self) -> float | None: ...

    def delay(self) -> float: ...

    def sent(self) -> int: ...

    def feedback(self, ticket: int, *, throttled: bool, ok: bool) -> None: ...


class Waiter:
    """One request in line: `fut` resolves to None when granted, or to seconds to keep time for."""

    __slots__ = ("fut", "granted")

    def __init__(self, fut: asyncio.Future[float | None]) -> None:
        self.fut = fut
        self.granted = False


class RateGate:
    """A send rate's tokens for the limiter's grants, and the one waiter keeping time for them."""

    def __init__(
        self,
        rate: SendRateLike | None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.rate = rate
        self.keeper: Waiter | None = None  # the waiter sleeping until the next token
        self._sleep = sleep

    def delay(self) -> float:
        """Seconds until a token; <= 0: one was taken (always, without a rate)."""
        rate = self.rate
        return 0.0 if rate is None else rate.delay()

    def sent(self) -> int | None:
        """A granted request goes: the rate's ticket for `feedback` (None without a rate)."""
        rate = self.rate
        return None if rate is None else rate.sent()

    def feedback(self, ticket: int | None, *, throttled: bool, ok: bool) -> None:
        """What the server said to the request of `ticket` (from `sent`)."""
        if self.rate is not None and ticket is not None:
            self.rate.feedback(ticket, throttled=throttled, ok=ok and not throttled)

    def appoint(self, first: Waiter, wait: float) -> None:
        """No token for `wait` seconds: `first` in line keeps time, unless someone does.

        A done future is a waiter cancelled meanwhile: its handler wakes the limiter.
        """
        if self.keeper is None and not first.fut.done():
            self.keeper = first
            first.fut.set_result(min(wait, MAX_KEEP))

    async def keep(self, waiter: Waiter, delay: float) -> None:
        """The keeper's sleep until the token is due; then someone must look again."""
        waiter.fut = asyncio.get_running_loop().create_future()
        await self._sleep(delay)
        self.keeper = None

    def relieve(self, waiter: Waiter) -> bool:
        """`waiter` stops keeping time (granted or cancelled); True if it was the keeper."""
        if self.keeper is waiter:
            self.keeper = None
            return True
        return False
