"""`sync_chats`: keep a change log current, one run at a time, on the export's engine.

The plan is `_syncplan` (windows, state, dedupe); this module loads the state,
opens the log in append mode, runs each query family through the export's
`Runner` in atomic mode (single-page leaves), and saves the state after every
committed leaf with the same atomic-write helper as an export's checkpoint.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

import attrs

from .. import Filter, ImiChatClient, InvalidQueryError
from .._query import build_query
from .._records import CONVERTER as converter
from . import _plan
from ._checkpoint import Checkpoint
from ._plan import Intervals, RawRecord, UserQuery, to_dt, to_us
from ._progress import ExportProgress, Progress, Tally
from ._runner import Runner
from ._sinks import FileSink, Sink, make_sink
from ._syncplan import (
    DEFAULT_LAG,
    STATE_VERSION,
    SyncState,
    Version,
    admit,
    begin_run,
    check_user_filters,
    family_plans,
    finish_run,
    lag_us,
    plan_windows,
    prune,
)


@attrs.frozen
class SyncReport:
    """What one `sync_chats` call did. `since`/`until` are the run's window `[lo, T1)`
    (`lo` is `since` on the first run, else B - lag); counts cover this call, except
    `appended`, which covers the whole run when it resumed an interrupted one."""

    since: datetime
    until: datetime  # T1, frozen at the run's start
    first_run: bool
    resumed: bool
    appended: int  # versions appended to the log by this run
    skipped: int  # versions read again (lag window, both families) the log already held
    leaves: int  # single-page slices committed
    splits: int
    pages: int
    requests: int
    retries: int
    pages_past_end: int  # pages requested past the end of a slice
    elapsed: float
    verified: bool  # every leaf was checked against a total sent by the server
    runs: int  # completed runs of this sync, this one included
    output: Path | None = None
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line: `window=… appended=… requests=… …`."""
        return (
            f"window={_plan.fmt(_us(self.since))}..{_plan.fmt(_us(self.until))} "
            f"appended={self.appended} skipped={self.skipped} leaves={self.leaves} "
            f"splits={self.splits} pages={self.pages} requests={self.requests} "
            f"retries={self.retries} past_end={self.pages_past_end} elapsed={self.elapsed:.2f}s"
        )


def _us(at: datetime) -> int:
    return to_us("at", at)


class _Store:
    """Where the state lives: a file (atomically replaced) or a caller's `SyncState`."""

    def __init__(self, target: SyncState | str | os.PathLike[str]) -> None:
        self.memory = target if isinstance(target, SyncState) else None
        path = None if isinstance(target, SyncState) else Path(target)
        self.file: Checkpoint[SyncState] = Checkpoint(
            path, resume=True, state_type=SyncState, version=STATE_VERSION, what="sync"
        )

    def load(self, key: dict[str, Any]) -> SyncState:
        if self.memory is None:
            return self.file.load(key) or SyncState(key=key)
        if self.memory.key is not None and self.memory.key != key:
            raise _plan_mismatch(self.memory.key, key)
        state = copy.deepcopy(self.memory)
        state.key = key
        return state

    async def save(self, state: SyncState) -> None:
        if self.memory is None:
            await self.file.save(state)
            return
        fresh = copy.deepcopy(state)
        for field in attrs.fields(SyncState):
            setattr(self.memory, field.name, getattr(fresh, field.name))


def _plan_mismatch(saved: Any, key: dict[str, Any]) -> Exception:
    from ._checkpoint import CheckpointError

    return CheckpointError(
        f"the sync state was made for other {Checkpoint.mismatch_hint(saved, key)}; "
        "use the same arguments, or a new state to start over"
    )


def check_sync_arguments(
    *,
    since: datetime | date | str,
    lag: float = DEFAULT_LAG,
    filters: Iterable[Filter | tuple[str, str, Any]] | None = None,
    **params: Any,
) -> None:
    """Raise `InvalidQueryError` for the arguments `sync_chats` would refuse (a bad filter,
    a filter on `created_at`/`updated_at`, `since`, `lag`), without a client or a request:
    for a caller that takes them long before the sync runs (the dlt source)."""
    filter_list = tuple(filters or ())
    build_query(params, filter_list)
    check_user_filters(UserQuery(filter_list, dict(params)))
    to_us("since", since)
    lag_us(lag)


async def sync_chats(
    client: ImiChatClient,
    *,
    since: datetime | date | str,
    state: SyncState | str | os.PathLike[str],
    sink: Sink | str | os.PathLike[str] | Callable[[RawRecord], Awaitable[Any]],
    lag: float = DEFAULT_LAG,
    filters: Iterable[Filter | tuple[str, str, Any]] | None = None,
    workers: int | None = None,
    progress: Callable[[ExportProgress], None] | None = None,
    **params: Any,
) -> SyncReport:
    """Append to `sink` every version of every chat created since `since` not yet appended.

    - The first run appends the chats created in `[since, T1)`, T1 the instant it
      started; a later run those whose `created_at` or `updated_at` lies in
      `[B - lag, T1)`, B the previous completed run's T1. Each version
      (`chat_id`, `updated_at`) is appended once across all runs, as the server
      sent it (README: "Incremental sync").
    - `state`: a file (small versioned JSON, replaced atomically after every
      leaf) or a `SyncState` updated in place (the caller persists it, e.g.
      `state_to_json(state)`). An interrupted run (crash, `kill -9`,
      cancellation) is finished by the next call with the same arguments,
      same T1; B advances only when a run completes.
    - `sink`: a path (appended to: `.csv` means CSV, else NDJSON), a file
      `Sink` (reopened in append mode), or an async callable taking one chat
      (at least once across a crash).
    - `lag`: seconds re-read below B (default `DEFAULT_LAG`, 300).
    - `filters` and keyword filters narrow every query (condition "and");
      filters on `created_at`/`updated_at` are refused (the sync owns them).
    - `workers`: slices read at once (default: the client's concurrency).

    Raises `InvalidQueryError` before any request for bad arguments,
    `CheckpointError` for a state made with other arguments (or a log that does not
    match it), the client's `ApiError`s. On any failure the state stays consistent.
    """
    await client.search_pages(filters=filters, raw=True, **params).aclose()  # checks them
    user = UserQuery(tuple(filters or ()), dict(params))
    check_user_filters(user)
    since_us = to_us("since", since)
    lag_val = lag_us(lag)
    n_workers = client.concurrency if workers is None else workers
    if not isinstance(n_workers, int) or isinstance(n_workers, bool) or n_workers < 1:
        raise InvalidQueryError(f"workers must be an int >= 1, got {n_workers!r:.40}")
    out = make_sink(sink, append=True)
    key = {
        "since": since_us,
        "lag_us": lag_val,
        "filters": user.identity(),
        "sink": out.describe(),
    }
    store = _Store(state)
    st = store.load(key)
    resumed = st.run is not None
    first = st.bound is None
    if st.run is None:
        st.run = begin_run(st, since_us, lag_val, to_us("now", _plan.utcnow()))
    run = st.run
    windows = plan_windows(run, since_us, lag_val, first)
    seen: set[Version] = {(cid, at) for cid, at in st.recent}
    tally = Tally(notes=[f"resumed the run of T1 {_plan.fmt(run.t1)}"] if resumed else [])
    bar = Progress(client, tally, progress)

    def take(records: Sequence[RawRecord]) -> Sequence[RawRecord]:
        fresh, skipped = admit(records, seen, windows.remember_from)
        run.appended += len(fresh)
        run.skipped += skipped
        return fresh

    await out.open(st.offset)
    ok = False
    try:
        st.offset = await out.sync()
        await store.save(st)
        for family, plan in family_plans(user, since_us, windows):
            done = Intervals(run.created_done if family == "created" else run.updated_done)

            async def save(
                offset: int | None, done: Intervals = done, family: str = family
            ) -> None:
                assert st.run is not None
                items = [(a, b) for a, b in done.items]
                if family == "created":
                    st.run.created_done = items
                else:
                    st.run.updated_done = items
                st.offset = offset
                st.recent = prune(seen, windows.remember_from)
                await store.save(st)

            runner = Runner(
                client,
                plan,
                out,
                tally=tally,
                done=done,
                save=save,
                progress=bar,
                workers=n_workers,
                slice_pages=1,
                atomic=True,
                admit=take,
            )
            await runner.run(done.gaps(plan.lo, plan.hi), spread=first)
            tally.verified = tally.verified and runner.reader.has_total is not False
        appended, skipped = run.appended, run.skipped
        st.recent = prune(seen, windows.remember_from)
        finish_run(st, lag_val)
        await store.save(st)
        await out.complete()
        ok = True
    finally:
        if not ok:
            out.close()
    bar.tell((), force=True)
    return SyncReport(
        since=to_dt(windows.lo),
        until=to_dt(windows.t1),
        first_run=first,
        resumed=resumed,
        appended=appended,
        skipped=skipped,
        leaves=tally.slices_done,
        splits=tally.splits,
        pages=tally.pages,
        requests=bar.requests(),
        retries=bar.retries(),
        pages_past_end=tally.wasted,
        elapsed=bar.elapsed(),
        verified=tally.verified,
        runs=st.runs,
        output=out.path if isinstance(out, FileSink) else None,
        notes=tuple(tally.notes),
    )


def state_from_json(raw: Any) -> SyncState:
    """A `SyncState` from its JSON form (`state_to_json(state)`), e.g. kept by dlt."""
    state: SyncState = converter.structure(raw, SyncState)
    return state


def state_to_json(state: SyncState) -> dict[str, Any]:
    """The JSON form of a `SyncState` (plain dicts, lists, strings and numbers), to persist
    where the caller keeps it (a dlt resource's state); `state_from_json` reads it back."""
    raw: dict[str, Any] = converter.unstructure(state)
    return raw
