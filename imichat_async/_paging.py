"""The prefetch engine: pages fetched concurrently, handed out strictly in page order.

It is given `fetch(n)`, a coroutine function returning page n as a `Page`
(items and, when the server sent one, the total count), and the wire's
end-of-data rule (`last_page(total)`, `ends(page, count, total)`: see
`_protocol.ends_search`), and knows nothing of HTTP. It keeps a continuous
window of page tasks (never windows waited on as a batch): when page n is
handed out the next page is started at once.

Two bounds, kept apart. Requests in flight are bounded by whoever `fetch`
waits on (the client's limiter, which serves a search's lowest page first);
this engine bounds the pages held ahead of the consumer, answered or not yet,
to `prefetch` (memory). With `prefetch` above the concurrency, the pages
behind a slow or retried head page keep every request slot busy until the
window is full.

- The first page is fetched alone when `first_alone` (a fresh client): its
  answer tells the total (when sent), so no page past the end is ever
  requested when the server sends a total, and a permanent error costs one
  request, not `prefetch`. Otherwise the first window starts at once, and
  pages launched past the total of the first page are cancelled when it
  arrives.
- With a total (from the first page), the end is the total's last page: a
  short page before it does not end the search, an empty one does (the data
  shrank), counted in `stats.empty_before_end`.
- Without a total, the end is what `ends` says (the first short page); pages
  launched past it are cancelled at once and counted in `stats.wasted` (at
  most `prefetch - 1`).
- Memory: at most `prefetch` pages are held at once, counting the one the
  consumer holds; however many pages there are.
- Hedging (with a `Hedger`): a head page outstanding longer than the
  hedger's delay, while the window can do nothing else, gets one duplicate
  `fetch` of the same page; the first answer is used, the other cancelled
  (`Hedger.lose`: one with a request on the wire finishes it first, keeping
  its slot till then, and stops with `HEDGE_LOST`), so a record is never
  duplicated nor dropped. At
  most `HEDGE_BUDGET` of the pages requested (at least one) per run.
- Leaving early (break, exception, cancellation, `aclose()`) cancels every
  task in flight and waits for them, in a `finally`, even through a second
  cancellation; no `yield` happens inside a task group or timeout block
  (PEP 789).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import attrs

T = TypeVar("T")
log = logging.getLogger("imichat_async")

HEDGE_BUDGET = 0.05  # duplicate requests per page requested, per run (at least one allowed)
#: The message of the cancellation that ends a hedge race's loser (see `hedge_lost`).
HEDGE_LOST = "imichat_async: hedge race lost"


def hedge_lost(exc: BaseException) -> bool:
    """Whether `exc` is the cancellation of a hedge race's loser (not a search ending).

    The fetch it cancels may finish the request it has on the wire before it
    stops: the server works on it until it answers, and counts it in flight.
    """
    return isinstance(exc, asyncio.CancelledError) and exc.args == (HEDGE_LOST,)


@attrs.frozen
class Page(Generic[T]):
    """One page's items and the server's total match count, if it sent one."""

    number: int
    items: Sequence[T]
    total: int | None = None


@attrs.define
class PagingStats:
    """What one paging run did: for tests, summaries and benchmarks."""

    pages_requested: int = 0  # page tasks launched (hedges not counted)
    pages_yielded: int = 0
    items_yielded: int = 0
    wasted: int = 0  # pages requested past the end (their answers unused)
    empty_before_end: int = 0  # an empty page before the total's last page ended the search
    total: int | None = None
    last_page: int | None = None  # the last page number, once known
    hedges: int = 0  # duplicate requests sent for an overdue head page
    hedges_won: int = 0  # of those, the ones whose answer was used


class Hedger:
    """When an overdue head page deserves a duplicate request; one per client.

    The delay is `factor` x the rolling `quantile` of the recent answer times
    fed to `record`, never below `floor` seconds, and unknown (no hedging)
    before `min_samples` answers. No hedge is allowed while `backing_off()`
    says so, nor for one delay after an `overloaded()` answer (429/503): a
    server that says it is busy gets no extra requests.
    """

    def __init__(
        self,
        *,
        factor: float = 2.0,
        quantile: float = 0.95,
        floor: float = 0.1,
        samples: int = 256,
        min_samples: int = 20,
        backing_off: Callable[[], bool] | None = None,
        on_sent: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.factor = factor
        self.quantile = quantile
        self.floor = floor
        self.min_samples = min_samples
        self._times: collections.deque[float] = collections.deque(maxlen=samples)  # arrival order
        self._ordered: list[float] = []  # the same times, sorted: the quantile is an index
        self._quiet_until = float("-inf")
        self._backing_off = backing_off
        self._on_sent = on_sent
        self._clock = clock
        # Page tasks with a request on the wire (`fetching`): True once one lost a race.
        self._wire: dict[asyncio.Task[object] | None, bool] = {}

    def record(self, seconds: float) -> None:
        """One answer came back after `seconds`; the oldest of a full window is dropped."""
        times = self._times
        ordered = self._ordered
        if len(times) == times.maxlen:  # the append below drops times[0]
            del ordered[bisect.bisect_left(ordered, times[0])]
        times.append(seconds)
        bisect.insort(ordered, seconds)

    def overloaded(self) -> None:
        """The server said it is overloaded (429/503): no hedge for one delay from now."""
        self._quiet_until = self._clock() + (self.delay() or self.floor)

    def delay(self) -> float | None:
        """Seconds a head page may be outstanding before a duplicate; None: not enough data."""
        ordered = self._ordered
        n = len(ordered)
        if n < self.min_samples:
            return None
        return max(self.floor, self.factor * ordered[min(n - 1, int(self.quantile * n))])

    def allowed(self) -> bool:
        """Not backing off, and not just after a 429/503."""
        if self._backing_off is not None and self._backing_off():
            return False
        return self._clock() >= self._quiet_until

    def sent(self) -> None:
        if self._on_sent is not None:
            self._on_sent()

    def on_wire(self) -> asyncio.Task[object] | None:
        """The current task sends a request (the fetcher calls this, then `off_wire`)."""
        task = asyncio.current_task()
        self._wire[task] = False
        return task

    def off_wire(self, task: asyncio.Task[object] | None) -> bool:
        """Its request was answered (or failed): whether it lost a race meanwhile."""
        return self._wire.pop(task, False)

    def lose(self, task: asyncio.Task[Any]) -> None:
        """End a hedge race's loser: cancelled (`HEDGE_LOST`) at once, unless it has a
        request on the wire: that one is finished first (the server counts it in flight
        until it answers, so the slot is kept till then), and the fetch stops after it
        with `CancelledError(HEDGE_LOST)`, retrying nothing. No extra task per request."""
        if task in self._wire:
            self._wire[task] = True
        else:
            task.cancel(HEDGE_LOST)


async def iterate_pages(
    fetch: Callable[[int], Awaitable[Page[T]]],
    *,
    last_page: Callable[[int], int],
    ends: Callable[[int, int, int | None], bool],
    prefetch: int = 8,
    start_page: int = 1,
    max_pages: int | None = None,
    stats: PagingStats | None = None,
    first_alone: bool = True,
    hedger: Hedger | None = None,
) -> AsyncGenerator[Page[T], None]:
    """Yield pages `start_page, start_page+1, ...` in order until the data or `max_pages` ends.

    `last_page(total)` is the number of the last page for a total; `ends(page, count,
    total)` whether the search ends at `page`, holding `count` items (total: the first
    page's, or None).
    """
    if prefetch < 1:
        raise ValueError("prefetch must be at least 1")
    if start_page < 1:
        raise ValueError("start_page must be at least 1")
    if max_pages is not None and max_pages < 0:
        raise ValueError("max_pages must not be negative")
    st = stats if stats is not None else PagingStats()
    end = start_page + max_pages - 1 if max_pages is not None else None  # last page allowed
    if end is not None and end < start_page:
        return
    tasks: dict[int, asyncio.Task[Page[T]]] = {}  # launched, not yet handed out
    alarm = _Alarm(asyncio.get_running_loop())  # wakes the consumer for a hedge decision
    spares: list[asyncio.Task[Page[T]]] = []  # hedge pairs, awaited at the end
    next_launch = start_page
    total_end: int | None = None  # the total's last page, once known

    def top_up(size: int) -> None:
        nonlocal next_launch
        while len(tasks) < size and (end is None or next_launch <= end):
            tasks[next_launch] = asyncio.ensure_future(fetch(next_launch))
            st.pages_requested += 1
            next_launch += 1

    async def take(number: int) -> Page[T]:
        task = tasks[number]
        if hedger is not None and not task.done():
            page = await _hedged(number, task)
        else:
            page = await task
        del tasks[number]
        return page

    async def _hedged(number: int, task: asyncio.Task[Page[T]]) -> Page[T]:
        assert hedger is not None
        loop = asyncio.get_running_loop()
        since = loop.time()  # when it became the head: the consumer waits from now
        while True:
            delay = hedger.delay()
            if delay is None or st.hedges >= max(1, int(HEDGE_BUDGET * st.pages_requested)):
                return await task
            left = since + delay - loop.time()
            if left <= 0:
                if hedger.allowed() and stalled(number):
                    return await race(number, task)
                left = delay / 2  # not now: look again a little later
            await alarm.wait(task, loop.time() + left)
            if task.done():
                return task.result()

    def stalled(number: int) -> bool:
        """The window can do nothing else: it is full, or everything behind the head is ready."""
        if len(tasks) >= prefetch or (end is not None and next_launch > end):
            return True
        return all(t.done() for n, t in tasks.items() if n != number)

    async def race(number: int, task: asyncio.Task[Page[T]]) -> Page[T]:
        assert hedger is not None
        spares[:] = [t for t in spares if not _reaped(t)]
        hedge = asyncio.ensure_future(fetch(number))
        spares.extend((task, hedge))
        st.hedges += 1
        hedger.sent()
        log.debug("page %d: overdue, hedged with a duplicate request", number)
        pair: set[asyncio.Task[Page[T]]] = {task, hedge}
        while True:
            done, pair = await asyncio.wait(pair, return_when=asyncio.FIRST_COMPLETED)
            for t in (task, hedge):  # the original first when both are done
                if t in done and not t.cancelled() and t.exception() is None:
                    for loser in pair:
                        hedger.lose(loser)
                    if t is hedge:
                        st.hedges_won += 1
                    return t.result()
            if not pair:  # both failed: the original's error
                return task.result()

    try:
        if first_alone:
            # The first page alone: it may bring the total, and a permanent error costs one request.
            top_up(1)
        else:
            top_up(prefetch)
        number = start_page
        current = await take(number)
        if current.total is not None:
            st.total = current.total
            total_end = start_page - 1 + _pages_for(last_page(current.total), start_page)
            end = total_end if end is None else min(end, total_end)
            spares.extend(_cancel_beyond(tasks, end, st))
        while True:
            count = len(current.items)
            if ends(number, count, st.total) or (end is not None and number >= end):
                st.last_page = number
                if count == 0 and total_end is not None and number < total_end:
                    st.empty_before_end += 1
                spares.extend(_cancel_beyond(tasks, number, st))
                if current.items:
                    yield _count(current, st)
                return
            # Pages launched and not yet consumed, the one in hand included, stay <= prefetch.
            top_up(prefetch - 1)
            yield _count(current, st)
            number += 1
            # The consumer is done with that page: its slot goes to the next page at once.
            top_up(prefetch)
            if number not in tasks:  # only past the end set by max_pages or the total
                return
            current = await take(number)
    finally:
        alarm.close()
        await _cancel_all([*tasks.values(), *spares])
        tasks.clear()


class _Alarm:
    """Wakes a waiter when its task is done or its deadline passes, whichever comes first.

    What `asyncio.wait((task,), timeout=)` does, without arming and cancelling
    a timer per call: the consumer waits on its head page once a page. One
    timer stays armed; a wait whose deadline is later lets it ring early, and
    it then re-arms itself for the deadline pending (if anyone still waits).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer: tuple[float, asyncio.TimerHandle] | None = None  # (when, handle)
        self._waiting: tuple[asyncio.Future[None], float] | None = None  # (waiter, deadline)

    async def wait(self, task: asyncio.Future[T], deadline: float) -> None:
        """Return when `task` is done or the loop's clock reaches `deadline`."""
        waiter = self._loop.create_future()
        self._waiting = (waiter, deadline)
        if self._timer is None or self._timer[0] > deadline:
            self.close()
            self._arm(deadline)
        task.add_done_callback(self._done)
        try:
            await waiter
        finally:
            task.remove_done_callback(self._done)
            self._waiting = None

    def close(self) -> None:
        """Cancel the armed timer, if any."""
        if self._timer is not None:
            self._timer[1].cancel()
            self._timer = None

    def _arm(self, at: float) -> None:
        self._timer = (at, self._loop.call_at(at, self._ring))

    def _done(self, _: object = None) -> None:
        if self._waiting is not None:
            waiter = self._waiting[0]
            if not waiter.done():
                waiter.set_result(None)

    def _ring(self) -> None:
        self._timer = None
        if self._waiting is not None:
            deadline = self._waiting[1]
            if self._loop.time() >= deadline:
                self._done()
            else:
                self._arm(deadline)


def _reaped(task: asyncio.Task[T]) -> bool:
    """Done (its outcome retrieved, so nothing is logged as never retrieved)."""
    if not task.done():
        return False
    if not task.cancelled():
        task.exception()
    return True


def _pages_for(last: int, start_page: int) -> int:
    """Pages from start_page to the `last` page (at least the first page)."""
    return max(1, last - start_page + 1)


def _count(page: Page[T], st: PagingStats) -> Page[T]:
    st.pages_yielded += 1
    st.items_yielded += len(page.items)
    return page


def _cancel_beyond(
    tasks: dict[int, asyncio.Task[Page[T]]], last: int, st: PagingStats
) -> list[asyncio.Task[Page[T]]]:
    """Cancel pages launched past the end at once; returns them for the run's `finally`."""
    beyond = [tasks.pop(n) for n in [n for n in tasks if n > last]]
    for task in beyond:
        task.cancel()
    st.wasted += len(beyond)
    return beyond


async def _cancel_all(pending: list[asyncio.Task[Page[T]]]) -> None:
    """Cancel what is still in flight and wait for every task, so none outlives the search.

    A second cancellation of the consumer while waiting does not cut the wait
    short: it is raised once every task has finished.
    """
    for t in pending:
        t.cancel()
    interrupted: asyncio.CancelledError | None = None
    waiting = [t for t in pending if not t.done()]
    while waiting:
        try:
            await asyncio.wait(waiting)
        except asyncio.CancelledError as exc:
            interrupted = exc
        waiting = [t for t in waiting if not t.done()]
    for t in pending:
        _reaped(t)
    if interrupted is not None:
        raise interrupted
