"""The only aiohttp code: one `PreparedRequest` in, one `RawResponse` out.

It owns (or borrows) the `aiohttp.ClientSession`, applies the per-request
timeout and the body size cap, refuses redirects, and turns aiohttp's and
asyncio's errors into `NetworkError`. It knows nothing of records, pages,
retries or how many requests may be in flight (the client's limiter decides
that before calling `send`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
import attrs

from ._errors import ImiChatError, NetworkError, ResponseTooLargeError
from ._protocol import PreparedRequest


@attrs.frozen
class RawResponse:
    """What came back: HTTP status, headers and the whole body."""

    status: int
    headers: Mapping[str, str] = attrs.field(repr=False)
    body: bytes = attrs.field(repr=False)


class Transport:
    """Sends prepared requests over one session; `connections` caps its connection pool."""

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
        """One attempt. Raises `NetworkError` when no response arrived in time."""
        session = self._get_session()
        try:
            async with session.request(
                request.method,
                request.url,
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
                f"no response within {self._timeout.total}s", page=request.page
            ) from None
        except aiohttp.ClientError as exc:
            raise NetworkError(
                f"connection failed: {type(exc).__name__}: {_safe(exc)}", page=request.page
            ) from None
        return RawResponse(status, headers, body)

    async def _read(self, resp: aiohttp.ClientResponse, page: int) -> bytes:
        cap = self._max_bytes
        length = resp.content_length
        if length is not None and length > cap:
            raise ResponseTooLargeError(
                f"response body of {length} bytes is above the cap of {cap}",
                http_status=resp.status,
                page=page,
            )
        if length is not None:
            return await resp.read()
        chunks = bytearray()
        async for chunk in resp.content.iter_any():
            chunks += chunk
            if len(chunks) > cap:
                raise ResponseTooLargeError(
                    f"response body above the cap of {cap} bytes",
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


def _safe(exc: BaseException) -> str:
    """An aiohttp error's text, cut short; aiohttp never puts request headers in it."""
    text = str(exc)
    return text[:200]
