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
- Another method on either path: 2099 (HTTP 405) with `Allow: POST` (RFC 9110).
- Any other path under `/v3.0/`: the API's own 404, in the vendor's JSON form
  with a `status_code` of 404 (no row of the vendor's table fits an unknown path):
  `{"status_code": 404, "description": "No such resource: POST /v3.0/x", "response": null}`.
- Any path outside `/v3.0/` (a base URL without `/v3.0`): the front server's
  plain HTML 404, without the vendor's JSON, as a real tenant's host answers;
  the client then says to check `base_url`.

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

This module is the aiohttp side: the app, its handlers, the order of the
checks and `serve()`. `Sandbox` composes the parts, each in its own module:
`_tenant` (the chats and their changes), `_tokens`, `_gateway` (the rate
limit), `_injection` (the faults), `_replies` (every answer but a page) and
`vendor` (its own copy of the vendor's table: it imports nothing of the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
from aiohttp import hdrs, web

from . import _replies
from ._gateway import TokenBucket
from ._injection import Injector
from ._tenant import Churn, Tenant
from ._tokens import Tokens
from .faults import Faults, Stats
from .query import Query, QueryError, parse_body
from .vendor import API_ROOT, AUTH_HEADER, SEARCH_PATH, TEAM_HEADER, TOTAL_HEADER

__all__ = ["SANDBOX_KEY", "Churn", "Sandbox", "make_app", "serve"]

HOST = "127.0.0.1"
TOKEN_PATH = "/oauth/token"
MAX_PAGE = 2**63 - 1  # the largest page a 64-bit server integer holds


class Sandbox:
    """One simulated tenant: its chats, tokens, faults and stats, and the server serving them.

    Use `serve(...)` (or `async with Sandbox(...)`). See the module docstring for the routes.
    `clock` (monotonic seconds) drives the rate limit and token lifetimes,
    `wall_clock` (epoch seconds) the `created_at`/`updated_at` of changed
    chats and every response's `Date` header; tests may pass fakes.
    `clock_offset` (seconds) sets the server's clock that far from `wall_clock`
    (its `Date` headers and the times it stamps alike): a server whose clock
    is skewed from the client's. `date_header=False` sends the `Date` header
    empty (aiohttp always sends one): a server whose clock a client cannot read.
    `json_style` is how success bodies are serialized: "compact" (the default;
    ASCII, other characters escaped), "spaced" (", " and ": ", characters as
    UTF-8) or "pretty" (indented: a record spans lines).
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
        clock_offset: float = 0.0,
        date_header: bool = True,
        json_style: str = "compact",
    ) -> None:
        if chats < 0:
            raise ValueError(f"chats must be >= 0, got {chats}")
        self._tokens = Tokens(clock, token_ttl, token_max_uses)
        self.seed = seed
        self.total_header = total_header
        self.faults = faults if faults is not None else Faults()
        self.stats = Stats()
        self._port = port
        self._clock = clock
        self._wall_clock = wall_clock
        self.clock_offset = clock_offset
        self.date_header = date_header
        self._date: tuple[int, str] = (-1, "")  # the last Date header, by its second
        self._tenant = Tenant(chats, seed, self.now, json_style)
        #: Every chat, in served order (the table's own list: read it, do not change it).
        self.data: list[dict[str, Any]] = self._tenant.data
        self._closing = asyncio.Event()
        self._injector = Injector(seed, self._closing)
        self._bucket = TokenBucket()
        self.team_id = f"{random.Random(f'team-{seed}').getrandbits(96):024x}"
        self.token = self._tokens.issue()
        self._valid_searches = 0
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

    @property
    def token_ttl(self) -> float | None:
        """Seconds a token lives after issue (None: forever)."""
        return self._tokens.ttl

    @token_ttl.setter
    def token_ttl(self, value: float | None) -> None:
        self._tokens.ttl = value

    @property
    def token_max_uses(self) -> int | None:
        """Accepted requests a token serves before it answers 2004 (None: no limit)."""
        return self._tokens.max_uses

    @token_max_uses.setter
    def token_max_uses(self, value: int | None) -> None:
        self._tokens.max_uses = value

    def _issue(self) -> str:
        """A fresh token, not counted in `stats.tokens_issued`."""
        return self._tokens.issue()

    async def new_token(self) -> str:
        """Issue a fresh token (counted in `stats.tokens_issued`); usable as a token callable."""
        self.stats.tokens_issued += 1
        return self._tokens.issue()

    def expire_token(self, token: str | None = None) -> None:
        """Make `token` (default: every token issued so far) answer 2004 from now on."""
        self._tokens.expire(token)

    # -- the server's clock -------------------------------------------------------------------

    def now(self) -> float:
        """The server's clock (epoch seconds): `wall_clock() + clock_offset`."""
        return self._wall_clock() + self.clock_offset

    def http_date(self) -> str:
        """The `Date` header of a response sent now (IMF-fixdate), or "" without `date_header`."""
        if not self.date_header:
            return ""
        second = math.floor(self.now())
        if self._date[0] != second:
            self._date = (second, email.utils.formatdate(second, usegmt=True))
        return self._date[1]

    async def _stamp_date(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every response's `Date` from the server's own clock (not aiohttp's)."""
        response.headers[hdrs.DATE] = self.http_date()

    # -- data --------------------------------------------------------------------------------

    def insert_chats(self, n: int) -> list[dict[str, Any]]:
        """Insert `n` new chats at the head (created after every other chat); return them.

        The pages of every search shift by `n` places, as with a live tenant.
        Their `created_at` is one second apart after the newest chat (not the
        wall clock: use `churn` for chats created now).
        """
        made = self._tenant.insert_chats(n)
        self.stats.inserted += n
        return made

    def update_chat(self, chat_id: str, status: str | None = None) -> dict[str, Any]:
        """Make a new version of `chat_id`: `status` (default: another of `STATUSES`), updated now.

        `updated_at` is the wall clock in UTC (whole milliseconds, `Z`), or 1 ms
        after the chat's previous `updated_at` if that is not earlier, so each
        version of a chat is strictly newer than the last. A chat moving to
        `queued` loses its assignee; one leaving `queued` gets one. The record
        is replaced, never changed in place: records handed out earlier stay as
        they were. Returns the new record; raises `KeyError` for an unknown id.
        """
        new = self._tenant.update_chat(chat_id, status)
        self.stats.updated += 1
        return new

    def drop_updated_at(self, chat_id: str, missing: bool = False) -> dict[str, Any]:
        """Serve `chat_id` with `updated_at` null (`missing`: without the field), a record quirk
        the wire contract allows for any optional field; return the record now served.

        The server still filters on the time it holds (as a view that drops a column); a
        later `update_chat` gives the chat an `updated_at` again. Raises `KeyError` for an
        unknown id.
        """
        return self._tenant.drop_updated_at(chat_id, missing)

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
        made = self._tenant.churn(updates, inserts)
        self.stats.updated += len(made.updated)
        self.stats.inserted += len(made.inserted)
        return made

    def current_records(self) -> dict[str, dict[str, Any]]:
        """The current record of every chat, by `chat_id`, as the server serves it now.

        A new dict; the records are the served ones (never changed in place by the sandbox).
        """
        return self._tenant.current_records()

    def expected(
        self, filters: list[tuple[str, str, str]] | None = None, condition: str = "and"
    ) -> list[dict[str, Any]]:
        """The chats the server matches for these filters, in served order (a new list).

        Raises `QueryError` (a `ValueError`) for filters the server would refuse.
        """
        return self._tenant.expected(filters, condition)

    # -- HTTP --------------------------------------------------------------------------------

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

    async def _search(self, request: web.Request, arrival_in_flight: int) -> web.StreamResponse:
        stats = self.stats
        page = _page(request.query.get("page", "1"))
        if page is not None:
            stats.requests_by_page[page] += 1
        faults = self.faults
        if faults.rate_limit is not None:
            wait = self._bucket.take(faults.rate_limit, faults.burst, self._clock())
            if wait is not None:
                stats.rate_limited += 1
                stats.throttled += 1
                return _replies.too_many(stats, str(wait))
        delay = self._injector.delay(faults, page or 1)
        if delay > 0:
            await asyncio.sleep(delay)  # cheap: no task per request (hangs wait on `close`)

        refused = _check_auth(request, self._tokens, self.team_id, stats)
        if refused is not None:
            return refused
        if page is None:
            return _replies.vendor_error(stats, 3115)
        if request.content_type != "application/json" and not request.content_type.endswith(
            "+json"
        ):
            return _replies.vendor_error(stats, 3114)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _replies.vendor_error(stats, 3115)
        except ConnectionError:
            # The client hung up (aiohttp fails the body read once the connection is
            # lost, even a body already received): normal, and nobody to answer.
            return web.Response(status=499)
        query = _parse_query(raw, stats)
        if not isinstance(query, Query):
            return query

        # Valid: from here on, faults may strike.
        self._valid_searches += 1
        if faults.insert_every is not None and self._valid_searches % faults.insert_every == 0:
            self.insert_chats(1)
        if faults.churn_every is not None and self._valid_searches % faults.churn_every == 0:
            self.churn(faults.churn_updates, faults.churn_inserts)
        fault = self._injector.draw(faults, stats, page, arrival_in_flight)
        if fault is not None:
            stats.faults[fault] += 1
            return await self._injector.inject(request, fault, faults, stats)

        results = self._tenant.results(query)
        body = self._tenant.page_body(query, page, results)
        headers = {TOTAL_HEADER: str(len(results))} if self.total_header else None
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def handle_token(self, request: web.Request) -> web.Response:
        """POST: issue a token; no authentication."""
        if request.method != "POST":
            return _replies.method_not_allowed(self.stats)
        token = await self.new_token()
        return web.json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": self._tokens.expires_in}
        )

    async def handle_unknown(self, request: web.Request) -> web.Response:
        """Any other path: under the API root, the API's 404 in the vendor's JSON form;
        elsewhere, the front server's HTML 404 (no vendor body: the client's base_url hint)."""
        if not request.path.startswith(API_ROOT + "/"):
            return _replies.not_found(self.stats)
        description = f"No such resource: {request.method} {request.path}"
        return _replies.error_response(self.stats, 404, 404, description)


SANDBOX_KEY = web.AppKey("sandbox", Sandbox)


def _check_auth(
    request: web.Request, tokens: Tokens, team_id: str, stats: Stats
) -> web.Response | None:
    """The refusal of a search that fails authentication (2099, 2002, 2003, 2010, 2004, in
    that order), or None after counting a use of its token."""
    if request.method != "POST":
        return _replies.method_not_allowed(stats)
    auth = request.headers.get(AUTH_HEADER)
    team = request.headers.get(TEAM_HEADER)
    if not auth or not team:
        return _replies.vendor_error(stats, 2002)
    scheme, _, token = auth.partition(" ")
    state = tokens.get(token.strip()) if scheme.lower() == "bearer" else None
    if state is None:
        return _replies.vendor_error(stats, 2003)
    if team != team_id:
        return _replies.vendor_error(stats, 2010)
    if tokens.expired(state):
        return _replies.vendor_error(stats, 2004)
    state.uses += 1
    return None


def _parse_query(raw: bytes, stats: Stats) -> Query | web.Response:
    """The query of a search's body, or its refusal: 3114 (empty), 3451 (not JSON) or the
    query's own code."""
    if not raw.strip():
        return _replies.vendor_error(stats, 3114)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return _replies.vendor_error(stats, 3451)
    try:
        return parse_body(doc)
    except QueryError as exc:
        return _replies.error_response(stats, exc.code, exc.http_status, exc.description)


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
    app.on_response_prepare.append(sb._stamp_date)
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
    clock_offset: float = 0.0,
    date_header: bool = True,
    json_style: str = "compact",
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
        clock_offset=clock_offset,
        date_header=date_header,
        json_style=json_style,
    )
    async with sb:
        yield sb
