"""How many requests may be in flight: a fixed number of slots, or one adapted (AIMD).

Pure counting, no asyncio: the limiter asks `free()` before a grant, `take()`s
a slot (getting the epoch to hand back), and `release()`s it with what the
server said. Fixed mode is a plain count of `limit` slots. Adaptive mode
(AIMD, as TCP does) halves the slots allowed when the server says it is
overloaded (429, 503) and adds one per window of successful requests, never
above `limit` nor below `min_limit`. A request started before a halving
(an older epoch) cannot halve again: its overload was already answered.
"""

from __future__ import annotations


class Slots:
    """Slots for requests in flight; `peak`, `in_flight` and `decreases` are for tests and stats."""

    def __init__(self, limit: int, *, adaptive: bool = False, min_limit: int = 1) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.max_limit = limit
        self.adaptive = adaptive
        self.min_limit = max(1, min(min_limit, limit))
        self._limit = float(limit)
        self.limit = limit  # int(self._limit), at least min_limit: read on every grant
        self.in_flight = 0
        self.peak = 0
        self.decreases = 0
        self.epoch = 0  # bumped at each decrease

    def __repr__(self) -> str:
        return f"<Slots in_flight={self.in_flight} limit={self.limit}/{self.max_limit}>"

    def free(self) -> bool:
        """A slot is free now."""
        return self.in_flight < self.limit

    def take(self) -> int:
        """Take a slot (free or not: the caller asked); returns the epoch for `release`."""
        self.in_flight += 1
        if self.in_flight > self.peak:
            self.peak = self.in_flight
        return self.epoch

    def give_back(self) -> None:
        """A slot taken for a request that was never sent (cancelled): no feedback."""
        self.in_flight -= 1

    def release(self, epoch: int, *, overloaded: bool = False, ok: bool = False) -> None:
        """Free a slot; in adaptive mode, `overloaded` (429, 503) halves the slots allowed
        (once per epoch, never counted as a success) and `ok` adds 1/limit of one.
        """
        self.in_flight -= 1
        if not self.adaptive:
            return
        if overloaded:
            if epoch == self.epoch:
                self._set(max(float(self.min_limit), self._limit / 2))
                self.epoch += 1
                self.decreases += 1
        elif ok:
            self._set(min(float(self.max_limit), self._limit + 1.0 / max(1.0, self._limit)))

    def _set(self, limit: float) -> None:
        self._limit = limit
        self.limit = max(self.min_limit, int(limit))
