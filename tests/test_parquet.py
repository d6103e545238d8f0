"""`--format parquet`: a Hive-partitioned dataset, exactly once across kills, local and S3."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import date, datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import attrs
import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import imichat_async as imi
from imichat_async.cli import main
from imichat_async.export import (
    CHAT_SCHEMA,
    CheckpointError,
    ParquetSink,
    _arrow,
    _parquet,
    _plan,
    chats_table,
    export_chats,
    make_sink,
    sync_chats,
)
from imichat_async.sandbox import Sandbox, serve

from .sandbox_thread import ThreadedSandbox, env_for
from .test_export import SINCE, UNTIL, _checkpoint, _run_until, client_for
from .test_sync_chats import Versions, _on_loop, in_scope

UTC = timezone.utc
README = Path(__file__).resolve().parent.parent / "README.md"
KNOWN = {f.name for f in attrs.fields(imi.Chat)}  # the top-level fields with a column


# -- what a row should be, written out independently of `_arrow` ---------------------------------


def _at(text: Any) -> datetime | None:
    if text is None:
        return None
    return datetime.fromisoformat(str(text).replace("Z", "+00:00")).astimezone(UTC)


def expected_row(r: dict[str, Any]) -> dict[str, Any]:
    """The row the README's table promises for one record the server sent."""
    asset = r.get("asset")
    asset_id = asset_name = None
    if isinstance(asset, dict):
        asset_id, asset_name = asset.get("id"), asset.get("name")
    extra = {k: v for k, v in r.items() if k not in KNOWN}
    return {
        "chat_id": r["chat_id"],
        "alias_id": r.get("alias_id"),
        "created_at": _at(r.get("created_at")),
        "updated_at": _at(r.get("updated_at")),
        "status": r.get("status"),
        "channel": r.get("channel"),
        "asset_id": None if asset_id is None else str(asset_id),
        "asset_name": asset_name,
        "customer_id": r.get("customer_id"),
        "destination_id": r.get("destination_id"),
        "assignee": r.get("assignee"),
        "flag": r.get("flag"),
        "tag": r.get("tag"),
        "other_details": r.get("other_details"),
        "extra": extra or None,
    }


def sql(text: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """A DuckDB query's column names and rows."""
    cursor = duckdb.connect().execute(text)
    return [d[0] for d in cursor.description or ()], cursor.fetchall()


def read_dataset(root: Path | str, column: str = "created_date") -> list[dict[str, Any]]:
    """Every row of the dataset through DuckDB (the README's query), JSON columns decoded;
    checks each row's partition against its timestamp."""
    names, values = sql(
        f"SELECT * FROM read_parquet('{root}/**/*.parquet', hive_partitioning = true)"
    )
    rows = [dict(zip(names, row, strict=True)) for row in values]
    field = column.replace("_date", "_at")
    for row in rows:
        assert row.pop(column) == row[field].date(), "a row in another date's partition"
        for name in ("other_details", "extra"):
            if row[name] is not None:
                row[name] = json.loads(row[name])
    return rows


def assert_exact(rows: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
    ids = [r["chat_id"] for r in rows]
    assert len(set(ids)) == len(ids), "a chat written twice"
    by_id = {r["chat_id"]: r for r in rows}
    expected = {r["chat_id"]: expected_row(r) for r in records}
    assert by_id.keys() == expected.keys()
    wrong = [k for k in expected if by_id[k] != expected[k]]
    assert wrong == [], f"{len(wrong)} rows differ, e.g. {by_id[wrong[0]]} != {expected[wrong[0]]}"


def parquet_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.parquet"))


def no_temporary_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


# -- the schema ----------------------------------------------------------------------------------

README_TYPES = {
    "string": pa.string(),
    "timestamp (µs, UTC)": pa.timestamp("us", tz="UTC"),
    "list of strings": pa.list_(pa.string()),
}


def readme_schema() -> list[tuple[str, Any, bool]]:
    """The README's Parquet table: (column, Arrow type, nullable)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Parquet") :]
    section = section[: section.index("\n## ", 1)]
    rows = re.findall(r"^\| (\w+) \| ([^|]+?) \| ([^|]+?) \|", section, flags=re.M)
    return [(name, README_TYPES[kind], null == "yes") for name, kind, null in rows[1:]]


def test_schema_is_the_readmes() -> None:
    """CHAT_SCHEMA has the README table's columns, in its order, types and nullability."""
    documented = readme_schema()
    assert len(documented) == 15
    assert [(f.name, f.type, f.nullable) for f in CHAT_SCHEMA] == documented


async def test_export_equals_the_sandbox_field_by_field(tmp_path: Path) -> None:
    """DuckDB reads the dataset as the sandbox's chats, each once, field by field, with
    timestamps with time zone and `tag` a list; partitions by created_at's UTC date; a few
    files per date, none over --max-rows-per-file; the Polars line reads the same rows."""
    root = tmp_path / "chats"
    async with serve(chats=3000, seed=21) as sb, client_for(sb, concurrency=8) as client:
        report = await export_chats(
            client,
            since=SINCE,
            until=UNTIL,
            sink=ParquetSink(root, max_rows_per_file=700),
            checkpoint=tmp_path / "ckpt.json",
        )
        data = list(sb.data)
    assert report.records == 3000
    assert_exact(read_dataset(root), data)
    types = dict(
        (row[0], row[1])
        for row in sql(
            f"DESCRIBE SELECT * FROM read_parquet('{root}/**/*.parquet', hive_partitioning = true)"
        )[1]
    )
    assert types["created_at"] == types["updated_at"] == "TIMESTAMP WITH TIME ZONE"
    assert types["tag"] == "VARCHAR[]" and types["created_date"] == "DATE"
    files = parquet_files(root)
    for f in files:
        assert pq.read_schema(f).remove_metadata() == CHAT_SCHEMA
        meta = pq.read_metadata(f)
        assert meta.num_rows <= 700 and meta.num_row_groups == 1
    days = {f.parent.name for f in files}
    assert len(days) >= 360 and len(files) <= 2 * len(days), "not a few files per date"
    polars_line = readme_code("python", "pl.read_parquet").replace('"chats/', f'"{root}/')
    frame = eval(polars_line, {"pl": pl})  # the README's line, as written
    assert frame.height == 3000 and frame["tag"].dtype == pl.List(pl.String)
    by_channel = readme_code("sql", "GROUP BY channel").replace("'chats/", f"'{root}/")
    assert sum(n for _, n in sql(by_channel)[1]) == 3000
    assert no_temporary_files(root) and not (tmp_path / "ckpt.json").exists()


def test_quirks_never_fail_and_are_kept() -> None:
    """Values of the wrong kind become what the README says; nothing sent is lost."""
    records: list[dict[str, Any]] = [
        {"chat_id": "a", "asset": {"id": 123, "name": "Shop"}, "tag": ["x"], "status": "new"},
        {"chat_id": "b", "asset": {"id": "00123", "name": "Mail"}, "status": "archived"},
        {"chat_id": "c", "created_at": "yesterday", "updated_at": 5, "tag": "lone"},
        {"chat_id": 7, "channel": "instagram", "flag": True, "assignee": 42, "new": {"k": 1}},
        {"asset": {"id": 1.5, "name": None, "kind": "bot"}, "other_details": None, "tag": None},
        {"chat_id": "f", "created_at": "2024-05-01T23:30:00-02:00", "other_details": {"i": [1]}},
        {"chat_id": "g", "created_at": "2024-05-01T10:00:00", "tag": [1, None, "t"]},
    ]
    rows = chats_table(records).to_pylist()
    assert [r["asset_id"] for r in rows] == ["123", "00123", None, None, "1.5", None, None]
    assert [r["status"] for r in rows[:2]] == ["new", "archived"]
    assert rows[2]["created_at"] is None and rows[2]["updated_at"] is None
    assert json.loads(rows[2]["extra"]) == {"created_at": "yesterday", "updated_at": 5}
    assert (
        rows[2]["tag"] == ["lone"]
        and rows[1]["tag"] is None
        and rows[6]["tag"]
        == [
            "1",
            None,
            "t",
        ]
    )
    assert rows[3]["chat_id"] == "7" and rows[3]["channel"] == "instagram"
    assert (rows[3]["flag"], rows[3]["assignee"]) == ("true", "42")
    assert json.loads(rows[3]["extra"]) == {"new": {"k": 1}}
    assert rows[4]["chat_id"] == "" and rows[4]["other_details"] is None
    assert json.loads(rows[4]["extra"]) == {"asset": {"id": 1.5, "name": None, "kind": "bot"}}
    assert rows[5]["created_at"] == datetime(2024, 5, 2, 1, 30, tzinfo=UTC)
    assert json.loads(rows[5]["other_details"]) == {"i": [1]}
    assert rows[6]["created_at"] == datetime(2024, 5, 1, 10, tzinfo=UTC)  # naive means UTC
    assert [r["extra"] for r in rows[:2]] == [None, None]


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def test_json_columns_are_compact_json_dumps_text_floats_included() -> None:
    """`other_details` and `extra` (built with msgspec) are exactly `json.dumps`'s compact
    text, also for the floats msgspec writes otherwise (exponents, NaN, Infinity)."""
    rnd = random.Random(7)
    floats = [1e16, -1e22, 1.5e-7, 1e-05, 1e-4, 0.1, -0.0, 5e-324, 1.7976931348623157e308]
    floats += [rnd.random() * 10 ** rnd.randint(-30, 30) for _ in range(300)]
    floats += [math.nan, math.inf, -math.inf]
    details: list[Any] = [
        {"x": f, "s": 'a\u2028é\x00"\\', "n": [2**70, None, True]} for f in floats
    ]
    details += [{"plain": "1e5 null 0.00001"}, {"intent": "billing"}, [1, "x"], "text", 3, None]
    records = [{"chat_id": str(i), "other_details": d, "new": d} for i, d in enumerate(details)]
    rows = chats_table(records).to_pylist()
    assert [r["other_details"] for r in rows] == [
        None if d is None else _json_text(d) for d in details
    ]
    assert [r["extra"] for r in rows] == [_json_text({"new": d}) for d in details]
    # without a float in the chunk (the fast path); from a mapping that is not a dict too
    plain = {"chat_id": "a", "other_details": {"k": "v", "ü": [1]}, "asset": {"id": 7}}
    for chunk in ([plain], [MappingProxyType(plain)]):
        table = chats_table(chunk)
        assert table.column("other_details").to_pylist() == ['{"k":"v","ü":[1]}']
        assert table.column("asset_id").to_pylist() == ["7"]


def test_one_odd_timestamp_leaves_the_others_of_its_chunk_as_arrow_reads_them() -> None:
    """A value Arrow refuses is parsed on its own (kept in `extra` if it does not parse);
    the other values of the chunk keep their time."""
    good = [f"2024-05-01T{h:02d}:{m:02d}:00Z" for h in range(24) for m in range(0, 60, 7)]
    odd: dict[int, object] = {3: "yesterday", 100: "20240501T100000Z", 150: 5}
    records: list[dict[str, object]] = [
        {"chat_id": str(i), "created_at": t} for i, t in enumerate(good)
    ]
    for i, value in odd.items():
        records[i]["created_at"] = value
    rows = chats_table(records).to_pylist()
    for i, row in enumerate(rows):
        if i in (3, 150):
            assert row["created_at"] is None
            assert json.loads(row["extra"]) == {"created_at": odd[i]}
        elif i == 100:  # not Arrow's form, but ISO 8601 all the same
            assert row["created_at"] == datetime(2024, 5, 1, 10, tzinfo=UTC)
            assert row["extra"] is None
        else:
            assert row["created_at"] == _at(good[i]) and row["extra"] is None


def test_columns_built_from_buffers_read_as_pyarrow_reads_the_values() -> None:
    """`chats_table` builds its columns from buffers, not `pa.array`: the same arrays as
    `pa.array` makes of the same values, with nulls, non-ASCII text, a NUL in a value,
    all-null and empty columns; a lone string tag is a list of one even in a chunk where
    every other tag is a list (`pa.array` would split it into characters)."""
    records: list[dict[str, Any]] = [
        {"chat_id": "a\x00b", "alias_id": "é日\x00", "tag": ["x", "\x00"], "flag": None},
        {"chat_id": "c", "alias_id": None, "tag": "lone", "status": "", "asset": None},
        {"chat_id": "ü", "tag": None, "asset": {"id": 10**15, "name": "n"}, "assignee": "z"},
        {"chat_id": "d", "tag": [], "asset": {"id": "007"}, "other_details": {"k": "\x00"}},
    ]
    table = chats_table(records)
    table.validate(full=True)
    columns = {name: [r.get(name) for r in records] for name in ("chat_id", "alias_id", "flag")}
    for name, values in columns.items():
        assert table.column(name).combine_chunks().equals(pa.array(values, pa.string())), name
    assert table.column("tag").to_pylist() == [["x", "\x00"], ["lone"], None, []]
    assert table.column("asset_id").to_pylist() == [None, None, "1000000000000000", "007"]
    assert table.column("status").to_pylist() == [None, "", None, None]
    assert table.column("other_details").to_pylist() == [None, None, None, '{"k":"\\u0000"}']
    assert chats_table([]).num_rows == 0
    # a column's text over Arrow's 32-bit offsets: the table is built in halves
    big = [{"chat_id": str(i), "other_details": "y" * 100} for i in range(5)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_arrow, "_MAX_TEXT", 250)
        halves = chats_table(big)
    assert halves.column("chat_id").to_pylist() == ["0", "1", "2", "3", "4"]
    assert halves.column("other_details").num_chunks > 1
    assert halves.column("other_details").to_pylist() == [json.dumps("y" * 100)] * 5


def test_a_parquet_export_never_imports_pandas(tmp_path: Path) -> None:
    """pyarrow imports pandas (~40 MB) on its first `pa.array` of Python values; an export
    to Parquet converts none that way, so pandas stays out of the process."""
    code = f"""
import asyncio, sys
import imichat_async as imi
from imichat_async.export import ParquetSink, export_chats
from imichat_async.sandbox import serve

async def main():
    async with serve(chats=300, seed=3) as sb:
        async with imi.ImiChatClient(
            base_url=sb.base_url, token=sb.token, team_id=sb.team_id
        ) as client:
            report = await export_chats(
                client, since="{SINCE}", until="{UNTIL}", sink=ParquetSink(sys.argv[1])
            )
    assert report.records == 300, report
    assert "pandas" not in sys.modules, "pandas was imported"

asyncio.run(main())
"""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "d")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert len(parquet_files(tmp_path / "d")) > 0


def test_a_chunk_is_cut_by_date_without_a_copy_when_its_dates_come_in_runs() -> None:
    """An export's chunk (slices, each newest first) is cut into zero-copy slices where
    the date changes; rows in no order are sorted first: the same rows by date either way."""
    days = [f"2024-05-{d:02d}T{h:02d}:00:00Z" for d in (9, 8, 7, 9, 8) for h in (23, 12, 1)]
    ordered = [{"chat_id": str(i), "created_at": t} for i, t in enumerate(days)]
    ordered.append({"chat_id": "x"})  # a null date
    shuffled = random.Random(1).sample(ordered, len(ordered))
    shuffled *= 3  # more runs than RUNS
    for records, pieces in ((ordered, 6), (shuffled, 4)):
        table = chats_table(records)
        parts = _parquet._partitions(table, "created_at")
        assert len(parts) == pieces
        by_day: dict[str, list[str]] = {}
        for day, part in parts:
            by_day.setdefault(day, []).extend(part.column("chat_id").to_pylist())
        assert {k: sorted(v) for k, v in by_day.items()} == {
            day: sorted(r["chat_id"] for r in records if (r.get("created_at") or "x")[:10] == key)
            for day, key in (
                ("2024-05-07", "2024-05-07"),
                ("2024-05-08", "2024-05-08"),
                ("2024-05-09", "2024-05-09"),
                (_parquet.NULL_PARTITION, "x"),
            )
        }
    table = chats_table(ordered)
    first = _parquet._partitions(table, "created_at")[0][1]  # a view of the chunk's buffers
    data = [t.column("chat_id").chunks[0].buffers()[2].address for t in (first, table)]
    assert data[0] == data[1]


async def test_every_batch_is_encoded_in_the_sinks_one_thread(tmp_path: Path) -> None:
    """The batches of a sink are encoded in one thread of its own (Arrow's allocator keeps
    pages for each thread that used it), which ends with the sink."""
    threads: set[str] = set()

    class Watched(ParquetSink):
        def _write_batch(self, buffer: dict[str, list[Any]], batch: int) -> None:
            threads.add(threading.current_thread().name)
            super()._write_batch(buffer, batch)

    sink = Watched(tmp_path / "d", max_rows_per_file=10)
    await sink.open(None)
    for day in range(1, 6):
        at = f"2024-05-{day:02d}T10:00:00Z"
        await sink.write([{"chat_id": f"{day}-{i}", "created_at": at} for i in range(10)])
        assert await sink.sync() == day
    encoder = sink.encoder
    await sink.complete()
    assert len(threads) == 1 and threads.pop().startswith("parquet-encode")
    assert sink.encoder is None and encoder is not None and encoder._shutdown
    assert len(parquet_files(tmp_path / "d")) == 5


async def test_a_null_created_at_goes_to_the_null_partition(tmp_path: Path) -> None:
    """A record without a created_at lands in `__HIVE_DEFAULT_PARTITION__`, read as null."""
    sink = ParquetSink(tmp_path / "d")
    await sink.open(None)
    await sink.write([{"chat_id": "a"}, {"chat_id": "b", "created_at": "2024-05-01T00:00:00Z"}])
    assert await sink.sync() == 1
    await sink.complete()
    _, got = sql(
        f"SELECT chat_id, created_date FROM read_parquet('{tmp_path}/d/**/*.parquet', "
        "hive_partitioning = true) ORDER BY chat_id"
    )
    assert got == [("a", None), ("b", date(2024, 5, 1))]


def test_missing_pyarrow_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without pyarrow: ConfigurationError from Python, exit 2 from the CLI, naming the extra."""
    monkeypatch.setattr(_arrow, "AVAILABLE", False)
    with pytest.raises(imi.ConfigurationError, match=r"imichat-async\[parquet\]"):
        ParquetSink(tmp_path)
    with pytest.raises(imi.ConfigurationError, match=r"imichat-async\[parquet\]"):
        make_sink(tmp_path, "parquet")
    args = ["export", "--since", SINCE, "--format", "parquet", "-o", str(tmp_path / "d")]
    result = CliRunner().invoke(main, args, env={"IMICHAT_TOKEN": "t"})
    assert result.exit_code == 2 and "imichat-async[parquet]" in result.output


def test_max_rows_per_file_is_for_parquet_only(tmp_path: Path) -> None:
    args = ["export", "--since", SINCE, "-o", str(tmp_path / "c.ndjson")]
    result = CliRunner().invoke(main, [*args, "--max-rows-per-file", "10"])
    assert result.exit_code == 2 and "--max-rows-per-file" in result.output


# -- exactly once --------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands for a kill: nothing after it runs (not even `except Exception`)."""


def dying_sink(path: Path | str, max_rows: int, syncs: int) -> ParquetSink:
    """A Parquet sink "killed" (`Killed`) right after its `syncs`-th sync wrote its files,
    before the runner can record them (the open's sync is the first)."""
    calls = 0

    class Dying(ParquetSink):
        def detach(self) -> Callable[[], Awaitable[int | None]]:
            write = super().detach()

            async def dying() -> int | None:
                nonlocal calls
                result = await write()
                calls += 1
                if calls == syncs:
                    raise Killed
                return result

            return dying

    return Dying(path, max_rows_per_file=max_rows)


async def test_kill_after_rename_before_checkpoint_redoes_and_replaces(tmp_path: Path) -> None:
    """The window that matters: a batch renamed into place, its checkpoint not yet written.
    The resume removes that batch's files (and a stray temporary file) and redoes its
    slices: exact, every file name deterministic (batch numbers 0..n-1)."""
    root, ckpt = tmp_path / "chats", tmp_path / "ckpt.json"

    async with serve(chats=1500, seed=22) as sb, client_for(sb, concurrency=4) as client:
        args: dict[str, Any] = {"since": SINCE, "until": UNTIL, "checkpoint": ckpt}
        with pytest.raises(Killed):
            await export_chats(client, sink=dying_sink(root, 400, syncs=4), **args)
        state = _checkpoint(ckpt)
        assert state is not None and state["offset"] == 2
        assert {int(f.name.split("-")[1]) for f in parquet_files(root)} == {0, 1, 2}
        stray = root / "created_date=2024-06-01" / ".part-000002-0.parquet.tmp"
        stray.parent.mkdir(exist_ok=True)
        stray.write_bytes(b"torn")
        report = await export_chats(
            client, sink=ParquetSink(root, max_rows_per_file=400), resume=True, **args
        )
        data = list(sb.data)
    assert report.resumed and report.records == 1500
    assert_exact(read_dataset(root), data)
    assert no_temporary_files(root)
    batches = {int(f.name.split("-")[1]) for f in parquet_files(root)}
    assert batches == set(range(max(batches) + 1))


async def test_a_fresh_export_refuses_a_dataset_it_has_no_record_of(tmp_path: Path) -> None:
    root = tmp_path / "chats"
    async with serve(chats=200, seed=23) as sb, client_for(sb) as client:
        await export_chats(client, since=SINCE, until=UNTIL, sink=ParquetSink(root))
        with pytest.raises(CheckpointError, match="already holds a Parquet dataset"):
            await export_chats(client, since=SINCE, until=UNTIL, sink=ParquetSink(root))
        data = list(sb.data)
    assert_exact(read_dataset(root), data)  # left as it was


def kill_at_four_points(argv: list[str], env: dict[str, str], watched: Path, seed: str) -> None:
    """Run the command again and again, SIGKILLed at four points: its first checkpoint (or
    state), once a batch is recorded, three batches in, at a random moment."""
    delay = random.Random(seed).uniform(0.1, 0.6)
    points: list[Callable[[float, Any], bool]] = [
        lambda t, c: c is not None,
        lambda t, c: c is not None and (c.get("offset") or 0) >= 1,
        lambda t, c: c is not None and (c.get("offset") or 0) >= 3,
        lambda t, c: t >= delay,
    ]
    killed = sum(_run_until(argv, env, watched, when) == -signal.SIGKILL for when in points)
    assert killed >= 3, "the kills should land before the command ends"


@pytest.mark.slow
def test_export_killed_with_sigkill_resumes_to_the_exact_dataset(tmp_path: Path) -> None:
    """SIGKILL at four points of `export --format parquet`, each resumed: exact, no
    temporary file, no checkpoint left."""
    root = tmp_path / "chats"
    ckpt = tmp_path / "chats.checkpoint.json"
    argv = [sys.executable, "-m", "imichat_async.cli", "--quiet", "export", "--since", SINCE]
    argv += ["--until", UNTIL, "--format", "parquet", "-o", str(root), "--concurrency", "2"]
    argv += ["--slice-pages", "5", "--max-rows-per-file", "200", "--resume"]
    with ThreadedSandbox(chats=1500, seed=17, latency=0.003) as sb:
        env = env_for(sb)
        kill_at_four_points(argv, env, ckpt, "pq")
        final = subprocess.run(argv, env=env, capture_output=True, timeout=120, check=False)
        assert final.returncode == 0, final.stderr.decode()
        data = list(sb.data)
    assert_exact(read_dataset(root), data)
    assert no_temporary_files(root) and not ckpt.exists()


# -- sync ----------------------------------------------------------------------------------------


def assert_log_exact(rows: list[dict[str, Any]], sb: Sandbox, versions: Versions) -> None:
    """Each version once, each one the sandbox served (field by field), the newest of each
    chat its current record, every chat in scope present."""
    pairs = [(r["chat_id"], r["updated_at"]) for r in rows]
    assert len(set(pairs)) == len(pairs), "a version appended twice"
    served = {(k[0], _at(k[1])): v for k, v in versions.known.items()}
    wrong = [p for p, r in zip(pairs, rows, strict=True) if expected_row(served[p]) != r]
    assert wrong == [], f"rows that differ from the version served: {wrong[:3]}"
    records = sb.current_records()
    current = {k: expected_row(records[k]) for k in in_scope(list(records.values()))}
    newest: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["chat_id"] not in newest or r["updated_at"] > newest[r["chat_id"]]["updated_at"]:
            newest[r["chat_id"]] = r
    assert newest == current


def readme_code(language: str, contains: str) -> str:
    """The README's Parquet section's code block in `language` that holds `contains`."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Parquet") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)
    (block,) = [str(b) for b in blocks if contains in b]
    return block.strip()


def current_table(root: Path) -> set[tuple[str, datetime]]:
    """The README's DuckDB query for the current table, on `root`."""
    query = readme_code("sql", "QUALIFY").replace("'changes/", f"'{root}/")
    return {(r[0], r[3]) for r in sql(query)[1]}


class Clock:
    """A wall clock that moves only when told: the sandbox's and the sync's."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    def dt(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)


async def test_sync_appends_new_files_partitioned_by_updated_date(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run adds files (never rewrites one), by the version's updated_at date; the
    README's query gives the current table."""
    from .test_sync_chats import SINCE as SYNC_SINCE

    root, state = tmp_path / "changes", tmp_path / "state.json"
    clock = Clock()
    monkeypatch.setattr(_plan, "utcnow", clock.dt)
    sandbox = serve(chats=800, seed=24, wall_clock=clock)
    async with sandbox as sb, client_for(sb, concurrency=4) as client:
        versions = Versions(sb)
        args: dict[str, Any] = {"since": SYNC_SINCE, "state": state, "lag": 0}
        await sync_chats(client, sink=ParquetSink(root, append=True), **args)
        before = {f: f.stat().st_mtime_ns for f in parquet_files(root)}
        clock.now += 60
        sb.churn(updates=40, inserts=5)
        clock.now += 60
        report = await sync_chats(client, sink=ParquetSink(root), **args)  # reopened to append
        assert report.appended > 0
        after = {f: f.stat().st_mtime_ns for f in parquet_files(root)}
        assert {f: after[f] for f in before} == before and len(after) > len(before)
        rows = read_dataset(root, "updated_date")
        assert_log_exact(rows, sb, versions)
        records = sb.current_records()
        scope = in_scope(list(records.values()))
        assert current_table(root) == {(k, _at(records[k]["updated_at"])) for k in scope}


@pytest.mark.slow
def test_sync_killed_with_sigkill_finishes_exactly(tmp_path: Path) -> None:
    """SIGKILL at four points of `sync --format parquet`, re-run, then a later run over
    changed data: each version once, the newest of each chat current."""
    from .test_sync_chats import SINCE as SYNC_SINCE

    root, state = tmp_path / "changes", tmp_path / "state.json"
    argv = [sys.executable, "-m", "imichat_async.cli", "sync", "--quiet", "--since", SYNC_SINCE]
    argv += ["--state", str(state), "--format", "parquet", "-o", str(root)]
    argv += ["--concurrency", "2", "--max-rows-per-file", "150", "--lag", "0"]
    box = ThreadedSandbox(chats=900, seed=11, latency=0.003)
    with box as sb:
        versions = _on_loop(box, lambda: Versions(sb))
        env = env_for(sb)
        kill_at_four_points(argv, env, state, "pq-sync")
        final = subprocess.run(argv, env=env, capture_output=True, timeout=120, check=False)
        assert final.returncode == 0, final.stderr.decode()  # finishes the interrupted run
        _on_loop(box, lambda: sb.churn(updates=30, inserts=3))
        # `--lag 0`: the run reads up to the server's `Date`, whole seconds rounded down, so a
        # version made in this second belongs to the run after. Let the second end first.
        time.sleep(math.ceil(time.time()) - time.time() + 0.01)
        final = subprocess.run(argv, env=env, capture_output=True, timeout=120, check=False)
        assert final.returncode == 0, final.stderr.decode()  # a run over changed data
        rows = read_dataset(root, "updated_date")
        _on_loop(box, lambda: assert_log_exact(rows, sb, versions))
    assert no_temporary_files(root)


# -- object storage ------------------------------------------------------------------------------


_BUCKETS = itertools.count()


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[dict[str, str], str]]:
    """A local S3 server (moto's server mode) on 127.0.0.1 and a new bucket (moto keeps its
    buckets per process): fake credentials and the server's endpoint in the environment
    (of this process, and for the CLI's); the bucket's `s3://` URL."""
    from moto.server import ThreadedMotoServer

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        bucket = f"lake{next(_BUCKETS)}"
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
        yield env, f"s3://{bucket}"
    finally:
        server.stop()


MONTHS = ("2024-05-01", "2024-07-01")  # two months: a few dozen objects per batch


def in_months(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    lo, hi = (datetime.fromisoformat(m).replace(tzinfo=UTC) for m in MONTHS)
    return [r for r in records if lo <= _at(r["created_at"]) < hi]  # type: ignore[operator]


def read_s3(url: str) -> list[dict[str, Any]]:
    """The dataset at `url` read back through s3fs, as `read_dataset` does locally."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = url.removeprefix("s3://")
    files = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    assert all(re.search(r"/created_date=[0-9-]+/part-\d{6}-\d+\.parquet$", p) for p in files)
    local: list[dict[str, Any]] = []
    for path in files:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        day = date.fromisoformat(path.split("created_date=")[1][:10])
        for row in table.to_pylist():
            assert row["created_at"].date() == day
            for name in ("other_details", "extra"):
                if row[name] is not None:
                    row[name] = json.loads(row[name])
            local.append(row)
    return local


async def test_s3_export_is_exact_also_after_a_kill(
    s3: tuple[dict[str, str], str], tmp_path: Path
) -> None:
    """`s3://lake/chats` on the local S3 server: killed between a batch's PUTs and its
    checkpoint, resumed: exact, the orphaned objects replaced."""
    url, ckpt = f"{s3[1]}/chats", tmp_path / "ckpt.json"

    async with serve(chats=2400, seed=25) as sb, client_for(sb, concurrency=4) as client:
        args: dict[str, Any] = {"since": MONTHS[0], "until": MONTHS[1], "checkpoint": ckpt}
        with pytest.raises(Killed):
            await export_chats(client, sink=dying_sink(url, 120, syncs=3), **args)
        await export_chats(
            client, sink=ParquetSink(url, max_rows_per_file=120), resume=True, **args
        )
        data = in_months(sb.data)
    assert_exact(read_s3(url), data)


@pytest.mark.slow
def test_s3_cli_export_killed_with_sigkill_resumes_exactly(
    s3: tuple[dict[str, str], str], tmp_path: Path
) -> None:
    """`export --format parquet -o s3://...` SIGKILLed mid-run, resumed: exact."""
    url, ckpt = f"{s3[1]}/cli", tmp_path / "ckpt.json"
    argv = [sys.executable, "-m", "imichat_async.cli", "--quiet", "export", "--since", MONTHS[0]]
    argv += ["--until", MONTHS[1], "--format", "parquet", "-o", url, "--checkpoint", str(ckpt)]
    argv += ["--concurrency", "2", "--slice-pages", "2", "--max-rows-per-file", "100"]
    with ThreadedSandbox(chats=2400, seed=26, latency=0.004) as sb:
        env = {**env_for(sb), **s3[0]}
        code = _run_until(argv, env, ckpt, lambda t, c: c is not None and c["offset"] >= 1)
        assert code == -signal.SIGKILL
        final = subprocess.run(
            [*argv, "--resume"], env=env, capture_output=True, timeout=120, check=False
        )
        assert final.returncode == 0, final.stderr.decode()
        data = in_months(sb.data)
    assert_exact(read_s3(url), data)


def test_an_output_url_needs_a_local_checkpoint() -> None:
    args = ["export", "--since", SINCE, "--format", "parquet", "-o", "s3://lake/x"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--checkpoint" in result.output
