"""The retry policy: what is retried, Retry-After, full jitter, attempts, injected sleep."""

from __future__ import annotations

import random
from typing import Any

import pytest

from imichat_async import _errors as e
from imichat_async._retry import (
    RetryPolicy,
    backoff_seconds,
    call_with_retries,
    is_retryable,
    make_retrying,
)

POLICY = RetryPolicy(
    max_retries=10, backoff_initial=0.25, backoff_max=4.0, retry_after_max=60.0, backoff_factor=2.0
)


def transient(retry_after: float | None = None) -> e.TransientError:
    return e.RateLimitedError("slow down", http_status=429, retry_after=retry_after)


@pytest.mark.parametrize(
    ("retry_after", "expected"), [(0.0, 0.0), (7.0, 7.0), (60.0, 60.0), (300.0, 60.0)]
)
@pytest.mark.parametrize("attempt", [1, 5])
def test_retry_after_wins_and_is_capped(retry_after: float, expected: float, attempt: int) -> None:
    """A server Retry-After is the wait, whatever the attempt, capped at retry_after_max."""
    assert backoff_seconds(POLICY, attempt, transient(retry_after)) == expected


@pytest.mark.parametrize("attempt", range(1, 11))
def test_full_jitter_bounds(attempt: int) -> None:
    """Without Retry-After: uniform in [0, min(backoff_max, initial * 2**(n-1))]."""
    random.seed(attempt)
    high = min(POLICY.backoff_max, POLICY.backoff_initial * 2 ** (attempt - 1))
    waits = [backoff_seconds(POLICY, attempt, transient()) for _ in range(300)]
    assert all(0.0 <= w <= high for w in waits)
    assert max(waits) > high * 0.8  # spread over the range, not a fixed value
    assert min(waits) < high * 0.2


@pytest.mark.parametrize(
    "exc", [None, e.InternalServerError("x", status_code=2007, http_status=500), ValueError("x")]
)
def test_backoff_without_retry_after(exc: BaseException | None) -> None:
    """Errors without a retry_after (or none at all) use the jittered exponential."""
    assert 0.0 <= backoff_seconds(POLICY, 3, exc) <= 1.0


def test_testing_policy_never_waits() -> None:
    """RetryPolicy.testing() zeroes every wait, Retry-After included."""
    policy = RetryPolicy.testing()
    assert backoff_seconds(policy, 4, transient()) == 0.0
    assert backoff_seconds(policy, 4, transient(30.0)) == 0.0


@pytest.mark.parametrize(
    ("exc", "retryable"),
    [
        (e.InternalServerError("x", status_code=2007, http_status=500), True),
        (e.ChatListUnavailableError("x", status_code=3454, http_status=500), True),
        (e.RateLimitedError("x", http_status=429), True),
        (e.GatewayError("x", http_status=502), True),
        (e.NetworkError("x"), True),
        (e.TokenExpiredError("x", status_code=2004, http_status=401), False),
        (e.InvalidFilterParamError("x", status_code=3445, http_status=400), False),
        (e.UnexpectedResponseError("x", http_status=301), False),
        (e.ResponseTooLargeError("x", http_status=200), False),
        (e.DecodeError("x"), False),
        (ValueError("x"), False),
    ],
)
def test_is_retryable(exc: BaseException, retryable: bool) -> None:
    """Only the contract's transient class is retried."""
    assert is_retryable(exc) is retryable


class Flaky:
    """Fails with the given errors, one per call, then returns "ok"."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "ok"


@pytest.mark.parametrize("max_retries", [0, 1, 3])
async def test_attempts_are_max_retries_plus_one(max_retries: int) -> None:
    """A transient failure is tried max_retries+1 times, then the last error is raised."""
    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(s)

    fn = Flaky(*[transient(1.5) for _ in range(10)])
    retrying = make_retrying(RetryPolicy(max_retries=max_retries), sleep=sleep)
    with pytest.raises(e.RateLimitedError):
        await call_with_retries(retrying, fn)
    assert fn.calls == max_retries + 1
    assert waits == [1.5] * max_retries


async def test_every_attempt_gets_the_arguments() -> None:
    """`call_with_retries(retrying, fn, *args)`: the first attempt and each retry call
    `fn(*args)` (the client passes its attempt's body, page, token and search so)."""
    calls: list[tuple[Any, ...]] = []

    async def attempt(*args: Any) -> str:
        calls.append(args)
        if len(calls) < 3:
            raise transient()
        return "ok"

    async def sleep(_: float) -> None:
        return None

    retrying = make_retrying(RetryPolicy(max_retries=5), sleep=sleep)
    assert await call_with_retries(retrying, attempt, b"{}", 7, "tok") == "ok"
    assert calls == [(b"{}", 7, "tok")] * 3


async def test_recovers_and_reports_each_retry() -> None:
    """Transient failures then success returns the value; on_retry sees each failure."""
    seen: list[BaseException] = []
    failures = [transient(), e.GatewayError("x", http_status=503)]
    fn = Flaky(*failures)

    async def sleep(_: float) -> None:
        return None

    retrying = make_retrying(RetryPolicy(max_retries=5), sleep=sleep, on_retry=seen.append)
    assert await call_with_retries(retrying, fn) == "ok"
    assert fn.calls == 3
    assert [type(x) for x in seen] == [e.RateLimitedError, e.GatewayError]


async def test_permanent_error_is_not_retried() -> None:
    """A permanent error is raised after one call, without sleeping."""
    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(s)

    fn = Flaky(e.InvalidConditionError("x", status_code=3447, http_status=400))
    with pytest.raises(e.InvalidConditionError):
        await call_with_retries(make_retrying(RetryPolicy(), sleep=sleep), fn)
    assert fn.calls == 1
    assert waits == []


async def test_controller_is_reusable() -> None:
    """call_with_retries starts each call with a fresh attempt count."""

    async def sleep(_: float) -> None:
        return None

    retrying = make_retrying(RetryPolicy(max_retries=2), sleep=sleep)
    for _ in range(3):
        fn = Flaky(transient(), transient())
        assert await call_with_retries(retrying, fn) == "ok"
        assert fn.calls == 3


async def test_permanent_error_after_a_transient_one_is_not_retried() -> None:
    """Transient then permanent: the permanent error is raised at once, after one wait."""
    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(s)

    fn = Flaky(transient(2.0), e.InvalidFilterParamError("x", status_code=3445, http_status=400))
    with pytest.raises(e.InvalidFilterParamError):
        await call_with_retries(make_retrying(RetryPolicy(), sleep=sleep), fn)
    assert fn.calls == 2
    assert waits == [2.0]


def test_documented_defaults() -> None:
    """RetryPolicy(): 5 retries, backoff from 0.1 s x3 up to 20 s, Retry-After capped at 60 s."""
    policy = RetryPolicy()
    assert (policy.max_retries, policy.backoff_initial, policy.backoff_max) == (5, 0.1, 20.0)
    assert policy.backoff_factor == 3.0
    assert policy.retry_after_max == 60.0
    assert backoff_seconds(policy, 1, transient(3600.0)) == 60.0


def test_testing_policy_is_the_default_with_zero_waits() -> None:
    """RetryPolicy.testing() keeps 5 retries (or the given number) and zeroes every wait."""
    assert RetryPolicy.testing() == RetryPolicy(5, 0.0, 0.0, 0.0)
    assert RetryPolicy.testing(max_retries=2) == RetryPolicy(2, 0.0, 0.0, 0.0)


async def test_each_retry_is_logged_with_wait_attempt_and_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One WARNING per retry on the imichat_async logger: wait, next attempt of total, error."""

    async def sleep(_: float) -> None:
        return None

    fn = Flaky(transient(1.5), e.GatewayError("bad gateway", http_status=502))
    with caplog.at_level("WARNING", logger="imichat_async"):
        assert await call_with_retries(make_retrying(RetryPolicy(max_retries=3), sleep), fn) == "ok"
    lines = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert lines[0] == (
        "imichat_async",
        "WARNING",
        "retrying in 1.500s (attempt 2 of 4) after: slow down (HTTP 429, no vendor status_code)",
    )
    assert lines[1][2].startswith("retrying in ")
    assert lines[1][2].endswith(
        "(attempt 3 of 4) after: bad gateway (HTTP 502, no vendor status_code)"
    )
    assert len(lines) == 2
