"""The token callable against the sandbox: a stale answer spoils one search only, and a
failure inside the callable is reported as the token provider's, the original chained."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

import imichat_async as imi
from imichat_async import sandbox
from imichat_async._retry import RetryPolicy

NO_WAIT = RetryPolicy.testing(max_retries=3)


def client_for(sb: sandbox.Sandbox, **kw: Any) -> imi.ImiChatClient:
    kw.setdefault("retry_policy", NO_WAIT)
    return imi.ImiChatClient(base_url=sb.base_url, team_id=sb.team_id, **kw)


async def ids_of(chats: AsyncIterator[imi.Chat]) -> list[str]:
    return [chat.chat_id async for chat in chats]


class StaleOnce:
    """A token callable whose cache hands back the just-expired token once, then fresh ones."""

    def __init__(self, sb: sandbox.Sandbox) -> None:
        self.sb = sb
        self.calls = 0
        self.current = sb.token
        self.stale_left = 0

    async def __call__(self) -> str:
        self.calls += 1
        await asyncio.sleep(0)
        if self.stale_left:
            self.stale_left -= 1
            return self.current  # the cache was not renewed: the token that just expired
        self.current = await self.sb.new_token()
        return self.current


async def test_stale_token_fails_one_search_and_the_next_asks_again() -> None:
    """The callable hands back the just-expired token once: that search fails with
    TokenExpiredError; the next search calls the callable again and succeeds."""
    async with sandbox.serve(chats=45, seed=11) as sb:
        source = StaleOnce(sb)
        async with client_for(sb, token=source, concurrency=4) as client:
            assert len(await ids_of(client.search_chats())) == 45
            assert source.calls == 1
            sb.expire_token()  # every token issued so far
            source.stale_left = 1
            with pytest.raises(imi.TokenExpiredError, match="same token") as info:
                await ids_of(client.search_chats())
            assert source.current not in str(info.value)
            assert source.calls == 2  # one refresh, which handed back the expired token
            assert len(await ids_of(client.search_chats())) == 45
            assert source.calls == 3  # asked again, once
            assert len(await ids_of(client.search_chats())) == 45
            assert source.calls == 3  # the fresh token is kept


async def test_same_stale_token_again_costs_one_call_per_search() -> None:
    """A callable that keeps handing back the expired token is asked once per search,
    never a request sent with the token known to be expired."""
    async with sandbox.serve(chats=45, seed=11) as sb:
        source = StaleOnce(sb)
        async with client_for(sb, token=source, concurrency=4) as client:
            await ids_of(client.search_chats())
            sb.expire_token()
            source.stale_left = 10
            for calls in (2, 3, 4):
                with pytest.raises(imi.TokenExpiredError, match="same token"):
                    await ids_of(client.search_chats())
                assert source.calls == calls
            sent = sb.stats.requests_total
            assert sent == 5 + 1  # 5 pages, then one request with the token that expired
    assert sb.stats.expired_hits == 1


FAILURES = [
    TimeoutError("identity provider timed out"),
    asyncio.TimeoutError(),
    RuntimeError("identity provider down"),
    OSError("connection refused by the identity provider"),
]


@pytest.mark.parametrize("failure", FAILURES, ids=lambda exc: type(exc).__name__)
@pytest.mark.parametrize("deadline", [None, 60.0])
async def test_failure_in_the_callable_is_a_token_provider_error(
    failure: Exception, deadline: float | None
) -> None:
    """An exception raised by the token callable (a TimeoutError included, also under a
    search deadline) raises TokenProviderError, an ImiChatError, the original chained;
    nothing is sent."""

    async def source() -> str:
        raise failure

    async with sandbox.serve(chats=45, seed=11) as sb, client_for(sb, token=source) as client:
        with pytest.raises(imi.TokenProviderError) as info:
            await ids_of(client.search_chats(deadline=deadline))
    err = info.value
    assert isinstance(err, imi.ImiChatError)
    assert not isinstance(err, (imi.SearchTimeoutError, TimeoutError))
    assert err.__cause__ is failure
    assert type(failure).__name__ in str(err)
    assert sb.stats.requests_total == 0


async def test_failure_in_the_callable_on_refresh_is_a_token_provider_error() -> None:
    """After a 2004, a callable that raises fails the search with TokenProviderError (the
    original chained), and the token is in no message; the next search asks again."""
    async with sandbox.serve(chats=45, seed=11) as sb:
        calls: list[int] = []
        secret = sb.token

        async def source() -> str:
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError(f"refresh refused for {secret}")
            return sb.token if len(calls) == 1 else await sb.new_token()

        async with client_for(sb, token=source) as client:
            await ids_of(client.search_chats())
            sb.expire_token()
            with pytest.raises(imi.TokenProviderError) as info:
                await ids_of(client.search_chats())
            assert isinstance(info.value.__cause__, RuntimeError)
            assert secret not in str(info.value)
            assert len(await ids_of(client.search_chats())) == 45
    assert len(calls) == 3
