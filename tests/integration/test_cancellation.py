"""Cancellation at random moments, against the sandbox with latency, faults and expiring tokens.

Each iteration starts a search and leaves it at a seeded random moment: `wait_for` with a random
timeout, `task.cancel()` (once or twice) after a random delay, `break` or an exception after a
random number of chats, `aclose()` on the generator, a search `deadline=`, or cancelling one of
two sibling searches. Those moments land during a request, during a backoff sleep, during a token
refresh and between yields; the probes below count where they landed, and the test asserts every
kind was hit. After each iteration: no task left, no slot of the client-wide limiter held, no
connection acquired from the pool, and a new search on the same client reaches full concurrency
and returns exactly the expected chats. At the end the client is closed, and no connection, no
ResourceWarning and no loop error (e.g. "Task was destroyed but it is pending") remains.
"""

from __future__ import annotations

import asyncio
import gc
import random
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import pytest

import imichat_async as imi
from imichat_async import sandbox
from imichat_async._query import build_query
from imichat_async._retry import RetryPolicy
from imichat_async._transport import AiohttpTransport
from tests.helpers import assert_no_stray_tasks

try:  # psutil comes with the `bench` extra; without it the socket counts are skipped
    import psutil
except ImportError:  # pragma: no cover
    psutil = None

CONCURRENCY = 4
CHATS = 160  # 16 pages unfiltered
ITERATIONS = 24
REFRESH_DELAY = 0.02  # the token callable's own latency: cancellations land inside it
# Small but real backoff, so that "during backoff sleep" is a moment a cancellation can hit.
BACKOFF = RetryPolicy(max_retries=12, backoff_initial=0.02, backoff_max=0.05)
FAULTS = sandbox.Faults(
    latency=0.003,
    jitter=0.008,
    p_2007=0.05,
    p_3454=0.03,
    p_429=0.05,  # no Retry-After: the client's own backoff is used
    p_502=0.03,
    p_503=0.03,
    p_reset=0.03,
)
QUERIES: list[dict[str, Any]] = [{}, {"status": "closed"}, {"status__not_eq": "queued"}]
MODES = (
    "cancel_in_request",
    "cancel_in_backoff",
    "cancel_in_refresh",
    "wait_for",
    "cancel",
    "cancel_twice",
    "break",
    "break_aclosing",
    "raise",
    "aclose",
    "deadline",
    "sibling",
)


class Probe:
    """Where the cancellations landed, and what is still running."""

    def __init__(self) -> None:
        self.refreshing = 0
        self.sleeping = 0
        self.cancelled_in_refresh = 0
        self.cancelled_in_backoff = 0
        self.cancelled_with_requests_in_flight = 0
        self.left_between_yields = 0
        self.modes: dict[str, int] = dict.fromkeys(MODES, 0)
        self.loop_errors: list[dict[str, Any]] = []
        self.in_refresh = asyncio.Event()
        self.in_backoff = asyncio.Event()

    def arm(self) -> None:
        self.in_refresh.clear()
        self.in_backoff.clear()

    def token_source(self, sb: sandbox.Sandbox) -> Callable[[], Awaitable[str]]:
        async def fresh_token() -> str:
            self.refreshing += 1
            self.in_refresh.set()
            try:
                await asyncio.sleep(REFRESH_DELAY)
                return await sb.new_token()
            except asyncio.CancelledError:
                self.cancelled_in_refresh += 1
                raise
            finally:
                self.refreshing -= 1

        return fresh_token

    async def backoff_sleep(self, seconds: float) -> None:
        self.sleeping += 1
        self.in_backoff.set()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled_in_backoff += 1
            raise
        finally:
            self.sleeping -= 1


class Boom(Exception):
    """Raised by a consumer in the middle of a search."""


def expected_ids(sb: sandbox.Sandbox, query: dict[str, Any]) -> list[str]:
    filters = build_query(query).filters
    return [c["chat_id"] for c in sb.expected(list(filters))]


def client_sockets(port: int) -> int:
    """Open client-side TCP sockets of this process to the sandbox's port (0 without psutil)."""
    if psutil is None:  # pragma: no cover
        return 0
    conns = psutil.Process().net_connections(kind="tcp")
    return sum(1 for c in conns if c.raddr and c.raddr.port == port)


def acquired_connections(client: imi.ImiChatClient) -> int:
    """Connections taken from the pool and not given back.

    PRIVATE API, on purpose: aiohttp has no public count of acquired connections, so this reads
    the client's session (`_transport._session`) and aiohttp's `BaseConnector._acquired`.
    """
    transport = client._transport
    assert isinstance(transport, AiohttpTransport)
    session = transport._session
    if session is None or session.connector is None:
        return 0
    return len(session.connector._acquired)


async def collect(chats: AsyncIterator[imi.Chat]) -> list[str]:
    return [chat.chat_id async for chat in chats]


async def finished_or_cancelled(task: asyncio.Future[list[str]], expected: list[str]) -> None:
    """The task was cancelled, or it finished first with the whole, exact result."""
    try:
        got = await task
    except asyncio.CancelledError:
        return
    assert got == expected, "a search that was not cancelled lost or gained chats"


async def leave_early(
    client: imi.ImiChatClient, probe: Probe, rng: random.Random, mode: str, sb: sandbox.Sandbox
) -> None:
    """Run one search and leave it at a random moment, the way `mode` says."""
    query = rng.choice(QUERIES)
    probe.modes[mode] += 1
    probe.arm()

    async def cancel_after(task: asyncio.Task[Any], delay: float, twice: bool) -> None:
        await asyncio.sleep(delay)
        if client.limiter.in_flight > 0:
            probe.cancelled_with_requests_in_flight += 1
        task.cancel()
        if twice:
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)
            task.cancel()

    if mode.startswith("cancel_in_"):
        # Targeted: wait for the moment to come (if it does), then cancel one tick later.
        task = asyncio.ensure_future(collect(client.search_chats(**query)))
        if mode == "cancel_in_request":
            await asyncio.sleep(rng.uniform(0.0, 0.01))
        else:
            event = probe.in_backoff if mode == "cancel_in_backoff" else probe.in_refresh
            waiter = asyncio.ensure_future(event.wait())
            await asyncio.wait([task, waiter], timeout=2.0, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        await cancel_after(task, 0.0, False)
        await finished_or_cancelled(task, expected_ids(sb, query))
    elif mode == "wait_for":
        try:
            got = await asyncio.wait_for(
                collect(client.search_chats(**query)), rng.uniform(0, 0.08)
            )
        except asyncio.TimeoutError:
            pass
        else:  # finished first: then it must be whole
            assert got == expected_ids(sb, query)
    elif mode in ("cancel", "cancel_twice"):
        task = asyncio.ensure_future(collect(client.search_chats(**query)))
        await cancel_after(task, rng.uniform(0.0, 0.08), mode == "cancel_twice")
        await finished_or_cancelled(task, expected_ids(sb, query))
    elif mode in ("break", "break_aclosing", "raise"):
        k = rng.randrange(0, 60)
        probe.left_between_yields += 1
        seen = 0
        if mode == "break":
            # The plain form users write: the generator is closed by the loop's finalizer.
            async for _ in client.search_chats(**query):
                seen += 1
                if seen > k:
                    break
        elif mode == "break_aclosing":
            async with aclosing(client.search_chats(**query)) as chats:
                async for _ in chats:
                    seen += 1
                    if seen > k:
                        break
        else:
            with pytest.raises(Boom):
                async for _ in client.search_chats(**query):
                    seen += 1
                    if seen > k:
                        raise Boom
    elif mode == "aclose":
        probe.left_between_yields += 1
        gen = client.search_chats(**query)
        for _ in range(rng.randrange(0, 40)):
            await gen.__anext__()
        await gen.aclose()
    elif mode == "deadline":
        try:
            got = await collect(client.search_chats(deadline=rng.uniform(0.005, 0.1), **query))
        except imi.SearchTimeoutError:
            pass
        else:
            assert got == expected_ids(sb, query)
    elif mode == "sibling":
        other = rng.choice(QUERIES)
        victim = asyncio.ensure_future(collect(client.search_chats(**query)))
        survivor = asyncio.ensure_future(collect(client.search_chats(**other)))
        await cancel_after(victim, rng.uniform(0.0, 0.08), False)
        await finished_or_cancelled(victim, expected_ids(sb, query))
        assert await survivor == expected_ids(sb, other), "a sibling search lost or gained chats"
    else:  # pragma: no cover
        raise AssertionError(mode)


async def assert_clean(client: imi.ImiChatClient, probe: Probe, port: int, where: str) -> None:
    """Nothing of the left search is still running or held."""
    await assert_no_stray_tasks()
    assert client.limiter.in_flight == 0, f"{where}: limiter slots still held"
    assert probe.refreshing == 0, f"{where}: a token refresh is still running"
    assert probe.sleeping == 0, f"{where}: a backoff sleep is still running"
    assert acquired_connections(client) == 0, f"{where}: connections still acquired from the pool"
    assert client_sockets(port) <= CONCURRENCY, f"{where}: more sockets than the pool allows"


@pytest.mark.parametrize("seed", [0, 1])
async def test_random_cancellation_leaves_nothing_behind(seed: int) -> None:
    """Leaving searches at random moments leaks no task, slot, connection or warning."""
    rng = random.Random(seed)
    probe = Probe()
    loop = asyncio.get_running_loop()
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: probe.loop_errors.append(ctx))
    try:
        async with sandbox.serve(chats=CHATS, seed=seed, faults=FAULTS, token_max_uses=12) as sb:
            async with imi.ImiChatClient(
                base_url=sb.base_url,
                token=probe.token_source(sb),
                team_id=sb.team_id,
                concurrency=CONCURRENCY,
                timeout=5.0,
                retry_policy=BACKOFF,
                max_retries=BACKOFF.max_retries,
                sleep=probe.backoff_sleep,
            ) as client:
                full = [c["chat_id"] for c in sb.data]
                for i in range(ITERATIONS):
                    mode = MODES[i % len(MODES)] if i < len(MODES) else rng.choice(MODES)
                    where = f"iteration {i} ({mode})"
                    await leave_early(client, probe, rng, mode, sb)
                    await assert_clean(client, probe, sb.port, where)

                    # The same client still works at full concurrency and loses nothing.
                    client.limiter.peak = 0
                    got = await collect(client.search_chats())
                    assert got == full, f"{where}: the next search did not return the exact data"
                    assert client.limiter.peak == CONCURRENCY, (
                        f"{where}: the next search reached only {client.limiter.peak} in flight"
                    )
                    await assert_clean(client, probe, sb.port, where + ", next search")

                await client.close()
                for _ in range(3):
                    await asyncio.sleep(0)
            assert client_sockets(sb.port) == 0, "connections left open after client.close()"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gc.collect()
        leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        assert leaks == [], f"unclosed resources: {leaks}"
        await assert_no_stray_tasks()
    finally:
        loop.set_exception_handler(previous_handler)
    assert probe.loop_errors == [], f"errors reported to the loop: {probe.loop_errors}"

    # Every kind of moment was really hit (the test would be vacuous otherwise).
    assert probe.cancelled_with_requests_in_flight > 0, "no cancellation during a request"
    assert probe.cancelled_in_backoff > 0, "no cancellation during a backoff sleep"
    assert probe.cancelled_in_refresh > 0, "no cancellation during a token refresh"
    assert probe.left_between_yields > 0, "no search left between yields"
    print(
        f"\nseed {seed}: modes {probe.modes}; cancelled during requests "
        f"{probe.cancelled_with_requests_in_flight}, backoff {probe.cancelled_in_backoff}, "
        f"refresh {probe.cancelled_in_refresh}; left between yields {probe.left_between_yields}; "
        f"faults {dict(sb.stats.faults)}; tokens issued {sb.stats.tokens_issued}"
    )
