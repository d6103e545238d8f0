"""Unit tests of the sandbox's parts that need no server: the gateway's bucket and the tokens."""

from __future__ import annotations

from imichat_async.sandbox._gateway import TokenBucket
from imichat_async.sandbox._tokens import Tokens


def test_bucket_refills_at_rate_and_never_past_burst() -> None:
    """After a long idle time the bucket holds `burst` tokens, not rate * idle time."""
    bucket = TokenBucket()
    admitted = [bucket.take(2.0, 3, 0.0) is None for _ in range(4)]
    assert admitted == [True, True, True, False]
    # 100 s idle at 2/s would be 200 tokens: capped at 3.
    admitted = [bucket.take(2.0, 3, 100.0) is None for _ in range(4)]
    assert admitted == [True, True, True, False]
    # Half a second at 2/s is one token back.
    assert bucket.take(2.0, 3, 100.5) is None
    assert bucket.take(2.0, 3, 100.5) == 1


def test_bucket_retry_after_is_the_wait_for_one_token_rounded_up() -> None:
    """At 0.4 tokens/s an empty bucket answers 3 (2.5 s rounded up); a refusal takes nothing."""
    bucket = TokenBucket()
    assert bucket.take(0.4, 1, 0.0) is None
    assert bucket.take(0.4, 1, 0.0) == 3
    assert bucket.take(0.4, 1, 1.0) == 2  # 0.4 back, 1.5 s to go
    assert bucket.take(0.4, 1, 2.5) is None


def test_bucket_is_full_again_when_the_knobs_change() -> None:
    """New (rate, burst) knobs start from a full bucket of the new burst."""
    bucket = TokenBucket()
    assert bucket.take(1.0, 1, 0.0) is None
    assert bucket.take(1.0, 1, 0.0) == 1
    assert [bucket.take(1.0, 2, 0.0) for _ in range(3)] == [None, None, 1]


def test_tokens_expire_by_age_uses_and_revocation_one_at_a_time() -> None:
    """ttl, max_uses and expire(token) each expire a token; expire(token) spares the others."""
    now = [0.0]
    tokens = Tokens(lambda: now[0], ttl=10.0, max_uses=2)
    a, b = tokens.issue(), tokens.issue()
    state_a, state_b = tokens.get(a), tokens.get(b)
    assert state_a is not None and state_b is not None and tokens.get("sbx.unknown") is None
    assert not tokens.expired(state_a)
    state_a.uses = 2
    assert tokens.expired(state_a) and not tokens.expired(state_b)
    now[0] = 10.0
    assert tokens.expired(state_b)
    tokens.ttl = None
    assert not tokens.expired(state_b)
    tokens.expire(b)
    assert tokens.expired(state_b)
    assert tokens.expires_in == 3600  # announced when tokens never expire by age
