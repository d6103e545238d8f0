"""search_chats() against the sandbox over real HTTP on 127.0.0.1: the issue's integration list."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import datetime, timezone
from typing import Any

import pytest

import imichat_async as imi
from imichat_async import sandbox
from imichat_async._retry import RetryPolicy
from tests.helpers import assert_no_stray_tasks

NO_WAIT = RetryPolicy.testing(max_retries=8)


def client_for(sb: sandbox.Sandbox, **kw: Any) -> imi.ImiChatClient:
    kw.setdefault("token", sb.token)
    kw.setdefault("retry_policy", NO_WAIT)
    return imi.ImiChatClient(base_url=sb.base_url, team_id=sb.team_id, **kw)


async def ids_of(chats: AsyncIterator[imi.Chat]) -> list[str]:
    return [chat.chat_id async for chat in chats]


@pytest.fixture
async def sb() -> AsyncIterator[sandbox.Sandbox]:
    async with sandbox.serve(chats=1234, seed=7) as server:
        yield server


@pytest.mark.parametrize("concurrency", [1, 4, 16])
async def test_full_retrieval_equals_the_data(sb: sandbox.Sandbox, concurrency: int) -> None:
    """Every chat, in the server's order, no duplicates, nothing missing, at any concurrency."""
    async with client_for(sb, concurrency=concurrency) as client:
        got = await ids_of(client.search_chats())
        peak = client.limiter.peak
    assert got == [c["chat_id"] for c in sb.data]
    assert len(set(got)) == 1234
    assert sb.stats.peak_in_flight <= concurrency
    assert peak <= concurrency
    assert sb.stats.requests_total == 124  # 124 pages, X-Total-Count: none past the end


@pytest.mark.parametrize("total_header", [True, False])
async def test_pages_past_the_end(total_header: bool) -> None:
    """With X-Total-Count no page past the end is asked for; without it, fewer than prefetch."""
    async with (
        sandbox.serve(chats=95, seed=1, total_header=total_header) as server,
        client_for(server, concurrency=8) as client,
    ):
        got = await ids_of(client.search_chats(prefetch=8))
    assert got == [c["chat_id"] for c in server.data]
    past_end = sum(n for page, n in server.stats.requests_by_page.items() if page > 10)
    if total_header:
        assert past_end == 0
    else:
        assert past_end <= 8 - 1


async def test_every_transient_fault_mix_loses_nothing() -> None:
    """2007, 3454, 429, 502, 503, 504 and resets at once: the same exact result."""
    faults = sandbox.Faults(
        p_2007=0.04,
        p_3454=0.04,
        p_429=0.04,
        retry_after=0,
        p_502=0.04,
        p_503=0.04,
        p_504=0.04,
        p_reset=0.04,
    )
    async with (
        sandbox.serve(chats=1500, seed=3, faults=faults) as server,
        client_for(
            server, concurrency=8, retry_policy=RetryPolicy.testing(max_retries=12)
        ) as client,
    ):
        got = await ids_of(client.search_chats())
        retries = client.stats.retries
    assert got == [c["chat_id"] for c in server.data]
    injected = sum(server.stats.faults.values())
    assert injected > 0
    assert retries == injected  # every fault was retried exactly once more
    assert set(server.stats.faults) >= {"2007", "3454", "429", "502", "503", "504", "reset"}


async def test_hung_response_times_out_and_is_retried() -> None:
    """A response that never arrives is timed out by the client and retried, not waited on."""
    async with (
        sandbox.serve(chats=60, seed=2, fault_pages={3: "hang"}, hang_seconds=5) as server,
        client_for(server, concurrency=4, timeout=0.3) as client,
    ):
        got = await ids_of(client.search_chats())
    assert got == [c["chat_id"] for c in server.data]
    assert server.stats.requests_by_page[3] == 2


async def test_token_expiry_refreshes_once_per_expiry_event() -> None:
    """A token that expires mid-search is refreshed once for all requests that saw it expire."""
    async with sandbox.serve(chats=1000, seed=4, token_max_uses=25) as server:
        calls = 0

        async def token() -> str:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.005)  # a real refresh takes time: requests pile up behind it
            return await server.new_token()

        async with client_for(server, token=token, concurrency=8) as client:
            got = await ids_of(client.search_chats())
            refreshes = client.stats.token_refreshes
    assert got == [c["chat_id"] for c in server.data]
    assert refreshes >= 3  # 100 pages, 25 uses a token: it expired several times
    assert calls == 1 + refreshes  # the first token, then one call per expiry
    assert server.stats.expired_hits >= refreshes
    # one refresh per expired token: never two calls for the same expiry
    assert calls <= server.stats.tokens_issued


async def test_static_token_expiry_raises_a_clear_error() -> None:
    """A fixed str token that expires cannot be refreshed: TokenExpiredError, no token in it."""
    async with (
        sandbox.serve(chats=200, seed=4, token_max_uses=3) as server,
        client_for(server, concurrency=2) as client,
    ):
        with pytest.raises(imi.TokenExpiredError) as info:
            await ids_of(client.search_chats())
    assert info.value.status_code == 2004
    assert server.token not in str(info.value)


async def test_concurrency_is_shared_by_all_searches_of_a_client() -> None:
    """Three searches at once on one client never exceed its concurrency in flight."""
    async with (
        sandbox.serve(chats=900, seed=5, latency=0.01, jitter=0.01) as server,
        client_for(server, concurrency=5) as client,
    ):
        results = await asyncio.gather(
            ids_of(client.search_chats(status="closed")),
            ids_of(client.search_chats(channel="sms")),
            ids_of(client.search_chats()),
        )
        peak = client.limiter.peak
    assert server.stats.peak_in_flight <= 5
    assert peak == 5  # and the bound is used, not left idle
    assert results[2] == [c["chat_id"] for c in server.data]
    assert results[0] == [c["chat_id"] for c in server.expected([("status", "eq", "closed")])]


async def test_early_exit_stops_requests_and_leaves_no_task() -> None:
    """Breaking out of the loop cancels what is in flight; the server sees nothing after."""
    async with (
        sandbox.serve(chats=2000, seed=6, latency=0.02) as server,
        client_for(server, concurrency=8) as client,
    ):
        async with aclosing(client.search_chats()) as chats:
            async for n, _chat in aiter_enumerate(chats):
                if n == 25:
                    break
        await assert_no_stray_tasks()
        seen = server.stats.requests_total
        assert client.limiter.in_flight == 0
        await asyncio.sleep(0.1)
        assert server.stats.requests_total == seen
    assert seen <= 3 + 8  # pages 1-3 consumed, at most a window more


async def test_cancelling_the_consumer_leaves_no_task() -> None:
    """A search cancelled from outside releases every slot and task."""
    async with (
        sandbox.serve(chats=2000, seed=6, latency=0.05) as server,
        client_for(server, concurrency=8) as client,
    ):
        task = asyncio.ensure_future(ids_of(client.search_chats()))
        for _ in range(50):
            await asyncio.sleep(0.01)
            if server.stats.in_flight:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await assert_no_stray_tasks()
        assert client.limiter.in_flight == 0
        again = await ids_of(client.search_chats(max_pages=3))
    assert again == [c["chat_id"] for c in server.data[:30]]


async def aiter_enumerate(it: AsyncIterator[imi.Chat]) -> AsyncIterator[tuple[int, imi.Chat]]:
    counter = itertools.count()
    async for item in it:
        yield next(counter), item


@pytest.mark.parametrize(
    ("http_status", "code", "error"),
    [
        ("bad-token", 2003, imi.InvalidTokenError),
        ("bad-team", 2010, imi.TeamNotFoundError),
    ],
)
async def test_permanent_error_after_exactly_one_request(
    sb: sandbox.Sandbox, http_status: str, code: int, error: type[imi.ApiError]
) -> None:
    """A permanent error surfaces as its typed ApiError after one request, never retried."""
    kw: dict[str, Any] = {"concurrency": 8}
    if http_status == "bad-token":
        kw["token"] = "not-a-token"
        client = client_for(sb, **kw)
    else:
        client = imi.ImiChatClient(
            base_url=sb.base_url, team_id="no-such-team", token=sb.token, retry_policy=NO_WAIT
        )
    async with client:
        with pytest.raises(error) as info:
            await ids_of(client.search_chats())
    assert info.value.status_code == code
    assert info.value.description
    assert sb.stats.requests_total == 1


FILTER_CASES: list[tuple[dict[str, Any], list[tuple[str, str, str]], str]] = [
    ({"status": "closed"}, [("status", "eq", "closed")], "and"),
    ({"status__not_eq": "closed"}, [("status", "not_eq", "closed")], "and"),
    (
        {"channel": "abc", "status": "queued"},
        [("channel", "eq", "abc"), ("status", "eq", "queued")],
        "and",
    ),
    (
        {"channel": "email", "status": "onhold"},
        [("channel", "eq", "email"), ("status", "eq", "onhold")],
        "or",
    ),
    (
        {
            "created_at__gte": datetime(2024, 6, 1, tzinfo=timezone.utc),
            "created_at__lt": "2024-09-01T00:00:00Z",
        },
        [
            ("created_at", "gte", "2024-06-01T00:00:00Z"),
            ("created_at", "lt", "2024-09-01T00:00:00Z"),
        ],
        "and",
    ),
    (
        {"updated_at__gt": datetime(2024, 10, 1)},
        [("updated_at", "gt", "2024-10-01T00:00:00Z")],
        "and",
    ),
]


@pytest.mark.parametrize(("kwargs", "triples", "condition"), FILTER_CASES)
async def test_filters_match_the_servers_own_filter(
    sb: sandbox.Sandbox, kwargs: dict[str, Any], triples: list[tuple[str, str, str]], condition: str
) -> None:
    """Keyword filters return exactly what the sandbox's own filter returns, in order."""
    expected = [c["chat_id"] for c in sb.expected(triples, condition)]
    assert expected  # a case that matches nothing proves little
    async with client_for(sb, concurrency=4) as client:
        got = await ids_of(client.search_chats(condition=condition, **kwargs))
    assert got == expected


async def test_value_filters_from_real_records(sb: sandbox.Sandbox) -> None:
    """tag, assignee, destination ids, intent and group filters match the server's result."""
    sample = {c["channel"]: c for c in sb.data if c.get("destination_id")}
    abc = next(c for c in sb.data if c.get("channel") == "abc" and c.get("other_details"))
    tagged = next(c for c in sb.data if c.get("tag"))
    assigned = next(c for c in sb.data if c.get("assignee"))
    cases = [
        imi.Filter("tag", "eq", tagged["tag"][0]),
        imi.Filter("assignee", "eq", assigned["assignee"]),
        imi.Filter("mobile", "eq", sample["sms"]["destination_id"]),
        imi.Filter("email_id", "eq", sample["email"]["destination_id"]),
        imi.Filter("whatsapp_mobile_number", "eq", sample["whatsapp"]["destination_id"]),
        imi.Filter("intent", "eq", abc["other_details"]["intent"]),
        imi.Filter("group", "eq", abc["other_details"]["group"]),
    ]
    async with client_for(sb, concurrency=4) as client:
        for f in cases:
            expected = [c["chat_id"] for c in sb.expected([(f.param, f.operator, f.value)])]
            got = await ids_of(client.search_chats(filters=[f]))
            assert got == expected, f
            assert got


async def test_invalid_query_sends_nothing(sb: sandbox.Sandbox) -> None:
    """A bad param, operator or value raises InvalidQueryError before any request."""
    invalid: tuple[dict[str, Any], ...] = (
        {"colour": "red"},
        {"status__lt": "closed"},
        {"channel": "fax"},
    )
    async with client_for(sb) as client:
        for kwargs in invalid:
            with pytest.raises(imi.InvalidQueryError):
                await ids_of(client.search_chats(**kwargs))
    assert sb.stats.requests_total == 0


async def test_records_decode_every_quirk_of_the_sandbox(sb: sandbox.Sandbox) -> None:
    """The sandbox's quirky records decode: str asset ids, unknown enums, missing fields."""
    async with client_for(sb, concurrency=4) as client:
        chats = [c async for c in client.search_chats()]
    assert any(isinstance(c.asset and c.asset.id, str) for c in chats)
    assert any(isinstance(c.channel, str) and not isinstance(c.channel, imi.Channel) for c in chats)
    assert all(c.created_at is None or c.created_at.tzinfo is not None for c in chats)
    by_id = {c.chat_id: c for c in chats}
    for raw in sb.data:
        chat = by_id[raw["chat_id"]]
        assert list(chat.tag) == (raw.get("tag") or [])
        if isinstance(raw.get("asset"), dict):
            assert chat.asset is not None and chat.asset.id == raw["asset"].get("id")


async def test_search_pages_yields_numbered_pages(sb: sandbox.Sandbox) -> None:
    """search_pages hands out (chats, page) in order; start_page and max_pages bound it."""
    async with client_for(sb, concurrency=4) as client:
        pages = [p async for p in client.search_pages(start_page=3, max_pages=4)]
    assert [p.number for p in pages] == [3, 4, 5, 6]
    assert [c.chat_id for p in pages for c in p.items] == [c["chat_id"] for c in sb.data[20:60]]
    assert sb.stats.requests_total == 4


async def test_base_url_without_the_api_root_gets_the_base_url_hint(sb: sandbox.Sandbox) -> None:
    """A base URL without /v3.0 meets the front server's plain 404: the error says to check
    base_url, as the README promises (issue #25)."""
    root = sb.base_url.removesuffix("/v3.0")
    assert root != sb.base_url
    client = imi.ImiChatClient(
        base_url=root, token=sb.token, team_id=sb.team_id, retry_policy=NO_WAIT
    )
    async with client:
        with pytest.raises(imi.UnexpectedResponseError) as info:
            await ids_of(client.search_chats())
    assert info.value.http_status == 404 and info.value.status_code is None
    assert "is base_url the tenant's v3.0 root" in str(info.value)
    assert sb.stats.requests_total == 0  # never reached the search path


async def test_priority_is_checked_at_the_call(sb: sandbox.Sandbox) -> None:
    """`priority` other than "interactive" or "background" raises before any request."""
    async with client_for(sb) as client:
        calls: list[Any] = [client.search_chats, client.search_pages]
        for call in calls:
            with pytest.raises(imi.InvalidQueryError, match="priority"):
                call(priority="urgent")
        await ids_of(client.search_chats(priority="background", max_pages=2))
    assert sb.stats.requests_total == 2


async def test_a_search_is_sized_for_the_limiter_from_its_total(sb: sandbox.Sandbox) -> None:
    """The fetch path tells the limiter each search's pages from the first total: the
    typical size (a new search's rank) is their median, capped at the concurrency."""
    async with client_for(sb, concurrency=16) as client:
        await ids_of(client.search_chats())  # 124 pages
        assert client.limiter.sched.typical == 16
        await ids_of(client.search_chats(start_page=120))  # pages 120..124
        assert client.limiter.sched.typical == 5
