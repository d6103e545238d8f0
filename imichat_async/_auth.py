"""The access token: a fixed `str`, or a callable (plain or async) that fetches a fresh one.

Refresh is single flight: every request that saw a 2004 with the same token
waits on one call of the callable. `refresh(stale)` only calls it when `stale`
is still the current token, so a request that arrives after another already
refreshed just picks up the new token; while a refresh runs, `get()` waits
for it rather than hand out the token known to be expired. A callable that
answers with the very token that just expired (a cached token, clock skew)
fails the refresh at once: calling it again would only repeat the answer,
for that search; `rearm()`, at the start of the next one, asks it again.
An exception raised by the callable becomes `TokenProviderError`, chained.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
from collections.abc import Awaitable, Callable

from ._errors import ConfigurationError, TokenExpiredError, TokenProviderError

TokenSource = str | Callable[[], Awaitable[str]] | Callable[[], str]

SAME_TOKEN_EXPIRED = (
    "Access Token expired, and the token callable returned the same token again "
    "(a cached token not renewed, or a clock skew?): it must return a fresh token after an expiry"
)
STATIC_TOKEN_EXPIRED = (
    "Access Token expired, and the client was given a fixed token: "
    "pass an async callable as token= to refresh it"
)


class TokenProvider:
    """Holds the current token; never shows it in its repr."""

    def __init__(self, source: TokenSource, on_refresh: Callable[[], None] | None = None) -> None:
        if isinstance(source, str):
            _check_token(source)
            self._fetch: Callable[[], Awaitable[str] | str] | None = None
            self._token: str | None = source
        elif callable(source):
            self._fetch = source
            self._token = None
        else:
            raise ConfigurationError(
                f"token must be a str or a callable returning one, got {type(source).__name__}"
            )
        self._lock = asyncio.Lock()
        self._on_refresh = on_refresh
        self._served: collections.deque[str] = collections.deque(maxlen=4)  # latest that worked
        self._dead: str | None = None  # a token the callable handed back right after it expired
        self.refreshes = 0

    def __repr__(self) -> str:
        kind = "callable" if self._fetch is not None else "static"
        return f"<TokenProvider {kind} token=***>"

    @property
    def refreshable(self) -> bool:
        """True when a fresh token can be fetched (the source is a callable)."""
        return self._fetch is not None

    def mark_served(self, token: str) -> None:
        """Note that `token` was accepted and served a page."""
        if token not in self._served:
            self._served.append(token)

    def served(self, token: str) -> bool:
        """True when `token` served a page before it expired (a normal expiry)."""
        return token in self._served

    def rearm(self) -> None:
        """A new search: a token known dead is dropped, so the next `get()` asks the callable.

        Until then every request fails at once (no request goes out with a token
        known to be expired); the search that saw it fail has failed.
        """
        if self._token is not None and self._token == self._dead and self._fetch is not None:
            self._token = None

    def ready(self) -> str | None:
        """The token `get()` would return at once, without awaiting; None: await `get()`."""
        token = self._token
        if token is None or token == self._dead or self._lock.locked():
            return None
        return token

    async def get(self) -> str:
        """The current token, fetching the first one if needed.

        While a refresh is running, waits for it (the current token is known
        to be expired). Raises `TokenExpiredError` when the callable could only
        give back the token that just expired.
        """
        token = self._token
        if token is None or self._lock.locked():
            async with self._lock:
                if self._token is None:
                    self._token = await self._call()
                token = self._token
        if token == self._dead:
            raise _same_token_expired()
        return token

    async def refresh(self, stale: str) -> str:
        """A token newer than `stale`: one call for all the requests that saw `stale` expire.

        Raises `TokenExpiredError` for a fixed token, or when the callable
        returns `stale` again (then at once for every later request too).
        """
        if self._fetch is None:
            raise TokenExpiredError(
                STATIC_TOKEN_EXPIRED,
                status_code=2004,
                http_status=401,
            )
        async with self._lock:
            if stale == self._dead:
                raise _same_token_expired()
            if self._token is not None and self._token != stale:
                return self._token
            token = await self._call()
            self.refreshes += 1
            if self._on_refresh is not None:
                self._on_refresh()
            self._token = token
            if token == stale:
                self._dead = token
                raise _same_token_expired()
            return token

    async def _call(self) -> str:
        """The callable's token; `TokenProviderError` (its exception chained) if it raises."""
        assert self._fetch is not None
        try:
            token: object = self._fetch()
            if inspect.isawaitable(token):  # an async callable; a plain one returned the str
                token = await token
        except Exception as exc:  # a TimeoutError too: the provider's, not a search deadline
            raise TokenProviderError(
                f"the token callable raised {type(exc).__name__} (chained as __cause__)"
            ) from exc
        if not isinstance(token, str):
            raise ConfigurationError(
                f"the token callable must return a str, got {type(token).__name__}"
            )
        _check_token(token)
        return token


def _same_token_expired() -> TokenExpiredError:
    return TokenExpiredError(SAME_TOKEN_EXPIRED, status_code=2004, http_status=401)


def _check_token(token: str) -> None:
    """Refuse what no server accepts in a header (the message never shows the token)."""
    if not token:
        raise ConfigurationError("the token must not be empty")
    if token != token.strip() or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in token):
        raise ConfigurationError(
            "the token has surrounding whitespace or control characters (a trailing newline "
            "from a file?): strip it"
        )
