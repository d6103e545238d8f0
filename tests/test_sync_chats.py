"""Incremental sync (`sync_chats`, `imichat-async sync`): a change log kept current (sandbox)."""

from __future__ import annotations

import asyncio
import csv
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import imichat_async as imi
from imichat_async._retry import RetryPolicy
from imichat_async.cli import main
from imichat_async.export import (
    CheckpointError,
    SyncState,
    _plan,
    check_sync_arguments,
    state_from_json,
    state_to_json,
    sync_chats,
)
from imichat_async.export._syncplan import (
    SyncRun,
    VersionRange,
    admit,
    begin_run,
    check_user_filters,
    family_plans,
    finish_run,
    lag_us,
    plan_windows,
    prune,
)
from imichat_async.sandbox import Churn, Faults, Sandbox, serve

from .sandbox_thread import ThreadedSandbox, env_for
from .test_export import _run_until

UTC = timezone.utc
SINCE = "2024-03-01"
S = 1_000_000  # microseconds per second


# -- the sandbox's own change log, and the checks every settled log must pass -------------------


class Versions:
    """Every version the sandbox served: its initial chats and each change `churn` made."""

    def __init__(self, sb: Sandbox) -> None:
        self.known: dict[tuple[str, str], dict[str, Any]] = {
            (c["chat_id"], c["updated_at"]): c for c in sb.data
        }
        inner = sb.churn

        def churn(updates: int = 0, inserts: int = 0) -> Churn:
            made = inner(updates, inserts)
            for c in [*made.updated, *made.inserted]:
                self.known[(c["chat_id"], c["updated_at"])] = c
            return made

        sb.churn = churn  # type: ignore[method-assign]  # the knobs call it too


def read_log(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def assert_log_settled(log: list[dict[str, Any]], sb: Sandbox, versions: Versions) -> None:
    """Each version once, each one the sandbox served, the newest of each chat its current
    record, and every chat created since SINCE present."""
    pairs = [(r["chat_id"], r["updated_at"]) for r in log]
    assert len(set(pairs)) == len(pairs), "a version appended twice"
    unknown = [p for p, r in zip(pairs, log, strict=True) if versions.known.get(p) != r]
    assert unknown == [], f"versions the sandbox never served: {unknown[:3]}"
    newest: dict[str, dict[str, Any]] = {}
    for r in log:  # by instant: as text, "…:11Z" sorts after "…:11.001Z"
        old = newest.get(r["chat_id"])
        if old is None or _at(r) > _at(old):
            newest[r["chat_id"]] = r
    records = sb.current_records()
    current = {k: records[k] for k in in_scope(list(records.values()))}
    assert newest.keys() == current.keys()
    stale = [k for k in current if newest[k] != current[k]]
    assert stale == [], f"{len(stale)} chats not current in the log"


def _at(record: dict[str, Any]) -> int:
    return _plan.to_us("updated_at", record["updated_at"])


def in_scope(chats: list[dict[str, Any]]) -> set[str]:
    """The ids of these chats created since SINCE (the sync's scope)."""
    floor = _plan.to_us("since", SINCE)
    return {c["chat_id"] for c in chats if _plan.to_us("c", c["created_at"]) >= floor}


class FakeClock:
    """One wall clock for the sandbox's changes and the sync's T1 (no sleeps)."""

    def __init__(self) -> None:
        self.now = float(int(time.time())) + 0.0004  # off the millisecond: T1 has microseconds

    def __call__(self) -> float:
        return self.now

    def dt(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(_plan, "utcnow", fake.dt)
    return fake


def client_for(sb: Sandbox, **kwargs: Any) -> imi.ImiChatClient:
    kwargs.setdefault("retry_policy", RetryPolicy.testing(max_retries=5))
    kwargs.setdefault("max_retries", 5)
    return imi.ImiChatClient(base_url=sb.base_url, token=sb.token, team_id=sb.team_id, **kwargs)


# -- against the sandbox ---------------------------------------------------------------------


@pytest.mark.parametrize("total_header", [True, False])
async def test_runs_with_changes_between_and_during_runs_keep_the_log_exact(
    tmp_path: Path, clock: FakeClock, total_header: bool
) -> None:
    """Busy chats change between and during runs: once settled, the log is exact."""
    log, state = tmp_path / "chats.log.ndjson", tmp_path / "state.json"
    faults = Faults(churn_every=4, churn_updates=3, churn_inserts=1)
    async with serve(
        chats=400, seed=5, total_header=total_header, faults=faults, wall_clock=clock
    ) as sb:
        versions = Versions(sb)
        args: dict[str, Any] = {"since": SINCE, "state": state, "sink": log}
        skipped = 0
        async with client_for(sb, concurrency=4) as client:
            for _ in range(3):
                report = await sync_chats(client, **args)
                skipped += report.skipped
                clock.now += 60  # within the lag: the next run re-reads part of this one
                sb.churn(updates=25, inserts=4)
                clock.now += 1
            sb.faults.churn_every = None  # settle: one more run with nothing changing
            clock.now += 1
            report = await sync_chats(client, **args)
        assert report.runs == 4 and not report.resumed
        assert skipped > 0, "the lag window re-read versions the log held"
        assert report.verified is total_header
        assert_log_settled(read_log(log), sb, versions)
        assert sb.stats.updated > 80  # the busy chats changed again and again


async def test_the_log_holds_each_version_as_the_bytes_the_server_sent(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Each line the sync appends is the record's JSON text byte for byte as the server
    sent it (spaced, UTF-8 characters as they are), across runs and changes."""
    log, state = tmp_path / "log.ndjson", tmp_path / "state.json"
    async with serve(chats=300, seed=4, wall_clock=clock, json_style="spaced") as sb:
        for chat in sb.data[::5]:  # before the first request: no body is cached yet
            chat["other_details"] = {"note": 'caf\u00e9 \u2713 \U0001f600 "q" \\ \n'}
        versions = Versions(sb)
        args: dict[str, Any] = {"since": SINCE, "state": state, "sink": log}
        async with client_for(sb) as client:
            await sync_chats(client, **args)
            sb.churn(updates=20, inserts=3)
            clock.now += 60
            await sync_chats(client, **args)
    lines = log.read_bytes().split(b"\n")
    assert lines.pop() == b""
    sent = {json.dumps(c, ensure_ascii=False).encode() for c in versions.known.values()}
    assert len(lines) > 200 and set(lines) <= sent


async def test_a_run_with_nothing_changed_appends_nothing_in_three_requests(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Nothing changed since the lag window: nothing appended; one request reads the server's
    clock, one per query family."""
    log, state = tmp_path / "log.ndjson", tmp_path / "state.json"
    async with serve(chats=500, seed=2, wall_clock=clock) as sb:
        args: dict[str, Any] = {"since": SINCE, "state": state, "sink": log, "lag": 300}
        async with client_for(sb) as client:
            await sync_chats(client, **args)
            made = sb.churn(updates=10, inserts=3)
            clock.now += 3600
            changed = await sync_chats(client, **args)
            size = log.stat().st_size
            clock.now += 3600
            before = sb.stats.requests_total
            idle = await sync_chats(client, **args)
    # a chat updated twice in a row shows its last version only: one version per chat changed
    assert changed.appended == len(in_scope([*made.updated, *made.inserted]))
    assert idle.appended == 0 and log.stat().st_size == size
    assert idle.requests == 3 == sb.stats.requests_total - before
    assert idle.pages_past_end == 0


async def test_a_later_run_costs_about_the_pages_of_what_changed(
    tmp_path: Path, clock: FakeClock
) -> None:
    """20 changes spread over an hour cost a few dozen requests, not a full read."""
    log, state = tmp_path / "log.ndjson", tmp_path / "state.json"
    async with serve(chats=2000, seed=8, wall_clock=clock) as sb:
        args: dict[str, Any] = {"since": SINCE, "state": state, "sink": log}
        async with client_for(sb) as client:
            full = await sync_chats(client, **args)
            changed: set[str] = set()
            for _ in range(20):
                clock.now += 180
                changed |= in_scope(sb.churn(updates=1).updated)
            clock.now += 600
            later = await sync_chats(client, **args)
    assert later.appended == len(changed) and later.skipped == 0
    assert later.requests <= 40 < full.requests / 5


async def test_csv_log_gets_one_header_and_one_row_per_version(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A CSV log: the header once, then a row per appended version, across runs."""
    log, state = tmp_path / "chats.log.csv", tmp_path / "state.json"
    async with serve(chats=300, seed=4, wall_clock=clock) as sb, client_for(sb) as client:
        first = await sync_chats(client, since=SINCE, state=state, sink=log)
        sb.churn(updates=5, inserts=2)
        clock.now += 30
        second = await sync_chats(client, since=SINCE, state=state, sink=log)
    rows = list(csv.reader(log.read_text(encoding="utf-8").splitlines()))
    assert rows[0][0] == "chat_id" and sum(r[0] == "chat_id" for r in rows) == 1
    assert len(rows) - 1 == first.appended + second.appended
    assert second.appended == 7


async def test_state_for_other_arguments_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    """A state made with other since, filters or output is refused, naming what differs."""
    log, state = tmp_path / "log.ndjson", tmp_path / "state.json"
    async with serve(chats=100, seed=1, wall_clock=clock) as sb, client_for(sb) as client:
        await sync_chats(client, since=SINCE, state=state, sink=log)
        with pytest.raises(CheckpointError, match="since=2024-03-01T00:00:00Z in the state"):
            await sync_chats(client, since="2024-04-01", state=state, sink=log)
        with pytest.raises(CheckpointError, match=r"filters=\[\] in the state"):
            await sync_chats(client, since=SINCE, state=state, sink=log, status="closed")
        with pytest.raises(CheckpointError, match=r"sink=.* in the state"):
            await sync_chats(client, since=SINCE, state=state, sink=tmp_path / "l.csv")
        with pytest.raises(CheckpointError, match="not empty"):
            await sync_chats(client, since=SINCE, state=tmp_path / "new.json", sink=log)


async def test_time_filters_and_bad_lag_refused_before_any_request(tmp_path: Path) -> None:
    """Filters on created_at/updated_at (the sync's own) and a negative lag: refused, named."""
    async with serve(chats=10) as sb, client_for(sb) as client:
        args: dict[str, Any] = {"since": SINCE, "state": tmp_path / "s", "sink": tmp_path / "l"}
        with pytest.raises(imi.InvalidQueryError, match="updated_at__gte"):
            await sync_chats(client, updated_at__gte="2024-05-01", **args)
        with pytest.raises(imi.InvalidQueryError, match="'created_at'"):
            await sync_chats(client, filters=[("created_at", "eq", "2024-05-01")], **args)
        with pytest.raises(imi.InvalidQueryError, match="lag"):
            await sync_chats(client, lag=-1, **args)
        assert sb.stats.requests_total == 0


async def test_an_in_memory_state_is_updated_in_place(clock: FakeClock) -> None:
    """A `SyncState` object (for a dlt resource) is carried from run to run by the caller."""
    got: list[dict[str, Any]] = []

    async def collect(chat: Any) -> None:
        got.append(chat)

    state = SyncState()
    async with serve(chats=200, seed=6, wall_clock=clock) as sb, client_for(sb) as client:
        await sync_chats(client, since=SINCE, state=state, sink=collect)
        assert state.runs == 1 and state.bound is not None and state.run is None
        made = sb.churn(updates=4)
        clock.now += 10
        report = await sync_chats(client, since=SINCE, state=state, sink=collect)
    assert report.appended == len(in_scope(made.updated)) and state.runs == 2
    assert len({(c["chat_id"], c["updated_at"]) for c in got}) == len(got)


def test_cli_refuses_time_filters_and_a_mismatched_state(tmp_path: Path) -> None:
    """`sync --filter updated_at__gt=...` and a state of another since: exit 2, named."""
    with ThreadedSandbox(chats=50, seed=3) as sb:
        env = env_for(sb)
        base = ["sync", "--state", str(tmp_path / "s.json"), "-o", str(tmp_path / "l.ndjson")]
        runner = CliRunner()
        bad = runner.invoke(
            main, [*base, "--since", SINCE, "-f", "updated_at__gt=2024-05-01"], env=env
        )
        assert bad.exit_code == 2 and "updated_at__gt" in bad.output
        ok = runner.invoke(main, ["--quiet", *base, "--since", SINCE], env=env)
        assert ok.exit_code == 0, ok.output
        other = runner.invoke(main, [*base, "--since", "2024-04-01"], env=env)
        assert other.exit_code == 2 and "--since 2024-03-01T00:00:00Z in the state" in other.output


# -- kill -9 -----------------------------------------------------------------------------------


def _state(path: Path) -> dict[str, Any] | None:
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
        return raw
    except (OSError, ValueError):
        return None


def _on_loop(box: ThreadedSandbox, fn: Callable[[], Any]) -> Any:
    """Call `fn` on the sandbox's own loop (its data is not shared across threads)."""
    assert box._loop is not None

    async def call() -> Any:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), box._loop).result(30)


@pytest.mark.slow
def test_runs_killed_with_sigkill_finish_on_rerun(tmp_path: Path) -> None:
    """CLI runs SIGKILLed at random moments, data changing all along: re-run, the log is exact
    and B advances only when a run completes."""
    rng = random.Random("sync-kill")
    log, state = tmp_path / "chats.log.ndjson", tmp_path / "state.json"
    argv = [sys.executable, "-m", "imichat_async.cli", "sync", "--quiet", "--since", SINCE]
    argv += ["--state", str(state), "-o", str(log), "--concurrency", "2"]
    faults = Faults(latency=0.003, churn_every=6, churn_updates=2, churn_inserts=1)
    box = ThreadedSandbox(chats=1200, seed=11, faults=faults)
    kills = completed = 0
    with box as sb:
        versions = _on_loop(box, lambda: Versions(sb))
        env = env_for(sb)
        for _ in range(5):
            before = _state(state)
            delay = rng.uniform(0.05, 0.8)

            def due(t: float, _: Any, d: float = delay) -> bool:
                return t >= d

            code = _run_until(argv, env, state, due)
            after = _state(state)
            assert after is not None or before is None
            if code == -signal.SIGKILL:
                kills += 1
                if after is not None and after["run"] is not None:  # unfinished: B unchanged
                    assert after["bound"] == (before["bound"] if before else None)
            else:
                assert code == 0
                completed += 1
                assert after is not None and after["run"] is None
            _on_loop(box, lambda: sb.churn(updates=15, inserts=2))
        sb.faults.churn_every = None
        for _ in range(2):  # finish what was interrupted, then settle
            final = subprocess.run(argv, env=env, capture_output=True, timeout=120, check=False)
            assert final.returncode == 0, final.stderr.decode()
        log_records = read_log(log)
        _on_loop(box, lambda: assert_log_settled(log_records, sb, versions))
    assert kills >= 3, "most kills should land before the run ends"
    last = _state(state)
    assert last is not None and last["run"] is None and last["runs"] >= 2


# -- the pure plan -------------------------------------------------------------------------------


def test_first_run_window_is_since_to_its_start() -> None:
    """The first run reads created_at in [since, T1) alone and remembers versions >= T1 - lag."""
    state = SyncState()
    run = begin_run(state, since=100 * S, lag=300 * S, now=10_000 * S)
    w = plan_windows(run, since=100 * S, lag=300 * S, first=True)
    assert (w.created, w.updated) == ((100 * S, 10_000 * S), None)
    assert w.remember_from == w.keep_from == 9_700 * S


def test_later_run_windows_start_lag_before_the_last_start() -> None:
    """A later run reads both families from B - lag to T1 (created_at never before since)."""
    state = SyncState(bound=10_000 * S)
    run = begin_run(state, since=100 * S, lag=300 * S, now=20_000 * S)
    w = plan_windows(run, since=100 * S, lag=300 * S, first=False)
    assert w.created == w.updated == (9_700 * S, 20_000 * S)
    assert (w.remember_from, w.keep_from) == (9_700 * S, 19_700 * S)
    near = plan_windows(SyncRun(t1=400 * S, lo=50 * S), since=100 * S, lag=300 * S, first=False)
    assert near.created == (100 * S, 400 * S) and near.updated == (50 * S, 400 * S)


def test_clock_stepped_back_never_moves_t1_below_b() -> None:
    """A start earlier than B (the clock stepped back) reads up to B; since after it is refused."""
    run = begin_run(SyncState(bound=5_000 * S), since=0, lag=0, now=4_000 * S)
    assert run.t1 == 5_000 * S
    with pytest.raises(imi.InvalidQueryError, match="since"):
        begin_run(SyncState(), since=5_000 * S, lag=0, now=4_000 * S)


def test_family_queries_bound_their_own_field_and_keep_the_user_filters() -> None:
    """Created family: created_at bounds; updated: updated_at bounds and created_at >= since."""
    user = _plan.UserQuery((), {"status": "closed"})
    w = plan_windows(SyncRun(t1=2_000 * S, lo=1_000 * S), since=10 * S, lag=0, first=False)
    (n1, created), (n2, updated) = family_plans(user, 10 * S, w)
    assert (n1, n2) == ("created", "updated")
    s = _plan.Slice(1_000 * S, 2_000 * S)
    got = [(f.param, f.operator) for f in updated.search_args(s)["filters"]]
    assert got == [("created_at", "gte"), ("updated_at", "gte"), ("updated_at", "lt")]
    assert updated.search_args(s)["status"] == "closed"
    assert [f.param for f in created.search_args(s)["filters"]] == ["created_at", "created_at"]


def test_versions_key_by_chat_and_update_time() -> None:
    """Two versions of one chat are two keys; the same version twice is one."""
    plan = VersionRange(_plan.UserQuery(), 0, 1)
    a = {"chat_id": "c", "updated_at": "2024-05-01T00:00:00Z"}
    b = {"chat_id": "c", "updated_at": "2024-05-01T00:00:00.001Z"}
    same = {"chat_id": "c", "updated_at": "2024-05-01T00:00:00.000Z"}
    assert plan.key(a) != plan.key(b) and plan.key(a) == plan.key(same)
    assert plan.key({"updated_at": "2024-05-01T00:00:00Z"}) is None  # no chat_id


def test_a_record_without_updated_at_is_keyed_by_its_content() -> None:
    """No usable updated_at: the same content (in any key order) is one version, other
    content another; it is remembered with the run's T1 and pruned like the others."""
    plan = VersionRange(_plan.UserQuery(), 0, 1)
    a = {"chat_id": "c", "status": "open", "updated_at": None}
    assert plan.key(a) == plan.key(dict(reversed(a.items())))
    assert plan.key(a) != plan.key({**a, "status": "closed"})
    assert plan.key(a) != plan.key({"chat_id": "c", "status": "open"})  # missing, not null
    assert plan.key({**a, "updated_at": "soon"}) not in (None, plan.key(a))
    undated: dict[tuple[str, str], int] = {}
    out, skipped = admit([a, dict(a), {"status": "x"}], set(), 0, undated, t1=7 * S)
    assert (len(out), skipped) == (2, 1) and list(undated.values()) == [7 * S]
    state = SyncState(run=SyncRun(t1=1_000 * S, lo=0))
    state.undated = [("old", "d1", 600 * S), ("new", "d2", 800 * S)]
    finish_run(state, lag=300 * S)
    assert state.undated == [("new", "d2", 800 * S)]


def test_admit_skips_known_versions_and_remembers_recent_ones() -> None:
    """Known versions are skipped; new ones at or after the floor are remembered, older not."""
    seen = {("a", 5 * S)}
    recs = [
        {"chat_id": "a", "updated_at": "1970-01-01T00:00:05Z"},
        {"chat_id": "b", "updated_at": "1970-01-01T00:00:09Z"},
        {"chat_id": "c", "updated_at": "1970-01-01T00:00:01Z"},
    ]
    out, skipped = admit(recs, seen, remember_from=2 * S)
    assert [r["chat_id"] for r in out] == ["b", "c"] and skipped == 1
    assert seen == {("a", 5 * S), ("b", 9 * S)}


def test_finishing_a_run_advances_b_and_prunes_the_state() -> None:
    """On completion B = T1 and only versions >= T1 - lag stay in the state."""
    state = SyncState(run=SyncRun(t1=1_000 * S, lo=0, appended=3))
    state.recent = [("old", 600 * S), ("edge", 700 * S), ("new", 990 * S)]
    finish_run(state, lag=300 * S)
    assert state.bound == 1_000 * S and state.run is None and state.runs == 1
    assert state.recent == [("edge", 700 * S), ("new", 990 * S)] and state.appended == 3
    assert prune([("x", 1), ("y", 2)], 2) == [("y", 2)]


def test_user_filters_on_time_and_bad_lags_are_refused() -> None:
    """check_user_filters names a time filter; lag_us refuses negatives and non-numbers."""
    check_user_filters(_plan.UserQuery((), {"status": "closed"}))
    with pytest.raises(imi.InvalidQueryError, match="created_at__lt"):
        check_user_filters(_plan.UserQuery((), {"created_at__lt": "2024-01-01"}))
    assert lag_us(1.5) == 1_500_000
    for bad in (-1, "5", True, float("nan")):
        with pytest.raises(imi.InvalidQueryError, match="lag"):
            lag_us(bad)


# -- issue 23: null updated_at, the server's clock, a log written by another, a failed start ---


async def test_a_chat_without_updated_at_is_appended_once_until_it_gains_one(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A chat served with updated_at null (or missing) and read again by every run (created
    within the lag) is appended once; when it gains an updated_at, that is a new version."""
    log, state = tmp_path / "log.ndjson", tmp_path / "state.json"
    async with serve(chats=50, seed=3, wall_clock=clock) as sb, client_for(sb) as client:
        args: dict[str, Any] = {"since": SINCE, "state": state, "sink": log}
        null_id, missing_id = (c["chat_id"] for c in sb.churn(inserts=2).inserted)
        sb.drop_updated_at(null_id)
        sb.drop_updated_at(missing_id, missing=True)
        clock.now += 5
        for _ in range(3):  # every run's created_at window holds both chats
            await sync_chats(client, **args)
            clock.now += 10
        stamped = sb.update_chat(null_id)
        clock.now += 10
        gained = await sync_chats(client, **args)
        clock.now += 10
        idle = await sync_chats(client, **args)
    quirky = [r for r in read_log(log) if r["chat_id"] in (null_id, missing_id)]
    got = sorted((r["chat_id"], str(r.get("updated_at", "-"))) for r in quirky)
    assert got == sorted([(null_id, "None"), (missing_id, "-"), (null_id, stamped["updated_at"])])
    assert (gained.appended, idle.appended) == (1, 0)


def _log_lines(path: Path) -> int:
    return len(path.read_bytes().splitlines())


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


async def test_a_client_clock_ahead_of_the_server_loses_no_chat(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's clock an hour behind ours (more than the lag): T1 is the server's, so
    the chats it changes after a run are read by the next; the skew is reported and logged."""
    log, state = tmp_path / "log.ndjson", tmp_path / "state.json"
    caplog.set_level("INFO", logger="imichat_async")
    async with (
        serve(chats=300, seed=7, wall_clock=clock, clock_offset=-3600) as sb,
        client_for(sb) as client,
    ):
        versions = Versions(sb)
        args: dict[str, Any] = {"since": SINCE, "state": state, "sink": log}
        first = await sync_chats(client, **args)
        clock.now += 30
        made = sb.churn(updates=6, inserts=2)
        clock.now += 30
        later = await sync_chats(client, **args)
        assert_log_settled(read_log(log), sb, versions)
    assert later.appended == len(in_scope([*made.updated, *made.inserted])) > 0
    server_now = int(clock.now - 3600)
    assert later.until == datetime.fromtimestamp(server_now, UTC)  # rounded down to the second
    for report in (first, later):
        assert report.clock_skew is not None and -3601 <= report.clock_skew <= -3599
        assert "clock_skew=-3600s" in report.summary()
    assert any("-3600" in r.getMessage() and "clock" in r.getMessage() for r in caplog.records)


async def test_without_a_usable_date_the_sync_falls_back_to_the_client_clock(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A server whose Date cannot be read: T1 is the client's clock, and a note says so."""
    async with (
        serve(chats=40, seed=2, wall_clock=clock, date_header=False) as sb,
        client_for(sb) as client,
    ):
        report = await sync_chats(client, since=SINCE, state=SyncState(), sink=tmp_path / "l")
    assert report.until == clock.dt() and report.clock_skew is None
    assert any("Date" in note and "this machine's clock" in note for note in report.notes)
    assert "clock_skew=n/a" in report.summary()


def test_cli_summary_reports_the_measured_skew(tmp_path: Path) -> None:
    """`imichat-async sync` against a server 2 hours ahead: the summary shows the skew."""
    with ThreadedSandbox(chats=30, seed=3, clock_offset=7200) as sb:
        argv = ["sync", "--since", SINCE, "--state", str(tmp_path / "s.json")]
        result = CliRunner().invoke(
            main, [*argv, "-o", str(tmp_path / "l.ndjson")], env=env_for(sb)
        )
    assert result.exit_code == 0, result.output
    assert "clock_skew=+7200s" in result.output or "clock_skew=+7199s" in result.output


async def test_bytes_after_a_completed_run_are_refused_not_truncated(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A line someone appended to LOG after a completed run: the next run refuses, naming the
    file and both lengths, and LOG keeps it."""
    log, state = tmp_path / "log.ndjson", tmp_path / "state.json"
    async with serve(chats=120, seed=4, wall_clock=clock) as sb, client_for(sb) as client:
        args: dict[str, Any] = {"since": SINCE, "state": state, "sink": log}
        await sync_chats(client, **args)
        committed = log.stat().st_size
        _append(log, b'{"chat_id":"written-by-someone-else"}\n')
        grown = log.stat().st_size
        clock.now += 10
        before = sb.stats.requests_total
        with pytest.raises(CheckpointError) as info:
            await sync_chats(client, **args)
        assert sb.stats.requests_total == before
    message = str(info.value)
    assert str(log) in message and str(committed) in message and str(grown) in message
    assert log.stat().st_size == grown and b"written-by-someone-else" in log.read_bytes()


async def test_bytes_of_an_interrupted_run_are_still_truncated(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Bytes past the committed length of a run in progress (a crash) are dropped on resume."""
    log, state = tmp_path / "log.ndjson", tmp_path / "state.json"
    async with serve(chats=120, seed=4, wall_clock=clock) as sb, client_for(sb) as client:
        args: dict[str, Any] = {"since": SINCE, "state": state, "sink": log}
        await sync_chats(client, **args)
        size = log.stat().st_size
        raw = json.loads(state.read_text())
        raw["run"] = {"t1": raw["bound"] + 10 * S, "lo": raw["bound"] - 300 * S}  # interrupted
        state.write_text(json.dumps(raw))
        _append(log, b'{"chat_id":"torn')  # what the crashed run wrote after its last leaf
        report = await sync_chats(client, **args)
    assert report.resumed and report.appended == 0
    assert log.stat().st_size == size


def test_cli_refuses_a_log_grown_after_a_completed_run(tmp_path: Path) -> None:
    """CLI: a line appended by hand after a completed run is refused (exit 2), left as it is."""
    log = tmp_path / "l.ndjson"
    with ThreadedSandbox(chats=60, seed=5) as sb:
        argv = ["--quiet", "sync", "--since", SINCE, "--state", str(tmp_path / "s.json")]
        argv += ["-o", str(log)]
        runner = CliRunner()
        assert runner.invoke(main, argv, env=env_for(sb)).exit_code == 0
        lines = _log_lines(log)
        _append(log, b'{"chat_id":"by-hand"}\n')
        again = runner.invoke(main, argv, env=env_for(sb))
    assert again.exit_code == 2, again.output
    assert str(log) in again.output and "completed" in again.output
    assert _log_lines(log) == lines + 1


def test_cli_a_first_run_with_a_bad_token_leaves_nothing(tmp_path: Path) -> None:
    """Exit 3 on a refused token leaves no state and no log: a corrected --since then runs."""
    log, state = tmp_path / "l.ndjson", tmp_path / "s.json"
    with ThreadedSandbox(chats=60, seed=5) as sb:
        argv = ["--quiet", "sync", "--state", str(state), "-o", str(log)]
        runner = CliRunner()
        bad = runner.invoke(main, [*argv, "--since", "2021-01-01"], env=env_for(sb, "bad"))
        assert bad.exit_code == 3, bad.output
        assert not state.exists() and not log.exists()
        fixed = runner.invoke(main, [*argv, "--since", SINCE], env=env_for(sb))
    assert fixed.exit_code == 0, fixed.output
    assert state.exists() and _log_lines(log) > 0


async def test_a_first_run_failing_midway_with_nothing_written_leaves_nothing(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A first run whose token expires before any chat is written (a static token cannot be
    refreshed): no state, no log, so other arguments work next."""
    log, state = tmp_path / "log.ndjson", tmp_path / "state.json"
    async with serve(chats=80, seed=6, wall_clock=clock, token_max_uses=1) as sb:
        async with client_for(sb) as client:
            with pytest.raises(imi.TokenExpiredError):
                await sync_chats(client, since=SINCE, state=state, sink=log)
        assert sb.stats.requests_total >= 2  # it failed after its first request
        assert not state.exists() and not log.exists()
        memory = SyncState()
        fresh = sb._issue()
        async with imi.ImiChatClient(
            base_url=sb.base_url, token=fresh, team_id=sb.team_id
        ) as client:
            with pytest.raises(imi.TokenExpiredError):
                await sync_chats(client, since=SINCE, state=memory, sink=log)
        assert memory == SyncState() and not log.exists()


async def test_sandbox_clock_offset_moves_its_date_header_and_its_stamps() -> None:
    """`clock_offset`: the Date header and the times of chats changed now, both shifted."""
    now = 1_800_000_000.25
    async with serve(chats=5, seed=1, wall_clock=lambda: now, clock_offset=-90) as sb:
        async with client_for(sb) as client:
            async for _ in client.search_pages(max_pages=1):
                pass
            assert client.server_date == datetime.fromtimestamp(1_800_000_000 - 90, UTC)
        made = sb.churn(inserts=1).inserted[0]
    assert _plan.to_us("c", made["created_at"]) == (1_800_000_000 - 90) * S + 250_000


def test_cli_a_first_run_out_of_retries_says_nothing_was_written(tmp_path: Path) -> None:
    """Every request failing (exit 4): no state is left, and the message does not claim one."""
    log, state = tmp_path / "l.ndjson", tmp_path / "s.json"
    with ThreadedSandbox(chats=20, seed=5, p_429=1.0, retry_after=0) as sb:
        argv = ["--quiet", "sync", "--since", SINCE, "--state", str(state), "-o", str(log)]
        result = CliRunner().invoke(main, argv, env=env_for(sb))
    assert result.exit_code == 4, result.output
    assert "nothing was written" in result.output and "state saved" not in result.output
    assert not state.exists() and not log.exists()


def test_sync_arguments_are_checked_without_a_client() -> None:
    """`check_sync_arguments` refuses what `sync_chats` would, with no client (issue #25)."""
    check_sync_arguments(since="2024-01-01", lag=0, status="closed")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"since": "2024-01-01", "created_at__gte": "2024-02-01"}, "created_at__gte"),
        ({"since": "someday"}, "since"),
        ({"since": "2024-01-01", "lag": -1}, "lag"),
        ({"since": "2024-01-01", "filters": [("stauts", "eq", "x")]}, "stauts"),
    ]
    for bad, match in cases:
        with pytest.raises(imi.InvalidQueryError, match=match):
            check_sync_arguments(**bad)


def test_state_to_json_is_plain_json_read_back_by_state_from_json() -> None:
    """A state's JSON form survives `json.dumps` and comes back equal (issue #25)."""
    state = SyncState()
    raw = state_to_json(state)
    assert state_from_json(json.loads(json.dumps(raw))) == state
