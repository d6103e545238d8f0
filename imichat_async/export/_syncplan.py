"""The sync's plan and state: which windows a run reads, and what STATE keeps. Pure: no I/O.

A sync keeps a change log current: each version of a chat, the pair
(`chat_id`, `updated_at`), appended once across all runs. Times are integer
microseconds since the epoch, as in `_plan`.

Windows (`plan_windows`):

- the first run reads `created_at` in `[since, T1)`, T1 the instant the run
  started by the server's clock (frozen in the state, so a resumed run reads
  the same windows);
- a later run reads two query families, `created_at` in `[B - lag, T1)` and
  `updated_at` in `[B - lag, T1)` (the latter with `created_at >= since`, so
  the log holds the chats created since `since` and nothing else), B the T1
  of the previous completed run. Filters are flat: one query cannot say
  "created or updated", hence two families.

Why every version is read: the runner reads each slice as one page (an
atomic snapshot), splitting it by time while it fills a page. A chat that
did not change during the run lies in its leaf's window at the instant that
leaf is read, so it is read. A chat that changed has `updated_at >= T1`
(give or take the server's clock, which the lag covers) and the next run's
`updated_at >= B - lag` window holds it.

Dedupe (`SyncState.recent`): every version a later run can return has
`updated_at >= B - lag` (`updated_at >= created_at`), so the state keeps the
versions appended with `updated_at >= T1 - lag`, the next run's lower bound,
and no others (`prune`). Within a run the two families may return the same
version: the run remembers every version it appended from its lower bound on
(`Windows.remember_from`); the first run needs no more than the next run
will (a chat's `created_at` puts it in exactly one leaf).

Undated versions (`SyncState.undated`): a record whose `updated_at` is missing,
null or not a datetime (the wire contract lets any optional field be) has no
time to key or prune by. Its version is (`chat_id`, a digest of the record as
sent): read again unchanged it is skipped, changed (or given an `updated_at`)
it is a new version. It is remembered with the T1 of the run that appended
it and pruned like the others: whatever window read it (`created_at`, or an
`updated_at` the server holds but did not send) lies below that T1, so no run
after the next one can read it again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import attrs

from .. import Filter, InvalidQueryError
from ._plan import TIME_PARAMS, RawRecord, TimeRange, UserQuery, chat_key, fmt, to_dt, to_us

DEFAULT_LAG = 300.0  # seconds re-read below B: writes that become visible late, clock skew
STATE_VERSION = 1
MAX_TOLD = 50  # note keys a state keeps (SyncState.told)
_US = 1_000_000

Version = tuple[str, int]  # (chat_id, updated_at in microseconds)
Undated = tuple[str, str]  # (chat_id, digest of the record): a version without updated_at


def version_of(record: RawRecord) -> Version | None:
    """A record's (`chat_id`, `updated_at` in microseconds), or None without both."""
    chat_id = chat_key(record)
    updated = record.get("updated_at") if chat_id is not None else None
    if not isinstance(updated, str):
        return None
    try:
        return (chat_id, to_us("updated_at", updated))  # type: ignore[return-value]
    except InvalidQueryError:
        return None


def undated_of(record: RawRecord) -> Undated | None:
    """A record's (`chat_id`, digest of its content), or None without a `chat_id`: the version
    of a record without a usable `updated_at`. Key order does not change the digest."""
    chat_id = chat_key(record)
    if chat_id is None:
        return None
    text = json.dumps(
        record, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str
    )
    return (chat_id, hashlib.blake2b(text.encode(), digest_size=10).hexdigest())


def key_of(record: RawRecord) -> Version | Undated | None:
    """A record's version: dated when it has an `updated_at`, else undated; None without id."""
    return version_of(record) or undated_of(record)


@attrs.frozen
class VersionRange(TimeRange):
    """A `TimeRange` whose records are told apart by version, not by chat."""

    def key(self, record: RawRecord) -> Hashable | None:
        return key_of(record)


@attrs.define
class SyncRun:
    """The run in progress: its frozen T1, its lower bound, the windows done per family."""

    t1: int
    lo: int  # the windows' lower bound: since (first run) or B - lag
    created_done: list[tuple[int, int]] = attrs.field(factory=list)
    updated_done: list[tuple[int, int]] = attrs.field(factory=list)
    appended: int = 0  # versions appended by this run so far
    skipped: int = 0  # versions read again that the log already holds


@attrs.define
class SyncState:
    """What STATE holds (small, versioned JSON): the arguments it was made with, B, the run
    in progress, the log's committed length and the recent versions, nothing more."""

    key: dict[str, Any] | None = None  # since, lag, filters, output: the sync's identity
    bound: int | None = None  # B: the T1 of the last completed run (None: none yet)
    run: SyncRun | None = None
    offset: int | None = None  # the log's committed byte length (None: not a file, or new)
    recent: list[tuple[str, int]] = attrs.field(factory=list)  # versions >= the next bound
    #: undated versions (no usable updated_at): (chat_id, digest, T1 of the run that read it)
    undated: list[tuple[str, str, int]] = attrs.field(factory=list)
    runs: int = 0  # completed runs
    appended: int = 0  # versions appended by completed runs
    bound_at: str | None = None  # B, for people reading the file
    #: the kinds of note given once per state, not on every run (`Tally.once`; the newest
    #: `MAX_TOLD`): "narrow", a slice too narrow to split (README: "Incremental sync")
    told: list[str] = attrs.field(factory=list)
    version: int = STATE_VERSION


@attrs.frozen
class Windows:
    """What one run reads: `created` always, `updated` from the second run on."""

    t1: int
    lo: int
    created: tuple[int, int]
    updated: tuple[int, int] | None
    remember_from: int  # versions with updated_at >= this are remembered during the run
    keep_from: int  # ... and kept in the state after it


def check_user_filters(user: UserQuery) -> None:
    """Refuse filters on `created_at`/`updated_at`: the sync owns them (`InvalidQueryError`)."""
    for param, op, _ in user.items():
        if param in TIME_PARAMS:
            name = param if op == "eq" else f"{param}__{op}"
            raise InvalidQueryError(
                f"filter {name!r}: sync sets created_at and updated_at itself "
                "(use since= for the start); filter on other params"
            )


def lag_us(lag: Any) -> int:
    """The lag in seconds as microseconds; `InvalidQueryError` unless a number >= 0."""
    if isinstance(lag, bool) or not isinstance(lag, (int, float)) or not lag >= 0:
        raise InvalidQueryError(f"lag must be a number of seconds >= 0, got {lag!r:.40}")
    return round(lag * _US)


def begin_run(state: SyncState, since: int, lag: int, now: int) -> SyncRun:
    """The run that starts `now` (T1), given the state of the last completed one.

    T1 never goes below B (a clock stepped back): the windows then end at B.
    Raises `InvalidQueryError` when `since` is not before T1.
    """
    t1 = now if state.bound is None else max(now, state.bound)
    if since >= t1:
        raise InvalidQueryError(f"since {fmt(since)} is not before the start {fmt(t1)}")
    lo = since if state.bound is None else state.bound - lag
    return SyncRun(t1=t1, lo=lo)


def plan_windows(run: SyncRun, since: int, lag: int, first: bool) -> Windows:
    """The windows of `run` (the first run of a sync, or a later one)."""
    created = (max(run.lo, since), run.t1)
    keep_from = run.t1 - lag
    if first:
        return Windows(run.t1, run.lo, created, None, keep_from, keep_from)
    return Windows(run.t1, run.lo, created, (run.lo, run.t1), min(run.lo, keep_from), keep_from)


def family_plans(user: UserQuery, since: int, w: Windows) -> list[tuple[str, VersionRange]]:
    """The runner's plan for each family of `w`: ("created", ...) and, later, ("updated", ...)."""
    plans = [("created", VersionRange(user, w.created[0], w.created[1]))]
    if w.updated is not None:
        floor = Filter("created_at", "gte", to_dt(since))
        narrowed = UserQuery((*user.filters, floor), user.params)
        plans.append(
            ("updated", VersionRange(narrowed, w.updated[0], w.updated[1], field="updated_at"))
        )
    return plans


def prune(versions: Iterable[Version], floor: int) -> list[tuple[str, int]]:
    """The versions with `updated_at >= floor`, sorted (what the state keeps)."""
    return sorted((cid, at) for cid, at in versions if at >= floor)


def prune_undated(undated: Mapping[Undated, int], floor: int) -> list[tuple[str, str, int]]:
    """The undated versions remembered at or after `floor`, sorted (what the state keeps)."""
    return sorted((cid, digest, at) for (cid, digest), at in undated.items() if at >= floor)


def finish_run(state: SyncState, lag: int) -> None:
    """The run completed: B becomes its T1, the recent versions are pruned, the run cleared."""
    run = state.run
    if run is None:
        return
    state.bound = run.t1
    state.bound_at = fmt(run.t1)
    state.recent = prune(state.recent, run.t1 - lag)
    state.undated = [u for u in state.undated if u[2] >= run.t1 - lag]
    state.runs += 1
    state.appended += run.appended
    state.run = None


def admit(
    records: Iterable[RawRecord],
    seen: set[Version],
    remember_from: int,
    undated: dict[Undated, int] | None = None,
    t1: int = 0,
) -> tuple[list[RawRecord], int]:
    """The records whose version is not in `seen` (each once), and how many were skipped.

    Versions appended with `updated_at >= remember_from` join `seen`. A record without
    a usable `updated_at` is looked up in `undated` by its undated version and joins it
    with `t1` (the run's T1); without `undated`, or without a `chat_id`, it cannot be
    told apart: it is kept.
    """
    out: list[RawRecord] = []
    skipped = 0
    for r in records:
        v = version_of(r)
        if v is None:
            u = undated_of(r)
            if undated is None or u is None:
                out.append(r)
            elif u in undated:
                skipped += 1
            else:
                undated[u] = t1
                out.append(r)
        elif v in seen:
            skipped += 1
        else:
            if v[1] >= remember_from:
                seen.add(v)
            out.append(r)
    return out, skipped
