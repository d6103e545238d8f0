"""`ImiChatClient`: the public face, composing query, paging, the page fetch path and records.

It owns the lifecycle (transport, limiter, counters, telemetry) and the search
methods: arguments checked at the call, the query's body built once, the
paging engine driven with the `fetch(n)` of the `PageFetcher` it holds (one
page through the limiter, retries and token refresh), pages handed out as
`ChatPage`s or flattened. Its repr never shows the token.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Literal, overload

import aiohttp

from . import _otel
from . import _protocol as protocol
from ._auth import TokenSource
from ._config import (
    check_base_url,
    check_client_args,
    check_int,
    check_paging,
    check_priority,
    check_raw,
    check_transport,
    limiter_for,
)
from ._config import (
    retry_policy as policy_of,
)
from ._fetch import ClientStats, PageFetcher
from ._limiter import Limiter
from ._paging import Page, PagingStats, iterate_pages
from ._query import Filter, Query, build_query
from ._ratestore import FleetRate, RedisRateStore, rate_store_of
from ._records import Chat, WireChat, decode_page
from ._results import ChatPage, chats_of, numbered_pages
from ._retry import RetryPolicy
from ._sched import Priority
from ._transport import AiohttpTransport, Transport

__all__ = ["ChatPage", "ClientStats", "ImiChatClient"]

PREFETCH_PER_SLOT = 4  # default prefetch = 4 x concurrency: see README, "Choices"
#: How a decoded search reads a page: its chats as `WireChat`s, in the same pass.
_PARSE_CHATS = protocol.typed_parse(WireChat)
RawRecord = Mapping[str, Any]  # with raw=True, a `RawChat`: a dict carrying its bytes as sent


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
    `rate_store` (extra `redis`): a `redis://` or `rediss://` URL or a
    `RedisRateStore`: the send rate (`adaptive=True`, or `rate_limit` then the
    whole fleet's) is shared by every client of the tenant using that store
    (README: "Fleet: one rate budget"); None keeps it in the process.
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
        rate_store: str | RedisRateStore | None = None,
    ) -> None:
        """Check every argument now; raises `ConfigurationError` naming the one that cannot work."""
        self.base_url = check_base_url(base_url)
        check_client_args(
            team_id=team_id,
            concurrency=concurrency,
            timeout=timeout,
            rate_limit=rate_limit,
            max_response_bytes=max_response_bytes,
        )
        policy = policy_of(max_retries, retry_policy)
        store = rate_store_of(rate_store)
        self.stats = ClientStats()
        self._limiter = limiter_for(
            concurrency,
            adaptive,
            rate_limit,
            store=store,
            key=store.key(self.base_url, team_id) if store is not None else "",
            on_fallback=self._count_store_fallback,
        )
        self._own_transport: AiohttpTransport | None = None
        if transport is None:
            self._own_transport = transport = AiohttpTransport(
                connections=concurrency,
                timeout=timeout,
                session=session,
                max_response_bytes=max_response_bytes,
            )
        else:
            check_transport(transport, session)
        self._transport: Transport = transport
        self._fetcher = PageFetcher(
            url=protocol.search_url(self.base_url),
            team_id=team_id,
            token=token,
            policy=policy,
            sleep=sleep,
            limiter=self._limiter,
            transport=transport,
            stats=self.stats,
            hedge=hedge,
        )
        self.team_id = team_id
        self.max_retries = policy.max_retries
        self.concurrency = concurrency
        self.timeout = timeout
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
        self._fetcher.close()
        rate = self._limiter.rate
        if isinstance(rate, FleetRate):
            await rate.aclose()
        if self._own_transport is not None:
            await self._own_transport.close()

    def _count_store_fallback(self) -> None:
        self.stats.rate_store_fallbacks += 1

    @property
    def limiter(self) -> Limiter:
        """The client-wide limiter of requests in flight (its `peak`, `in_flight`, `limit`)."""
        return self._limiter

    @property
    def server_date(self) -> datetime.datetime | None:
        """The server's clock at its latest answer to this client (any status, any search):
        that answer's `Date` header as an aware UTC datetime, in whole seconds (the
        header's precision). None before any answer, or when the server sent no
        readable `Date`. A sync takes its start instant from it (README: "Incremental
        sync"); `server_date - datetime.now(UTC)` is the clocks' skew, give or take
        the request's time and that second.
        """
        return self._fetcher.server_date

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
        priority: Priority = "interactive",
        **params: Any,
    ) -> AsyncGenerator[Chat, None]:
        """An async generator of every matching `Chat`, in page order (see README: Guarantees).

        Raises `InvalidQueryError` here, at the call, for a bad param, operator,
        value or argument (so before any request). While iterating:
        `ApiError` subclasses for errors of the API, `DecodeError` for a
        record that cannot be decoded, `SearchTimeoutError` when `deadline`
        seconds pass first. `priority="background"` lets the client's interactive
        searches go first (README: "Choices where the contract leaves room").
        """
        query = build_query(params, filters, condition)
        return chats_of(
            self._pages(
                query,
                self._decoded,
                prefetch,
                start_page,
                max_pages,
                deadline,
                priority=priority,
                parse=_PARSE_CHATS,
            )
        )

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
        priority: Priority = ...,
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
        priority: Priority = ...,
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
        priority: Priority = ...,
        raw: Literal["text"],
        stats: PagingStats | None = ...,
        **params: Any,
    ) -> AsyncGenerator[ChatPage[protocol.ChatText], None]: ...

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
        priority: Priority = ...,
        raw: bool | Literal["text"] = ...,
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
        priority: Priority = "interactive",
        raw: bool | Literal["text"] = False,
        stats: PagingStats | None = None,
        **params: Any,
    ) -> AsyncGenerator[ChatPage[Any], None]:
        """The one page-level way to search: one `ChatPage` at a time, in page order.

        Filters and paging arguments as for `search_chats`, checked here, at the
        call (`InvalidQueryError` before any request). `limit` stops after that
        many items in all, requesting no page beyond them. With `raw=True` the
        items are the JSON objects exactly as the server sent them, as
        `RawChat`s (dicts whose `raw` is the record's bytes as received: the
        CSV and callable exports take those); with `raw="text"`, `ChatText`s: those bytes
        alone, with `chat_id`, `created_at` and `updated_at` as sent, never parsed into a
        dict (cheaper: what the NDJSON export writes); otherwise `Chat` records. `stats`, a
        `PagingStats`, is filled as the search goes: pages requested and
        yielded, pages requested past the end (`wasted`), the total. `priority`
        as for `search_chats`.
        """
        query = build_query(params, filters, condition)
        check_raw(raw)
        if limit is not None:
            check_int("limit", limit, 1)
            needed = -(-limit // protocol.PAGE_SIZE)
            max_pages = needed if max_pages is None else min(max_pages, needed)
        st = stats if stats is not None else PagingStats()
        convert: Callable[[protocol.PageData, int], Page[Any]]
        parse: protocol.Parse
        if raw == "text":
            convert, parse = self._texts, protocol.parse_texts
        elif raw:
            convert, parse = self._raw, protocol.parse_response
        else:
            convert, parse = self._decoded, _PARSE_CHATS
        pages = self._pages(
            query,
            convert,
            prefetch,
            start_page,
            max_pages,
            deadline,
            st,
            priority=priority,
            parse=parse,
        )
        return numbered_pages(pages, st, limit)

    def _pages(
        self,
        query: Query,
        convert: Callable[[protocol.PageData, int], Page[Any]],
        prefetch: int | None,
        start_page: int,
        max_pages: int | None,
        deadline: float | None,
        stats: PagingStats | None = None,
        *,
        priority: Priority = "interactive",
        parse: protocol.Parse = protocol.parse_response,
    ) -> AsyncGenerator[Page[Any], None]:
        """Check the paging arguments now, before any request; the pages come lazily,
        watched by the search's telemetry (a span, metrics) when it is on."""
        window = PREFETCH_PER_SLOT * self.concurrency if prefetch is None else prefetch
        check_paging(window, start_page, max_pages, deadline)
        check_priority(priority)
        search = self._limiter.flow(priority, first=start_page, cap=max_pages)
        fetcher = self._fetcher
        pages = iterate_pages(
            fetcher.page_fetch(query.body(), convert, deadline, search, parse),
            last_page=protocol.last_page,
            ends=protocol.ends_search,
            prefetch=window,
            start_page=start_page,
            max_pages=max_pages,
            stats=stats,
            hedger=fetcher.hedger,
        )
        return self._telemetry.watch(pages, query.filters, query.condition)

    @staticmethod
    def _decoded(data: protocol.PageData, n: int) -> Page[Chat]:
        return Page(n, decode_page(data.records, n, typed=data.typed), data.total)

    @staticmethod
    def _raw(data: protocol.PageData, n: int) -> Page[RawRecord]:
        return Page(n, protocol.raw_records(data), data.total)

    @staticmethod
    def _texts(data: protocol.PageData, n: int) -> Page[protocol.ChatText]:
        return Page(n, data.records, data.total)  # `parse_texts` made them
