"""Hedges against the sandbox, seen from the server: a tenant counts a request until its
handler ends, so a hedge race lost mid-flight keeps its slot until the server answered."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import imichat_async as imi
from imichat_async import sandbox
from imichat_async._retry import RetryPolicy
from tests.helpers import _is_client_side

NO_WAIT = RetryPolicy.testing(max_retries=5)


def client_for(sb: sandbox.Sandbox, **kw: Any) -> imi.ImiChatClient:
    return imi.ImiChatClient(
        base_url=sb.base_url, token=sb.token, team_id=sb.team_id, retry_policy=NO_WAIT, **kw
    )


@pytest.mark.parametrize("deadline", [None, 60.0])
async def test_hedges_stay_within_concurrency_as_the_server_counts(
    deadline: float | None,
) -> None:
    """A head page hangs, a hedge wins: the server never has more than `concurrency` of the
    client's requests in flight (the lost original holds its slot until its handler ends),
    and every chat comes once, in order."""
    concurrency = 8
    async with sandbox.serve(
        chats=1200, seed=5, latency=0.01, fault_pages={40: "hang", 80: "hang"}, hang_seconds=0.4
    ) as sb:
        async with client_for(sb, concurrency=concurrency) as client:
            got = [c.chat_id async for c in client.search_chats(deadline=deadline)]
            hedges, won = client.stats.hedges, client.limiter.peak
        assert got == [c["chat_id"] for c in sb.data]
        assert hedges >= 1  # the hang was hedged: the test covers a race lost mid-flight
        assert sb.stats.faults["hang"] == 2
        assert won <= concurrency
        assert sb.stats.peak_in_flight <= concurrency


async def test_hedging_costs_no_task_per_request() -> None:
    """With hedging on (the default), a request runs in its page's own task: the client
    creates one task per page requested, plus a constant, not one more per request (the
    guarantee above is kept by marking a loser on the wire, not by shielding each send)."""
    created: list[asyncio.Task[Any]] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kw)
        created.append(task)
        return task

    async with sandbox.serve(chats=600, seed=5) as sb, client_for(sb, concurrency=4) as client:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(factory)
        try:
            stats = imi.PagingStats()
            pages = client.search_pages(stats=stats)
            got = [c.chat_id async for page in pages for c in page.items]
        finally:
            loop.set_task_factory(None)
    assert got == [c["chat_id"] for c in sb.data]
    assert stats.pages_requested == 60 and stats.hedges == 0
    # The library's own tasks (aiohttp starts one per request to write its body: not ours).
    ours = [t for t in created if _is_client_side(t) and "aiohttp" not in _code_file(t)]
    assert len(ours) <= stats.pages_requested + 2


def _code_file(task: asyncio.Task[Any]) -> str:
    return str(task.get_coro().cr_code.co_filename)  # type: ignore[union-attr]
