"""The plan: which time windows to read and how to cut them. Pure: no I/O, no client.

Times are integer microseconds since the epoch (exact, hashable, JSON-able).
A plan tells the runner three things, and nothing else about the data:

- `search_args(slice)`: the client's `search_pages` keywords that read one
  slice (the user's filters plus the slice's bounds on the plan's field);
- `key(record)`: what de-duplicates records within a slice and its re-reads
  (a record: a dict as sent, or a `ChatText` when the sink writes texts alone)
  (`chat_id` for an export; a sync would use `(chat_id, updated_at)`);
- `position(record)`: where a record lies on the slice axis (to guess how to
  split a deep slice when the server sends no total).

`TimeRange` is the export's plan: one half-open range of `created_at`.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta, timezone
from typing import Any, Protocol

import attrs

from .. import ChatText, Filter, InvalidQueryError, check_filters, parse_utc

RawRecord = Mapping[str, Any]
UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SPLIT_SLACK = 1.25  # cut into a few more pieces than the total asks for: data is not uniform
# Pieces one split may cut a slice into: enough that the first slices of a 300,000-chat
# export split once at 20 slice pages (at 64, those of 200,000 split twice: a page read
# only for its total per child of the first split).
MAX_SPLIT = 256
TIME_PARAMS = ("created_at", "updated_at")


# -- instants ------------------------------------------------------------------------------


def utcnow() -> datetime:
    """The current instant (a seam for tests)."""
    return datetime.now(UTC)


def to_dt(us: int) -> datetime:
    """Microseconds since the epoch as an aware UTC datetime."""
    return EPOCH + timedelta(microseconds=us)


def fmt(us: int) -> str:
    """Microseconds since the epoch as ISO 8601 with a `Z` (for notes and checkpoints)."""
    return to_dt(us).isoformat().replace("+00:00", "Z")


def to_us(name: str, value: Any) -> int:
    """A datetime, date or ISO 8601 string (naive means UTC) as microseconds since the epoch.

    Raises `InvalidQueryError` naming `name` for anything else.
    """
    if isinstance(value, datetime):
        at = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return (at - EPOCH) // timedelta(microseconds=1)
    if isinstance(value, date):
        return to_us(name, datetime(value.year, value.month, value.day, tzinfo=UTC))
    if isinstance(value, str):
        try:
            return to_us(name, parse_utc(value))  # the rule of `Chat` timestamps
        except Exception:
            pass
        raise InvalidQueryError(
            f"invalid {name} {value!r:.80}: expected an ISO 8601 date or datetime"
        )
    raise InvalidQueryError(
        f"invalid {name} {value!r:.80}: expected a datetime, a date or an ISO 8601 string"
    )


# -- slices --------------------------------------------------------------------------------


@attrs.define(eq=False)
class Slice:
    """One window `[lo, hi)` of the plan's axis, read as one query."""

    lo: int
    hi: int
    estimate: int | None = None  # records expected (the server's total, or the parent's share)
    received: int = 0  # records read so far and not yet written (for progress)


class Intervals:
    """Disjoint, merged half-open [lo, hi) integer intervals (the windows already done)."""

    def __init__(self, items: Iterable[Sequence[int]] = ()) -> None:
        self.items: list[list[int]] = []
        for lo, hi in items:
            self.add(int(lo), int(hi))

    def add(self, lo: int, hi: int) -> None:
        """Mark `[lo, hi)` done, merging with what touches it."""
        merged = [lo, hi]
        keep: list[list[int]] = []
        for item in self.items:
            if item[1] < merged[0] or item[0] > merged[1]:
                keep.append(item)
            else:
                merged = [min(merged[0], item[0]), max(merged[1], item[1])]
        keep.append(merged)
        keep.sort()
        self.items = keep

    def gaps(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The parts of `[lo, hi)` not done, in order."""
        out: list[tuple[int, int]] = []
        at = lo
        for a, b in self.items:
            if b <= at:
                continue
            if a >= hi:
                break
            if a > at:
                out.append((at, min(a, hi)))
            at = max(at, b)
        if at < hi:
            out.append((at, hi))
        return out


def cut(lo: int, hi: int, pieces: int) -> list[tuple[int, int]]:
    """`[lo, hi)` cut into up to `pieces` adjacent windows of (nearly) equal width."""
    pieces = max(1, min(pieces, hi - lo))
    points = [lo + (hi - lo) * i // pieces for i in range(pieces + 1)]
    return [(a, b) for a, b in itertools.pairwise(points) if b > a]


def first_slices(gaps: Sequence[tuple[int, int]], workers: int) -> list[Slice]:
    """The slices a run starts with: each gap cut so that every worker has one to read."""
    if not gaps:
        return []
    per_gap = max(1, math.ceil(workers / len(gaps)))
    return [Slice(lo, hi) for a, b in gaps for lo, hi in cut(a, b, per_gap)]


def split(s: Slice, pieces: int, estimate: int | None) -> list[Slice]:
    """A deep slice cut into `pieces` (2..MAX_SPLIT), each expecting its share of `estimate`."""
    parts = cut(s.lo, s.hi, min(MAX_SPLIT, max(2, pieces)))
    share = None if estimate is None else -(-estimate // len(parts))
    return [Slice(lo, hi, share) for lo, hi in parts]


def pieces_for_total(total: int, page_size: int, slice_pages: int) -> int:
    """Pieces for a slice of `total` records, so each is about `slice_pages` deep (0: keep)."""
    depth = math.ceil(total / page_size)
    if depth <= slice_pages:
        return 0
    return math.ceil(depth * SPLIT_SLACK / slice_pages)


def pieces_without_total(
    s: Slice, count: int, oldest: int | None, page_size: int, slice_pages: int
) -> int:
    """Pieces for a deep slice without a total, guessed from the span of what was seen.

    `count` records are known to lie in `[oldest, s.hi)`. A heuristic only (good when
    the server sends newest first); correctness never depends on the order it sends.
    """
    if oldest is None or not s.lo < oldest < s.hi:
        return 2
    estimate = count * (s.hi - s.lo) / (s.hi - oldest)
    return math.ceil(estimate / page_size * SPLIT_SLACK / slice_pages)


# -- plans ---------------------------------------------------------------------------------


class Plan(Protocol):
    """What the runner needs to know about the data it reads (see the module docstring)."""

    def search_args(self, s: Slice) -> dict[str, Any]:
        """The keywords of `client.search_pages` that read slice `s`."""
        ...

    def key(self, record: RawRecord) -> Hashable | None:
        """The identity of a record within a slice (None: keep it, it cannot be told apart)."""
        ...

    def position(self, record: RawRecord) -> int | None:
        """Where the record lies on the slice axis, if it says."""
        ...


def chat_key(record: Any) -> str | None:
    """A record's `chat_id` as a str (an int id as its digits), or None without one."""
    if record.__class__ is ChatText:
        chat_id = record.chat_id
    else:
        chat_id = record.get("chat_id") if isinstance(record, Mapping) else None
    if isinstance(chat_id, str) and chat_id:
        return chat_id
    if isinstance(chat_id, int) and not isinstance(chat_id, bool):
        return str(chat_id)
    return None


def field_of(record: Any, name: str) -> Any:
    """A record's field as sent (a dict's, or a `ChatText`'s `created_at`/`updated_at`)."""
    if record.__class__ is ChatText:
        return getattr(record, name, None) if name in TIME_PARAMS else None
    return record.get(name) if isinstance(record, Mapping) else None


@attrs.frozen
class UserQuery:
    """The user's own filters, as given, and their canonical form (a checkpoint's identity)."""

    filters: tuple[Any, ...] = ()
    params: Mapping[str, Any] = attrs.field(factory=dict)

    @classmethod
    def checked(
        cls,
        filters: Iterable[Any] | None,
        params: Mapping[str, Any],
        condition: str = "and",
    ) -> UserQuery:
        """The user's filters, checked the one way every search checks them (`check_filters`).

        Raises `InvalidQueryError` naming the first fault, before any request: a keyword
        that is not a filter (`limit`, `start_page`, `max_pages`, `prefetch`, `deadline`:
        an export or a sync reads every page itself) is refused, never sent as a filter.
        """
        given: Any = filters  # as the user gave it: check_filters refuses a wrong form, named
        if isinstance(given, Iterable) and not isinstance(given, (str, bytes, Mapping)):
            given = tuple(given)  # read once: a generator is checked and kept alike
        check_filters(params, filters=given, condition=condition)
        return cls(tuple(given or ()), dict(params))

    def wire(self, condition: str = "and") -> tuple[tuple[str, str, str], ...]:
        """The filters as the request sends them (checked; values as wire strings), sorted:
        a canonical form that travels (a partition of a distributed read)."""
        return tuple(sorted(check_filters(self.params, filters=self.filters, condition=condition)))

    def items(self) -> list[tuple[str, str, Any]]:
        """Every filter as (param, operator, value), keyword or explicit alike."""
        out: list[tuple[str, str, Any]] = []
        for f in self.filters:
            out.append((f.param, f.operator, f.value) if isinstance(f, Filter) else tuple(f))
        for name, value in self.params.items():
            param, sep, op = name.rpartition("__")
            out.append((param, op, value) if sep else (name, "eq", value))
        return out

    def identity(self) -> list[list[Any]]:
        """JSON-able and canonical: times as microseconds, enums as their values."""
        out: list[list[Any]] = []
        for param, op, value in self.items():
            if param in TIME_PARAMS:
                value = to_us(param, value)
            elif isinstance(value, enum.Enum):
                value = value.value
            elif not isinstance(value, (str, int, float, bool, type(None))):
                value = str(value)
            out.append([param, op, value])
        return sorted(out, key=repr)

    def count(self) -> int:
        return len(self.filters) + len(self.params)


@attrs.frozen
class TimeRange:
    """The export's plan: records whose `field` lies in `[lo, hi)`, on top of the user's filters.

    `end_inclusive` sends the last bound as `lte hi-1` (an instant frozen at the start).
    """

    user: UserQuery
    lo: int
    hi: int
    end_inclusive: bool = False
    field: str = "created_at"

    def search_args(self, s: Slice) -> dict[str, Any]:
        if s.hi == self.hi and self.end_inclusive:
            upper = Filter(self.field, "lte", to_dt(s.hi - 1))
        else:
            upper = Filter(self.field, "lt", to_dt(s.hi))
        bounds = [Filter(self.field, "gte", to_dt(s.lo)), upper]
        return {"filters": [*self.user.filters, *bounds], "condition": "and", **self.user.params}

    def key(self, record: RawRecord) -> Hashable | None:
        return chat_key(record)

    def position(self, record: RawRecord) -> int | None:
        value = field_of(record, self.field)
        if not isinstance(value, str):
            return None
        try:
            return to_us(self.field, value)
        except InvalidQueryError:
            return None


def plan_range(user: UserQuery, since: int, until: int | None, now: int) -> TimeRange:
    """The range of a fresh run: `[since, until)`, or up to `now` inclusive (frozen) without
    `until`, narrowed by the user's own `created_at` filters (which are still sent as given).

    Raises `InvalidQueryError` for an empty or inverted range.
    """
    lo = since
    if until is None:
        if now < lo:
            raise InvalidQueryError(f"since {fmt(lo)} is in the future")
        hi, end_inclusive = now + 1, True
    else:
        if until <= lo:
            raise InvalidQueryError(f"since ({fmt(lo)}) must be before until ({fmt(until)})")
        hi, end_inclusive = until, False
    for param, op, value in user.items():
        if param != "created_at":
            continue
        at = to_us(param, value)
        if op in ("gte", "eq"):
            lo = max(lo, at)
        if op == "gt":
            lo = max(lo, at + 1)
        if op in ("lte", "eq") and at + 1 < hi:
            hi, end_inclusive = at + 1, False
        if op == "lt" and at < hi:
            hi, end_inclusive = at, False
    return TimeRange(user, lo, max(hi, lo), end_inclusive)
