"""The fleet's shared send rate (`rate_store=`, `_ratestore.py`) against a real redis-server.

In-process tests use the in-process sandbox; the fleet tests run each worker as
its own process (`benchmarks/fleet_worker.py`) against the sandbox in its own process
(`benchmarks.sandbox_proc`), with its rate limit (a token bucket; over it, 429 with
`Retry-After: 1`) and one real Redis. They assert counts: exact results, the
share of requests answered 429, pages done by each worker while all ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.fleet_worker import Worker
from benchmarks.redis_proc import RedisServer, free_port
from benchmarks.sandbox_proc import SandboxProcess
from imichat_async import ConfigurationError, ImiChatClient
from imichat_async import _ratestore as ratestore
from imichat_async._rate import curve_shape
from imichat_async._ratescripts import THROTTLE
from imichat_async._ratestore import FleetRate, RedisRateStore
from imichat_async.sandbox import Sandbox, serve

from .helpers import assert_no_stray_tasks, started
from .sandbox_thread import ThreadedSandbox, env_for


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = started(RedisServer())
    try:
        yield server
    finally:
        server.close()


# The store's timeout where falling back is not what a test is about: a process's first
# call to Redis takes 20-30 ms (redis-py's setup), and on a loaded 2-core machine three
# clients' first calls passed the default 0.25 s together (1 run in 60): each fell back
# to its own rate, as it should, and the fleet's rate test saw 3 x R.
PATIENT = 2.0

# Latency for a search that must outlast its client's first lease (a few ms): a search of
# a few pages with none ends first, and its close() cancels the lease before it reached
# Redis (the tests that look for the tenant's key then found none, 1 run in 10).
SLOW = 0.05


@contextlib.asynccontextmanager
async def tenant(**knobs: Any) -> AsyncIterator[Sandbox]:
    async with serve(chats=knobs.pop("chats", 300), seed=3, **knobs) as sb:
        yield sb


def client_for(sb: Sandbox, store: Any, **kw: Any) -> ImiChatClient:
    return ImiChatClient(
        base_url=sb.base_url,
        token=sb.token,
        team_id=sb.team_id,
        rate_store=store,
        max_retries=100,
        **kw,
    )


async def read_all(client: ImiChatClient) -> list[str]:
    return [chat.chat_id async for chat in client.search_chats()]


# -- configuration (no redis-server needed) -------------------------------------------------


def test_rate_store_takes_redis_urls_only() -> None:
    """Anything but None, a redis:// or rediss:// URL, or a RedisRateStore is refused."""
    for bad in ("http://127.0.0.1:6379", "127.0.0.1:6379", 6379):
        with pytest.raises(ConfigurationError, match="rate_store"):
            ImiChatClient(
                base_url="http://127.0.0.1:1", token="t", team_id="x", adaptive=True,
                rate_store=bad,  # type: ignore[arg-type]
            )  # fmt: skip
    assert isinstance(RedisRateStore("rediss://h:6380/1"), RedisRateStore)


def test_rate_store_needs_a_rate_to_share() -> None:
    """Neither adaptive=True nor rate_limit: nothing to share, refused rather than ignored."""
    for adaptive in (False, "concurrency"):
        with pytest.raises(ConfigurationError, match="shares a send rate"):
            ImiChatClient(
                base_url="http://127.0.0.1:1", token="t", team_id="x",
                adaptive=adaptive, rate_store="redis://127.0.0.1:1/0",
            )  # fmt: skip


def test_missing_redis_py_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)  # import fails: not installed
    with pytest.raises(ConfigurationError, match=r"imichat-async\[redis\]"):
        RedisRateStore("redis://127.0.0.1:6379/0")


def test_key_is_host_port_and_team_never_the_token() -> None:
    store = RedisRateStore("redis://:secret@127.0.0.1:6379/0", prefix="app1")
    assert store.key("https://API.example.com/v1", "team-9") == "app1:api.example.com:443:team-9"
    assert store.key("http://127.0.0.1:8080", "t") == "app1:127.0.0.1:8080:t"
    assert "secret" not in repr(store)


# -- one process, real Redis -----------------------------------------------------------------


async def test_fixed_rate_limit_is_the_fleets(redis_url: str) -> None:
    """rate_limit=R with a shared store: R for all clients together, not R each.

    Three clients at 20/s each against a tenant limited to 20/s (burst 5): with
    the store, (almost) nothing is refused; each in-process would send 60/s.
    """
    async with tenant(chats=150, latency=0.01, rate_limit=20.0, rate_burst=5) as sb:
        store = RedisRateStore(redis_url, prefix="fixed", timeout=PATIENT)
        clients = [client_for(sb, store, rate_limit=20.0, concurrency=8) for _ in range(3)]
        try:
            results = await asyncio.gather(*(read_all(c) for c in clients))
        finally:
            for c in clients:
                await c.close()
        expected = [str(r["chat_id"]) for r in sb.expected()]
        assert all(r == expected for r in results)
        assert sb.stats.rate_limited <= 3, sb.stats.rate_limited  # vs ~2/3 of 45+ requests
        await assert_no_stray_tasks()


async def test_before_any_throttle_a_fleet_grows_past_one_clients_concurrency(
    redis_url: str,
) -> None:
    """No limit at all: the store holds no member back, each has its own requests in
    flight (the fleet is not held to one client's concurrency), and each closes (this
    one hung in close() 2 runs in 6 while a lost cancellation kept the store task on)."""
    async with tenant(chats=400, latency=0.02) as sb:
        store = RedisRateStore(redis_url, prefix="nolimit", timeout=PATIENT)
        clients = [client_for(sb, store, adaptive=True, concurrency=4) for _ in range(3)]
        try:
            results = await asyncio.gather(*(read_all(c) for c in clients))
        finally:
            for c in clients:
                await c.close()
    assert all(len(r) == 400 for r in results)
    assert [c.limiter.peak for c in clients] == [4, 4, 4]  # each, in the end, its own
    await assert_no_stray_tasks()


async def test_a_fleet_held_low_grows_with_the_answers_it_reports(redis_url: str) -> None:
    """Growth along the fleet's curve is capped at twice the rate the fleet accepts, and
    that counts the answers the lease proposing it reports. #20's Dask stall: the cap took
    the accepted rate from the member's lease before, which at a request a second reads
    near nothing, so a fleet at its last throttled rate (1/s there) never grew again."""
    import redis.asyncio

    store = RedisRateStore(redis_url, prefix="grow", timeout=PATIENT)
    key = store.key("http://127.0.0.1:1", "t")
    r = redis.asyncio.Redis.from_url(redis_url)
    try:
        sec, usec = await r.time()
        now = sec + usec / 1e6  # the fleet as a decrease left it 100 s ago: 1/s, its w_max
        await r.hset(
            key,
            mapping={"rate": 1.0, "epoch": 1, "w_max": 1.0, "k": 0.0, "c": 0.4, "t0": now - 100},
        )
    finally:
        await r.aclose()
    rate = FleetRate(store, key, adaptive=True)
    try:
        await rate._exchange()  # a lease with nothing to report
        assert rate.fleet.rate == 1.0
        rate.feedback(rate.sent(), throttled=False, ok=True)  # an answer
        await rate._exchange()  # the lease reporting it proposes the curve, far above 1/s
    finally:
        await rate.aclose()
    assert rate.fleet.rate > 1.0


async def _members(redis_url: str, prefix: str, n: int, window: int) -> list[FleetRate]:
    store = RedisRateStore(redis_url, prefix=prefix, timeout=PATIENT)
    key = store.key("http://127.0.0.1:1", "t")
    return [FleetRate(store, key, adaptive=True, window=window) for _ in range(n)]


async def _lease(rate: FleetRate) -> int:
    """One lease asking for slots (as the limiter would); the permits or slots it got."""
    held = len(rate._slots)
    rate._ask()
    await rate._exchange()
    return len(rate._slots) - held


def _answered(rate: FleetRate, n: int) -> None:
    for _ in range(n):
        rate.feedback(rate.sent(), throttled=False, ok=True)


async def test_before_any_throttle_a_fleet_starts_as_one_client_and_grows_per_answer(
    redis_url: str,
) -> None:
    """The slow start (issue #20: a fleet started together sent P x k at once, 8-11 % of
    its requests refused): three members with a window of 4 get 4 permits between them
    until answers come; each answer accepted adds 1.25 (4 + 1.25 x 4 = 9); once the
    window passes the fleet's concurrency (4 + 0.25 x 32 = 12 = 3 x 4), none is needed."""
    a, b, c = await _members(redis_url, "slow", 3, window=4)
    try:
        assert [await _lease(m) for m in (a, b, c)] == [4, 0, 0]
        assert a._gating and b._gating and c._gating
        a._slots.clear()  # sent
        _answered(a, 4)
        assert await _lease(a) == 4  # 8 of 9 granted: b gets the last one
        assert [await _lease(b), await _lease(c)] == [1, 0]
        _answered(a, 27)  # 31 answers: 4 + 0.25 x 31 < 12, still held
        await _lease(a)
        assert a._gating
        _answered(a, 1)
        await _lease(a)
        assert not a._gating and not a._slots  # the permits it held: void
        assert a.delay() == 0.0  # sends as it would alone (no rate in force)
        await _lease(b)
        assert not b._gating
    finally:
        for m in (a, b, c):
            await m.aclose()


async def test_a_lone_client_is_held_for_one_window_only(redis_url: str) -> None:
    """Alone, a client's first window is its concurrency: the slow start never holds it
    back, and after a window of answers it needs no permit (no store call per request)."""
    (a,) = await _members(redis_url, "alone", 1, window=4)
    try:
        assert await _lease(a) == 4
        a._slots.clear()
        _answered(a, 3)
        await _lease(a)
        assert a._gating
        _answered(a, 1)
        await _lease(a)
        assert not a._gating
    finally:
        await a.aclose()


async def test_grants_dropped_unsent_are_not_counted_as_accepted(redis_url: str) -> None:
    """A run of throttles measures the tenant's rate by the grants between two throttled
    ones: grants a member voided unsent (a decrease drops the slots leased ahead) are not
    requests the server accepted (counted, they made the fleet's measure 10-20 % high)."""
    (a,) = await _members(redis_url, "dropped", 1, window=4)
    key = a.key
    try:
        await a._exchange()
        now = a.fleet.now
        args = [0, 0, 1.0, 0.25, 60000]  # accepted, sent (since the last call), window, gap, ttl

        async def throttle(sent: float, grant: int) -> list[float]:
            reply = await a._call("throttle", THROTTLE, [key], [sent, grant, *args])
            return [float(v) for v in reply[10:16]]

        assert (await throttle(now, 10))[2:] == [-1, 0, -1, 0]  # the first: no measure yet
        a._dropped = [5, 12, 13, 14]  # 5: before the run, not between
        await a._exchange()
        measures = await throttle(now + 0.1, 31)
        assert measures[2:4] == pytest.approx([31 - 10 - 1 - 3, 0.1])
        assert measures[4:6] == pytest.approx([31 - 10 - 1 - 3, 0.1])  # since the last
    finally:
        await a.aclose()


async def test_a_call_answered_late_does_not_set_the_clock_offset(redis_url: str) -> None:
    """Redis' clock is read between a call's ask and its answer, so the offset taken from a
    call is off by half its round trip at most. A call whose answer was read a second late
    (a stalled loop) skewed it by that much; the offset stays the fastest call's until a
    call as fast comes again, which sets it (a clock that drifted is followed), or until
    none did for long: a slow call then sets it (1 % of the time since the last). #22."""
    now, step = [1000.0], [0.0]

    def clock() -> float:
        now[0] += step[0]  # each read `step` seconds after the one before
        return now[0]

    store = RedisRateStore(redis_url, prefix="offset", timeout=PATIENT)
    rate = FleetRate(store, store.key("http://127.0.0.1:1", "t"), adaptive=True, clock=clock)
    try:
        await rate._exchange()
        offset = rate._offset
        step[0] = 1.0  # the answer read a second or more after the ask
        await rate._exchange()
        assert rate._offset == pytest.approx(offset, abs=0.1)  # taken, it moved by >= 1.5 s
        step[0], now[0] = 0.0, now[0] + 5.0  # fast again, our clock 5 s further on
        await rate._exchange()
        assert rate._offset == pytest.approx(offset - (now[0] - 1000.0), abs=0.1)
        offset, step[0] = rate._offset, 1.0
        await rate._exchange()  # slow again, 1 s or more after the last that set it
        assert rate._offset == pytest.approx(offset, abs=0.1)
        now[0] += 400.0  # 400 s on, none set it since: a trip of 1 s may
        await rate._exchange()
        assert rate._offset < offset - 399.0
    finally:
        await rate.aclose()


def test_a_proposal_never_reads_the_fleets_curve_before_its_decrease() -> None:
    """A member whose clock reads earlier than the decrease that drew the curve proposes
    the rate the decrease set, not the curve behind it: a second early, that fell to the
    floor, and the fleet sent at 0.5/s until the next lease (#22's trace)."""
    store = RedisRateStore("redis://127.0.0.1:1/0", prefix="early")
    rate = FleetRate(store, "k", adaptive=True, clock=lambda: 100.0)
    w_max, c, k = curve_shape(100.0, 80.0, rate.local.scale, rate.local.min_rate)
    rate.fleet = ratestore.FleetState(rate=80.0, epoch=3, w_max=w_max, k=k, c=c, t0=101.0)
    assert rate._proposal() == pytest.approx(80.0)
    rate.fleet = ratestore.FleetState(rate=80.0, epoch=3, w_max=w_max, k=k, c=c, t0=99.0)
    assert 80.0 < rate._proposal() < 100.0  # a second on: back on the way up


async def test_store_holds_no_token_and_no_chat(redis_url: str) -> None:
    import redis.asyncio

    async with tenant(chats=50, rate_limit=200.0, latency=SLOW) as sb:
        async with client_for(
            sb, RedisRateStore(redis_url, prefix="audit", timeout=PATIENT), adaptive=True
        ) as c:
            chats = await read_all(c)
        r = redis.asyncio.Redis.from_url(redis_url)
        try:
            key = f"audit:127.0.0.1:{sb.port}:{sb.team_id}"
            keys = sorted([k.decode() async for k in r.scan_iter("audit:*")])
            assert keys == [key, key + ":members"]  # the bucket and rate; who is present
            dump = repr(await r.hgetall(key)) + repr(await r.zrange(key + ":members", 0, -1))
        finally:
            await r.aclose()
    assert sb.token not in dump
    assert not any(chat_id in dump for chat_id in chats)


async def test_unreachable_store_falls_back_once_then_rejoins(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing listens: the search is exact anyway, one warning, one fallback counted;
    once a Redis answers on that port, the client shares its rate again."""
    port = free_port()
    caplog.set_level(logging.INFO, logger="imichat_async")
    async with (
        tenant(chats=200, latency=0.005) as sb,
        client_for(sb, f"redis://127.0.0.1:{port}/0", adaptive=True) as c,
    ):
        assert await read_all(c) == [str(r["chat_id"]) for r in sb.expected()]
        assert await read_all(c) == [str(r["chat_id"]) for r in sb.expected()]
        rate = c.limiter.rate
        assert isinstance(rate, FleetRate) and not rate.shared
        assert c.stats.rate_store_fallbacks == 1
        server = RedisServer(port).start()
        try:
            for _ in range(60):  # rejoins within RETRY_EVERY (1 s), give it 3 s
                if rate.shared:
                    break
                await asyncio.sleep(0.05)
            assert rate.shared
            assert await read_all(c) == [str(r["chat_id"]) for r in sb.expected()]
        finally:
            await c.close()
            server.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "rate store" in r.msg]
    assert len(warnings) == 1
    assert any("answers again" in r.msg for r in caplog.records)
    await assert_no_stray_tasks()


async def test_close_leaves_no_task_and_is_idempotent(redis_url: str) -> None:
    async with tenant(chats=30) as sb:
        c = client_for(sb, redis_url, adaptive=True)
        await read_all(c)
        await c.close()
        await c.close()
    await assert_no_stray_tasks()


# -- everywhere a client is configured --------------------------------------------------------


def _keys(url: str, prefix: str) -> list[str]:
    import redis

    r = redis.Redis.from_url(url)
    try:
        return sorted(k.decode() for k in r.scan_iter(f"{prefix}:*"))
    finally:
        r.close()


def _cli(args: list[str], env: dict[str, str]) -> Any:
    from click.testing import CliRunner

    from imichat_async import cli

    base: dict[str, str | None] = {"IMICHAT_RATE_STORE": None, **env}
    return CliRunner(env=base).invoke(cli.main, args, catch_exceptions=False)


def test_cli_search_export_sync_take_a_rate_store(redis_url: str, tmp_path: Path) -> None:
    """`--rate-store URL` on search and sync, `$IMICHAT_RATE_STORE` on export: each run's
    client keeps its rate under the tenant's key in that Redis."""
    with ThreadedSandbox(chats=80, seed=4, latency=SLOW) as sb:
        env = {k: v for k, v in env_for(sb).items() if k.startswith("IMICHAT_")}
        key = f"imichat:rate:127.0.0.1:{sb.port}:{sb.team_id}"
        _flush(redis_url)
        r = _cli(["-q", "search", "--json", "--rate-store", redis_url], env)
        assert r.exit_code == 0, r.output
        assert len(r.stdout.splitlines()) == 80
        assert _keys(redis_url, "imichat:rate") == [key, key + ":members"]
        _flush(redis_url)
        out = tmp_path / "chats.ndjson"
        r = _cli(
            ["-q", "export", "--since", "2020-01-01", "-o", str(out)],
            {**env, "IMICHAT_RATE_STORE": redis_url},
        )
        assert r.exit_code == 0, r.output
        assert len(out.read_text().splitlines()) == 80
        assert _keys(redis_url, "imichat:rate") == [key, key + ":members"]
        _flush(redis_url)
        r = _cli(
            ["-q", "sync", "--since", "2020-01-01", "--state", str(tmp_path / "s.json"),
             "-o", str(tmp_path / "log.ndjson"), "--rate-store", redis_url],
            env,
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        assert _keys(redis_url, "imichat:rate") == [key, key + ":members"]
        r = _cli(["-q", "search", "--rate-store", "http://nope"], env)
        assert r.exit_code == 2 and "rate_store" in r.stderr


def _flush(url: str) -> None:
    import redis

    r = redis.Redis.from_url(url)
    try:
        for k in r.scan_iter("imichat:rate:*"):
            r.delete(k)
    finally:
        r.close()


def test_sync_client_and_dlt_source_take_a_rate_store(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dlt

    from imichat_async import dlt as imi_dlt
    from imichat_async import sync

    monkeypatch.setenv("RUNTIME__DLTHUB_TELEMETRY", "false")
    monkeypatch.setenv("DLT_DATA_DIR", str(tmp_path / "dlt-data"))
    with ThreadedSandbox(chats=60, seed=6, latency=SLOW) as sb:
        creds = {"base_url": sb.base_url, "token": sb.token, "team_id": sb.team_id}
        store = RedisRateStore(redis_url, prefix="blocking", timeout=PATIENT)
        with sync.ImiChatClient(**creds, adaptive=True, rate_store=store) as client:
            assert len(list(client.search_chats())) == 60
            assert isinstance(client.limiter.rate, FleetRate)
        key = f"127.0.0.1:{sb.port}:{sb.team_id}"
        assert _keys(redis_url, "blocking") == [f"blocking:{key}", f"blocking:{key}:members"]
        pipeline = dlt.pipeline(
            pipeline_name="fleet",
            destination=dlt.destinations.duckdb(str(tmp_path / "chats.duckdb")),
            dataset_name="imichat",
            pipelines_dir=str(tmp_path / "pipelines"),
        )
        source = imi_dlt.chats_source(
            base_url=sb.base_url,
            token=sb.token,
            team_id=sb.team_id,
            since="2020-01-01",
            rate_store=RedisRateStore(redis_url, prefix="dlt", timeout=PATIENT),
        )
        pipeline.run(source)
        assert _keys(redis_url, "dlt") == [f"dlt:{key}", f"dlt:{key}:members"]


# -- a fleet of worker processes -------------------------------------------------------------
# Marked `fleet`: about 40 s on 2 cores (processes, each with its own interpreter and
# imports, reading for seconds at a limited rate), too long for the default run. CI runs
# them with `--fleet`, in a step of their own that fails CI like any other.


def fleet(
    sb: SandboxProcess, n: int, store: str | None, *, together: bool = False, **kw: Any
) -> list[Worker]:
    """`n` workers, each reading once its imports are done (a second or more on a loaded
    machine: one may be done before another starts), or `together` once all are. Learning
    together, their first bursts come at once (P x k against the tenant's burst: 51-74
    refused of some 240 requests, against 13-35 staggered, in 8 runs each)."""
    config = {
        "base_url": sb.base_url,
        "token": sb.token,
        "team_id": sb.team_id,
        "concurrency": 16,
        "adaptive": True,
        "max_retries": 1000,
        "rate_store": store,
        **kw,
    }
    workers = [Worker(config, barrier=together) for _ in range(n)]
    if together:
        for w in workers:
            w.ready()
        for w in workers:
            w.go()
    return workers


def wait_until(cond: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


LIMIT, BURST, K, P = 40.0, 10, 16, 3


@pytest.mark.fleet
@pytest.mark.slow
def test_fleet_of_processes_shares_one_budget(redis_url: str) -> None:
    """P processes learning one rate, started together: each reads the whole tenant
    exactly, and the fleet's 429s stay within one client's window (the slow start: before
    the fleet's first throttle nobody knows the limit, and the fleet sends as one client
    would, not P x k at once: 51-74 refused here without it) and 5 % of the pages."""
    with SandboxProcess(900, latency=0.02, rate_limit=LIMIT, rate_burst=BURST) as sb:
        expected = [str(r["chat_id"]) for r in sb.expected()]
        workers = fleet(sb, P, RedisRateStore(redis_url, prefix="fleet").url, together=True)
        results = [w.wait(120) for w in workers]
        st = sb.stats()
    assert all(r is not None and r["ids"] == expected for r in results)
    assert all(r is not None and r["fallbacks"] == 0 for r in results)
    pages = P * len(expected) // 10
    refused = st["rate_limited"]
    assert refused <= K + 0.05 * pages, (refused, st["requests_total"])


@pytest.mark.fleet
@pytest.mark.slow
def test_fleet_shares_are_fair_and_a_late_joiner_gets_its_share(redis_url: str) -> None:
    """`rate_limit=R` shared: R for the fleet (about nothing refused), and workers that want
    tokens get comparable shares, one that joins late included, from its first page on."""
    with SandboxProcess(900, latency=0.02, rate_limit=LIMIT, rate_burst=BURST) as sb:
        expected = [str(r["chat_id"]) for r in sb.expected()]
        store = RedisRateStore(redis_url, prefix="fair").url
        workers = fleet(sb, P - 1, store, together=True, adaptive=False, rate_limit=LIMIT)
        wait_until(lambda: all(w.answered_by(math.inf) >= 3 for w in workers))
        workers += fleet(sb, 1, store, adaptive=False, rate_limit=LIMIT)
        results = [w.wait(120) for w in workers]
        st = sb.stats()
    assert all(r is not None and r["ids"] == expected for r in results)
    assert st["rate_limited"] <= 3, st
    # Pages answered while all were reading: from the late one's first page answered to
    # the first one done.
    start = min(t for t, n in workers[-1].answered if n > 0)
    end = min(w.pages[-1] for w in workers)
    done = [w.answered_by(end) - w.answered_by(start) for w in workers]
    assert end - start > 1.0, "too short a window to tell"
    assert min(done) >= 0.7 * max(done), done


@pytest.mark.fleet
@pytest.mark.slow
def test_redis_killed_mid_run_every_worker_still_exact(own_redis: RedisServer) -> None:
    """Redis dies once every worker reads (its first page in): each falls back once and
    reads on exactly. 120 pages each at most 40/s for the fleet: none can be done by then
    (a worker whose head page draws 429s in the first bursts lags by seconds)."""
    with SandboxProcess(1200, latency=0.02, rate_limit=LIMIT, rate_burst=BURST) as sb:
        expected = [str(r["chat_id"]) for r in sb.expected()]
        workers = fleet(sb, P, own_redis.url, together=True)
        wait_until(lambda: all(len(w.pages) >= 1 for w in workers))
        own_redis.kill()
        killed_at = time.monotonic()
        results = [w.wait(120) for w in workers]
    assert all(r is not None and r["ids"] == expected for r in results)
    ended = [r["ended"] - killed_at for r in results if r is not None]  # each read on after it
    assert [r["fallbacks"] for r in results if r is not None] == [1] * P, ended


@pytest.mark.fleet
@pytest.mark.slow
def test_a_worker_killed_mid_run_leaves_its_share_to_the_others(redis_url: str) -> None:
    """Three share `rate_limit=R`; one is killed (SIGKILL): what it had leased is due within
    `HORIZON`, and the two left then get the whole of R between them: the pages they have
    answered per second after it (counts over the reports) exceed what they had while
    sharing with it by a third, about (3/2 in theory)."""
    with SandboxProcess(900, latency=0.02, rate_limit=LIMIT, rate_burst=BURST) as sb:
        expected = [str(r["chat_id"]) for r in sb.expected()]
        store = RedisRateStore(redis_url, prefix="kill").url
        workers = fleet(sb, P, store, together=True, adaptive=False, rate_limit=LIMIT)
        wait_until(lambda: all(w.answered_by(math.inf) >= 15 for w in workers))
        workers[0].kill()
        killed_at = workers[0].answered[-1][0]
        results = [w.wait(120) for w in workers[1:]]
        assert workers[0].wait(120) is None
        st = sb.stats()
    assert all(r is not None and r["ids"] == expected for r in results)
    assert st["rate_limited"] <= 3, st
    survivors = workers[1:]
    start = max(min(t for t, n in w.answered if n > 0) for w in workers)
    settle = killed_at + 2 * ratestore.HORIZON
    end = min(w.pages[-1] for w in survivors)
    assert killed_at - start > 0.5 and end - settle > 1.0, "too short to tell"

    def answered(since: float, until: float) -> int:
        return sum(w.answered_by(until) - w.answered_by(since) for w in survivors)

    before = answered(start, killed_at) / (killed_at - start)
    after = answered(settle, end) / (end - settle)
    assert after >= 1.3 * before, (before, after)
