"""Fault injection on a valid search: the latency to wait, the fault to draw, and how to answer it.

`Injector` holds the generator every random draw comes from (seeded by the
sandbox's seed, so a sequential run is reproducible) and the event that ends
hangs when the server closes. The knobs are read from the `Faults` passed to
each call, so that `sb.faults` stays the one place a test changes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

from aiohttp import web

from . import _replies
from .faults import Faults, Stats


class Injector:
    """Draws and serves the faults of one sandbox; `closing` set ends every hang at once."""

    def __init__(self, seed: int, closing: asyncio.Event) -> None:
        self._rng = random.Random(f"faults-{seed}")
        self._closing = closing

    def delay(self, faults: Faults, page: int) -> float:
        """Seconds to wait before answering: latency, per-page latency and a jitter draw."""
        delay = faults.latency + faults.latency_per_page * page
        if faults.jitter > 0:
            delay += faults.jitter * self._rng.random()
        return delay

    def draw(self, faults: Faults, stats: Stats, page: int, arrival_in_flight: int) -> str | None:
        """The fault kind this request gets, or None: throttling over `max_in_flight` first
        (counted in `stats.throttled`), then `fault_pages` (used once), then one draw."""
        limit = faults.max_in_flight
        if limit is not None and arrival_in_flight > limit:
            stats.throttled += 1
            return "429"
        kind = faults.fault_pages.pop(page, None)
        if kind is not None:
            return kind
        return faults.pick(self._rng.random())

    async def inject(
        self, request: web.Request, kind: str, faults: Faults, stats: Stats
    ) -> web.StreamResponse:
        """Answer `request` with fault `kind`; "reset" and "hang" drop the connection."""
        if kind in ("2007", "3454"):
            return _replies.vendor_error(stats, int(kind))
        if kind == "429":
            retry_after = faults.retry_after
            return _replies.too_many(stats, None if retry_after is None else f"{retry_after:g}")
        if kind in ("502", "503", "504"):
            return _replies.gateway_error(stats, int(kind))
        if kind == "hang":
            await self._sleep(faults.hang_seconds)
        # "reset", or a hang that is over: drop the connection without an answer.
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)  # never reaches the client

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), seconds)
