"""One send rate for a fleet: a tenant's token bucket and learned rate, kept in Redis.

`ImiChatClient(rate_store="redis://...")` replaces the client's in-process
`SendRate` with a `FleetRate`: the same interface to the limiter (`delay()`,
`sent()`, `feedback()`, `.rate`, `.adaptive`), the same math (`_rate.py`),
but the bucket and the rate are the fleet's, one per tenant key, shared by
every client of every process that uses the store.

- **No network on the hot path.** `delay()` is synchronous: it hands out
  send slots leased beforehand. One background task per client talks to
  Redis (started on first use, cancelled and awaited by `aclose()`).
- **One bucket** (Lua script `LEASE`): a token bucket as a GCRA, its clock
  Redis' `TIME` (one clock for the fleet, whatever the members' clocks
  say). A lease asks for a few tokens (`BATCH_TIME` of the rate) and gets a
  send time for each, at most `HORIZON` ahead: members are served in the
  order they ask, a batch each, so shares come out even; a late joiner is
  in the queue at its first lease; a member that dies holds at most one
  batch, due within `HORIZON`.
- **A slow start.** Until the first throttle sets a rate, each send takes a
  permit (script `LEASE`): one client's window between all the members, and
  `GROWTH` more per answer accepted, until a window of answers is in and the
  fleet's window passes the members' concurrency together. A client waits for
  the store's first answer before its first request (at most the store's
  timeout): without it a fleet started together sent every member's window at
  once.
- **One learned rate.** The CUBIC curve of the last decrease (`w_max`, C,
  K, its time) lives in Redis; every member evaluates it at Redis' time with
  `_rate.cubic_rate` and proposes the result with its next lease, accepted
  only if no decrease happened since (`epoch`) and capped there at twice the
  fleet's accepted rate, this lease's answers counted: growth, probing
  included, is one curve for the fleet. A throttle is reported (script `THROTTLE`,
  which keeps the run of throttles by grant number, the fleet's analogue of
  `SendRate`'s send times); the member computes the decrease with
  `_rate.decrease_target` and sets it (script `DECREASE`) only if the
  epoch is still the one it computed from: two members throttled at once
  decrease once, and a throttle sent before the last decrease's grace ended
  decreases nothing. Grant numbers stand in for send times: slots voided by a
  decrease, or not taken within `STALE_SLOT` of their time, are dropped and
  reported, not counted as sent; a lone throttle aims at what the fleet had
  accepted since the previous one (`THROTTLE`'s second measure).
- **Never fails a search.** Every call has a timeout; the first failure
  switches the client to its own in-process `SendRate` (fed all along, so
  it is warm), logs one warning, counts it (`ClientStats.rate_store_fallbacks`),
  and retries every `RETRY_EVERY` s; when the store answers again, the
  client rejoins the fleet (logged at info).

The store holds the tenant key (prefix, API host and port, team id), the
bucket and the rate: no token, no chat. The key expires `IDLE_TTL` s after
its last use.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs

from ._errors import ConfigurationError
from ._rate import (
    CLUSTER_GAP,
    ESTIMATE_AGE,
    TIMER_SLACK,
    SendRate,
    cubic_rate,
    curve_shape,
    decrease_target,
    grace,
    measured_rate,
)
from ._ratescripts import DECREASE, LEASE, THROTTLE

log = logging.getLogger("imichat_async")

KEY_PREFIX = "imichat:rate"
TIMEOUT = 0.25  # seconds a store call may take before the client falls back
RETRY_EVERY = 1.0  # seconds between attempts to rejoin a store that failed
SYNC_EVERY = 0.1  # seconds between state syncs while no lease is needed
SYNC_UNBOUNDED = 0.02  # and while no rate is in force: the fleet's first throttle comes soon
HORIZON = 0.5  # seconds ahead the fleet's bucket hands out send slots at most
BATCH_TIME = 0.02  # a lease: this many seconds of the fleet's rate (at least one token)
MAX_BATCH = 8
IDLE_TTL = 60.0  # seconds the tenant's state outlives its last use
MEMBER_TTL = 2.0  # seconds a member counts as present after its last call to the store
POLL = 0.005  # seconds the limiter waits to ask again while a lease is on its way
#: and while the store's first answer, or a slow start's permits, are: a round trip to a
#: Redis nearby takes well under a millisecond, and a client's first requests wait on it
QUICK_POLL = 0.001
#: The slow start (script `LEASE`): permits granted per answer accepted; 1.25 takes a fleet
#: of 4 clients from one client's window to all of theirs in ~6 round trips, and the
#: first throttle finds about 1.25 windows in flight, not 4 (#20: 7-11 % of requests 429'd
#: by 4 processes started together, 0.5-2.4 % with it and the floor of a lone throttle)
GROWTH = 1.25
LOST = 1.0  # seconds after which permits neither used nor answered are taken as lost
GATING_POLL = 0.005  # seconds between asks for permits while the slow start holds them back
#: A slot not taken this many seconds after it was due is dropped, not used late: used late,
#: its grant number (the fleet's proxy for a send time) would lie to the measure of the rate.
STALE_SLOT = 0.05
#: A call to the store sets the offset of Redis' clock from this client's only if its round
#: trip took at most twice the shortest seen plus this many seconds, plus `OFFSET_AGING` of
#: the time since a call last set it (a loaded machine's trips stay longer than an idle
#: one's: the clocks' drift is followed all the same). See `FleetRate._call`.
OFFSET_SLACK = 0.01
OFFSET_AGING = 0.01
#: A lone throttle's lower bound of the tenant's rate counts over at most this many seconds
#: since the fleet's previous throttle (over longer, the fleet may have idled: a weak bound).
FLOOR_SPAN = 5.0
SCHEMES = ("redis", "rediss")
EXTRA_HINT = "pip install 'imichat-async[redis]'"

T = TypeVar("T")


@attrs.define
class FleetState:
    """The fleet's rate as the store last told it (Redis' clock, seconds)."""

    now: float = 0.0
    rate: float = 0.0  # 0: no rate in force (adaptive, never throttled)
    epoch: int = 0
    w_max: float = 0.0
    k: float = 0.0
    c: float = 0.0
    t0: float = 0.0
    since: float = 0.0
    estimate: float = 0.0
    estimated_at: float = 0.0


def _parsed(fields: list[Any]) -> FleetState:
    """The state at the head of a script's reply (Redis sends the numbers as strings)."""
    v = [float(f) for f in fields[:10]]
    return FleetState(v[0], v[1], int(v[2]), *v[3:10])


async def _within(aw: Awaitable[T], timeout: float) -> T:
    """`aw`'s result, or `asyncio.TimeoutError` after `timeout` s (`aw` cancelled, and over).

    Not `asyncio.wait_for`: before Python 3.12 it returns the result when the
    caller is cancelled just as `aw` is done, and the cancellation is lost
    (CPython gh-86296). `FleetRate.aclose()` then waited forever for a
    background task that went on (issue #20's stall). `asyncio.wait` never
    swallows the caller's cancellation.
    """
    inner = asyncio.ensure_future(aw)
    try:
        await asyncio.wait({inner}, timeout=timeout)
    finally:
        if not inner.done():  # timed out, or we are cancelled: so is `aw`
            inner.cancel()
            await asyncio.wait({inner})  # over when this returns, as with wait_for
    if inner.cancelled():
        raise asyncio.TimeoutError
    return inner.result()


class RedisRateStore:
    """A Redis store for the send rate: `RedisRateStore("redis://host:6379/0")`.

    `prefix` starts every key (several applications on one Redis); `timeout`
    is the seconds a store call may take before the client falls back to its
    own in-process rate. Each client opens its own connection (on its loop).
    Raises `ConfigurationError` for a URL that is not `redis://` or
    `rediss://`, or when redis-py (the extra `redis`) is not installed.
    """

    def __init__(self, url: str, *, prefix: str = KEY_PREFIX, timeout: float = TIMEOUT) -> None:
        if not isinstance(url, str) or urlsplit(url).scheme not in SCHEMES:
            raise ConfigurationError(
                f"rate_store must be None, a redis:// or rediss:// URL, or a RedisRateStore, "
                f"got {_shown(url)!r:.100}"
            )
        if not isinstance(prefix, str) or not prefix:
            raise ConfigurationError("the rate store's prefix must be a non-empty str")
        if not timeout > 0:
            raise ConfigurationError(f"the rate store's timeout must be > 0 s, got {timeout!r}")
        try:  # now, not at the first request: its import takes a while (0.1-0.2 s)
            import redis.asyncio  # noqa: F401
        except ImportError:
            raise ConfigurationError(
                f"rate_store= needs redis-py, in the extra `redis`: {EXTRA_HINT}"
            ) from None
        self.url = url
        self.prefix = prefix
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<RedisRateStore {_shown(self.url)} prefix={self.prefix!r}>"

    def key(self, base_url: str, team_id: str) -> str:
        """The tenant's key: the prefix, the API's host and port, the team id (no token)."""
        parts = urlsplit(base_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"{self.prefix}:{(parts.hostname or '').lower()}:{port}:{team_id}"

    def connect(self) -> Any:
        """A redis-py asyncio client on the running loop: no retries of its own, `timeout`."""
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        return redis.asyncio.Redis.from_url(
            self.url,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )


def rate_store_of(value: Any) -> RedisRateStore | None:
    """`rate_store=` as a store: None, a URL string, or a `RedisRateStore`."""
    if value is None or isinstance(value, RedisRateStore):
        return value
    return RedisRateStore(value)


def _shown(url: Any) -> str:
    """A store URL without its password, for messages and logs."""
    if not isinstance(url, str):
        return type(url).__name__
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}{port}").geturl()


class FleetRate:
    """The limiter's send rate, shared through a store (see the module's docstring).

    `rate`/`adaptive`/`burst` as for `SendRate`, but for the whole fleet: a
    fixed `rate` is the fleet's, an adaptive one learns the fleet's rate
    (`rate`, if given, its ceiling and start). `on_fallback()` is called once
    each time the store stops answering.
    """

    def __init__(
        self,
        store: RedisRateStore,
        key: str,
        rate: float | None = None,
        *,
        adaptive: bool = False,
        burst: float = 1.0,
        window: int = 0,
        on_fallback: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local = SendRate(rate, adaptive=adaptive, burst=burst, clock=clock)
        # The client's concurrency: the fleet's slow start begins with one such window.
        self._window = window if adaptive else 0
        self._gating = False  # the fleet's slow start holds sends back: each needs a permit
        self.adaptive = adaptive
        self.store = store
        self.key = key
        self.shared = False  # the store answered last time it was asked
        self.fallbacks = 0
        self.fleet = FleetState()
        self._fixed = None if adaptive else rate
        self.members = 1  # clients of the tenant that used the store lately (stats)
        self._started = 0.0  # when the background task was started
        self._id = uuid.uuid4().hex
        self._on_fallback = on_fallback
        self._clock = clock
        self._offset = 0.0  # Redis' clock minus ours
        self._best_trip = math.inf  # the shortest round trip to the store so far (s)
        self._offset_at = 0.0  # when a call last set the offset (our clock)
        self._slots: collections.deque[tuple[float, int]] = collections.deque()  # (when, grant)
        self._granted: collections.deque[int] = collections.deque()  # grants taken, not yet sent
        self._tickets: dict[int, tuple[float, int]] = {}  # ticket -> (sent at, grant)
        self._throttled: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)
        self._ok = 0  # accepted and sent since the last call to the store
        self._sent = 0
        self._dropped: list[int] = []  # grants dropped unsent since the last lease
        self._want = False
        self._retry_at = 0.0
        self._redis: Any = None
        self._scripts: dict[str, Any] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        where = "shared" if self.shared else "in-process (store not answering)"
        rate = "unbounded" if self.rate is None else f"{self.rate:.1f}/s"
        return f"<FleetRate {where} {rate} fallbacks={self.fallbacks}>"

    @property
    def rate(self) -> float | None:
        """Requests per second for the fleet now (None: none in force); in-process when
        the store is not answering."""
        if not self.shared:
            return self.local.rate
        return self.fleet.rate or None

    # -- the limiter's interface (synchronous: never waits on the store) ---------------------

    def delay(self) -> float:
        """Seconds to wait before asking again; 0.0 means a send slot was taken: send now."""
        self._start()
        if not self.shared:
            if not self.fallbacks and self._clock() - self._started < self.store.timeout:
                # The store's first answer, on its way: it may hold a rate, or a slow start
                # (else a fleet started together sends every member's window at once). Its
                # failure or its timeout ends the wait: then the client's own rate.
                self._ask()
                return QUICK_POLL
            return self.local.delay()
        if not self.fleet.rate and not self._gating:
            return self.local.delay()  # no rate in force yet: its own first throttle counts
        slots = self._slots
        batch = self._batch()
        now = self._clock()
        while slots and slots[0][0] < now - STALE_SLOT and self.fleet.rate:  # permits: any time
            self._dropped.append(slots.popleft()[1])
        if slots:
            wait = slots[0][0] - now
            if wait <= 0:
                self._granted.append(slots.popleft()[1])
                if len(slots) < batch:
                    self._ask()
                return 0.0
            return wait
        self._ask()
        return POLL if self.fleet.rate else QUICK_POLL

    def sent(self) -> int:
        ticket = self.local.sent()
        if self.adaptive:
            grant = self._granted.popleft() if self._granted else -1
            self._tickets[ticket] = (self._clock(), grant)
            self._sent += 1
        return ticket

    def feedback(self, ticket: int, *, throttled: bool, ok: bool) -> None:
        self.local.feedback(ticket, throttled=throttled, ok=ok)
        sent = self._tickets.pop(ticket, None)
        if sent is None:
            return
        if throttled:
            if self.shared:
                self._throttled.append(sent)
                self._ask()
        elif ok:
            self._ok += 1
            if self._gating:
                self._ask()  # each answer accepted widens the slow start: tell the fleet

    # -- the background task ----------------------------------------------------------------

    def _start(self) -> None:
        if self._task is None and not self._closed:
            self._started = self._clock()
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _ask(self) -> None:
        self._want = True
        if self._wake is not None:
            self._wake.set()

    async def aclose(self) -> None:
        """Stop the background task and close the connection. Idempotent."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._disconnect()

    async def _disconnect(self) -> None:
        redis, self._redis = self._redis, None
        if redis is not None:
            with contextlib.suppress(Exception):
                await _within(redis.aclose(), self.store.timeout)

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._closed:  # closed: over even if a cancellation was lost on the way
            self._wake.clear()
            try:
                await self._exchange()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store failing never fails a search
                self._lost(exc)
                await self._disconnect()
                await asyncio.sleep(RETRY_EVERY)
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await _within(self._wake.wait(), self._pause())

    def _pause(self) -> float:
        if self._want and len(self._slots) < self._batch():
            if self.fleet.rate:
                return max(0.001, self._retry_at - self._clock())
            if self._gating:
                return GATING_POLL  # permits come back as the fleet's answers do
        return SYNC_EVERY if self.fleet.rate or not self.adaptive else SYNC_UNBOUNDED

    def _batch(self) -> int:
        """Slots to ask for at once: `BATCH_TIME` of the rate, or, with none in force, a
        window's worth of the slow start's permits (at most `MAX_BATCH`)."""
        if self.fleet.rate:
            return max(1, min(MAX_BATCH, int(self.fleet.rate * BATCH_TIME)))
        return max(1, min(MAX_BATCH, self._window))

    async def _call(self, name: str, script: str, keys: list[str], args: list[Any]) -> list[Any]:
        if self._redis is None:
            self._redis = self.store.connect()
            self._scripts = {}
        fn = self._scripts.get(name)
        if fn is None:
            fn = self._scripts[name] = self._redis.register_script(script)
        asked = self._clock()
        reply: list[Any] = await _within(fn(keys=keys, args=args), self.store.timeout)
        answered = self._clock()
        # Redis read its clock somewhere between `asked` and `answered`: the middle is off
        # by half the round trip at most. A round trip far over the best seen is a loop that
        # stalled (the GIL, a collection) before it read `answered`: such a sample skewed the
        # offset by up to a second, so members sent the throttles' times and the curve's
        # proposals from a wrong clock (#22: measures of 56/s for a 100/s tenant, and
        # proposals of 0.5/s, a curve read a second before its start).
        trip = answered - asked
        aging = OFFSET_AGING * (answered - self._offset_at)
        if trip <= 2 * self._best_trip + OFFSET_SLACK + aging:
            self._best_trip = min(self._best_trip, trip)
            self._offset = float(reply[0]) - (asked + answered) / 2
            self._offset_at = answered
        return reply

    def _ttl(self) -> int:
        return int(IDLE_TTL * 1000)

    def _counts(self) -> tuple[int, int]:
        counts = (self._ok, self._sent)
        self._ok = self._sent = 0
        return counts

    async def _exchange(self) -> None:
        while self._throttled:
            await self._report(*self._throttled.popleft())
        batch = self._batch()
        leasing = self.fleet.rate or self._gating or (self._window and not self.shared)
        wanted = batch if leasing and self._want and len(self._slots) < batch else 0
        ok, sent = self._counts()
        dropped, self._dropped = ",".join(map(str, self._dropped)), []
        reply = await self._call(
            "lease",
            LEASE,
            [self.key, self.key + ":members"],
            [
                wanted,
                self._fixed or 0,
                self.local.ceiling or 0,
                self.local.burst,
                TIMER_SLACK,
                HORIZON,
                self.fleet.epoch,
                self._proposal() if ok else 0,
                ok,
                sent,
                self._ttl(),
                self._id,
                MEMBER_TTL,
                self._window,
                GROWTH,
                LOST,
                dropped,
            ],
        )
        was, gated = self.fleet.rate, self._gating
        self.fleet = _parsed(reply)
        rate = self.fleet.rate
        self._gating = not rate and float(reply[15]) == 1
        local_now = self.fleet.now - self._offset
        self._retry_at = local_now + float(reply[12])
        decreased = was and rate < was * 0.99
        if decreased or (gated and not self._gating) or not (rate or self._gating):
            # a decrease: slots leased at the old rate go unused; the slow start's end (a
            # rate now, or no permit needed): its permits too
            self._drop()
        grant = int(float(reply[13]))
        self.members = max(1, int(float(reply[14])))
        for i, offset in enumerate(reply[16:]):
            self._slots.append((local_now + float(offset), grant + i))
        if wanted and len(self._slots) >= batch:
            self._want = False
        self._rejoined()

    def _drop(self) -> None:
        """Void the slots leased (a decrease, the slow start's end); the next lease reports
        their grant numbers, so that the fleet's measure of the rate does not count them."""
        self._dropped += (grant for _, grant in self._slots)
        self._slots.clear()

    def _proposal(self) -> float:
        """The fleet's curve now, at Redis' time: its growth (0: nothing to propose).

        The script caps it at twice the fleet's accepted rate (`SendRate._grow`'s cap),
        with the answers this lease reports: the rate in the last reply missed them, and
        at a request a second it is near nothing, which held the fleet at `w_max` (#20).
        """
        fleet = self.fleet
        if not self.adaptive or not fleet.rate or not fleet.epoch:
            return 0.0
        now = self._clock() + self._offset
        # Never before the decrease that drew the curve: behind it, the curve falls steeply
        # (a second early, to nothing), and this member's clock is only as good as its offset.
        since = max(0.0, now - fleet.t0)
        cubic = cubic_rate(since, fleet.w_max, fleet.k, fleet.c, self.local.scale)
        return self.local.clamp(cubic)

    async def _report(self, sent_local: float, grant: int) -> None:
        """A throttle: the fleet decreases once for it, unless it is stale."""
        sent_at = sent_local + self._offset
        ok, sent = self._counts()
        reply = await self._call(
            "throttle",
            THROTTLE,
            [self.key],
            [sent_at, grant, ok, sent, self.local.window, CLUSTER_GAP, self._ttl()],
        )
        fleet = self.fleet = _parsed(reply)
        offered, stale, between, span, since_last, last_span = (float(v) for v in reply[10:16])
        measured = measured_rate(between, span) if between >= 0 else None
        floor = None
        if since_last >= 0 and last_span <= FLOOR_SPAN:
            floor = measured_rate(since_last, last_span)
        local = self.local
        if stale:
            if measured is None or not fleet.rate or fleet.rate <= local.beta * measured:
                return
            # A better measure within the grace: aim lower, on a curve drawn for it.
            w_max, rate = measured, local.beta * measured
        else:
            fresh = fleet.estimate and sent_at - fleet.estimated_at <= ESTIMATE_AGE
            w_max, rate = decrease_target(
                fleet.rate or None,
                beta=local.beta,
                measured=measured,
                estimate=fleet.estimate if fresh else None,
                offered=lambda: offered,
                floor=floor,
            )
        rate = local.clamp(rate)
        w_max, c, k = curve_shape(w_max, rate, local.scale, local.min_rate)
        done = await self._call(
            "decrease",
            DECREASE,
            [self.key],
            [
                fleet.epoch,
                rate,
                w_max,
                k,
                c,
                0 if stale else grace(rate),
                measured or 0,
                sent_at if measured else 0,
                local.burst,
                TIMER_SLACK,
                self._ttl(),
            ],
        )
        self.fleet = _parsed(done[1:])
        self._drop()

    # -- failing and rejoining --------------------------------------------------------------

    def _lost(self, exc: BaseException) -> None:
        self._best_trip = math.inf  # the store that answers next may be another
        self._slots.clear()
        self._granted.clear()
        self._throttled.clear()
        if self.shared or not self.fallbacks:
            self.shared = False
            self.fallbacks += 1
            log.warning(
                "rate store %s not answering (%s): falling back to this client's own "
                "send rate; retrying every %.0f s",
                _shown(self.store.url),
                type(exc).__name__,
                RETRY_EVERY,
            )
            if self._on_fallback is not None:
                self._on_fallback()

    def _rejoined(self) -> None:
        if not self.shared:
            if self.fallbacks:
                log.info("rate store %s answers again: sharing its rate", _shown(self.store.url))
            self.shared = True
