"""Partitions: a tenant's chats cut into pieces an engine (Dask, Airflow, Ray) can schedule.

The accepted pattern for a distributed read (Spark's `DataSourceReader.partitions()`,
Airbyte's concurrent partitions, Dask's `from_map`): plan the work once into
serialisable partitions, then read each one independently and idempotently,
wherever the engine puts it.

- `plan_partitions(client, since=..., until=..., **filters)` cuts a half-open
  `created_at` range into `Partition`s of at most `rows_per_partition` chats,
  sized from the server's totals (`X-Total-Count` of a one-page probe per
  piece, cut further while a piece holds more); without a total, by time alone
  (`span_without_total` per partition). An open range is frozen at the
  planning instant, so every read of the plan asks the same question.
- `read_partition(client, partition)` reads one partition with the export's
  rules (slices inside it, de-duplication by `chat_id`, verification against
  the totals, re-reads when short) and returns its raw records (the JSON
  objects as the server sent them), sorted by `created_at` then `chat_id`:
  reading the same partition twice gives the same rows on unchanged data, so
  an engine may retry a task.

A `Partition` is an attrs record of plain values (picklable; `to_json()` /
`Partition.from_json()` for an orchestrator's XCom or a queue). It holds no
token and no chat.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import aclosing
from datetime import date, datetime, timedelta
from typing import Any

import attrs

from .. import Filter, ImiChatClient, InvalidQueryError, PagingStats
from ._export import export_chats
from ._plan import (
    MAX_SPLIT,
    SPLIT_SLACK,
    RawRecord,
    Slice,
    TimeRange,
    UserQuery,
    cut,
    fmt,
    plan_range,
    to_dt,
    to_us,
    utcnow,
)
from ._sinks import Sink

DEFAULT_ROWS_PER_PARTITION = 50_000  # chats a partition holds at most (from the server's totals)
DEFAULT_SPAN_WITHOUT_TOTAL = timedelta(days=1)  # a partition's width when the server sends no total


@attrs.frozen
class Partition:
    """Chats created in `[lo, hi)` (microseconds since the epoch, UTC) matching `filters`.

    `filters` are (param, operator, value) with values as the wire sends them (strings;
    datetimes as ISO 8601 with a `Z`); `estimate` is the server's total when planned
    (None without one); `id` is stable: the same range and filters give the same id.
    """

    lo: int
    hi: int
    filters: tuple[tuple[str, str, str], ...] = ()
    condition: str = "and"
    estimate: int | None = None
    id: str = attrs.field()

    @id.default
    def _id(self) -> str:
        ident = json.dumps([self.lo, self.hi, [list(f) for f in self.filters], self.condition])
        return hashlib.sha256(ident.encode()).hexdigest()[:16]

    @property
    def since(self) -> datetime:
        return to_dt(self.lo)

    @property
    def until(self) -> datetime:
        return to_dt(self.hi)

    def __str__(self) -> str:
        return f"partition {self.id} [{fmt(self.lo)}, {fmt(self.hi)})"

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict; `Partition.from_json` gives the same partition back."""
        return {
            "id": self.id,
            "lo": self.lo,
            "hi": self.hi,
            "since": fmt(self.lo),
            "until": fmt(self.hi),
            "filters": [list(f) for f in self.filters],
            "condition": self.condition,
            "estimate": self.estimate,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Partition:
        """The partition `to_json` wrote (the id is checked, so a tampered one is refused)."""
        part = cls(
            lo=int(data["lo"]),
            hi=int(data["hi"]),
            filters=tuple((str(p), str(o), str(v)) for p, o, v in data.get("filters", ())),
            condition=str(data.get("condition", "and")),
            estimate=data.get("estimate"),
        )
        if "id" in data and data["id"] != part.id:
            raise ValueError(f"partition id {data['id']!r} does not match its range and filters")
        return part


async def plan_partitions(
    client: ImiChatClient,
    *,
    since: datetime | date | str,
    until: datetime | date | str | None = None,
    filters: Iterable[Filter | tuple[str, str, Any]] | None = None,
    condition: str = "and",
    rows_per_partition: int = DEFAULT_ROWS_PER_PARTITION,
    span_without_total: timedelta = DEFAULT_SPAN_WITHOUT_TOTAL,
    **params: Any,
) -> list[Partition]:
    """Cut the chats created in `[since, until)` matching the filters into partitions.

    Each holds at most `rows_per_partition` chats by the server's totals at planning
    time (a probe of one page per piece); without `X-Total-Count`, each spans
    `span_without_total`. `until=None` freezes the range at the planning instant.
    Filters as for `export_chats`; raises `InvalidQueryError` before any request for
    bad filters or range. The partitions come in `created_at` order.
    """
    if not isinstance(rows_per_partition, int) or rows_per_partition < 1:
        raise ValueError(f"rows_per_partition must be an int >= 1, got {rows_per_partition!r}")
    span_us = span_without_total // timedelta(microseconds=1)
    if span_us < 1:
        raise ValueError(f"span_without_total must be positive, got {span_without_total!r}")
    wire = UserQuery.checked(filters, params, condition).wire(condition)  # before any request
    if condition == "or" and len(wire) > 1:
        raise InvalidQueryError(
            "partitions slice the range with created_at filters, which needs "
            "condition='and'; plan one set of partitions per alternative instead"
        )
    condition = "and"  # with at most one filter, "or" and "and" ask the same
    user = UserQuery(tuple(Filter(p, o, v) for p, o, v in wire))
    now = to_us("now", utcnow())
    rng = plan_range(
        user, to_us("since", since), None if until is None else to_us("until", until), now
    )
    # Frozen: the last bound is exclusive from here on, so every partition is [lo, hi).
    rng = attrs.evolve(rng, end_inclusive=False)
    planner = _Planner(client, rng, wire, condition, rows_per_partition, span_us)
    return await planner.plan(rng.lo, rng.hi)


@attrs.define
class _Planner:
    client: ImiChatClient
    rng: TimeRange
    wire: tuple[tuple[str, str, str], ...]
    condition: str
    target: int
    span_us: int

    def part(self, lo: int, hi: int, estimate: int | None) -> Partition:
        return Partition(lo, hi, self.wire, self.condition, estimate)

    async def plan(self, lo: int, hi: int) -> list[Partition]:
        total = await self.probe(lo, hi)
        if total is None:  # by time alone
            pieces = math.ceil((hi - lo) / self.span_us)
            return [self.part(a, b, None) for a, b in cut(lo, hi, pieces)]
        if total <= self.target or hi - lo < 2:
            return [self.part(lo, hi, total)]
        pieces = min(MAX_SPLIT, max(2, math.ceil(total * SPLIT_SLACK / self.target)))
        parts = await asyncio.gather(*(self.plan(a, b) for a, b in cut(lo, hi, pieces)))
        return [p for group in parts for p in group]

    async def probe(self, lo: int, hi: int) -> int | None:
        """The server's total for `[lo, hi)` (None: it sends none), from one page."""
        stats = PagingStats()
        args = self.rng.search_args(Slice(lo, hi))
        pages = self.client.search_pages(raw=True, max_pages=1, prefetch=1, stats=stats, **args)
        async with aclosing(pages) as it:
            async for page in it:
                total: int | None = page.total
                return total
        return stats.total


class _Rows(Sink):
    """An in-memory sink: the records of every finished slice, in a list."""

    kind = "memory"

    def __init__(self) -> None:
        self.rows: list[RawRecord] = []

    async def write(self, records: Sequence[RawRecord]) -> None:
        self.rows.extend(records)


def _order(record: RawRecord) -> tuple[int, str]:
    created = record.get("created_at")
    try:
        at = to_us("created_at", created) if isinstance(created, str) else -1
    except ValueError:
        at = -1
    chat_id = record.get("chat_id")
    return at, "" if chat_id is None else str(chat_id)


async def read_partition(
    client: ImiChatClient, partition: Partition, *, workers: int | None = None
) -> list[RawRecord]:
    """Every chat of `partition`, each once, as the raw JSON objects the server sent,
    sorted by `created_at` then `chat_id`.

    The export's rules apply inside it (slices, de-duplication, verification against
    the totals, re-reads when short); errors are the client's. No file is written.
    """
    rows = _Rows()
    await export_chats(
        client,
        since=partition.since,
        until=partition.until,
        filters=[Filter(p, o, v) for p, o, v in partition.filters],
        condition=partition.condition,
        sink=rows,
        workers=workers,
    )
    rows.rows.sort(key=_order)
    return rows.rows
