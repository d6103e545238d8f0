"""One page, fetched: the request built, sent under the limiter, classified, retried,
an expired token refreshed once for everyone; what happened counted and fed back.

`PageFetcher` is a part `ImiChatClient` holds, as httpx's `Client` holds its
transport: the client makes the limiter, the transport and the counters and
hands them over; the fetcher keeps the token, the headers, the retries and the
hedger. It knows no query and no paging: `page_fetch` gives the paging engine
its `fetch(n)`, once per search; every request then stays within the fetcher
(no extra hop per request). The OpenTelemetry hooks (`_otel.attempt_scope`,
`send_scope`) wrap its `_attempt` and `_send` and read nothing but their arguments.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs

from . import _otel
from . import _protocol as protocol
from ._auth import STATIC_TOKEN_EXPIRED, TokenProvider, TokenSource
from ._errors import ApiError, ImiChatError, SearchTimeoutError, TokenExpiredError
from ._limiter import Limiter
from ._paging import HEDGE_LOST, Hedger, Page
from ._retry import RetryPolicy, call_with_retries, make_retrying
from ._sched import Flow
from ._transport import RawResponse, Transport

log = logging.getLogger("imichat_async")

MAX_REFUSED_FRESH = 2  # tokens in a row refused before serving any page, before giving up


@attrs.define
class ClientStats:
    """Counters across every search of one client."""

    requests: int = 0  # HTTP attempts sent
    retries: int = 0
    token_refreshes: int = 0
    pages: int = 0  # pages answered successfully
    records: int = 0
    hedges: int = 0  # duplicate requests sent for an overdue head page
    rate_store_fallbacks: int = 0  # times the rate store stopped answering (rate_store=)


class PageFetcher:
    """The per-page call of a client: its token, headers, retries and hedger, over the
    `limiter` and `transport` it is given, counting into `stats`.

    Raises `ConfigurationError` for a `token` that is neither a str nor a callable.
    """

    def __init__(
        self,
        *,
        url: str,
        team_id: str,
        token: TokenSource,
        policy: RetryPolicy,
        sleep: Callable[[float], Awaitable[Any]],
        limiter: Limiter,
        transport: Transport,
        stats: ClientStats,
        hedge: bool,
    ) -> None:
        self.stats = stats
        #: The engine's hedging rule, shared by the searches (None: `hedge=False`).
        self.hedger: Hedger | None = (
            Hedger(backing_off=lambda: limiter.backing_off, on_sent=self._count_hedge)
            if hedge
            else None
        )
        self._team_id = team_id
        self._max_retries = policy.max_retries
        self._auth = TokenProvider(token, on_refresh=self._count_refresh)
        self._url = url
        self._headers: tuple[str, Mapping[str, str]] | None = None
        self._limiter = limiter
        self._last_headers: Mapping[str, str] | None = None  # of the last response: `server_date`
        self._closed = False
        self._transport: Transport = transport
        self._retrying = make_retrying(policy, sleep=sleep, on_retry=self._count_retry)

    def close(self) -> None:
        """Send nothing more: a request from now on raises `ImiChatError` (the client is closed)."""
        self._closed = True

    @property
    def server_date(self) -> datetime.datetime | None:
        """The server's clock at its latest answer (any status), from that answer's `Date`
        header: aware UTC, whole seconds. None before any answer, or without a readable
        `Date` (`protocol.parse_date`)."""
        headers = self._last_headers
        seconds = None if headers is None else protocol.parse_date(headers)
        if seconds is None:
            return None
        return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)

    def page_fetch(
        self,
        body: bytes,
        convert: Callable[[protocol.PageData, int], Page[Any]],
        deadline: float | None,
        search: Flow[Any] | None = None,
        parse: protocol.Parse = protocol.parse_response,
    ) -> Callable[[int], Awaitable[Page[Any]]]:
        """The engine's `fetch(n)` for one search: `SearchTimeoutError` once `deadline`
        seconds have passed since its first request. `parse` reads each answer
        (`protocol.parse_response`, or `parse_texts` for records as sent).

        `search` is its place at the limiter (`Limiter.flow`), sized from the server's
        total as soon as a page tells it; a new one (interactive) if not given.
        """
        if search is None:
            search = self._limiter.flow()
        self._auth.rearm()  # a token the callable handed back expired spoils one search only
        if deadline is None:

            async def fetch(n: int) -> Page[Any]:
                return convert(await self._fetch(body, n, search, parse), n)

            return fetch

        until: list[float] = []  # the clock starts with the first request

        async def fetch_until(n: int) -> Page[Any]:
            if not until:
                until.append(time.monotonic() + deadline)
            left = until[0] - time.monotonic()
            if left <= 0:
                raise SearchTimeoutError(f"search deadline of {deadline}s passed at page {n}")
            try:
                if sys.version_info >= (3, 11):
                    # In this task, not wait_for's inner one: a hedge race's cancellation
                    # reaches `_send` with its message (see `_exchange`).
                    async with asyncio.timeout(left):
                        data = await self._fetch(body, n, search, parse)
                else:
                    data = await asyncio.wait_for(self._fetch(body, n, search, parse), left)
            except asyncio.TimeoutError:
                raise SearchTimeoutError(
                    f"search deadline of {deadline}s passed at page {n}"
                ) from None
            return convert(data, n)

        return fetch_until

    async def _fetch(
        self,
        body: bytes,
        page: int,
        search: Flow[Any] | None = None,
        parse: protocol.Parse = protocol.parse_response,
    ) -> protocol.PageData:
        refreshes = 0  # bounded, so a page can't cycle through tokens forever
        refused = 0  # tokens in a row that expired before they ever served a page
        while True:
            token = self._auth.ready() or await self._auth.get()
            try:
                data = await call_with_retries(
                    self._retrying, self._attempt, body, page, token, search, parse
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
                if refused > MAX_REFUSED_FRESH or refreshes > 2 * (self._max_retries + 1):
                    raise exc.with_page(page) from None
                log.warning("page %d: access token expired (2004); refreshing", page)
                await self._auth.refresh(token)
                continue
            self._auth.mark_served(token)
            self.stats.pages += 1
            self.stats.records += len(data.records)
            if search is not None and data.total is not None:
                search.ends_at(protocol.last_page(data.total))  # its pages left, for the limiter
            return data

    @_otel.attempt_scope
    async def _attempt(
        self,
        body: bytes,
        page: int,
        token: str,
        search: object = None,
        parse: protocol.Parse = protocol.parse_response,
    ) -> protocol.PageData:
        request = protocol.build_request(self._url, self._headers_for(token), body, page)
        self.stats.requests += 1
        started = time.perf_counter()
        try:
            raw = await self._send(request, search)
            data = parse(raw.status, raw.headers, raw.body, page)
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
        first, the search with the fewest pages left first (`_sched`).
        """
        if self._closed:
            raise ImiChatError("the client is closed")
        limiter = self._limiter
        ticket = await limiter.acquire(search, request.page)
        _otel.slot_acquired()
        status = 0
        throttled = False
        started = time.perf_counter()
        try:
            hedger = self.hedger
            if hedger is None:
                raw = await self._transport.send(request)
            else:
                raw = await self._exchange(request, hedger)
            self._last_headers = raw.headers
            status = raw.status
            throttled = protocol.is_throttle(status, raw.headers)
            return raw
        finally:
            # Overloaded (429/503), fine (< 500), or neither (5xx, no answer); throttled
            # (429, 503 + Retry-After) lowers a learned send rate.
            overloaded = status in protocol.OVERLOAD_STATUSES
            limiter.release(ticket, overloaded=overloaded, ok=0 < status < 500, throttled=throttled)
            hedger = self.hedger
            if hedger is not None:
                if status == 200:
                    hedger.record(time.perf_counter() - started)
                elif overloaded:
                    hedger.overloaded()

    async def _exchange(self, request: protocol.PreparedRequest, hedger: Hedger) -> RawResponse:
        """`transport.send(request)`, finished even when a hedge race is lost meanwhile.

        The server works on a request until it answers, and a tenant counts it in
        flight until then, aborted or not: a race's loser with its request on the
        wire is not cancelled but marked (`Hedger.lose`); it waits for its answer,
        discarded, keeping its slot, then stops with `CancelledError(HEDGE_LOST)`,
        so that the server never sees more than `concurrency` of this client's
        requests. The race was decided: the search goes on meanwhile. Any other
        cancellation (the search ends) aborts the request at once, as before. In
        the page's own task: no task per request.
        """
        task = hedger.on_wire()
        try:
            raw = await self._transport.send(request)
        except Exception:
            if hedger.off_wire(task):
                raise asyncio.CancelledError(HEDGE_LOST) from None  # lost: no retry
            raise
        except BaseException:
            hedger.off_wire(task)
            raise
        if hedger.off_wire(task):
            raise asyncio.CancelledError(HEDGE_LOST)  # lost: its answer is discarded
        return raw

    def _headers_for(self, token: str) -> Mapping[str, str]:
        cached = self._headers
        if cached is None or cached[0] != token:
            cached = (token, protocol.build_headers(token, self._team_id))
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


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
