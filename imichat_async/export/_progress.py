"""What a run did: its running tally, the progress snapshots and the final report."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

import attrs

from .. import ImiChatClient
from ._plan import Slice

log = logging.getLogger("imichat_async")


@attrs.frozen
class ExportProgress:
    """A snapshot handed to the `progress` callback after every page and every slice."""

    records: int  # chats written so far (a resumed run counts those of earlier runs)
    fetched: int  # chats received in this run, slices in progress included
    duplicates: int
    pages: int  # pages read in this run
    requests: int  # HTTP attempts of the client in this run
    retries: int
    slices_done: int
    slices_pending: int
    total: int | None  # chats in the whole export: the totals the first slices announced
    elapsed: float
    received: int = 0  # records, plus the chats read in slices not yet written (for a bar)


@attrs.frozen
class ExportReport:
    """What an export did. `records`, `duplicates` and `slices` cover the whole export
    (earlier runs included), the `*_this_run` fields this run alone (None: not resumed, the
    same); splits, rereads, pages, requests, retries and elapsed cover this run."""

    records: int
    duplicates: int
    slices: int  # slices finished (whole export)
    splits: int  # slices found deep and split (this run)
    slices_reread: int  # slices re-read because their count came up short (this run)
    pages: int
    requests: int
    retries: int
    elapsed: float
    since: datetime
    until: datetime
    until_frozen: bool  # True when `until` is the instant frozen at the start
    verified: bool  # every slice's count met a total the server sent (none accepted short)
    resumed: bool
    output: Path | None = None
    notes: tuple[str, ...] = ()
    pages_wasted: int = 0  # pages requested past the end of a slice (no total sent)
    records_this_run: int | None = None  # a resumed export's chats written by this run
    duplicates_this_run: int | None = None
    slices_this_run: int | None = None

    def summary(self) -> str:
        """One line of `name=value` fields: `records=… duplicates=… slices=… splits=… …`;
        a resumed export's adds `records_this_run=…` after `records=…` (and so for
        duplicates and slices): the plain counts cover the whole export."""

        def count(name: str, whole: int, this_run: int | None) -> str:
            return f"{name}={whole}" + ("" if this_run is None else f" {name}_this_run={this_run}")

        return (
            f"{count('records', self.records, self.records_this_run)} "
            f"{count('duplicates', self.duplicates, self.duplicates_this_run)} "
            f"{count('slices', self.slices, self.slices_this_run)} "
            f"splits={self.splits} rereads={self.slices_reread} pages={self.pages} "
            f"requests={self.requests} retries={self.retries} elapsed={self.elapsed:.2f}s"
        )


@attrs.define
class Tally:
    """The counters of a run; records, duplicates, slices, verified and notes carry over
    from the checkpoint of a resumed run, the rest count this run only."""

    records: int = 0
    duplicates: int = 0
    slices_done: int = 0
    verified: bool = True
    notes: list[str] = attrs.field(factory=list)
    splits: int = 0
    rereads: int = 0
    pages: int = 0
    wasted: int = 0
    fetched: int = 0
    #: the keys of the notes `once` gave, earlier runs' first (a sync's state keeps them)
    told: list[str] = attrs.field(factory=list)

    def once(self, key: str, text: str) -> None:
        """A note that the same data would give on every run (a sync re-reading one dense
        instant in each run's lag window): in `notes` the first time its `key` is told,
        a log line (INFO) after that."""
        if key in self.told:
            log.info("%s (noted in an earlier run)", text)
            return
        self.told.append(key)
        self.notes.append(text)


class Progress:
    """Snapshots of a run for the `progress` callback, throttled to one per `interval`."""

    def __init__(
        self,
        client: ImiChatClient,
        tally: Tally,
        callback: Callable[[ExportProgress], None] | None,
        interval: float = 0.05,
    ) -> None:
        self.client = client
        self.tally = tally
        self.callback = callback
        self.interval = interval
        self.started = time.monotonic()
        self.requests0 = client.stats.requests
        self.retries0 = client.stats.retries
        self.records0 = tally.records  # written by earlier runs
        self.top: list[Slice] = []  # the slices the run started with
        self._last = 0.0

    def plan(self, slices: Iterable[Slice]) -> None:
        """The run's first slices: the totals they announce sum to the run's total."""
        self.top = list(slices)

    def requests(self) -> int:
        return self.client.stats.requests - self.requests0

    def retries(self) -> int:
        return self.client.stats.retries - self.retries0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def snapshot(self, active: Iterable[Slice]) -> ExportProgress:
        """The numbers now; `total` once every first slice announced its total.

        The first slices' totals, not their parts' guessed shares: on data that does not
        change, the total then never moves (issue #12: it jumped back and forth).
        """
        t = self.tally
        pending = list(active)
        total: int | None = self.records0
        for s in self.top:
            if s.estimate is None or total is None:
                total = None
                break
            total += s.estimate
        return ExportProgress(
            records=t.records,
            fetched=t.fetched,
            duplicates=t.duplicates,
            pages=t.pages,
            requests=self.requests(),
            retries=self.retries(),
            slices_done=t.slices_done,
            slices_pending=len(pending),
            total=None if total is None else max(total, t.records),
            elapsed=self.elapsed(),
            received=t.records + sum(s.received for s in pending),
        )

    def tell(self, active: Iterable[Slice], force: bool = False) -> None:
        """Call back with a snapshot (at most every `interval`, unless `force`)."""
        if self.callback is None:
            return
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            self.callback(self.snapshot(active))
