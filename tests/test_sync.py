"""The blocking client against the sandbox (served from its own thread: the caller blocks)."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

import imichat_async as imi
from imichat_async import sandbox
from imichat_async._retry import RetryPolicy
from imichat_async._transport import AiohttpTransport
from imichat_async.sync import ImiChatClient
from tests.sandbox_thread import ThreadedSandbox

NO_WAIT = RetryPolicy.testing(max_retries=3)


@pytest.fixture
def sb() -> Iterator[sandbox.Sandbox]:
    with ThreadedSandbox(chats=95, seed=4) as server:
        yield server


@pytest.fixture
def slow_sb() -> Iterator[sandbox.Sandbox]:
    """300 chats (30 pages) answered after 20 ms: a search is still running when we leave it."""
    with ThreadedSandbox(chats=300, seed=4, latency=0.02) as server:
        yield server


def client_for(sb: sandbox.Sandbox, **kw: Any) -> ImiChatClient:
    kw.setdefault("token", sb.token)
    kw.setdefault("retry_policy", NO_WAIT)
    kw.setdefault("max_retries", NO_WAIT.max_retries)
    return ImiChatClient(base_url=sb.base_url, team_id=sb.team_id, **kw)


def tasks_left(client: ImiChatClient) -> list[asyncio.Task[Any]]:
    """Tasks on the client's loop besides the one asking and the loop's own."""
    ours = {client._portal.main_task}

    def pending() -> list[asyncio.Task[Any]]:
        ours.add(asyncio.current_task())
        return [t for t in asyncio.all_tasks() if t not in ours and not t.done()]

    return client._portal.call(pending)


def test_search_chats_from_plain_code_returns_every_chat_in_order(sb: sandbox.Sandbox) -> None:
    """Every chat, in the server's order, through a `with` block and a `for` loop."""
    with client_for(sb, concurrency=4) as client:
        got = [chat.chat_id for chat in client.search_chats()]
        closed = [chat for chat in client.search_chats(status="closed")]
    assert got == [c["chat_id"] for c in sb.data]
    assert all(isinstance(c, imi.Chat) for c in closed)
    assert [c.chat_id for c in closed] == [c["chat_id"] for c in sb.data if c["status"] == "closed"]


def test_search_pages_yields_numbered_pages(sb: sandbox.Sandbox) -> None:
    """search_pages: ChatPage(number, items) for pages 1..10 of 95 chats."""
    with client_for(sb) as client:
        pages = list(client.search_pages(max_pages=20))
    assert [p.number for p in pages] == list(range(1, 11))
    assert [len(p.items) for p in pages] == [10] * 9 + [5]


def test_server_date_is_the_async_clients(sb: sandbox.Sandbox) -> None:
    """`server_date`: None before any answer, then the sandbox's `Date`, as the async client's."""
    with client_for(sb) as client:
        assert client.server_date is None
        list(client.search_pages(max_pages=1))
        at = client.server_date
        assert at == client.async_client.server_date
    assert at is not None and at.utcoffset() == timedelta(0)
    assert abs(at - datetime.now(timezone.utc)) < timedelta(minutes=1)


async def test_works_from_inside_a_running_event_loop(sb: sandbox.Sandbox) -> None:
    """Called from a coroutine (a notebook cell): no asyncio.run clash, the same chats."""
    asyncio.get_running_loop()  # there is one, in this very thread
    with client_for(sb) as client:
        got = [chat.chat_id for chat in client.search_chats()]
    assert got == [c["chat_id"] for c in sb.data]


def test_break_streams_and_leaves_nothing_behind(slow_sb: sandbox.Sandbox) -> None:
    """After a break: few pages were asked for, no task or slot left; close() ends all."""
    threads_before = set(threading.enumerate())
    client = client_for(slow_sb, concurrency=4)
    for chat in client.search_chats():
        assert chat.chat_id == slow_sb.data[0]["chat_id"]
        break
    assert slow_sb.stats.requests_total <= 1 + 4  # streaming: not 30 pages read first
    assert client.limiter.in_flight == 0
    assert tasks_left(client) == []
    transport = client._client._transport
    assert isinstance(transport, AiohttpTransport)
    session = transport._session
    assert session is not None
    client.close()
    assert session.closed
    assert client.closed
    assert set(threading.enumerate()) == threads_before


def test_a_dropped_generator_cancels_its_search(slow_sb: sandbox.Sandbox) -> None:
    """A generator left half-read and dropped is closed: its requests cancelled on the loop."""
    with client_for(slow_sb, concurrency=4) as client:
        chats = client.search_chats()
        next(chats)
        del chats
        gc.collect()
        assert client.limiter.in_flight == 0
        assert tasks_left(client) == []
        # The client is still usable afterwards.
        assert len(list(client.search_chats(max_pages=2))) == 20


def test_a_client_never_closed_is_cleaned_up_when_collected(sb: sandbox.Sandbox) -> None:
    """Dropping an unclosed client closes its session and ends its loop thread."""
    threads_before = set(threading.enumerate())
    client = client_for(sb)
    next(client.search_chats())
    transport = client._client._transport
    assert isinstance(transport, AiohttpTransport)
    session = transport._session
    assert session is not None
    del client
    gc.collect()
    assert session.closed
    assert set(threading.enumerate()) == threads_before


def test_bad_query_raises_at_the_call_before_any_request(sb: sandbox.Sandbox) -> None:
    """InvalidQueryError at the call (not at the first next()), and nothing sent."""
    with client_for(sb) as client:
        with pytest.raises(imi.InvalidQueryError, match="colour"):
            client.search_chats(colour="red")
        with pytest.raises(imi.InvalidQueryError, match="prefetch"):
            client.search_pages(prefetch=0)
    assert sb.stats.requests_total == 0


def test_api_errors_are_the_async_clients(sb: sandbox.Sandbox) -> None:
    """A refused token raises InvalidTokenError (status_code 2003) from the loop."""
    with (
        client_for(sb, token="not-a-token") as client,
        pytest.raises(imi.InvalidTokenError) as info,
    ):
        list(client.search_chats())
    assert info.value.status_code == 2003


def test_constructor_errors_raise_and_leave_no_thread() -> None:
    """A bad argument raises the async client's error, and the loop thread is gone."""
    threads_before = set(threading.enumerate())
    with pytest.raises(imi.ConfigurationError, match="concurrency"):
        ImiChatClient(base_url="https://x.example", token="t", team_id="t", concurrency=0)
    with pytest.raises(imi.ConfigurationError, match="session"):
        ImiChatClient(base_url="https://x.example", token="t", team_id="t", session=object())
    assert set(threading.enumerate()) == threads_before


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_token_callables_sync_or_async_are_refreshed(kind: str) -> None:
    """A plain or an async token callable: called first, and again after each 2004."""
    calls: list[str] = []
    with ThreadedSandbox(chats=60, seed=2, token_max_uses=2) as server:
        loop_thread: list[threading.Thread] = []

        def fetch_sync() -> str:
            loop_thread.append(threading.current_thread())
            token = server._issue()
            calls.append(token)
            return token

        async def fetch_async() -> str:
            return fetch_sync()

        token = fetch_sync if kind == "sync" else fetch_async
        with client_for(server, token=token, concurrency=1) as client:
            got = [c.chat_id for c in client.search_chats()]
            refreshes = client.stats.token_refreshes
    assert got == [c["chat_id"] for c in server.data]
    assert refreshes == len(calls) - 1 >= 2
    assert threading.main_thread() not in loop_thread  # never on the caller's thread


def test_a_closed_client_refuses_to_search(sb: sandbox.Sandbox) -> None:
    """close() is idempotent; a search afterwards raises ImiChatError, not a hang."""
    client = client_for(sb)
    client.close()
    client.close()
    with pytest.raises(imi.ImiChatError, match="closed"):
        client.search_chats()
    assert "token" in repr(client) and sb.token not in repr(client)


def test_run_drives_async_code_with_the_async_client(sb: sandbox.Sandbox) -> None:
    """`run(coro)` runs async code using `async_client` on the client's own loop and returns
    its result; once closed, it refuses (and closes the coroutine: no warning) (issue #25)."""
    client = client_for(sb)

    async def first_ids() -> list[str]:
        async for page in client.async_client.search_pages(raw=True, max_pages=1):
            return [chat["chat_id"] for chat in page.items]
        return []

    with client:
        assert client.run(first_ids()) == [c["chat_id"] for c in sb.data[:10]]
        assert client.limiter.in_flight == 0 and client.limiter.peak >= 1
    with pytest.raises(imi.ImiChatError, match="closed"):
        client.run(first_ids())
