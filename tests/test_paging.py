"""The prefetch engine, driven by a fake fetcher (no HTTP): order, window, end, errors, cleanup.

Delays are made of `asyncio.sleep(0)` yields or `asyncio.Event` gates, never wall time.
"""

from __future__ import annotations

import asyncio
import gc
import math
import random
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import pytest

from imichat_async import _errors as e
from imichat_async import _protocol as protocol
from imichat_async._paging import Page, PagingStats, iterate_pages
from tests.helpers import assert_no_stray_tasks

PAGE_SIZE = 10
FetchPage = Callable[[int], Awaitable[Page[int]]]
#: The wire's end-of-data rule, as the client gives it to the engine.
RULE: dict[str, Any] = {"last_page": protocol.last_page, "ends": protocol.ends_search}
TOTALS = [0, 1, 9, 10, 11, 95]
PREFETCHES = list(range(1, 9))


class FakeServer:
    """Pages of `n_items` consecutive ints; optional total, random yields, gates and errors."""

    def __init__(
        self,
        n_items: int,
        *,
        send_total: bool = False,
        seed: int | None = 0,
        max_yields: int = 12,
        errors: dict[int, BaseException] | None = None,
        gated: bool = False,
        min_yields: int = 0,
    ) -> None:
        self.n_items = n_items
        self.send_total = send_total
        self.rng = random.Random(seed if seed is not None else 0)
        self.max_yields = max_yields if seed is not None else 0
        self.min_yields = min_yields
        self.errors = errors or {}
        self.gates: dict[int, asyncio.Event] | None = {} if gated else None
        self.requested: list[int] = []
        self.completed: list[int] = []
        self.cancelled: list[int] = []
        self.in_flight = 0
        self.peak = 0
        self.requested_during_first: list[int] | None = None

    def gate(self, n: int) -> asyncio.Event:
        assert self.gates is not None
        return self.gates.setdefault(n, asyncio.Event())

    def release(self, *pages: int) -> None:
        for n in pages:
            self.gate(n).set()

    @property
    def last_data_page(self) -> int:
        return math.ceil(self.n_items / PAGE_SIZE)

    async def fetch(self, n: int) -> Page[int]:
        self.requested.append(n)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.gates is not None:
                await self.gate(n).wait()
            for _ in range(max(self.min_yields, self.rng.randint(0, self.max_yields))):
                await asyncio.sleep(0)
            if n == 1:
                self.requested_during_first = list(self.requested)
            if n in self.errors:
                raise self.errors[n]
            start = (n - 1) * PAGE_SIZE
            items = list(range(start, min(start + PAGE_SIZE, self.n_items)))
            return Page(n, items, self.n_items if self.send_total else None)
        except asyncio.CancelledError:
            self.cancelled.append(n)
            raise
        finally:
            self.in_flight -= 1
            self.completed.append(n)


def pages(
    server: FakeServer, prefetch: int, stats: PagingStats | None = None, **kw: Any
) -> AsyncGenerator[Page[int], None]:
    return iterate_pages(server.fetch, **RULE, prefetch=prefetch, stats=stats, **kw)


async def consume(
    server: FakeServer,
    prefetch: int,
    stats: PagingStats | None = None,
    consumer_yields: int = 3,
    **kw: Any,
) -> list[Page[int]]:
    got = []
    async with aclosing(pages(server, prefetch, stats, **kw)) as it:
        async for page in it:
            # The window: pages launched and not consumed, this one included, stay <= prefetch.
            assert max(server.requested) - page.number + 1 <= prefetch
            assert server.in_flight <= prefetch
            got.append(page)
            for _ in range(server.rng.randint(0, consumer_yields)):
                await asyncio.sleep(0)
    return got


async def settle(server: FakeServer) -> None:
    """Let fetches cancelled by a garbage-collected generator land (bounded)."""
    for _ in range(50):
        if server.in_flight == 0:
            break
        await asyncio.sleep(0)


# -- ordering and the window ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prefetch", [2, 5, 8])
async def test_order_with_random_completion(seed: int, prefetch: int) -> None:
    """Pages come out in page order although fetches complete out of order."""
    server = FakeServer(95, send_total=seed % 2 == 0, seed=seed, max_yields=30)
    got = await consume(server, prefetch)
    assert [p.number for p in got] == list(range(1, 11))
    assert [i for p in got for i in p.items] == list(range(95))
    if prefetch > 2:
        assert server.completed != sorted(server.completed)  # completion really was out of order


async def test_order_with_reverse_completion() -> None:
    """Gated fetches released in reverse still come out 2, 3, 4, ..."""
    server = FakeServer(80, send_total=True, seed=None, gated=True)
    server.release(1)
    async with aclosing(pages(server, 8)) as it:
        first = await anext(it)
        assert first.number == 1
        for _ in range(3):
            await asyncio.sleep(0)
        assert sorted(server.requested) == list(range(1, 9))
        for n in range(8, 1, -1):
            server.release(n)
            await asyncio.sleep(0)
        assert server.completed[1:] == list(range(8, 1, -1))
        rest = [p.number async for p in it]
    assert rest == list(range(2, 9))


@pytest.mark.parametrize("prefetch", PREFETCHES)
async def test_window_is_bounded_and_used(prefetch: int) -> None:
    """Fetches in flight never exceed prefetch, and reach it on a long result."""
    server = FakeServer(1995, seed=None, min_yields=2)
    got = await consume(server, prefetch, consumer_yields=0)
    assert len(got) == 200
    assert server.peak <= prefetch
    # A fast consumer and fetches of two loop turns: the continuous window fills up.
    assert server.peak == prefetch


@pytest.mark.parametrize("prefetch", [1, 2, 4, 8])
async def test_window_is_continuous(prefetch: int) -> None:
    """Asking for page k launches page k+prefetch-1 at once, before page k has arrived."""
    server = FakeServer(500, seed=None, gated=True)
    server.release(1)
    async with aclosing(pages(server, prefetch)) as it:
        assert (await anext(it)).number == 1
        await asyncio.sleep(0)
        assert sorted(server.requested) == list(range(1, prefetch + 1))
        for k in range(2, 6):
            nxt = asyncio.ensure_future(anext(it))
            for _ in range(3):
                await asyncio.sleep(0)
            assert not nxt.done()
            # The consumer is done with page k-1: pages k .. k+prefetch-1 are all requested.
            assert sorted(server.requested) == list(range(1, k + prefetch))
            server.release(k)
            assert (await nxt).number == k


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("prefetch", [1, 3, 8])
async def test_pages_held_never_above_prefetch(seed: int, prefetch: int) -> None:
    """Completed-but-unconsumed pages plus the one in hand never exceed prefetch."""
    server = FakeServer(600, seed=seed, max_yields=4)
    async with aclosing(pages(server, prefetch)) as it:
        async for page in it:
            done_ahead = {n for n in server.completed if n > page.number} - set(server.cancelled)
            assert len(done_ahead) + 1 <= prefetch
            for _ in range(server.rng.randint(0, 20)):  # a slow consumer lets fetches finish
                await asyncio.sleep(0)


# -- the first page ---------------------------------------------------------------------


@pytest.mark.parametrize("send_total", [True, False])
@pytest.mark.parametrize("prefetch", [1, 4, 8])
async def test_first_page_is_fetched_alone(send_total: bool, prefetch: int) -> None:
    """No other page is requested until page 1 has answered."""
    server = FakeServer(95, send_total=send_total, seed=1, max_yields=10)
    await consume(server, prefetch)
    assert server.requested_during_first == [1]


@pytest.mark.parametrize("prefetch", [1, 4, 8])
async def test_permanent_error_on_first_page_costs_one_fetch(prefetch: int) -> None:
    """An error on page 1 is raised after exactly one fetch."""
    boom = e.InvalidFilterParamError("bad", status_code=3445, http_status=400)
    server = FakeServer(95, errors={1: boom})
    with pytest.raises(e.InvalidFilterParamError) as info:
        await consume(server, prefetch)
    assert info.value is boom
    assert server.requested == [1]
    await assert_no_stray_tasks()


# -- end detection ----------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", PREFETCHES)
@pytest.mark.parametrize("total", TOTALS)
async def test_end_with_total_requests_nothing_past_the_end(total: int, prefetch: int) -> None:
    """With X-Total-Count, exactly pages 1..ceil(total/10) are requested (1 when empty)."""
    server = FakeServer(total, send_total=True, seed=total * 10 + prefetch)
    stats = PagingStats()
    got = await consume(server, prefetch, stats)
    last = max(1, server.last_data_page)
    assert sorted(server.requested) == list(range(1, last + 1))
    assert [i for p in got for i in p.items] == list(range(total))
    assert all(p.items for p in got)  # an empty page is never yielded
    assert stats.wasted == 0
    assert stats.total == total
    assert stats.pages_requested == last
    assert stats.items_yielded == total
    assert stats.last_page == last
    assert server.cancelled == []


@pytest.mark.parametrize("prefetch", PREFETCHES)
@pytest.mark.parametrize("total", [*TOTALS, 20, 100])
async def test_end_without_total_stops_at_first_short_page(total: int, prefetch: int) -> None:
    """Without a total the first short or empty page ends it; at most prefetch-1 past it."""
    server = FakeServer(total, send_total=False, seed=total * 10 + prefetch)
    stats = PagingStats()
    got = await consume(server, prefetch, stats)
    first_short = total // PAGE_SIZE + 1
    assert [i for p in got for i in p.items] == list(range(total))
    assert [p.number for p in got] == list(range(1, server.last_data_page + 1))
    assert sorted(server.requested) == list(range(1, max(server.requested) + 1))
    past_short = [n for n in server.requested if n > first_short]
    # stats count tasks launched; a task cancelled before its first step never reached the server.
    assert len(past_short) <= stats.wasted <= prefetch - 1
    assert stats.pages_requested - stats.wasted == first_short
    assert stats.total is None
    assert stats.last_page == first_short
    assert server.in_flight == 0  # pages past the end were cancelled and awaited


async def test_error_past_the_end_is_not_surfaced() -> None:
    """Without a total, a failure of a page launched past the last one is swallowed."""
    boom = e.InternalServerError("x", status_code=2007, http_status=500)
    server = FakeServer(25, errors={4: boom, 5: boom}, seed=3)
    got = await consume(server, 8)
    assert [p.number for p in got] == [1, 2, 3]
    await assert_no_stray_tasks()


async def test_failures_past_the_end_are_never_logged_as_unretrieved() -> None:
    """Failed pages past the end are reaped: asyncio reports no 'exception never retrieved'."""
    reported: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx))
    boom = e.InternalServerError("x", status_code=2007, http_status=500)
    server = FakeServer(25, errors={4: boom, 5: boom}, seed=None)
    stats = PagingStats()
    got = await consume(server, 8, stats)
    assert [p.number for p in got] == [1, 2, 3]
    assert {4, 5} <= set(server.completed) - set(server.cancelled)  # failed, not cancelled
    del got, server, boom  # the error's traceback leads to the failed tasks: let them go
    gc.collect()
    assert reported == []


def sized_pages(sizes: dict[int, int], total: int | None) -> tuple[FetchPage, list[int]]:
    """A fetch answering page n with `sizes[n]` consecutive ints (0 past them), and `total`."""
    requested: list[int] = []

    async def fetch(n: int) -> Page[int]:
        requested.append(n)
        await asyncio.sleep(0)
        start = sum(sizes.get(k, 0) for k in range(1, n))
        return Page(n, list(range(start, start + sizes.get(n, 0))), total)

    return fetch, requested


@pytest.mark.parametrize("prefetch", [1, 4])
async def test_short_page_before_the_totals_last_page_does_not_end_it(prefetch: int) -> None:
    """With a total, a short page before the total's last page is read past (the contract
    promises at most 10 records a page, not exactly 10); nothing past the last is asked."""
    fetch, requested = sized_pages({1: 10, 2: 4, 3: 10, 4: 5}, total=35)
    stats = PagingStats()
    got = [p async for p in iterate_pages(fetch, **RULE, prefetch=prefetch, stats=stats)]
    assert [p.number for p in got] == [1, 2, 3, 4]
    assert [i for p in got for i in p.items] == list(range(29))
    assert sorted(requested) == [1, 2, 3, 4]
    assert (stats.last_page, stats.wasted, stats.empty_before_end) == (4, 0, 0)


@pytest.mark.parametrize("prefetch", [1, 4])
async def test_empty_page_before_the_totals_last_page_ends_it(prefetch: int) -> None:
    """With a total, an empty page before the total's last page ends the search (the data
    shrank), counted in `stats.empty_before_end`; pages launched past it are cancelled."""
    fetch, requested = sized_pages({1: 10, 2: 7}, total=95)  # page 3 comes back empty
    stats = PagingStats()
    got = [p async for p in iterate_pages(fetch, **RULE, prefetch=prefetch, stats=stats)]
    assert [p.number for p in got] == [1, 2]
    assert [i for p in got for i in p.items] == list(range(17))
    assert (stats.last_page, stats.empty_before_end) == (3, 1)
    assert stats.pages_requested - stats.wasted == 3
    assert {1, 2, 3} <= set(requested)
    await assert_no_stray_tasks()


async def test_short_page_without_total_still_ends_it() -> None:
    """Without a total the first short page ends the search, as before."""
    fetch, requested = sized_pages({1: 10, 2: 4, 3: 10}, total=None)
    stats = PagingStats()
    got = [p async for p in iterate_pages(fetch, **RULE, prefetch=1, stats=stats)]
    assert [p.number for p in got] == [1, 2]
    assert requested == [1, 2]
    assert (stats.last_page, stats.empty_before_end) == (2, 0)


# -- start_page and max_pages -----------------------------------------------------------


@pytest.mark.parametrize(
    ("n_items", "send_total", "kw", "yielded", "requested"),
    [
        (95, True, {"start_page": 3}, list(range(3, 11)), list(range(3, 11))),
        (95, True, {"start_page": 3, "max_pages": 2}, [3, 4], [3, 4]),
        (95, False, {"start_page": 3, "max_pages": 2}, [3, 4], [3, 4]),
        (95, True, {"max_pages": 0}, [], []),
        (95, False, {"max_pages": 0}, [], []),
        (95, False, {"max_pages": 1}, [1], [1]),
        (95, True, {"start_page": 10}, [10], [10]),
        (95, True, {"start_page": 12}, [], [12]),
        (95, False, {"start_page": 12}, [], [12]),
        (10_000, False, {"max_pages": 5}, [1, 2, 3, 4, 5], [1, 2, 3, 4, 5]),
        (10_000, False, {"start_page": 7, "max_pages": 3}, [7, 8, 9], [7, 8, 9]),
        (95, True, {"max_pages": 50}, list(range(1, 11)), list(range(1, 11))),
    ],
)
async def test_start_page_and_max_pages(
    n_items: int, send_total: bool, kw: dict[str, Any], yielded: list[int], requested: list[int]
) -> None:
    """start_page and max_pages bound both what is yielded and what is requested."""
    server = FakeServer(n_items, send_total=send_total, seed=5)
    got = await consume(server, 8, **kw)
    assert [p.number for p in got] == yielded
    assert sorted(server.requested) == requested
    if yielded:
        assert got[0].items[0] == (yielded[0] - 1) * PAGE_SIZE


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"prefetch": 0}, "prefetch"),
        ({"start_page": 0}, "start_page"),
        ({"max_pages": -1}, "max_pages"),
    ],
)
async def test_bad_arguments(kw: dict[str, Any], match: str) -> None:
    """prefetch < 1, start_page < 1 and max_pages < 0 raise ValueError before any fetch."""
    server = FakeServer(95)
    args: dict[str, Any] = {**RULE, "prefetch": 4, **kw}
    with pytest.raises(ValueError, match=match):
        async with aclosing(iterate_pages(server.fetch, **args)) as it:
            await anext(it)
    assert server.requested == []


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("bad_page", [2, 3, 6, 9])
@pytest.mark.parametrize("prefetch", [1, 4, 8])
async def test_error_surfaces_after_earlier_pages(seed: int, bad_page: int, prefetch: int) -> None:
    """An error on page n is raised after pages 1..n-1 were all yielded, in order."""
    boom = e.ChatListUnavailableError("nope", status_code=3454, http_status=500)
    server = FakeServer(95, send_total=seed == 0, seed=seed, max_yields=20, errors={bad_page: boom})
    seen: list[int] = []
    with pytest.raises(e.ChatListUnavailableError) as info:
        async with aclosing(pages(server, prefetch)) as it:
            async for page in it:
                seen.append(page.number)
    assert info.value is boom
    assert seen == list(range(1, bad_page))
    assert server.in_flight == 0
    await assert_no_stray_tasks()


# -- leaving early ----------------------------------------------------------------------


def assert_cancelled_after(server: FakeServer, consumed: int, window: int = 7) -> None:
    """Every page past the consumed ones that reached the fetcher was cancelled there."""
    assert server.in_flight == 0
    ahead = {n for n in server.requested if n > consumed}
    assert ahead
    assert set(server.cancelled) == ahead
    assert max(ahead) <= consumed + window


def gated_server() -> FakeServer:
    """Pages 1-3 answer at once; later ones hang until cancelled."""
    server = FakeServer(1000, seed=None, gated=True)
    server.release(1, 2, 3)
    return server


async def test_break_with_aclosing_cancels_everything() -> None:
    """break inside aclosing(): every fetch in flight is cancelled and awaited on exit."""
    server = gated_server()
    async with aclosing(pages(server, 8)) as it:
        async for page in it:
            if page.number == 3:
                break
    assert server.in_flight == 0
    assert_cancelled_after(server, 3)
    await assert_no_stray_tasks()
    assert_cancelled_after(server, 3)  # nothing launched was sent later


async def test_bare_break_cleans_up_when_generator_is_dropped() -> None:
    """A plain async-for break: the dropped generator is closed and leaves no task behind."""
    server = gated_server()
    async for page in pages(server, 8):
        if page.number == 3:
            break
    await settle(server)
    assert server.in_flight == 0
    assert_cancelled_after(server, 3)
    await assert_no_stray_tasks()
    assert_cancelled_after(server, 3)  # nothing launched was sent later


async def test_exception_in_consumer_cancels_everything() -> None:
    """An exception in the consumer's loop body cancels and awaits every fetch."""
    server = gated_server()
    with pytest.raises(KeyError):
        async with aclosing(pages(server, 8)) as it:
            async for page in it:
                if page.number == 2:
                    raise KeyError("consumer failed")
    assert server.in_flight == 0
    assert server.cancelled
    await assert_no_stray_tasks()


@pytest.mark.parametrize("use_aclosing", [True, False])
async def test_task_cancellation_cancels_everything(use_aclosing: bool) -> None:
    """Cancelling the consumer task while it waits for a page cancels every fetch."""
    server = gated_server()
    seen: list[int] = []

    async def consumer() -> None:
        gen = pages(server, 8)
        if use_aclosing:
            async with aclosing(gen) as it:
                async for page in it:
                    seen.append(page.number)
        else:
            async for page in gen:
                seen.append(page.number)

    task = asyncio.ensure_future(consumer())
    for _ in range(10):
        await asyncio.sleep(0)
    assert seen == [1, 2, 3]  # now waiting for page 4, with pages 4..11 in flight
    assert server.in_flight == 8
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert server.in_flight == 0
    assert_cancelled_after(server, 3, window=8)
    await assert_no_stray_tasks()
    assert_cancelled_after(server, 3, window=8)  # nothing launched was sent later


async def test_aclose_cancels_everything() -> None:
    """aclose() on the generator at a yield cancels and awaits every fetch."""
    server = gated_server()
    gen = pages(server, 5)
    assert (await anext(gen)).number == 1
    assert (await anext(gen)).number == 2
    await asyncio.sleep(0)
    assert server.in_flight == 3  # pages 4..6 hang; page 3 (released) is already done
    await gen.aclose()
    assert_cancelled_after(server, 3, window=3)
    await assert_no_stray_tasks()
    with pytest.raises(StopAsyncIteration):
        await anext(gen)


async def test_cancellation_during_first_page() -> None:
    """Cancelling while page 1 is in flight leaves no task behind."""
    server = FakeServer(95, seed=None, gated=True)

    async def consumer() -> None:
        async with aclosing(pages(server, 8)) as it:
            async for _ in it:
                pass

    task = asyncio.ensure_future(consumer())
    for _ in range(3):  # the consumer starts, then page 1's task
        await asyncio.sleep(0)
    assert server.requested == [1]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert server.cancelled == [1]
    await assert_no_stray_tasks()
