"""Against a tenant with a request budget the client is not told (the sandbox's rate limit).

Real HTTP on 127.0.0.1 and real `Retry-After: 1` waits (a few seconds in all).
Everything asserted is a count: records, requests, 429s, the learned rate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

import imichat_async as imi
from imichat_async.sandbox import Sandbox, serve

RATE = 200.0  # the tenant's budget, requests/s
BURST = 10
PAGES = 100
K = 8  # requests in flight (800/s possible at 10 ms: 4 x the budget, also on a loaded machine);
# the blind first round trip may draw up to K 429s (README)


@pytest.fixture
async def tenant() -> AsyncIterator[Sandbox]:
    """A sandbox of 100 pages with a 200/s, burst-10 rate limit (429, Retry-After: 1)."""
    async with serve(PAGES * 10, seed=3, latency=0.01, rate_limit=RATE, rate_burst=BURST) as sb:
        yield sb


def client_for(sb: Sandbox, **kw: Any) -> imi.ImiChatClient:
    return imi.ImiChatClient(
        base_url=sb.base_url, token=sb.token, team_id=sb.team_id, max_retries=20, **kw
    )


async def ids(client: imi.ImiChatClient, **kw: Any) -> list[str]:
    return [chat.chat_id async for chat in client.search_chats(**kw)]


def accepted(sb: Sandbox) -> int:
    return sb.stats.requests_total - sb.stats.rate_limited


async def test_learns_the_budget_with_few_429s(tenant: Sandbox) -> None:
    """One search: every chat once, in order; 429s <= k + 5 %; the rate found near 200/s."""
    sb = tenant
    async with client_for(sb, concurrency=K, adaptive=True) as client:
        got = await ids(client)
        rate = client.limiter.rate
        hedges = client.stats.hedges
    assert got == [c["chat_id"] for c in sb.data]
    assert PAGES <= accepted(sb) <= PAGES + hedges  # each page once, but for early hedges
    assert sb.stats.throttled == sb.stats.rate_limited  # every 429 was the rate limit's
    assert 1 <= sb.stats.rate_limited <= K + 0.05 * sb.stats.requests_total
    assert rate is not None and rate.rate is not None
    assert 0.5 * RATE <= rate.rate <= 2 * RATE  # probes above it, capped at 2 x accepted


async def test_learned_rate_carries_over_to_the_next_search(tenant: Sandbox) -> None:
    """A second search of the same client starts at the rate the first learned: few 429s."""
    sb = tenant
    async with client_for(sb, concurrency=K, adaptive=True) as client:
        await ids(client)
        first = sb.stats.rate_limited
        rate = client.limiter.rate
        learned = rate.rate if rate is not None else None
        got = await ids(client, max_pages=50)
        assert client.limiter.rate is rate  # one rate per client, not one per search
    assert first >= 1
    assert learned is not None and 0.5 * RATE <= learned <= 2 * RATE
    # Starting at the learned rate, not blind: at most a probe or two above it is refused.
    assert sb.stats.rate_limited - first <= 3
    assert got == [c["chat_id"] for c in sb.data[:500]]


async def test_two_concurrent_searches_share_one_budget(tenant: Sandbox) -> None:
    """Two searches of one client at once draw on one learned rate: each exact, 429s <= k + 5 %."""
    sb = tenant
    closed = [c["chat_id"] for c in sb.expected([("status", "eq", "closed")])]
    queued = [c["chat_id"] for c in sb.expected([("status", "not_eq", "closed")])]
    async with client_for(sb, concurrency=K, adaptive=True) as client:
        a, b = await asyncio.gather(
            ids(client, status="closed"), ids(client, status__not_eq="closed")
        )
        rate = client.limiter.rate
        hedges = client.stats.hedges
    assert (a, b) == (closed, queued)
    pages = -(-len(closed) // 10) + -(-len(queued) // 10)
    assert pages <= accepted(sb) <= pages + hedges
    assert sb.stats.rate_limited <= K + 0.05 * sb.stats.requests_total
    assert rate is not None and rate.rate is not None
    assert 0.5 * RATE <= rate.rate <= 2 * RATE  # probes above it, capped at 2 x accepted


@pytest.mark.parametrize("adaptive", ["yes", 1.5, "aimd"])
def test_adaptive_option_is_checked(adaptive: Any) -> None:
    """`adaptive` takes True, False, "rate" or "concurrency"; anything else is refused at once."""
    with pytest.raises(imi.ImiChatError, match="adaptive must be"):
        imi.ImiChatClient(base_url="https://x.test/v3.0", token="t", team_id="t", adaptive=adaptive)


def test_modes_build_one_rate_per_client() -> None:
    """rate_limit alone: a fixed bucket; adaptive=True: a learned rate (rate_limit its ceiling)."""

    def rate_of(**kw: Any) -> Any:
        return imi.ImiChatClient(
            base_url="https://x.test/v3.0", token="t", team_id="t", **kw
        ).limiter.rate

    assert rate_of() is None
    assert rate_of(adaptive="concurrency") is None
    fixed = rate_of(rate_limit=7.0)
    assert (fixed.adaptive, fixed.rate) == (False, 7.0)
    learned = rate_of(adaptive=True)
    assert (learned.adaptive, learned.rate) == (True, None)
    capped = rate_of(adaptive="rate", rate_limit=7.0)
    assert (capped.adaptive, capped.ceiling) == (True, 7.0)


def test_no_hedging_while_a_send_rate_is_in_force() -> None:
    """A given rate_limit, or a learned rate once throttled, turns hedging off; none before."""

    def client(**kw: Any) -> imi.ImiChatClient:
        return imi.ImiChatClient(base_url="https://x.test/v3.0", token="t", team_id="t", **kw)

    assert client(rate_limit=5.0).limiter.backing_off
    learned = client(adaptive=True)
    assert not learned.limiter.backing_off  # no throttle yet: nothing learned, hedges allowed
    rate = learned.limiter.rate
    assert rate is not None
    for _ in range(5):
        rate.feedback(rate.sent(), throttled=False, ok=True)
    rate.feedback(rate.sent(), throttled=True, ok=False)
    assert learned.limiter.backing_off
    assert not client().limiter.backing_off
