"""The runner: a pool of workers reads the slices of a plan and commits each finished one.

It knows nothing of what the slices mean (the plan says that) nor of files
(the sink and the checkpoint's `save` callback do). For each slice:

- `SliceReader` pages it through `client.search_pages(raw=True)`, splits it
  when it turns out deep (at once from the server's total, or after
  `slice_pages` full pages without one), checks its distinct count against
  the totals and re-reads it when it came up short;
- `Runner.commit` writes it to the sink, syncs, marks its window done and
  saves the checkpoint, one slice at a time.

Records are de-duplicated within a slice and its re-reads only: a record
belongs to exactly one slice of the plan's axis, so memory stays flat
however long the export. A plan whose records may come up in several slices
(a sync's two query families) de-duplicates across them with `Runner(admit=)`,
called under the commit lock before each write.

Atomic leaves (`atomic=True`, a sync): a slice is read as ONE page, the only
read that is a snapshot of the server at one instant. A short page (fewer
than a page of records, or a total within the page) holds the whole slice:
it is done. A full page means "maybe more": the slice is split by time (into
pieces from the total when the server sends one) and its children are read
the same way. A slice one
microsecond wide that still fills a page cannot be split: it is paged whole,
again and again, until two reads in a row give the same records
(`MAX_REREADS` at most; a note says when they never agreed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from contextlib import aclosing
from typing import Any, Literal

import attrs

from .. import ImiChatClient, PagingStats
from ._aio import cancel_and_wait, uncancelled
from ._plan import (
    SPLIT_SLACK,
    Intervals,
    Plan,
    RawRecord,
    Slice,
    first_slices,
    fmt,
    pieces_for_total,
    pieces_without_total,
    split,
)
from ._progress import Progress, Tally
from ._sinks import Sink

FIRST_SLICES = 8  # slices a run starts with, at most, whatever the workers (issue #12)
MAX_REREADS = 3  # re-reads of one slice whose count stays short before it is accepted as is
ATOMIC_SPLIT_NO_TOTAL = 4  # pieces for a full single page without a total (atomic leaves)


@attrs.frozen
class Split:
    """A slice found deep: cut it into `pieces`, expecting `estimate` records in all."""

    pieces: int
    estimate: int | None


class SliceReader:
    """Reads one slice to its end, verified against the server's totals, or says to split it."""

    def __init__(
        self,
        client: ImiChatClient,
        plan: Plan,
        tally: Tally,
        *,
        slice_pages: int,
        prefetch: Callable[[], int],
        on_page: Callable[[], None],
        atomic: bool = False,
        text: bool = False,
    ) -> None:
        self.atomic = atomic
        #: the records' form: dicts as sent (`RawChat`s), or with `text` their texts alone
        #: (`ChatText`s: no dict per chat, for a sink that writes the bytes as sent)
        self.raw: bool | Literal["text"] = "text" if text else True
        self.client = client
        self.plan = plan
        self.tally = tally
        self.slice_pages = slice_pages
        self.prefetch = prefetch
        self.on_page = on_page
        self.page_size: int | None = None  # learned from the first full page
        self.has_total: bool | None = None  # does the server send X-Total-Count? (learned)

    async def read(self, s: Slice) -> list[RawRecord] | Split:
        """The records of `s`, each once (re-read while short), or how to split it."""
        if self.atomic:
            if s.hi - s.lo >= 2:
                return await self.read_leaf(s)
            return await self.read_until_stable(s)
        merged: dict[Hashable, RawRecord] = {}
        keyless: list[RawRecord] = []
        attempt = 0
        while True:
            attempt += 1
            s.received = len(merged) + len(keyless)  # a re-read counts what it adds
            outcome = await self.read_once(s, may_split=attempt == 1 and s.hi - s.lo >= 2)
            if isinstance(outcome, Split):
                return outcome
            records, totals = outcome
            before = len(merged)
            keyless = self.merge(records, merged)
            got = len(merged) + len(keyless)
            if not self.verify(s, attempt, got, got - before, totals):
                break
            self.tally.rereads += 1
        return [*merged.values(), *keyless]

    async def read_leaf(self, s: Slice) -> list[RawRecord] | Split:
        """Atomic mode: page 1 alone; complete, or split (from its total when it has one)."""
        stats = PagingStats()
        pages = self.client.search_pages(
            raw=self.raw,
            prefetch=1,
            max_pages=1,
            stats=stats,
            priority="background",
            **self.plan.search_args(s),
        )
        items: Sequence[RawRecord] = ()
        total: int | None = None
        try:
            async with aclosing(pages) as it:
                async for page in it:
                    items, total = page.items, page.total
        finally:
            self.tally.wasted += stats.wasted
        self.tally.pages += 1
        self.tally.fetched += len(items)
        if items:  # an empty result yields no page: it says nothing of the header
            self.has_total = total is not None
        if total is not None:
            s.estimate = total
        self.on_page()
        size = self.page_size or self.client.page_size
        if len(items) < size or (total is not None and total <= len(items)):
            records: dict[Hashable, RawRecord] = {}
            return self.merge(items, records) + list(records.values())
        self.tally.fetched -= len(items)
        if total is None:
            return Split(ATOMIC_SPLIT_NO_TOTAL, None)
        return Split(max(2, -(-int(total * SPLIT_SLACK) // size)), total)

    async def read_until_stable(self, s: Slice) -> list[RawRecord]:
        """Atomic mode, a slice too narrow to split: paged whole until two reads agree."""
        where = f"slice {fmt(s.lo)}..{fmt(s.hi)}"
        previous: set[Hashable] | None = None
        merged: dict[Hashable, RawRecord] = {}
        keyless: list[RawRecord] = []
        for attempt in range(1, MAX_REREADS + 2):
            outcome = await self.read_once(s, may_split=False)
            assert not isinstance(outcome, Split)
            merged_now: dict[Hashable, RawRecord] = {}
            keyless = self.merge(outcome[0], merged_now)
            keys = set(merged_now)
            merged = merged_now
            if keys == previous:
                self.tally.once("narrow", f"{where}: too narrow to split, paged {attempt} times")
                break
            if previous is not None:
                self.tally.rereads += 1
            previous = keys
        else:
            self.tally.verified = False  # kept a read that no other read confirmed
            self.tally.notes.append(
                f"{where}: too narrow to split and its reads never agreed; kept the last"
            )
        return [*merged.values(), *keyless]

    def merge(self, records: Sequence[RawRecord], merged: dict[Hashable, RawRecord]) -> list[Any]:
        """Add one read's records to `merged` (a re-read brings the fresher version); return
        those without a key. The same record twice in one read (pages shifted) counts once."""
        key_of = self.plan.key
        seen_here: set[Hashable] = set()
        keyless: list[RawRecord] = []
        for r in records:
            key = key_of(r)
            if key is None:
                keyless.append(r)
            elif key in seen_here:
                self.tally.duplicates += 1
            else:
                seen_here.add(key)
                merged[key] = r
        return keyless

    def verify(
        self, s: Slice, attempt: int, got: int, added: int, totals: Sequence[int | None]
    ) -> bool:
        """Whether to re-read: the distinct count is short of a total, or the total moved."""
        t = self.tally
        where = f"slice {fmt(s.lo)}..{fmt(s.hi)}"
        expected = totals[-1] if totals else None
        if expected is None or None in totals:
            t.verified = False
            return False
        stable = len(set(totals)) == 1
        if got >= expected and stable:
            if attempt > 1:
                t.notes.append(
                    f"{where}: complete after {attempt - 1} re-read(s), {got} chats "
                    f"(+{added} on the last)"
                )
            return False
        if attempt > MAX_REREADS:
            t.verified = False  # accepted short: its count never matched the total
            t.notes.append(
                f"{where}: still short after {MAX_REREADS} re-reads: {got} chats of "
                f"{expected}; kept what was read"
            )
            return False
        why = "its total changed while paging" if not stable else "it came up short"
        t.notes.append(f"{where}: re-reading, {why} ({got} distinct chats, total {expected})")
        return True

    async def read_once(
        self, s: Slice, *, may_split: bool
    ) -> Split | tuple[list[RawRecord], list[int | None]]:
        """One pass over the pages of `s`: its records and the total each page announced."""
        records: list[RawRecord] = []
        totals: list[int | None] = []
        stats = PagingStats()
        pages = self.client.search_pages(
            raw=self.raw,
            prefetch=self.prefetch(),
            stats=stats,
            priority="background",
            **self.plan.search_args(s),
        )
        try:
            async with aclosing(pages) as it:
                async for page in it:
                    if not page.last:
                        self.page_size = len(page.items)
                    if not totals:
                        self.has_total = page.total is not None
                        if page.total is not None:
                            s.estimate = page.total
                        if page.total is not None and may_split and not page.last:
                            pieces = pieces_for_total(page.total, len(page.items), self.slice_pages)
                            if pieces:
                                return Split(pieces, page.total)
                    totals.append(page.total)
                    records.extend(page.items)
                    self.tally.pages += 1
                    self.tally.fetched += len(page.items)
                    s.received += len(page.items)
                    if page.total is None and may_split and not page.last:
                        deep = await self.deep_without_total(s, len(totals), records)
                        if deep is not None:
                            self.tally.fetched -= len(records)
                            return deep
                    self.on_page()
        finally:
            self.tally.wasted += stats.wasted
        if not totals and stats.total is not None:
            # No page was yielded (an empty slice), but the first answer brought its total:
            # `X-Total-Count: 0` verifies the slice as much as any total does.
            self.has_total = True
            s.estimate = stats.total
            totals.append(stats.total)
        return records, totals

    async def deep_without_total(
        self, s: Slice, pages: int, records: list[RawRecord]
    ) -> Split | None:
        """Without a total, whether `s` is deeper than `slice_pages`, and how to split it."""
        size = self.page_size or len(records)
        if pages == 1:
            # One request past the depth limit tells whether it is deep.
            beyond = await self.probe(s, self.slice_pages + 1)
            if beyond:
                return self.split_by_span(s, (self.slice_pages + 1) * size, [*records, *beyond])
        elif pages >= self.slice_pages:  # grew while paging
            return self.split_by_span(s, len(records), records)
        return None

    async def probe(self, s: Slice, number: int) -> Sequence[RawRecord]:
        """The records of page `number` of slice `s` (empty past its end)."""
        pages = self.client.search_pages(
            raw=self.raw,
            prefetch=1,
            start_page=number,
            max_pages=1,
            priority="background",
            **self.plan.search_args(s),
        )
        async with aclosing(pages) as it:
            async for page in it:
                items: Sequence[RawRecord] = page.items
                return items
        return ()

    def split_by_span(self, s: Slice, count: int, sample: Sequence[RawRecord]) -> Split:
        """How to split a deep slice without a total: from the span of the records seen."""
        positions = [p for p in map(self.plan.position, sample) if p is not None]
        oldest = min(positions) if positions else None
        size = self.page_size or max(1, len(sample))
        return Split(pieces_without_total(s, count, oldest, size, self.slice_pages), None)


class Runner:
    """The engine: `workers` slices read at once, each committed when finished.

    `save(offset)` persists the run's state after each commit (the checkpoint);
    requests in flight stay bounded by the client's own concurrency.
    `durable=False` (nothing will resume the run: no checkpoint) records a finished
    slice without syncing the sink first; the sink is synced once, when it completes.
    `text`: read the records as `ChatText`s (their bytes as sent, never parsed into
    dicts) for a sink that writes them so (`Sink.takes_text`); the plan's `key` and
    `position` read them as they read dicts.
    """

    def __init__(
        self,
        client: ImiChatClient,
        plan: Plan,
        sink: Sink,
        *,
        tally: Tally,
        done: Intervals,
        save: Callable[[int | None], Awaitable[None]],
        progress: Progress,
        workers: int,
        slice_pages: int,
        atomic: bool = False,
        admit: Callable[[Sequence[RawRecord]], Sequence[RawRecord]] | None = None,
        text: bool = False,
        durable: bool = True,
    ) -> None:
        self.sync_each = durable  # sync the sink before recording each slice
        self.client = client
        self.admit = admit
        self.sink = sink
        self.tally = tally
        self.done = done
        self.save = save
        self.progress = progress
        self.workers = workers
        self.active: set[Slice] = set()
        self.pending: list[tuple[Slice, int]] = []  # written, not yet synced: (slice, records)
        self.durable = asyncio.Lock()  # a batching sink's batch being written (one at a time)
        self.broken: BaseException | None = None  # why a batch could not be written
        self.running = 0
        self.queue: asyncio.Queue[Slice] = asyncio.Queue()
        self.lock = asyncio.Lock()
        self.reader = SliceReader(
            client,
            plan,
            tally,
            slice_pages=slice_pages,
            prefetch=self.prefetch,
            on_page=self.tell,
            atomic=atomic,
            text=text,
        )

    def tell(self, force: bool = False) -> None:
        self.progress.tell(self.active, force)

    async def run(self, gaps: Sequence[tuple[int, int]], *, spread: bool = True) -> None:
        """Read every window of `gaps`; return when all are committed, or raise the first error.

        `spread`: cut the gaps so that every worker starts with a slice (else one slice
        per gap: a window expected nearly empty costs one request). On any exit (error,
        cancellation, even repeated) every worker is cancelled and awaited before this
        returns.
        """
        # The first cut does not grow with the workers: deep slices are split by the data
        # (their totals), so a huge `workers` costs no empty slices and no extra requests.
        slices = first_slices(gaps, min(self.workers, FIRST_SLICES) if spread else 1)
        if not slices:
            return
        self.progress.plan(slices)
        for s in slices:
            self.enqueue(s)
        tasks = [asyncio.ensure_future(self.worker()) for _ in range(self.workers)]
        joiner = asyncio.ensure_future(self.queue.join())
        try:
            finished, _ = await asyncio.wait([joiner, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in finished:
                if t is not joiner:
                    t.result()  # a worker only ends by raising: re-raise its error here
        finally:
            await cancel_and_wait([joiner, *tasks])
        await self.flush()

    def enqueue(self, s: Slice) -> None:
        self.active.add(s)
        self.queue.put_nowait(s)

    async def worker(self) -> None:
        while True:
            s = await self.queue.get()
            self.running += 1
            try:
                outcome = await self.reader.read(s)
                if isinstance(outcome, Split):
                    self.split(s, outcome)
                else:
                    await self.commit(s, outcome)
            finally:
                self.running -= 1
                self.queue.task_done()

    def prefetch(self) -> int:
        """Pages a slice may have requested at once.

        With totals, no page past a slice's end is ever requested, so every slice may use
        the whole bound: the client's limiter shares it, and slices that finish leave their
        share to the rest (no tail where one deep slice pages alone). Without totals, the
        pages launched past the end are wasted, so the bound is divided among the slices.
        """
        concurrency = self.client.concurrency
        if self.reader.has_total:
            return concurrency
        busy = max(1, self.queue.qsize() + self.running)
        return max(1, min(concurrency, concurrency // busy))

    def split(self, s: Slice, how: Split) -> None:
        self.tally.splits += 1
        self.active.discard(s)
        for part in split(s, how.pieces, how.estimate):
            self.enqueue(part)
        self.tell()

    async def commit(self, s: Slice, records: Sequence[RawRecord]) -> None:
        """Write a finished slice, make it durable, then record it in the checkpoint.

        A batching sink (`Sink.batching`) keeps finished slices until a batch is full
        (`Sink.holds`): they are recorded in the checkpoint only once the sink has written
        them, all at once. Without `admit`, a full batch is written while the next fills
        (one batch in flight at most, recorded in order); with it (a sync: what `admit`
        has seen goes into the saved state), each batch is written before the next slice.
        """
        finish: list[Callable[[], Awaitable[None]]] = []
        async with self.lock:
            if self.admit is not None:
                records = self.admit(records)
            if self.pending and not self.sink.holds(len(records)):
                finish.append(await self.detach())  # the batch is full: it goes first
            await self.sink.write(records)  # a file sink does not await: no cancellation here
            self.pending.append((s, len(records)))
            if not self.sink.batching:
                sync = self.sink.sync if self.sync_each else _not_synced
                await uncancelled(self.make_durable(self.take(), sync))
            elif not self.sink.holds(0):  # one slice over a batch on its own
                if finish:
                    await finish.pop()()
                finish.append(await self.detach())
            if self.admit is not None and finish:
                await finish.pop()()
        if finish:
            await finish.pop()()
        self.tell(force=True)

    def take(self) -> list[tuple[Slice, int]]:
        taken, self.pending = self.pending, []
        return taken

    async def detach(self) -> Callable[[], Awaitable[None]]:
        """Take the slices a batching sink holds as one batch, once the batch before it is
        written; return the call that writes it and records it (in order)."""
        await self.durable.acquire()
        try:
            if self.broken is not None:
                raise self.broken  # the run ends with that batch's error, whichever worker
            slices = self.take()
            write = self.sink.detach()
        except BaseException:
            self.durable.release()
            raise

        async def finish() -> None:
            try:
                await uncancelled(self.make_durable(slices, write))
            except BaseException as exc:
                self.broken = exc  # no later batch may be recorded before this one
                raise
            finally:
                self.durable.release()

        return finish

    async def flush(self) -> None:
        """Write and record the slices a batching sink still holds (the run's end)."""
        async with self.lock:
            finish = await self.detach() if self.pending else None
        if finish is not None:
            await finish()

    async def make_durable(
        self, slices: Sequence[tuple[Slice, int]], write: Callable[[], Awaitable[int | None]]
    ) -> None:
        """Make the sink durable (`write`), mark `slices` done, save the checkpoint: all of
        it, once started."""
        offset = await write()
        for s, records in slices:
            self.done.add(s.lo, s.hi)
            self.tally.records += records
            self.tally.slices_done += 1
            self.active.discard(s)
        await self.save(offset)


async def _not_synced() -> None:
    """A sink's `sync` when nothing resumes the run: no I/O, no length to record."""
    return None
