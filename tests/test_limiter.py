"""The client-wide limiter: fixed bound, cancellation safety, adaptive AIMD, send rate, and
the order of service between searches (fewest pages left first, aging, priority)."""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import Coroutine
from typing import Any

import pytest

from imichat_async._gate import MAX_KEEP, RateGate, SendRateLike, Waiter
from imichat_async._limiter import Limiter
from imichat_async._rate import SendRate
from imichat_async._sched import SHARE, TYPICAL_OF, Flow, Priority, Scheduler
from imichat_async._slots import Slots
from tests.helpers import assert_no_stray_tasks


async def run_workers(limiter: Limiter, n: int, seed: int = 0, ok: bool = True) -> int:
    """n tasks each hold a slot for a few loop turns; returns the peak seen by the workers."""
    rng = random.Random(seed)
    active = 0
    peak = 0

    async def worker() -> None:
        nonlocal active, peak
        epoch = await limiter.acquire()
        try:
            active += 1
            peak = max(peak, active)
            for _ in range(rng.randint(1, 5)):
                await asyncio.sleep(0)
            active -= 1
        finally:
            limiter.release(epoch, ok=ok)

    await asyncio.gather(*(worker() for _ in range(n)))
    return peak


@pytest.mark.parametrize("limit", [1, 2, 3, 8])
async def test_fixed_mode_bounds_in_flight(limit: int) -> None:
    """Fixed mode never lets more than `limit` holders in, and does reach the limit."""
    limiter = Limiter(limit)
    peak = await run_workers(limiter, 40)
    assert peak == limit
    assert limiter.peak == limit
    assert limiter.in_flight == 0
    assert limiter.limit == limit


async def test_fixed_mode_ignores_feedback() -> None:
    """Without adaptive=True, overload feedback does not change the limit."""
    limiter = Limiter(4)
    epoch = await limiter.acquire()
    limiter.release(epoch, overloaded=True)
    assert limiter.limit == 4
    assert limiter.decreases == 0


async def test_waiters_are_served_first_come() -> None:
    """Waiters get slots in the order they asked."""
    limiter = Limiter(1)
    order: list[int] = []
    epoch = await limiter.acquire()

    async def waiter(i: int) -> None:
        e = await limiter.acquire()
        order.append(i)
        limiter.release(e)

    tasks = [asyncio.ensure_future(waiter(i)) for i in range(5)]
    await asyncio.sleep(0)
    limiter.release(epoch)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]


async def test_cancel_while_waiting_does_not_leak() -> None:
    """A waiter cancelled while queued never takes (nor keeps) a slot."""
    limiter = Limiter(2)
    held = [await limiter.acquire(), await limiter.acquire()]
    waiters = [asyncio.ensure_future(limiter.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert limiter.in_flight == 2
    for epoch in held:
        limiter.release(epoch)
    assert limiter.in_flight == 0
    # Both slots are usable again.
    assert await run_workers(limiter, 6) == 2
    await assert_no_stray_tasks()


async def test_cancel_just_after_grant_gives_the_slot_back() -> None:
    """A waiter granted a slot and cancelled before it runs hands the slot back."""
    limiter = Limiter(1)
    epoch = await limiter.acquire()
    waiter = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0)  # queued
    limiter.release(epoch)  # grants the slot to the waiter, which has not resumed yet
    assert limiter.in_flight == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.in_flight == 0
    ticket = await asyncio.wait_for(limiter.acquire(), 1)  # the slot is free again
    assert (ticket.epoch, limiter.in_flight) == (0, 1)
    limiter.release(ticket)


@pytest.mark.parametrize("seed", range(5))
async def test_random_cancellations_never_leak(seed: int) -> None:
    """Many workers, some cancelled at random points: the count always returns to zero."""
    rng = random.Random(seed)
    limiter = Limiter(3)

    async def worker() -> None:
        epoch = await limiter.acquire()
        try:
            for _ in range(rng.randint(0, 4)):
                await asyncio.sleep(0)
        finally:
            limiter.release(epoch)

    tasks = [asyncio.ensure_future(worker()) for _ in range(30)]
    for _ in range(12):
        await asyncio.sleep(0)
        for t in rng.sample(tasks, 3):
            t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert limiter.in_flight == 0
    assert limiter.peak <= 3
    await assert_no_stray_tasks()


async def test_adaptive_halves_on_overload_and_recovers() -> None:
    """Adaptive mode halves the limit on overload and adds back up to max on success."""
    limiter = Limiter(8, adaptive=True)
    limiter.release(await limiter.acquire(), overloaded=True)
    assert limiter.limit == 4
    limiter.release(await limiter.acquire(), overloaded=True)
    assert limiter.limit == 2
    limiter.release(await limiter.acquire(), overloaded=True)
    limiter.release(await limiter.acquire(), overloaded=True)
    assert limiter.limit == 1  # never below min_limit
    assert limiter.decreases == 4
    for _ in range(200):
        limiter.release(await limiter.acquire(), ok=True)
        assert limiter.limit <= 8
    assert limiter.limit == 8


async def test_adaptive_one_decrease_per_epoch() -> None:
    """Requests started before a decrease cannot halve the limit again."""
    limiter = Limiter(8, adaptive=True)
    epochs = [await limiter.acquire() for _ in range(4)]
    for epoch in epochs:
        limiter.release(epoch, overloaded=True)
    assert limiter.limit == 4
    assert limiter.decreases == 1


async def test_adaptive_bound_applies_to_new_acquires() -> None:
    """After a halving, no more than the new limit are admitted at once."""
    limiter = Limiter(8, adaptive=True)
    limiter.release(await limiter.acquire(), overloaded=True)
    assert await run_workers(limiter, 20, ok=False) == 4


async def test_adaptive_never_above_max() -> None:
    """Success feedback never lifts the limit above max_limit."""
    limiter = Limiter(3, adaptive=True)
    for _ in range(50):
        limiter.release(await limiter.acquire(), ok=True)
    assert limiter.limit == 3
    assert await run_workers(limiter, 20) <= 3


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_must_be_positive(limit: int) -> None:
    """A limit below 1 is refused."""
    with pytest.raises(ValueError, match="limit"):
        Limiter(limit)


async def test_adaptive_stale_overload_never_enlarges() -> None:
    """A 429/503 from before the last halving (stale epoch) leaves the window as it is."""
    limiter = Limiter(8, adaptive=True)
    epochs = [await limiter.acquire() for _ in range(8)]
    limiter.release(epochs[0], overloaded=True, ok=True)  # a 429 is < 500: ok=True as well
    assert limiter.limit == 4
    for epoch in epochs[1:]:
        limiter.release(epoch, overloaded=True, ok=True)
    assert limiter.limit == 4
    assert limiter.decreases == 1


async def _grant_order(limiter: Limiter, asks: list[tuple[object, float | None]]) -> list[int]:
    """Queue `asks` (group, rank) behind one held slot, free it, return the order of grants."""
    order: list[int] = []
    held = await limiter.acquire()

    async def waiter(i: int, group: object, rank: float | None) -> None:
        e = await limiter.acquire(group, rank)
        order.append(i)
        await asyncio.sleep(0)
        limiter.release(e)

    tasks = [asyncio.ensure_future(waiter(i, g, r)) for i, (g, r) in enumerate(asks)]
    await asyncio.sleep(0)
    limiter.release(held)
    await asyncio.gather(*tasks)
    return order


async def test_lowest_rank_of_a_group_goes_first() -> None:
    """Within one search the lowest page waiting gets the next slot, whenever it asked."""
    asks: list[tuple[object, float | None]] = [("s", 5), ("s", 7), ("s", 6), ("s", 2)]
    assert await _grant_order(Limiter(1), asks) == [3, 0, 2, 1]


async def test_groups_take_turns() -> None:
    """Two searches waiting are served alternately, each lowest page first."""
    asks: list[tuple[object, float | None]] = [("a", 1), ("a", 2), ("a", 3), ("b", 9), ("b", 8)]
    assert await _grant_order(Limiter(1), asks) == [0, 4, 1, 3, 2]


async def test_cancelled_ranked_waiter_leaves_its_queue() -> None:
    """A ranked waiter cancelled in its queue is skipped; the others still get slots in order."""
    limiter = Limiter(1)
    held = await limiter.acquire()
    order: list[int] = []

    async def waiter(i: int) -> None:
        e = await limiter.acquire("s", i)
        order.append(i)
        limiter.release(e)

    tasks = {i: asyncio.ensure_future(waiter(i)) for i in (3, 1, 2)}
    await asyncio.sleep(0)
    tasks[1].cancel()
    await asyncio.gather(tasks[1], return_exceptions=True)
    limiter.release(held)
    await asyncio.gather(tasks[2], tasks[3])
    assert order == [2, 3]
    assert limiter.in_flight == 0
    limiter.release(await asyncio.wait_for(limiter.acquire("s", 0), 1))


# -- the send rate, waited for before a slot --------------------------------------------------


class FakeTime:
    """A clock and a sleep that advances it: the limiter's rate waits take no real time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("rate", "span"),
    [
        (10.0, (21 - 1.2) / 10),  # a 1.2-token bucket at this rate; the keeper ticks 50 ms
        (100.0, (21 - 3) / 100),  # a 3-token bucket; the keeper sleeps until the token, 10 ms
    ],
)
async def test_fixed_rate_limit_paces_through_the_token_bucket(rate: float, span: float) -> None:
    """`rate_limit=R`: 21 requests span (21 - bucket) / R s of the (fake) clock."""
    t = FakeTime()
    limiter = Limiter(4, send_rate=SendRate(rate, clock=t), sleep=t.sleep)
    starts: list[float] = []
    for _ in range(21):
        epoch = await limiter.acquire()
        starts.append(t.now)
        limiter.release(epoch)
    assert starts[-1] - starts[0] == pytest.approx(span)
    assert limiter.rate is not None and limiter.rate.rate == rate


async def test_waiting_for_the_rate_holds_no_slot() -> None:
    """A request waiting for a token holds no slot; the one holding a slot is unaffected."""
    t = FakeTime()
    gate = asyncio.Event()

    async def blocked_sleep(seconds: float) -> None:
        await gate.wait()
        await t.sleep(seconds)

    limiter = Limiter(1, send_rate=SendRate(1.0, clock=t), sleep=blocked_sleep)
    first = await limiter.acquire()  # the bucket's first token
    limiter.release(first)
    waiter = asyncio.ensure_future(limiter.acquire())  # no token left: sleeps for one
    await asyncio.sleep(0)
    assert limiter.in_flight == 0
    gate.set()
    epoch = await waiter
    assert limiter.in_flight == 1
    limiter.release(epoch)


async def test_cancel_while_waiting_for_the_rate_leaks_nothing() -> None:
    """A request cancelled during its rate wait leaves no slot taken and the next one goes."""
    t = FakeTime()
    limiter = Limiter(2, send_rate=SendRate(1.0, clock=t), sleep=t.sleep)
    limiter.release(await limiter.acquire())
    waiter = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.in_flight == 0
    epoch = await asyncio.wait_for(limiter.acquire(), 1)
    assert limiter.in_flight == 1
    limiter.release(epoch)
    await assert_no_stray_tasks()


async def test_throttled_release_lowers_a_learned_rate() -> None:
    """`release(throttled=True)` reaches the adaptive send rate; `overloaded` alone does not."""
    t = FakeTime()
    rate = SendRate(adaptive=True, clock=t)
    limiter = Limiter(4, send_rate=rate, sleep=t.sleep)
    for _ in range(10):
        t.now += 0.01
        limiter.release(await limiter.acquire(), ok=True)
    limiter.release(await limiter.acquire(), overloaded=True)  # a bare 503: not a throttle
    assert limiter.rate is rate and rate.rate is None
    limiter.release(await limiter.acquire(), overloaded=True, throttled=True)
    assert rate.decreases == 1
    assert rate.rate is not None
    assert limiter.limit == 4  # the concurrency bound stays where it was


async def test_backing_off_while_a_rate_is_in_force_or_slots_are_below_their_ceiling() -> None:
    """`backing_off` (no hedging then): a given rate, a learned one once throttled, adaptive
    slots halved until they are back at their ceiling; never a plain fixed bound."""
    assert not Limiter(4).backing_off
    assert Limiter(4, rate_limit=5.0).backing_off
    t = FakeTime()
    rate = SendRate(adaptive=True, clock=t)
    learned = Limiter(4, send_rate=rate, sleep=t.sleep)
    assert not learned.backing_off  # nothing learned yet
    learned.release(await learned.acquire(), overloaded=True, throttled=True)
    assert rate.rate is not None and learned.backing_off
    slots = Limiter(2, adaptive=True)
    assert not slots.backing_off
    slots.release(await slots.acquire(), overloaded=True)
    assert slots.limit == 1 and slots.backing_off
    while slots.limit < 2:
        slots.release(await slots.acquire(), ok=True)
    assert not slots.backing_off


def test_adaptive_rate_and_adaptive_concurrency_are_exclusive() -> None:
    """Learning the rate and AIMD on the concurrency at once is refused, as is a double rate."""
    with pytest.raises(ValueError, match="not both"):
        Limiter(4, adaptive=True, send_rate=SendRate(adaptive=True))
    with pytest.raises(ValueError, match="not both"):
        Limiter(4, rate_limit=5.0, send_rate=SendRate(5.0))


async def test_rate_grants_in_head_first_order() -> None:
    """Under a rate, each token goes to the lowest page waiting then, even one that came late."""
    t = FakeTime()
    gate = asyncio.Event()

    async def gated_sleep(seconds: float) -> None:
        await gate.wait()  # the keeper's first wait ends when the test says so
        await t.sleep(seconds)

    limiter = Limiter(8, send_rate=SendRate(10.0, clock=t), sleep=gated_sleep)
    limiter.release(await limiter.acquire("s", 0))  # the bucket's first token
    order: list[int] = []

    async def waiter(page: int) -> None:
        e = await limiter.acquire("s", page)
        order.append(page)
        limiter.release(e)

    tasks = [asyncio.ensure_future(waiter(p)) for p in (5, 6, 7)]
    await asyncio.sleep(0)
    tasks.append(asyncio.ensure_future(waiter(2)))  # a retry of the head page, during the wait
    await asyncio.sleep(0)
    assert limiter.waiting == 4 and limiter.in_flight == 0
    gate.set()
    await asyncio.gather(*tasks)
    assert order == [2, 5, 6, 7]


async def test_rate_serves_groups_in_turn() -> None:
    """Under a rate, two searches waiting for tokens take turns, each lowest page first."""
    t = FakeTime()
    gate = asyncio.Event()

    async def gated_sleep(seconds: float) -> None:
        await gate.wait()  # everyone is in line before the first token comes
        await t.sleep(seconds)

    limiter = Limiter(8, send_rate=SendRate(10.0, clock=t), sleep=gated_sleep)
    limiter.release(await limiter.acquire())  # the bucket's first token
    order: list[tuple[str, int]] = []

    async def waiter(group: str, page: int) -> None:
        e = await limiter.acquire(group, page)
        order.append((group, page))
        limiter.release(e)

    asks = [("a", 3), ("a", 1), ("a", 2), ("b", 9), ("b", 8)]
    tasks = [asyncio.ensure_future(waiter(g, p)) for g, p in asks]
    await asyncio.sleep(0)
    assert limiter.waiting == 5
    gate.set()
    await asyncio.gather(*tasks)
    assert order == [("a", 1), ("b", 8), ("a", 2), ("b", 9), ("a", 3)]
    assert t.now == pytest.approx(0.48)  # 4.8 tokens owed at 10/s: one per 0.1 s, no faster


async def test_cancelled_keeper_hands_the_wait_on() -> None:
    """The waiter keeping time for the next token is cancelled: another takes over, none lost."""
    t = FakeTime()
    gate = asyncio.Event()

    async def gated_sleep(seconds: float) -> None:
        await gate.wait()
        await t.sleep(seconds)

    limiter = Limiter(8, send_rate=SendRate(10.0, clock=t), sleep=gated_sleep)
    limiter.release(await limiter.acquire("s", 0))
    first = asyncio.ensure_future(limiter.acquire("s", 1))  # first in line: keeps time
    second = asyncio.ensure_future(limiter.acquire("s", 2))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    gate.set()
    epoch = await asyncio.wait_for(second, 1)
    assert limiter.in_flight == 1 and limiter.waiting == 0
    limiter.release(epoch)
    await assert_no_stray_tasks()


# -- pinned by mutation testing (scripts/mutation.py limiter) -------------------------------------


class HeldSleep:
    """An injected sleep that ends only when the test says so (`wake`): the keeper's wait, held."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self._pending: list[asyncio.Future[None]] = []

    async def sleep(self, seconds: float) -> None:
        self.calls.append(seconds)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(fut)
        await fut

    def wake(self) -> None:
        """End every sleep begun so far."""
        for fut in self._pending:
            if not fut.done():
                fut.set_result(None)
        self._pending.clear()


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_fresh_limiter_stats_and_repr() -> None:
    """A new limiter shows 0 in flight, peak, waiting; its repr names in_flight and limit/max."""
    limiter = Limiter(8, adaptive=True)
    assert (limiter.in_flight, limiter.peak, limiter.waiting, limiter.decreases) == (0, 0, 0, 0)
    assert repr(limiter) == "<Limiter in_flight=0 limit=8/8>"
    epoch = await limiter.acquire()
    limiter.release(await limiter.acquire(), overloaded=True)
    assert repr(limiter) == "<Limiter in_flight=1 limit=4/8>"
    limiter.release(epoch)


@pytest.mark.parametrize(("limit", "min_limit", "floor"), [(8, 2, 2), (8, 0, 1), (2, 5, 2)])
async def test_min_limit_is_the_floor_of_halvings(limit: int, min_limit: int, floor: int) -> None:
    """Halvings stop at min_limit, itself kept within 1..limit (0 would stall every request)."""
    limiter = Limiter(limit, adaptive=True, min_limit=min_limit)
    assert limiter.slots.min_limit == floor
    for _ in range(6):
        limiter.release(await limiter.acquire(), overloaded=True)
    assert limiter.limit == floor
    assert limiter.decreases == 6


async def test_one_success_from_the_floor_of_one_gives_two_slots() -> None:
    """At the floor of 1 slot (halved past it), the next success adds a whole slot: limit 2."""
    limiter = Limiter(8, adaptive=True)
    for _ in range(5):  # 8 -> 4 -> 2 -> 1 -> 1 -> 1
        limiter.release(await limiter.acquire(), overloaded=True)
    assert limiter.limit == 1
    limiter.release(await limiter.acquire(), ok=True)
    assert limiter.limit == 2


async def test_additive_increase_is_one_slot_per_window_of_successes() -> None:
    """From 4, each success adds 1/window (4.25, 4.49, 4.71, 4.92): the fifth one makes 5."""
    limiter = Limiter(8, adaptive=True)
    limiter.release(await limiter.acquire(), overloaded=True)
    assert limiter.limit == 4
    for _ in range(4):
        limiter.release(await limiter.acquire(), ok=True)
    assert limiter.limit == 4
    limiter.release(await limiter.acquire(), ok=True)
    assert limiter.limit == 5


async def test_release_without_ok_never_grows_the_limit() -> None:
    """A plain release (a 5xx, no answer: ok defaults to False) leaves a halved limit as it is."""
    limiter = Limiter(8, adaptive=True)
    limiter.release(await limiter.acquire(), overloaded=True)
    for _ in range(20):
        limiter.release(await limiter.acquire())
    assert limiter.limit == 4


async def test_waiter_granted_after_a_decrease_can_decrease_again() -> None:
    """A request queued and granted after a halving carries the new epoch: its overload counts."""
    limiter = Limiter(2, adaptive=True)
    first, second = await limiter.acquire(), await limiter.acquire()
    limiter.release(first, overloaded=True)  # limit 1, one still in flight
    waiter = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0)
    assert limiter.waiting == 1
    limiter.release(second)
    ticket = await waiter
    limiter.release(ticket, overloaded=True)
    assert limiter.decreases == 2


def test_rate_limit_builds_a_fixed_send_rate() -> None:
    """`rate_limit=5.0` gives the limiter a fixed (not learned) send rate of 5 requests/s."""
    limiter = Limiter(4, rate_limit=5.0)
    assert limiter.rate is not None
    assert limiter.rate.rate == 5.0
    assert not limiter.rate.adaptive


async def test_release_tells_a_learned_rate_only_what_was_accepted() -> None:
    """ok=True counts as accepted for the learned rate; a plain release (5xx) counts as nothing."""
    t = FakeTime()
    rate = SendRate(adaptive=True, clock=t)
    limiter = Limiter(4, send_rate=rate, sleep=t.sleep)
    for _ in range(3):
        t.now += 0.1
        limiter.release(await limiter.acquire())
    assert rate.accepted.rate(t.now) == 0.0
    for _ in range(3):
        t.now += 0.1
        limiter.release(await limiter.acquire(), ok=True)
    assert rate.accepted.rate(t.now) > 0.0


async def test_token_freed_during_the_wait_goes_to_the_head_not_a_newcomer() -> None:
    """A token due while the keeper sleeps goes to the lowest page queued, not to a newcomer."""
    t = FakeTime()
    held = HeldSleep()
    limiter = Limiter(8, send_rate=SendRate(10.0, clock=t), sleep=held.sleep)
    limiter.release(await limiter.acquire("s", 0))  # the bucket's first token
    order: list[int] = []

    async def waiter(page: int) -> None:
        e = await limiter.acquire("s", page)
        order.append(page)
        limiter.release(e)

    head = asyncio.ensure_future(waiter(5))
    await _turns()
    assert len(held.calls) == 1  # page 5 keeps time for the next token
    t.now += 1.0  # the token is due, the keeper has not woken yet
    late = asyncio.ensure_future(waiter(9))
    await _turns()
    assert limiter.in_flight == 1  # page 5, granted at the newcomer's arrival, still asleep
    assert not late.done()  # page 9 waits for the next token
    held.wake()
    await _turns()
    t.now += 1.0
    held.wake()
    await asyncio.gather(head, late)
    assert order == [5, 9]


async def test_keeper_granted_before_it_sleeps_hands_the_wait_on() -> None:
    """A waiter made keeper, then granted before it ran, makes the next in line keep time."""
    t = FakeTime()
    held = HeldSleep()
    limiter = Limiter(8, send_rate=SendRate(10.0, clock=t), sleep=held.sleep)
    slot = await limiter.acquire("s", 0)  # the bucket's first token, held
    a, b, c = (asyncio.ensure_future(limiter.acquire("s", p)) for p in (1, 2, 3))
    await _turns()
    assert len(held.calls) == 1  # a keeps time
    a.cancel()
    await asyncio.sleep(0)  # a's handler makes b the keeper; b has not run yet
    assert a.cancelled() and not b.done()
    t.now += 1.0
    limiter.release(slot)  # a token is due: b, first in line, is granted before it sleeps
    await _turns()
    assert b.done() and limiter.in_flight == 1
    assert len(held.calls) == 2  # c keeps time now
    t.now += 1.0
    held.wake()
    await _turns()
    assert c.done() and limiter.in_flight == 2
    limiter.release(b.result())
    limiter.release(c.result())
    assert limiter.waiting == 0 and limiter.in_flight == 0


# -- the order between searches: fewest pages left first, aging, priority (issue 26) ---------


class Rounds:
    """A fake server answering every request granted in a round at the round's end.

    Time goes in rounds of one latency L, driven by the test (`tick`): no wall time.
    """

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter
        self.round = 0
        self._end: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.grants: list[tuple[str, int, int]] = []  # (search, page, round granted)

    async def request(self, name: str, flow: Flow[Any], page: int) -> None:
        ticket = await self.limiter.acquire(flow, page)
        try:
            self.grants.append((name, page, self.round))
            await self._end
        finally:
            self.limiter.release(ticket, ok=True)

    async def at(self, round_: int) -> None:
        while self.round < round_:
            await self._end

    async def tick(self) -> None:
        """Let everything queue, then answer the round's requests (their slots go on at once)."""
        await _turns(30)
        end, self._end = self._end, asyncio.get_running_loop().create_future()
        self.round += 1
        end.set_result(None)
        await _turns(30)

    async def search(
        self,
        name: str,
        pages: int,
        *,
        start: int = 0,
        window: int = 16,
        priority: Priority = "interactive",
    ) -> int:
        """As the paging engine does: page 1 alone, its total sizes the search, then the
        rest within `window`; returns the round the search ended in."""
        await self.at(start)
        flow = self.limiter.flow(priority)
        await self.request(name, flow, 1)
        flow.ends_at(pages)  # the first page's total: that many pages
        ahead = asyncio.Semaphore(window)

        async def page(n: int) -> None:
            async with ahead:
                await self.request(name, flow, n)

        await asyncio.gather(*(page(n) for n in range(2, pages + 1)))
        return self.round

    async def run(self, searches: list[Coroutine[Any, Any, int]], rounds: int = 400) -> list[int]:
        """Each search's last round, once all are done."""
        tasks = [asyncio.ensure_future(s) for s in searches]
        for _ in range(rounds):
            if all(t.done() for t in tasks):
                break
            await self.tick()
        assert all(t.done() for t in tasks), "searches left unfinished"
        assert self.limiter.in_flight == 0 and self.limiter.waiting == 0
        return [t.result() for t in tasks]


async def test_equal_searches_finish_one_after_the_other() -> None:
    """Sized searches of equal length, all pages waiting: each is served to its end before
    the next starts (round-robin served them a page each, so they all ended together)."""
    limiter = Limiter(1)
    flows = [limiter.flow(cap=3) for _ in range(3)]
    asks: list[tuple[object, float | None]] = [
        (flows[i], page) for page in (1, 2, 3) for i in range(3)
    ]
    order = await _grant_order(limiter, asks)
    assert [asks[i] for i in order] == [(f, page) for f in flows for page in (1, 2, 3)]


async def test_equal_searches_through_a_fake_server_end_in_turn() -> None:
    """12 searches of 3 pages on 4 slots, page 1 alone then the rest: they end in the order
    they came, the median by round 6 of 9 (a page each in turn: every one near round 9)."""
    limiter = Limiter(4)
    rounds = Rounds(limiter)
    ends = await rounds.run([rounds.search(f"s{i}", 3) for i in range(12)])
    assert ends == sorted(ends)
    assert statistics.median(ends) <= 6
    assert max(ends) <= 10  # 36 pages on 4 slots: 9 rounds at best, one slot idle at most


async def test_small_searches_beside_a_big_one_finish_first() -> None:
    """8 small searches arriving beside a big one (sized: 60 pages) end within a few rounds,
    in turn, well before it; the big one still ends as early as the slots allow."""
    limiter = Limiter(4)
    rounds = Rounds(limiter)
    smalls = [rounds.search(f"s{i}", 3, start=2) for i in range(8)]
    big, *ends = await rounds.run([rounds.search("big", 60), *smalls])
    assert statistics.median(ends) <= 2 + 5  # round-robin with the big one: round 2 + 10
    assert max(ends) <= 2 + 9
    assert big >= max(ends)
    assert big <= (60 + 24) // 4 + 2  # every slot busy: the work of all, in rounds, and a little


async def test_a_big_search_keeps_its_share_beside_a_stream_of_small_ones() -> None:
    """A stream of small searches (3 new ones each round, 9 pages for 4 slots) beside a big one:
    the big one still gets at least 1 grant in `SHARE` while it waits, never starved."""
    limiter = Limiter(4)
    rounds = Rounds(limiter)
    big = asyncio.ensure_future(rounds.search("big", 200))
    stream = [
        asyncio.ensure_future(rounds.search(f"s{r}.{i}", 3, start=r))
        for r in range(1, 41)
        for i in range(3)
    ]
    for _ in range(40):
        await rounds.tick()
    granted = [name for name, _, r in rounds.grants if 1 <= r <= 40]
    assert len(granted) == 40 * 4  # every slot busy every round
    assert granted.count("big") >= len(granted) // SHARE
    assert limiter.sched.aged >= 40 * 4 // SHARE - 1
    for t in [big, *stream]:
        t.cancel()
    await asyncio.gather(big, *stream, return_exceptions=True)
    assert limiter.in_flight == 0 and limiter.waiting == 0


async def test_background_yields_to_interactive_but_ages() -> None:
    """A background search (shorter) waits behind an interactive one, but for one grant in
    `SHARE`: the aging turn goes to the search served last, the background one."""
    limiter = Limiter(1)
    background = limiter.flow("background", cap=5)
    interactive = limiter.flow(cap=40)
    asks: list[tuple[object, float | None]] = [
        *((background, page) for page in range(1, 6)),
        *((interactive, page) for page in range(1, 41)),
    ]
    order = await _grant_order(limiter, asks)
    kinds = ["b" if asks[i][0] is background else "i" for i in order]
    assert kinds[: 2 * SHARE] == (["i"] * (SHARE - 1) + ["b"]) * 2
    assert kinds.count("b") == 5


async def test_a_search_not_sized_yet_waits_behind_started_ones_but_not_a_long_one() -> None:
    """A new search is ranked as the typical one (median size, capped at the concurrency):
    behind a search with fewer pages left, before one with more."""
    limiter = Limiter(1)
    for _ in range(3):
        limiter.flow(cap=3)  # three searches of 3 pages sized: typical 3
    started, fresh, long = limiter.flow(cap=3), limiter.flow(), limiter.flow(cap=50)
    assert limiter.sched.typical == 1  # capped at the concurrency
    limiter.sched.horizon = None
    limiter.sched.flow(cap=3)
    assert limiter.sched.typical == 3
    limiter.sched.granted(started)  # its page 1 went: 2 left
    asks: list[tuple[object, float | None]] = [(long, 2), (fresh, 1), (started, 2)]
    assert await _grant_order(limiter, asks) == [2, 1, 0]


async def test_searches_not_sized_are_served_least_served_first() -> None:
    """Before any search is sized, the one that has had fewest requests goes first."""
    limiter = Limiter(1)
    a, b = limiter.flow(), limiter.flow()
    for _ in range(3):
        limiter.sched.granted(a)
    asks: list[tuple[object, float | None]] = [(a, 4), (a, 5), (b, 1), (b, 2), (b, 3), (b, 4)]
    assert await _grant_order(limiter, asks) == [2, 3, 4, 0, 5, 1]


def test_scheduler_typical_size_is_the_capped_median_of_recent_sizes() -> None:
    """The rank of a new search: the median of the sizes seen, at most the horizon."""
    sched: Scheduler[int] = Scheduler(horizon=16)
    for pages in (3, 200, 3, 5):
        sched.flow().ends_at(pages)
    assert sched.typical == 3
    for _ in range(5):
        sched.flow(cap=100)
    assert sched.typical == 16
    flow = sched.flow(first=11, cap=5)
    flow.ends_at(12)  # pages 11 and 12
    assert (flow.pages, flow.left) == (2, 2)
    flow.ends_at(40)  # more, but the cap stays
    assert flow.pages == 5


def test_scheduler_priority_is_checked() -> None:
    """Only "interactive" and "background" are priorities."""
    with pytest.raises(ValueError, match="priority"):
        Scheduler[int]().flow("urgent")  # type: ignore[arg-type]


def test_slots_alone_bound_and_adapt() -> None:
    """`Slots` without a limiter: free until the limit, AIMD halving once per epoch."""
    slots = Slots(4, adaptive=True)
    epochs = [slots.take() for _ in range(4)]
    assert not slots.free() and slots.peak == 4
    for epoch in epochs:
        slots.release(epoch, overloaded=True)
    assert (slots.limit, slots.decreases, slots.in_flight) == (2, 1, 0)
    assert repr(slots) == "<Slots in_flight=0 limit=2/4>"
    for _ in range(5):
        slots.release(slots.take())  # neither overloaded nor ok (a 5xx): no change
    assert slots.limit == 2
    for _ in range(3):
        slots.release(slots.take(), overloaded=True)
    assert slots.limit == 1  # the default floor


def test_fixed_slots_are_the_default_and_ignore_feedback() -> None:
    """`Slots(n)` is fixed: overloads and successes leave the limit at n."""
    slots = Slots(3)
    slots.release(slots.take(), overloaded=True)
    slots.release(slots.take(), ok=True)
    assert (slots.limit, slots.decreases) == (3, 0)


async def test_rate_gate_alone_keeper_and_feedback() -> None:
    """`RateGate`: one keeper at a time, told to sleep at most MAX_KEEP; feedback needs both a
    rate and a ticket; without a rate, a token is always there."""
    loop = asyncio.get_running_loop()
    assert RateGate(None).delay() <= 0
    RateGate(None).feedback(1, throttled=True, ok=False)  # no rate: nothing to tell
    duck = DuckRate()
    gate = RateGate(duck)
    gate.feedback(None, throttled=True, ok=False)  # no ticket: nothing to tell
    assert duck.feedbacks == []
    first, second = Waiter(loop.create_future()), Waiter(loop.create_future())
    gate.appoint(first, 1.0)
    gate.appoint(second, 1.0)
    assert gate.keeper is first and first.fut.result() == MAX_KEEP
    assert not second.fut.done()
    assert not gate.relieve(second)
    assert gate.relieve(first) and gate.keeper is None


class DuckRate:
    """A send rate that is not a `SendRate` (as a shared one would be): the protocol alone."""

    adaptive = True

    def __init__(self) -> None:
        self.tokens = 1
        self.feedbacks: list[tuple[int, bool, bool]] = []
        self._seq = 0

    @property
    def rate(self) -> float | None:
        return 10.0

    def delay(self) -> float:
        if self.tokens > 0:
            self.tokens -= 1
            return 0.0
        return 0.1

    def sent(self) -> int:
        self._seq += 1
        return self._seq

    def feedback(self, ticket: int, *, throttled: bool, ok: bool) -> None:
        self.feedbacks.append((ticket, throttled, ok))


async def test_any_send_rate_like_object_gates_the_limiter() -> None:
    """A duck-typed rate plugs in: its token gates a grant, its ticket comes back with feedback."""
    t = FakeTime()
    duck = DuckRate()
    rate: SendRateLike = duck  # type-checks against the protocol
    limiter = Limiter(4, send_rate=rate, sleep=t.sleep)
    first = await limiter.acquire()
    waiter = asyncio.ensure_future(limiter.acquire())
    await _turns()
    assert not waiter.done() and limiter.in_flight == 1  # no token: no slot taken
    duck.tokens = 1
    await _turns()
    second = await asyncio.wait_for(waiter, 1)
    limiter.release(first, ok=True)
    limiter.release(second, overloaded=True, ok=True, throttled=True)
    assert duck.feedbacks == [(1, False, True), (2, True, False)]
    assert (first.sent, second.sent) == (1, 2)


# -- the scheduler alone (pinned by mutation testing: scripts/mutation.py sched) -------------


def test_flow_sizes_from_its_first_page_and_cap() -> None:
    """A flow's size: pages from its first (1 by default) to the last, at least 1, within its cap;
    pages left never below 0 (retries and hedges are granted too)."""
    sched: Scheduler[int] = Scheduler()
    flow = sched.flow()
    assert (flow.pages, flow.left, flow.background) == (None, None, False)
    flow.ends_at(3)
    assert (flow.pages, flow.left) == (3, 3)
    for _ in range(5):
        sched.granted(flow)
    assert flow.left == 0
    empty = sched.flow()
    empty.ends_at(0)  # a total of 0: the first page only
    assert empty.pages == 1
    assert sched.flow(cap=0).pages == 1
    background = sched.flow("background")
    assert background.background
    assert repr(background) == "<Flow background pages=None granted=0 waiting=0>"
    assert repr(flow) == "<Flow interactive pages=3 granted=5 waiting=0>"


def test_scheduler_arguments_and_empty_pop() -> None:
    """share below 2 is refused (every grant would be the aging turn); nothing to pop raises."""
    with pytest.raises(ValueError, match="share must be at least 2"):
        Scheduler[int](share=1)
    sched: Scheduler[int] = Scheduler(share=2)
    with pytest.raises(IndexError, match="nothing waits"):
        sched.pop()


def test_scheduler_remove_says_whether_it_was_there() -> None:
    """`remove` takes a queued item out (True) and knows one already popped (False)."""
    sched: Scheduler[str] = Scheduler()
    flow = sched.flow()
    _, a = sched.push(flow, 1, "a")
    _, b = sched.push(flow, 2, "b")
    assert sched.remove(flow, b) and len(sched) == 1
    assert sched.pop() == "a"
    assert not sched.remove(flow, a) and not sched


def test_over_granted_search_goes_before_one_with_a_page_left() -> None:
    """Pages left are never negative: a search granted past its size (a retry) ranks at 0,
    before an earlier search with 1 left."""
    sched: Scheduler[str] = Scheduler()
    one, over = sched.flow(cap=2), sched.flow(cap=1)
    sched.granted(one)
    for _ in range(3):
        sched.granted(over)
    sched.push(one, 2, "one")
    sched.push(over, 1, "over")
    assert sched.pop() == "over"


def test_nothing_sized_means_the_least_served_first() -> None:
    """Before any size is known the typical size is 0: 0 requests had beats 1."""
    sched: Scheduler[str] = Scheduler()
    a, b = sched.flow(), sched.flow()
    sched.granted(a)
    sched.push(a, 2, "a")
    sched.push(b, 1, "b")
    assert sched.pop() == "b"


def test_typical_size_forgets_old_searches() -> None:
    """The typical size is the median of the last `TYPICAL_OF` sizes, not of all."""
    assert TYPICAL_OF == 64  # README, "Choices"
    sched: Scheduler[int] = Scheduler()
    for _ in range(TYPICAL_OF):
        sched.flow(cap=2)
    for _ in range(TYPICAL_OF):
        sched.flow(cap=100)
    assert sched.typical == 100


def test_aging_turn_counts_only_grants_with_several_searches_waiting() -> None:
    """Grants to a search alone do not bring the aging turn nearer; with two waiting, the
    `SHARE`-th grant goes to the search served last, counted once in `aged`."""
    assert SHARE == 16  # the share documented in README, "Choices"
    sched: Scheduler[str] = Scheduler()
    alone = sched.flow()
    for i in range(SHARE - 1):
        sched.push(alone, i, "alone")
    assert [sched.pop() for _ in range(SHARE - 1)] == ["alone"] * (SHARE - 1)
    short, long = sched.flow(cap=50), sched.flow(cap=100)
    for i in range(SHARE):
        sched.push(short, i, "short")
        sched.push(long, i, "long")
    got = [sched.pop() for _ in range(SHARE)]
    assert got == ["short"] * (SHARE - 1) + ["long"]
    assert sched.aged == 1


async def test_limiter_flows_tickets_and_peak() -> None:
    """`Limiter.flow` passes its first page and cap on; a ticket shows both parts; `peak` can
    be reset between runs (as the cancellation tests do)."""
    limiter = Limiter(2)
    default, later = limiter.flow(), limiter.flow(first=11)
    default.ends_at(3)
    later.ends_at(12)
    assert (default.pages, later.pages) == (3, 2)
    bare = Flow(limiter.sched, 0)  # a flow's own defaults: interactive, from page 1
    bare.ends_at(2)
    assert (bare.background, bare.pages) == (False, 2)
    ticket = await limiter.acquire(default, 1)
    assert repr(ticket) == "Ticket(epoch=0, sent=None)"
    limiter.release(ticket)
    assert limiter.peak == 1
    limiter.peak = 0
    assert limiter.peak == 0
