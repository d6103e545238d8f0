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
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from contextlib import aclosing
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import aiohttp
import attrs

from . import _protocol as protocol
from ._auth import STATIC_TOKEN_EXPIRED, TokenProvider, TokenSource
from ._errors import (
    ConfigurationError,
    InvalidQueryError,
    SearchTimeoutError,
    TokenExpiredError,
)
from ._limiter import Limiter
from ._paging import Page, PagingStats, iterate_pages
from ._query import Filter, Query, build_query
from ._rate import SendRate
from ._records import Chat, decode_page
from ._retry import RetryPolicy, call_with_retries, make_retrying
from ._transport import RawResponse, Transport

log = logging.getLogger("imichat_async")

OVERLOAD_STATUSES = frozenset({429, 503})  # what adaptive concurrency backs off on
MAX_REFUSED_FRESH = 2  # tokens in a row refused before serving any page, before giving up
RawRecord = Mapping[str, Any]


class ChatPage(NamedTuple):
    """One page from `search_pages`: its chats and its 1-based page number."""

    chats: list[Chat]
    page: int


@attrs.define
class ClientStats:
    """Counters across every search of one client."""

    requests: int = 0  # HTTP attempts sent
    retries: int = 0
    token_refreshes: int = 0
    pages: int = 0  # pages answered successfully
    records: int = 0


class ImiChatClient:
    """Async client for POST /chats/search. Use as `async with ImiChatClient(...) as client:`.

    `token` is a `str`, or a zero-argument async callable returning one; the
    callable is called for the first token and again after a 2004, once for
    every request that saw that expiry. `concurrency` bounds the requests in
    flight across all searches of this client. `timeout` is seconds per
    request attempt; `max_retries` the retries of a transient failure after
    the first attempt. `session` borrows an existing `aiohttp.ClientSession`
    (not closed by the client).

    Extras: `rate_limit` caps requests per second (a token bucket);
    `adaptive=True` learns the tenant's rate limit instead: on a throttle (429,
    or 503 with Retry-After) it lowers a send rate shared by every search of
    the client, then probes back up (CUBIC), `rate_limit` if given being its
    ceiling; `concurrency` stays the cap on requests in flight.
    `adaptive="concurrency"` is the older mode: halve the requests in flight
    on 429/503, add them back one by one (AIMD). `max_response_bytes` caps one
    body; `retry_policy` sets the backoff.
    """

    def __init__(
        self,
        *,
        base_url: str,
        token: TokenSource,
        team_id: str,
        concurrency: int = 8,
        timeout: float | None = 30.0,
        max_retries: int = 5,
        session: aiohttp.ClientSession | None = None,
        adaptive: bool | str = False,
        rate_limit: float | None = None,
        max_response_bytes: int = 16 * 1024 * 1024,
        retry_policy: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.base_url = _check_base_url(base_url)
        if not isinstance(team_id, str) or not team_id:
            raise ConfigurationError("team_id must be a non-empty str")
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigurationError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if timeout is not None and not timeout > 0:
            raise ConfigurationError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        if rate_limit is not None and not rate_limit > 0:
            raise ConfigurationError(f"rate_limit must be > 0 requests/s, got {rate_limit!r}")
        self.team_id = team_id
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.stats = ClientStats()
        self._auth = TokenProvider(token, on_refresh=self._count_refresh)
        self._url = protocol.search_url(self.base_url)
        self._headers: tuple[str, Mapping[str, str]] | None = None
        if adaptive not in (False, True, "rate", "concurrency"):
            raise ConfigurationError(
                f'adaptive must be True, False, "rate" or "concurrency", got {adaptive!r:.40}'
            )
        learn_rate = adaptive is True or adaptive == "rate"
        # A throttled page waits out its Retry-After (often 1 s) while the in-order window
        # cannot pass it; a deeper window keeps the learned rate busy meanwhile.
        self._default_prefetch = 4 * concurrency if learn_rate else concurrency
        self._limiter = Limiter(
            concurrency,
            adaptive=adaptive == "concurrency",
            send_rate=SendRate(rate_limit, adaptive=learn_rate)
            if learn_rate or rate_limit is not None
            else None,
        )
        self._transport = Transport(
            connections=concurrency,
            timeout=timeout,
            session=session,
            max_response_bytes=max_response_bytes,
        )
        policy = retry_policy or RetryPolicy(max_retries=max_retries)
        if retry_policy is not None and retry_policy.max_retries != max_retries:
            policy = attrs.evolve(retry_policy, max_retries=max_retries)
        self._retrying = make_retrying(policy, sleep=sleep, on_retry=self._count_retry)

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
        """Close the session if the client made it; a borrowed session stays open."""
        await self._transport.close()

    @property
    def limiter(self) -> Limiter:
        """The client-wide limiter of requests in flight (its `peak`, `in_flight`, `limit`)."""
        return self._limiter

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

    def search_pages(
        self,
        *,
        filters: Iterable[Filter | tuple[str, str, Any]] | None = None,
        condition: str = "and",
        prefetch: int | None = None,
        start_page: int = 1,
        max_pages: int | None = None,
        deadline: float | None = None,
        **params: Any,
    ) -> AsyncGenerator[ChatPage, None]:
        """Like `search_chats`, one `ChatPage(chats, page)` at a time, for batch consumers."""
        query = build_query(params, filters, condition)
        return _chat_pages(
            self._pages(query, self._decoded, prefetch, start_page, max_pages, deadline)
        )

    def search_raw_pages(
        self,
        query: Query,
        *,
        prefetch: int | None = None,
        start_page: int = 1,
        max_pages: int | None = None,
        deadline: float | None = None,
        stats: PagingStats | None = None,
    ) -> AsyncGenerator[Page[RawRecord], None]:
        """Pages of the raw JSON objects, undecoded, for exporters that keep them as sent.

        `query` comes from `imichat_async._query.build_query`; `stats` is filled
        as the run goes (total, last page, pages requested, wasted).
        """
        return self._pages(query, self._raw, prefetch, start_page, max_pages, deadline, stats)

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
        window = self._default_prefetch if prefetch is None else prefetch
        _check_int("prefetch", window, 1)
        _check_int("start_page", start_page, 1)
        if max_pages is not None:
            _check_int("max_pages", max_pages, 0)
        if deadline is not None and not deadline > 0:
            raise InvalidQueryError(f"deadline must be > 0 seconds, got {deadline!r}")
        body = query.body()
        if deadline is None:

            async def fetch(n: int) -> Page[Any]:
                return convert(await self._fetch(body, n), n)

        else:
            until: list[float] = []  # the clock starts with the first request

            async def fetch(n: int) -> Page[Any]:
                if not until:
                    until.append(time.monotonic() + deadline)
                left = until[0] - time.monotonic()
                if left <= 0:
                    raise SearchTimeoutError(f"search deadline of {deadline}s passed at page {n}")
                try:
                    data = await asyncio.wait_for(self._fetch(body, n), left)
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
        )

    @staticmethod
    def _decoded(data: protocol.PageData, n: int) -> Page[Chat]:
        return Page(n, decode_page(data.records, n), data.total)

    @staticmethod
    def _raw(data: protocol.PageData, n: int) -> Page[RawRecord]:
        return Page(n, data.records, data.total)

    # -- one page, through retries and token refresh ---------------------------------------

    async def _fetch(self, body: bytes, page: int) -> protocol.PageData:
        refreshes = 0  # bounded, so a page can't cycle through tokens forever
        refused = 0  # tokens in a row that expired before they ever served a page
        while True:
            token = await self._auth.get()
            try:
                data = await call_with_retries(
                    self._retrying, functools.partial(self._attempt, body, page, token)
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
            self.stats.pages += 1
            self.stats.records += len(data.records)
            return data

    async def _attempt(self, body: bytes, page: int, token: str) -> protocol.PageData:
        request = protocol.build_request(self._url, self._headers_for(token), body, page)
        self.stats.requests += 1
        started = time.perf_counter()
        try:
            raw = await self._send(request)
            data = protocol.parse_response(raw.status, raw.headers, raw.body, page)
        except TokenExpiredError:
            log.debug("page %d: token expired (2004) after %.1f ms", page, _ms(started))
            raise
        except Exception as exc:
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

    async def _send(self, request: protocol.PreparedRequest) -> RawResponse:
        """One attempt under the client-wide limiter, fed back what the server said."""
        limiter = self._limiter
        epoch = await limiter.acquire()
        status = 0
        throttled = False
        try:
            raw = await self._transport.send(request)
            status = raw.status
            throttled = protocol.is_throttle(status, raw.headers)
            return raw
        finally:
            # Overloaded (429/503), fine (< 500), or neither (5xx, no answer); throttled
            # (429, 503 + Retry-After) lowers a learned send rate.
            limiter.release(
                epoch,
                overloaded=status in OVERLOAD_STATUSES,
                ok=0 < status < 500,
                throttled=throttled,
            )

    def _headers_for(self, token: str) -> Mapping[str, str]:
        cached = self._headers
        if cached is None or cached[0] != token:
            cached = (token, protocol.build_headers(token, self.team_id))
            self._headers = cached
        return cached[1]

    def _count_retry(self, exc: BaseException) -> None:
        self.stats.retries += 1

    def _count_refresh(self) -> None:
        self.stats.token_refreshes += 1


async def _chats(pages: AsyncGenerator[Page[Chat], None]) -> AsyncGenerator[Chat, None]:
    async with aclosing(pages) as it:
        async for page in it:
            for chat in page.items:
                yield chat


async def _chat_pages(
    pages: AsyncGenerator[Page[Chat], None],
) -> AsyncGenerator[ChatPage, None]:
    async with aclosing(pages) as it:
        async for page in it:
            yield ChatPage(list(page.items), page.number)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidQueryError(f"{name} must be an int >= {minimum}, got {value!r:.40}")


def _check_base_url(base_url: str) -> str:
    if not isinstance(base_url, str):
        raise ConfigurationError("base_url must be a str")
    parts = urlsplit(base_url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigurationError(f"base_url must be an https:// URL, got {base_url!r:.100}")
    if parts.username or parts.password:
        raise ConfigurationError("base_url must not carry credentials")
    if parts.scheme == "http" and not protocol.is_loopback_host(parts.hostname):
        raise ConfigurationError(
            "refusing a cleartext http:// base_url to a remote host: the bearer token "
            "would cross the network unencrypted; use https:// (http:// is allowed for "
            "loopback only)"
        )
    return base_url.rstrip("/")
