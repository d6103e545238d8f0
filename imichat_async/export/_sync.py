"""`sync_chats`: keep a change log current, one run at a time, on the export's engine.

The plan is `_syncplan` (windows, state, dedupe); this module loads the state,
opens the log in append mode, runs each query family through the export's
`Runner` in atomic mode (single-page leaves), and saves the state after every
committed leaf with the same atomic-write helper as an export's checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

import attrs

from .. import Filter, ImiChatClient, InvalidQueryError
from . import _plan
from ._aio import in_thread
from ._checkpoint import Checkpoint, CheckpointError, check_directory, converter, tenant_of
from ._plan import Intervals, RawRecord, Slice, UserQuery, fmt, to_dt, to_us
from ._progress import ExportProgress, Progress, Tally
from ._runner import Runner
from ._sinks import FileSink, Sink, make_sink
from ._syncplan import (
    DEFAULT_LAG,
    MAX_TOLD,
    STATE_VERSION,
    SyncState,
    Undated,
    Version,
    VersionRange,
    admit,
    begin_run,
    check_user_filters,
    family_plans,
    finish_run,
    lag_us,
    plan_windows,
    prune,
    prune_undated,
)

log = logging.getLogger("imichat_async")
_US = 1_000_000


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
    #: the server's clock minus this machine's, seconds, measured when T1 was taken from
    #: the server's `Date` header; None when it sent none usable, or the run was resumed
    clock_skew: float | None = None

    def summary(self) -> str:
        """One line: `window=… appended=… requests=… … clock_skew=…`."""
        skew = "n/a" if self.clock_skew is None else f"{self.clock_skew:+.0f}s"
        return (
            f"window={_plan.fmt(_us(self.since))}..{_plan.fmt(_us(self.until))} "
            f"appended={self.appended} skipped={self.skipped} leaves={self.leaves} "
            f"splits={self.splits} pages={self.pages} requests={self.requests} "
            f"retries={self.retries} past_end={self.pages_past_end} elapsed={self.elapsed:.2f}s "
            f"clock_skew={skew}"
        )


def _us(at: datetime) -> int:
    return to_us("at", at)


class _Store:
    """Where the state lives: a file (atomically replaced) or a caller's `SyncState`."""

    def __init__(self, target: SyncState | str | os.PathLike[str]) -> None:
        self.memory = target if isinstance(target, SyncState) else None
        self.before = copy.deepcopy(self.memory)  # a caller's state as it was given
        path = None if isinstance(target, SyncState) else Path(target)
        self.file: Checkpoint[SyncState] = Checkpoint(
            path,
            resume=True,
            state_type=SyncState,
            version=STATE_VERSION,
            what="sync",
            noun="state",
        )

    def load(self, key: dict[str, Any]) -> SyncState:
        if self.memory is None:
            return self.file.load(key) or SyncState(key=key)
        if self.memory.key is not None:
            self.file.check_key(self.memory.key, key, "the sync state", ("new_state", None))
        state = copy.deepcopy(self.memory)
        state.key = key
        return state

    def forget(self) -> None:
        """Leave no trace of this call: delete the state file, or reset the caller's state
        to what it was before."""
        if self.memory is None:
            self.file.drop()
            return
        for field in attrs.fields(SyncState):
            setattr(self.memory, field.name, copy.deepcopy(getattr(self.before, field.name)))

    async def save(self, state: SyncState) -> None:
        if self.memory is None:
            await self.file.save(state)
            return
        fresh = copy.deepcopy(state)
        for field in attrs.fields(SyncState):
            setattr(self.memory, field.name, getattr(fresh, field.name))


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
    check_user_filters(UserQuery.checked(filters, params))
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
      started by the server's clock (its `Date` header; this machine's clock when
      it sends none); a later run those whose `created_at` or `updated_at` lies
      in `[B - lag, T1)`, B the previous completed run's T1. Each version
      (`chat_id`, `updated_at`; a digest of the record when it has no
      `updated_at`) is appended once across all runs, as the server sent it
      (README: "Incremental sync").
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
    match it: shorter than the state recorded, or longer than a completed run left
    it), the client's `ApiError`s. On any failure the state stays consistent; a
    first run that fails before appending anything leaves no state (a caller's
    `SyncState` is put back as it was) and no log it created.
    """
    user = UserQuery.checked(filters, params)
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
        **tenant_of(client.base_url, client.team_id),
    }
    if isinstance(out, FileSink):
        check_directory(out.path, "sink")
    store = _Store(state)
    if store.file.path is not None:
        check_directory(store.file.path, "state")
    st = store.load(key)
    resumed = st.run is not None
    first = st.bound is None
    log_path = out.path if isinstance(out, FileSink) else None
    log_existed = log_path is not None and await in_thread(log_path.exists)
    if isinstance(out, FileSink) and st.offset is None:
        await in_thread(out.check_unrecorded_log)  # before any request, as the others
    if log_path is not None and st.run is None and st.offset is not None:
        await in_thread(_check_completed_log, log_path, st.offset)
    tally = Tally(notes=[], told=list(st.told))
    bar = Progress(client, tally, progress)
    skew: float | None = None
    if st.run is None:
        now, skew = await _start_clock(client, user, since_us, lag_val, tally.notes)
        st.run = begin_run(st, since_us, lag_val, now)
    run = st.run
    if resumed:
        tally.notes.append(f"resumed the run of T1 {_plan.fmt(run.t1)}")
    windows = plan_windows(run, since_us, lag_val, first)
    seen: set[Version] = {(cid, at) for cid, at in st.recent}
    undated: dict[Undated, int] = {(cid, digest): at for cid, digest, at in st.undated}

    def take(records: Sequence[RawRecord]) -> Sequence[RawRecord]:
        fresh, skipped = admit(records, seen, windows.remember_from, undated, run.t1)
        run.appended += len(fresh)
        run.skipped += skipped
        return fresh

    def remember() -> None:
        st.recent = prune(seen, windows.remember_from)
        st.told = tally.told[-MAX_TOLD:]
        st.undated = prune_undated(undated, windows.remember_from)

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
                remember()
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
        remember()
        finish_run(st, lag_val)
        await store.save(st)
        await out.complete()
        ok = True
    except Exception:
        if first and not resumed and run.appended == 0:
            # A first run that wrote nothing leaves nothing (as an export does): a state
            # locking its arguments would only refuse the corrected command (issue #23).
            out.close()
            store.forget()
            if log_path is not None and not log_existed:
                await in_thread(_unlink, log_path)
        raise
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
        clock_skew=skew,
    )


async def _start_clock(
    client: ImiChatClient, user: UserQuery, since: int, lag: int, notes: list[str]
) -> tuple[int, float | None]:
    """A new run's start instant T1 (microseconds) and the server's clock skew (seconds).

    T1 is the server's clock: the `Date` header of a response to a query that
    matches nothing (`created_at >= since` and `< since`, one request), rounded
    down to the second. A client clock ahead of the server's by more than the
    lag would otherwise put T1 past chats the server has yet to stamp, and B -
    lag of the next run past them too: lost for good. Without a usable `Date`,
    T1 is this machine's clock (said in a note and a log line). The skew is the
    server's clock minus ours, measured when the answer arrived.
    """
    probe = VersionRange(user, since, since).search_args(Slice(since, since))
    pages = client.search_pages(raw=True, max_pages=1, **probe)
    try:
        async for _ in pages:
            pass
    finally:
        await pages.aclose()
    local = to_us("now", _plan.utcnow())
    # The client's latest answer: the probe's, or (same server) a concurrent search's.
    server = client.server_date
    if server is None:
        notes.append("the server sent no usable Date header: T1 is this machine's clock")
        log.warning("sync: no usable Date header; T1 %s from this machine's clock", fmt(local))
        return local, None
    t1 = to_us("Date", server)
    skew = (t1 - local) / _US
    level = logging.WARNING if abs(t1 - local) > lag else logging.INFO
    log.log(
        level,
        "sync: T1 %s from the server's clock (Date header), %+.0f s from this machine's clock",
        fmt(t1),
        skew,
    )
    if level == logging.WARNING:
        notes.append(f"the server's clock is {skew:+.0f} s from this machine's: T1 is the server's")
    return t1, skew


def _check_completed_log(path: Path, offset: int) -> None:
    """Refuse a log longer than a completed run left it: those bytes are someone else's.

    Bytes past the committed length of an interrupted run are that run's own (it
    died before saving the state) and are truncated on resume; after a completed
    run nothing of the sync's is uncommitted, so truncating would destroy what
    another writer appended. A missing or shorter log is the sink's to refuse.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size > offset:
        raise CheckpointError(
            f"the log {str(path)!r} holds {size} bytes, but the last completed sync left "
            f"{offset}: the {size - offset} bytes after them were written by something else. "
            f"Move them out (truncate the log to {offset} bytes) or start a new state and log"
        )


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def state_from_json(raw: Any) -> SyncState:
    """A `SyncState` from its JSON form (`state_to_json(state)`), e.g. kept by dlt."""
    state: SyncState = converter.structure(raw, SyncState)
    return state


def state_to_json(state: SyncState) -> dict[str, Any]:
    """The JSON form of a `SyncState` (plain dicts, lists, strings and numbers), to persist
    where the caller keeps it (a dlt resource's state); `state_from_json` reads it back."""
    raw: dict[str, Any] = converter.unstructure(state)
    return raw
