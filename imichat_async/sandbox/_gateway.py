"""The gateway's rate limit in front of the tenant: a token bucket answering 429 when empty.

Pure arithmetic on the `now` it is given (monotonic seconds): no HTTP, no
clock of its own, so tests drive it with plain numbers.
"""

from __future__ import annotations

import math


class TokenBucket:
    """`take` a token per request; the bucket is refilled at `rate` per second up to `burst`.

    The bucket is full whenever the (rate, burst) it is asked with differ from
    the last ones (the knobs were (re)set); a refused request takes no token.
    """

    def __init__(self) -> None:
        self._knobs: tuple[float, int] | None = None  # (rate, burst) the bucket was filled for
        self._level = 0.0
        self._at = 0.0

    def take(self, rate: float, burst: int, now: float) -> int | None:
        """Take a token; if there is none, the Retry-After to send: the seconds until one is
        back, rounded up to a whole second, at least 1."""
        if self._knobs != (rate, burst):
            self._knobs = (rate, burst)
            self._level = float(burst)
        else:
            self._level = min(burst, self._level + (now - self._at) * rate)
        self._at = now
        if self._level >= 1.0:
            self._level -= 1.0
            return None
        return max(1, math.ceil((1.0 - self._level) / rate - 1e-9))
