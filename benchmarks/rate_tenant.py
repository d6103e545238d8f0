"""A tenant with a request budget: a token bucket in front of a sandbox's search endpoint.

Used by the rate-limit tests and the `ratelimit` benchmark (in the sandbox
child process), until the sandbox has such a knob of its own; switching to it
is a change here only. Like a gateway: `rate` requests/s, `burst` deep; a
request over it is answered at once (before the sandbox's latency) with 429
and `Retry-After` in whole seconds (at least 1), as gateways send it. The
bucket is written out here, apart from the client's `_rate.TokenBucket`, so
that a bug in one is not hidden by the same bug in the other.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from imichat_async._protocol import RETRY_AFTER_HEADER
from imichat_async.sandbox import Faults, Sandbox

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RateLimit:
    """The gateway's bucket and its counters (`accepted`, `throttled`)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self.accepted = 0
        self.throttled = 0

    def admit(self) -> float | None:
        """None: admitted (a token taken); else the whole seconds to send as Retry-After."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.accepted += 1
            return None
        self.throttled += 1
        return max(1, math.ceil((1.0 - self._tokens) / self.rate))

    def reset(self, rate: float | None = None, burst: int | None = None) -> None:
        """Zero the counters and refill the bucket, optionally with a new rate/burst."""
        if rate is not None:
            self.rate = float(rate)
        if burst is not None:
            self.burst = float(burst)
        self._tokens = self.burst
        self._at = self._clock()
        self.accepted = self.throttled = 0


def install(sb: Sandbox, rate: float, burst: int) -> RateLimit:
    """Put a `RateLimit` in front of `sb`'s search endpoint; call before `sb.start()`.

    The sandbox's own counters see the throttled requests too (`requests_total`,
    `throttled`, `errors_by_code[429]`), so its stats need no change.
    """
    limit = RateLimit(rate, burst)
    inner: Handler = sb.handle_search

    async def handle_search(request: web.Request) -> web.StreamResponse:
        retry_after = limit.admit()
        if retry_after is None:
            return await inner(request)
        sb.stats.requests_total += 1
        sb.stats.throttled += 1
        sb.stats.errors_by_code[429] += 1
        return web.json_response(
            {"message": "Too Many Requests"},
            status=429,
            headers={RETRY_AFTER_HEADER: str(retry_after)},
        )

    sb.handle_search = handle_search  # type: ignore[method-assign]
    return limit


@contextlib.asynccontextmanager
async def serve(
    chats: int, *, rate: float, burst: int, seed: int = 0, **fault_knobs: Any
) -> AsyncIterator[tuple[Sandbox, RateLimit]]:
    """`sandbox.serve(...)` behind a `RateLimit`: yields the sandbox and its gateway."""
    sb = Sandbox(chats, seed, faults=Faults(**fault_knobs))
    limit = install(sb, rate, burst)
    async with sb:
        yield sb, limit
