"""The HTTP seam, mocked with aioresponses: retries, token refresh, redirects, caps, secrecy.

Every wait goes through an injected fake sleep (or RetryPolicy.testing()): no real sleeps.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioresponses import CallbackResult, aioresponses
from aioresponses import core as aioresponses_core
from yarl import URL

import imichat_async as imi
from imichat_async import _errors as e
from imichat_async._retry import RetryPolicy
from tests.helpers import assert_no_stray_tasks

BASE = "https://acme.imi.chat/v3.0"
SEARCH = f"{BASE}/chats/search"
PAGE_RE = re.compile(r"^https://acme\.imi\.chat/v3\.0/chats/search\?page=\d+$")
TOKEN = "tok-SECRET-5b9e0c"
TOKEN2 = "tok-SECRET-refreshed-77aa"
SAMPLES = Path(__file__).parent / "samples"
ROWS: list[dict[str, Any]] = json.loads((SAMPLES / "status_codes.json").read_text())
TRANSIENT_ROWS = [r for r in ROWS if r["kind"] == "transient"]
PERMANENT_ROWS = [r for r in ROWS if r["kind"] == "permanent"]
GATEWAY_HTML = (SAMPLES / "gateway_502.html").read_text()

Reply = CallbackResult | BaseException


def ok(n: int = 1, page: int = 1, total: int | None = None) -> CallbackResult:
    records = [{"chat_id": f"c-{page}-{i}"} for i in range(n)]
    body = {"status_code": 4305, "description": "ok", "response": records}
    headers = {"X-Total-Count": str(total)} if total is not None else None
    return CallbackResult(status=200, body=json.dumps(body), headers=headers)


def api_error(row: dict[str, Any], headers: dict[str, str] | None = None) -> CallbackResult:
    body = {"status_code": row["status_code"], "description": row["description"], "response": None}
    return CallbackResult(status=row["http_status"], body=json.dumps(body), headers=headers)


def row(code: int) -> dict[str, Any]:
    return next(r for r in ROWS if r["status_code"] == code)


def expired() -> CallbackResult:
    return api_error(row(2004))


def http(status: int, body: str = "", headers: dict[str, str] | None = None) -> CallbackResult:
    return CallbackResult(status=status, body=body, content_type="text/html", headers=headers)


class Api:
    """An aioresponses callback: a scripted reply list per page (the last one repeats)."""

    def __init__(self, script: dict[int, list[Reply]] | None = None) -> None:
        self.script = script or {}
        self.calls: list[tuple[int, dict[str, str], Any]] = []
        self.hook: Callable[[int, dict[str, str]], Awaitable[Reply | None]] | None = None

    @property
    def pages(self) -> list[int]:
        return [p for p, _, _ in self.calls]

    async def handle(self, url: URL, **kw: Any) -> CallbackResult:
        page = int(url.query["page"])
        headers = dict(kw.get("headers") or {})
        self.calls.append((page, headers, kw.get("data")))
        reply: Reply | None = None
        if self.hook is not None:
            reply = await self.hook(page, headers)
        if reply is None:
            replies = self.script.get(page) or [ok(0, page)]
            reply = replies.pop(0) if len(replies) > 1 else replies[0]
        if isinstance(reply, BaseException):
            raise reply
        return reply


class _StubStreamWriter:
    output_size = 0


class _MockResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 builds responses without the `stream_writer` aiohttp >= 3.12 needs."""

    def __init__(self, method: str, url: URL, **kw: Any) -> None:
        kw.setdefault("stream_writer", _StubStreamWriter())
        super().__init__(method, url, **kw)


@pytest.fixture
def mocked(monkeypatch: pytest.MonkeyPatch) -> Iterator[aioresponses]:
    monkeypatch.setattr(aioresponses_core, "ClientResponse", _MockResponse)
    with aioresponses() as m:
        yield m


@pytest.fixture
def api(mocked: aioresponses) -> Api:
    fake = Api()
    mocked.post(PAGE_RE, callback=fake.handle, repeat=True)
    return fake


class Sleeps:
    """A fake sleep recording every wait."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def make_client(sleep: Sleeps | None = None, **kw: Any) -> imi.ImiChatClient:
    args: dict[str, Any] = {
        "base_url": BASE,
        "token": TOKEN,
        "team_id": "team-1",
        "retry_policy": RetryPolicy.testing(),
        "sleep": sleep or Sleeps(),
        **kw,
    }
    return imi.ImiChatClient(**args)


async def collect(client: imi.ImiChatClient, **kw: Any) -> list[str]:
    return [c.chat_id async for c in client.search_chats(**kw)]


# -- the request on the wire ------------------------------------------------------------


async def test_request_on_the_wire(api: Api) -> None:
    """POST ?page=n with the four headers and the JSON body of the query."""
    api.script = {1: [ok(10, 1)], 2: [ok(3, 2)]}
    async with make_client() as client:
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
    async with make_client() as client:
        with pytest.raises(imi.InvalidQueryError):
            await collect(client, status__lt="closed")
    assert api.calls == []


# -- transient failures: retried --------------------------------------------------------


TRANSIENT_REPLIES: list[tuple[str, Callable[[], Reply], type[e.TransientError]]] = [
    *[
        (str(r["status_code"]), (lambda r=r: api_error(r)), getattr(e, r["error"]))
        for r in TRANSIENT_ROWS
    ],
    ("429", lambda: http(429), e.RateLimitedError),
    ("429-json", lambda: api_error({**row(2007), "http_status": 429}), e.InternalServerError),
    ("502-html", lambda: http(502, GATEWAY_HTML), e.GatewayError),
    ("503-empty", lambda: http(503), e.GatewayError),
    ("504-html", lambda: http(504, GATEWAY_HTML), e.GatewayError),
    ("500-bare", lambda: http(500, "oops"), e.InternalServerError),
    ("reset", lambda: aiohttp.ServerDisconnectedError(), e.NetworkError),
    ("refused", lambda: aiohttp.ClientConnectionError("Connection refused"), e.NetworkError),
    ("oserror", lambda: aiohttp.ClientOSError(104, "Connection reset by peer"), e.NetworkError),
    ("payload", lambda: aiohttp.ClientPayloadError("truncated"), e.NetworkError),
    ("timeout", lambda: asyncio.TimeoutError(), e.NetworkError),
    ("server-timeout", lambda: aiohttp.ServerTimeoutError(), e.NetworkError),
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
    async with make_client(sleeps) as client:
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
    async with make_client(max_retries=max_retries) as client:
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
    async with make_client(concurrency=4) as client:
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
    policy = RetryPolicy(backoff_initial=0.25, backoff_max=20.0, retry_after_max=60.0)
    async with make_client(sleeps, retry_policy=policy) as client:
        assert await collect(client) == ["c-1-0"]
    assert len(sleeps.waits) == 4
    assert sleeps.waits[0] == 7.0
    assert sleeps.waits[1] == 60.0  # capped
    assert 0.0 <= sleeps.waits[2] <= 0.25 * 2**2  # garbage ignored: third retry's backoff
    assert sleeps.waits[3] == 2.5


async def test_max_retries_argument_overrides_policy(api: Api) -> None:
    """ImiChatClient(max_retries=n) wins over the retry_policy's own count."""
    api.script = {1: [http(502)]}
    async with make_client(max_retries=1, retry_policy=RetryPolicy.testing(max_retries=9)) as c:
        with pytest.raises(e.GatewayError):
            await collect(c)
    assert api.pages == [1, 1]


# -- permanent failures: never retried ---------------------------------------------------


@pytest.mark.parametrize("r", PERMANENT_ROWS, ids=lambda r: str(r["status_code"]))
async def test_permanent_error_is_not_retried(api: Api, r: dict[str, Any]) -> None:
    """A permanent row raises its typed error after exactly one request, no sleep."""
    api.script = {1: [api_error(r)]}
    sleeps = Sleeps()
    async with make_client(sleeps, concurrency=8) as client:
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
    async with make_client(concurrency=4) as client:
        with pytest.raises(e.InvalidFilterValueError) as info:
            async for chat in client.search_chats(prefetch=4):
                got.append(chat.chat_id)
    assert len(got) == 20
    assert api.pages.count(3) == 1
    assert info.value.page == 3
    await assert_no_stray_tasks()


# -- redirects and caps -----------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_redirect_not_followed(mocked: aioresponses, api: Api, status: int) -> None:
    """A 3xx with Location raises UnexpectedResponseError; the Location is never requested."""
    target = "https://evil.example/collect"
    mocked.get(target, status=200, repeat=True)
    mocked.post(target, status=200, repeat=True)
    api.script = {1: [http(status, headers={"Location": target})]}
    async with make_client() as client:
        with pytest.raises(e.UnexpectedResponseError) as info:
            await collect(client)
    assert info.value.http_status == status
    assert api.pages == [1]
    assert [str(u) for _, u in mocked.requests] == [f"{SEARCH}?page=1"]


@pytest.mark.parametrize("with_length", [True, False])
async def test_response_body_cap(api: Api, with_length: bool) -> None:
    """A body above max_response_bytes raises ResponseTooLargeError, not retried."""
    big = ok(50, 1)
    size = len(big.body)
    if with_length:
        big.headers = {"Content-Length": str(size)}
    api.script = {1: [big]}
    async with make_client(max_response_bytes=size - 1) as client:
        with pytest.raises(e.ResponseTooLargeError) as info:
            await collect(client)
    assert info.value.page == 1
    assert api.pages == [1]


async def test_body_at_the_cap_is_accepted(api: Api) -> None:
    """A body exactly at max_response_bytes is read."""
    reply = ok(3, 1)
    api.script = {1: [reply]}
    async with make_client(max_response_bytes=len(reply.body)) as client:
        assert len(await collect(client)) == 3


# -- the token --------------------------------------------------------------------------


async def test_static_token_expiry_raises_clearly(api: Api) -> None:
    """A fixed str token that expires raises TokenExpiredError saying how to refresh."""
    api.script = {1: [expired()]}
    async with make_client() as client:
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
    async with make_client(token=source) as client:
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
    async with make_client(token=source, concurrency=8) as client:
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
    async with make_client(token=source) as client:
        with pytest.raises(e.TokenExpiredError):
            await collect(client)
    assert 2 <= len(api.pages) <= 4
    assert source.calls == len(api.pages)


@pytest.mark.parametrize("bad", ["", None, 42])
async def test_token_callable_returning_garbage(api: Api, bad: Any) -> None:
    """A token callable returning a non-str or empty str raises ConfigurationError."""

    async def source() -> Any:
        return bad

    async with make_client(token=source) as client:
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
            aiohttp.ClientConnectionError("Connection refused"),
            asyncio.TimeoutError(),
            expired(),
            http(429, headers={"Retry-After": "1"}),
            ok(10, 1),
        ],
        2: [api_error(row(3445))],
    }
    errors: list[e.ApiError] = []
    async with make_client(token=source) as client:
        texts = [repr(client), str(client), repr(client._auth), repr(client.limiter)]
        with pytest.raises(e.ApiError) as info:
            await collect(client)
        errors.append(info.value)
    async with make_client() as static:
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


def test_client_repr_hides_token() -> None:
    """repr(client) shows base_url and team but masks the token."""
    client = make_client()
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
    async with make_client(concurrency=3) as client:
        results = await asyncio.gather(*(collect(client, prefetch=8) for _ in range(3)))
        assert client.limiter.peak <= 3
    assert all(len(r) == 50 for r in results)
    assert peak == 3


async def test_borrowed_session_stays_open(api: Api) -> None:
    """A session passed in is used and left open by close()."""
    api.script = {1: [ok(1, 1)]}
    async with aiohttp.ClientSession() as session:
        async with make_client(session=session) as client:
            assert len(await collect(client)) == 1
        assert not session.closed


async def test_closed_client_refuses_searches(api: Api) -> None:
    """After close(), a search raises ImiChatError and sends nothing."""
    client = make_client()
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
    async with make_client(concurrency=6) as client:
        async for chat in client.search_chats():
            if chat.chat_id == "c-1-3":
                break
        for _ in range(20):
            await asyncio.sleep(0)
        assert client.limiter.in_flight == 0
        await assert_no_stray_tasks()
