"""Issue #25, "Messages": what differs named with both values, a sync's state called a
state, CLI options in CLI messages and API arguments in API ones, a missing directory
named before any request, the sync's `--filter` help, a resumed export's summary, a
repeating note said once per state. Against the sandbox."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from imichat_async import cli
from imichat_async.export import CheckpointError, _plan, export_chats, sync_chats
from imichat_async.sandbox import serve

from .sandbox_thread import ThreadedSandbox
from .test_export_misuse import SINCE, UNTIL, client_for, creds, stop_after_slices

OTHER_SINCE = "2024-06-01"
WAS = "2024-01-01T00:00:00Z"
NOW = "2024-06-01T00:00:00Z"


def invoke(args: list[str], env: dict[str, str | None]) -> Result:
    return CliRunner(env=env).invoke(cli.main, args, catch_exceptions=False)


def stopped_export(sb_kwargs: dict[str, Any], out: Path, ckpt: Path) -> None:
    """A checkpoint of [SINCE, UNTIL) into `out`, stopped after one slice (own sandbox)."""

    async def go() -> None:
        async with serve(**sb_kwargs) as sb, client_for(sb, concurrency=2) as client:
            await stop_after_slices(client, out, ckpt)

    asyncio.run(go())


# -- 1, 3: an export's checkpoint names each value that differs, in the caller's names --------


async def test_export_checkpoint_mismatch_names_each_value(tmp_path: Path) -> None:
    out, ckpt = tmp_path / "chats.ndjson", tmp_path / "ckpt.json"
    async with serve(chats=1000, seed=81) as sb:
        async with client_for(sb, concurrency=2) as client:
            await stop_after_slices(client, out, ckpt)
        before = sb.stats.requests_total
        async with client_for(sb) as client:
            with pytest.raises(CheckpointError) as info:
                await export_chats(
                    client,
                    since=OTHER_SINCE,
                    sink=out,
                    checkpoint=ckpt,
                    resume=True,
                    status="closed",
                    updated_at__gte="2024-02-01",
                )
            with pytest.raises(CheckpointError) as other_sink:
                await export_chats(
                    client,
                    since=SINCE,
                    until=UNTIL,
                    sink=tmp_path / "other.ndjson",
                    checkpoint=ckpt,
                    resume=True,
                )
        assert sb.stats.requests_total == before
    message = str(info.value)
    assert f"since={WAS} in the checkpoint, {NOW} given" in message
    assert "until=2025-01-01T00:00:00Z in the checkpoint, none (the start instant) given" in (
        message
    )
    assert (
        "filters=[] in the checkpoint, [status=closed, updated_at__gte=2024-02-01T00:00:00Z] "
        "given" in message
    )
    assert "other" not in message.split("(")[1]  # no category ("other range")
    assert (
        f"sink={out.resolve()} in the checkpoint, {(tmp_path / 'other.ndjson').resolve()} given"
        in str(other_sink.value)
    )


def test_cli_export_messages_use_its_options(tmp_path: Path) -> None:
    out = tmp_path / "chats.ndjson"
    ckpt = Path(str(out) + ".checkpoint.json")
    stopped_export({"chats": 1000, "seed": 82}, out, ckpt)
    before = ckpt.read_bytes()
    with ThreadedSandbox(chats=1000, seed=82) as sb:
        base = ["export", "--since", OTHER_SINCE, "-o", str(out), "-f", "status=closed"]
        mismatch = invoke([*base, "--resume"], creds(sb))
        not_resumed = invoke(
            ["export", "--since", SINCE, "--until", UNTIL, "-o", str(out)], creds(sb)
        )
        assert sb.stats.requests_total == 0
    assert mismatch.exit_code == 2, mismatch.output
    err = mismatch.stderr
    assert f"--since {WAS} in the checkpoint, {NOW} given" in err
    assert "--until 2025-01-01T00:00:00Z in the checkpoint, none (the start instant) given" in err
    assert "--filter [] in the checkpoint, [status=closed] given" in err
    assert "since=" not in err and "filters=" not in err
    assert not_resumed.exit_code == 2, not_resumed.output
    assert "resume it (--resume) or delete it" in not_resumed.stderr
    assert "resume=True" not in not_resumed.stderr
    assert ckpt.read_bytes() == before


async def test_api_export_messages_use_its_arguments(tmp_path: Path) -> None:
    out, ckpt = tmp_path / "chats.ndjson", tmp_path / "ckpt.json"
    async with serve(chats=1000, seed=83) as sb:
        async with client_for(sb, concurrency=2) as client:
            await stop_after_slices(client, out, ckpt)
        async with client_for(sb) as client:
            with pytest.raises(CheckpointError) as info:
                await export_chats(client, since=SINCE, until=UNTIL, sink=out, checkpoint=ckpt)
    assert "resume it (resume=True) or delete it" in str(info.value)
    assert "--" not in str(info.value)


# -- 1, 2, 3: a sync's state -------------------------------------------------------------------


async def test_sync_state_mismatch_names_each_value_and_calls_it_a_state(tmp_path: Path) -> None:
    log, state = tmp_path / "log.ndjson", tmp_path / "state.json"
    async with serve(chats=200, seed=84) as sb, client_for(sb) as client:
        await sync_chats(client, since=SINCE, state=state, sink=log)
        before = sb.stats.requests_total
        with pytest.raises(CheckpointError) as info:
            await sync_chats(
                client, since=OTHER_SINCE, state=state, sink=log, lag=60, status="closed"
            )
        with pytest.raises(CheckpointError) as other_sink:
            await sync_chats(client, since=SINCE, state=state, sink=tmp_path / "log.csv")
        assert sb.stats.requests_total == before
    message = str(info.value)
    assert f"since={WAS} in the state, {NOW} given" in message
    assert "lag=300 s in the state, 60 s given" in message
    assert "filters=[] in the state, [status=closed] given" in message
    assert "checkpoint" not in message
    assert f"sink={log.resolve()} in the state, {(tmp_path / 'log.csv').resolve()} given" in str(
        other_sink.value
    )

    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"version": 99}))
    unreadable = tmp_path / "unreadable.json"
    unreadable.write_text("{")
    async with serve(chats=10, seed=84) as sb, client_for(sb) as client:
        for path, said in ((wrong, "is not a version-1 sync state"), (unreadable, "cannot read")):
            with pytest.raises(CheckpointError) as info:
                await sync_chats(client, since=SINCE, state=path, sink=tmp_path / "x.ndjson")
            assert said in str(info.value) and "checkpoint" not in str(info.value)


def test_cli_sync_messages_use_its_options(tmp_path: Path) -> None:
    log, state = tmp_path / "log.ndjson", tmp_path / "state.json"
    base = ["sync", "--state", str(state), "-o", str(log)]
    with ThreadedSandbox(chats=100, seed=85) as sb:
        first = invoke(["--quiet", *base, "--since", SINCE], creds(sb))
        assert first.exit_code == 0, first.output
        before = sb.stats.requests_total
        other = invoke([*base, "--since", OTHER_SINCE, "--lag", "60"], creds(sb))
        assert sb.stats.requests_total == before
    assert other.exit_code == 2, other.output
    err = other.stderr
    assert f"--since {WAS} in the state, {NOW} given" in err
    assert "--lag 300 s in the state, 60 s given" in err
    assert "checkpoint" not in err and "since=" not in err and "lag=" not in err


# -- 4: a missing directory, named, before any request, nothing left ---------------------------


async def test_api_names_a_missing_directory_before_any_request(tmp_path: Path) -> None:
    gone = tmp_path / "no" / "such"
    async with serve(chats=100, seed=86) as sb, client_for(sb) as client:
        cases: list[tuple[str, Any]] = [
            ("sink", export_chats(client, since=SINCE, sink=gone / "c.ndjson")),
            (
                "checkpoint",
                export_chats(
                    client, since=SINCE, sink=tmp_path / "c.ndjson", checkpoint=gone / "ck.json"
                ),
            ),
            ("sink", sync_chats(client, since=SINCE, state=tmp_path / "s.json", sink=gone / "l")),
            ("state", sync_chats(client, since=SINCE, state=gone / "s.json", sink=tmp_path / "l")),
        ]
        for name, call in cases:
            with pytest.raises(CheckpointError) as info:
                await call
            assert str(info.value) == f"the directory {gone} of {name}= does not exist"
        assert sb.stats.requests_total == 0
    assert os.listdir(tmp_path) == []


def test_cli_names_a_missing_directory_before_any_request(tmp_path: Path) -> None:
    gone = tmp_path / "no" / "such"
    with ThreadedSandbox(chats=100, seed=87) as sb:
        export = invoke(["export", "--since", SINCE, "-o", str(gone / "c.ndjson")], creds(sb))
        ckpt = invoke(
            [
                "export",
                "--since",
                SINCE,
                "-o",
                str(tmp_path / "c.ndjson"),
                "--checkpoint",
                str(gone / "ck.json"),
            ],
            creds(sb),
        )
        state = [
            "sync",
            "--since",
            SINCE,
            "--state",
            str(gone / "s.json"),
            "-o",
            str(tmp_path / "l.ndjson"),
        ]
        sync = invoke(state, creds(sb))
        assert sb.stats.requests_total == 0
    for result, option in ((export, "-o"), (ckpt, "--checkpoint"), (sync, "--state")):
        assert result.exit_code == 2, result.output
        assert f"the directory {gone} of {option} does not exist" in result.stderr
    assert os.listdir(tmp_path) == []


# -- 5: the sync's --filter help -----------------------------------------------------------------


def test_sync_filter_help_suggests_no_filter_it_refuses() -> None:
    sync_help = CliRunner().invoke(cli.main, ["sync", "--help"])
    export_help = CliRunner().invoke(cli.main, ["export", "--help"])
    assert "status=closed" in sync_help.output
    assert "created_at__" not in sync_help.output and "updated_at__" not in sync_help.output
    assert "created_at__gte=2024-05-01" in export_help.output


# -- 6: a resumed export's summary ---------------------------------------------------------------


def fields(summary: str) -> dict[str, str]:
    """The summary line as `name=value` pairs (it must parse so)."""
    pairs = [word.split("=", 1) for word in summary.split()]
    assert all(len(p) == 2 for p in pairs), summary
    return dict(pairs)


async def test_resumed_export_summary_says_what_covers_this_run(tmp_path: Path) -> None:
    out, ckpt = tmp_path / "chats.ndjson", tmp_path / "ckpt.json"
    args: dict[str, Any] = {"since": SINCE, "until": UNTIL, "sink": out, "checkpoint": ckpt}
    async with serve(chats=1000, seed=88) as sb:
        async with client_for(sb, concurrency=2) as client:
            await stop_after_slices(client, out, ckpt, slices=2)
        saved = json.loads(ckpt.read_text())
        async with client_for(sb) as client:
            resumed = await export_chats(client, resume=True, **args)
            fresh = await export_chats(client, since=SINCE, until=UNTIL, sink=tmp_path / "f")
    got = fields(resumed.summary())
    assert got["records"] == "1000" and int(saved["records"]) > 0
    assert got["records_this_run"] == str(1000 - saved["records"])
    assert got["slices_this_run"] == str(int(got["slices"]) - saved["slices"])
    assert got["duplicates_this_run"] == "0"
    assert resumed.records_this_run == 1000 - saved["records"]
    assert "this_run" not in fresh.summary() and fields(fresh.summary())["records"] == "1000"


# -- 7: a note that would repeat on every run is said once per state ----------------------------


class Clock:
    """One wall clock for the sandbox's changes and the sync's T1 (no sleeps)."""

    def __init__(self) -> None:
        self.now = float(int(time.time())) - 60

    def __call__(self) -> float:
        return self.now

    def dt(self) -> datetime:
        return datetime.fromtimestamp(self.now, timezone.utc)


async def test_too_narrow_note_is_said_once_per_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """15 chats updated at one instant (more than a page): every run whose lag window holds
    that instant pages it whole (a slice that differs by a microsecond from run to run); the
    first run says so, the later ones log it."""
    clock = Clock()
    monkeypatch.setattr(_plan, "utcnow", clock.dt)
    log, state = tmp_path / "log.ndjson", tmp_path / "state.json"
    async with serve(chats=200, seed=89, wall_clock=clock) as sb, client_for(sb) as client:
        await sync_chats(client, since=SINCE, state=state, sink=log)
        floor = _plan.to_us("since", SINCE)
        ids = [c["chat_id"] for c in sb.data if _plan.to_us("c", c["created_at"]) >= floor]
        for chat_id in ids[:15]:
            sb.update_chat(chat_id)
        reports = []
        caplog.set_level(logging.INFO, logger="imichat_async")
        for _ in range(3):
            clock.now += 10
            reports.append(await sync_chats(client, since=SINCE, state=state, sink=log))
    narrow = [[n for n in r.notes if "too narrow to split" in n] for r in reports]
    assert len(narrow[0]) == 1 and narrow[1:] == [[], []], narrow
    assert reports[0].appended == 15 and reports[2].skipped >= 15  # the instant was re-read
    assert json.loads(state.read_text())["told"] == ["narrow"]
    logged = [r for r in caplog.records if "too narrow to split" in r.getMessage()]
    assert len(logged) >= 2 and all(r.levelno == logging.INFO for r in logged)
