"""The engine with the client-wide limiter: two bounds, head first, hedging, cleanup.

A fake fetcher (no HTTP) takes a real `Limiter` slot per attempt, ranked by
page, as the client does. Time is the event loop's clock, replaced by a
virtual one the test moves (`VirtualClock`): no wall time is asserted or
slept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from contextlib import aclosing
from typing import Any

import pytest

import imichat_async as imi
from imichat_async import _protocol as protocol
from imichat_async._limiter import Limiter
from imichat_async._paging import (
    Hedger,
    Page,
    PagingStats,
    _Alarm,
    hedge_lost,
    iterate_pages,
)
from imichat_async._transport import RawResponse
from tests.helpers import assert_no_stray_tasks

PAGE_SIZE = 10
#: The wire's end-of-data rule, as the client gives it to the engine.
RULE: dict[str, Any] = {"last_page": protocol.last_page, "ends": protocol.ends_search}


class VirtualClock:
    """The running loop's `time()`, moved only by `advance`; timers fire when it passes them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr(asyncio.get_running_loop(), "time", lambda: self.now)

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        await spin()


async def spin(turns: int = 30) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


class Fetcher:
    """Pages of consecutive ints; each attempt holds a limiter slot ranked by its page number.

    `hold` pages wait for `release(n)` on their first attempt; `fail_once` pages fail their
    first attempt and retry at once (as a transient error with `Retry-After: 0` does).
    """

    def __init__(
        self,
        n_items: int,
        limiter: Limiter,
        *,
        hold: set[int] | None = None,
        fail_once: set[int] | None = None,
        total: bool = False,
    ) -> None:
        self.n_items = n_items
        self.limiter = limiter
        self.hold = hold or set()
        self.fail_once = fail_once or set()
        self.total = total
        self.gates: dict[int, asyncio.Event] = {}
        self.attempts: Counter[int] = Counter()
        self.granted: list[int] = []  # pages, in the order they got a slot
        self.events: list[tuple[str, int]] = []  # ("ask", page) and ("grant", page)
        self.busy_at_release: list[tuple[int, int]] = []  # (in flight, waiting) after each
        self.cancelled: list[int] = []
        self.hedge_lost: list[bool] = []  # per cancellation: a hedge race's loser?
        self.answered: list[int] = []

    def release(self, *pages: int) -> None:
        for n in pages:
            self.gates.setdefault(n, asyncio.Event()).set()

    async def fetch(self, n: int) -> Page[int]:
        while True:
            self.attempts[n] += 1
            attempt = self.attempts[n]
            self.events.append(("ask", n))
            epoch = await self.limiter.acquire("search", n)
            self.events.append(("grant", n))
            self.granted.append(n)
            try:
                if n in self.hold and attempt == 1:
                    await self.gates.setdefault(n, asyncio.Event()).wait()
                else:
                    await asyncio.sleep(0)
                if n in self.fail_once and attempt == 1:
                    continue  # a transient failure, retried at once
                start = (n - 1) * PAGE_SIZE
                items = list(range(start, min(start + PAGE_SIZE, self.n_items)))
                self.answered.append(n)
                return Page(n, items, self.n_items if self.total else None)
            except asyncio.CancelledError as exc:
                self.cancelled.append(n)
                self.hedge_lost.append(hedge_lost(exc))
                raise
            finally:
                self.limiter.release(epoch)
                self.busy_at_release.append((self.limiter.in_flight, self.limiter.waiting))


def run(fetcher: Fetcher, prefetch: int, stats: PagingStats, **kw: Any) -> Any:
    return iterate_pages(fetcher.fetch, **RULE, prefetch=prefetch, stats=stats, **kw)


async def test_slow_head_keeps_every_slot_busy_within_the_window() -> None:
    """A stalled head: later pages keep `concurrency` requests busy, held pages stay <= prefetch."""
    limiter = Limiter(4)
    fetcher = Fetcher(400, limiter, hold={2})
    stats = PagingStats()
    got: list[int] = []
    async with aclosing(run(fetcher, 12, stats)) as it:
        got.append((await anext(it)).number)
        nxt = asyncio.ensure_future(anext(it))
        await spin(100)
        assert not nxt.done()
        # Page 1 consumed; pages 2..13 (12 = prefetch) launched; all but the head answered.
        assert sorted(set(fetcher.granted)) == list(range(1, 14))
        assert sorted(fetcher.answered) == [1, *range(3, 14)]
        # Whenever a page was still waiting for a slot, all 4 slots were busy.
        assert all(busy == 4 for busy, waiting in fetcher.busy_at_release if waiting)
        assert sum(1 for _, waiting in fetcher.busy_at_release if waiting) >= 5
        fetcher.release(2)
        got.append((await nxt).number)
        async for page in it:
            # Pages launched and not consumed, this one included, never exceed prefetch.
            assert max(fetcher.granted) - page.number + 1 <= 12
            got.append(page.number)
    assert got == list(range(1, 41))
    assert limiter.peak == 4
    assert stats.pages_yielded == 40
    assert stats.items_yielded == 400
    await assert_no_stray_tasks()


async def test_retry_of_the_head_gets_the_next_slot() -> None:
    """A failed head page is retried before any later page waiting for a slot."""
    limiter = Limiter(1)
    fetcher = Fetcher(200, limiter, fail_once={2})
    stats = PagingStats()
    async with aclosing(run(fetcher, 8, stats)) as it:
        got = [p.number async for p in it]
    assert got == list(range(1, 21))
    # Page 2 fails; its slot goes to page 3 (waiting, the retry not yet asked); then the
    # retry goes before pages 4..8, which had been waiting longer.
    assert fetcher.granted[:5] == [1, 2, 3, 2, 4]
    assert fetcher.attempts[2] == 2


def hedger(delay: float = 0.5) -> Hedger:
    h = Hedger(floor=delay, min_samples=1)
    h.record(0.001)
    return h


async def test_hedge_only_past_the_delay_and_the_loser_is_cancelled(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No duplicate before the head is overdue; one at the delay; the first answer wins, once."""
    caplog.set_level(logging.DEBUG, logger="imichat_async")
    clock = VirtualClock(monkeypatch)
    limiter = Limiter(4)
    fetcher = Fetcher(300, limiter, hold={2})
    stats = PagingStats()
    sent: list[int] = []
    h = Hedger(floor=0.5, min_samples=1, on_sent=lambda: sent.append(stats.hedges))
    h.record(0.001)
    got: list[int] = []
    items: list[int] = []
    async with aclosing(run(fetcher, 8, stats, hedger=h)) as it:
        page = await anext(it)
        got.append(page.number)
        items.extend(page.items)
        nxt = asyncio.ensure_future(anext(it))
        await spin()
        await clock.advance(0.25)
        assert fetcher.attempts[2] == 1 and stats.hedges == 0  # not overdue yet
        await clock.advance(0.25)
        assert stats.hedges == 1  # overdue at exactly the delay: one duplicate, answered at once
        assert sent == [1]  # the hedger was told (the client counts hedges from it)
        assert [r.getMessage() for r in caplog.records if r.name == "imichat_async"] == [
            "page 2: overdue, hedged with a duplicate request"
        ]
        page = await nxt
        assert (page.number, stats.hedges_won) == (2, 1)
        assert fetcher.attempts[2] == 2
        await spin()
        assert fetcher.cancelled == [2]  # the original, still held, lost and was cancelled
        assert fetcher.hedge_lost == [True]  # told so: it may finish a request on the wire
        got.append(page.number)
        items.extend(page.items)
        async for page in it:
            got.append(page.number)
            items.extend(page.items)
    assert got == list(range(1, 31))
    assert items == list(range(300))  # nothing duplicated, nothing dropped
    assert stats.hedges == 1
    await assert_no_stray_tasks()


async def test_hedges_stay_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every head overdue: duplicates never exceed 5 % of the pages requested (at least 1)."""
    clock = VirtualClock(monkeypatch)
    limiter = Limiter(4)
    slow = set(range(2, 201, 10))
    fetcher = Fetcher(2000, limiter, hold=slow)
    stats = PagingStats()
    items: list[int] = []
    seen_budget: list[bool] = []

    async def consume() -> None:
        async with aclosing(run(fetcher, 8, stats, hedger=hedger(0.5))) as it:
            async for page in it:
                seen_budget.append(stats.hedges <= max(1, int(0.05 * stats.pages_requested)))
                items.extend(page.items)

    task = asyncio.ensure_future(consume())
    for n in sorted(slow):  # each slow page is overdue a second before its original answers
        await clock.advance(1.0)
        fetcher.release(n)
        await spin()
    while not task.done():
        await clock.advance(1.0)
    await task
    assert items == list(range(2000))
    assert all(seen_budget)
    assert 2 <= stats.hedges <= 200 // 20
    assert stats.hedges_won == stats.hedges
    await assert_no_stray_tasks()


async def test_no_hedge_just_after_overload(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a 429/503 no duplicate; the overdue head is looked at again every half delay."""
    clock = VirtualClock(monkeypatch)
    limiter = Limiter(4)
    fetcher = Fetcher(100, limiter, hold={2})
    stats = PagingStats()
    h = Hedger(floor=0.5, min_samples=1, clock=lambda: clock.now)
    h.record(0.001)
    async with aclosing(run(fetcher, 8, stats, hedger=h)) as it:
        await anext(it)
        nxt = asyncio.ensure_future(anext(it))
        await spin()
        await clock.advance(0.25)
        h.overloaded()  # quiet until +0.75
        await clock.advance(0.375)  # +0.625: head overdue, but quiet; next look at +0.875
        assert stats.hedges == 0
        await clock.advance(0.1875)  # +0.8125: quiet time over, not looked at yet
        assert stats.hedges == 0
        await clock.advance(0.0625)  # +0.875: half a delay after the last look
        assert stats.hedges == 1
        assert (await nxt).number == 2
    await assert_no_stray_tasks()


def test_hedger_delay_is_twice_the_p95_with_a_floor() -> None:
    """Delay: none before 20 answers, then 2 x p95 of the recent ones, never below the floor."""
    now = [0.0]
    off = [False]
    h = Hedger(clock=lambda: now[0], backing_off=lambda: off[0])
    for _ in range(19):
        h.record(0.010)
    assert h.delay() is None
    h.record(0.010)
    assert h.delay() == pytest.approx(0.1)  # 20 answers: known (the floor, 2 x 10 ms below it)
    for ms in range(1, 101):  # answers of 1..100 ms
        h.record(ms / 1000)
    assert h.delay() == pytest.approx(2 * 0.095, abs=0.003)
    fast = Hedger()
    for _ in range(50):
        fast.record(0.001)
    assert fast.delay() == pytest.approx(0.1)  # the floor
    assert h.allowed() is True
    off[0] = True
    assert h.allowed() is False


def test_hedger_delay_looks_at_the_latest_256_answers() -> None:
    """The rolling window keeps the latest 256 answer times; older ones no longer count."""
    h = Hedger(quantile=1.0, floor=0.0, factor=2.0)  # the maximum of the window, doubled
    for _ in range(10):
        h.record(1.0)
    for _ in range(255):
        h.record(0.001)
    h.record(0.003)
    assert h.delay() == pytest.approx(0.006)


def test_hedger_delay_follows_every_answer() -> None:
    """The window is kept sorted as answers come: the delay is current after each one, and
    the answer dropped from a full window is the oldest, whatever its rank."""
    h = Hedger(quantile=1.0, floor=0.0, factor=1.0, min_samples=1, samples=3)
    h.record(0.1)
    assert h.delay() == pytest.approx(0.1)
    h.record(0.5)
    assert h.delay() == pytest.approx(0.5)  # the new maximum, at once
    h.record(0.2)
    h.record(0.3)  # drops 0.1, the oldest
    assert h.delay() == pytest.approx(0.5)
    h.record(0.05)  # drops 0.5
    assert h.delay() == pytest.approx(0.3)
    median = Hedger(quantile=0.5, floor=0.0, factor=1.0, min_samples=1, samples=3)
    for seconds in (0.3, 0.1, 0.2, 0.9):  # the window: 0.1, 0.2, 0.9
        median.record(seconds)
    assert median.delay() == pytest.approx(0.2)


def test_hedger_quiet_for_one_delay_after_overload() -> None:
    """overloaded(): no hedge for one delay (the floor while the delay is unknown), then again."""
    now = [-50.0]  # a monotonic clock's origin is arbitrary: it may read negative
    h = Hedger(floor=0.25, factor=2.0, min_samples=1, clock=lambda: now[0])
    assert h.allowed() is True
    h.overloaded()  # delay unknown: quiet for the floor
    assert h.allowed() is False
    now[0] += 0.25
    assert h.allowed() is True
    h.record(1.0)  # delay 2 x 1.0 s, above the floor
    h.overloaded()
    now[0] += 1.0
    assert h.allowed() is False
    now[0] += 1.0
    assert h.allowed() is True


class Script:
    """Pages of consecutive ints, no limiter; `hold` pages wait for `release(n)` on their first
    attempt, `fail[(n, attempt)]` is raised by that attempt, and a cancelled attempt of page n
    stops only once `linger[n]` is set (a fetch slow to cancel).
    """

    def __init__(
        self,
        n_items: int,
        *,
        hold: set[int] | None = None,
        fail: dict[tuple[int, int], Exception] | None = None,
        linger: set[int] | None = None,
    ) -> None:
        self.n_items = n_items
        self.hold = hold or set()
        self.fail = fail or {}
        self.linger = {n: asyncio.Event() for n in linger or ()}
        self.gates: dict[int, asyncio.Event] = {}
        self.attempts: Counter[int] = Counter()
        self.running = 0

    def release(self, n: int) -> None:
        self.gates.setdefault(n, asyncio.Event()).set()

    async def fetch(self, n: int) -> Page[int]:
        self.attempts[n] += 1
        attempt = self.attempts[n]
        self.running += 1
        try:
            if n in self.hold and attempt == 1:
                await self.gates.setdefault(n, asyncio.Event()).wait()
            else:
                await asyncio.sleep(0)
            if (n, attempt) in self.fail:
                raise self.fail[n, attempt]
            start = (n - 1) * PAGE_SIZE
            return Page(n, list(range(start, min(start + PAGE_SIZE, self.n_items))))
        except asyncio.CancelledError:
            while n in self.linger and not self.linger[n].is_set():
                with contextlib.suppress(asyncio.CancelledError):  # cancelled again: still slow
                    await self.linger[n].wait()
            raise
        finally:
            self.running -= 1


def script_run(script: Script, stats: PagingStats, **kw: Any) -> Any:
    return iterate_pages(script.fetch, **RULE, prefetch=8, stats=stats, hedger=hedger(0.5), **kw)


async def test_overdue_first_page_is_hedged(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first page, fetched alone, is hedged like any head page once overdue."""
    clock = VirtualClock(monkeypatch)
    script = Script(25, hold={1})
    stats = PagingStats()
    async with aclosing(script_run(script, stats)) as it:
        first = asyncio.ensure_future(anext(it))
        await spin()
        await clock.advance(0.5)
        assert (await first).number == 1
        assert (stats.hedges, stats.hedges_won, script.attempts[1]) == (1, 1, 2)
        items = [*first.result().items] + [i async for p in it for i in p.items]
    assert items == list(range(25))


async def test_head_hedged_while_pages_behind_are_still_outstanding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full window can launch nothing else: the overdue head is hedged though later pages hang."""
    clock = VirtualClock(monkeypatch)
    script = Script(300, hold=set(range(2, 10)))
    stats = PagingStats()
    async with aclosing(script_run(script, stats)) as it:
        await anext(it)
        nxt = asyncio.ensure_future(anext(it))
        await spin()
        assert script.running == 8  # pages 2..9: the window is full, all of it outstanding
        await clock.advance(0.5)
        assert (await nxt).number == 2
        assert (stats.hedges, script.attempts[2]) == (1, 2)


async def test_failed_duplicate_leaves_the_original_to_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A duplicate that fails does not fail the page: the original's answer is used."""
    clock = VirtualClock(monkeypatch)
    boom = RuntimeError("the duplicate failed")
    script = Script(30, hold={2}, fail={(2, 2): boom})
    stats = PagingStats()
    async with aclosing(script_run(script, stats)) as it:
        await anext(it)
        nxt = asyncio.ensure_future(anext(it))
        await spin()
        await clock.advance(0.5)
        assert (stats.hedges, script.attempts[2]) == (1, 2)
        assert not nxt.done()  # the duplicate failed; the original is still awaited
        script.release(2)
        page = await nxt
        assert (page.number, page.items, stats.hedges_won) == (2, list(range(10, 20)), 0)
        assert [p.number async for p in it] == [3]


async def test_both_failing_raise_the_originals_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Original and duplicate both fail: the original's error is raised, once both are done."""
    clock = VirtualClock(monkeypatch)
    original, duplicate = RuntimeError("original"), RuntimeError("duplicate")
    script = Script(30, hold={2}, fail={(2, 1): original, (2, 2): duplicate})
    stats = PagingStats()
    with pytest.raises(RuntimeError) as info:
        async with aclosing(script_run(script, stats)) as it:
            await anext(it)
            nxt = asyncio.ensure_future(anext(it))
            await spin()
            await clock.advance(0.5)
            assert stats.hedges == 1 and not nxt.done()
            script.release(2)
            await nxt
    assert info.value is original
    assert script.running == 0


async def test_search_waits_for_every_hedge_loser(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled losers slow to stop (two hedges) are all awaited before the search ends."""
    clock = VirtualClock(monkeypatch)
    script = Script(600, hold={2, 45}, linger={2, 45})
    stats = PagingStats()
    items: list[int] = []

    async def consume() -> None:
        async with aclosing(script_run(script, stats)) as it:
            async for page in it:
                items.extend(page.items)

    task = asyncio.ensure_future(consume())
    for _ in range(20):  # each held page is overdue; its duplicate answers at once
        await clock.advance(0.5)
    assert (stats.hedges, stats.hedges_won) == (2, 2)
    assert items == list(range(600))
    assert script.running == 2 and not task.done()  # both losers still stopping
    script.linger[45].set()
    await spin()
    assert script.running == 1 and not task.done()  # page 2's loser, hedged first, still awaited
    script.linger[2].set()
    await task
    assert script.running == 0


async def test_early_exit_cancels_everything_and_wastes_at_most_prefetch() -> None:
    """break, prefetch > concurrency: at most prefetch pages past the consumer, all cancelled."""
    limiter = Limiter(3)
    fetcher = Fetcher(10_000, limiter, hold=set(range(5, 1000)))
    stats = PagingStats()
    async with aclosing(run(fetcher, 9, stats)) as it:
        async for page in it:
            if page.number == 4:
                await spin()
                break
    past = {n for n in fetcher.granted if n > 4}
    assert past and max(past) <= 4 + 9
    assert set(fetcher.cancelled) == past
    assert stats.pages_requested - 4 <= 9
    assert limiter.in_flight == 0
    await assert_no_stray_tasks()


@pytest.mark.parametrize("first_alone", [True, False])
async def test_pages_past_the_end_cancelled_while_last_page_is_held(first_alone: bool) -> None:
    """No total: on the short page, pages launched past it are cancelled before it is handed out."""
    limiter = Limiter(4)
    fetcher = Fetcher(25, limiter, hold=set(range(4, 100)))
    stats = PagingStats()
    async with aclosing(run(fetcher, 8, stats, first_alone=first_alone)) as it:
        pages = [await anext(it) for _ in range(3)]
        await spin(3)  # the consumer holds page 3, the last one
        launched_past = {n for n in fetcher.granted if n > 3}
        assert launched_past
        assert set(fetcher.cancelled) == launched_past
        assert stats.pages_yielded == 3
        assert stats.last_page == 3
        assert stats.wasted == stats.pages_requested - 3
        with pytest.raises(StopAsyncIteration):
            await anext(it)
    assert [p.number for p in pages] == [1, 2, 3]
    assert stats.pages_yielded == 3 and stats.items_yielded == 25
    await assert_no_stray_tasks()


async def test_speculative_start_cancels_pages_past_the_total() -> None:
    """A window started with page 1: pages past page 1's total are cancelled when it arrives."""
    limiter = Limiter(2)
    fetcher = Fetcher(25, limiter, total=True)
    stats = PagingStats()
    async with aclosing(run(fetcher, 8, stats, first_alone=False)) as it:
        first = await anext(it)
        assert first.number == 1
        assert stats.total == 25
        assert stats.wasted == 5  # pages 4..8, launched with page 1
        got = [first.number] + [p.number async for p in it]
    assert got == [1, 2, 3]
    assert set(fetcher.answered) <= {1, 2, 3, 4}  # page 4 may have had a slot with page 3
    assert stats.pages_yielded == 3
    await assert_no_stray_tasks()


async def test_second_cancel_during_cleanup_still_awaits_every_task() -> None:
    """Cancelled twice while cancelling its fetches, the search still waits for all of them."""
    cleanup = asyncio.Event()
    running = 0

    async def fetch(n: int) -> Page[int]:
        nonlocal running
        running += 1
        try:
            if n > 1:
                await asyncio.Event().wait()
            return Page(n, list(range(10)))
        except asyncio.CancelledError:
            if n > 2:  # the head (awaited) stops at once; the others are slow to stop
                await cleanup.wait()
            raise
        finally:
            running -= 1

    async def consumer() -> None:
        async with aclosing(iterate_pages(fetch, **RULE, prefetch=4)) as it:
            async for _ in it:
                pass

    task = asyncio.ensure_future(consumer())
    await spin()
    assert running == 4  # pages 2..5 (prefetch 4), hanging
    task.cancel()
    await spin()
    assert running == 3  # in the search's cleanup, waiting for pages 3..5 to stop
    task.cancel()
    await spin()
    assert not (task.done() and running > 0), "the search ended with its fetches still running"
    cleanup.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert running == 0
    await assert_no_stray_tasks()


async def test_cancel_during_cleanup_after_break_is_not_lost() -> None:
    """Cancelled while a break waits for the fetches to stop: the consumer still ends cancelled."""
    script = Script(1000, hold=set(range(2, 100)), linger={2, 3, 4})
    went_on: list[bool] = []

    async def consumer() -> None:
        async with aclosing(iterate_pages(script.fetch, **RULE, prefetch=4)) as it:
            async for _ in it:
                await spin(3)  # pages 2..4 start
                break
        went_on.append(True)

    task = asyncio.ensure_future(consumer())
    await spin()
    assert script.running == 3  # pages 2..4, cancelled by the break, slow to stop
    task.cancel()
    await spin()
    assert script.running == 3 and not task.done()
    for stopped in script.linger.values():
        stopped.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert went_on == []
    assert script.running == 0


# -- the client around the engine ------------------------------------------------------------


class FakeTransport:
    """Answers page requests from a list of chats; the first request of a `hang` page hangs."""

    def __init__(self, chats: int, *, hang: set[int] | None = None) -> None:
        self.chats = chats
        self.hang = hang or set()
        self.script: dict[int, list[tuple[int, dict[str, str], bytes]]] = {}
        self.sent: list[int] = []

    async def send(self, request: protocol.PreparedRequest) -> RawResponse:
        n = request.page
        self.sent.append(n)
        if self.script.get(n):
            status, headers, body = self.script[n].pop(0)
            return RawResponse(status, headers, body)
        if n in self.hang and self.sent.count(n) == 1:
            await asyncio.Event().wait()
        start = (n - 1) * PAGE_SIZE
        records = [_chat(i) for i in range(start, min(start + PAGE_SIZE, self.chats))]
        doc = {"status_code": 4305, "description": "Success", "response": records}
        return RawResponse(200, {"X-Total-Count": str(self.chats)}, json.dumps(doc).encode())

    async def close(self) -> None:
        pass


def _chat(i: int) -> dict[str, Any]:
    return {
        "chat_id": f"c{i}",
        "created_at": "2024-05-01T00:00:00Z",
        "updated_at": "2024-05-01T00:00:00Z",
        "status": "closed",
        "channel": "sms",
    }


def make_client(transport: FakeTransport, **kw: Any) -> imi.ImiChatClient:
    return imi.ImiChatClient(
        base_url="http://127.0.0.1:9/v3.0", token="t", team_id="team", transport=transport, **kw
    )


def test_generator_left_suspended_closes_quietly_at_loop_end() -> None:
    """A search_chats() generator alive when asyncio.run ends is closed without any error."""
    errors: list[dict[str, Any]] = []
    kept: list[Any] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        client = make_client(FakeTransport(500, hang=set(range(2, 100))), concurrency=4)
        gen = client.search_chats()
        await anext(gen)
        await spin()
        kept.append(gen)  # suspended mid-iteration, its page tasks hanging

    asyncio.run(main())
    assert [c.get("message") for c in errors] == []


@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [
        (429, {"Retry-After": "0"}, b'{"message": "Too Many Requests"}'),
        (429, {"Retry-After": "0"}, b""),
        (503, {"Retry-After": "0"}, b"<html><body>503 Service Unavailable</body></html>"),
        (500, {"Retry-After": "0"}, b'{"status_code": 2007, "description": "Internal error"}'),
    ],
)
async def test_retry_after_zero_means_now(
    status: int, headers: dict[str, str], body: bytes
) -> None:
    """A transient answer with Retry-After: 0 is retried with no wait at all."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    transport = FakeTransport(15)
    transport.script[1] = [(status, headers, body)]
    async with make_client(transport, sleep=sleep) as client:
        chats = [c.chat_id async for c in client.search_chats()]
    assert chats == [f"c{i}" for i in range(15)]
    assert slept == [0]
    assert transport.sent == [1, 1, 2]


async def test_no_retry_after_keeps_jittered_backoff() -> None:
    """A 503 without Retry-After waits the policy's full-jitter backoff (0 .. 0.1 x 3**n s)."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    transport = FakeTransport(5)
    transport.script[1] = [(503, {}, b"")] * 3
    async with make_client(transport, sleep=sleep) as client:
        assert len([c async for c in client.search_chats()]) == 5
    assert len(slept) == 3
    assert all(0 <= s <= 0.1 * 3**i for i, s in enumerate(slept))
    assert any(s > 0 for s in slept)


async def test_client_counts_hedges(monkeypatch: pytest.MonkeyPatch) -> None:
    """An overdue head page is hedged by the client and counted in ClientStats and the run."""
    clock = VirtualClock(monkeypatch)
    transport = FakeTransport(2000, hang={150})
    async with make_client(transport, concurrency=4) as client:
        stats = PagingStats()
        task = asyncio.ensure_future(_count_pages(client.search_pages(raw=True, stats=stats)))
        while not task.done():
            await clock.advance(1.0)
        assert await task == 2000
        assert client.stats.hedges == stats.hedges == 1
        assert transport.sent.count(150) == 2
    await assert_no_stray_tasks()


async def test_client_without_hedging_sends_no_duplicate(monkeypatch: pytest.MonkeyPatch) -> None:
    """`hedge=False`: the overdue head page above gets no duplicate; the search waits for it."""
    clock = VirtualClock(monkeypatch)
    transport = FakeTransport(2000, hang={150})
    async with make_client(transport, concurrency=4, hedge=False) as client:
        pages = client.search_pages(raw=True, deadline=60.0)
        task = asyncio.ensure_future(_count_pages(pages))
        while not task.done():
            await clock.advance(1.0)
        with pytest.raises(imi.SearchTimeoutError, match="at page 150"):
            await task
        assert client.stats.hedges == 0
        assert transport.sent.count(150) == 1
    await assert_no_stray_tasks()


async def _count_pages(pages: Any) -> int:
    n = 0
    async with aclosing(pages) as it:
        async for page in it:
            n += len(page.items)
    return n


def alarm_timers(loop: asyncio.AbstractEventLoop) -> int:
    """Timers of an `_Alarm` still scheduled on `loop` (not cancelled)."""
    scheduled = loop._scheduled  # type: ignore[attr-defined]
    return sum(
        1
        for handle in scheduled
        if not handle.cancelled() and getattr(handle._callback, "__func__", None) is _Alarm._ring
    )


async def test_alarm_wakes_at_the_task_or_the_deadline_whichever_first() -> None:
    """The head-page wait of the hedging path: done task first, or deadline first; a later
    wait re-arms the one timer, an earlier deadline replaces it, close leaves no timer."""
    loop = asyncio.get_running_loop()
    alarm = _Alarm(loop)
    never: asyncio.Future[None] = loop.create_future()

    # The deadline comes first: the wait returns with the task still pending.
    await alarm.wait(never, loop.time() + 0.01)
    assert not never.done()

    # A done task returns at once, leaving the timer armed 10 ms ahead; a wait with a far
    # deadline lets it ring then without waking, and returns when its own task is done.
    done = loop.create_future()
    done.set_result(None)
    await alarm.wait(done, loop.time() + 0.01)
    soon = loop.create_future()
    loop.call_later(0.05, soon.set_result, None)
    await alarm.wait(soon, loop.time() + 3600)
    assert soon.done()
    assert not soon._callbacks  # its wake-up was removed
    assert alarm_timers(loop) == 1  # re-armed for the hour, once

    # The timer armed for an hour must not delay an earlier deadline, and is replaced.
    await asyncio.wait_for(alarm.wait(never, loop.time() + 0.01), timeout=5)
    assert not never.done()
    assert alarm_timers(loop) == 0  # the hour's timer was cancelled, the new one rang

    # Woken twice in one turn (task done and deadline together): once, no error.
    waiting = asyncio.ensure_future(alarm.wait(never, loop.time() + 3600))
    await asyncio.sleep(0)
    alarm._done()
    alarm._done()
    await waiting

    # A wait cancelled leaves nothing behind; close cancels the armed timer.
    waiting = asyncio.ensure_future(alarm.wait(never, loop.time() + 3600))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not never._callbacks
    assert alarm_timers(loop) == 1
    alarm.close()
    assert alarm_timers(loop) == 0


async def test_a_hedging_search_leaves_no_timer_behind() -> None:
    """The alarm of a search that waited on its head is closed with the search."""
    loop = asyncio.get_running_loop()
    limiter = Limiter(4)
    fetcher = Fetcher(100, limiter, hold={3})
    stats = PagingStats()
    async with aclosing(run(fetcher, 8, stats, hedger=hedger(delay=3600))) as it:
        assert [(await anext(it)).number for _ in range(2)] == [1, 2]
        head = asyncio.ensure_future(anext(it))  # page 3 is held: the consumer waits on it
        await spin(10)
        assert alarm_timers(loop) == 1
        fetcher.release(3)
        assert (await head).number == 3
    assert alarm_timers(loop) == 0
    await assert_no_stray_tasks()
