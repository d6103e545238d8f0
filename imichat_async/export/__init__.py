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
  after `slice_pages` full pages without it.
- A chat's `created_at` never changes, so it belongs to exactly one slice:
  chats are de-duplicated by `chat_id` within a slice and its re-reads only,
  and memory stays flat however many chats are exported. Where the server
  sends a total, each slice's distinct count is checked against it (and
  against the totals of its later pages); a slice that came up short (data
  changed under it) is re-read and merged, up to `MAX_REREADS` times; the
  report's `notes` say what was done.
- A finished slice is written to the sink in one go, the file is synced, and
  the checkpoint (written atomically: temp file, fsync, `os.replace`) records
  the finished slices and the output's byte length. A run killed at any moment
  (`kill -9` included) and started again with the same arguments and
  `resume=True` truncates the output to the checkpointed length, checks the
  count of chats in it and redoes only the unfinished slices: the end result
  holds exactly the chats of an uninterrupted run, each once.
- File sinks write to `<path>.part` and rename it to `<path>` when complete.
  A `CallableSink` is exactly-once within a run, at-least-once across a crash
  (a slice delivered but not yet checkpointed is delivered again on resume).
- Blocking file work (fsync, counting a partial file) runs in a worker thread.

Layout, one concern per module:

- `_plan.py`: pure. Instants, windows (`Slice`, `Intervals`, `cut`, `split`),
  split sizes, and the plan: `TimeRange`, a half-open range of `created_at`.
- `_runner.py`: the engine. `SliceReader` pages one slice through
  `client.search_pages(raw=True)`, verifies and re-reads it or says to split
  it; `Runner` keeps `workers` slices in flight and commits each finished one
  (sink write, sync, checkpoint).
- `_checkpoint.py`: the attrs state, (un)structured by cattrs, written by
  one atomic-write helper.
- `_sinks.py`: NDJSON, CSV, async callable. `_parquet.py`: a partitioned Parquet
  dataset, written in batches of slices (`Sink.holds`); the Arrow side is `_arrow.py`.
  `_progress.py`: the tally, progress snapshots, the report. `_aio.py`: waiting
  through cancellations, blocking calls in threads. `_export.py`: `export_chats`, the wiring.

One engine, many plans (the seam for `sync`, issue #14): the runner asks a
plan (`_plan.Plan`) only for the `search_pages` keywords of a slice, the key
that de-duplicates a record within a slice, and a record's position on the
slice axis. A sync is another plan over the same runner, sinks, checkpoint
helper and progress: windows on `created_at` and on `updated_at`, keyed by
`(chat_id, updated_at)`, its state a second attrs class saved by the same
`Checkpoint`/`atomic_write`.
"""

from ._arrow import CHAT_SCHEMA, chats_table
from ._checkpoint import CheckpointError
from ._export import export_chats
from ._parquet import ParquetSink
from ._partitions import (
    DEFAULT_ROWS_PER_PARTITION,
    Partition,
    plan_partitions,
    read_partition,
)
from ._progress import ExportProgress, ExportReport
from ._sinks import CSV_COLUMNS, CallableSink, CsvSink, FileSink, NdjsonSink, Sink, make_sink
from ._sync import SyncReport, check_sync_arguments, state_from_json, state_to_json, sync_chats
from ._syncplan import DEFAULT_LAG, SyncState

__all__ = [
    "CHAT_SCHEMA",
    "CSV_COLUMNS",
    "DEFAULT_LAG",
    "DEFAULT_ROWS_PER_PARTITION",
    "CallableSink",
    "CheckpointError",
    "CsvSink",
    "ExportProgress",
    "ExportReport",
    "FileSink",
    "NdjsonSink",
    "ParquetSink",
    "Partition",
    "Sink",
    "SyncReport",
    "SyncState",
    "chats_table",
    "check_sync_arguments",
    "export_chats",
    "make_sink",
    "plan_partitions",
    "read_partition",
    "state_from_json",
    "state_to_json",
    "sync_chats",
]
