"""Closing a client that shares a rate store: its background task ends, whatever it was doing.

Issue #20's "stall": clients on a live store hung now and then, in `close()`.
`FleetRate.aclose()` cancels the background task that talks to the store, and
before Python 3.12 `asyncio.wait_for` loses a cancellation that comes just as
what it waits for is done (CPython gh-86296): the task went on polling the
store, and `aclose()` waited for it forever. With no rate in force it polls
every `SYNC_UNBOUNDED` (20 ms), so that is where it was met most.

A fake store here (no redis-server) answers at once, so each test can put the
cancellation exactly there: on the loop, after the store's answer (or a
wake-up) is in, before the task has read it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from imichat_async import _ratestore as ratestore
from imichat_async._ratescripts import DECREASE, LEASE, THROTTLE
from imichat_async._ratestore import FleetRate, RedisRateStore

#: The state at the head of every reply: Redis' time, then no rate, no curve, no estimate.
STATE = ["100.0", "0", "0", "0", "0", "0", "0", "0", "0", "0"]
REPLIES = {
    # ok rate, sent rate, retry, grant, members, no slow start (a lone client sends at once)
    LEASE: [*STATE, "0", "0", "0", "1", "1", "0"],
    THROTTLE: [*STATE, "0", "0", "-1", "0", "-1", "0"],  # offered, stale, two measures
    DECREASE: ["1", *STATE],
}
GUARD = 10.0  # seconds: only so that the test fails instead of hanging, never a measure


class FakeRedis:
    """What `FleetRate` uses of redis-py's client: scripts that answer at once."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store

    def register_script(self, script: str) -> Any:
        async def call(keys: list[str], args: list[Any]) -> list[str]:
            self.store.calls += 1
            self.store.called.set()
            return REPLIES[script]

        return call

    async def aclose(self) -> None:
        pass


class FakeStore(RedisRateStore):
    """A store whose connection is a `FakeRedis`; counts the script calls."""

    def __init__(self) -> None:
        super().__init__("redis://127.0.0.1:1/0")
        self.calls = 0
        self.called = asyncio.Event()

    def connect(self) -> Any:
        return FakeRedis(self)


async def closed_within_guard(rate: FleetRate) -> bool:
    """`rate.aclose()` in a task of its own; True if it returned (within `GUARD`)."""
    task = rate._task
    assert task is not None
    closing = asyncio.ensure_future(rate.aclose())
    try:
        done, _ = await asyncio.wait({closing}, timeout=GUARD)
        return closing in done
    finally:
        for t in (closing, task):  # a hung close: end it, leave nothing on the loop
            t.cancel()
        await asyncio.wait({closing, task}, timeout=GUARD)


async def test_close_as_the_stores_answer_comes_in_ends_the_task() -> None:
    """The store's answer is in, the task has not read it yet: `aclose()` ends it anyway."""
    store = FakeStore()
    rate = FleetRate(store, "k", adaptive=True)
    assert rate.delay() == ratestore.QUICK_POLL  # starts the task; waits for the store's answer
    await store.called.wait()  # its first lease has just been answered
    calls = store.calls
    assert await closed_within_guard(rate), "aclose() never returned: the task lived on"
    assert store.calls == calls  # not one call to the store after the close
    assert rate._task is None


async def test_close_as_a_throttle_wakes_the_task_ends_it() -> None:
    """A throttle wakes the task to report it, and the client closes in the same step."""
    store = FakeStore()
    rate = FleetRate(store, "k", adaptive=True)
    assert rate.delay() == ratestore.QUICK_POLL
    for _ in range(100):  # until the first answer is read: the task waits for a wake-up
        if rate.shared:
            break
        await asyncio.sleep(0)
    assert rate.shared
    assert rate.delay() == 0.0  # no rate in force, no slow start: send now
    calls = store.calls
    rate.feedback(rate.sent(), throttled=True, ok=False)  # wakes the task (to report it)
    assert await closed_within_guard(rate), "aclose() never returned: the task lived on"
    assert store.calls == calls  # the throttle is not reported after the close


async def test_within_times_out_and_ends_what_it_waited_for() -> None:
    """The store's timeout (the fallback's trigger): TimeoutError, and the call is over."""
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    try:
        await ratestore._within(never, 0.01)
    except asyncio.TimeoutError:
        pass
    else:
        raise AssertionError("no TimeoutError")
    assert never.cancelled()
    assert await ratestore._within(asyncio.sleep(0, "answer"), GUARD) == "answer"


async def test_within_never_loses_a_cancellation_that_comes_as_it_is_done() -> None:
    """`asyncio.wait_for` (Python < 3.12) returns the result here and the caller goes on."""
    done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    went_on = []

    async def waiting() -> None:
        await ratestore._within(done, GUARD)
        went_on.append(True)

    task = asyncio.ensure_future(waiting())
    await asyncio.sleep(0)  # it waits on `done`
    done.set_result("answer")
    task.cancel()  # in the same step: the answer is in, the task has not read it
    await asyncio.wait({task}, timeout=GUARD)
    assert task.cancelled() and not went_on
