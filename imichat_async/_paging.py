"""The prefetch engine: pages fetched concurrently, handed out strictly in page order.

It is given `fetch(n)`, a coroutine function returning page n as a `Page`
(items and, when the server sent one, the total count), and knows nothing of
HTTP. It keeps a continuous window of page tasks (never windows waited on as
a batch): when page n is handed out the next page is started at once, so
`prefetch` requests stay in flight while the consumer works.

- The first page is fetched alone: its answer tells the total (when sent), so
  no page past the end is ever requested when the server sends a total, and a
  permanent error costs one request, not `prefetch`.
- Without a total, the end is the first short page; pages launched past it
  are cancelled and counted in `stats.wasted` (at most `prefetch - 1`).
- Memory: at most `prefetch` pages are held at once, counting the one the
  consumer holds; however many pages there are.
- Leaving early (break, exception, cancellation, `aclose()`) cancels every
  task in flight and waits for them, in a `finally`; no `yield` happens
  inside a task group or timeout block (PEP 789).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import attrs

T = TypeVar("T")
log = logging.getLogger("imichat_async")


@attrs.frozen
class Page(Generic[T]):
    """One page's items and the server's total match count, if it sent one."""

    number: int
    items: Sequence[T]
    total: int | None = None


@attrs.define
class PagingStats:
    """What one paging run did: for tests, summaries and benchmarks."""

    pages_requested: int = 0
    pages_yielded: int = 0
    items_yielded: int = 0
    wasted: int = 0  # pages requested past the end (their answers unused)
    total: int | None = None
    last_page: int | None = None  # the last page number, once known


async def iterate_pages(
    fetch: Callable[[int], Awaitable[Page[T]]],
    *,
    page_size: int,
    prefetch: int = 8,
    start_page: int = 1,
    max_pages: int | None = None,
    stats: PagingStats | None = None,
) -> AsyncGenerator[Page[T], None]:
    """Yield pages `start_page, start_page+1, ...` in order until the data or `max_pages` ends."""
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
    tasks: dict[int, asyncio.Task[Page[T]]] = {}
    next_launch = start_page + 1

    def _top_up(tasks: dict[int, asyncio.Task[Page[T]]], size: int) -> None:
        nonlocal next_launch
        while len(tasks) < size and (end is None or next_launch <= end):
            tasks[next_launch] = asyncio.ensure_future(fetch(next_launch))
            st.pages_requested += 1
            next_launch += 1

    try:
        # The first page alone: it may bring the total, and a permanent error costs one request.
        st.pages_requested += 1
        current = await fetch(start_page)
        if current.total is not None:
            st.total = current.total
            known_end = start_page - 1 + _pages_for(current.total, page_size, start_page)
            end = known_end if end is None else min(end, known_end)
        number = start_page
        while True:
            if len(current.items) < page_size or (end is not None and number >= end):
                st.last_page = number
                _cancel_beyond(tasks, number, st)
                if current.items:
                    yield _count(current, st)
                return
            # Pages launched and not yet consumed, the one in hand included, stay <= prefetch.
            _top_up(tasks, prefetch - 1)
            yield _count(current, st)
            number += 1
            # The consumer is done with that page: its slot goes to the next page at once.
            _top_up(tasks, prefetch)
            task = tasks.get(number)
            if task is None:  # only past the end set by max_pages or the total
                return
            current = await task
            del tasks[number]
    finally:
        await _cancel_all(tasks)


def _pages_for(total: int, page_size: int, start_page: int) -> int:
    """Pages from start_page to the end for `total` matches (at least the first page)."""
    last = -(-total // page_size)
    return max(1, last - start_page + 1)


def _count(page: Page[T], st: PagingStats) -> Page[T]:
    st.pages_yielded += 1
    st.items_yielded += len(page.items)
    return page


def _cancel_beyond(tasks: dict[int, asyncio.Task[Page[T]]], last: int, st: PagingStats) -> None:
    """Cancel pages launched past the end; the `finally` of the run awaits them."""
    for n, task in tasks.items():
        if n > last and not task.done():
            task.cancel()
        if n > last:
            st.wasted += 1


async def _cancel_all(tasks: dict[int, asyncio.Task[Page[T]]]) -> None:
    """Cancel what is still in flight and wait for it, so no task outlives the search."""
    pending = list(tasks.values())
    tasks.clear()
    for t in pending:
        t.cancel()
    if pending:
        # Shielded: a second cancellation of the consumer must not leave these un-awaited.
        await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))
