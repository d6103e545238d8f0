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

Order of checks on the search path: method (2099), headers (2002), token
(2003), team (2010), expiry (2004), page (3115), body (3114, 3451, 3115,
3445, 3446, 3447, 4303); only a request that passes them all can draw a fault.
The server never binds anything but 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
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

from .data import END_US, ChatFactory, Row
from .faults import Faults, Stats
from .query import Query, QueryError, make_query, parse_body, predicate

HOST = "127.0.0.1"
API_ROOT = "/v3.0"
TOKEN_PATH = "/oauth/token"
DEFAULT_EXPIRES_IN = 3600  # what the token endpoint announces when tokens never expire
_BODY_CACHE_SIZE = 20_000  # serialized pages kept (about 5 KB each)
_CACHE_SIZE = 128

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


class Sandbox:
    """One simulated tenant: its chats, tokens, faults and stats, and the server serving them.

    Use `serve(...)` (or `async with Sandbox(...)`). See the module docstring for the routes.
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
        self._factory = ChatFactory(seed)
        self.data: list[dict[str, Any]]
        self._rows: list[Row]
        self.data, self._rows = self._factory.generate(chats)
        self._fault_rng = random.Random(f"faults-{seed}")
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
        self._tokens[token] = _TokenState(time.monotonic())
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
        return self.token_ttl is not None and time.monotonic() - state.issued_at >= self.token_ttl

    # -- data --------------------------------------------------------------------------------

    def insert_chats(self, n: int) -> list[dict[str, Any]]:
        """Insert `n` new chats at the head (created after every other chat); return them.

        The pages of every search shift by `n` places, as with a live tenant.
        """
        newest = max(self._rows[0].created_us if self._rows else 0, END_US)
        made = [self._factory.make(newest + (i + 1) * 1_000_000) for i in range(n)]
        made.reverse()  # newest first
        self.data[0:0] = [chat for chat, _ in made]
        self._rows[0:0] = [row for _, row in made]
        self._cache.clear()
        self._bodies.clear()
        self.stats.inserted += n
        return [chat for chat, _ in made]

    def _results(self, query: Query) -> list[dict[str, Any]]:
        hit = self._cache.get(query)
        if hit is not None:
            self._cache.move_to_end(query)
            return hit
        match = predicate(query)
        if match is None:
            result = list(self.data)
        else:
            result = [chat for chat, row in zip(self.data, self._rows, strict=True) if match(row)]
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

    async def _search(self, request: web.Request, arrival_in_flight: int) -> web.StreamResponse:
        page = _page(request.query.get("page", "1"))
        if page is not None:
            self.stats.requests_by_page[page] += 1
        faults = self.faults
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
        raw = await request.read()
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
            self.stats.errors_by_code[429] += 1
            headers = {}
            if self.faults.retry_after is not None:
                headers[RETRY_AFTER_HEADER] = f"{self.faults.retry_after:g}"
            return web.json_response({"message": "Too Many Requests"}, status=429, headers=headers)
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


SANDBOX_KEY = web.AppKey("sandbox", Sandbox)


def _page(value: str) -> int | None:
    """A 1-based page number from the query string, or None when it is not one."""
    value = value.strip()
    if not value.isdigit() or not value.isascii():
        return None
    page = int(value)
    return page if page >= 1 else None


def make_app(sandbox: Sandbox | None = None, **kwargs: Any) -> web.Application:
    """The aiohttp application of `sandbox` (or of `Sandbox(**kwargs)`), stored at `SANDBOX_KEY`.

    For serving it yourself; `base_url` stays empty unless `Sandbox.start` bound it.
    """
    sb = sandbox if sandbox is not None else Sandbox(**kwargs)
    app = web.Application()
    app[SANDBOX_KEY] = sb
    app.router.add_route("*", API_ROOT + SEARCH_PATH, sb.handle_search)
    app.router.add_route("*", API_ROOT + TOKEN_PATH, sb.handle_token)
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
    )
    async with sb:
        yield sb
