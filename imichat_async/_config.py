"""The client's arguments, checked before anything is built or sent.

Constructor arguments that cannot work raise `ConfigurationError` naming
the argument; paging arguments of a search raise `InvalidQueryError` at the
call, before any request. `limiter_for` turns `adaptive` and `rate_limit`
into the client-wide limiter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from . import _protocol as protocol
from ._errors import ConfigurationError, InvalidQueryError
from ._gate import SendRateLike
from ._limiter import Limiter
from ._rate import SendRate
from ._ratestore import FleetRate, RedisRateStore
from ._retry import RetryPolicy
from ._sched import PRIORITIES

ADAPTIVE_MODES = (False, True, "rate", "concurrency")


def check_client_args(
    *,
    team_id: str,
    concurrency: int,
    timeout: float | None,
    rate_limit: float | None,
    max_response_bytes: int,
) -> None:
    """Raises `ConfigurationError` for the first of these that cannot work."""
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


def limiter_for(
    concurrency: int,
    adaptive: bool | str,
    rate_limit: float | None,
    *,
    store: RedisRateStore | None = None,
    key: str = "",
    on_fallback: Callable[[], None] | None = None,
) -> Limiter:
    """The client-wide limiter: `adaptive` True/"rate" learns a send rate (capped by
    `rate_limit`), "concurrency" adapts the requests in flight (AIMD), False keeps both fixed.
    With a `store`, the send rate is the fleet's (`_ratestore.FleetRate`, tenant `key`).

    Raises `ConfigurationError` for any other `adaptive`, or a store with nothing to share.
    """
    if adaptive not in ADAPTIVE_MODES:
        raise ConfigurationError(
            f'adaptive must be True, False, "rate" or "concurrency", got {adaptive!r:.40}'
        )
    learn_rate = adaptive is True or adaptive == "rate"
    send_rate: SendRateLike | None = None
    if store is not None:
        if not learn_rate and rate_limit is None:
            raise ConfigurationError(
                "rate_store= shares a send rate: give adaptive=True (learn it) or "
                "rate_limit= (the fleet's), not adaptive=" + repr(adaptive)
            )
        # The limiter takes any `SendRateLike` (delay, sent, feedback): the fleet's.
        send_rate = FleetRate(
            store,
            key,
            rate_limit,
            adaptive=learn_rate,
            window=concurrency,
            on_fallback=on_fallback,
        )
    elif learn_rate or rate_limit is not None:
        send_rate = SendRate(rate_limit, adaptive=learn_rate)
    return Limiter(concurrency, adaptive=adaptive == "concurrency", send_rate=send_rate)


def check_transport(transport: Any, session: Any) -> None:
    """A user's transport: raises `ConfigurationError` with a session too, or without `send`."""
    if session is not None:
        raise ConfigurationError(
            "pass either transport= or session=, not both: a session is used only by "
            "the default (aiohttp) transport"
        )
    if not callable(getattr(transport, "send", None)):
        raise ConfigurationError(
            f"transport must have an async send(request) method, got {type(transport).__name__}"
        )


def retry_policy(max_retries: int | None, policy: RetryPolicy | None) -> RetryPolicy:
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


def check_base_url(base_url: str) -> str:
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


def check_int(name: str, value: Any, minimum: int) -> None:
    """A search's count argument: `InvalidQueryError` unless an int >= `minimum`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidQueryError(f"{name} must be an int >= {minimum}, got {value!r:.40}")


def check_paging(
    prefetch: int, start_page: int, max_pages: int | None, deadline: float | None
) -> None:
    """A search's paging arguments: `InvalidQueryError` naming the first that cannot work."""
    check_int("prefetch", prefetch, 1)
    check_int("start_page", start_page, 1)
    if max_pages is not None:
        check_int("max_pages", max_pages, 0)
    if deadline is not None and not deadline > 0:
        raise InvalidQueryError(f"deadline must be > 0 seconds, got {deadline!r}")


def check_raw(raw: Any) -> None:
    """`search_pages`' `raw`: `InvalidQueryError` unless False, True or "text"."""
    if not (raw is False or raw is True or raw == "text"):
        raise InvalidQueryError(f'raw must be False, True or "text", got {raw!r:.40}')


def check_priority(priority: Any) -> None:
    """A search's `priority`: `InvalidQueryError` unless "interactive" or "background"."""
    if priority not in PRIORITIES:
        raise InvalidQueryError(
            f'priority must be "interactive" or "background", got {priority!r:.40}'
        )
