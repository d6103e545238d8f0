"""OpenTelemetry: a span per search, a child span per HTTP attempt, and three metrics.

Off at zero cost. Without `opentelemetry-api` installed (extra `otel`) the
decorators below return the method unchanged and `event` does nothing.
Installed but with neither a tracer nor a meter provider configured (the
API's proxies, or no-op providers), a search costs one look at the global
providers and nothing more.

Spans (tracer `imichat_async`):

- `imichat.search_chats` (INTERNAL), one per search (`search_chats`,
  `search_pages`): `imichat.search.filters` (the
  `param:operator` pairs; never the values, which are customer data),
  `imichat.search.condition`, and at its end `imichat.search.pages` and
  `imichat.search.records`; status ERROR with the exception when the search
  failed (leaving early is not a failure). Events: `imichat.retry`
  (`imichat.page` and `error.type` of the failed attempt),
  `imichat.token_refresh` and `imichat.hedge` (no attributes: the hedge's own
  `POST` span carries its `imichat.page` and `imichat.attempt`).
- `POST` (CLIENT), one per HTTP attempt, child of its search span even
  though pages run in their own tasks: the HTTP client semantic conventions
  `http.request.method`, `url.full`, `server.address`, `server.port`,
  `http.response.status_code`, `error.type` (the HTTP status as a string for
  an error status, else the exception's class name), plus `imichat.page`,
  `imichat.attempt` (1-based per page: retries, token refreshes and hedges
  each add one) and `imichat.status_code` (the vendor's code; 4305 on
  success). The span is current while the request is sent, so an aiohttp
  instrumentation nests under it.

Metrics (meter `imichat_async`):

- `http.client.request.duration` (histogram, s): one per HTTP attempt, from
  the moment it holds a limiter slot to its classified answer.
- `imichat.client.requests` (counter): HTTP attempts by `imichat.outcome`
  (`ok`, `transient`, `token_expired`, `error`, `cancelled`) and HTTP status.
- `imichat.client.records` (counter): records handed out by searches.

Secrets: nothing here reads request headers, the body or the token; the URL
carries none (the token is a header, the base URL refuses credentials).

Hooks, each given what it needs as arguments: in `_client.py`, the client's
`Telemetry` (its providers) and `Telemetry.watch` of a search's pages in
`_pages` (the search span, and the context page tasks copy when they are
created); in `_fetch.py` (the `PageFetcher` the client holds): `@attempt_scope`
on `_attempt` (classifies the answer), `@send_scope` on `_send` (the HTTP
span), `slot_acquired()` in `_send` after the limiter, `event(...)` in the
retry, refresh and hedge callbacks.
"""

from __future__ import annotations

import contextvars
import functools
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from ._errors import ApiError, ConfigurationError, TokenExpiredError, TransientError
from ._protocol import SUCCESS_CODE

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # pragma: no cover - exercised by the subprocess test without the extra
    AVAILABLE = False
else:
    AVAILABLE = True

F = TypeVar("F", bound=Callable[..., Any])

SCOPE = "imichat_async"
SEARCH_SPAN = "imichat.search_chats"
RETRY = "imichat.retry"
TOKEN_REFRESH = "imichat.token_refresh"
HEDGE = "imichat.hedge"
#: Semantic-conventions advice for http.client.request.duration, in seconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)

_SEARCH: contextvars.ContextVar[_Search | None] = contextvars.ContextVar(
    "imichat_search", default=None
)
_ATTEMPT: contextvars.ContextVar[list[_Call] | None] = contextvars.ContextVar(
    "imichat_attempt", default=None
)
_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("imichat_call", default=None)


class Telemetry:
    """One client's providers: the ones given, else the global ones, looked up per search.

    Raises `ConfigurationError` when a provider is given without `opentelemetry-api`.
    """

    def __init__(self, tracer_provider: Any = None, meter_provider: Any = None) -> None:
        if not AVAILABLE and (tracer_provider is not None or meter_provider is not None):
            raise ConfigurationError(
                "tracer_provider/meter_provider need opentelemetry-api: "
                "pip install 'imichat-async[otel]'"
            )
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._tracer: tuple[Any, Any] = (None, None)  # (provider, tracer)
        self._instruments: tuple[Any, _Instruments | None] = (None, None)

    def watch(
        self,
        pages: AsyncGenerator[Any, None],
        filters: Sequence[tuple[str, str, Any]],
        condition: str,
    ) -> AsyncGenerator[Any, None]:
        """A search's `pages` under its span and metrics; `pages` itself when both are off
        (or without `opentelemetry-api`): no extra frame per page then."""
        if not AVAILABLE:
            return pages
        search = self.start(filters, condition)
        return pages if search is None else search.watch(pages)

    def start(self, filters: Sequence[tuple[str, str, Any]], condition: str) -> _Search | None:
        """The scope of a new search, or None when neither tracing nor metrics are on."""
        tracer = self._get_tracer()
        instruments = self._get_instruments()
        if tracer is None and instruments is None:
            return None
        return _Search(tracer, instruments, filters, condition)

    def _get_tracer(self) -> Any:
        provider = self._tracer_provider or trace.get_tracer_provider()
        if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            return None  # nothing configured: the API's no-op, skipped altogether
        cached_provider, tracer = self._tracer
        if cached_provider is not provider:
            tracer = provider.get_tracer(SCOPE, _version())
            self._tracer = (provider, tracer)
        return tracer

    def _get_instruments(self) -> _Instruments | None:
        provider = self._meter_provider or metrics.get_meter_provider()
        if isinstance(provider, metrics.NoOpMeterProvider) or type(provider).__name__ == (
            "_ProxyMeterProvider"  # the API's stand-in until a global provider is set
        ):
            return None
        cached_provider, instruments = self._instruments
        if cached_provider is not provider:
            instruments = _Instruments(provider.get_meter(SCOPE, _version()))
            self._instruments = (provider, instruments)
        return instruments


class _Instruments:
    def __init__(self, meter: Any) -> None:
        self.duration = meter.create_histogram(
            "http.client.request.duration",
            unit="s",
            description="Duration of HTTP client requests.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.requests = meter.create_counter(
            "imichat.client.requests",
            unit="{request}",
            description="HTTP attempts to the chats-search endpoint, by outcome.",
        )
        self.records = meter.create_counter(
            "imichat.client.records",
            unit="{record}",
            description="Chat records handed out by searches.",
        )


class _Search:
    """What one search knows: its span, its instruments, attempts per page, counts."""

    def __init__(
        self,
        tracer: Any,
        instruments: _Instruments | None,
        filters: Sequence[tuple[str, str, Any]],
        condition: str,
    ) -> None:
        self.tracer = tracer
        self.instruments = instruments
        self.span: Any = trace.INVALID_SPAN
        self.attempts: Counter[int] = Counter()
        self.pages = 0
        self.records = 0
        self._attributes = {
            "imichat.search.filters": [f"{param}:{op}" for param, op, _ in filters],
            "imichat.search.condition": condition,
        }
        self._server: tuple[str, int | None] | None = None

    async def watch(self, pages: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
        """Yield `pages` under the search span; the span starts here and ends with the search.

        Around each step of `pages` the search (and its span) is made current, so
        the page tasks the engine creates in that step copy it. Set and reset
        within one step: each step may run in a different task (the sync client).
        """
        if self.tracer is not None:
            self.span = self.tracer.start_span(
                SEARCH_SPAN, kind=SpanKind.INTERNAL, attributes=self._attributes
            )
        ctx = trace.set_span_in_context(self.span)
        error: BaseException | None = None
        try:
            while True:
                search_token = _SEARCH.set(self)
                ctx_token = otel_context.attach(ctx)
                try:
                    page = await pages.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    otel_context.detach(ctx_token)
                    _SEARCH.reset(search_token)
                self.pages += 1
                self.records += len(page.items)
                if self.instruments is not None:
                    self.instruments.records.add(len(page.items))
                yield page
        except BaseException as exc:
            error = exc
            raise
        finally:
            try:
                await pages.aclose()
            finally:
                self._end(error)

    def _end(self, error: BaseException | None) -> None:
        span = self.span
        span.set_attribute("imichat.search.pages", self.pages)
        span.set_attribute("imichat.search.records", self.records)
        if isinstance(error, Exception):
            span.set_attribute("error.type", type(error).__name__)
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
        elif error is not None and not isinstance(error, GeneratorExit):
            span.set_attribute("error.type", type(error).__name__)  # cancelled
        span.end()

    def begin(self, method: str, url: str, page: int) -> _Call:
        """A new HTTP attempt of `page`: its span, a child of the search span."""
        self.attempts[page] += 1
        if self._server is None:
            parts = urlsplit(url)
            self._server = (parts.hostname or "", parts.port)
        host, port = self._server
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.full": url,
            "server.address": host,
            "imichat.page": page,
            "imichat.attempt": self.attempts[page],
        }
        if port is not None:
            attributes["server.port"] = port
        span = trace.INVALID_SPAN
        if self.tracer is not None:
            span = self.tracer.start_span(
                method,
                context=trace.set_span_in_context(self.span),
                kind=SpanKind.CLIENT,
                attributes=attributes,
            )
        return _Call(self, span, attributes)


class _Call:
    """One HTTP attempt: ended once, by its classification or by its failure to send."""

    def __init__(self, search: _Search, span: Any, attributes: dict[str, Any]) -> None:
        self.search = search
        self.span = span
        self.method = attributes["http.request.method"]
        self.server = attributes["server.address"]
        self.port = attributes.get("server.port")
        self.started = time.perf_counter()
        self.http_status = 0
        self.ended = False

    def end(self, error: BaseException | None) -> None:
        if self.ended:
            return
        self.ended = True
        elapsed = time.perf_counter() - self.started
        span = self.span
        status = self.http_status
        if isinstance(error, ApiError) and error.http_status:
            status = error.http_status
        metric: dict[str, Any] = {"http.request.method": self.method, "server.address": self.server}
        if self.port is not None:
            metric["server.port"] = self.port
        if status:
            span.set_attribute("http.response.status_code", status)
            metric["http.response.status_code"] = status
        if error is None:
            span.set_attribute("imichat.status_code", SUCCESS_CODE)
            outcome = "ok"
        else:
            if isinstance(error, ApiError) and error.status_code is not None:
                span.set_attribute("imichat.status_code", error.status_code)
            error_type = str(status) if status >= 400 else type(error).__name__
            span.set_attribute("error.type", error_type)
            metric["error.type"] = error_type
            outcome = _outcome(error)
            if isinstance(error, Exception):
                span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
        span.end()
        instruments = self.search.instruments
        if instruments is not None:
            instruments.duration.record(elapsed, metric)
            counted: dict[str, Any] = {"imichat.outcome": outcome}
            if status:
                counted["http.response.status_code"] = status
            instruments.requests.add(1, counted)


def _outcome(error: BaseException) -> str:
    if isinstance(error, TokenExpiredError):
        return "token_expired"
    if isinstance(error, TransientError):
        return "transient"
    if isinstance(error, Exception):
        return "error"
    return "cancelled"


# -- hooks ------------------------------------------------------------------------------------


def attempt_scope(method: F) -> F:
    """On `_attempt`: the HTTP spans it sent are ended with its classified outcome.

    Outside a traced search the wrapper hands back the method's own coroutine: no
    extra frame on the hot path.
    """
    if not AVAILABLE:
        return method

    async def traced(*args: Any, **kwargs: Any) -> Any:
        calls: list[_Call] = []
        token = _ATTEMPT.set(calls)
        try:
            result = await method(*args, **kwargs)
        except BaseException as exc:
            for call in calls:
                call.end(exc)
            raise
        finally:
            _ATTEMPT.reset(token)
        for call in calls:
            call.end(None)
        return result

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _SEARCH.get() is None:
            return method(*args, **kwargs)
        return traced(*args, **kwargs)

    return cast(F, wrapper)


def send_scope(method: F) -> F:
    """On `_send(self, request)`: one HTTP span per request, current while it is sent.

    Outside a traced search the wrapper hands back the method's own coroutine.
    """
    if not AVAILABLE:
        return method

    async def traced(search: _Search, self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        call = search.begin(request.method, request.url, request.page)
        call_token = _CALL.set(call)
        ctx_token = otel_context.attach(trace.set_span_in_context(call.span))
        try:
            raw = await method(self, request, *args, **kwargs)
        except BaseException as exc:
            call.end(exc)  # no answer (or cancelled): nothing left to classify
            raise
        finally:
            otel_context.detach(ctx_token)
            _CALL.reset(call_token)
        call.http_status = raw.status
        pending = _ATTEMPT.get()
        if pending is None:
            call.end(None if raw.status < 400 else _HttpStatus(raw.status))
        else:
            pending.append(call)  # `_attempt` classifies the body, then ends it
        return raw

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        search = _SEARCH.get()
        if search is None:
            return method(self, request, *args, **kwargs)  # its own coroutine: no extra frame
        return traced(search, self, request, *args, **kwargs)

    return cast(F, wrapper)


def slot_acquired() -> None:
    """Called by `_send` once it holds a limiter slot: the request's duration starts here."""
    if AVAILABLE:
        call = _CALL.get()
        if call is not None:
            call.started = time.perf_counter()


def event(name: str, error: BaseException | None = None, **attributes: Any) -> None:
    """A span event on the current search's span (retry, token refresh, hedge)."""
    if not AVAILABLE:
        return
    search = _SEARCH.get()
    if search is None:
        return
    if error is not None:
        attributes["error.type"] = type(error).__name__
        page = getattr(error, "page", None)
        if page is not None:
            attributes.setdefault("imichat.page", page)
    search.span.add_event(name, attributes)


class _HttpStatus(Exception):
    """An error status nobody classified (only without `attempt_scope`)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")


@functools.cache
def _version() -> str:
    from . import __version__

    return __version__
