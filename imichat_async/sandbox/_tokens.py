"""The tenant's bearer tokens: issued, used, and expired by age, by use count or on demand.

`Tokens` knows no HTTP: the search handler looks a token up and asks whether
it has expired (2004); the token endpoint issues one and announces its
lifetime. Times come from the `clock` given (monotonic seconds), so tests may
pass a fake.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import attrs

DEFAULT_EXPIRES_IN = 3600  # what the token endpoint announces when tokens never expire


@attrs.define
class TokenState:
    """One issued token: when (`clock` seconds), how often it passed, whether it was revoked."""

    issued_at: float
    uses: int = 0
    revoked: bool = False


class Tokens:
    """Every token issued so far, and the rules that expire them.

    A token expires `ttl` seconds after issue (None: never), after
    `max_uses` accepted requests (None: never), or when `expire` revokes it.
    """

    def __init__(self, clock: Callable[[], float], ttl: float | None, max_uses: int | None) -> None:
        if max_uses is not None and max_uses < 1:
            raise ValueError(f"token_max_uses must be >= 1 or None, got {max_uses}")
        self._clock = clock
        self.ttl = ttl
        self.max_uses = max_uses
        self._states: dict[str, TokenState] = {}
        #: The state of a token, or None for one never issued (what the search handler reads).
        self.get = self._states.get

    def issue(self) -> str:
        """A fresh random token, valid from now."""
        token = f"sbx.{secrets.token_urlsafe(24)}"
        self._states[token] = TokenState(self._clock())
        return token

    def expire(self, token: str | None = None) -> None:
        """Revoke `token` (default: every token issued so far)."""
        for key, state in self._states.items():
            if token is None or key == token:
                state.revoked = True

    def expired(self, state: TokenState) -> bool:
        """Whether a token in `state` must be answered 2004 now."""
        if state.revoked:
            return True
        if self.max_uses is not None and state.uses >= self.max_uses:
            return True
        return self.ttl is not None and self._clock() - state.issued_at >= self.ttl

    @property
    def expires_in(self) -> float:
        """The lifetime the token endpoint announces, in seconds."""
        return DEFAULT_EXPIRES_IN if self.ttl is None else self.ttl
