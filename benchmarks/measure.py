"""Timing one run: the library's client, the baselines, each in a fresh event loop.

Wall time and CPU time are both taken around `asyncio.run(...)`, for the
client and for the baselines alike, so that their ratios compare like with
like. CPU time is `time.process_time()` of this process, where the client
runs; the sandbox runs in its own process and is not counted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import imichat_async as imi

from . import baselines
from .sandbox_proc import SandboxProcess

T = TypeVar("T")


@dataclass
class Timed:
    result: Any
    wall: float
    cpu: float


def timed(make: Callable[[], Awaitable[T]]) -> Timed:
    """Run `make()` in a fresh loop; wall and CPU seconds around the whole of it."""
    wall0 = time.perf_counter()
    cpu0 = time.process_time()
    result = asyncio.run(_await(make))
    return Timed(result, time.perf_counter() - wall0, time.process_time() - cpu0)


async def _await(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


@dataclass
class ClientRun:
    wall: float = 0.0
    cpu: float = 0.0
    records: int = 0
    requests: int = 0
    retries: int = 0
    hedges: int = 0
    pages: int = 0
    peak_in_flight: int = 0
    send_rate: float | None = None  # the client's send rate at the end (None: unbounded)
    ttfr: float | None = None  # seconds from the search call to the first record
    chats: list[Any] = field(default_factory=list)
    paging: imi.PagingStats | None = None


def client_run(
    sb: SandboxProcess,
    *,
    k: int,
    prefetch: int | None = None,
    adaptive: bool | str = False,
    rate_limit: float | None = None,
    max_retries: int = 5,
    keep: bool = False,
    raw: bool = False,
    max_pages: int | None = None,
    retry_policy: imi.RetryPolicy | None = None,
    rate_store: str | None = None,
) -> ClientRun:
    """One `search_chats()` (or `search_pages(raw=True)` with raw=True) over the whole tenant."""
    out = ClientRun()

    async def go() -> None:
        async with imi.ImiChatClient(
            base_url=sb.base_url,
            token=sb.token,
            team_id=sb.team_id,
            concurrency=k,
            adaptive=adaptive,
            rate_limit=rate_limit,
            max_retries=max_retries if retry_policy is None else None,
            retry_policy=retry_policy,
            rate_store=rate_store,
        ) as client:
            started = time.perf_counter()
            if raw:
                out.paging = imi.PagingStats()
                async for page in client.search_pages(
                    raw=True, prefetch=prefetch, max_pages=max_pages, stats=out.paging
                ):
                    if out.ttfr is None:
                        out.ttfr = time.perf_counter() - started
                    out.records += len(page.items)
                    if keep:
                        out.chats.extend(page.items)
            else:
                async for chat in client.search_chats(prefetch=prefetch, max_pages=max_pages):
                    if out.ttfr is None:
                        out.ttfr = time.perf_counter() - started
                    out.records += 1
                    if keep:
                        out.chats.append(chat)
            out.requests = client.stats.requests
            out.retries = client.stats.retries
            out.hedges = client.stats.hedges
            out.pages = client.stats.pages
            out.peak_in_flight = client.limiter.peak
            rate = client.limiter.rate
            out.send_rate = None if rate is None else rate.rate

    t = timed(go)
    out.wall, out.cpu = t.wall, t.cpu
    return out


def baseline_run(
    make: Callable[[], Awaitable[baselines.Outcome]],
) -> tuple[baselines.Outcome, Timed]:
    t = timed(make)
    outcome: baselines.Outcome = t.result
    return outcome, t


def sequential(sb: SandboxProcess) -> tuple[baselines.Outcome, Timed]:
    return baseline_run(lambda: baselines.sequential(sb.base_url, sb.token, sb.team_id))


def gather(sb: SandboxProcess, k: int) -> tuple[baselines.Outcome, Timed]:
    return baseline_run(lambda: baselines.gather_windows(sb.base_url, sb.token, sb.team_id, k))


def workers(sb: SandboxProcess, k: int) -> tuple[baselines.Outcome, Timed]:
    return baseline_run(lambda: baselines.workers(sb.base_url, sb.token, sb.team_id, k))


def check(what: str, got: int, expected: int) -> None:
    if got != expected:
        raise AssertionError(f"{what}: got {got} records, expected {expected}")
