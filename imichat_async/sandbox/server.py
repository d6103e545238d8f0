"""The simulated IMIchat tenant: an aiohttp server on 127.0.0.1 speaking the wire contract.

`serve(...)` starts a `Sandbox` and yields it::

    async with sandbox.serve(chats=1000, seed=0, p_429=0.1) as sb:
        client = ImiChatClient(base_url=sb.base_url, token=sb.token, team_id=sb.team_id)

Routes, under `{base_url}` = `http://127.0.0.1:{port}/v3.0`:

- `POST /chats/search?page=n`: the endpoint, validated like the vendor
  (2002, 2003, 2004, 2010, 2099, 3114, 3115, 3445, 3446, 3447, 3451, 4303),
  filtering for real, 10 chats a page, `X-Total-Count` unless disabled;
  then the `Faults` (latency, 5xx, 429, resets, hangs, throttling, inserts).
- `POST /oauth/token`: a fresh token, `{"access_token", "token_type", "expires_in"}`.
- Any other path: HTTP 404 with the vendor's JSON form and a `status_code`
  of 404 (no row of the vendor's table fits an unknown path):
  `{"status_code": 404, "description": "No such resource: POST /x", "response": null}`.

Order of checks on the search path: the rate limit (429, a gateway's answer,
before anything else), method (2099), headers (2002), token (2003), team
(2010), expiry (2004), page (3115), body (3114, 3451, 3115, 3445, 3446,
3447, 4303); only a request that passes them all can draw a fault.

Answers this sandbox chose where the vendor's table is silent:

- a `page` that is not an integer from 1 to 2**63 - 1 (a 64-bit server
  integer; 5,000 digits included) is 3115 "Request is invalid", HTTP 400,
  after the authentication checks like any other bad page;
- a body over the size limit (aiohttp's `client_max_size`, 1 MiB) is 3115,
  HTTP 400, instead of aiohttp's plain-text 413.

Data changes as on a live tenant: `churn` (or the `churn_*` knobs) updates
chats (new status, `updated_at` = now) and inserts chats created now. The
served order is newest `created_at` first, ties by `chat_id`, so a new chat
appears where that order puts it (at the head while the clock is past every
other chat) and an updated chat keeps its place; only queries filtering on
what changed (`updated_at`, `status`) see it come or go. A client hanging
up is normal: it is never logged.

The server never binds anything but 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
from aiohttp import web

from imichat_async._protocol import (
    AUTH_HEADER,
    PAGE_SIZE,
    RETRY_AFTER_HEADER,
    SEARCH_PATH,
    STATUS_TABLE,
    SUCCESS_CODE,
    TEAM_HEADER,
    TOTAL_HEADER,
)

from .data import AGENTS, END_US, ChatFactory, Row, Table, format_us, row_of
from .faults import Faults, Stats
from .query import Query, QueryError, make_query, parse_body, select

HOST = "127.0.0.1"
API_ROOT = "/v3.0"
TOKEN_PATH = "/oauth/token"
DEFAULT_EXPIRES_IN = 3600  # what the token endpoint announces when tokens never expire
_BODY_CACHE_SIZE = 20_000  # serialized pages kept (about 5 KB each)
_CACHE_SIZE = 128
MAX_PAGE = 2**63 - 1  # the largest page a 64-bit server integer holds
#: The statuses `churn` moves chats between (the vendor's four).
STATUSES = ("queued", "picked", "onhold", "closed")
HOT_SHARE = 0.8  # share of churn updates that hit the hot set
HOT_SIZE = 20  # the most chats in the hot set
_MS = 1000
_TOO_MANY = {"message": "Too Many Requests"}

_HTML_502 = (
    "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1>"
    "</center><hr><center>nginx</center></body></html>\n"
)
_HTML_504 = (
    "<html><head><title>504 Gateway Time-out</title></head><body><center><h1>504 Gateway "
    "Time-out</h1></center><hr><center>nginx</center></body></html>\n"
)


@attrs.define
class _TokenState:
    issued_at: float
    uses: int = 0
    revoked: bool = False


@attrs.frozen
class Churn:
    """What one `Sandbox.churn` did: the new versions of updated chats, and the new chats.

    A chat updated twice in one call appears twice in `updated`, oldest version first.
    """

    updated: list[dict[str, Any]]
    inserted: list[dict[str, Any]]


class Sandbox:
    """One simulated tenant: its chats, tokens, faults and stats, and the server serving them.

    Use `serve(...)` (or `async with Sandbox(...)`). See the module docstring for the routes.
    `clock` (monotonic seconds) drives the rate limit and token lifetimes,
    `wall_clock` (epoch seconds) the `created_at`/`updated_at` of changed
    chats; tests may pass fakes.
    """

    def __init__(
        self,
        chats: int = 1000,
        seed: int = 0,
        *,
        total_header: bool = True,
        faults: Faults | None = None,
        token_ttl: float | None = None,
        token_max_uses: int | None = None,
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if chats < 0:
            raise ValueError(f"chats must be >= 0, got {chats}")
        if token_max_uses is not None and token_max_uses < 1:
            raise ValueError(f"token_max_uses must be >= 1 or None, got {token_max_uses}")
        self.seed = seed
        self.total_header = total_header
        self.faults = faults if faults is not None else Faults()
        self.token_ttl = token_ttl
        self.token_max_uses = token_max_uses
        self.stats = Stats()
        self._port = port
        self._clock = clock
        self._wall_clock = wall_clock
        self._factory = ChatFactory(seed)
        self._table = Table(*self._factory.generate(chats))
        #: Every chat, in served order (the table's own list: read it, do not change it).
        self.data: list[dict[str, Any]] = self._table.chats
        self._rows: list[Row] = self._table.rows
        self._fault_rng = random.Random(f"faults-{seed}")
        self._churn_rng = random.Random(f"churn-{seed}")
        self._hot: collections.deque[str] | None = None  # busy chats, made at the first churn
        self._bucket: tuple[float, int] | None = None  # (rate, burst) the bucket was filled for
        self._bucket_level = 0.0
        self._bucket_at = 0.0
        self.team_id = f"{random.Random(f'team-{seed}').getrandbits(96):024x}"
        self._tokens: dict[str, _TokenState] = {}
        self.token = self._issue()
        self._cache: OrderedDict[Query, list[dict[str, Any]]] = OrderedDict()
        self._bodies: dict[tuple[Query, int], bytes] = {}  # serialized pages, same lifetime
        self._valid_searches = 0
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind 127.0.0.1:`port` (0 = any free port) and serve; sets `base_url`."""
        runner = web.AppRunner(
            make_app(self), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, HOST, self._port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        port = runner.addresses[0][1]
        self.base_url = f"http://{HOST}:{port}{API_ROOT}"

    async def close(self) -> None:
        """Stop serving: hung requests are dropped at once, open connections closed."""
        self._closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def port(self) -> int:
        """The bound port (after `start`)."""
        return int(self.base_url.rsplit(":", 1)[1].split("/", 1)[0])

    @property
    def search_url(self) -> str:
        """`{base_url}/chats/search`, without the page query."""
        return self.base_url + SEARCH_PATH

    @property
    def token_url(self) -> str:
        """POST here (no auth) for `{"access_token": ..., "expires_in": ...}`."""
        return self.base_url + TOKEN_PATH

    # -- tokens ------------------------------------------------------------------------------

    def _issue(self) -> str:
        token = f"sbx.{secrets.token_urlsafe(24)}"
        self._tokens[token] = _TokenState(self._clock())
        return token

    async def new_token(self) -> str:
        """Issue a fresh token (counted in `stats.tokens_issued`); usable as a token callable."""
        self.stats.tokens_issued += 1
        return self._issue()

    def expire_token(self, token: str | None = None) -> None:
        """Make `token` (default: every token issued so far) answer 2004 from now on."""
        for key, state in self._tokens.items():
            if token is None or key == token:
                state.revoked = True

    def _expired(self, state: _TokenState) -> bool:
        if state.revoked:
            return True
        if self.token_max_uses is not None and state.uses >= self.token_max_uses:
            return True
        return self.token_ttl is not None and self._clock() - state.issued_at >= self.token_ttl

    # -- data --------------------------------------------------------------------------------

    def _changed(self) -> None:
        """Forget every cached answer: the data changed."""
        self._cache.clear()
        self._bodies.clear()

    def insert_chats(self, n: int) -> list[dict[str, Any]]:
        """Insert `n` new chats at the head (created after every other chat); return them.

        The pages of every search shift by `n` places, as with a live tenant.
        Their `created_at` is one second apart after the newest chat (not the
        wall clock: use `churn` for chats created now).
        """
        newest = max(self._rows[0].created_us if self._rows else 0, END_US)
        made = [self._factory.make(newest + (i + 1) * 1_000_000) for i in range(n)]
        made.reverse()  # newest first
        for chat, row in made:
            self._table.insert(chat, row)
        self._changed()
        self.stats.inserted += n
        return [chat for chat, _ in made]

    def _now_us(self) -> int:
        """The wall clock in whole milliseconds (what `format_us` serves), as microseconds."""
        return int(self._wall_clock() * 1000) * _MS

    def update_chat(self, chat_id: str, status: str | None = None) -> dict[str, Any]:
        """Make a new version of `chat_id`: `status` (default: another of `STATUSES`), updated now.

        `updated_at` is the wall clock in UTC (whole milliseconds, `Z`), or 1 ms
        after the chat's previous `updated_at` if that is not earlier, so each
        version of a chat is strictly newer than the last. A chat moving to
        `queued` loses its assignee; one leaving `queued` gets one. The record
        is replaced, never changed in place: records handed out earlier stay as
        they were. Returns the new record; raises `KeyError` for an unknown id.
        """
        try:
            chat, row = self._table.get(chat_id)
        except KeyError:
            raise KeyError(f"no chat {chat_id!r} in this sandbox") from None
        if status is None:
            others = [s for s in STATUSES if s != chat.get("status")]
            status = others[int(self._churn_rng.random() * len(others))]
        updated_us = max(self._now_us(), row.updated_us + _MS)
        new = dict(chat)
        new["status"] = status
        new["updated_at"] = format_us(updated_us)
        if "assignee" in new:
            if status == "queued":
                new["assignee"] = None
            elif new["assignee"] is None:
                new["assignee"] = AGENTS[int(self._churn_rng.random() * len(AGENTS))]
        self._table.replace(new, row_of(new, row.created_us, updated_us))
        self._changed()
        self.stats.updated += 1
        return new

    def _insert_now(self) -> dict[str, Any]:
        """A new chat created now (`updated_at` = `created_at`), where the order puts it."""
        created_us = self._now_us()
        chat, row = self._factory.make(created_us)
        chat["updated_at"] = chat["created_at"]
        self._table.insert(chat, row._replace(updated_us=created_us))
        self.stats.inserted += 1
        return chat

    def _hot_set(self) -> collections.deque[str]:
        """The busy chats: a tenth of the chats at the first churn, at most `HOT_SIZE`."""
        if self._hot is None:
            ids = self._table.ids()
            size = max(1, min(HOT_SIZE, len(ids) // 10))
            picked = self._churn_rng.sample(ids, min(size, len(ids)))
            self._hot = collections.deque(picked, maxlen=size)
        return self._hot

    def _pick_busy(self) -> str:
        """A chat to update (the tenant has some): from the hot set with probability `HOT_SHARE`."""
        rng = self._churn_rng
        hot = self._hot_set()
        if hot and rng.random() < HOT_SHARE:
            return hot[int(rng.random() * len(hot))]
        chat_id: str = self.data[int(rng.random() * len(self.data))]["chat_id"]
        return chat_id

    def churn(self, updates: int = 0, inserts: int = 0) -> Churn:
        """Change the data as a live tenant does: `updates` new versions, then `inserts` new chats.

        Updated chats are mostly (`HOT_SHARE`) drawn from a small hot set (at
        most `HOT_SIZE` chats), so the same busy chats change again and again,
        possibly twice in one call; new chats join the hot set. Each update is
        `update_chat(chat_id)`; each new chat has `created_at` = `updated_at`
        = the wall clock and takes its place in the served order (newest
        `created_at` first). Draws come from a generator seeded by the seed.
        On an empty tenant there is nothing to update: only inserts happen.
        Raises `ValueError` for a negative count.
        """
        if updates < 0 or inserts < 0:
            raise ValueError(f"updates and inserts must be >= 0, got {updates}, {inserts}")
        updated = [self.update_chat(self._pick_busy()) for _ in range(updates if self.data else 0)]
        hot = self._hot_set()  # made before the new chats join it
        inserted = [self._insert_now() for _ in range(inserts)]
        if inserted:
            hot.extend(chat["chat_id"] for chat in inserted)
            self._changed()
        return Churn(updated=updated, inserted=inserted)

    def current_records(self) -> dict[str, dict[str, Any]]:
        """The current record of every chat, by `chat_id`, as the server serves it now.

        A new dict; the records are the served ones (never changed in place by the sandbox).
        """
        return {chat["chat_id"]: chat for chat in self.data}

    def _results(self, query: Query) -> list[dict[str, Any]]:
        hit = self._cache.get(query)
        if hit is not None:
            self._cache.move_to_end(query)
            return hit
        result = select(self._table, query)
        self._cache[query] = result
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return result

    def expected(
        self, filters: list[tuple[str, str, str]] | None = None, condition: str = "and"
    ) -> list[dict[str, Any]]:
        """The chats the server matches for these filters, in served order (a new list).

        Raises `QueryError` (a `ValueError`) for filters the server would refuse.
        """
        return list(self._results(make_query(filters, condition)))

    # -- HTTP --------------------------------------------------------------------------------

    def _error(self, code: int, **fields: str) -> web.Response:
        row = STATUS_TABLE[code]
        description = row.description.format(**fields) if fields else row.description
        return self._error_response(code, row.http_status, description)

    def _error_response(self, code: int, http_status: int, description: str) -> web.Response:
        self.stats.errors_by_code[code] += 1
        if code == 2004:
            self.stats.expired_hits += 1
        body = {"status_code": code, "description": description, "response": None}
        return web.json_response(body, status=http_status)

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), seconds)

    async def handle_search(self, request: web.Request) -> web.StreamResponse:
        """The search endpoint: bookkeeping around `_search`."""
        stats = self.stats
        stats.requests_total += 1
        stats.in_flight += 1
        stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
        try:
            return await self._search(request, stats.in_flight)
        finally:
            stats.in_flight -= 1

    def _over_rate(self) -> int | None:
        """Take a token from the rate-limit bucket; if there is none, the Retry-After to send.

        A token bucket of `faults.burst` tokens refilled at `faults.rate_limit`
        per second of `clock`, full when the knobs are (re)set; a refused
        request takes no token. Retry-After is the time until one token is
        back, in whole seconds rounded up, at least 1.
        """
        rate = self.faults.rate_limit
        assert rate is not None
        burst = self.faults.burst
        now = self._clock()
        if self._bucket != (rate, burst):
            self._bucket = (rate, burst)
            self._bucket_level = float(burst)
        else:
            self._bucket_level = min(burst, self._bucket_level + (now - self._bucket_at) * rate)
        self._bucket_at = now
        if self._bucket_level >= 1.0:
            self._bucket_level -= 1.0
            return None
        return max(1, math.ceil((1.0 - self._bucket_level) / rate - 1e-9))

    def _too_many(self, retry_after: str | None) -> web.Response:
        self.stats.errors_by_code[429] += 1
        headers = {RETRY_AFTER_HEADER: retry_after} if retry_after is not None else None
        return web.json_response(_TOO_MANY, status=429, headers=headers)

    async def _search(self, request: web.Request, arrival_in_flight: int) -> web.StreamResponse:
        page = _page(request.query.get("page", "1"))
        if page is not None:
            self.stats.requests_by_page[page] += 1
        faults = self.faults
        if faults.rate_limit is not None:
            wait = self._over_rate()
            if wait is not None:
                self.stats.rate_limited += 1
                self.stats.throttled += 1
                return self._too_many(str(wait))
        delay = faults.latency + faults.latency_per_page * (page or 1)
        if faults.jitter > 0:
            delay += faults.jitter * self._fault_rng.random()
        if delay > 0:
            await asyncio.sleep(delay)  # cheap: no task per request (hangs use `_sleep`)

        refused = self._check_auth(request)
        if refused is not None:
            return refused
        if page is None:
            return self._error(3115)
        if request.content_type != "application/json" and not request.content_type.endswith(
            "+json"
        ):
            return self._error(3114)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._error(3115)
        except ConnectionError:
            # The client hung up (aiohttp fails the body read once the connection is
            # lost, even a body already received): normal, and nobody to answer.
            return web.Response(status=499)
        if not raw.strip():
            return self._error(3114)
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return self._error(3451)
        try:
            query = parse_body(doc)
        except QueryError as exc:
            return self._error_response(exc.code, exc.http_status, exc.description)

        # Valid: from here on, faults may strike.
        self._valid_searches += 1
        if faults.insert_every is not None and self._valid_searches % faults.insert_every == 0:
            self.insert_chats(1)
        if faults.churn_every is not None and self._valid_searches % faults.churn_every == 0:
            self.churn(faults.churn_updates, faults.churn_inserts)
        fault = self._draw_fault(page, arrival_in_flight)
        if fault is not None:
            self.stats.faults[fault] += 1
            return await self._inject(request, fault)

        results = self._results(query)
        body = self._bodies.get((query, page))
        if body is None:
            start = (page - 1) * PAGE_SIZE
            doc = {
                "status_code": SUCCESS_CODE,
                "description": STATUS_TABLE[SUCCESS_CODE].description,
                "response": results[start : start + PAGE_SIZE],
            }
            body = json.dumps(doc, separators=(",", ":")).encode()
            if len(self._bodies) >= _BODY_CACHE_SIZE:
                self._bodies.clear()
            self._bodies[(query, page)] = body
        headers = {TOTAL_HEADER: str(len(results))} if self.total_header else None
        return web.Response(body=body, content_type="application/json", headers=headers)

    def _check_auth(self, request: web.Request) -> web.Response | None:
        if request.method != "POST":
            return self._error(2099)
        auth = request.headers.get(AUTH_HEADER)
        team = request.headers.get(TEAM_HEADER)
        if not auth or not team:
            return self._error(2002)
        scheme, _, token = auth.partition(" ")
        state = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if state is None:
            return self._error(2003)
        if team != self.team_id:
            return self._error(2010)
        if self._expired(state):
            return self._error(2004)
        state.uses += 1
        return None

    def _draw_fault(self, page: int, arrival_in_flight: int) -> str | None:
        faults = self.faults
        limit = faults.max_in_flight
        if limit is not None and arrival_in_flight > limit:
            self.stats.throttled += 1
            return "429"
        kind = faults.fault_pages.pop(page, None)
        if kind is not None:
            return kind
        return faults.pick(self._fault_rng.random())

    async def _inject(self, request: web.Request, kind: str) -> web.StreamResponse:
        if kind in ("2007", "3454"):
            return self._error(int(kind))
        if kind == "429":
            retry_after = self.faults.retry_after
            return self._too_many(None if retry_after is None else f"{retry_after:g}")
        if kind in ("502", "504"):
            self.stats.errors_by_code[int(kind)] += 1
            html = _HTML_502 if kind == "502" else _HTML_504
            return web.Response(status=int(kind), text=html, content_type="text/html")
        if kind == "503":
            self.stats.errors_by_code[503] += 1
            return web.Response(status=503)
        if kind == "hang":
            await self._sleep(self.faults.hang_seconds)
        # "reset", or a hang that is over: drop the connection without an answer.
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)  # never reaches the client

    async def handle_token(self, request: web.Request) -> web.Response:
        """POST: issue a token; no authentication."""
        if request.method != "POST":
            return self._error(2099)
        token = await self.new_token()
        expires_in = DEFAULT_EXPIRES_IN if self.token_ttl is None else self.token_ttl
        return web.json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": expires_in}
        )

    async def handle_unknown(self, request: web.Request) -> web.Response:
        """Any other path: 404 in the vendor's JSON form (not aiohttp's plain text)."""
        description = f"No such resource: {request.method} {request.path}"
        return self._error_response(404, 404, description)


SANDBOX_KEY = web.AppKey("sandbox", Sandbox)


def _page(value: str) -> int | None:
    """A 1-based page number from the query string, or None when it is not one.

    Not one: anything but ASCII digits, 0, or more than `MAX_PAGE` (checked on
    the digits, before `int()`, which refuses strings of over 4,300 digits).
    """
    value = value.strip().lstrip("0")
    if not value.isdigit() or not value.isascii() or len(value) > len(str(MAX_PAGE)):
        return None
    page = int(value)
    return page if page <= MAX_PAGE else None


def make_app(sandbox: Sandbox | None = None, **kwargs: Any) -> web.Application:
    """The aiohttp application of `sandbox` (or of `Sandbox(**kwargs)`), stored at `SANDBOX_KEY`.

    For serving it yourself; `base_url` stays empty unless `Sandbox.start` bound it.
    """
    sb = sandbox if sandbox is not None else Sandbox(**kwargs)
    app = web.Application()
    app[SANDBOX_KEY] = sb
    app.router.add_route("*", API_ROOT + SEARCH_PATH, sb.handle_search)
    app.router.add_route("*", API_ROOT + TOKEN_PATH, sb.handle_token)
    # Last, so only a path no route above matches reaches it (the router indexes plain paths).
    app.router.add_route("*", "/{tail:.*}", sb.handle_unknown)
    return app


@contextlib.asynccontextmanager
async def serve(
    chats: int = 1000,
    seed: int = 0,
    total_header: bool = True,
    faults: Faults | None = None,
    token_ttl: float | None = None,
    token_max_uses: int | None = None,
    port: int = 0,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    **fault_knobs: Any,
) -> AsyncIterator[Sandbox]:
    """Serve a `Sandbox` on 127.0.0.1 for the duration of the block.

    `Faults` fields may be given as keywords (`serve(latency=0.04, p_429=0.1)`).
    Without them, `faults` itself becomes `sb.faults`; with them, they are
    applied over a copy of `faults` (the argument is then left untouched).
    """
    unknown = set(fault_knobs) - Faults.field_names()
    if unknown:
        raise TypeError(f"serve() got unexpected keyword arguments: {sorted(unknown)}")
    if faults is None:
        merged = Faults(**fault_knobs)
    elif fault_knobs:
        merged = attrs.evolve(faults, **fault_knobs)
    else:
        merged = faults
    sb = Sandbox(
        chats,
        seed,
        total_header=total_header,
        faults=merged,
        token_ttl=token_ttl,
        token_max_uses=token_max_uses,
        port=port,
        clock=clock,
        wall_clock=wall_clock,
    )
    async with sb:
        yield sb
