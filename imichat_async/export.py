"""Bulk export: a `created_at` range, sliced, searched concurrently, written once per chat.

    from imichat_async.export import export_chats, NdjsonSink

    async with ImiChatClient(...) as client:
        report = await export_chats(
            client, since="2024-01-01", until="2025-01-01", status="closed",
            sink=NdjsonSink("chats.ndjson"), checkpoint="chats.ckpt.json", resume=True,
        )

How it works:

- The range is half-open, `[since, until)`. Without `until`, the upper bound
  is frozen at the start instant and sent as `created_at lte <start>`, so
  chats created while the export runs never shift its pages. A resumed run
  reuses the instant frozen by the first run (it is in the checkpoint).
- The range is cut into slices (`created_at gte a` + `created_at lt b`,
  on top of the user's own filters, which are always sent as given: a user
  `created_at` filter is intersected by the server, and narrows the range).
  `workers` slices (default: the client's concurrency) are searched at once;
  every request goes through the client's one limiter. A slice that turns out
  deep is split by time: at once from `X-Total-Count` (its first page), or
  after `slice_pages` full pages without it; so the wall time approaches
  `pages / concurrency x latency` and not the depth of the deepest slice.
- Chats are de-duplicated by `chat_id`. Where the server sends a total, each
  slice's distinct count is checked against it (and against the totals of its
  later pages); a slice that came up short (data changed under it) is re-read
  and merged, up to `MAX_REREADS` times; the report's `notes` say what was done.
- A finished slice is written to the sink in one go, the file is synced, and
  the checkpoint (written atomically: temp file, fsync, `os.replace`) records
  the finished slices and the output's byte length. A run killed at any moment
  (`kill -9` included) and started again with the same arguments and
  `resume=True` truncates the output to the checkpointed length, rebuilds the
  de-duplication set from it and redoes only the unfinished slices: the end
  result holds exactly the chats of an uninterrupted run, each once.
- File sinks write to `<path>.part` and rename it to `<path>` when complete.
  A `CallableSink` is exactly-once within a run, at-least-once across a crash
  (a slice delivered but not yet checkpointed is delivered again on resume).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import csv
import io
import itertools
import json
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, ClassVar

import attrs

from ._client import ImiChatClient
from ._errors import ImiChatError, InvalidQueryError
from ._paging import PagingStats
from ._protocol import PAGE_SIZE, last_page
from ._query import Filter, Query, build_query, format_datetime
from ._records import parse_utc

__all__ = [
    "CSV_COLUMNS",
    "CallableSink",
    "CheckpointError",
    "CsvSink",
    "ExportProgress",
    "ExportReport",
    "FileSink",
    "NdjsonSink",
    "Sink",
    "export_chats",
    "make_sink",
]

RawRecord = Mapping[str, Any]
UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
CHECKPOINT_VERSION = 1
DEFAULT_SLICE_PAGES = 20
MAX_REREADS = 3  # re-reads of one slice whose count stays short before it is accepted as is
MAX_SPLIT = 64  # pieces one split may cut a slice into
_SPLIT_SLACK = 1.25  # cut into a few more pieces than the total asks for: data is not uniform


class CheckpointError(ImiChatError, ValueError):
    """A checkpoint that cannot be used: written for other arguments, corrupt, or not resumed."""


# -- time ------------------------------------------------------------------------------------


def _utcnow() -> datetime:
    """The current instant (a seam for tests)."""
    return datetime.now(UTC)


def _us(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - EPOCH) // timedelta(microseconds=1)


def _dt(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def _fmt(us: int) -> str:
    return format_datetime(_dt(us))


def _to_us(name: str, value: Any) -> int:
    """A datetime, date or ISO 8601 string (naive means UTC) as microseconds since the epoch."""
    if isinstance(value, datetime):
        return _us(value)
    if isinstance(value, date):
        return _us(datetime(value.year, value.month, value.day, tzinfo=UTC))
    if isinstance(value, str):
        try:
            return _us(parse_utc(value))
        except ValueError:
            pass
        raise InvalidQueryError(
            f"invalid {name} {value!r:.80}: expected an ISO 8601 date or datetime"
        )
    raise InvalidQueryError(
        f"invalid {name} {value!r:.80}: expected a datetime, a date or an ISO 8601 string"
    )


# -- sinks -----------------------------------------------------------------------------------


class Sink(abc.ABC):
    """Where exported chats go. `export_chats` drives it; users only construct one.

    Life cycle: `open(offset)` (fresh when `offset` is None, else resume at
    that byte length and return the chat ids already written), `write`
    (one finished slice at a time), `sync` (make it durable; return the byte
    length, or None when the sink cannot resume), then `complete` (publish)
    or `close` (leave it unpublished, for a resume).
    """

    kind: ClassVar[str] = "sink"

    def describe(self) -> dict[str, Any]:
        """What identifies this sink in a checkpoint (so a resume writes to the same place)."""
        return {"kind": self.kind}

    def open(self, offset: int | None) -> set[str]:
        """Start fresh (`offset` None) or resume at `offset`; return the ids already written."""
        return set()

    @abc.abstractmethod
    async def write(self, records: Sequence[RawRecord]) -> None:
        """Write the chats of one finished slice."""

    def sync(self) -> int | None:
        """Flush what was written to durable storage; return its byte length (None: not a file)."""
        return None

    def complete(self) -> None:  # noqa: B027 (optional hook)
        """The export is complete: publish the result."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release resources without publishing (the export failed or was interrupted)."""

    def discard(self) -> None:
        """Remove any unpublished output (a failed export without a checkpoint)."""
        self.close()


class FileSink(Sink):
    """A file written to `<path>.part`, then renamed to `path` when the export completes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.temp_path = self.path.with_name(self.path.name + ".part")
        self._file: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path.resolve())}

    def header(self) -> bytes:
        """Bytes at the start of a fresh file."""
        return b""

    @abc.abstractmethod
    def encode(self, records: Sequence[RawRecord]) -> bytes:
        """The bytes of these records."""

    @abc.abstractmethod
    def read_ids(self, data: bytes) -> set[str]:
        """The chat ids in the bytes of a file this sink wrote."""

    def open(self, offset: int | None) -> set[str]:
        if offset is None:
            fresh: IO[bytes] = open(self.temp_path, "wb")  # noqa: SIM115 (kept open)
            self._file = fresh
            fresh.write(self.header())
            self.sync()
            return set()
        try:
            size = self.temp_path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(
                f"cannot resume: the partial output {str(self.temp_path)!r} is missing"
            ) from None
        if size < offset:
            raise CheckpointError(
                f"cannot resume: {str(self.temp_path)!r} holds {size} bytes, "
                f"fewer than the {offset} the checkpoint recorded"
            )
        f: IO[bytes] = open(self.temp_path, "r+b")  # noqa: SIM115 (kept open)
        self._file = f
        f.truncate(offset)  # drop whatever was written after the last checkpoint
        f.seek(0)
        data = f.read(offset)
        f.seek(offset)
        return self.read_ids(data)

    async def write(self, records: Sequence[RawRecord]) -> None:
        # No await inside: a slice's write and its checkpoint cannot be split by a cancellation.
        if self._file is None:
            raise RuntimeError("sink is not open")
        if records:
            self._file.write(self.encode(records))

    def sync(self) -> int | None:
        if self._file is None:
            raise RuntimeError("sink is not open")
        self._file.flush()
        os.fsync(self._file.fileno())
        return self._file.tell()

    def complete(self) -> None:
        if self._file is not None:
            self.sync()
            self.close()
        os.replace(self.temp_path, self.path)
        _fsync_dir(self.path.parent)

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.temp_path.unlink()


class NdjsonSink(FileSink):
    """One JSON object per line, exactly the object the server sent (key order kept, UTF-8)."""

    kind = "ndjson"

    def encode(self, records: Sequence[RawRecord]) -> bytes:
        dumps = json.dumps
        text = "".join(dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)
        return text.encode()

    def read_ids(self, data: bytes) -> set[str]:
        ids: set[str] = set()
        for line in data.splitlines():
            if line.strip():
                key = _key(json.loads(line))
                if key is not None:
                    ids.add(key)
        return ids


#: The columns of `CsvSink`, in order.
CSV_COLUMNS: tuple[str, ...] = (
    "chat_id",
    "alias_id",
    "created_at",
    "updated_at",
    "status",
    "channel",
    "asset_id",
    "asset_name",
    "customer_id",
    "destination_id",
    "assignee",
    "flag",
    "tag",
    "other_details",
    "extra",
)
_CSV_TOP = frozenset(CSV_COLUMNS[:6] + CSV_COLUMNS[8:14] + ("asset",))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class CsvSink(FileSink):
    """Flat CSV (RFC 4180, UTF-8, a header row), one row per chat, columns `CSV_COLUMNS`.

    - `asset` becomes `asset_id` and `asset_name` (the id as sent: `00123` keeps its zeros);
    - `tag` is a JSON array (`["billing","vip"]`), `other_details` a JSON object;
    - a missing or null field is an empty cell; numbers and booleans are written as JSON;
    - unknown top-level fields go, as one JSON object, to `extra` (empty when none),
      so nothing the server sent is lost.
    """

    kind = "csv"

    def header(self) -> bytes:
        return self._rows([list(CSV_COLUMNS)])

    @staticmethod
    def _rows(rows: Iterable[Sequence[str]]) -> bytes:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\r\n").writerows(rows)
        return buf.getvalue().encode()

    @staticmethod
    def row(record: RawRecord) -> list[str]:
        """The cells of one chat, in `CSV_COLUMNS` order."""
        asset = record.get("asset")
        asset_id = asset_name = None
        if isinstance(asset, Mapping):
            asset_id, asset_name = asset.get("id"), asset.get("name")
        elif asset is not None:
            asset_id = asset
        extra = {k: v for k, v in record.items() if k not in _CSV_TOP}
        g = record.get
        return [
            _cell(g("chat_id")),
            _cell(g("alias_id")),
            _cell(g("created_at")),
            _cell(g("updated_at")),
            _cell(g("status")),
            _cell(g("channel")),
            _cell(asset_id),
            _cell(asset_name),
            _cell(g("customer_id")),
            _cell(g("destination_id")),
            _cell(g("assignee")),
            _cell(g("flag")),
            _cell(g("tag")),
            _cell(g("other_details")),
            _cell(extra) if extra else "",
        ]

    def encode(self, records: Sequence[RawRecord]) -> bytes:
        return self._rows(self.row(r) for r in records)

    def read_ids(self, data: bytes) -> set[str]:
        reader = csv.reader(io.StringIO(data.decode(), newline=""))
        next(reader, None)  # header
        return {row[0] for row in reader if row and row[0]}


class CallableSink(Sink):
    """Hands each chat (the raw JSON object) to `await fn(chat)`, in slice order.

    Exactly once within a run; across a crash, the chats of a slice delivered
    but not yet checkpointed are delivered again on resume (at least once).
    """

    kind = "callable"

    def __init__(self, fn: Callable[[RawRecord], Awaitable[Any]]) -> None:
        if not callable(fn):
            raise TypeError("CallableSink takes an async callable: fn(chat) -> awaitable")
        self.fn = fn

    def describe(self) -> dict[str, Any]:
        name = getattr(self.fn, "__qualname__", type(self.fn).__qualname__)
        return {"kind": self.kind, "name": str(name)}

    async def write(self, records: Sequence[RawRecord]) -> None:
        for record in records:
            await self.fn(record)


def make_sink(
    target: Sink | str | os.PathLike[str] | Callable[[RawRecord], Awaitable[Any]],
    format: str | None = None,
) -> Sink:
    """A sink from a `Sink`, an async callable, or a path (`format` "ndjson" or "csv";
    by default from the suffix: `.csv` is CSV, anything else NDJSON)."""
    if isinstance(target, Sink):
        return target
    if isinstance(target, (str, os.PathLike)):
        path = Path(target)
        fmt = format or ("csv" if path.suffix.lower() == ".csv" else "ndjson")
        if fmt == "ndjson":
            return NdjsonSink(path)
        if fmt == "csv":
            return CsvSink(path)
        raise InvalidQueryError(f"unknown export format {fmt!r}: expected ndjson or csv")
    if callable(target):
        return CallableSink(target)
    raise TypeError(
        f"sink must be a Sink, a path or an async callable, got {type(target).__name__}"
    )


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform or filesystem allows it
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _key(record: Any) -> str | None:
    chat_id = record.get("chat_id") if isinstance(record, Mapping) else None
    if isinstance(chat_id, str) and chat_id:
        return chat_id
    if isinstance(chat_id, int) and not isinstance(chat_id, bool):
        return str(chat_id)
    return None


# -- progress and report ---------------------------------------------------------------------


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
    total: int | None  # estimated chats in the whole export, once every slice has a total
    elapsed: float


@attrs.frozen
class ExportReport:
    """What an export did. Counts of chats cover the whole export (earlier runs included);
    pages, requests, retries and elapsed cover this run."""

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
    verified: bool  # every slice's count was checked against a total from the server
    resumed: bool
    output: Path | None = None
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line: `records=… duplicates=… slices=… …`."""
        return (
            f"records={self.records} duplicates={self.duplicates} slices={self.slices} "
            f"splits={self.splits} rereads={self.slices_reread} pages={self.pages} "
            f"requests={self.requests} retries={self.retries} elapsed={self.elapsed:.2f}s"
        )


# -- the export ------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Slice:
    lo: int  # microseconds, inclusive
    hi: int  # microseconds, exclusive
    estimate: int | None = None  # chats expected (the server's total, or the parent's share)


@attrs.frozen
class _Split:
    pieces: int
    estimate: int | None


class _Intervals:
    """Disjoint, merged half-open [lo, hi) integer intervals."""

    def __init__(self, items: Iterable[Sequence[int]] = ()) -> None:
        self.items: list[list[int]] = []
        for lo, hi in items:
            self.add(int(lo), int(hi))

    def add(self, lo: int, hi: int) -> None:
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


def _cut(lo: int, hi: int, pieces: int) -> list[tuple[int, int]]:
    pieces = max(1, min(pieces, hi - lo))
    points = [lo + (hi - lo) * i // pieces for i in range(pieces + 1)]
    return [(a, b) for a, b in itertools.pairwise(points) if b > a]


class _Exporter:
    def __init__(
        self,
        client: ImiChatClient,
        query: Query,
        since: int,
        until: int | None,
        sink: Sink,
        checkpoint: Path | None,
        resume: bool,
        slice_pages: int,
        workers: int,
        progress: Callable[[ExportProgress], None] | None,
    ) -> None:
        self.client = client
        self.user_query = query
        self.user_since = since
        self.user_until = until
        self.sink = sink
        self.checkpoint = checkpoint
        self.resume = resume
        self.slice_pages = slice_pages
        self.workers = workers
        self.progress_cb = progress
        # the range: [lo, hi); `end_inclusive` sends the last bound as `lte hi-1` (frozen now)
        self.lo = since
        self.hi = 0
        self.end_inclusive = False
        self.frozen = until is None
        self.done = _Intervals()
        self.seen: set[str] = set()
        self.records = 0
        self.keyed = 0  # records written that carry a chat_id (the size of `seen`)
        self.duplicates = 0
        self.slices_done = 0
        self.splits = 0
        self.rereads = 0
        self.pages = 0
        self.fetched = 0
        self.verified = True
        self.has_total: bool | None = None  # does the server send X-Total-Count? (learned)
        self.resumed = False
        self.offset: int | None = None
        self.notes: list[str] = []
        self.active: set[_Slice] = set()
        self.running = 0
        self.queue: asyncio.Queue[_Slice] = asyncio.Queue()
        self.started = time.monotonic()
        self.requests0 = client.stats.requests
        self.retries0 = client.stats.retries
        self.lock = asyncio.Lock()
        self.last_progress = 0.0

    # -- identity and checkpoint ---------------------------------------------------------

    def key(self) -> dict[str, Any]:
        return {
            "filters": [list(f) for f in self.user_query.filters],
            "condition": self.user_query.condition,
            "since": self.user_since,
            "until": self.user_until,
            "sink": self.sink.describe(),
        }

    def load_checkpoint(self) -> dict[str, Any] | None:
        path = self.checkpoint
        if path is None or not path.exists():
            return None
        if not self.resume:
            raise CheckpointError(
                f"checkpoint {str(path)!r} exists: resume it (resume=True, --resume) "
                "or delete it to start over"
            )
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from None
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"checkpoint {str(path)!r} is not a version-1 export checkpoint")
        if state.get("key") != self.key():
            raise CheckpointError(
                f"checkpoint {str(path)!r} was written for another export (other filters, "
                "range or output); use the same arguments, or delete it to start over"
            )
        return state

    def save_checkpoint(self, complete: bool = False) -> None:
        path = self.checkpoint
        if path is None:
            return
        state = {
            "version": CHECKPOINT_VERSION,
            "key": self.key(),
            "lo": self.lo,
            "hi": self.hi,
            "end_inclusive": self.end_inclusive,
            "until": _fmt(self.hi - 1 if self.end_inclusive else self.hi),
            "done": self.done.items,
            "offset": self.offset,
            "records": self.records,
            "keyed": self.keyed,
            "duplicates": self.duplicates,
            "slices": self.slices_done,
            "verified": self.verified,
            "notes": self.notes[-50:],
            "complete": complete,
        }
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def drop_checkpoint(self) -> None:
        if self.checkpoint is not None:
            with contextlib.suppress(FileNotFoundError):
                self.checkpoint.unlink()

    # -- the range -------------------------------------------------------------------------

    def set_range(self) -> None:
        """Fresh run: freeze the upper bound, intersect with the user's created_at filters."""
        if self.user_until is None:
            now = _us(_utcnow())
            if now < self.lo:
                raise InvalidQueryError(f"since {_fmt(self.lo)} is in the future")
            self.hi, self.end_inclusive = now + 1, True
        else:
            if self.user_until <= self.lo:
                raise InvalidQueryError(
                    f"since ({_fmt(self.lo)}) must be before until ({_fmt(self.user_until)})"
                )
            self.hi = self.user_until
        # The user's created_at filters are sent as given; they only narrow what is sliced.
        for param, op, value in self.user_query.filters:
            if param != "created_at":
                continue
            at = _us(parse_utc(value))
            if op in ("gte", "eq"):
                self.lo = max(self.lo, at)
            if op == "gt":
                self.lo = max(self.lo, at + 1)
            if op in ("lte", "eq") and at + 1 < self.hi:
                self.hi, self.end_inclusive = at + 1, False
            if op == "lt" and at < self.hi:
                self.hi, self.end_inclusive = at, False
        self.hi = max(self.hi, self.lo)

    def slice_query(self, s: _Slice) -> Query:
        if s.hi == self.hi and self.end_inclusive:
            upper = ("created_at", "lte", _fmt(s.hi - 1))
        else:
            upper = ("created_at", "lt", _fmt(s.hi))
        return Query((*self.user_query.filters, ("created_at", "gte", _fmt(s.lo)), upper), "and")

    # -- progress --------------------------------------------------------------------------

    def snapshot(self) -> ExportProgress:
        total: int | None = self.records
        for s in self.active:
            if s.estimate is None or total is None:
                total = None
                break
            total += s.estimate
        if total is not None:
            total = max(total, self.records)
        return ExportProgress(
            records=self.records,
            fetched=self.fetched,
            duplicates=self.duplicates,
            pages=self.pages,
            requests=self.client.stats.requests - self.requests0,
            retries=self.client.stats.retries - self.retries0,
            slices_done=self.slices_done,
            slices_pending=len(self.active),
            total=total,
            elapsed=time.monotonic() - self.started,
        )

    def tell(self, force: bool = False) -> None:
        if self.progress_cb is None:
            return
        now = time.monotonic()
        if force or now - self.last_progress >= 0.05:
            self.last_progress = now
            self.progress_cb(self.snapshot())

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> ExportReport:
        state = self.load_checkpoint()
        if state is not None and state.get("complete"):
            return self.finish_completed(state)
        if state is not None:
            self.restore(state)
        else:
            self.set_range()
        self.seen = self.sink.open(self.offset if state is not None else None)
        ok = False
        try:
            if self.offset is not None and len(self.seen) != self.keyed:
                raise CheckpointError(
                    f"cannot resume: the partial output holds {len(self.seen)} chats, "
                    f"the checkpoint recorded {self.keyed}"
                )
            self.offset = self.sink.sync()
            self.save_checkpoint()
            await self.search_all()
            self.save_checkpoint(complete=True)
            self.sink.complete()
            self.drop_checkpoint()
            ok = True
        finally:
            if not ok:
                if self.checkpoint is None:
                    self.sink.discard()
                else:
                    self.sink.close()
        self.tell(force=True)
        return self.report()

    def restore(self, state: Mapping[str, Any]) -> None:
        self.resumed = True
        self.lo, self.hi = int(state["lo"]), int(state["hi"])
        self.end_inclusive = bool(state["end_inclusive"])
        self.done = _Intervals(state["done"])
        offset = state.get("offset")
        self.offset = int(offset) if offset is not None else None
        self.records = int(state["records"])
        self.keyed = int(state["keyed"])
        self.duplicates = int(state["duplicates"])
        self.slices_done = int(state["slices"])
        self.verified = bool(state["verified"])
        self.notes = [str(n) for n in state.get("notes", [])]
        self.notes.append(
            f"resumed: {self.records} chats in {self.slices_done} slices already written"
        )

    def finish_completed(self, state: Mapping[str, Any]) -> ExportReport:
        """A checkpoint marked complete: the run was killed while publishing. Finish that."""
        self.restore(state)
        if isinstance(self.sink, FileSink):
            if self.sink.temp_path.exists():
                self.sink.complete()
            elif not self.sink.path.exists():
                raise CheckpointError(
                    f"checkpoint is complete but neither {str(self.sink.path)!r} nor "
                    f"its .part file exists; delete the checkpoint to start over"
                )
        self.drop_checkpoint()
        return self.report()

    def report(self) -> ExportReport:
        snap = self.snapshot()
        return ExportReport(
            records=self.records,
            duplicates=self.duplicates,
            slices=self.slices_done,
            splits=self.splits,
            slices_reread=self.rereads,
            pages=self.pages,
            requests=snap.requests,
            retries=snap.retries,
            elapsed=snap.elapsed,
            since=_dt(self.lo),
            until=_dt(self.hi - 1 if self.end_inclusive else self.hi),
            until_frozen=self.frozen,
            verified=self.verified,
            resumed=self.resumed,
            output=self.sink.path if isinstance(self.sink, FileSink) else None,
            notes=tuple(self.notes),
        )

    async def search_all(self) -> None:
        gaps = self.done.gaps(self.lo, self.hi)
        if not gaps:
            return
        per_gap = max(1, math.ceil(self.workers / len(gaps)))
        for a, b in gaps:
            for lo, hi in _cut(a, b, per_gap):
                self.enqueue(_Slice(lo, hi))
        tasks = [asyncio.ensure_future(self.worker()) for _ in range(self.workers)]
        joiner = asyncio.ensure_future(self.queue.join())
        try:
            finished, _ = await asyncio.wait([joiner, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in finished:
                if t is not joiner:
                    t.result()  # a worker only ends by raising: re-raise its error here
        finally:
            pending = [joiner, *tasks]
            for t in pending:
                t.cancel()
            # Shielded: a second cancellation must not leave the workers un-awaited.
            await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))

    def enqueue(self, s: _Slice) -> None:
        self.active.add(s)
        self.queue.put_nowait(s)

    async def worker(self) -> None:
        while True:
            s = await self.queue.get()
            self.running += 1
            try:
                await self.run_slice(s)
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
        if self.has_total:
            return concurrency
        busy = max(1, self.queue.qsize() + self.running)
        return max(1, min(concurrency, concurrency // busy))

    async def run_slice(self, s: _Slice) -> None:
        merged: dict[str, RawRecord] = {}
        keyless: list[RawRecord] = []
        attempt = 0
        while True:
            attempt += 1
            outcome = await self.read(s, may_split=attempt == 1 and s.hi - s.lo >= 2)
            if isinstance(outcome, _Split):
                self.split(s, outcome)
                return
            records, totals = outcome
            before = len(merged)
            seen_here: set[str] = set()
            keyless = []
            for r in records:
                key = _key(r)
                if key is None:
                    keyless.append(r)
                elif key in seen_here:
                    self.duplicates += 1  # the same chat twice in one read: pages shifted
                else:
                    seen_here.add(key)
                    merged[key] = r  # a re-read brings the fresher version
            expected = totals[-1] if totals else None
            if expected is None or None in totals:
                self.verified = False
                break
            got = len(merged) + len(keyless)
            stable = len(set(totals)) == 1
            if got >= expected and stable:
                if attempt > 1:
                    self.notes.append(
                        f"slice {_fmt(s.lo)}..{_fmt(s.hi)}: complete after {attempt - 1} "
                        f"re-read(s), {got} chats (+{len(merged) - before} on the last)"
                    )
                break
            if attempt > MAX_REREADS:
                self.notes.append(
                    f"slice {_fmt(s.lo)}..{_fmt(s.hi)}: still short after {MAX_REREADS} "
                    f"re-reads: {got} chats of {expected}; kept what was read"
                )
                break
            why = "its total changed while paging" if not stable else "it came up short"
            self.notes.append(
                f"slice {_fmt(s.lo)}..{_fmt(s.hi)}: re-reading, {why} "
                f"({got} distinct chats, total {expected})"
            )
            self.rereads += 1
        await self.commit(s, [*merged.values(), *keyless])

    async def read(
        self, s: _Slice, *, may_split: bool
    ) -> _Split | tuple[list[RawRecord], list[int | None]]:
        records: list[RawRecord] = []
        totals: list[int | None] = []
        pages = self.client.search_raw_pages(
            self.slice_query(s), prefetch=self.prefetch(), stats=PagingStats()
        )
        async with aclosing(pages) as it:
            async for page in it:
                if not totals:
                    self.has_total = page.total is not None
                if not totals and page.total is not None:
                    s.estimate = page.total
                    depth = last_page(page.total)
                    if may_split and depth > self.slice_pages:
                        pieces = math.ceil(depth * _SPLIT_SLACK / self.slice_pages)
                        return _Split(pieces, page.total)
                totals.append(page.total)
                records.extend(page.items)
                self.pages += 1
                self.fetched += len(page.items)
                if page.total is None and may_split and len(page.items) == PAGE_SIZE:
                    if len(totals) == 1:
                        # No total: one request past the depth limit tells whether it is deep.
                        beyond = await self.probe(s, self.slice_pages + 1)
                        if beyond:
                            self.fetched -= len(records)
                            return self.split_without_total(
                                s, (self.slice_pages + 1) * PAGE_SIZE, [*records, *beyond]
                            )
                    elif len(totals) >= self.slice_pages:  # grew while paging
                        self.fetched -= len(records)
                        return self.split_without_total(s, len(records), records)
                self.tell()
        return records, totals

    async def probe(self, s: _Slice, number: int) -> Sequence[RawRecord]:
        """The chats of page `number` of slice `s` (empty past its end)."""
        pages = self.client.search_raw_pages(
            self.slice_query(s), prefetch=1, start_page=number, max_pages=1
        )
        async with aclosing(pages) as it:
            async for page in it:
                return page.items
        return ()

    def split_without_total(self, s: _Slice, count: int, sample: Sequence[RawRecord]) -> _Split:
        """Deep without a total: guess the pieces from the span of the chats seen (a heuristic
        only, good when the server sends newest first; correctness never depends on the order
        the server sends). `count` chats are known to be at least as new as `sample`'s oldest."""
        oldest: int | None = None
        for r in sample:
            value = r.get("created_at")
            if isinstance(value, str):
                with contextlib.suppress(ValueError):
                    at = _us(parse_utc(value))
                    oldest = at if oldest is None else min(oldest, at)
        pieces = 2
        if oldest is not None and s.lo < oldest < s.hi:
            estimate = count * (s.hi - s.lo) / (s.hi - oldest)
            pieces = math.ceil(estimate / PAGE_SIZE * _SPLIT_SLACK / self.slice_pages)
        return _Split(pieces, None)

    def split(self, s: _Slice, how: _Split) -> None:
        parts = _cut(s.lo, s.hi, min(MAX_SPLIT, max(2, how.pieces)))
        self.splits += 1
        self.active.discard(s)
        share = None if how.estimate is None else -(-how.estimate // len(parts))
        for lo, hi in parts:
            self.enqueue(_Slice(lo, hi, share))
        self.tell()

    async def commit(self, s: _Slice, records: Sequence[RawRecord]) -> None:
        async with self.lock:
            fresh: list[RawRecord] = []
            for r in records:
                key = _key(r)
                if key is not None:
                    if key in self.seen:
                        self.duplicates += 1
                        continue
                    self.seen.add(key)
                    self.keyed += 1
                fresh.append(r)
            await self.sink.write(fresh)
            self.offset = self.sink.sync()
            self.done.add(s.lo, s.hi)
            self.records += len(fresh)
            self.slices_done += 1
            self.active.discard(s)
            self.save_checkpoint()
        self.tell(force=True)


async def export_chats(
    client: ImiChatClient,
    *,
    since: datetime | date | str,
    until: datetime | date | str | None = None,
    sink: Sink | str | os.PathLike[str] | Callable[[RawRecord], Awaitable[Any]],
    filters: Iterable[Filter | tuple[str, str, Any]] | None = None,
    condition: str = "and",
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    slice_pages: int = DEFAULT_SLICE_PAGES,
    workers: int | None = None,
    progress: Callable[[ExportProgress], None] | None = None,
    **params: Any,
) -> ExportReport:
    """Export every chat created in `[since, until)` matching the filters, each once, to `sink`.

    - `since`, `until`: datetimes (naive means UTC), dates or ISO 8601 strings.
      Without `until`, the range ends at the start instant, inclusive, frozen.
    - `filters`, `condition` and keyword filters (`status="closed"`,
      `updated_at__gte=...`) as for `search_chats`; a `created_at` filter is
      kept and intersected with the range. `condition="or"` cannot be combined
      with the time slices unless there is at most one filter.
    - `sink`: a `Sink` (`NdjsonSink(path)`, `CsvSink(path)`, `CallableSink(fn)`),
      a path (`.csv` means CSV, else NDJSON) or an async callable taking one chat.
    - `checkpoint`: a file recording the progress after every slice. If it
      exists, `resume=True` continues from it (same arguments required);
      without `resume` a `CheckpointError` is raised rather than overwrite it.
      It is deleted when the export completes.
    - `slice_pages`: a slice with more pages than this is split by time.
    - `workers`: slices searched at once (default: the client's concurrency);
      requests in flight stay bounded by the client's concurrency.
    - `progress`: called with an `ExportProgress` as pages arrive (at most
      every 50 ms) and after every slice.

    Raises `InvalidQueryError` before any request for bad filters or range,
    `CheckpointError` for an unusable checkpoint, the client's `ApiError`
    subclasses for the API's errors. On any failure or cancellation the
    checkpoint stays consistent; no task outlives the call.
    """
    query = build_query(params, filters, condition)
    if query.condition == "or":
        if len(query.filters) > 1:
            raise InvalidQueryError(
                "export slices the range with created_at filters, which needs "
                "condition='and'; run one export per alternative instead of condition='or'"
            )
        query = Query(query.filters, "and")  # one filter: 'or' and 'and' are the same
    since_us = _to_us("since", since)
    until_us = None if until is None else _to_us("until", until)
    if not isinstance(slice_pages, int) or isinstance(slice_pages, bool) or slice_pages < 1:
        raise InvalidQueryError(f"slice_pages must be an int >= 1, got {slice_pages!r:.40}")
    n_workers = client.concurrency if workers is None else workers
    if not isinstance(n_workers, int) or isinstance(n_workers, bool) or n_workers < 1:
        raise InvalidQueryError(f"workers must be an int >= 1, got {workers!r:.40}")
    exporter = _Exporter(
        client,
        query,
        since_us,
        until_us,
        make_sink(sink),
        Path(checkpoint) if checkpoint is not None else None,
        resume,
        slice_pages,
        n_workers,
        progress,
    )
    return await exporter.run()
