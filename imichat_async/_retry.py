"""When to retry, and how long to wait: a pure policy, wired to tenacity here only.

Retried: the contract's transient class (`TransientError`: 2007, 3454, HTTP
429/502/503/504, resets, timeouts). Never retried: everything else. The wait
is the server's `Retry-After` when it sent one (capped), else exponential
backoff with full jitter. `sleep` is injectable, and `RetryPolicy.testing()`
zeroes every wait, for tests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import tenacity

from ._errors import TransientError

log = logging.getLogger("imichat_async")
T = TypeVar("T")


@attrs.frozen
class RetryPolicy:
    """`max_retries` retries after the first attempt; backoff in seconds.

    Retry n (1-based) without `Retry-After` waits uniform in
    [0, min(backoff_max, backoff_initial * backoff_factor**(n-1))]: by default
    0-0.1 s, 0-0.3 s, 0-0.9 s, 0-2.7 s, 0-8.1 s (12.1 s at most in all). A lone
    transient fault costs little (measured: README, "Choices"), and a longer
    outage still gets more patience than doubling from 0.25 s (7.75 s).
    """

    max_retries: int = 5
    backoff_initial: float = 0.1
    backoff_max: float = 20.0
    retry_after_max: float = 60.0
    backoff_factor: float = 3.0

    @classmethod
    def testing(cls, max_retries: int = 5) -> RetryPolicy:
        """A policy that retries as usual but never waits."""
        return cls(
            max_retries=max_retries, backoff_initial=0.0, backoff_max=0.0, retry_after_max=0.0
        )


def is_retryable(exc: BaseException) -> bool:
    """The contract's transient class."""
    return isinstance(exc, TransientError)


def backoff_seconds(policy: RetryPolicy, attempt: int, exc: BaseException | None) -> float:
    """Seconds before retry number `attempt` (1-based): Retry-After, else jittered exponential.

    Full jitter: uniform in [0, min(max, initial * factor**(attempt-1))].
    """
    if isinstance(exc, TransientError) and exc.retry_after is not None:
        return min(exc.retry_after, policy.retry_after_max)
    if policy.backoff_initial <= 0:
        return 0.0
    jitter = tenacity.wait_random_exponential(
        multiplier=policy.backoff_initial, max=policy.backoff_max, exp_base=policy.backoff_factor
    )
    return float(jitter(_FakeState(attempt)))  # type: ignore[arg-type]


@attrs.define
class _FakeState:
    attempt_number: int


class _Wait(tenacity.wait.wait_base):
    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        return backoff_seconds(self.policy, retry_state.attempt_number, exc)


def _log_retry(max_attempts: int) -> Callable[[tenacity.RetryCallState], None]:
    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "retrying in %.3fs (attempt %d of %d) after: %s",
            wait,
            state.attempt_number + 1,
            max_attempts,
            str(exc),  # the text, not the exception: a kept record must not pin its traceback
        )

    return before_sleep


def make_retrying(
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    on_retry: Callable[[BaseException], None] | None = None,
) -> tenacity.AsyncRetrying:
    """A tenacity controller; `on_retry` is told of each failure about to be retried."""
    attempts = policy.max_retries + 1
    log_retry = _log_retry(attempts)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        log_retry(state)
        exc = state.outcome.exception() if state.outcome else None
        if on_retry is not None and exc is not None:
            on_retry(exc)

    return tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(is_retryable),
        stop=tenacity.stop_after_attempt(attempts),
        wait=_Wait(policy),
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )


async def call_with_retries(
    retrying: tenacity.AsyncRetrying, fn: Callable[..., Awaitable[T]], *args: Any
) -> T:
    """Run `fn(*args)`, retrying under a fresh copy of `retrying` (controllers keep per-call
    state).

    The first attempt runs outside tenacity, so the common case (success) costs
    nothing; its failure is replayed to tenacity as attempt 1, so attempt
    numbers, waits, stop and logging are exactly as if tenacity had run it.
    """
    try:
        return await fn(*args)
    except Exception as exc:
        if not is_retryable(exc):
            raise
        first: list[BaseException] = [exc]

    async def replay_then_call() -> T:
        if first:
            raise first.pop()
        return await fn(*args)

    result: T = await retrying.copy()(replay_then_call)
    return result
