"""`ImiChatClient`: composes query, protocol, auth, retry, transport, paging and records.

It owns the lifecycle (session, limiter) and the per-page call: build the
request, send it, classify the answer, retry what is transient, refresh an
expired token once for everyone, decode. Its repr never shows the token.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, overload
from urllib.parse import urlsplit

import aiohttp
import attrs

from . import _otel
from . import _protocol as protocol
from ._auth import STATIC_TOKEN_EXPIRED, TokenProvider, TokenSource
from ._errors import (
    ApiError,
    ConfigurationError,
    ImiChatError,
    InvalidQueryError,
    SearchTimeoutError,
    TokenExpiredError,
)
from ._limiter import Limiter
from ._paging import Hedger, Page, PagingStats, iterate_pages
from ._query import Filter, Query, build_query
from ._rate import SendRate
from ._records import Chat, decode_page
from ._retry import RetryPolicy, call_with_retries, make_retrying
from ._transport import AiohttpTransport, RawResponse, Transport

log = logging.getLogger("imichat_async")

OVERLOAD_STATUSES = frozenset({429, 503})  # what adaptive concurrency backs off on
MAX_REFUSED_FRESH = 2  # tokens in a row refused before serving any page, before giving up
PREFETCH_PER_SLOT = 4  # default prefetch = 4 x concurrency: see README, "Choices"
RawRecord = Mapping[str, Any]
T = TypeVar("T")
X = TypeVar("X")


@attrs.frozen
class ChatPage(Generic[T]):
    """One page of `search_pages`: its 1-based `number`, its `items` (`Chat` records, or with
    `raw=True` the JSON objects as sent), the server's `total` match count when it sent one,
    and `last`: True when no page follows. Without a total, a full page may still turn out
    to be the last (the next one came back empty): then the search ends after a page whose
    `last` is False.
    """

    number: int
    items: Sequence[T]
    total: int | None = None
    last: bool = False

    @property
    def chats(self) -> Sequence[T]:
        """The items (the name of the first release)."""
        return self.items

    @property
    def page(self) -> int:
        """The page number (the name of the first release)."""
        return self.number


@attrs.define
class ClientStats:
    """Counters across every search of one client."""

    requests: int = 0  # HTTP attempts sent
    retries: int = 0
    token_refreshes: int = 0
    pages: int = 0  # pages answered successfully
    records: int = 0
    hedges: int = 0  # duplicate requests sent for an overdue head page


class ImiChatClient:
    """Async client for POST /chats/search. Use as `async with ImiChatClient(...) as client:`.

    `token` is a `str`, or a zero-argument async callable returning one; the
    callable is called for the first token and again after a 2004, once for
    every request that saw that expiry. `concurrency` bounds the requests in
    flight across all searches of this client. `timeout` is seconds per
    request attempt; `max_retries` the retries of a transient failure after
    the first attempt (default: `retry_policy`'s, else 5). `session` borrows an
    existing `aiohttp.ClientSession` (not closed by the client).

    Extras: `transport` replaces the aiohttp transport with anything having
    `async send(request) -> RawResponse` (e.g. `MockTransport` in tests; not
    closed by the client; excludes `session`); `rate_limit` caps requests per
    second (a token bucket); `adaptive=True` learns the tenant's rate limit
    instead: on a throttle (429, or 503 with Retry-After) it lowers a send rate
    shared by every search of the client, then probes back up (CUBIC),
    `rate_limit` if given being its ceiling; `concurrency` stays the cap on
    requests in flight. `adaptive="concurrency"` is the older mode: halve the
    requests in flight on 429/503, add them back one by one (AIMD).
    `max_response_bytes` caps one body, after decompression; `retry_policy`
    sets the backoff and, unless `max_retries` is given, the retries;
    `hedge=False` never sends a duplicate request for an overdue head page
    (README: "Choices where the contract leaves room").
    `tracer_provider` / `meter_provider` (OpenTelemetry, extra `otel`)
    override the global providers for this client's spans and metrics.
    """

    def __init__(
        self,
        *,
        base_url: str,
        token: TokenSource,
        team_id: str,
        concurrency: int = 8,
        timeout: float | None = 30.0,
        max_retries: int | None = None,
        session: aiohttp.ClientSession | None = None,
        transport: Transport | None = None,
        adaptive: bool | str = False,
        rate_limit: float | None = None,
        max_response_bytes: int = 16 * 1024 * 1024,
        retry_policy: RetryPolicy | None = None,
        hedge: bool = True,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        tracer_provider: Any = None,
        meter_provider: Any = None,
    ) -> None:
        """Check every argument now; raises `ConfigurationError` naming the one that cannot work."""
        self.base_url = _check_base_url(base_url)
        if not isinstance(team_id, str) or not team_id:
            raise ConfigurationError("team_id must be a non-empty str")
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if timeout is not None and not timeout > 0:
            raise ConfigurationError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        if rate_limit is not None and not rate_limit > 0:
            raise ConfigurationError(f"rate_limit must be > 0 requests/s, got {rate_limit!r}")
        if (
            not isinstance(max_response_bytes, int)
            or isinstance(max_response_bytes, bool)
            or max_response_bytes <= 0
        ):
            raise ConfigurationError(
                f"max_response_bytes must be an int > 0, got {max_response_bytes!r:.40}"
            )
        policy = _retry_policy(max_retries, retry_policy)
        self.team_id = team_id
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = policy.max_retries
        self.stats = ClientStats()
        self._auth = TokenProvider(token, on_refresh=self._count_refresh)
        self._url = protocol.search_url(self.base_url)
        self._headers: tuple[str, Mapping[str, str]] | None = None
        if adaptive not in (False, True, "rate", "concurrency"):
            raise ConfigurationError(
                f'adaptive must be True, False, "rate" or "concurrency", got {adaptive!r:.40}'
            )
        learn_rate = adaptive is True or adaptive == "rate"
        self._limiter = Limiter(
            concurrency,
            adaptive=adaptive == "concurrency",
            send_rate=SendRate(rate_limit, adaptive=learn_rate)
            if learn_rate or rate_limit is not None
            else None,
        )
        self._hedger: Hedger | None = (
            Hedger(backing_off=self._backing_off, on_sent=self._count_hedge) if hedge else None
        )
        self._warm = False  # a page was answered: token, team and query form are known good
        # Start a warm client's searches with a whole window, not page 1 alone: measured, and
        # left off (README, "Choices"): it sends pages past the end of every small search.
        self._speculative_start = False
        self._closed = False
        self._own_transport: AiohttpTransport | None = None
        if transport is None:
            self._own_transport = AiohttpTransport(
                connections=concurrency,
                timeout=timeout,
                session=session,
                max_response_bytes=max_response_bytes,
            )
            transport = self._own_transport
        elif session is not None:
            raise ConfigurationError(
                "pass either transport= or session=, not both: a session is used only by "
                "the default (aiohttp) transport"
            )
        elif not callable(getattr(transport, "send", None)):
            raise ConfigurationError(
                f"transport must have an async send(request) method, got {type(transport).__name__}"
            )
        self._transport: Transport = transport
        self._retrying = make_retrying(policy, sleep=sleep, on_retry=self._count_retry)
        self._telemetry = _otel.Telemetry(tracer_provider, meter_provider)

    def __repr__(self) -> str:
        return (
            f"<ImiChatClient base_url={self.base_url!r} team_id={self.team_id!r} "
            f"concurrency={self.concurrency} token=***>"
        )

    async def __aenter__(self) -> ImiChatClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if the client made it; a borrowed session or transport stays open."""
        self._closed = True
        if self._own_transport is not None:
            await self._own_transport.close()

    @property
    def limiter(self) -> Limiter:
        """The client-wide limiter of requests in flight (its `peak`, `in_flight`, `limit`)."""
        return self._limiter

    @property
    def page_size(self) -> int:
        """Records per page the server sends at most (the vendor's page: 10)."""
        return protocol.PAGE_SIZE

    # -- searching -------------------------------------------------------------------------

    def search_chats(
        self,
        *,
        filters: Iterable[Filter | tuple[str, str, Any]] | None = None,
        condition: str = "and",
        prefetch: int | None = None,
        start_page: int = 1,
        max_pages: int | None = None,
        deadline: float | None = None,
        **params: Any,
    ) -> AsyncGenerator[Chat, None]:
        """An async generator of every matching `Chat`, in page order (see README: Guarantees).

        Raises `InvalidQueryError` here, at the call, for a bad param, operator,
        value or argument (so before any request). While iterating:
        `ApiError` subclasses for errors of the API, `DecodeError` for a
        record that cannot be decoded, `SearchTimeoutError` when `deadline`
        seconds pass first.
        """
        query = build_query(params, filters, condition)
        return _chats(self._pages(query, self._decoded, prefetch, start_page, max_pages, deadline))

    @overload
    def search_pages(
        self,
        *,
        filters: Iterable[Filter | tuple[str, str, Any]] | None = ...,
        condition: str = ...,
        prefetch: int | None = ...,
        start_page: int = ...,
        max_pages: int | None = ...,
        limit: int | None = ...,
        deadline: float | None = ...,
        raw: Literal[False] = ...,
        stats: PagingStats | None = ...,
        **params: Any,
    ) -> AsyncGenerator[ChatPage[Chat], None]: ...

    @overload
    def search_pages(
        self,
        *,
        filters: Iterable[Filter | tuple[str, str, Any]] | None = ...,
        condition: str = ...,
        prefetch: int | None = ...,
        start_page: int = ...,
        max_pages: int | None = ...,
        limit: int | None = ...,
        deadline: float | None = ...,
        raw: Literal[True],
        stats: PagingStats | None = ...,
        **params: Any,
    ) -> AsyncGenerator[ChatPage[RawRecord], None]: ...

    @overload
    def search_pages(
        self,
        *,
        filters: Iterable[Filter | tuple[str, str, Any]] | None = ...,
        condition: str = ...,
        prefetch: int | None = ...,
        start_page: int = ...,
        max_pages: int | None = ...,
        limit: int | None = ...,
        deadline: float | None = ...,
        raw: bool = ...,
        stats: PagingStats | None = ...,
        **params: Any,
    ) -> AsyncGenerator[ChatPage[Any], None]: ...

    def search_pages(
        self,
        *,
        filters: Iterable[Filter | tuple[str, str, Any]] | None = None,
        condition: str = "and",
        prefetch: int | None = None,
        start_page: int = 1,
        max_pages: int | None = None,
        limit: int | None = None,
        deadline: float | None = None,
        raw: bool = False,
        stats: PagingStats | None = None,
        **params: Any,
    ) -> AsyncGenerator[ChatPage[Any], None]:
        """The one page-level way to search: one `ChatPage` at a time, in page order.

        Filters and paging arguments as for `search_chats`, checked here, at the
        call (`InvalidQueryError` before any request). `limit` stops after that
        many items in all, requesting no page beyond them. With `raw=True` the
        items are the JSON objects exactly as the server sent them (for exports
        that keep them as sent); otherwise `Chat` records. `stats`, a
        `PagingStats`, is filled as the search goes: pages requested and
        yielded, pages requested past the end (`wasted`), the total.
        """
        query = build_query(params, filters, condition)
        if limit is not None:
            _check_int("limit", limit, 1)
            needed = -(-limit // protocol.PAGE_SIZE)
            max_pages = needed if max_pages is None else min(max_pages, needed)
        st = stats if stats is not None else PagingStats()
        convert = self._raw if raw else self._decoded
        pages = self._pages(query, convert, prefetch, start_page, max_pages, deadline, st)
        return _numbered_pages(pages, st, limit)

    @_otel.search_scope
    def _pages(
        self,
        query: Query,
        convert: Callable[[protocol.PageData, int], Page[Any]],
        prefetch: int | None,
        start_page: int,
        max_pages: int | None,
        deadline: float | None,
        stats: PagingStats | None = None,
    ) -> AsyncGenerator[Page[Any], None]:
        """Check the paging arguments now, before any request; the pages come lazily."""
        window = PREFETCH_PER_SLOT * self.concurrency if prefetch is None else prefetch
        _check_int("prefetch", window, 1)
        _check_int("start_page", start_page, 1)
        if max_pages is not None:
            _check_int("max_pages", max_pages, 0)
        if deadline is not None and not deadline > 0:
            raise InvalidQueryError(f"deadline must be > 0 seconds, got {deadline!r}")
        body = query.body()
        search = object()  # this search's queue at the limiter: its lowest page goes first
        if deadline is None:

            async def fetch(n: int) -> Page[Any]:
                return convert(await self._fetch(body, n, search), n)

        else:
            until: list[float] = []  # the clock starts with the first request

            async def fetch(n: int) -> Page[Any]:
                if not until:
                    until.append(time.monotonic() + deadline)
                left = until[0] - time.monotonic()
                if left <= 0:
                    raise SearchTimeoutError(f"search deadline of {deadline}s passed at page {n}")
                try:
                    data = await asyncio.wait_for(self._fetch(body, n, search), left)
                except asyncio.TimeoutError:
                    raise SearchTimeoutError(
                        f"search deadline of {deadline}s passed at page {n}"
                    ) from None
                return convert(data, n)

        return iterate_pages(
            fetch,
            page_size=protocol.PAGE_SIZE,
            prefetch=window,
            start_page=start_page,
            max_pages=max_pages,
            stats=stats,
            first_alone=not (self._warm and self._speculative_start),
            hedger=self._hedger,
        )

    @staticmethod
    def _decoded(data: protocol.PageData, n: int) -> Page[Chat]:
        return Page(n, decode_page(data.records, n), data.total)

    @staticmethod
    def _raw(data: protocol.PageData, n: int) -> Page[RawRecord]:
        return Page(n, data.records, data.total)

    # -- one page, through retries and token refresh ---------------------------------------

    async def _fetch(self, body: bytes, page: int, search: object = None) -> protocol.PageData:
        refreshes = 0  # bounded, so a page can't cycle through tokens forever
        refused = 0  # tokens in a row that expired before they ever served a page
        while True:
            token = await self._auth.get()
            try:
                data = await call_with_retries(
                    self._retrying, functools.partial(self._attempt, body, page, token, search)
                )
            except TokenExpiredError as exc:
                if not self._auth.refreshable:
                    raise TokenExpiredError(
                        STATIC_TOKEN_EXPIRED,
                        status_code=2004,
                        http_status=exc.http_status,
                        page=page,
                    ) from None
                # A token that served pages and then expired (by age, by use) is normal and
                # refreshed; fresh tokens refused again and again are an error.
                refused = 0 if self._auth.served(token) else refused + 1
                refreshes += 1
                if refused > MAX_REFUSED_FRESH or refreshes > 2 * (self.max_retries + 1):
                    raise exc.with_page(page) from None
                log.warning("page %d: access token expired (2004); refreshing", page)
                await self._auth.refresh(token)
                continue
            self._auth.mark_served(token)
            self._warm = True
            self.stats.pages += 1
            self.stats.records += len(data.records)
            return data

    @_otel.attempt_scope
    async def _attempt(
        self, body: bytes, page: int, token: str, search: object = None
    ) -> protocol.PageData:
        request = protocol.build_request(self._url, self._headers_for(token), body, page)
        self.stats.requests += 1
        started = time.perf_counter()
        try:
            raw = await self._send(request, search)
            data = protocol.parse_response(raw.status, raw.headers, raw.body, page)
        except TokenExpiredError:
            log.debug("page %d: token expired (2004) after %.1f ms", page, _ms(started))
            raise
        except Exception as exc:
            if isinstance(exc, ApiError) and exc.page is None:
                exc.with_page(page)  # raised by a transport that did not know the page
            log.debug("page %d: failed: %s after %.1f ms", page, exc, _ms(started))
            raise
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "page %d: HTTP %d, %d records in %.1f ms",
                page,
                raw.status,
                len(data.records),
                _ms(started),
            )
        return data

    @_otel.send_scope
    async def _send(self, request: protocol.PreparedRequest, search: object = None) -> RawResponse:
        """One attempt under the client-wide limiter, fed back what the server said.

        `search` and the page number order the waiters: a search's lowest page
        first, searches in turn.
        """
        if self._closed:
            raise ImiChatError("the client is closed")
        limiter = self._limiter
        epoch = await limiter.acquire(search, request.page)
        _otel.slot_acquired()
        status = 0
        throttled = False
        started = time.perf_counter()
        try:
            raw = await self._transport.send(request)
            status = raw.status
            throttled = protocol.is_throttle(status, raw.headers)
            return raw
        finally:
            # Overloaded (429/503), fine (< 500), or neither (5xx, no answer); throttled
            # (429, 503 + Retry-After) lowers a learned send rate.
            overloaded = status in OVERLOAD_STATUSES
            limiter.release(epoch, overloaded=overloaded, ok=0 < status < 500, throttled=throttled)
            hedger = self._hedger
            if hedger is not None:
                if status == 200:
                    hedger.record(time.perf_counter() - started)
                elif overloaded:
                    hedger.overloaded()

    def _headers_for(self, token: str) -> Mapping[str, str]:
        cached = self._headers
        if cached is None or cached[0] != token:
            cached = (token, protocol.build_headers(token, self.team_id))
            self._headers = cached
        return cached[1]

    def _count_retry(self, exc: BaseException) -> None:
        self.stats.retries += 1
        _otel.event(_otel.RETRY, exc)

    def _count_refresh(self) -> None:
        self.stats.token_refreshes += 1
        _otel.event(_otel.TOKEN_REFRESH)

    def _count_hedge(self) -> None:
        self.stats.hedges += 1
        _otel.event(_otel.HEDGE)

    def _backing_off(self) -> bool:
        """No hedging now: adaptive concurrency below its ceiling, or a send rate in force.

        Under a rate (given, or learned from a throttle) a duplicate takes a token a
        new page would have used, and the head page it would duplicate is most
        likely waiting out a `Retry-After` that the server asked to be kept.
        """
        limiter = self._limiter
        if limiter.rate is not None and limiter.rate.rate is not None:
            return True
        return limiter.adaptive and limiter.limit < limiter.max_limit


class _Flat(AsyncGenerator[X, None]):
    """The values of each page, flattened: `search_chats` and `search_pages` return one.

    A class, not a second async generator around the engine's: when
    `asyncio.run` ends with a search still suspended, the loop closes every
    live async generator at once, and an outer generator closing the inner one
    at the same moment fails with "aclose(): asynchronous generator is
    already running". With only the engine's generator alive, it is closed
    once. A dropped `_Flat` drops the engine's generator, which the loop then
    closes as any other.
    """

    __slots__ = ("__weakref__", "_explode", "_items", "_pages")  # weakref: tracked like a generator

    def __init__(
        self, pages: AsyncGenerator[Page[Any], None], explode: Callable[[Page[Any]], Iterable[X]]
    ) -> None:
        self._pages = pages
        self._explode = explode
        self._items: Iterator[X] = iter(())

    def __aiter__(self) -> _Flat[X]:
        return self

    async def __anext__(self) -> X:
        items = self._items
        for item in items:
            return item
        while True:
            self._items = items = iter(self._explode(await self._pages.__anext__()))
            for item in items:
                return item

    async def asend(self, value: None) -> X:
        return await self.__anext__()

    async def athrow(self, typ: Any, val: Any = None, tb: Any = None) -> X:
        """As a generator would: the exception ends the iteration (pages closed) and is raised."""
        await self.aclose()
        if val is None:
            raise typ() if isinstance(typ, type) else typ
        raise val

    async def aclose(self) -> None:
        self._items = iter(())
        await self._pages.aclose()


def _chats(pages: AsyncGenerator[Page[Chat], None]) -> AsyncGenerator[Chat, None]:
    return _Flat(pages, _items_of)


def _items_of(page: Page[Chat]) -> Sequence[Chat]:
    return page.items


def _numbered_pages(
    pages: AsyncGenerator[Page[Any], None], stats: PagingStats, limit: int | None
) -> AsyncGenerator[ChatPage[Any], None]:
    """The engine's pages as `ChatPage`s: `last` from the engine's stats, `limit` applied.

    `max_pages` already stops the engine at the page that reaches `limit`.
    """
    left = limit

    def number(page: Page[Any]) -> tuple[ChatPage[Any]]:
        nonlocal left
        items = page.items
        if left is not None:
            items = items[:left]
            left -= len(items)
        last = stats.last_page == page.number or left == 0
        return (ChatPage(page.number, items, page.total, last),)

    return _Flat(pages, number)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidQueryError(f"{name} must be an int >= {minimum}, got {value!r:.40}")


def _retry_policy(max_retries: int | None, policy: RetryPolicy | None) -> RetryPolicy:
    """The policy in force: `retry_policy` keeps its count unless `max_retries` is given.

    Raises `ConfigurationError` when both are given and disagree (which one
    was meant cannot be known) or `max_retries` is not an int >= 0.
    """
    if max_retries is not None and (
        not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0
    ):
        raise ConfigurationError(f"max_retries must be an int >= 0, got {max_retries!r:.40}")
    if policy is None:
        return RetryPolicy() if max_retries is None else RetryPolicy(max_retries=max_retries)
    if max_retries is not None and max_retries != policy.max_retries:
        raise ConfigurationError(
            f"max_retries={max_retries} disagrees with retry_policy's max_retries="
            f"{policy.max_retries}: give one of them"
        )
    return policy


def _check_base_url(base_url: str) -> str:
    """The base URL without its trailing slash; `ConfigurationError` for one that can't work."""
    if not isinstance(base_url, str):
        raise ConfigurationError("base_url must be a str")
    parts = urlsplit(base_url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigurationError(f"base_url must be an https:// URL, got {base_url!r:.100}")
    if parts.username or parts.password:
        raise ConfigurationError("base_url must not carry credentials")
    if parts.query or parts.fragment or base_url.rstrip().endswith(("?", "#")):
        raise ConfigurationError(
            f"base_url must not have a query or fragment (the client appends "
            f"/chats/search?page=n), got {base_url!r:.100}"
        )
    try:
        port = parts.port
    except ValueError:  # out of 0-65535, or not a number
        port = 0
    if port == 0:
        raise ConfigurationError(f"base_url has an invalid port (1-65535), got {base_url!r:.100}")
    if parts.scheme == "http" and not protocol.is_loopback_host(parts.hostname):
        raise ConfigurationError(
            "refusing a cleartext http:// base_url to a remote host: the bearer token "
            "would cross the network unencrypted; use https:// (http:// is allowed for "
            "loopback only)"
        )
    return base_url.rstrip("/")
