"""`ParquetSink`: a Hive-partitioned Parquet dataset, in batches committed behind the checkpoint.

Layout: `DIR/<column>=YYYY-MM-DD/part-<batch>-<n>.parquet`, `<column>` `created_date`
(an export: the chat's `created_at` date in UTC) or `updated_date` (a sync: the
version's `updated_at` date); a null date goes to `<column>=__HIVE_DEFAULT_PARTITION__`,
which readers take as null. Every file has `CHAT_SCHEMA` (`imichat_async.export`).

Exactly once: the sink keeps finished slices in memory (as Arrow) until
`max_rows_per_file` rows wait (`holds`); the runner then calls `sync`, which writes
the batch, one file per date (more when a date holds more rows than that) named by
the batch's number, each under a temporary name, fsynced, then renamed into place;
only then does the runner record the batch's slices in the checkpoint, with the
number of batches written as the checkpoint's `offset`. A resume removes the
temporary files and every file of a batch numbered at or past that offset (written
after the last checkpoint), so the slices it redoes replace what an interrupted run
left, never add to it. On object storage (any fsspec URL: `s3://bucket/prefix`) a
file is one object written whole (a PUT is atomic): no temporary name is needed.

A sync (`append=True`) numbers its batches on from the ones its state records, so a
run only adds files; a fresh start refuses a directory that already holds a dataset.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .. import ConfigurationError
from ._aio import in_thread
from ._arrow import CHAT_SCHEMA, EXTRA_HINT, POOL, chats_table, require_pyarrow
from ._checkpoint import CheckpointError, fsync_dir
from ._sinks import RawRecord, Sink

#: Rows of one file at most, and rows a sink keeps in memory before writing a batch.
DEFAULT_MAX_ROWS_PER_FILE = 25_000
CONVERT_ROWS = 1024  # records converted to Arrow at a time (see `ParquetSink._convert`)
#: A chunk whose rows come in more runs of a date than this (and than one a RUN_ROWS rows)
#: is sorted by date before it is cut: fewer, longer pieces to write.
RUNS, RUN_ROWS = 8, 32
#: Parquet data pages of 64 KiB, not pyarrow's 1 MiB. The column writers allocate from
#: Arrow's default pool whatever pool they are given (pyarrow does not pass one on to
#: them), a page's buffer per column, and so touched more of mimalloc's huge pages (see
#: `_arrow.POOL`) the larger the files: peak RSS grew 18 % from an export of 200k chats
#: (520-row files) to one of 1M (2,400-row files); 9 % with 64 KiB pages. Such files
#: come out ~0.3 % larger; files of 25,000 rows of one date ~12 % larger.
PAGE_BYTES = 64 * 1024
ROW_GROUP_ROWS = 128 * 1024  # rows per row group at most (a default-sized file: one group)
NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"  # Hive's (and DuckDB's, Spark's) null
#: zstd, not snappy: in an export of the sandbox's chats, files 0.66x the size (95 vs 144
#: bytes a chat) for ~1.3 us a chat more CPU in the writer threads (~1.5 % of the export's).
COMPRESSION = "zstd"
#: Columns whose values repeat (a status, an asset, a tag...) are dictionary-encoded; the
#: rest hold a value per chat or per customer (ids, times), where a dictionary costs CPU
#: (~13 % of a file's encoding) and bytes (files ~9 % larger).
DICTIONARY = ["status", "channel", "asset_id", "asset_name", "assignee", "flag"]
DICTIONARY += ["tag.list.element", "other_details", "extra"]
T = TypeVar("T")
K = TypeVar("K")


class ParquetSink(Sink):
    """A Parquet dataset under `path` (a local directory, or an fsspec URL such as
    `s3://bucket/prefix`), Hive-partitioned by a date in UTC.

    - `append=False` (an export): partitioned by `created_at` (`created_date=`);
      `append=True` (a sync's change log): by `updated_at` (`updated_date=`). `partition`
      ("created_at" or "updated_at") overrides it.
    - `max_rows_per_file`: rows of one file at most; also the rows held in memory
      before a batch is written, so memory is bounded by it.
    - `storage_options`: passed to fsspec for a URL (e.g. `{"endpoint_url": ...}`).
    """

    kind = "parquet"
    batching = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        append: bool = False,
        max_rows_per_file: int = DEFAULT_MAX_ROWS_PER_FILE,
        partition: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        require_pyarrow()
        if not isinstance(max_rows_per_file, int) or max_rows_per_file < 1:
            raise ValueError(f"max_rows_per_file must be an int >= 1, got {max_rows_per_file!r}")
        if partition not in (None, "created_at", "updated_at"):
            raise ValueError(f"partition must be 'created_at' or 'updated_at', got {partition!r}")
        self.append = append
        self.max_rows_per_file = max_rows_per_file
        self.partition_arg = partition
        self.partition = partition or ("updated_at" if append else "created_at")
        self.column = self.partition.removesuffix("_at") + "_date"
        self.storage_options = dict(storage_options or {})
        text = os.fspath(path)
        self.url: str | None = text if "://" in text and not text.startswith("file://") else None
        local = text.removeprefix("file://") if self.url is None else ""
        self.path = Path(local) if self.url is None else None
        self.store: _Store = (
            _FsspecStore(text, self.storage_options) if self.url else _LocalStore(Path(local))
        )
        self._name = re.compile(
            rf"^{re.escape(self.column)}=[^/]+/\.?part-(\d+)-\d+\.parquet(\.tmp)?$"
        )
        self.batch = 0  # the number of the next batch
        self.first_batch = 0  # the first batch of this run (what `discard` may remove)
        self.raw: list[RawRecord] = []  # written, not yet converted (under CONVERT_ROWS)
        self.buffer: dict[str, list[Any]] = {}  # partition value -> Arrow tables
        self.buffered = 0
        self.opened = False
        self.started = False  # opened once: `discard` may remove what this run wrote
        self.encoder: ThreadPoolExecutor | None = None  # the thread that writes batches

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"

    @property
    def location(self) -> str:
        """The dataset's directory or URL."""
        return self.url if self.url is not None else str(self.path)

    def reopened(self, *, append: bool) -> ParquetSink:
        """The same dataset, for an export (`append=False`) or a sync (`append=True`)."""
        return ParquetSink(
            self.url or str(self.path),
            append=append,
            max_rows_per_file=self.max_rows_per_file,
            partition=self.partition_arg,
            storage_options=self.storage_options,
        )

    def describe(self) -> dict[str, Any]:
        where = self.url if self.path is None else str(self.path.resolve())
        return {"kind": self.kind, "path": where, "partition": self.column}

    # -- the life cycle ------------------------------------------------------------------

    async def open(self, offset: int | None) -> int | None:
        return await in_thread(self._open, offset)

    def _open(self, offset: int | None) -> int | None:
        files = self._listing()
        temps = [name for name, (_, temp) in files.items() if temp]
        done = {name: batch for name, (batch, temp) in files.items() if not temp}
        if offset is None:
            if done:
                raise CheckpointError(
                    f"{self.location!r} already holds a Parquet dataset ({len(done)} files) "
                    "that the checkpoint or state has no record of: give the one it was "
                    "written with, or another output"
                )
            self.store.remove(temps)
            self.batch = self.first_batch = 0
            self.opened = self.started = True
            return 0
        # Files of batches at or past `offset` were written after the last checkpoint.
        self.store.remove(temps + [name for name, batch in done.items() if batch >= offset])
        self.batch = self.first_batch = offset
        self.opened = self.started = True
        if self.append:
            return None
        return sum(self.store.rows(name) for name, batch in done.items() if batch < offset)

    def _listing(self) -> dict[str, tuple[int, bool]]:
        """This dataset's files, by path relative to its root: (batch, temporary)."""
        found: dict[str, tuple[int, bool]] = {}
        for name in self.store.files():
            m = self._name.match(name)
            if m is not None:
                found[name] = (int(m.group(1)), m.group(2) is not None)
        return found

    def holds(self, records: int) -> bool:
        return self.buffered + records <= self.max_rows_per_file

    async def write(self, records: Sequence[RawRecord]) -> None:
        if not self.opened:
            raise RuntimeError("sink is not open")
        self.raw.extend(records)
        self.buffered += len(records)
        if len(self.raw) >= CONVERT_ROWS:
            self._convert()

    def _convert(self) -> None:
        """The records written since the last call, as Arrow, into the partitions' buffers.

        In chunks of `CONVERT_ROWS`: a table has a cost per call (~1 ms), and the records
        waiting for it are Python objects (~2.5 kB each: 4096 of them held ~10 MB)."""
        raw, self.raw = self.raw, []
        if raw:
            for value, part in _partitions(chats_table(raw), self.partition):
                self.buffer.setdefault(value, []).append(part)

    async def sync(self) -> int | None:
        return await self.detach()()

    def detach(self) -> Callable[[], Awaitable[int | None]]:
        if not self.opened:
            raise RuntimeError("sink is not open")
        self._convert()
        buffer, self.buffer, self.buffered = self.buffer, {}, 0
        batch = self.batch
        if buffer:
            self.batch += 1
        written = self.batch  # the batches written once this one is

        async def write() -> int:
            if buffer:
                # in this sink's own thread, the same for every batch, not any of the event
                # loop's executor's: see `_encode_then`
                if self.encoder is None:
                    self.encoder = ThreadPoolExecutor(1, thread_name_prefix="parquet-encode")
                await in_thread(self._write_batch, buffer, batch, executor=self.encoder)
            return written

        return write

    def _write_batch(self, buffer: dict[str, list[Any]], batch: int) -> None:
        """Write batch number `batch`, a file per partition (more past `max_rows_per_file`):
        all under temporary names first, synced, then renamed into place."""
        import pyarrow as pa

        files: list[tuple[str, Any]] = []
        for value in sorted(buffer):
            table = pa.concat_tables(buffer.pop(value))
            step = self.max_rows_per_file
            for n, start in enumerate(range(0, table.num_rows, step)):
                name = f"{self.column}={value}/part-{batch:06d}-{n}.parquet"
                files.append((name, table.slice(start, step)))
        self.store.put(files)

    async def complete(self) -> None:
        if self.buffered:
            await self.sync()
        self.close()

    def close(self) -> None:
        self.raw, self.buffer, self.buffered = [], {}, 0
        self.opened = False
        if self.encoder is not None:
            self.encoder.shutdown(wait=False)  # idle: a batch's write is awaited to its end
            self.encoder = None

    def discard(self) -> None:
        """Remove what this run wrote (an export that failed without a checkpoint); a sync's
        dataset keeps its files, only temporary ones go."""
        self.close()
        if not self.started:
            return  # nothing was written (and a dataset `open` refused stays as it is)
        with contextlib.suppress(OSError):
            files = self._listing()
            gone = [
                name
                for name, (batch, temp) in files.items()
                if temp or (not self.append and batch >= self.first_batch)
            ]
            self.store.remove(gone)


def _partitions(table: Any, field: str) -> list[tuple[str, Any]]:
    """The rows of `table` by the UTC date of `field` (`NULL_PARTITION` when null).

    An export's chunk comes in runs of a date (each slice sorted by `created_at`): it is
    cut where the date changes, zero-copy slices of the chunk. Rows in no such order (a
    sync's, by `updated_at`) are sorted by it first (a copy of the chunk)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    dates = pc.cast(table.column(field), pa.date32(), memory_pool=POOL).combine_chunks(POOL)
    runs = pc.run_end_encode(dates, memory_pool=POOL)
    if len(runs.run_ends) > max(RUNS, len(dates) // RUN_ROWS):
        order = pc.sort_indices(dates, memory_pool=POOL)  # nulls last
        table = pc.take(table, order, memory_pool=POOL)
        runs = pc.run_end_encode(pc.take(dates, order, memory_pool=POOL), memory_pool=POOL)
    parts, start = [], 0
    for end, day in zip(runs.run_ends.to_pylist(), runs.values.to_pylist(), strict=True):
        value = NULL_PARTITION if day is None else day.isoformat()
        parts.append((value, table.slice(start, end - start)))
        start = end
    return parts


def _parquet_bytes(table: Any) -> Any:
    """`table` as the bytes of one Parquet file (a `pyarrow.Buffer`).

    Encoded into Arrow's own buffer, then written by the caller at once: pyarrow writing
    to a Python file object calls its `write` some 50 times a file, each taking the GIL
    from the event loop's thread (which meanwhile parses pages and builds tables)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = pa.BufferOutputStream(memory_pool=POOL)
    pq.write_table(
        table,
        out,
        row_group_size=ROW_GROUP_ROWS,
        compression=COMPRESSION,
        use_dictionary=DICTIONARY,
        store_schema=True,
        data_page_size=PAGE_BYTES,
        memory_pool=POOL,
    )
    return out.getvalue()


WRITERS = 4  # threads writing (and fsyncing) the files of one batch


def _parallel(fn: Callable[..., T], calls: Sequence[tuple[Any, ...]]) -> list[T]:
    """`fn(*args)` for each of `calls`, in a few threads; the results in order."""
    if len(calls) <= 1:
        return [fn(*args) for args in calls]
    with ThreadPoolExecutor(min(WRITERS, len(calls)), thread_name_prefix="parquet") as pool:
        return list(pool.map(lambda args: fn(*args), calls))


def _encode_then(files: Sequence[tuple[K, Any]], save: Callable[[K, Any], None]) -> None:
    """Each table of `files` encoded (`_parquet_bytes`) in this thread, one at a time, and
    handed to `save(key, data)`, which a few threads run meanwhile (a write and an fsync
    release the GIL).

    Encoded in one thread, not in the writers: the encoder allocates from Arrow's default
    pool whatever pool it is given, and that pool (mimalloc) keeps pages, huge pages on
    Linux, for each thread that allocated from it (see `PAGE_BYTES`). Encoding is a few
    percent of the export's CPU: one thread keeps up. At most `2 * WRITERS` files wait for
    a writer."""
    if len(files) <= 1:
        for key, table in files:
            save(key, _parquet_bytes(table))
        return
    room = threading.BoundedSemaphore(2 * WRITERS)

    def saving(key: K, data: Any) -> None:
        try:
            save(key, data)
        finally:
            room.release()

    with ThreadPoolExecutor(min(WRITERS, len(files)), thread_name_prefix="parquet") as pool:
        pending = []
        for key, table in files:
            data = _parquet_bytes(table)
            room.acquire()
            pending.append(pool.submit(saving, key, data))
            del data
        for done in pending:
            done.result()


class _Store:
    """Where a dataset's files live: list, write whole, remove, count rows."""

    def files(self) -> list[str]:
        raise NotImplementedError

    def put(self, files: Sequence[tuple[str, Any]]) -> None:
        raise NotImplementedError

    def remove(self, names: Sequence[str]) -> None:
        raise NotImplementedError

    def rows(self, name: str) -> int:
        raise NotImplementedError


class _LocalStore(_Store):
    """A local directory: temporary name, fsync, rename, fsync of the directories."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def files(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [
            f"{d.name}/{f.name}" for d in self.root.iterdir() if d.is_dir() for f in d.iterdir()
        ]

    def put(self, files: Sequence[tuple[str, Any]]) -> None:
        new_root = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        if new_root:
            fsync_dir(self.root.parent)
        dirs: set[Path] = set()
        for name, _ in files:
            parent = (self.root / name).parent
            if not parent.exists():
                parent.mkdir()
                dirs.add(self.root)
        finals = [self.root / name for name, _ in files]
        temps = [f.with_name(f".{f.name}.tmp") for f in finals]
        _encode_then([(t, table) for t, (_, table) in zip(temps, files, strict=True)], self._save)
        for temp, final in zip(temps, finals, strict=True):
            os.replace(temp, final)
            dirs.add(final.parent)
        _parallel(fsync_dir, [(d,) for d in dirs])

    @staticmethod
    def _save(temp: Path, data: Any) -> None:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def remove(self, names: Sequence[str]) -> None:
        dirs = set()
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                (self.root / name).unlink()
                dirs.add((self.root / name).parent)
        for d in dirs:
            fsync_dir(d)

    def rows(self, name: str) -> int:
        import pyarrow.parquet as pq

        rows: int = pq.read_metadata(self.root / name).num_rows
        return rows


class _FsspecStore(_Store):
    """Any fsspec filesystem (s3fs for `s3://`): each file one object, written whole."""

    def __init__(self, url: str, options: Mapping[str, Any]) -> None:
        try:
            from fsspec.core import url_to_fs
        except ImportError:  # pragma: no cover (the extra is installed where tests run)
            raise ConfigurationError(
                f"Parquet output to {url.split('://')[0]}:// needs fsspec: {EXTRA_HINT}"
            ) from None
        try:
            self.fs, root = url_to_fs(url, **options)
        except ImportError as exc:  # the protocol's own package (s3fs, gcsfs...) is missing
            raise ConfigurationError(f"cannot write to {url!r}: {exc}") from None
        self.root = root.rstrip("/")

    def files(self) -> list[str]:
        self.fs.invalidate_cache()
        prefix = self.root + "/"
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return []
        return [p[len(prefix) :] for p in found if p.startswith(prefix)]

    def put(self, files: Sequence[tuple[str, Any]]) -> None:
        objects: dict[str, bytes] = {}

        def keep(name: str, data: Any) -> None:
            objects[f"{self.root}/{name}"] = data.to_pybytes()

        _encode_then(files, keep)
        self.fs.pipe(objects)  # each object one PUT (s3fs sends them concurrently)

    def remove(self, names: Sequence[str]) -> None:
        if names:
            self.fs.rm([f"{self.root}/{name}" for name in names])

    def rows(self, name: str) -> int:
        import pyarrow.parquet as pq

        with self.fs.open(f"{self.root}/{name}", "rb") as f:
            rows: int = pq.read_metadata(f).num_rows
        return rows


__all__ = ["CHAT_SCHEMA", "DEFAULT_MAX_ROWS_PER_FILE", "ParquetSink"]
