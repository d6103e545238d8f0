"""The engine with the client-wide limiter: two bounds, head first, hedging, cleanup.

A fake fetcher (no HTTP) takes a real `Limiter` slot per attempt, ranked by
page, as the client does. Time is the event loop's clock, replaced by a
virtual one the test moves (`VirtualClock`): no wall time is asserted or
slept.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from contextlib import aclosing
from typing import Any

import pytest

import imichat_async as imi
from imichat_async import _protocol as protocol
from imichat_async._limiter import Limiter
from imichat_async._paging import Hedger, Page, PagingStats, iterate_pages
from imichat_async._transport import RawResponse
from tests.helpers import assert_no_stray_tasks

PAGE_SIZE = 10


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
            except asyncio.CancelledError:
                self.cancelled.append(n)
                raise
            finally:
                self.limiter.release(epoch)
                self.busy_at_release.append((self.limiter.in_flight, self.limiter.waiting))


def run(fetcher: Fetcher, prefetch: int, stats: PagingStats, **kw: Any) -> Any:
    return iterate_pages(fetcher.fetch, page_size=PAGE_SIZE, prefetch=prefetch, stats=stats, **kw)


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
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No duplicate before the head is overdue; one after; the first answer wins, once."""
    clock = VirtualClock(monkeypatch)
    limiter = Limiter(4)
    fetcher = Fetcher(300, limiter, hold={2})
    stats = PagingStats()
    got: list[int] = []
    items: list[int] = []
    async with aclosing(run(fetcher, 8, stats, hedger=hedger(0.5))) as it:
        page = await anext(it)
        got.append(page.number)
        items.extend(page.items)
        nxt = asyncio.ensure_future(anext(it))
        await spin()
        await clock.advance(0.4)
        assert fetcher.attempts[2] == 1 and stats.hedges == 0  # not overdue yet
        await clock.advance(0.2)
        assert stats.hedges == 1  # overdue: one duplicate, which answers at once
        page = await nxt
        assert (page.number, stats.hedges_won) == (2, 1)
        assert fetcher.attempts[2] == 2
        await spin()
        assert fetcher.cancelled == [2]  # the original, still held, lost and was cancelled
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
    """After a 429/503 the head waits for its own answer: no duplicate."""
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
        await clock.advance(0.3)
        h.overloaded()  # quiet until now + 0.5
        await clock.advance(0.3)  # head overdue, but within the quiet time
        assert stats.hedges == 0
        await clock.advance(0.3)  # quiet time over; looked at again
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
    for ms in range(1, 101):  # answers of 1..100 ms
        h.record(ms / 1000)
    assert h.delay() == pytest.approx(2 * 0.095, abs=0.003)
    fast = Hedger()
    for _ in range(50):
        fast.record(0.001)
    assert fast.delay() == pytest.approx(0.1)  # the floor
    assert h.allowed()
    off[0] = True
    assert not h.allowed()


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
        async with aclosing(iterate_pages(fetch, page_size=10, prefetch=4)) as it:
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
    client = imi.ImiChatClient(base_url="http://127.0.0.1:9/v3.0", token="t", team_id="team", **kw)
    client._transport = transport  # type: ignore[assignment]
    return client


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
    """A 503 without Retry-After waits the policy's full-jitter backoff (0 .. 0.25 s)."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    transport = FakeTransport(5)
    transport.script[1] = [(503, {}, b"")] * 3
    async with make_client(transport, sleep=sleep) as client:
        assert len([c async for c in client.search_chats()]) == 5
    assert len(slept) == 3
    assert all(0 <= s <= 0.25 * 2**i for i, s in enumerate(slept))
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
        off = make_client(FakeTransport(300), hedge=False)
        assert off._hedger is None
        await off.close()
    await assert_no_stray_tasks()


async def _count_pages(pages: Any) -> int:
    n = 0
    async with aclosing(pages) as it:
        async for page in it:
            n += len(page.items)
    return n
