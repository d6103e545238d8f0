"""The access token: a fixed `str`, or an async callable that fetches a fresh one.

Refresh is single flight: every request that saw a 2004 with the same token
waits on one call of the callable. `refresh(stale)` only calls it when `stale`
is still the current token, so a request that arrives after another already
refreshed just picks up the new token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from .errors import ConfigurationError, TokenExpiredError

TokenSource = str | Callable[[], Awaitable[str]]


class TokenProvider:
    """Holds the current token; never shows it in its repr."""

    def __init__(self, source: TokenSource, on_refresh: Callable[[], None] | None = None) -> None:
        if isinstance(source, str):
            if not source:
                raise ConfigurationError("token must not be empty")
            self._fetch: Callable[[], Awaitable[str]] | None = None
            self._token: str | None = source
        elif callable(source):
            self._fetch = source
            self._token = None
        else:
            raise ConfigurationError(
                f"token must be a str or an async callable, got {type(source).__name__}"
            )
        self._lock = asyncio.Lock()
        self._on_refresh = on_refresh
        self.refreshes = 0

    def __repr__(self) -> str:
        kind = "callable" if self._fetch is not None else "static"
        return f"<TokenProvider {kind} token=***>"

    @property
    def refreshable(self) -> bool:
        """True when a fresh token can be fetched (the source is a callable)."""
        return self._fetch is not None

    async def get(self) -> str:
        """The current token, fetching the first one if needed."""
        token = self._token
        if token is not None:
            return token
        async with self._lock:
            if self._token is None:
                self._token = await self._call()
            return self._token

    async def refresh(self, stale: str) -> str:
        """A token newer than `stale`: one call for all the requests that saw `stale` expire."""
        if self._fetch is None:
            raise TokenExpiredError(
                "Access Token expired, and the client was given a fixed token: "
                "pass an async callable as token= to refresh it",
                status_code=2004,
                http_status=401,
            )
        async with self._lock:
            if self._token is not None and self._token != stale:
                return self._token
            self._token = await self._call()
            self.refreshes += 1
            if self._on_refresh is not None:
                self._on_refresh()
            return self._token

    async def _call(self) -> str:
        assert self._fetch is not None
        token = await self._fetch()
        if not isinstance(token, str) or not token:
            raise ConfigurationError("the token callable must return a non-empty str")
        return token
