"""Sinks: where exported records go (NDJSON file, CSV file, an async callable).

The runner drives a sink; users only construct one. File sinks write to
`<path>.part` and rename it to `<path>` when the export completes; their
blocking calls (fsync, reading a partial file on resume) run in a worker
thread, off the event loop.
"""

from __future__ import annotations

import abc
import contextlib
import csv
import inspect
import io
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar

from .. import ChatText, InvalidQueryError, RawChat
from ._aio import in_thread
from ._checkpoint import CheckpointError, fsync_dir, named_on_error

RawRecord = Mapping[str, Any]
_CHUNK = 1 << 20  # bytes read at a time when counting a partial file
_HEAD = 1 << 16  # bytes of a log read to tell whether it holds more than a header


class Sink(abc.ABC):
    """Where exported chats go. `export_chats` drives it; users only construct one.

    Life cycle: `await open(offset)` (fresh when `offset` is None, else resume at
    that byte length and return the records already there), `await write`
    (one finished slice at a time), `await sync` (make it durable; return the
    byte length, or None when the sink cannot resume), then `await complete`
    (publish) or `close` (leave it unpublished, for a resume).

    A batching sink (`batching`, `ParquetSink`) keeps finished slices in memory while
    `holds` says so; the runner then `detach`es them as one batch, writes it, and only
    then records its slices in the checkpoint (also at the end of the run). `sync`'s
    result is then whatever `open` needs to resume (for Parquet: batches written).
    """

    kind: ClassVar[str] = "sink"
    #: Keeps finished slices and writes them in batches (`holds`, `detach`).
    batching: ClassVar[bool] = False
    #: `write` takes each chat as its text alone (an `imichat_async.ChatText`: the bytes
    #: as sent, never parsed into a dict), not as a dict: set by `NdjsonSink`, which
    #: writes nothing else. Never inherited: a subclass (a user's, whose `encode` may
    #: read fields) gets dicts unless its own class body sets it.
    takes_text: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "takes_text" not in cls.__dict__:
            cls.takes_text = False

    def describe(self) -> dict[str, Any]:
        """What identifies this sink in a checkpoint (so a resume writes to the same place):
        its `kind` (and a file's path), never a class's name, so renaming a class (a
        user's sink, a callable's) keeps a saved state usable."""
        return {"kind": self.kind}

    async def open(self, offset: int | None) -> int | None:
        """Start fresh (`offset` None) or resume at `offset`: the records already written
        there (None: the sink cannot tell)."""
        return None

    @abc.abstractmethod
    async def write(self, records: Sequence[RawRecord]) -> None:
        """Write the records of one finished slice."""

    async def sync(self) -> int | None:
        """Flush what was written to durable storage; return its byte length (None: not a file)."""
        return None

    def holds(self, records: int) -> bool:
        """A batching sink: whether `records` more may wait, unwritten, with the slices
        written since the last batch (False: the runner syncs after every slice)."""
        return False

    def detach(self) -> Callable[[], Awaitable[int | None]]:
        """A batching sink: take what was written so far as one batch; return the call that
        writes it durably (later writes are not part of it) and returns what `sync` does."""
        return self.sync

    async def complete(self) -> None:  # noqa: B027 (optional hook)
        """The export is complete: publish the result."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release resources without publishing (the export failed or was interrupted)."""

    def discard(self) -> None:
        """Remove any unpublished output (a failed export without a checkpoint)."""
        self.close()


class FileSink(Sink):
    """A file written to `<path>.part`, then renamed to `path` when the export completes.

    With `append=True` (a sync's change log) the records go to `path` itself,
    after what is there: a fresh open creates it (refusing a non-empty file it
    has no record of), a resume truncates it to the length the state
    recorded, and `complete` publishes nothing (no rename; nothing is ever
    deleted, not even by `discard`).
    """

    def __init__(self, path: str | os.PathLike[str], *, append: bool = False) -> None:
        self.path = Path(path)
        self.append = append
        self.temp_path = self.path if append else self.path.with_name(self.path.name + ".part")
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
    def count(self, f: IO[bytes]) -> int:
        """The records in a file this sink wrote, read from its start to its end, streamed."""

    async def open(self, offset: int | None) -> int | None:
        if self.append:
            return await in_thread(self._open_log, offset)
        if offset is None:
            fresh: IO[bytes] = await in_thread(open, self.temp_path, "wb")
            self._file = fresh
            fresh.write(self.header())
            await self.sync()
            return 0
        return await in_thread(self._reopen, offset)

    def _reopen(self, offset: int) -> int:
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
        f: IO[bytes] = open(self.temp_path, "r+b")  # noqa: SIM115 (kept open, closed by close)
        self._file = f
        f.truncate(offset)  # drop whatever was written after the last checkpoint
        f.seek(0)
        try:
            records = self.count(f)
        except (ValueError, csv.Error) as exc:  # not UTF-8, a CSV field past csv's limit
            raise CheckpointError(
                f"cannot resume: the partial output {str(self.temp_path)!r} is damaged "
                f"({type(exc).__name__}: {exc!s:.200}); delete it and the checkpoint "
                "to start over"
            ) from None
        f.seek(offset)
        return records

    def holds_partial(self) -> bool:
        """Whether an unpublished `.part` holding chats (more than its header) is there."""
        try:
            return not self.append and self.temp_path.stat().st_size > len(self.header())
        except FileNotFoundError:
            return False

    def check_unrecorded_log(self) -> None:
        """Append mode, no state yet: refuse a log that already holds records (reading only
        its head), so that nothing of someone else's is overwritten."""
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as head:
            if head.read(_HEAD) not in (b"", self.header()):
                raise CheckpointError(
                    f"{str(self.path)!r} exists and is not empty, but the state has no "
                    "record of it: give the state it was written with, or another output"
                )

    def _open_log(self, offset: int | None) -> None:
        """Append mode: create the log (offset None) or truncate it to `offset` and go on."""
        if offset is None:
            self.check_unrecorded_log()
            f: IO[bytes] = open(self.path, "wb")  # noqa: SIM115 (kept open)
            f.write(self.header())
        else:
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                raise CheckpointError(
                    f"cannot continue: the log {str(self.path)!r} is missing "
                    f"(the state recorded {offset} bytes)"
                ) from None
            if size < offset:
                raise CheckpointError(
                    f"cannot continue: {str(self.path)!r} holds {size} bytes, "
                    f"fewer than the {offset} the state recorded"
                )
            f = open(self.path, "r+b")  # noqa: SIM115 (kept open)
            f.truncate(offset)  # drop whatever was written after the last saved state
            f.seek(offset)
        self._file = f
        return None

    async def write(self, records: Sequence[RawRecord]) -> None:
        if self._file is None:
            raise RuntimeError("sink is not open")
        if records:
            with named_on_error(self.temp_path):
                self._file.write(self.encode(records))

    async def sync(self) -> int | None:
        f = self._file
        if f is None:
            raise RuntimeError("sink is not open")
        with named_on_error(self.temp_path):
            f.flush()
            await in_thread(os.fsync, f.fileno())
        return f.tell()

    async def complete(self) -> None:
        if self._file is not None:
            await self.sync()
            self.close()
        if not self.append:
            await in_thread(self._publish)

    def _publish(self) -> None:
        os.replace(self.temp_path, self.path)
        fsync_dir(self.path.parent)

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def discard(self) -> None:
        self.close()
        if not self.append:
            with contextlib.suppress(FileNotFoundError):
                self.temp_path.unlink()


def _json_text(record: RawRecord | ChatText) -> bytes:
    """The record's text as the server sent it (`RawChat.raw`, `ChatText.raw`), else compact
    JSON, UTF-8.

    A text spanning lines (a server that pretty-prints) is written compact: one line.
    """
    if isinstance(record, (RawChat, ChatText)):
        raw = record.raw
        if b"\n" not in raw and b"\r" not in raw:
            return raw
        if isinstance(record, ChatText):  # its object, as the page's parse read it
            return _compact(json.loads(raw))
    return _compact(record)


def _compact(obj: Any) -> bytes:
    """Compact JSON, UTF-8; a lone surrogate (no UTF-8) kept as its escape, the text ASCII.

    The export's own copy of `_protocol.compact_json` (a subpackage imports no private
    root module)."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode()


class NdjsonSink(FileSink):
    """One JSON object per line: the bytes of the record's JSON text exactly as the server
    sent them (a `ChatText` or `RawChat`: what searches with `raw="text"` or `raw=True`
    give; an export hands it `ChatText`s, `takes_text`); any other mapping as its compact
    JSON, UTF-8. A record the server sent over several lines is written compact.
    """

    kind = "ndjson"
    takes_text = True

    def encode(self, records: Sequence[RawRecord | ChatText]) -> bytes:
        texts = [r.raw for r in records if r.__class__ is ChatText or r.__class__ is RawChat]
        if len(texts) == len(records):  # the common case: every record as sent, joined
            out = b"\n".join(texts) + b"\n"
            if out.count(b"\n") == len(texts) and b"\r" not in out:
                return out
        return b"\n".join(map(_json_text, records)) + b"\n"

    def count(self, f: IO[bytes]) -> int:
        # Every record is one line; JSON text holds no raw newline.
        lines = 0
        while chunk := f.read(_CHUNK):
            lines += chunk.count(b"\n")
        return lines


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

    def count(self, f: IO[bytes]) -> int:
        # Rows, not lines: a quoted cell may hold a newline. Streamed, line by line.
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        try:
            rows = sum(1 for _ in csv.reader(text))
        finally:
            text.detach()  # leave the file open for the writes that follow
        return max(0, rows - 1)  # the header


class CallableSink(Sink):
    """Hands each chat (the raw JSON object) to `fn(chat)`, in slice order.

    `fn` may be async or plain: its result is awaited only when it is awaitable.

    Exactly once within a run; across a crash, the chats of a slice delivered
    but not yet checkpointed are delivered again on resume (at least once).
    """

    kind = "callable"

    def __init__(self, fn: Callable[[RawRecord], Any]) -> None:
        if not callable(fn):
            raise TypeError("CallableSink takes a callable: fn(chat), async or plain")
        self.fn = fn

    async def write(self, records: Sequence[RawRecord]) -> None:
        fn = self.fn
        for record in records:
            result = fn(record)
            if inspect.isawaitable(result):
                await result


def make_sink(
    target: Sink | str | os.PathLike[str] | Callable[[RawRecord], Any],
    format: str | None = None,
    *,
    append: bool = False,
) -> Sink:
    """A sink from a `Sink`, an async callable, or a path (`format` "ndjson", "csv" or
    "parquet", a directory or fsspec URL; by default from the suffix: `.csv` is CSV,
    anything else NDJSON). `append`: a file sink appends to the path itself (a sync's log;
    a `FileSink` or `ParquetSink` given is reopened so)."""
    if isinstance(target, FileSink) and target.append != append:
        return type(target)(target.path, append=append)
    from ._parquet import ParquetSink  # here: that module builds on this one

    if isinstance(target, ParquetSink) and target.append != append:
        return target.reopened(append=append)
    if isinstance(target, Sink):
        return target
    if isinstance(target, (str, os.PathLike)) and format == "parquet":
        return ParquetSink(target, append=append)
    if isinstance(target, (str, os.PathLike)):
        path = Path(target)
        fmt = format or ("csv" if path.suffix.lower() == ".csv" else "ndjson")
        if fmt == "ndjson":
            return NdjsonSink(path, append=append)
        if fmt == "csv":
            return CsvSink(path, append=append)
        raise InvalidQueryError(f"unknown export format {fmt!r}: expected ndjson, csv or parquet")
    if callable(target):
        return CallableSink(target)
    raise TypeError(
        f"sink must be a Sink, a path or an async callable, got {type(target).__name__}"
    )
