"""Issue #23, the export/checkpoint side: used wrong, an export or a sync refuses, it never
loses, mixes or duplicates a chat (paging keywords, another tenant, short slices, a
mistyped checkpoint, damaged or unwritable output). Against the sandbox."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import tracemalloc
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dlt
import pytest
from click.testing import CliRunner, Result
from dlt.pipeline.exceptions import PipelineStepFailed

import imichat_async as imi
from imichat_async import cli
from imichat_async import dlt as imi_dlt
from imichat_async._retry import RetryPolicy
from imichat_async.export import (
    CheckpointError,
    CsvSink,
    ExportProgress,
    SyncState,
    export_chats,
    sync_chats,
)
from imichat_async.sandbox import Sandbox, serve

from .sandbox_thread import ThreadedSandbox
from .test_export import assert_exact, ids_of, read_csv, read_ndjson

SINCE = "2024-01-01"
UNTIL = "2025-01-01"
PAGING: dict[str, Any] = {
    "limit": 5,
    "start_page": 2,
    "max_pages": 1,
    "deadline": 60.0,
    "prefetch": 4,
}


def client_for(sb: Sandbox, base_url: str | None = None, **kwargs: Any) -> imi.ImiChatClient:
    kwargs.setdefault("retry_policy", RetryPolicy.testing(max_retries=5))
    kwargs.setdefault("max_retries", 5)
    return imi.ImiChatClient(
        base_url=base_url or sb.base_url, token=sb.token, team_id=sb.team_id, **kwargs
    )


def creds(sb: Sandbox) -> dict[str, str | None]:
    return {
        "IMICHAT_BASE_URL": sb.base_url,
        "IMICHAT_TOKEN": sb.token,
        "IMICHAT_TEAM_ID": sb.team_id,
    }


def invoke(args: list[str], env: dict[str, str | None]) -> Result:
    return CliRunner(env=env).invoke(cli.main, args, catch_exceptions=False)


class Stop(Exception):
    """Raised from a progress callback: the export stops there, its checkpoint kept."""


async def stop_after_slices(
    client: imi.ImiChatClient, sink: Any, ckpt: Path, slices: int = 1
) -> None:
    """An export of [SINCE, UNTIL) into `sink`, stopped once `slices` slices are written."""

    def watch(p: ExportProgress) -> None:
        if p.slices_done >= slices:
            raise Stop

    with pytest.raises(Stop):
        await export_chats(
            client, since=SINCE, until=UNTIL, sink=sink, checkpoint=ckpt, progress=watch
        )


def fds_open_on(path: Path) -> list[str]:
    """This process's file descriptors open on `path` (Linux /proc)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                found.append(fd)
        except OSError:
            continue
    return found


# -- 1: paging keywords are not filters ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PAGING))
async def test_export_refuses_a_paging_keyword_before_any_request(
    tmp_path: Path, name: str
) -> None:
    """`start_page=2` wrote 280 of 300 chats and `limit=5` five, both "verified": refused."""
    out = tmp_path / "chats.ndjson"
    async with serve(chats=300, seed=61) as sb, client_for(sb) as client:
        with pytest.raises(imi.InvalidQueryError, match=repr(name)):
            await export_chats(client, since=SINCE, until=UNTIL, sink=out, **{name: PAGING[name]})
        assert sb.stats.requests_total == 0
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", sorted(PAGING))
async def test_sync_refuses_a_paging_keyword_before_any_request(tmp_path: Path, name: str) -> None:
    """`sync_chats(start_page=2)` appended 21 of 300 and advanced its bound: refused."""
    state = tmp_path / "state.json"
    async with serve(chats=300, seed=62) as sb, client_for(sb) as client:
        with pytest.raises(imi.InvalidQueryError, match=repr(name)):
            await sync_chats(
                client, since=SINCE, state=state, sink=tmp_path / "log", **{name: PAGING[name]}
            )
        assert sb.stats.requests_total == 0
    assert os.listdir(tmp_path) == []


async def test_filters_given_as_a_generator_are_checked_and_applied(tmp_path: Path) -> None:
    """The one check reads `filters` once: a generator's filters still narrow the export."""
    out = tmp_path / "chats.ndjson"
    async with serve(chats=300, seed=60) as sb, client_for(sb) as client:
        given = (f for f in [imi.Filter("status", "eq", "closed")])
        report = await export_chats(client, since=SINCE, until=UNTIL, sink=out, filters=given)
        closed = [c for c in sb.data if c["status"] == "closed"]
    assert 0 < report.records < 300
    assert_exact(ids_of(read_ndjson(out)), closed)


@pytest.mark.parametrize("name", sorted(PAGING))
def test_dlt_source_refuses_a_paging_keyword(name: str) -> None:
    """The dlt source checks its keywords the same way (it already did: kept so)."""
    args: dict[str, Any] = {"base_url": "http://127.0.0.1:9", "token": "t", "team_id": "x"}
    with pytest.raises(imi.InvalidQueryError, match=repr(name)):
        imi_dlt.chats_source(since=SINCE, **args, **{name: PAGING[name]})


# -- 2: the tenant is part of every checkpoint's and state's identity ----------------------------


def test_tenant_is_host_port_and_path_normalised() -> None:
    """What identifies a tenant: host (any case), port (the scheme's default when none),
    path (no trailing slash), and the team id; never the token, never the scheme alone."""
    from imichat_async.export._checkpoint import tenant_of

    same = [
        "https://Acme.IMI.chat/v3.0",
        "https://acme.imi.chat:443/v3.0/",
        "https://acme.imi.chat/v3.0//",
    ]
    assert {tenant_of(url, "t1")["base_url"] for url in same} == {"acme.imi.chat:443/v3.0"}
    assert tenant_of("http://127.0.0.1/v3.0", "t")["base_url"] == "127.0.0.1:80/v3.0"
    assert tenant_of("http://[::1]:8080/v3.0", "t")["base_url"] == "[::1]:8080/v3.0"
    others = ["https://acme.imi.chat:8443/v3.0", "https://acme.imi.chat/v3.1", "https://b.imi.chat"]
    assert len({tenant_of(url, "t1")["base_url"] for url in others}) == 3
    assert tenant_of(same[0], "t1") != tenant_of(same[0], "t2")


async def test_export_resumed_against_another_tenant_is_refused(tmp_path: Path) -> None:
    """Stopped against A, resumed against B: it mixed both tenants' chats in one file."""
    out, ckpt = tmp_path / "chats.ndjson", tmp_path / "ckpt.json"
    part = tmp_path / "chats.ndjson.part"
    args: dict[str, Any] = {"since": SINCE, "until": UNTIL, "sink": out, "checkpoint": ckpt}
    async with serve(chats=1000, seed=63) as a, serve(chats=1000, seed=64) as b:
        async with client_for(a, concurrency=2) as client:
            await stop_after_slices(client, out, ckpt)
        saved = json.loads(ckpt.read_text())
        assert a.token not in ckpt.read_text()
        assert saved["key"]["team_id"] == a.team_id
        before = (part.read_bytes(), ckpt.read_bytes())
        async with client_for(b) as client:
            with pytest.raises(CheckpointError) as info:
                await export_chats(client, resume=True, **args)
        assert b.stats.requests_total == 0
        message = str(info.value)
        assert f"team_id {a.team_id!r} in the checkpoint, {b.team_id!r} given" in message
        assert f"base_url '127.0.0.1:{urlsplit(a.base_url).port}/v3.0' in the checkpoint" in message
        assert a.token not in message and b.token not in message
        assert (part.read_bytes(), ckpt.read_bytes()) == before

        # The same team on another host is another tenant too (nothing is sent to it).
        other_host = a.base_url.replace("127.0.0.1", "localhost")
        async with client_for(a, base_url=other_host) as client:
            with pytest.raises(CheckpointError, match=r"base_url '127\.0\.0\.1:"):
                await export_chats(client, resume=True, **args)
        assert (part.read_bytes(), ckpt.read_bytes()) == before

        # The same tenant spelled with a trailing slash resumes, and ends with A's chats.
        async with client_for(a, base_url=a.base_url + "/") as client:
            report = await export_chats(client, resume=True, **args)
        data = list(a.data)
    assert report.resumed and report.records == 1000
    assert_exact(ids_of(read_ndjson(out)), data)


def test_cli_export_resumed_against_another_tenant_exits_2(tmp_path: Path) -> None:
    """`export --resume` with other IMICHAT_* values than the checkpoint's: exit 2, named."""
    out = tmp_path / "chats.ndjson"
    ckpt = Path(str(out) + ".checkpoint.json")
    with ThreadedSandbox(chats=1000, seed=65) as a, ThreadedSandbox(chats=300, seed=66) as b:

        async def stopped() -> None:
            async with client_for(a, concurrency=2) as client:
                await stop_after_slices(client, out, ckpt)

        asyncio.run(stopped())
        before = ckpt.read_bytes()
        args = ["export", "--since", SINCE, "--until", UNTIL, "-o", str(out), "--resume"]
        result = invoke(args, creds(b))
        assert b.stats.requests_total == 0
    assert result.exit_code == 2, result.output
    assert f"team_id {a.team_id!r} in the checkpoint, {b.team_id!r} given" in result.stderr
    assert ckpt.read_bytes() == before


async def test_sync_state_reused_against_another_tenant_is_refused(tmp_path: Path) -> None:
    """A state of A's reused against B appended nothing: B's chats never entered the log."""
    log, state = tmp_path / "log.ndjson", tmp_path / "state.json"
    async with serve(chats=200, seed=67) as a, serve(chats=200, seed=68) as b:
        async with client_for(a) as client:
            await sync_chats(client, since=SINCE, state=state, sink=log)
        assert a.token not in state.read_text()
        before = (log.read_bytes(), state.read_bytes())
        async with client_for(b) as client:
            with pytest.raises(CheckpointError) as info:
                await sync_chats(client, since=SINCE, state=state, sink=log)
        assert b.stats.requests_total == 0
    assert f"team_id {a.team_id!r} in the state, {b.team_id!r} given" in str(info.value)
    assert (log.read_bytes(), state.read_bytes()) == before


async def test_sync_state_identity_holds_no_class_name(tmp_path: Path) -> None:
    """Renaming a callable sink's class (`DltHandoff`, a user's) keeps its state usable
    (issue #25): the sink is identified by its kind, not its `__qualname__`."""
    got: list[str] = []

    class Collect:
        async def __call__(self, chat: Any) -> None:
            got.append(chat["chat_id"])

    class RenamedCollect(Collect):
        pass

    state = SyncState()
    async with serve(chats=100, seed=69) as sb, client_for(sb) as client:
        await sync_chats(client, since=SINCE, state=state, sink=Collect())
        report = await sync_chats(client, since=SINCE, state=state, sink=RenamedCollect())
    assert state.key is not None and "Collect" not in json.dumps(state.key)
    assert report.runs == 2 and len(got) == 100


def test_dlt_state_used_against_another_tenant_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dlt source with a new base_url/team_id loaded nothing from the new tenant."""
    monkeypatch.setenv("RUNTIME__DLTHUB_TELEMETRY", "false")
    monkeypatch.setenv("DLT_DATA_DIR", str(tmp_path / "dlt-data"))

    def source(sb: Sandbox) -> Any:
        return imi_dlt.chats_source(
            base_url=sb.base_url, token=sb.token, team_id=sb.team_id, since=SINCE, concurrency=2
        )

    pipeline = dlt.pipeline(
        pipeline_name="imichat",
        destination=dlt.destinations.duckdb(str(tmp_path / "chats.duckdb")),
        dataset_name="imichat",
        pipelines_dir=str(tmp_path / "pipelines"),
    )
    with ThreadedSandbox(chats=100, seed=70) as a, ThreadedSandbox(chats=100, seed=71) as b:
        pipeline.run(source(a))
        with pytest.raises(PipelineStepFailed, match=f"team_id {a.team_id!r} in the state"):
            pipeline.run(source(b))
        assert b.stats.requests_total == 0


async def test_checkpoint_without_a_tenant_is_refused_with_a_clear_message(
    tmp_path: Path,
) -> None:
    """A checkpoint written before the tenant was part of the identity: refused, said why."""
    out, ckpt = tmp_path / "chats.ndjson", tmp_path / "ckpt.json"
    async with serve(chats=1000, seed=72) as sb, client_for(sb, concurrency=2) as client:
        await stop_after_slices(client, out, ckpt)
        saved = json.loads(ckpt.read_text())
        del saved["key"]["base_url"], saved["key"]["team_id"]
        ckpt.write_text(json.dumps(saved))
        requests = sb.stats.requests_total
        with pytest.raises(CheckpointError, match=r"records no tenant.*delete it"):
            await export_chats(
                client, since=SINCE, until=UNTIL, sink=out, checkpoint=ckpt, resume=True
            )
        assert sb.stats.requests_total == requests


# -- 4: a slice accepted short is not verified --------------------------------------------------


async def test_a_slice_still_short_after_its_rereads_is_not_verified(tmp_path: Path) -> None:
    """A chat inserted every other request: the one slice never reads stable; it is kept
    after the last re-read, with a note, and the report no longer says verified."""
    out = tmp_path / "chats.ndjson"
    async with serve(chats=300, seed=73, insert_every=2) as sb, client_for(sb) as client:
        report = await export_chats(
            client, since=SINCE, until="2025-06-01", sink=out, workers=1, slice_pages=100
        )
    assert any("still short" in note for note in report.notes)
    assert not report.verified


def test_cli_warns_when_a_slice_was_accepted_short(tmp_path: Path) -> None:
    """The CLI says so on stderr (it only spoke of missing totals before)."""
    out = tmp_path / "chats.ndjson"
    args = ["export", "--since", SINCE, "--until", "2025-06-01", "-o", str(out)]
    with ThreadedSandbox(chats=300, seed=73, insert_every=2) as sb:
        result = invoke([*args, "--concurrency", "1", "--slice-pages", "100"], creds(sb))
    assert result.exit_code == 0, result.output
    assert "still short" in result.stderr
    assert "warning: not every slice's count matched the server's total" in result.stderr


# -- 7: --resume with a checkpoint that does not exist -------------------------------------------


async def test_resume_with_a_missing_checkpoint_keeps_the_partial_output(tmp_path: Path) -> None:
    """`resume=True, checkpoint=typo` while the output's .part exists: refused, naming both;
    it started over and overwrote the .part the real checkpoint points to."""
    out, ckpt, typo = tmp_path / "chats.ndjson", tmp_path / "ckpt.json", tmp_path / "typo.json"
    part = tmp_path / "chats.ndjson.part"
    async with serve(chats=1000, seed=74) as sb, client_for(sb, concurrency=2) as client:
        await stop_after_slices(client, out, ckpt)
        before = (part.read_bytes(), ckpt.read_bytes())
        requests = sb.stats.requests_total
        with pytest.raises(CheckpointError) as info:
            await export_chats(
                client, since=SINCE, until=UNTIL, sink=out, checkpoint=typo, resume=True
            )
        assert sb.stats.requests_total == requests
    assert str(typo) in str(info.value) and str(part) in str(info.value)
    assert (part.read_bytes(), ckpt.read_bytes()) == before and not typo.exists()


def test_cli_resume_with_a_mistyped_checkpoint_exits_2_naming_both(tmp_path: Path) -> None:
    """`--resume --checkpoint typo.json` next to OUTPUT.checkpoint.json: exit 2, both named,
    nothing overwritten; the right checkpoint then finishes the export."""
    out = tmp_path / "chats.ndjson"
    ckpt = Path(str(out) + ".checkpoint.json")
    part = Path(str(out) + ".part")
    typo = tmp_path / "typo.json"
    with ThreadedSandbox(chats=1000, seed=75) as sb:

        async def stopped() -> None:
            async with client_for(sb, concurrency=2) as client:
                await stop_after_slices(client, out, ckpt)

        asyncio.run(stopped())
        before = (part.read_bytes(), ckpt.read_bytes())
        args = ["export", "--since", SINCE, "--until", UNTIL, "-o", str(out), "--resume"]
        refused = invoke([*args, "--checkpoint", str(typo)], creds(sb))
        after = (part.read_bytes(), ckpt.read_bytes())
        done = invoke(args, creds(sb))
        data = list(sb.data)
    assert refused.exit_code == 2, refused.output
    assert str(typo) in refused.stderr and str(ckpt) in refused.stderr
    assert after == before and not typo.exists()
    assert done.exit_code == 0, done.output
    assert_exact(ids_of(read_ndjson(out)), data)


# -- 15: sinks on error paths ------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["bad-utf8", "stray-quote"])
async def test_damaged_csv_part_is_a_checkpoint_error_and_left_closed(
    tmp_path: Path, damage: str
) -> None:
    """A damaged CSV .part raised a raw UnicodeDecodeError / csv.Error and leaked its handle."""
    out, ckpt = tmp_path / "chats.csv", tmp_path / "ckpt.json"
    part = tmp_path / "chats.csv.part"
    async with serve(chats=2000, seed=76) as sb, client_for(sb, concurrency=2) as client:
        await stop_after_slices(client, CsvSink(out), ckpt, slices=6)
        data = part.read_bytes()
        header = data[: data.index(b"\r\n") + 2]
        assert len(data) > 140_000  # past csv's field size limit
        if damage == "bad-utf8":
            damaged = data[:1000] + b"\xff" + data[1001:]
        else:  # an opening quote, then no closing one: one field swallows the rest
            damaged = header + b'"' + b"x" * (len(data) - len(header) - 1)
        part.write_bytes(damaged)
        with pytest.raises(CheckpointError, match=r"chats\.csv\.part"):
            await export_chats(
                client, since=SINCE, until=UNTIL, sink=CsvSink(out), checkpoint=ckpt, resume=True
            )
    assert fds_open_on(part) == []
    assert part.read_bytes() == damaged  # left as it was, for the user to look at


async def test_a_log_with_no_state_is_refused_reading_only_its_head(tmp_path: Path) -> None:
    """A non-empty log the state has no record of: refused after reading 64 KiB of it, not
    the whole file."""
    log = tmp_path / "log.ndjson"
    line = b'{"chat_id":"x","updated_at":"2024-05-01T00:00:00Z"}\n'
    log.write_bytes(line * (16 * 1024 * 1024 // len(line)))
    async with serve(chats=10, seed=77) as sb, client_for(sb) as client:
        tracemalloc.start()
        try:
            with pytest.raises(CheckpointError, match="not empty"):
                await sync_chats(client, since=SINCE, state=tmp_path / "state.json", sink=log)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert sb.stats.requests_total == 0
    assert peak < 4 * 1024 * 1024


def test_disk_full_names_the_file_and_says_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while the output is synced ended with "Error: No space left on device":
    the file is named and --resume advised; the resume then completes the exact set."""
    out = tmp_path / "chats.csv"
    part = Path(str(out) + ".part")
    real_fsync = os.fsync
    synced: list[int] = []

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(part):
            synced.append(fd)
            if len(synced) >= 4:  # the header and two slices made it to disk
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    args = ["export", "--since", SINCE, "--until", UNTIL, "-o", str(out)]
    args += ["--concurrency", "2", "--slice-pages", "5"]
    with ThreadedSandbox(chats=2000, seed=78) as sb:
        with monkeypatch.context() as m:
            m.setattr(os, "fsync", fsync)
            full = invoke(args, creds(sb))
        done = invoke([*args, "--resume"], creds(sb))
        data = list(sb.data)
    assert full.exit_code == 1, full.output
    assert "No space left on device" in full.stderr and str(part) in full.stderr
    assert "--resume" in full.stderr and "Traceback" not in full.stderr
    assert done.exit_code == 0, done.output
    assert_exact([r["chat_id"] for r in read_csv(out)], data)
