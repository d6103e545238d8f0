"""Who is served next: one queue per search, the search closest to done first.

Pure bookkeeping, no asyncio and no clock: the limiter pushes its waiters
with their search (a `Flow`) and rank (the page number), and pops them in
this order when a slot (and a token) is free:

- Between searches, SRPT (shortest remaining processing time): the search
  with the fewest pages left goes first. A search is sized once it says how
  many pages it will request in all (`Flow.ends_at`, told by the fetch path
  from the first page's total; a `max_pages` cap sizes it from the start):
  its pages left are that size less the requests granted to it. A search
  not sized yet is ranked by the requests it has had (least attained
  service), but never ahead of the typical search: the median size of the
  last `TYPICAL_OF` searches sized, capped at the `horizon` (the client's
  concurrency: a search with no more pages left than that needs one round of
  all the slots, and a newcomer put before it would not finish sooner). So a
  new search waits behind the started ones that will finish sooner, and
  equal searches finish one after the other instead of all near the end,
  while a new search still goes before a long one. Before any search is
  sized, the least served goes first.
- Background searches (`priority="background"`: exports, syncs) come after
  every interactive one, and among themselves in the same order.
- Aging: while more than one search waits, one grant in `SHARE` goes to the
  search that order serves last (background before interactive, then most
  pages left; ties: the one waiting since longest). So a long or background
  search keeps at least 1/`SHARE` of the requests granted while it waits,
  beside any number of short interactive ones: an export progresses through
  a burst of small searches, a big search through a stream of them.
- Ties between searches: the one that came first. Within a search, the
  lowest rank first (its head page, a retry of it included); ties and no
  rank: first come.

Waiters of a `Flow` keep its counts for the search's life. Any other
hashable group (tests, callers without a search) is a search while it has
requests waiting; `None` is one such group, served first come.

Choosing scans the searches waiting (a few hundred at most for a client
with a concurrency in the tens): no heap to keep in order while sizes change.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import statistics
from collections.abc import Hashable
from typing import Generic, Literal, TypeVar

T = TypeVar("T")
_Entry = tuple[float, int, T]  # (rank, arrival, item): arrival is unique, so no tie
_NO_GROUP: Hashable = object()  # the group of a `Flow` made by `Scheduler.flow`

Priority = Literal["interactive", "background"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "background")
SHARE = 16  # one grant in SHARE goes to the search served last (with several waiting)
TYPICAL_OF = 64  # sizes of the last searches sized; their median is a new search's rank


class Flow(Generic[T]):
    """One search at the scheduler: its requests waiting, its size once known, what it has had.

    `first` is the rank of its first page and `cap` the most pages it will
    request (`max_pages`), if known.
    """

    __slots__ = (
        "_group",
        "_queue",
        "_sched",
        "arrival",
        "background",
        "cap",
        "first",
        "granted",
        "pages",
    )

    def __init__(
        self,
        sched: Scheduler[T],
        arrival: int,
        *,
        priority: Priority = "interactive",
        first: int = 1,
        cap: int | None = None,
    ) -> None:
        if priority not in PRIORITIES:
            raise ValueError(f'priority must be "interactive" or "background", got {priority!r}')
        self._sched = sched
        self.arrival = arrival
        self.background = priority == "background"
        self.first = first
        self.cap = cap
        self.granted = 0  # requests granted to it so far (retries and hedges count)
        self.pages: int | None = None  # pages it requests in all, once known
        self._queue: list[_Entry[T]] = []
        self._group = _NO_GROUP  # or the plain group it stands for, while it waits
        if cap is not None:
            self._sized(max(1, cap))

    def __repr__(self) -> str:
        kind = "background" if self.background else "interactive"
        return f"<Flow {kind} pages={self.pages} granted={self.granted} waiting={len(self._queue)}>"

    def ends_at(self, last: int) -> None:
        """Its last page is `last` (from the server's total): that sizes it, within its cap."""
        pages = max(1, last - self.first + 1)
        if self.cap is not None:
            pages = min(pages, self.cap)
        if pages != self.pages:
            self._sized(pages)

    @property
    def left(self) -> int | None:
        """Pages it has still to be granted, once sized (0 once all were: a retry then)."""
        return None if self.pages is None else max(0, self.pages - self.granted)

    def _sized(self, pages: int) -> None:
        if self.pages is None:
            self._sched._sizes_seen(pages)
        self.pages = pages

    def _key(self, typical: int) -> tuple[bool, int, int]:
        """The order between searches: interactive first, fewest pages left, first come."""
        pages = self.pages
        if pages is not None:
            return (self.background, max(0, pages - self.granted), self.arrival)
        return (self.background, max(self.granted, typical), self.arrival)

    def _aged_key(self, typical: int) -> tuple[bool, int, int]:
        """The order of the aging turn: the search served last by `_key`, oldest of equals."""
        background, left, arrival = self._key(typical)
        return (background, left, -arrival)


class Scheduler(Generic[T]):
    """Queues of items (the limiter's waiters) per search, popped in the order above."""

    def __init__(self, *, share: int = SHARE, horizon: int | None = None) -> None:
        if share < 2:
            raise ValueError("share must be at least 2")
        self.share = share
        self.horizon = horizon  # the rank of a new search is never above this (None: no cap)
        self._waiting: dict[Flow[T], None] = {}  # searches with items queued, in no order
        self._groups: dict[Hashable, Flow[T]] = {}  # flows of plain groups, while they wait
        self._arrivals = itertools.count()
        self._turn = 0  # grants made while several searches waited, since the last aging turn
        self._recent: collections.deque[int] = collections.deque(maxlen=TYPICAL_OF)
        self.typical = 0  # the median size of the searches sized lately, capped (0: none yet)
        self.aged = 0  # grants made by the aging turn

    def flow(
        self, priority: Priority = "interactive", *, first: int = 1, cap: int | None = None
    ) -> Flow[T]:
        """A new search: pass it as the group of its requests."""
        return Flow(self, next(self._arrivals), priority=priority, first=first, cap=cap)

    def __len__(self) -> int:
        """Items waiting, in all searches."""
        return sum(len(f._queue) for f in self._waiting)

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def push(self, group: Hashable, rank: float | None, item: T) -> tuple[Flow[T], _Entry[T]]:
        """Queue `item`; returns its search and a handle for `remove`."""
        flow = group if isinstance(group, Flow) else self._groups.get(group)
        if flow is None:
            flow = self._groups[group] = self.flow()
            flow._group = group
        arrival = next(self._arrivals)
        entry = (arrival if rank is None else rank, arrival, item)
        heapq.heappush(flow._queue, entry)
        self._waiting[flow] = None
        return flow, entry

    def granted(self, group: Hashable) -> None:
        """A request of `group` went without waiting (no one was in line): count it."""
        if isinstance(group, Flow):
            group.granted += 1

    def peek(self) -> T:
        """The item `pop` would return now."""
        return self._choose()._queue[0][2]

    def pop(self) -> T:
        """The next item by the policy; raises `IndexError` when nothing waits."""
        flow = self._choose()
        if len(self._waiting) > 1:
            self._turn += 1
            if self._turn == self.share:  # this was the aging turn
                self._turn = 0
                if flow is not self._best():
                    self.aged += 1
        item = heapq.heappop(flow._queue)[2]
        flow.granted += 1
        if not flow._queue:
            self._drop(flow)
        return item

    def remove(self, flow: Flow[T], entry: _Entry[T]) -> bool:
        """Take a cancelled item out of its queue; False if it is not there (popped)."""
        queue = flow._queue
        try:
            queue.remove(entry)
        except ValueError:
            return False
        if queue:
            heapq.heapify(queue)
        else:
            self._drop(flow)
        return True

    def _drop(self, flow: Flow[T]) -> None:
        del self._waiting[flow]
        if flow._group is not _NO_GROUP:
            del self._groups[flow._group]

    def _best(self) -> Flow[T]:
        typical = self.typical
        return min(self._waiting, key=lambda f: f._key(typical))

    def _choose(self) -> Flow[T]:
        waiting = self._waiting
        if not waiting:
            raise IndexError("nothing waits")
        if len(waiting) == 1:
            return next(iter(waiting))
        if self._turn == self.share - 1:  # the aging turn
            typical = self.typical
            return max(waiting, key=lambda f: f._aged_key(typical))
        return self._best()

    def _sizes_seen(self, pages: int) -> None:
        """A search was sized: the typical size again (once a search, 64 numbers sorted)."""
        self._recent.append(pages)
        median = statistics.median_low(self._recent)
        self.typical = median if self.horizon is None else min(median, self.horizon)
