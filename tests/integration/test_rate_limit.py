"""Against a tenant with a request budget the client is not told (a gateway's token bucket).

Real HTTP on 127.0.0.1 and real `Retry-After: 1` waits (a few seconds in all).
Everything asserted is a count: records, requests, 429s, the learned rate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

import imichat_async as imi
from benchmarks import rate_tenant
from imichat_async.sandbox import Sandbox

RATE = 200.0  # the tenant's budget, requests/s
BURST = 10
PAGES = 100


@pytest.fixture
async def tenant() -> AsyncIterator[tuple[Sandbox, rate_tenant.RateLimit]]:
    """The sandbox behind a 200/s, burst-10 gateway (the one place to switch to a sandbox knob)."""
    async with rate_tenant.serve(PAGES * 10, rate=RATE, burst=BURST, seed=3, latency=0.01) as t:
        yield t


def client_for(sb: Sandbox, **kw: Any) -> imi.ImiChatClient:
    return imi.ImiChatClient(
        base_url=sb.base_url, token=sb.token, team_id=sb.team_id, max_retries=20, **kw
    )


async def ids(client: imi.ImiChatClient, **kw: Any) -> list[str]:
    return [chat.chat_id async for chat in client.search_chats(**kw)]


async def test_learns_the_budget_with_few_429s(
    tenant: tuple[Sandbox, rate_tenant.RateLimit],
) -> None:
    """One search: every chat once, in order; <= 5 % of requests 429; the rate found near 200/s."""
    sb, gateway = tenant
    async with client_for(sb, concurrency=4, adaptive=True) as client:
        got = await ids(client)
        rate = client.limiter.rate
    assert got == [c["chat_id"] for c in sb.data]
    assert gateway.accepted == PAGES  # each page served once: no duplicate, none lost
    total = gateway.accepted + gateway.throttled
    assert 1 <= gateway.throttled <= 0.05 * total
    assert rate is not None and rate.rate is not None
    assert 0.5 * RATE <= rate.rate <= 1.5 * RATE


async def test_learned_rate_carries_over_to_the_next_search(
    tenant: tuple[Sandbox, rate_tenant.RateLimit],
) -> None:
    """A second search of the same client starts at the learned rate: at most one 429."""
    sb, gateway = tenant
    async with client_for(sb, concurrency=4, adaptive=True) as client:
        await ids(client, max_pages=50)
        first = gateway.throttled
        gateway.reset()
        got = await ids(client, max_pages=50)
    assert first >= 1
    assert gateway.throttled <= 1
    assert got == [c["chat_id"] for c in sb.data[:500]]


async def test_two_concurrent_searches_share_one_budget(
    tenant: tuple[Sandbox, rate_tenant.RateLimit],
) -> None:
    """Two searches of one client at once draw on one learned rate: each exact, <= 5 % 429s."""
    sb, gateway = tenant
    closed = [c["chat_id"] for c in sb.expected([("status", "eq", "closed")])]
    queued = [c["chat_id"] for c in sb.expected([("status", "not_eq", "closed")])]
    async with client_for(sb, concurrency=4, adaptive=True) as client:
        a, b = await asyncio.gather(
            ids(client, status="closed"), ids(client, status__not_eq="closed")
        )
        rate = client.limiter.rate
    assert (a, b) == (closed, queued)
    total = gateway.accepted + gateway.throttled
    assert gateway.accepted == -(-len(closed) // 10) + -(-len(queued) // 10)
    assert gateway.throttled <= 0.05 * total
    assert rate is not None and rate.rate is not None
    assert 0.5 * RATE <= rate.rate <= 1.5 * RATE


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
