"""The client over its transport seam, and the aiohttp transport itself.

Client behaviour (retries, token refresh, caps on errors, secrecy, the
client-wide bound) runs over `MockTransport`, the in-memory transport users
get for their own tests. The aiohttp transport is tested against aiohttp:
its error mapping with aioresponses (raised exceptions), and what needs real
responses (redirects, body caps, gzip, TLS, a borrowed session) against a
small aiohttp server on 127.0.0.1.

Every wait goes through an injected fake sleep (or RetryPolicy.testing()): no real sleeps.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import pickle
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aioresponses import aioresponses

import imichat_async as imi
from imichat_async import _errors as e
from imichat_async import sandbox
from imichat_async._auth import TokenProvider
from imichat_async._transport import AiohttpTransport
from tests.helpers import assert_no_stray_tasks

BASE = "https://acme.imi.chat/v3.0"
SEARCH = f"{BASE}/chats/search"
TOKEN = "tok-SECRET-5b9e0c"
TOKEN2 = "tok-SECRET-refreshed-77aa"
SAMPLES = Path(__file__).parent / "samples"
ROWS: list[dict[str, Any]] = json.loads((SAMPLES / "status_codes.json").read_text())
TRANSIENT_ROWS = [r for r in ROWS if r["kind"] == "transient"]
PERMANENT_ROWS = [r for r in ROWS if r["kind"] == "permanent"]
GATEWAY_HTML = (SAMPLES / "gateway_502.html").read_text()

Reply = imi.RawResponse | BaseException


def page_body(n: int = 1, page: int = 1) -> bytes:
    records = [{"chat_id": f"c-{page}-{i}"} for i in range(n)]
    return json.dumps({"status_code": 4305, "description": "ok", "response": records}).encode()


def ok(n: int = 1, page: int = 1, total: int | None = None) -> imi.RawResponse:
    headers = {"X-Total-Count": str(total)} if total is not None else {}
    return imi.RawResponse(200, headers, page_body(n, page))


def api_error(row: dict[str, Any], headers: dict[str, str] | None = None) -> imi.RawResponse:
    body = {"status_code": row["status_code"], "description": row["description"], "response": None}
    return imi.RawResponse(row["http_status"], headers or {}, json.dumps(body).encode())


def row(code: int) -> dict[str, Any]:
    return next(r for r in ROWS if r["status_code"] == code)


def expired() -> imi.RawResponse:
    return api_error(row(2004))


def http(status: int, body: str = "", headers: dict[str, str] | None = None) -> imi.RawResponse:
    return imi.RawResponse(status, {"Content-Type": "text/html", **(headers or {})}, body.encode())


class Api:
    """A MockTransport handler: a scripted reply list per page (the last one repeats)."""

    def __init__(self, script: dict[int, list[Reply]] | None = None) -> None:
        self.script = script or {}
        self.calls: list[tuple[int, dict[str, str], bytes]] = []
        self.hook: Callable[[int, dict[str, str]], Awaitable[Reply | None]] | None = None

    @property
    def pages(self) -> list[int]:
        return [p for p, _, _ in self.calls]

    async def handle(self, request: imi.PreparedRequest) -> imi.RawResponse:
        assert request.method == "POST"
        assert request.url == f"{SEARCH}?page={request.page}"
        page = request.page
        headers = dict(request.headers)
        self.calls.append((page, headers, request.body))
        reply: Reply | None = None
        if self.hook is not None:
            reply = await self.hook(page, headers)
        if reply is None:
            replies = self.script.get(page) or [ok(0, page)]
            reply = replies.pop(0) if len(replies) > 1 else replies[0]
        if isinstance(reply, BaseException):
            raise reply
        return reply


@pytest.fixture
def api() -> Api:
    return Api()


class Sleeps:
    """A fake sleep recording every wait."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def make_client(api: Api, sleep: Sleeps | None = None, **kw: Any) -> imi.ImiChatClient:
    args: dict[str, Any] = {
        "base_url": BASE,
        "token": TOKEN,
        "team_id": "team-1",
        "retry_policy": imi.RetryPolicy.testing(max_retries=kw.get("max_retries", 5)),
        "sleep": sleep or Sleeps(),
        "transport": imi.MockTransport(api.handle),
        **kw,
    }
    return imi.ImiChatClient(**args)


async def collect(client: imi.ImiChatClient, **kw: Any) -> list[str]:
    return [c.chat_id async for c in client.search_chats(**kw)]


# -- the request on the wire ------------------------------------------------------------


async def test_request_through_the_seam(api: Api) -> None:
    """The transport gets POST ?page=n with the four headers and the query's JSON body."""
    api.script = {1: [ok(10, 1)], 2: [ok(3, 2)]}
    async with make_client(api) as client:
        got = await collect(
            client, prefetch=1, status="closed", created_at__gte="2024-05-01T00:00:00+02:00"
        )
    assert len(got) == 13
    assert api.pages == [1, 2]
    for _, headers, data in api.calls:
        assert headers == {
            "Authorization": f"Bearer {TOKEN}",
            "teamid": "team-1",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        assert json.loads(data) == {
            "condition": "and",
            "filters": [
                {"param": "status", "operator": "eq", "value": "closed"},
                {"param": "created_at", "operator": "gte", "value": "2024-04-30T22:00:00Z"},
            ],
        }


async def test_invalid_query_sends_nothing(api: Api) -> None:
    """An InvalidQueryError is raised before any request."""
    async with make_client(api) as client:
        with pytest.raises(imi.InvalidQueryError):
            await collect(client, status__lt="closed")
    assert api.calls == []


async def test_short_page_with_a_total_does_not_end_the_search(api: Api) -> None:
    """X-Total-Count: 35 and a 4-record page 2: pages 3 and 4 are still read, page 4 last;
    an empty page 5 past the total is never asked for."""
    api.script = {
        1: [ok(10, 1, total=35)],
        2: [ok(4, 2, total=35)],
        3: [ok(10, 3, total=35)],
        4: [ok(5, 4, total=35)],
    }
    stats = imi.PagingStats()
    async with make_client(api) as client:
        got = [(p.number, len(p.items), p.last) async for p in client.search_pages(stats=stats)]
    assert got == [(1, 10, False), (2, 4, False), (3, 10, False), (4, 5, True)]
    assert sorted(api.pages) == [1, 2, 3, 4]
    assert (stats.last_page, stats.empty_before_end) == (4, 0)


async def test_empty_page_before_the_total_ends_the_search_counted(api: Api) -> None:
    """X-Total-Count: 95 but page 3 comes back empty (the data shrank): the search ends
    there, counted in `stats.empty_before_end`."""
    api.script = {1: [ok(10, 1, total=95)], 2: [ok(3, 2, total=95)], 3: [ok(0, 3, total=95)]}
    stats = imi.PagingStats()
    async with make_client(api) as client:
        got = [c.chat_id async for p in client.search_pages(stats=stats) for c in p.items]
    assert len(got) == 13
    assert (stats.last_page, stats.empty_before_end) == (3, 1)


# -- transient failures: retried --------------------------------------------------------


TRANSIENT_REPLIES: list[tuple[str, Callable[[], Reply], type[e.TransientError]]] = [
    *[
        (str(r["status_code"]), (lambda r=r: api_error(r)), getattr(e, r["error"]))
        for r in TRANSIENT_ROWS
    ],
    ("429", lambda: http(429), e.RateLimitedError),
    ("429-json", lambda: api_error({**row(2007), "http_status": 429}), e.RateLimitedError),
    ("502-html", lambda: http(502, GATEWAY_HTML), e.GatewayError),
    ("503-empty", lambda: http(503), e.GatewayError),
    ("504-html", lambda: http(504, GATEWAY_HTML), e.GatewayError),
    ("500-bare", lambda: http(500, "oops"), e.InternalServerError),
    ("no-response", lambda: e.NetworkError("no response from the server"), e.NetworkError),
]


@pytest.mark.parametrize(
    ("failure", "cls"),
    [(f, c) for _, f, c in TRANSIENT_REPLIES],
    ids=[i for i, _, _ in TRANSIENT_REPLIES],
)
async def test_transient_failure_is_retried(
    api: Api, failure: Callable[[], Reply], cls: type[e.TransientError]
) -> None:
    """A transient failure is retried, and the search goes on once the page answers."""
    api.script = {1: [failure(), failure(), ok(4, 1)]}
    sleeps = Sleeps()
    async with make_client(api, sleeps) as client:
        assert await collect(client) == [f"c-1-{i}" for i in range(4)]
        assert client.stats.retries == 2
        assert client.stats.requests == 3
    assert api.pages == [1, 1, 1]
    assert len(sleeps.waits) == 2


@pytest.mark.parametrize(
    ("failure", "cls"),
    [(f, c) for _, f, c in TRANSIENT_REPLIES],
    ids=[i for i, _, _ in TRANSIENT_REPLIES],
)
@pytest.mark.parametrize("max_retries", [0, 2])
async def test_transient_failure_surfaces_after_max_retries(
    api: Api, failure: Callable[[], Reply], cls: type[e.TransientError], max_retries: int
) -> None:
    """When retries run out, the typed error surfaces after max_retries+1 attempts."""
    api.script = {1: [failure()]}
    async with make_client(api, max_retries=max_retries) as client:
        with pytest.raises(e.ApiError) as info:
            await collect(client)
    err = info.value
    assert type(err) is cls
    assert err.page == 1
    assert api.pages == [1] * (max_retries + 1)
    if cls is e.NetworkError:
        assert (err.http_status, err.status_code) == (0, None)
    await assert_no_stray_tasks()


async def test_transient_failure_on_a_later_page(api: Api) -> None:
    """Retries are per page: page 2 failing twice still gives pages 1-3 in order."""
    api.script = {
        1: [ok(10, 1)],
        2: [http(503), api_error(row(3454)), ok(10, 2)],
        3: [ok(2, 3)],
    }
    async with make_client(api, concurrency=4) as client:
        got = await collect(client)
    assert got == [f"c-{p}-{i}" for p in (1, 2) for i in range(10)] + ["c-3-0", "c-3-1"]
    assert api.pages.count(2) == 3


async def test_retry_after_is_honoured(api: Api) -> None:
    """429 Retry-After sets the wait (capped by the policy); without it, jittered backoff."""
    api.script = {
        1: [
            http(429, headers={"Retry-After": "7"}),
            http(429, headers={"Retry-After": "120"}),
            http(429, headers={"Retry-After": "soon"}),
            http(503, headers={"Retry-After": "2.5"}),
            ok(1, 1),
        ]
    }
    sleeps = Sleeps()
    policy = imi.RetryPolicy(
        backoff_initial=0.25, backoff_max=20.0, retry_after_max=60.0, backoff_factor=2.0
    )
    async with make_client(api, sleeps, retry_policy=policy) as client:
        assert await collect(client) == ["c-1-0"]
    assert len(sleeps.waits) == 4
    assert sleeps.waits[0] == 7.0
    assert sleeps.waits[1] == 60.0  # capped
    assert 0.0 <= sleeps.waits[2] <= 0.25 * 2**2  # garbage ignored: third retry's backoff
    assert sleeps.waits[3] == 2.5


async def test_retry_policy_count_is_kept_without_max_retries(api: Api) -> None:
    """retry_policy=RetryPolicy(max_retries=2) alone makes 3 attempts (not the default 6)."""
    api.script = {1: [http(502)]}
    policy = imi.RetryPolicy(max_retries=2, backoff_initial=0.0, backoff_max=0.0)
    client = imi.ImiChatClient(
        base_url=BASE,
        token=TOKEN,
        team_id="team-1",
        retry_policy=policy,
        sleep=Sleeps(),
        transport=imi.MockTransport(api.handle),
    )
    async with client:
        with pytest.raises(e.GatewayError):
            await collect(client)
    assert api.pages == [1, 1, 1]
    assert client.max_retries == 2


def test_max_retries_disagreeing_with_retry_policy_is_refused(api: Api) -> None:
    """max_retries and a retry_policy with another count: ConfigurationError naming both."""
    with pytest.raises(e.ConfigurationError, match=r"max_retries=1 .*max_retries=9"):
        make_client(api, max_retries=1, retry_policy=imi.RetryPolicy.testing(max_retries=9))
    agreeing = make_client(api, max_retries=3, retry_policy=imi.RetryPolicy.testing(max_retries=3))
    assert agreeing.max_retries == 3


def test_max_retries_alone_sets_the_count(api: Api) -> None:
    """max_retries without a policy sets the count; neither gives the documented 5."""
    base: dict[str, Any] = {
        "base_url": BASE,
        "token": TOKEN,
        "team_id": "t",
        "transport": imi.MockTransport(api.handle),
    }
    assert imi.ImiChatClient(**base, max_retries=1).max_retries == 1
    assert imi.ImiChatClient(**base).max_retries == 5


# -- permanent failures: never retried ---------------------------------------------------


@pytest.mark.parametrize("r", PERMANENT_ROWS, ids=lambda r: str(r["status_code"]))
async def test_permanent_error_is_not_retried(api: Api, r: dict[str, Any]) -> None:
    """A permanent row raises its typed error after exactly one request, no sleep."""
    api.script = {1: [api_error(r)]}
    sleeps = Sleeps()
    async with make_client(api, sleeps, concurrency=8) as client:
        with pytest.raises(e.ApiError) as info:
            await collect(client)
    err = info.value
    assert type(err) is getattr(e, r["error"])
    assert (err.status_code, err.http_status, err.description) == (
        r["status_code"],
        r["http_status"],
        r["description"],
    )
    assert api.pages == [1]
    assert sleeps.waits == []


async def test_permanent_error_on_later_page_after_earlier_pages(api: Api) -> None:
    """A permanent error on page 3 is raised after pages 1-2 were yielded, never retried."""
    api.script = {1: [ok(10, 1)], 2: [ok(10, 2)], 3: [api_error(row(4303))]}
    got: list[str] = []
    async with make_client(api, concurrency=4) as client:
        with pytest.raises(e.InvalidFilterValueError) as info:
            async for chat in client.search_chats(prefetch=4):
                got.append(chat.chat_id)
    assert len(got) == 20
    assert api.pages.count(3) == 1
    assert info.value.page == 3
    await assert_no_stray_tasks()


# -- the token --------------------------------------------------------------------------


async def test_static_token_expiry_raises_clearly(api: Api) -> None:
    """A fixed str token that expires raises TokenExpiredError saying how to refresh."""
    api.script = {1: [expired()]}
    async with make_client(api) as client:
        with pytest.raises(e.TokenExpiredError) as info:
            await collect(client)
    msg = str(info.value)
    assert info.value.status_code == 2004
    assert info.value.http_status == 401
    assert "expired" in msg
    assert "callable" in msg  # tells the user how to get a refreshable token
    assert api.pages == [1]


class TokenSource:
    """An async token callable handing out tok-1, tok-2, ... and counting calls."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        await asyncio.sleep(0)
        return self.tokens[min(self.calls, len(self.tokens)) - 1]


async def test_callable_token_refreshed_after_2004(api: Api) -> None:
    """2004 makes the client call the token callable again and retry with the new token."""
    api.script = {1: [expired(), ok(2, 1)]}
    source = TokenSource([TOKEN, TOKEN2])
    async with make_client(api, token=source) as client:
        assert len(await collect(client)) == 2
        assert client.stats.token_refreshes == 1
    assert source.calls == 2
    assert [h["Authorization"] for _, h, _ in api.calls] == [f"Bearer {TOKEN}", f"Bearer {TOKEN2}"]


async def test_token_refresh_is_single_flight(api: Api) -> None:
    """Several concurrent requests seeing 2004 together cause one token refresh."""
    source = TokenSource([TOKEN, TOKEN2, "tok-SECRET-third"])
    stale_pages = [2, 3, 4, 5]
    arrived: set[int] = set()
    all_arrived = asyncio.Event()
    expired_seen: list[int] = []

    async def hook(page: int, headers: dict[str, str]) -> Reply | None:
        if headers["Authorization"] != f"Bearer {TOKEN}":
            return ok(10 if page < 5 else 5, page, total=45)
        if page == 1:
            return ok(10, 1, total=45)
        arrived.add(page)
        if arrived == set(stale_pages):
            all_arrived.set()
        await all_arrived.wait()  # every stale request is in flight at once
        expired_seen.append(page)
        return expired()

    api.hook = hook
    async with make_client(api, token=source, concurrency=8) as client:
        got = await collect(client)
        assert client.stats.token_refreshes == 1
    assert len(got) == 45
    assert sorted(expired_seen) == stale_pages
    assert source.calls == 2  # the first token, then one refresh for all four
    assert sorted(api.pages) == [1, 2, 2, 3, 3, 4, 4, 5, 5]


async def test_token_expiring_again_gives_up(api: Api) -> None:
    """A token that keeps expiring right after refresh ends in TokenExpiredError."""
    api.script = {1: [expired()]}
    source = TokenSource([f"tok-SECRET-{i}" for i in range(10)])
    async with make_client(api, token=source) as client:
        with pytest.raises(e.TokenExpiredError):
            await collect(client)
    assert 2 <= len(api.pages) <= 4
    assert source.calls == len(api.pages)


async def test_same_expired_token_from_the_callable_fails_after_one_refresh(api: Api) -> None:
    """k=8: a callable returning the token that just expired is called twice, not ~12 x k."""
    calls: list[int] = []

    async def source() -> str:
        calls.append(1)
        return TOKEN

    async def hook(page: int, headers: dict[str, str]) -> Reply | None:
        if page == 1:
            return ok(10, 1, total=100)
        await asyncio.sleep(0)
        return expired()

    api.hook = hook
    async with make_client(api, token=source, concurrency=8) as client:
        with pytest.raises(e.TokenExpiredError) as info:
            await collect(client, prefetch=8)
    assert len(calls) == 2  # the first token, one refresh
    assert "same token" in str(info.value)
    assert TOKEN not in str(info.value)
    assert len(api.pages) <= 1 + 8  # page 1, then at most one request per slot


async def test_plain_callable_token(api: Api) -> None:
    """token= a plain function returning a str works (called, not awaited)."""
    api.script = {1: [ok(2, 1)]}
    async with make_client(api, token=lambda: TOKEN) as client:
        assert len(await collect(client)) == 2
    assert api.calls[0][1]["Authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize("bad", ["", None, 42])
async def test_token_callable_returning_garbage(api: Api, bad: Any) -> None:
    """A token callable returning a non-str or empty str raises ConfigurationError."""

    async def source() -> Any:
        return bad

    async with make_client(api, token=source) as client:
        with pytest.raises(e.ConfigurationError):
            await collect(client)
    assert api.calls == []


# -- secrecy ----------------------------------------------------------------------------


async def test_token_never_in_repr_messages_or_logs(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """The token appears in no repr, exception message or log record (DEBUG included)."""
    caplog.set_level(logging.DEBUG)
    source = TokenSource([TOKEN, TOKEN2])
    api.script = {
        1: [
            http(503),
            e.NetworkError("no response from the server: connection refused by x:1"),
            e.NetworkError("no response from the server within 30s"),
            expired(),
            http(429, headers={"Retry-After": "1"}),
            ok(10, 1),
        ],
        2: [api_error(row(3445))],
    }
    errors: list[e.ApiError] = []
    async with make_client(api, token=source) as client:
        texts = [repr(client), str(client), repr(TokenProvider(TOKEN)), repr(client.limiter)]
        with pytest.raises(e.ApiError) as info:
            await collect(client)
        errors.append(info.value)
    async with make_client(api) as static:
        texts.append(repr(static))
        api.script = {1: [expired()]}
        with pytest.raises(e.ApiError) as info2:
            await collect(static)
        errors.append(info2.value)
    for exc in errors:
        texts += [str(exc), repr(exc), exc.description, repr(exc.args)]
    for rec in caplog.records:
        texts.append(rec.getMessage())
        if rec.exc_info and rec.exc_info[1] is not None:
            texts.append(str(rec.exc_info[1]))
    assert len(caplog.records) >= 5  # the retries and the refresh were logged
    for text in texts:
        assert TOKEN not in text
        assert TOKEN2 not in text
        assert "SECRET" not in text


def test_client_repr_hides_token(api: Api) -> None:
    """repr(client) shows base_url and team but masks the token."""
    client = make_client(api)
    text = repr(client)
    assert TOKEN not in text
    assert "***" in text
    assert "acme.imi.chat" in text


# -- lifecycle and the client-wide bound ------------------------------------------------


async def test_concurrency_bounds_all_searches(api: Api) -> None:
    """The client-wide limiter keeps requests in flight <= concurrency across searches."""
    in_flight = 0
    peak = 0

    async def hook(page: int, headers: dict[str, str]) -> Reply | None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            for _ in range(3):
                await asyncio.sleep(0)
        finally:  # requests past the end are cancelled here
            in_flight -= 1
        return ok(10 if page < 6 else 0, page)

    api.hook = hook
    async with make_client(api, concurrency=3) as client:
        results = await asyncio.gather(*(collect(client, prefetch=8) for _ in range(3)))
        assert client.limiter.peak <= 3
    assert all(len(r) == 50 for r in results)
    assert peak == 3


async def test_closed_client_refuses_searches(api: Api) -> None:
    """After close(), a search raises ImiChatError and sends nothing."""
    client = make_client(api)
    await client.close()
    with pytest.raises(imi.ImiChatError, match="closed"):
        await collect(client)
    assert api.calls == []


async def test_early_break_leaves_nothing_behind(api: Api) -> None:
    """Breaking out of search_chats cancels the prefetched requests, no task is left."""
    gate = asyncio.Event()

    async def hook(page: int, headers: dict[str, str]) -> Reply | None:
        if page > 1:
            await gate.wait()
        return ok(10, page)

    api.hook = hook
    async with make_client(api, concurrency=6) as client:
        async for chat in client.search_chats():
            if chat.chat_id == "c-1-3":
                break
        for _ in range(20):
            await asyncio.sleep(0)
        assert client.limiter.in_flight == 0
        await assert_no_stray_tasks()


async def test_server_date_is_the_latest_answers_date_header(api: Api) -> None:
    """`server_date`: None before any answer; then the latest answer's `Date` (an error's
    too) as aware UTC; None again after an answer without a readable one."""
    stamped = "Sun, 06 Nov 1994 08:49:37 GMT"
    api.script = {
        1: [imi.RawResponse(200, {"Date": stamped}, page_body(0, 1))],
        2: [api_error(row(3445), headers={"date": "Mon, 07 Nov 1994 00:00:00 GMT"})],
        3: [imi.RawResponse(200, {"Date": "yesterday"}, page_body(0, 3))],
    }
    async with make_client(api) as client:
        assert client.server_date is None
        await collect(client)
        assert client.server_date == datetime(1994, 11, 6, 8, 49, 37, tzinfo=timezone.utc)
        with pytest.raises(imi.ApiError):
            await collect(client, start_page=2)
        assert client.server_date == datetime(1994, 11, 7, tzinfo=timezone.utc)
        await collect(client, start_page=3)
        assert client.server_date is None


# -- the seam: transport=, MockTransport ------------------------------------------------


async def test_mock_transport_takes_a_plain_handler() -> None:
    """MockTransport with a plain function: the client searches through it, nothing else."""
    seen: list[imi.PreparedRequest] = []

    def handler(request: imi.PreparedRequest) -> imi.RawResponse:
        seen.append(request)
        return imi.RawResponse(200, {"X-Total-Count": "3"}, page_body(3, request.page))

    transport = imi.MockTransport(handler)
    assert isinstance(transport, imi.Transport)
    async with imi.ImiChatClient(
        base_url=BASE, token=TOKEN, team_id="t", transport=transport
    ) as client:
        assert [c.chat_id async for c in client.search_chats()] == ["c-1-0", "c-1-1", "c-1-2"]
    assert [r.page for r in seen] == [1]
    assert json.loads(seen[0].body) == {"condition": "and", "filters": []}


async def test_mock_transport_handler_must_return_a_response() -> None:
    """A handler returning something else fails loudly with TypeError, not a retry."""
    client = imi.ImiChatClient(
        base_url=BASE,
        token=TOKEN,
        team_id="t",
        transport=imi.MockTransport(lambda r: "x"),  # type: ignore[arg-type, return-value]
    )
    with pytest.raises(TypeError, match="RawResponse"):
        await collect(client)
    assert client.stats.requests == 1


async def test_transport_and_session_together_are_refused() -> None:
    """transport= with session= is a ConfigurationError (the session would go unused)."""
    async with aiohttp.ClientSession() as session:
        with pytest.raises(e.ConfigurationError, match=r"transport=.*session="):
            imi.ImiChatClient(
                base_url=BASE,
                token=TOKEN,
                team_id="t",
                session=session,
                transport=imi.MockTransport(lambda r: ok()),
            )


def test_transport_without_send_is_refused() -> None:
    """An object without send() is refused at construction, naming transport."""
    with pytest.raises(e.ConfigurationError, match="transport"):
        imi.ImiChatClient(base_url=BASE, token=TOKEN, team_id="t", transport=object())  # type: ignore[arg-type]


async def test_closing_the_client_leaves_a_given_transport_alone() -> None:
    """close() does not close a transport it was given (its owner does)."""

    class Owned(imi.MockTransport):
        closed = False

        async def close(self) -> None:
            self.closed = True

    transport = Owned(lambda r: ok())
    async with imi.ImiChatClient(base_url=BASE, token=TOKEN, team_id="t", transport=transport):
        pass
    assert not transport.closed


# -- arguments that can never work ------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"max_response_bytes": 0}, "max_response_bytes"),
        ({"max_response_bytes": -5}, "max_response_bytes"),
        ({"base_url": f"{BASE}#x"}, "fragment"),
        ({"base_url": f"{BASE}?tenant=a"}, "query"),
        ({"base_url": "https://acme.imi.chat:99999/v3.0"}, "port"),
        ({"base_url": "http://127.0.0.1:0/v3.0"}, "port"),
        ({"base_url": "https://acme.imi.chat:http/v3.0"}, "port"),
        ({"max_retries": -1}, "max_retries"),
    ],
)
def test_unworkable_arguments_are_refused_at_construction(kw: dict[str, Any], named: str) -> None:
    """ConfigurationError at construction, naming the argument that cannot work."""
    args: dict[str, Any] = {"base_url": BASE, "token": TOKEN, "team_id": "t", **kw}
    with pytest.raises(e.ConfigurationError, match=named):
        imi.ImiChatClient(**args)


# -- messages that say what failed ------------------------------------------------------


async def test_404_without_vendor_body_hints_at_the_base_url(api: Api) -> None:
    """A bare 404 (base_url without /v3.0) says to check base_url, with an example."""
    api.script = {1: [http(404, "Not Found")]}
    async with make_client(api) as client:
        with pytest.raises(e.UnexpectedResponseError) as info:
            await collect(client)
    msg = str(info.value)
    assert "base_url" in msg and "https://acme.imi.chat/v3.0" in msg
    assert "HTTP 404" in msg
    assert "none" not in msg


async def test_vendor_404_keeps_its_description(api: Api) -> None:
    """The service's own 404 (2010, team not found) keeps the vendor's text, no hint."""
    api.script = {1: [api_error(row(2010))]}
    async with make_client(api) as client:
        with pytest.raises(e.TeamNotFoundError) as info:
            await collect(client)
    assert "base_url" not in str(info.value)
    assert info.value.description == row(2010)["description"]


def test_error_messages_name_code_status_and_page() -> None:
    """An answered error shows HTTP status and vendor code; no answer shows no 'HTTP 0'."""
    answered = e.InvalidFilterValueError("bad value", status_code=4303, http_status=400, page=2)
    assert str(answered) == "bad value (HTTP 400, status_code 4303, page 2)"
    bare = e.UnexpectedResponseError("odd", http_status=418)
    assert str(bare) == "odd (HTTP 418, no vendor status_code)"
    lost = e.NetworkError("no response from the server: connection refused by 127.0.0.1:1")
    assert str(lost.with_page(1)) == (
        "no response from the server: connection refused by 127.0.0.1:1 (page 1)"
    )
    for err in (answered, bare, lost):
        assert "none" not in str(err) and "HTTP 0" not in str(err)


# -- the aiohttp transport: error mapping (aioresponses raises, builds no response) -----


@pytest.fixture
def mocked() -> Any:
    with aioresponses() as m:
        yield m


def _key(host: str, port: int, ssl: bool = False) -> Any:
    from aiohttp.client_reqrep import ConnectionKey

    # By keyword: aiohttp 3.14 added a field (server_hostname) the lowest supported lacks.
    unset: dict[str, Any] = dict.fromkeys(("proxy", "proxy_auth", "proxy_headers_hash"))
    return ConnectionKey(host=host, port=port, is_ssl=ssl, ssl=ssl, **unset)


AIOHTTP_FAILURES: list[tuple[str, Callable[[], BaseException], type[Exception], str]] = [
    (
        "refused",
        lambda: aiohttp.ClientConnectorError(
            _key("127.0.0.1", 1), ConnectionRefusedError(111, "Connect call failed")
        ),
        e.NetworkError,
        "no response from the server: connection refused by 127.0.0.1:1",
    ),
    (
        "dns",
        lambda: aiohttp.ClientConnectorDNSError(
            _key("acme.imi.chat", 443), OSError(-2, "Name or service not known")
        ),
        e.NetworkError,
        "no response from the server: DNS lookup of 'acme.imi.chat' failed",
    ),
    (
        "reset",
        lambda: aiohttp.ServerDisconnectedError(),
        e.NetworkError,
        "no response from the server: it closed the connection",
    ),
    (
        "oserror",
        lambda: aiohttp.ClientOSError(104, "Connection reset by peer"),
        e.NetworkError,
        "no response from the server: ClientOSError",
    ),
    ("payload", lambda: aiohttp.ClientPayloadError("truncated"), e.NetworkError, "truncated"),
    ("timeout", lambda: asyncio.TimeoutError(), e.NetworkError, "no response from the server"),
    ("server-timeout", lambda: aiohttp.ServerTimeoutError(), e.NetworkError, "no response"),
    (
        "certificate",
        lambda: aiohttp.ClientConnectorCertificateError(
            _key("acme.imi.chat", 443, ssl=True), Exception("certificate verify failed")
        ),
        e.TLSError,
        "TLS/SSL handshake with acme.imi.chat:443 failed",
    ),
    (
        "invalid-url",
        lambda: aiohttp.InvalidUrlClientError("https://acme.imi.chat:99999/x"),
        e.ConfigurationError,
        "invalid URL",
    ),
]


@pytest.mark.parametrize(
    ("failure", "cls", "says"),
    [(f, c, m) for _, f, c, m in AIOHTTP_FAILURES],
    ids=[i for i, _, _, _ in AIOHTTP_FAILURES],
)
async def test_aiohttp_errors_become_the_library_errors(
    mocked: Any, failure: Callable[[], BaseException], cls: type[Exception], says: str
) -> None:
    """Each aiohttp/asyncio failure becomes NetworkError (retried), TLSError or
    ConfigurationError (never retried), with a message saying plainly what failed."""
    mocked.post(f"{SEARCH}?page=1", exception=failure(), repeat=True)
    sleeps = Sleeps()
    client = imi.ImiChatClient(
        base_url=BASE,
        token=TOKEN,
        team_id="t",
        retry_policy=imi.RetryPolicy.testing(max_retries=2),
        sleep=sleeps,
    )
    async with client:
        with pytest.raises(cls) as info:
            await collect(client)
    assert type(info.value) is cls
    assert says in str(info.value)
    assert TOKEN not in str(info.value)
    attempts = 3 if issubclass(cls, e.TransientError) else 1
    assert client.stats.requests == attempts
    assert len(sleeps.waits) == attempts - 1


# -- the aiohttp transport against a real aiohttp server on 127.0.0.1 -------------------


Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Local:
    """A small aiohttp server on 127.0.0.1: `route` answers /v3.0/chats/search."""

    def __init__(self, server: TestServer) -> None:
        self.server = server
        self.route: Route | None = None
        self.hits: list[str] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/v3.0"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        assert self.route is not None
        return await self.route(request)


@pytest.fixture
async def local() -> AsyncIterator[Local]:
    app = web.Application()
    holder: list[Local] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        return await holder[0].handle(request)

    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    holder.append(Local(server))
    try:
        yield holder[0]
    finally:
        await server.close()


def local_client(local: Local, **kw: Any) -> imi.ImiChatClient:
    args: dict[str, Any] = {
        "base_url": local.base_url,
        "token": TOKEN,
        "team_id": "team-1",
        "retry_policy": imi.RetryPolicy.testing(max_retries=kw.get("max_retries", 5)),
        "sleep": Sleeps(),
        **kw,
    }
    return imi.ImiChatClient(**args)


async def test_request_on_the_wire(local: Local) -> None:
    """POST ?page=n with the four headers and the JSON body of the query, over aiohttp."""
    seen: list[tuple[str, dict[str, str], Any]] = []

    async def route(request: web.Request) -> web.Response:
        seen.append((request.query_string, dict(request.headers), await request.json()))
        n = 10 if request.query["page"] == "1" else 3
        return web.Response(body=page_body(n, int(request.query["page"])))

    local.route = route
    async with local_client(local) as client:
        got = await collect(
            client, prefetch=1, status="closed", created_at__gte="2024-05-01T00:00:00+02:00"
        )
    assert len(got) == 13
    assert [q for q, _, _ in seen] == ["page=1", "page=2"]
    for _, headers, body in seen:
        assert headers["Authorization"] == f"Bearer {TOKEN}"
        assert headers["teamid"] == "team-1"
        assert headers["Content-Type"] == "application/json"
        assert headers["Accept"] == "application/json"
        assert body == {
            "condition": "and",
            "filters": [
                {"param": "status", "operator": "eq", "value": "closed"},
                {"param": "created_at", "operator": "gte", "value": "2024-04-30T22:00:00Z"},
            ],
        }


async def test_each_request_goes_to_its_own_url(local: Local) -> None:
    """The transport parses a URL's part before `?` once: pages and other URLs still go
    exactly where their request says, a path that needs escaping escaped."""
    seen: list[str] = []

    async def route(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.Response(body=b"{}")

    local.route = route
    root = local.base_url.removesuffix("/v3.0")
    urls = [
        f"{root}/a b/chats/search?page=1",
        f"{root}/a b/chats/search?page=2",
        f"{root}/other/chats/search?page=7",
        f"{root}/other/chats/search",
        f"{root}/a b/chats/search?page=3",
    ]
    transport = AiohttpTransport(connections=2, timeout=10.0)
    try:
        for n, url in enumerate(urls, 1):
            raw = await transport.send(imi.PreparedRequest("POST", url, {}, b"{}", n))
            assert (raw.status, raw.body) == (200, b"{}")
    finally:
        await transport.close()
    assert seen == [
        "/a%20b/chats/search?page=1",
        "/a%20b/chats/search?page=2",
        "/other/chats/search?page=7",
        "/other/chats/search",
        "/a%20b/chats/search?page=3",
    ]


async def test_https_to_a_plain_http_port_fails_at_once_naming_tls() -> None:
    """https:// to the sandbox's plain-HTTP port raises TLSError after one attempt, no retry."""
    sleeps = Sleeps()
    async with sandbox.serve(chats=20) as sb:
        client = imi.ImiChatClient(
            base_url=sb.base_url.replace("http://", "https://"),
            token=sb.token,
            team_id=sb.team_id,
            sleep=sleeps,
        )
        async with client:
            with pytest.raises(e.TLSError) as info:
                await collect(client)
        assert sb.stats.requests_total == 0  # the handshake failed: no request was handled
    assert "TLS/SSL" in str(info.value)
    assert f"127.0.0.1:{sb.port}" in str(info.value)
    assert sb.token not in str(info.value)
    assert client.stats.requests == 1
    assert sleeps.waits == []


async def test_refused_connection_is_retried_and_says_so() -> None:
    """A refused connection stays transient; the message says it was refused, and where."""
    async with sandbox.serve(chats=20) as sb:
        base_url, token, team_id, port = sb.base_url, sb.token, sb.team_id, sb.port
    client = imi.ImiChatClient(  # the sandbox is gone: nothing listens on its port
        base_url=base_url,
        token=token,
        team_id=team_id,
        retry_policy=imi.RetryPolicy.testing(max_retries=2),
        sleep=Sleeps(),
    )
    async with client:
        with pytest.raises(e.NetworkError) as info:
            await collect(client)
    assert str(info.value) == (
        f"no response from the server: connection refused by 127.0.0.1:{port} (page 1)"
    )
    assert client.stats.requests == 3


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_redirect_not_followed(local: Local, status: int) -> None:
    """A 3xx with Location raises UnexpectedResponseError; the Location is never requested."""

    async def route(request: web.Request) -> web.Response:
        if request.path == "/elsewhere":
            return web.Response(body=page_body(1))
        return web.Response(status=status, headers={"Location": "/elsewhere"})

    local.route = route
    async with local_client(local) as client:
        with pytest.raises(e.UnexpectedResponseError) as info:
            await collect(client)
    assert info.value.http_status == status
    assert local.hits == ["/v3.0/chats/search"]


def _send_body(body: bytes, *, chunked: bool = False, gzipped: bool = False) -> Route:
    """Every page answers `body`; X-Total-Count says 1 so the search ends after page 1."""
    total = {"X-Total-Count": "1"}

    async def route(request: web.Request) -> web.StreamResponse:
        if chunked:
            resp = web.StreamResponse(headers=total)
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(body), 1000):
                await resp.write(body[i : i + 1000])
            await resp.write_eof()
            return resp
        if gzipped:
            return web.Response(
                body=gzip.compress(body), headers={"Content-Encoding": "gzip", **total}
            )
        return web.Response(body=body, headers=total)

    return route


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_response_body_cap(local: Local, chunked: bool) -> None:
    """A body above max_response_bytes raises ResponseTooLargeError, not retried."""
    body = page_body(50)
    local.route = _send_body(body, chunked=chunked)
    async with local_client(local, max_response_bytes=len(body) - 1) as client:
        with pytest.raises(e.ResponseTooLargeError) as info:
            await collect(client)
    assert info.value.page == 1
    assert len(local.hits) == 1


async def test_body_at_the_cap_is_accepted(local: Local) -> None:
    """A body exactly at max_response_bytes is read."""
    body = page_body(3)
    local.route = _send_body(body)
    async with local_client(local, max_response_bytes=len(body)) as client:
        assert len(await collect(client)) == 3


async def test_cap_counts_the_decompressed_body(local: Local) -> None:
    """A gzip body small on the wire but above the cap once decompressed is refused."""
    body = page_body(10) + b" " * 200_000  # JSON allows trailing whitespace
    local.route = _send_body(body, gzipped=True)
    assert len(gzip.compress(body)) < 10_000
    async with local_client(local, max_response_bytes=100_000) as client:
        with pytest.raises(e.ResponseTooLargeError, match="decompression"):
            await collect(client)


async def test_gzip_body_under_the_cap_is_decoded(local: Local) -> None:
    """A gzip body whose decompressed size fits the cap decodes as usual."""
    body = page_body(4)
    local.route = _send_body(body, gzipped=True)
    async with local_client(local, max_response_bytes=len(body)) as client:
        assert len(await collect(client)) == 4


async def test_borrowed_session_stays_open(local: Local) -> None:
    """A session passed in is used and left open by close()."""
    local.route = _send_body(page_body(1))
    async with aiohttp.ClientSession() as session:
        async with local_client(local, session=session) as client:
            assert len(await collect(client)) == 1
        assert not session.closed


def test_pickle_keeps_what_a_transport_error_says() -> None:
    """A TLSError crosses pickle with its message and page (see test_exports for every class)."""
    err = e.TLSError("TLS/SSL handshake with h:1 failed", page=4)
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), str(back), back.page) == (e.TLSError, str(err), 4)
