"""How fast requests may be sent: one client-side send rate per client, fixed or learned.

No I/O and no asyncio: the clock is injected, and the limiter does the
waiting. The design follows botocore's adaptive retry mode
(`botocore/retries/adaptive.py`, `bucket.py`, `throttling.py`):

- A token bucket (`TokenBucket`) of `rate` tokens per second and `burst`
  tokens deep; a request takes one token before it is sent. A fixed
  `rate_limit=` is this bucket at a fixed rate.
- In adaptive mode the bucket is off until the server first throttles (429,
  or 503 with `Retry-After`). A throttle lowers the rate multiplicatively
  (x `beta`) from the rate the server was measured to accept; without
  throttles the rate grows back along a CUBIC curve (TCP CUBIC, RFC 8312):
  fast while far below the rate of the last throttle, flat near it, then
  probing above it ever faster, but never above twice the accepted rate
  (a client that idles does not earn the right to a burst of probes).
  Unlike botocore's fixed C, the curve scales with the rate: back to the
  last throttled rate in about 1.3 s whatever it is (C = 0.1 x it), and
  five times gentler above it (C = 0.02 x it), since near a measured rate
  each probe that overshoots costs a 429 and a page held for its Retry-After.
- The first throttle cannot be measured (the burst that emptied the
  server's bucket hides its rate): the rate drops to a quarter of what was
  sent and not refused over the last second (answers still in flight
  included), then climbs back towards it quickly until throttles come close
  enough together to measure.
- A lone throttle (no run to measure) cuts x `beta` from the rate sent, or,
  within `ESTIMATE_AGE` of a measure, x `beta` from that measure: a probe above
  it overshoots unseen until the server's burst is spent, so one cut from the
  rate sent would leave it too high and cost a second throttle.
- Throttles answered to requests sent before the last decrease do not
  decrease again: they report a rate that is already gone (the same rule as
  the concurrency limiter's epochs, kept by send time).

Why the accepted rate and not botocore's rate of all responses: when a token
bucket on the server is empty, what it accepts per second is its refill
rate, the number worth learning; 429s come back at any rate the client
chooses to send.
"""

from __future__ import annotations

import bisect
import collections
import time
from collections.abc import Callable

Clock = Callable[[], float]
_EPSILON = 1e-9  # tokens: float rounding, not rate

BETA = 0.8  # multiplicative decrease
SCALE = 0.4  # CUBIC's C, in requests/s per s**3 (botocore)
MIN_RATE = 0.5  # never slower than this, requests/s (botocore's min fill rate)
WINDOW = 1.0  # seconds of accepted responses the measured rate is taken over
TIMER_SLACK = 0.02  # seconds a sleeper may wake late; the bucket keeps that much rate extra
MIN_SPAN = 0.05  # seconds: a measurement over less time than this is not trusted more
MIN_COUNT = 3  # accepted requests between two throttles before their rate is trusted
CLUSTER_GAP = 0.25  # seconds between throttled sends that still count as one run of them
BLIND_BETA = 0.25  # the decrease when the tenant's rate could not be measured
RELATIVE_SCALE = 0.1  # CUBIC's C back up to the last throttled rate: this share of it, per s**3
PROBE_SCALE = 0.02  # and above it, probing: this share of it, per s**3 (+10 % in 1.7 s)
GRACE = 5  # send intervals after a decrease during which a throttle cannot decrease again
MAX_GRACE = 0.25  # seconds: the grace is never longer than this
ESTIMATE_AGE = 10.0  # seconds a measured rate caps the cut of a lone throttle (it may go stale)


# -- the math, shared by the in-process `SendRate` and the fleet's rate (`_ratestore`) --------


def measured_rate(between: float, span: float) -> float | None:
    """The tenant's rate from `between` requests accepted in `span` seconds between two
    throttled sends of one run; None while too few or too close together to trust."""
    if span >= MIN_SPAN and between >= MIN_COUNT:
        return between / span
    return None


def decrease_target(
    rate: float | None,
    *,
    beta: float,
    measured: float | None,
    estimate: float | None,
    offered: Callable[[], float],
    floor: float | None = None,
) -> tuple[float, float]:
    """(the curve's top `w_max`, the rate from now) after a throttle that decreases.

    `rate`: the rate in force, None while the bucket is off (adaptive, never throttled);
    `measured`: this throttle's run measured the tenant's rate; `estimate`: a measure
    recent enough (`ESTIMATE_AGE`) to cap a lone throttle's cut; `offered()`: the rate
    sent and not refused, asked for only at the first throttle; `floor`: a lower bound of
    the tenant's rate (accepted between the previous throttle and this one, over the time
    between them), which a lone throttle aims at when it is below the cap, but never more
    than one `beta` below it, and which overrules a lower `estimate`.
    """
    if measured is not None:
        w_max = measured if rate is None else min(measured, rate / beta)  # never up
        return w_max, beta * w_max
    if rate is not None:
        # A lone throttle: the rate sent at was too much. Probing above a recent measure,
        # the server's burst hid the overshoot until now: aim back at that measure
        # (one cut, not two), unless it is old enough that the tenant may have changed.
        # A floor above that measure says it read low (a run of throttles while the
        # members' demand dipped): it held the fleet at 0.8 x it until it aged out (#22:
        # 67/s for 14 s against a tenant allowing 100/s).
        cap = estimate if estimate is None or floor is None else max(estimate, floor)
        w_max = rate if cap is None else min(rate, cap)
        if floor is not None:
            # The rate the throttle came at overshot by the time the server's burst took to
            # drain: aiming back there, the fleet overshot again each second (issue #20).
            w_max = min(w_max, max(floor, beta * w_max))
        return w_max, beta * w_max
    # The first throttle, alone: the accepted rate so far is about what was sent, the
    # burst included, so the tenant's rate is somewhere below it. Start well below, and
    # climb back towards it fast (the concave part of the curve) until throttles come
    # close enough together to measure the rate.
    w_max = offered()
    return w_max, BLIND_BETA * w_max


def curve_shape(
    w_max: float, rate: float, scale: float, min_rate: float
) -> tuple[float, float, float]:
    """(w_max, C, K) of the CUBIC curve from `rate` now back up to `w_max` (K seconds on)."""
    w_max = max(w_max, min_rate)
    c = max(scale, RELATIVE_SCALE * w_max)
    return w_max, c, (max(0.0, w_max - rate) / c) ** (1 / 3)


def cubic_rate(t: float, w_max: float, k: float, c: float, scale: float) -> float:
    """The CUBIC curve `t` seconds after its decrease: concave up to `w_max` (at `k`),
    then probing above it, five times gentler (`PROBE_SCALE`)."""
    t -= k
    if t >= 0:
        c = max(scale, PROBE_SCALE * w_max)
    return c * t * t * t + w_max


def grace(rate: float) -> float:
    """Seconds after a decrease during which a throttle cannot decrease again."""
    return min(GRACE / rate, MAX_GRACE)


def bucket_depth(burst: float, rate: float) -> float:
    """The bucket's depth: `burst`, and never under one token plus `TIMER_SLACK` of rate."""
    return max(burst, 1.0 + rate * TIMER_SLACK)


class TokenBucket:
    """`rate` tokens a second, at most `burst` kept; full at the start."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate!r}")
        if not burst >= 1:
            raise ValueError(f"burst must be >= 1, got {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
            self._at = now

    def set_rate(self, rate: float, now: float) -> None:
        """Change the refill rate from `now` on (tokens earned so far are kept)."""
        self._refill(now)
        self.rate = float(rate)

    def take(self, now: float) -> float:
        """Take a token and return 0.0, or take nothing and return the seconds until one."""
        self._refill(now)
        if self.tokens >= 1.0 - _EPSILON:  # a waiter woken on time finds its token
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateMeter:
    """Events per second over the last `window` seconds (or since the first event, if sooner)."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._times: collections.deque[float] = collections.deque()
        self._first: float | None = None

    def record(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._times.append(now)

    def rate(self, now: float) -> float:
        times = self._times
        while times and times[0] <= now - self.window:
            times.popleft()
        if self._first is None:
            return 0.0
        span = min(self.window, now - self._first)
        return len(times) / max(span, MIN_SPAN)


class SendRate:
    """The client's send rate: `delay()` then `sent()` before each request, `feedback()` after.

    `rate` fixes the rate (a plain token bucket); `adaptive=True` learns it
    (then `rate`, if given, is the ceiling it never goes above, and the start).
    `burst` is how many requests may go back to back after a pause; the
    bucket is always a little deeper than one token (1 + `TIMER_SLACK`
    seconds of the rate), else each late wake-up of a waiter would be rate lost.

    Learning works on send times. A throttle says the server's bucket was
    empty when that request arrived; between two such moments the server
    accepted exactly its refill rate, so the accepted requests *sent* between
    two throttled ones, over the time between their sends, is the tenant's
    rate with its burst left out. Before there are two throttles, the
    accepted rate measured so far (burst included, so too high) stands in.
    """

    def __init__(
        self,
        rate: float | None = None,
        *,
        adaptive: bool = False,
        burst: float = 1.0,
        clock: Clock = time.monotonic,
        beta: float = BETA,
        scale: float = SCALE,
        min_rate: float = MIN_RATE,
        window: float = WINDOW,
    ) -> None:
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {rate!r}")
        if rate is None and not adaptive:
            raise ValueError("a fixed send rate needs a rate")
        if not 0 < beta < 1:
            raise ValueError(f"beta must be in (0, 1), got {beta!r}")
        self.adaptive = adaptive
        self.ceiling = rate
        self.beta = beta
        self.scale = scale
        self.window = window
        self.min_rate = min(min_rate, rate) if rate is not None else min_rate
        self._clock = clock
        now = clock()
        self.burst = burst
        self._bucket = TokenBucket(rate or 1.0, self._depth(rate or 1.0), now)
        self._enabled = rate is not None  # adaptive without a ceiling: off until throttled
        self.accepted = RateMeter(window)  # answers that were not throttles, by answer time
        self.throttles = 0  # every throttle seen
        self.decreases = 0  # those that lowered the rate
        self.estimate: float | None = None  # the tenant's rate, once two throttles told it
        self._estimated_at = now  # when `estimate` was measured
        self._seq = 0
        self._in_flight: dict[int, float] = {}  # send times of requests not answered yet
        self._accepted_sends: list[float] = []  # send times of accepted requests, sorted
        self._first_send: float | None = None
        # Send times of a run of throttles (none more than CLUSTER_GAP apart): the moments the
        # server's bucket was known empty, over the last `window`.
        self._run: collections.deque[float] = collections.deque()
        self._rate_since = now  # requests sent from here on were sent at the current rate
        # CUBIC: the rate at the last decrease, when it happened, when the curve is back there.
        self._w_max = rate or 0.0
        self._last_decrease = now
        self._k = 0.0
        self._c = scale  # CUBIC's C since the last decrease

    @property
    def rate(self) -> float | None:
        """Requests per second allowed now; None while adaptive mode has seen no throttle."""
        return self._bucket.rate if self._enabled else None

    def __repr__(self) -> str:
        mode = "adaptive" if self.adaptive else "fixed"
        rate = "unbounded" if self.rate is None else f"{self.rate:.1f}/s"
        return f"<SendRate {mode} {rate} decreases={self.decreases}>"

    def delay(self) -> float:
        """Seconds to wait before asking again; 0.0 means a token was taken: send now."""
        if not self._enabled:
            return 0.0
        return self._bucket.take(self._clock())

    def sent(self) -> int:
        """A request goes now: its ticket, to hand back to `feedback`."""
        self._seq += 1
        if self.adaptive:
            now = self._clock()
            if self._first_send is None:
                self._first_send = now
            self._in_flight[self._seq] = now
        return self._seq

    def feedback(self, ticket: int, *, throttled: bool, ok: bool) -> None:
        """What the server answered the request of `ticket` (from `sent`).

        `throttled`: 429, or 503 with Retry-After. `ok`: an answer that is not
        a throttle nor a server error (a 4xx counts: the server accepted it).
        Anything else (5xx, no answer) says nothing about the rate. A throttle
        of a request sent before the current rate took effect (at the old
        rate, or in the grace of `GRACE` sends after a decrease, while the
        server's bucket is still empty from the overshoot) decreases nothing.
        """
        sent_at = self._in_flight.pop(ticket, None)
        if sent_at is None:
            return
        now = self._clock()
        if throttled:
            self.throttles += 1
            run = self._run
            if run and sent_at - run[-1] > CLUSTER_GAP:
                run.clear()  # a pause: the bucket may have refilled since
            if not run or sent_at > run[-1]:
                run.append(sent_at)
            while sent_at - run[0] > self.window:
                run.popleft()
            measured = self._measure(sent_at)
            if sent_at >= self._rate_since:
                self._decrease(now, measured, sent_at)
            elif measured is not None and self._bucket.rate > self.beta * measured:
                # A better measure within the grace: aim lower, on a curve drawn for it
                # (the old curve, drawn from a higher rate, would start far below zero).
                self._curve(measured, self.beta * measured, now)
            return
        if ok:
            self.accepted.record(now)
            bisect.insort(self._accepted_sends, sent_at)
            self._forget(now)
            if self._enabled:
                self._grow(now)

    def _forget(self, now: float) -> None:
        sends = self._accepted_sends
        horizon = now - 2 * self.window
        if sends and sends[0] < horizon:
            del sends[: bisect.bisect_left(sends, horizon)]

    def _accepted_between(self, start: float, end: float) -> float:
        """Requests sent in (start, end) the server accepted, or may yet (still in flight)."""
        sends = self._accepted_sends
        done = bisect.bisect_left(sends, end) - bisect.bisect_right(sends, start)
        return done + sum(1 for t in self._in_flight.values() if start < t < end)

    def _measure(self, sent_at: float) -> float | None:
        """The tenant's rate from this run of throttles, or None while it cannot be told."""
        empty = self._run[0] if self._run else None
        if empty is not None and sent_at - empty >= MIN_SPAN:
            measured = measured_rate(self._accepted_between(empty, sent_at), sent_at - empty)
            if measured is not None:
                self.estimate = measured
                self._estimated_at = sent_at
            return measured
        return None

    def _offered(self, sent_at: float) -> float:
        """Requests/s sent over the last `window` before `sent_at` and not refused (so far).

        Counted by send time, so requests still in flight count: at the first throttle
        most answers of the burst that emptied the server's bucket are not back yet.
        """
        start = max(self._first_send or sent_at, sent_at - self.window)
        sent = self._accepted_between(start - _EPSILON, sent_at)
        return sent / max(sent_at - start, MIN_SPAN)

    def _decrease(self, now: float, measured: float | None, sent_at: float) -> None:
        estimate = self.estimate
        if estimate is not None and sent_at - self._estimated_at > ESTIMATE_AGE:
            estimate = None
        w_max, rate = decrease_target(
            self.rate,
            beta=self.beta,
            measured=measured,
            estimate=estimate,
            offered=lambda: self._offered(sent_at),
        )
        self._curve(w_max, rate, now)
        self._rate_since = now + grace(self._bucket.rate)
        self._enabled = True
        self.decreases += 1

    def _curve(self, w_max: float, rate: float, now: float) -> None:
        """Set the rate to `rate` now, and the CUBIC curve back from it to `w_max`."""
        self._w_max, self._c, self._k = curve_shape(w_max, rate, self.scale, self.min_rate)
        self._last_decrease = now
        self._set(rate, now)

    def _grow(self, now: float) -> None:
        cubic = cubic_rate(now - self._last_decrease, self._w_max, self._k, self._c, self.scale)
        # Above the last throttled rate only as far as the client uses it (botocore's 2x
        # the measured rate): an idle pause does not turn into a burst of probes.
        self._set(min(cubic, max(self._w_max, 2 * self.accepted.rate(now))), now)

    def _depth(self, rate: float) -> float:
        return bucket_depth(self.burst, rate)

    def clamp(self, rate: float) -> float:
        """`rate` within this rate's bounds: `min_rate`, and the ceiling if there is one."""
        rate = max(self.min_rate, rate)
        return rate if self.ceiling is None else min(self.ceiling, rate)

    def _set(self, rate: float, now: float) -> None:
        rate = self.clamp(rate)
        self._bucket.set_rate(rate, now)
        self._bucket.burst = self._depth(rate)
