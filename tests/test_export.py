"""`imichat_async.export`: sliced, concurrent, de-duplicated, checkpointed exports (sandbox)."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

import imichat_async as imi
from imichat_async import export as ex
from imichat_async._retry import RetryPolicy
from imichat_async.export import (
    CallableSink,
    CheckpointError,
    CsvSink,
    ExportProgress,
    NdjsonSink,
    _plan,
    export_chats,
    sync_chats,
)
from imichat_async.sandbox import END, Sandbox, serve

from .helpers import assert_no_stray_tasks
from .sandbox_thread import ThreadedSandbox, env_for

UTC = timezone.utc
SINCE = "2024-01-01"
UNTIL = "2025-01-01"


def client_for(sb: Sandbox, **kwargs: Any) -> imi.ImiChatClient:
    kwargs.setdefault("retry_policy", RetryPolicy.testing(max_retries=10))
    kwargs.setdefault("max_retries", 10)
    return imi.ImiChatClient(base_url=sb.base_url, token=sb.token, team_id=sb.team_id, **kwargs)


def read_ndjson(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def append_text(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def ids_of(records: list[dict[str, Any]]) -> list[str]:
    return [r["chat_id"] for r in records]


def assert_exact(got: list[str], expected: list[dict[str, Any]]) -> None:
    assert len(got) == len(expected)
    assert len(set(got)) == len(got), "duplicates written"
    assert set(got) == {c["chat_id"] for c in expected}


# -- exactness -----------------------------------------------------------------------------------


async def test_ndjson_export_equals_sandbox_data(tmp_path: Path) -> None:
    """An NDJSON export of 5,200 chats holds each chat once, exactly as the server sent it."""
    out = tmp_path / "chats.ndjson"
    async with serve(chats=5200, seed=1) as sb, client_for(sb, concurrency=8) as client:
        report = await export_chats(client, since=SINCE, until=UNTIL, sink=NdjsonSink(out))
        data = list(sb.data)
        assert sb.stats.peak_in_flight <= 8
    records = read_ndjson(out)
    assert_exact(ids_of(records), data)
    by_id = {c["chat_id"]: c for c in data}
    assert all(r == by_id[r["chat_id"]] for r in records)  # raw-faithful, extra fields included
    assert report.records == 5200 and report.duplicates == 0 and report.verified
    assert report.slices >= 8 and not report.resumed and report.output == out
    assert not (tmp_path / "chats.ndjson.part").exists()
    await assert_no_stray_tasks()


class _CountingSink(NdjsonSink):
    """An NDJSON sink counting its syncs and the record types it is handed."""

    takes_text = True  # it reads no field: the texts alone, as `NdjsonSink` takes them

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.syncs = 0
        self.types: set[type] = set()

    async def write(self, records: Sequence[Any]) -> None:
        self.types.update(type(r) for r in records)
        await super().write(records)

    async def sync(self) -> int | None:
        self.syncs += 1
        return await super().sync()


class _RedactingSink(NdjsonSink):
    """A user's NDJSON sink that reads fields: it drops `customer_id` from every line."""

    def encode(self, records: Sequence[Any]) -> bytes:
        return super().encode([{k: v for k, v in r.items() if k != "customer_id"} for r in records])


async def test_a_subclass_of_the_ndjson_sink_gets_dicts_unless_it_says_otherwise(
    tmp_path: Path,
) -> None:
    """`takes_text` is not inherited: a subclass written before `ChatText` (its `encode`
    reads fields) still gets each chat as a dict of what the server sent."""
    assert NdjsonSink.takes_text and not _RedactingSink.takes_text
    out = tmp_path / "chats.ndjson"
    async with serve(chats=300, seed=5) as sb, client_for(sb) as client:
        report = await export_chats(client, since=SINCE, until=UNTIL, sink=_RedactingSink(out))
        data = list(sb.data)
    records = read_ndjson(out)
    assert report.records == 300
    assert_exact(ids_of(records), data)
    assert not any("customer_id" in r for r in records)
    assert any("customer_id" in c for c in data)


@pytest.mark.parametrize("checkpointed", [False, True])
async def test_ndjson_export_syncs_each_slice_only_for_a_checkpoint(
    tmp_path: Path, checkpointed: bool
) -> None:
    """The NDJSON sink is handed `ChatText`s (never dicts). With a checkpoint every slice
    is synced before it is recorded; without one (nothing can resume) only at the start
    and once before it is published, whatever the slices."""
    sink = _CountingSink(tmp_path / "chats.ndjson")
    ckpt = tmp_path / "ck.json" if checkpointed else None
    async with serve(chats=600, seed=3) as sb, client_for(sb) as client:
        report = await export_chats(
            client, since=SINCE, until=UNTIL, sink=sink, checkpoint=ckpt, slice_pages=4
        )
    assert report.records == 600 and report.slices >= 8
    assert sink.types == {imi.ChatText}
    assert sink.syncs == (3 + report.slices if checkpointed else 3)  # open, start, complete
    assert len(read_ndjson(tmp_path / "chats.ndjson")) == 600


#: Text that JSON encoders write in different ways: escapes, non-ASCII, an astral character.
ODD_TEXT = 'caf\u00e9 \u2713 \U0001f600 "quoted" back\\slash /slash \t tab \n newline \u2028'


@pytest.mark.parametrize("style", ["compact", "spaced", "pretty"])
async def test_ndjson_lines_are_the_bytes_the_server_sent(tmp_path: Path, style: str) -> None:
    """Each NDJSON line is the record's JSON text byte for byte as the server sent it, however
    the server serializes (compact with ASCII escapes, or spaced with UTF-8 characters); a
    server that spreads a record over several lines gets it written compact, on one line."""
    out = tmp_path / "chats.ndjson"
    async with serve(chats=300, seed=5, json_style=style) as sb, client_for(sb) as client:
        for chat in sb.data[::7]:  # before the first request: no body is cached yet
            chat["other_details"] = {"note": ODD_TEXT, "n": [1.5, -0.0, 10**20, None, True]}
        await export_chats(client, since=SINCE, until=UNTIL, sink=NdjsonSink(out))
        data = list(sb.data)
    if style == "pretty":
        sent = [json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in data]
    else:
        options: dict[str, Any] = {"separators": (",", ":")} if style == "compact" else {}
        sent = [json.dumps(c, ensure_ascii=style == "compact", **options) for c in data]
    lines = out.read_bytes().split(b"\n")
    assert lines.pop() == b""
    assert sorted(lines) == sorted(t.encode() for t in sent)
    assert any(b"\\u00e9" in line for line in lines) == (style == "compact")


def test_ndjson_encode_writes_raw_bytes_and_one_line_per_record(tmp_path: Path) -> None:
    """Records as sent are written as their bytes; a plain mapping, or a text with a line
    break in it, as compact UTF-8 JSON: always one line per record."""
    sink = NdjsonSink(tmp_path / "x.ndjson")
    spaced = imi.RawChat({"chat_id": "a", "n": 1}, b'{ "chat_id" : "a", "n" : 1 }')
    broken = imi.RawChat({"chat_id": "b"}, b'{"chat_id":\r\n"b"}')
    plain = {"chat_id": "c", "note": "caf\u00e9"}
    assert sink.encode([spaced, spaced]) == b'{ "chat_id" : "a", "n" : 1 }\n' * 2
    assert sink.encode([spaced, broken, plain]) == (
        b'{ "chat_id" : "a", "n" : 1 }\n{"chat_id":"b"}\n{"chat_id":"c","note":"caf\xc3\xa9"}\n'
    )


async def test_export_and_sync_read_at_background_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every page an export or a sync reads is asked for at background priority."""
    async with serve(chats=300, seed=1) as sb, client_for(sb, concurrency=4) as client:
        asked: list[Any] = []
        search_pages = client.search_pages

        def spy(**kwargs: Any) -> Any:
            if "prefetch" in kwargs:  # a read (the first call only checks the arguments)
                asked.append(kwargs.get("priority"))
            return search_pages(**kwargs)

        monkeypatch.setattr(client, "search_pages", spy)
        await export_chats(client, since=SINCE, until=UNTIL, sink=NdjsonSink(tmp_path / "e"))
        exported = len(asked)
        await sync_chats(client, since=SINCE, state=tmp_path / "s.json", sink=tmp_path / "log")
    assert 0 < exported < len(asked)
    assert set(asked) == {"background"}


async def test_csv_export_equals_sandbox_data(tmp_path: Path) -> None:
    """A CSV export of 5,200 chats has one row per chat; nested fields are JSON, nothing lost."""
    out = tmp_path / "chats.csv"
    async with serve(chats=5200, seed=2) as sb, client_for(sb) as client:
        report = await export_chats(client, since=SINCE, until=UNTIL, sink=CsvSink(out))
        data = list(sb.data)
    rows = read_csv(out)
    assert tuple(rows[0]) == ex.CSV_COLUMNS
    assert_exact([r["chat_id"] for r in rows], data)
    assert report.records == 5200
    by_id = {c["chat_id"]: c for c in data}
    for row in rows:
        chat = by_id[row["chat_id"]]
        asset = chat.get("asset")
        if isinstance(asset, dict):
            assert row["asset_id"] == str(asset["id"]) and row["asset_name"] == asset["name"]
        else:
            assert row["asset_id"] == row["asset_name"] == ""
        assert json.loads(row["tag"] or "null") == chat.get("tag")
        assert json.loads(row["other_details"] or "null") == chat.get("other_details")
        extra = {k: v for k, v in chat.items() if k in ("priority", "sla")}
        assert (json.loads(row["extra"]) if row["extra"] else {}) == extra
    assert any(r["extra"] for r in rows) and any(r["asset_id"].startswith("00") for r in rows)


async def test_export_with_transient_faults_is_exact(tmp_path: Path) -> None:
    """With 5xx, 429 and resets on ~15% of requests, the export is still exact, retries counted."""
    out = tmp_path / "chats.ndjson"
    async with (
        serve(
            chats=5000,
            seed=3,
            p_2007=0.04,
            p_3454=0.02,
            p_429=0.03,
            retry_after=0,
            p_502=0.02,
            p_503=0.02,
            p_reset=0.02,
        ) as sb,
        client_for(sb, hedge=False) as client,  # exact request accounting: no duplicates
    ):
        report = await export_chats(client, since=SINCE, until=UNTIL, sink=out)
        data = list(sb.data)
        faults = sum(sb.stats.faults.values())
    assert_exact(ids_of(read_ndjson(out)), data)
    assert faults > 0 and report.retries == faults
    assert report.requests == report.pages + report.retries + report.splits
    await assert_no_stray_tasks()


async def test_export_without_total_header_splits_by_paging(tmp_path: Path) -> None:
    """Without X-Total-Count, deep slices are found by paging and split; the set is exact."""
    out = tmp_path / "chats.ndjson"
    async with serve(chats=3000, seed=4, total_header=False) as sb, client_for(sb) as client:
        report = await export_chats(client, since=SINCE, until=UNTIL, sink=out, slice_pages=5)
        data = list(sb.data)
    assert_exact(ids_of(read_ndjson(out)), data)
    assert report.splits > 0 and not report.verified


async def test_deep_slices_split_and_share_the_client_bound(tmp_path: Path) -> None:
    """Deep slices split by time; all slices share the client's bound, which is fully used."""
    out = tmp_path / "chats.ndjson"
    async with (
        serve(chats=4000, seed=5, latency=0.002) as sb,
        client_for(sb, concurrency=4) as client,
    ):
        report = await export_chats(client, since=SINCE, until=UNTIL, sink=out, slice_pages=5)
        data = list(sb.data)
        peak, served = client.limiter.peak, sb.stats.peak_in_flight
        requests = sb.stats.requests_total
    assert_exact(ids_of(read_ndjson(out)), data)
    assert peak == 4  # never above the client's concurrency, and all of it used
    # The server's count may pass it for a moment (once in CI, under load): a request the
    # client abandoned (a slice closed for its split, an attempt timed out) is still in the
    # server's handler when the client reuses its slot.
    assert served >= 4
    assert report.splits >= 4 and report.slices > 4000 / 10 / 5
    # each split costs its probe page, each slice at most one partial page; the server may
    # never see a request the client abandoned before its body went out (once in CI)
    assert requests <= report.requests <= 400 + report.splits + report.slices


async def test_a_very_deep_first_slice_is_split_once(tmp_path: Path) -> None:
    """#24, by counts: 4,000 chats (400 pages), one worker, `slice_pages=5`: the one first
    slice is split once, into 100 pieces of 4 pages, and only the 4 children the data
    made deeper than 5 pages split again: 5 pages read only for a total. (At most 64
    pieces a split, of 6.25 pages: 62 such pages, 126 slices.)"""
    out = tmp_path / "chats.ndjson"
    async with serve(chats=4000, seed=5) as sb, client_for(sb, concurrency=2) as client:
        report = await export_chats(
            client, since=SINCE, until=UNTIL, sink=out, slice_pages=5, workers=1
        )
        data = list(sb.data)
        requests, hedges = sb.stats.requests_total, client.stats.hedges
    assert_exact(ids_of(read_ndjson(out)), data)
    assert (report.slices, report.splits) == (104, 5)
    # each slice at most one partial page; each split its probe page (a hedge: a duplicate)
    assert report.pages <= 400 + report.slices
    assert requests <= report.pages + report.splits + hedges


async def test_user_filters_and_created_at_are_intersected(tmp_path: Path) -> None:
    """Keyword and explicit filters apply; a created_at filter narrows the range."""
    out = tmp_path / "closed.ndjson"
    async with serve(chats=3000, seed=6) as sb, client_for(sb) as client:
        report = await export_chats(
            client,
            since=SINCE,
            until=datetime(2025, 1, 1),
            sink=out,
            filters=[imi.Filter("channel", "eq", "sms")],
            status="closed",
            created_at__gte="2024-06-01T00:00:00Z",
        )
        expected = sb.expected(
            [
                ("channel", "eq", "sms"),
                ("status", "eq", "closed"),
                ("created_at", "gte", "2024-06-01T00:00:00Z"),
                ("created_at", "lt", "2025-01-01T00:00:00Z"),
            ]
        )
    assert 0 < len(expected) < 3000
    assert_exact(ids_of(read_ndjson(out)), expected)
    assert report.since == datetime(2024, 6, 1, tzinfo=UTC)


async def test_export_survives_token_expiry(tmp_path: Path) -> None:
    """Tokens expiring every 40 requests are refreshed; the export stays exact."""
    out = tmp_path / "chats.ndjson"
    async with serve(chats=2000, seed=19, token_max_uses=40) as sb:
        async with imi.ImiChatClient(
            base_url=sb.base_url, token=sb.new_token, team_id=sb.team_id
        ) as client:
            report = await export_chats(client, since=SINCE, until=UNTIL, sink=out)
            refreshes = client.stats.token_refreshes
        data = list(sb.data)
    assert refreshes >= 4 and report.records == 2000
    assert_exact(ids_of(read_ndjson(out)), data)


async def test_callable_sink_gets_each_chat_once() -> None:
    """An async callable sink receives every chat exactly once."""
    got: list[str] = []

    async def collect(chat: Any) -> None:
        got.append(chat["chat_id"])

    async with serve(chats=1200, seed=7) as sb, client_for(sb) as client:
        report = await export_chats(client, since=SINCE, until=UNTIL, sink=collect)
        data = list(sb.data)
    assert_exact(got, data)
    assert report.output is None and report.records == 1200


async def test_plain_callable_sink_gets_each_chat_once() -> None:
    """A plain (non-async) callable sink works too: its result is awaited only if awaitable."""
    got: list[str] = []
    async with serve(chats=300, seed=7) as sb, client_for(sb) as client:
        report = await export_chats(
            client, since=SINCE, until=UNTIL, sink=lambda chat: got.append(chat["chat_id"])
        )
        data = list(sb.data)
    assert_exact(got, data)
    assert report.records == 300


async def test_empty_range_writes_an_empty_file(tmp_path: Path) -> None:
    """A range with no chats ends with an empty output file and zero records."""
    out = tmp_path / "none.ndjson"
    async with serve(chats=200, seed=8) as sb, client_for(sb) as client:
        report = await export_chats(client, since="2020-01-01", until="2020-02-01", sink=out)
    assert out.read_bytes() == b"" and report.records == 0


async def test_invalid_arguments_rejected_before_any_request(tmp_path: Path) -> None:
    """Bad filters, ranges, condition or slice size raise InvalidQueryError, sending nothing."""
    out = tmp_path / "x.ndjson"
    async with serve(chats=100, seed=9) as sb, client_for(sb) as client:
        bad: list[dict[str, Any]] = [
            {"since": SINCE, "until": UNTIL, "colour": "red"},
            {"since": SINCE, "until": UNTIL, "status": "sleeping"},
            {"since": "yesterday", "until": UNTIL},
            {"since": UNTIL, "until": SINCE},
            {"since": SINCE, "until": UNTIL, "condition": "or", "status": "closed", "tag": "vip"},
            {"since": SINCE, "until": UNTIL, "slice_pages": 0},
            {"since": "2999-01-01"},
        ]
        for kwargs in bad:
            with pytest.raises(imi.InvalidQueryError):
                await export_chats(client, sink=out, **kwargs)
        assert sb.stats.requests_total == 0
    assert not out.exists() and not (tmp_path / "x.ndjson.part").exists()


async def test_permanent_error_propagates_and_leaves_nothing(tmp_path: Path) -> None:
    """A refused token raises its typed error; without a checkpoint no partial file remains."""
    out = tmp_path / "x.ndjson"
    async with (
        serve(chats=500, seed=10) as sb,
        imi.ImiChatClient(base_url=sb.base_url, token="nope", team_id=sb.team_id) as c,
    ):
        with pytest.raises(imi.InvalidTokenError) as info:
            await export_chats(c, since=SINCE, until=UNTIL, sink=out)
    assert info.value.status_code == 2003
    assert not out.exists() and not (tmp_path / "x.ndjson.part").exists()
    await assert_no_stray_tasks()


# -- data changing under the export ------------------------------------------------------------


async def test_frozen_until_ignores_chats_created_during_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without until, the bound is frozen at the start: chats created later never shift pages."""
    monkeypatch.setattr(_plan, "utcnow", lambda: END)
    out = tmp_path / "chats.ndjson"
    async with serve(chats=3000, seed=11, insert_every=3) as sb, client_for(sb) as client:
        original = list(sb.data)
        report = await export_chats(client, since=SINCE, sink=out)
        inserted = sb.stats.inserted
    assert inserted > 50  # new chats kept arriving at the head during the export
    assert_exact(ids_of(read_ndjson(out)), original)
    assert report.until == END and report.until_frozen
    assert report.slices_reread == 0 and report.duplicates == 0


async def test_chats_inserted_inside_the_range_cause_no_duplicates(tmp_path: Path) -> None:
    """Chats inserted inside the range while it is read: no duplicates, no old chat lost."""
    out = tmp_path / "chats.ndjson"
    async with serve(chats=3000, seed=12, insert_every=4) as sb, client_for(sb) as client:
        original = list(sb.data)
        await export_chats(client, since=SINCE, until="2025-06-01", sink=out)
        final = {c["chat_id"] for c in sb.data}
    got = ids_of(read_ndjson(out))
    assert len(got) == len(set(got))
    assert {c["chat_id"] for c in original} <= set(got) <= final


async def test_short_slice_is_reread_and_reported(tmp_path: Path) -> None:
    """A slice whose data changed while paged (total changed, came up short) is re-read."""
    out = tmp_path / "chats.ndjson"
    async with serve(chats=300, seed=13) as sb, client_for(sb) as client:
        inserted: list[Any] = []

        def on_progress(p: ExportProgress) -> None:
            if p.pages >= 1 and not inserted:
                inserted.extend(sb.insert_chats(10))  # ten new chats at the head, in range

        report = await export_chats(
            client,
            since=SINCE,
            until="2025-02-01",
            sink=out,
            workers=1,
            slice_pages=100,
            progress=on_progress,
        )
        final = list(sb.data)
    assert len(inserted) == 10
    assert_exact(ids_of(read_ndjson(out)), final)  # the 300 and the 10 new ones, each once
    assert report.slices_reread >= 1 and report.records == 310
    assert any("re-reading" in note for note in report.notes)


# -- checkpoints ---------------------------------------------------------------------------------


async def test_cancelled_export_resumes_with_each_chat_once(tmp_path: Path) -> None:
    """Cancelled mid-run, then resumed with the same arguments: exactly the full set."""
    out = tmp_path / "chats.ndjson"
    ckpt = tmp_path / "ckpt.json"
    async with serve(chats=3000, seed=14, latency=0.001) as sb, client_for(sb) as client:
        enough = asyncio.Event()

        def watch(p: ExportProgress) -> None:
            if p.records >= 1000:
                enough.set()

        args: dict[str, Any] = {"since": SINCE, "until": UNTIL, "sink": out, "checkpoint": ckpt}
        task = asyncio.create_task(export_chats(client, progress=watch, **args))
        await enough.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await assert_no_stray_tasks()
        state = json.loads(ckpt.read_text())
        assert 1000 <= state["records"] < 3000 and not out.exists()

        with pytest.raises(CheckpointError, match="resume"):
            await export_chats(client, **args)  # not overwritten without resume=True
        with pytest.raises(CheckpointError, match="another export"):
            await export_chats(client, resume=True, status="closed", **args)

        requests_before = sb.stats.requests_total
        report = await export_chats(client, resume=True, **args)
        resumed_requests = sb.stats.requests_total - requests_before
        data = list(sb.data)
    assert_exact(ids_of(read_ndjson(out)), data)
    assert report.resumed and report.records == 3000
    assert resumed_requests < 300  # the finished slices were not read again
    assert not ckpt.exists() and not (tmp_path / "chats.ndjson.part").exists()


async def test_resume_truncates_output_written_after_the_last_checkpoint(tmp_path: Path) -> None:
    """Bytes written after the last checkpoint (a kill mid-slice) are dropped on resume."""
    out = tmp_path / "chats.ndjson"
    part = tmp_path / "chats.ndjson.part"
    ckpt = tmp_path / "ckpt.json"
    async with serve(chats=1500, seed=18) as sb, client_for(sb) as client:

        class Stop(Exception):
            pass

        def watch(p: ExportProgress) -> None:
            if p.slices_done >= 3:
                raise Stop

        args: dict[str, Any] = {"since": SINCE, "until": UNTIL, "sink": out, "checkpoint": ckpt}
        with pytest.raises(Stop):
            await export_chats(client, progress=watch, **args)
        state = json.loads(ckpt.read_text())
        assert part.stat().st_size == state["offset"]
        written = read_ndjson(part)
        # a slice half-written when killed: a duplicate and a torn line after the offset
        append_text(part, json.dumps(written[0]) + "\n" + json.dumps(sb.data[-1])[:40])
        report = await export_chats(client, resume=True, **args)
        data = list(sb.data)
    assert_exact(ids_of(read_ndjson(out)), data)
    assert report.records == 1500 and report.resumed


async def test_checkpoint_marked_complete_is_finished_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed while publishing (checkpoint complete, file not renamed): resume just renames."""
    out = tmp_path / "chats.csv"
    ckpt = tmp_path / "ckpt.json"
    async with serve(chats=800, seed=15) as sb, client_for(sb) as client:
        args: dict[str, Any] = {"since": SINCE, "until": UNTIL, "sink": out, "checkpoint": ckpt}
        with monkeypatch.context() as m:

            def crash(self: CsvSink) -> None:
                self.close()
                raise RuntimeError("killed while publishing")

            m.setattr(CsvSink, "complete", crash)
            with pytest.raises(RuntimeError):
                await export_chats(client, **args)
        assert json.loads(ckpt.read_text())["complete"] and not out.exists()
        before = sb.stats.requests_total
        report = await export_chats(client, resume=True, **args)
        assert sb.stats.requests_total == before
        data = list(sb.data)
    assert_exact([r["chat_id"] for r in read_csv(out)], data)
    assert report.records == 800 and not ckpt.exists()


async def test_callable_sink_with_checkpoint_skips_finished_slices(tmp_path: Path) -> None:
    """A callable sink resumes too: finished slices are not delivered again."""
    got: list[str] = []
    stop_after = 2

    async def collect(chat: Any) -> None:
        got.append(chat["chat_id"])

    class Stop(Exception):
        pass

    def watch(p: ExportProgress) -> None:
        if p.slices_done >= stop_after:
            raise Stop

    ckpt = tmp_path / "ckpt.json"
    sink = CallableSink(collect)
    async with serve(chats=1000, seed=16) as sb, client_for(sb, concurrency=2) as client:
        args: dict[str, Any] = {"since": SINCE, "until": UNTIL, "sink": sink, "checkpoint": ckpt}
        with pytest.raises(Stop):
            await export_chats(client, progress=watch, **args)
        assert 0 < len(got) < 1000
        stop_after = 10**9
        await export_chats(client, resume=True, progress=watch, **args)
        data = list(sb.data)
    assert_exact(got, data)


# -- kill -9 ---------------------------------------------------------------------------------------


def _checkpoint(path: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(path.read_text())
        return state
    except (OSError, ValueError):
        return None


def _export_argv(out: Path, fmt: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "imichat_async.cli",
        "--quiet",
        "export",
        "--since",
        SINCE,
        "--until",
        UNTIL,
        "--format",
        fmt,
        "-o",
        str(out),
        "--concurrency",
        "2",
        "--slice-pages",
        "5",
        "--resume",
    ]


def _run_until(
    argv: list[str], env: dict[str, str], ckpt: Path, when: Callable[[float, Any], bool]
) -> int | None:
    """Start the export; SIGKILL it once `when(seconds, checkpoint)` holds. Its return code."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = time.monotonic()
    try:
        while proc.poll() is None:
            if when(time.monotonic() - started, _checkpoint(ckpt)):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        proc.stderr.close()
    assert "Traceback" not in err, err
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["ndjson", "csv"])
def test_export_killed_with_sigkill_resumes_to_the_exact_set(tmp_path: Path, fmt: str) -> None:
    """SIGKILL at several points (start, first slice, mid-run, random), each resumed: exact set."""
    rng = random.Random(f"kill-{fmt}")
    out = tmp_path / f"chats.{fmt}"
    ckpt = Path(str(out) + ".checkpoint.json")
    with ThreadedSandbox(chats=2500, seed=17, latency=0.006) as sb:
        argv = _export_argv(out, fmt)
        env = env_for(sb)
        total = len(sb.data)
        records_at_kill: list[int] = []
        random_delay = rng.uniform(0.05, 0.5)
        points: list[Callable[[float, Any], bool]] = [
            lambda t, c: c is not None,  # the first checkpoint, possibly before any slice
            lambda t, c: c is not None and c["slices"] >= 1,
            lambda t, c: c is not None and c["records"] >= total // 2,
            lambda t, c: t >= random_delay,
        ]
        killed = 0
        for when in points:
            code = _run_until(argv, env, ckpt, when)
            state = _checkpoint(ckpt)
            if code == -signal.SIGKILL:
                killed += 1
                records_at_kill.append(state["records"] if state else 0)
        assert killed >= 3, "the kills should land before the export ends"
        assert max(records_at_kill) > 0
        final = subprocess.run(argv, env=env, capture_output=True, timeout=120, check=False)
        assert final.returncode == 0, final.stderr.decode()
        data = list(sb.data)
    rows: list[Any] = read_ndjson(out) if fmt == "ndjson" else read_csv(out)
    got = [r["chat_id"] for r in rows]
    assert_exact(got, data)
    assert not ckpt.exists() and not Path(str(out) + ".part").exists()
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))


# -- defects found by review -----------------------------------------------------------------


async def test_csv_resume_counts_rows_whatever_the_chat_ids(tmp_path: Path) -> None:
    """A CSV export holding chats whose chat_id is not a string resumes (it was refused)."""
    out = tmp_path / "chats.csv"
    ckpt = tmp_path / "ckpt.json"

    class Stop(Exception):
        pass

    def watch(p: ExportProgress) -> None:
        if p.slices_done >= 2:
            raise Stop

    async with serve(chats=600, seed=31) as sb, client_for(sb, concurrency=2) as client:
        for chat in sb.data[::5]:
            chat["chat_id"] = True  # a malformed id: written, not de-duplicable
        args: dict[str, Any] = {"since": SINCE, "until": UNTIL, "sink": out, "checkpoint": ckpt}
        with pytest.raises(Stop):
            await export_chats(client, progress=watch, **args)
        assert json.loads(ckpt.read_text())["records"] > 0
        report = await export_chats(client, resume=True, **args)
    rows = read_csv(out)
    assert report.resumed and report.records == len(rows) == 600
    assert sum(r["chat_id"] == "true" for r in rows) == 120


@pytest.mark.parametrize("sink_type", [NdjsonSink, CsvSink])
async def test_resume_streams_the_partial_file(
    tmp_path: Path, sink_type: type[ex.FileSink]
) -> None:
    """Resuming counts the records of a large .part file without reading it whole into memory."""
    import tracemalloc

    path = tmp_path / "big.out"
    sink = sink_type(path)
    assert await sink.open(None) == 0
    chat = {"chat_id": "x", "other_details": {"note": "y" * 2000}}
    for _ in range(40):
        await sink.write([chat] * 250)  # 10,000 records, about 20 MB
    offset = await sink.sync()
    sink.close()
    assert offset is not None and offset > 20_000_000
    resumed = sink_type(path)
    tracemalloc.start()
    try:
        count = await resumed.open(offset)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        resumed.close()
    assert count == 10_000
    assert peak < 4_000_000  # a bounded buffer, not the file


async def test_fsync_runs_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every fsync of an export (output, checkpoint, directory) runs outside the loop's thread."""
    import threading

    real_fsync = os.fsync
    on_loop: list[bool] = []

    def spy(fd: int) -> None:
        on_loop.append(threading.current_thread() is threading.main_thread())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    out = tmp_path / "chats.ndjson"
    async with serve(chats=300, seed=32) as sb, client_for(sb) as client:
        await export_chats(
            client, since=SINCE, until=UNTIL, sink=out, checkpoint=tmp_path / "ckpt.json"
        )
    assert len(on_loop) > 10 and not any(on_loop)


async def test_second_cancellation_still_waits_for_every_worker() -> None:
    """Cancelled twice while its workers clean up, the export returns only once they are done."""
    entered = asyncio.Event()
    release = asyncio.Event()
    cleaned: list[bool] = []

    async def slow_to_stop(chat: Any) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()  # hangs until cancelled
        except asyncio.CancelledError:
            await release.wait()  # cleanup that takes a while
            cleaned.append(True)
            raise

    async with serve(chats=200, seed=33) as sb, client_for(sb, concurrency=2) as client:
        task = asyncio.create_task(
            export_chats(client, since=SINCE, until=UNTIL, sink=slow_to_stop)
        )
        await entered.wait()
        task.cancel()
        for _ in range(5):
            await asyncio.sleep(0)
        task.cancel()  # the second cancellation, during cleanup
        for _ in range(20):
            await asyncio.sleep(0)
        assert not task.done()  # still waiting for the worker's cleanup
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned == [True]
        await assert_no_stray_tasks()


def test_export_package_all_lists_its_public_names() -> None:
    """`imichat_async.export.__all__` is exactly its public names, each importable."""
    assert sorted(ex.__all__) == sorted(
        [
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
    )
    assert all(hasattr(ex, name) for name in ex.__all__)


async def _export_held_bytes(chats: int) -> int:
    """Bytes allocated by the export's own code and still held when its last slice commits."""
    import tracemalloc

    held: list[int] = []
    only_export = [tracemalloc.Filter(True, "*imichat_async/export*")]

    def watch(p: ExportProgress) -> None:
        if p.records == chats and not held:
            snap = tracemalloc.take_snapshot().filter_traces(only_export)
            held.append(sum(s.size for s in snap.statistics("filename")))

    async def drop(chat: Any) -> None:
        pass

    async with serve(chats=chats, seed=34) as sb, client_for(sb, concurrency=4) as client:
        tracemalloc.start()
        try:
            await export_chats(client, since=SINCE, until=UNTIL, sink=drop, progress=watch)
        finally:
            tracemalloc.stop()
    return held[0]


async def test_export_memory_does_not_grow_with_the_chats_exported() -> None:
    """What the export holds at its end is the same for 300 and 2,000 chats (no set of ids)."""
    small = await _export_held_bytes(300)
    large = await _export_held_bytes(2000)
    assert large - small < 16_000  # a set of 1,700 more ids alone would hold > 60 kB


# -- issue #12: empty slices, many workers, a failed first run, progress -----------------------


async def test_empty_slices_with_a_zero_total_are_verified(tmp_path: Path) -> None:
    """A range far past the data: its empty slices' `X-Total-Count: 0` verifies them."""
    out = tmp_path / "chats.ndjson"
    ckpt = tmp_path / "chats.ckpt"
    states: list[dict[str, Any] | None] = []
    async with serve(chats=300, seed=30) as sb, client_for(sb) as client:
        report = await export_chats(
            client,
            since=SINCE,
            until="2030-01-01",
            sink=out,
            checkpoint=ckpt,
            progress=lambda p: states.append(_checkpoint(ckpt)),
        )
        data = list(sb.data)
    assert_exact(ids_of(read_ndjson(out)), data)
    assert report.verified and report.notes == ()
    saved = [s for s in states if s is not None]
    assert saved and all(s["verified"] for s in saved)  # the checkpoint said so all along


async def test_first_cut_does_not_grow_with_the_workers(tmp_path: Path) -> None:
    """500 workers over 30 pages of chats: no more requests than 30 pages plus 8 first slices."""
    out = tmp_path / "chats.ndjson"
    async with serve(chats=300, seed=31) as sb, client_for(sb, concurrency=4) as client:
        report = await export_chats(client, since=SINCE, until=UNTIL, sink=out, workers=500)
        data = list(sb.data)
        requests = sb.stats.requests_total
    assert_exact(ids_of(read_ndjson(out)), data)
    assert report.slices <= 8 and requests <= 30 + 8


async def test_failed_run_that_wrote_nothing_leaves_nothing_behind(tmp_path: Path) -> None:
    """A refused token before any chat was written: no checkpoint, no .part; a retry starts."""
    out = tmp_path / "chats.ndjson"
    ckpt = tmp_path / "chats.ckpt"
    async with serve(chats=200, seed=32) as sb:
        async with imi.ImiChatClient(base_url=sb.base_url, token="nope", team_id=sb.team_id) as c:
            with pytest.raises(imi.InvalidTokenError):
                await export_chats(c, since=SINCE, until=UNTIL, sink=out, checkpoint=ckpt)
        assert not ckpt.exists() and not (tmp_path / "chats.ndjson.part").exists()
        async with client_for(sb) as client:
            report = await export_chats(client, since=SINCE, until=UNTIL, sink=out, checkpoint=ckpt)
        data = list(sb.data)
    assert report.records == 200 and not report.resumed
    assert_exact(ids_of(read_ndjson(out)), data)


class _Stats:
    requests = 0
    retries = 0


class _Client:
    stats = _Stats()


def test_progress_counts_pages_read_and_keeps_the_first_slices_total() -> None:
    """Progress counts chats read before their slice is written; the total is the first
    slices' announced totals, unmoved by the guessed shares or totals of their parts."""
    tally = ex._progress.Tally(records=100)  # written by an earlier run
    progress = ex._progress.Progress(_Client(), tally, None)  # type: ignore[arg-type]
    a, b = _plan.Slice(0, 10), _plan.Slice(10, 20)
    progress.plan([a, b])
    a.estimate, a.received = 40, 10
    first = progress.snapshot([a, b])
    assert first.received == 110 and first.total is None  # b has not answered yet
    b.estimate = 60
    parts = _plan.split(b, 3, b.estimate)  # guessed shares: 20 each
    parts[0].estimate = 35  # a part announces its own total
    parts[1].received = 7
    snap = progress.snapshot([a, *parts])
    assert snap.total == 200 and snap.received == 117
