"""The transport seam: one `PreparedRequest` in, one `RawResponse` out.

`Transport` is the protocol the client needs (`async send(request)`);
`AiohttpTransport` is the only aiohttp code in the library; `MockTransport`
answers from a function in memory, for users' own tests (as httpx's
`MockTransport` does).

`AiohttpTransport` owns (or borrows) the `aiohttp.ClientSession`, applies the
per-request timeout and the body size cap (counted after decompression),
refuses redirects, and turns aiohttp's and asyncio's errors into the
library's: `NetworkError` (transient: refused, reset, DNS, timeout),
`TLSError` (never retried), `ConfigurationError` (a URL aiohttp refuses). It
knows nothing of records, pages, retries or how many requests may be in
flight (the client's limiter decides that before calling `send`).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, runtime_checkable

import aiohttp
import attrs
from yarl import URL

from ._errors import (
    ConfigurationError,
    ImiChatError,
    NetworkError,
    ResponseTooLargeError,
    TLSError,
)
from ._protocol import PreparedRequest

_NO_HEADERS: Mapping[str, str] = {}


@attrs.frozen
class RawResponse:
    """What came back: HTTP status, headers and the whole (decompressed) body."""

    status: int
    headers: Mapping[str, str] = attrs.field(default=_NO_HEADERS, repr=False)
    body: bytes = attrs.field(default=b"", repr=False)


@runtime_checkable
class Transport(Protocol):
    """Anything that sends one request and returns its response: `ImiChatClient(transport=)`.

    `send` raises `NetworkError` (retried) when no response arrived, or any
    other `ImiChatError` (not retried); an HTTP error status is a response,
    not an exception: the client classifies it.
    """

    async def send(self, request: PreparedRequest) -> RawResponse:
        """One attempt of `request`."""
        ...


Handler = Callable[[PreparedRequest], "RawResponse | Awaitable[RawResponse]"]


class MockTransport:
    """A transport answering from `handler(request)`, in memory: for tests of code using the client.

    `handler` is a plain or async function; it gets each `PreparedRequest`
    (method, url with `?page=n`, headers, JSON body, page) and returns a
    `RawResponse`, or raises (e.g. `NetworkError` to simulate a dropped
    connection). Nothing touches the network.
    """

    def __init__(self, handler: Handler) -> None:
        if not callable(handler):
            raise ConfigurationError(
                f"MockTransport needs a callable handler, got {type(handler).__name__}"
            )
        self._handler = handler

    def __repr__(self) -> str:
        return f"<MockTransport handler={getattr(self._handler, '__name__', '?')}>"

    async def send(self, request: PreparedRequest) -> RawResponse:
        """The handler's answer to `request` (awaited when the handler is async)."""
        result = self._handler(request)
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, RawResponse):
            raise TypeError(
                f"the MockTransport handler must return a RawResponse, got {type(result).__name__}"
            )
        return result


class AiohttpTransport:
    """Sends prepared requests over one session; `connections` caps its connection pool.

    Its arguments are the client's, checked by the client's constructor.
    """

    def __init__(
        self,
        *,
        connections: int,
        timeout: float | None,
        session: aiohttp.ClientSession | None = None,
        max_response_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self._connections = connections
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)  # None: no limit
        self._max_bytes = max_response_bytes
        self._closed = False
        self._base: tuple[str, URL] | None = None  # the last URL before its query, parsed

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ImiChatError("the client is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._connections, limit_per_host=self._connections
            )
            self._session = aiohttp.ClientSession(connector=connector, raise_for_status=False)
        return self._session

    async def send(self, request: PreparedRequest) -> RawResponse:
        """One attempt.

        Raises `NetworkError` when no response arrived (in time), `TLSError`
        when the TLS handshake fails, `ConfigurationError` for a URL aiohttp
        refuses, `ResponseTooLargeError` for a body above the cap.
        """
        session = self._get_session()
        try:
            async with session.request(
                request.method,
                self._url(request.url),
                headers=request.headers,
                data=request.body,
                allow_redirects=False,  # a redirect would carry the bearer token elsewhere
                raise_for_status=False,  # a borrowed session may say otherwise
                timeout=self._timeout,
            ) as resp:
                body = await self._read(resp, request.page)
                status = resp.status
                headers = resp.headers
        except asyncio.TimeoutError:
            raise NetworkError(
                f"no response from the server within {self._timeout.total}s", page=request.page
            ) from None
        except aiohttp.ClientError as exc:
            raise _map_client_error(exc, request.page) from None
        return RawResponse(status, headers, body)

    def _url(self, url: str) -> URL:
        """`url` parsed, its part before `?` parsed once: only `?page=n` changes per request."""
        base, sep, query = url.partition("?")
        cached = self._base
        if cached is None or cached[0] != base:
            cached = self._base = (base, URL(base))
        return cached[1].with_query(query) if sep else cached[1]

    async def _read(self, resp: aiohttp.ClientResponse, page: int) -> bytes:
        """The body, decompressed, counted as it streams in: never more than the cap in memory.

        `Content-Length` is the size on the wire (compressed, if encoded): it
        refuses an identity body early, but only the decompressed count is
        the cap.
        """
        cap = self._max_bytes
        length = resp.content_length
        if length is not None and length > cap and not resp.headers.get("Content-Encoding"):
            raise ResponseTooLargeError(
                f"response body of {length} bytes is above the cap of {cap} bytes",
                http_status=resp.status,
                page=page,
            )
        if length is not None and not resp.headers.get("Content-Encoding"):
            return await resp.read()  # identity, length known and within the cap
        chunks = bytearray()
        async for chunk in resp.content.iter_chunked(64 * 1024):
            chunks += chunk
            if len(chunks) > cap:
                raise ResponseTooLargeError(
                    f"response body above the cap of {cap} bytes (after decompression)",
                    http_status=resp.status,
                    page=page,
                )
        return bytes(chunks)

    async def close(self) -> None:
        """Close the session if this transport created it; a borrowed one is left open."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()


def _map_client_error(exc: aiohttp.ClientError, page: int) -> ImiChatError:
    """aiohttp's error as the library's, saying plainly what failed (never a header)."""
    if isinstance(exc, (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch)):
        where = _where(exc)
        return TLSError(
            f"TLS/SSL handshake with {where} failed: {_safe(exc)}; is it an https:// URL to a "
            "port that speaks plain HTTP, or a certificate the system does not trust?",
            page=page,
        )
    if isinstance(exc, aiohttp.InvalidURL):
        return ConfigurationError(f"base_url gives an invalid URL: {_safe(exc)}")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return NetworkError(
            f"no response from the server: DNS lookup of {exc.host!r} failed: {_os_reason(exc)}",
            page=page,
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = _os_reason(exc)
        if isinstance(exc.os_error, ConnectionRefusedError):
            reason = "connection refused"
        return NetworkError(f"no response from the server: {reason} by {_where(exc)}", page=page)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return NetworkError("no response from the server: it closed the connection", page=page)
    return NetworkError(
        f"no response from the server: {type(exc).__name__}: {_safe(exc)}", page=page
    )


def _where(exc: aiohttp.ClientError) -> str:
    host, port = getattr(exc, "host", None), getattr(exc, "port", None)
    return f"{host}:{port}" if host else "the server"


def _os_reason(exc: aiohttp.ClientConnectorError) -> str:
    os_error = exc.os_error
    return str(os_error.strerror or os_error)[:200]


def _safe(exc: BaseException) -> str:
    """An aiohttp error's text, cut short; aiohttp never puts request headers in it."""
    text = str(exc)
    return text[:200]
