"""`imichat_async.dask.read_chats` on a real `distributed.LocalCluster` of worker processes.

The sandbox is served from a thread of the test process on 127.0.0.1; the workers are
separate processes that read it with clients of their own.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import distributed
import duckdb
import pandas as pd
import pytest

import imichat_async as imi
from benchmarks.redis_proc import RedisServer
from imichat_async.dask import ClientSettings, EnvToken, read_chats
from imichat_async.export import CHAT_SCHEMA, Partition
from imichat_async.sandbox import Sandbox

from .helpers import started
from .sandbox_thread import ThreadedSandbox

pytestmark = pytest.mark.slow
SINCE = "2024-01-01"
UNTIL = "2025-01-01"
TOKEN_VAR = "IMICHAT_DASK_TEST_TOKEN"
RANGE = [
    ("created_at", "gte", "2024-01-01T00:00:00Z"),
    ("created_at", "lt", "2025-01-01T00:00:00Z"),
]


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with ThreadedSandbox(chats=2000, seed=21, latency=0.005) as sb:
        os.environ[TOKEN_VAR] = sb.token  # inherited by the worker processes
        yield sb
    os.environ.pop(TOKEN_VAR, None)


@pytest.fixture(scope="module")
def cluster(sandbox: Sandbox) -> Iterator[distributed.Client]:
    with (
        distributed.LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=2, processes=True, threads_per_worker=2, dashboard_address=":0"
        ) as lc,
        distributed.Client(lc) as client,  # type: ignore[no-untyped-call]
    ):
        yield client


def frame(sb: Sandbox, **kwargs: Any) -> Any:
    kwargs.setdefault("rows_per_partition", 200)
    kwargs.setdefault("token", EnvToken(TOKEN_VAR))
    return read_chats(
        base_url=sb.base_url,
        team_id=sb.team_id,
        since=SINCE,
        until=UNTIL,
        concurrency=4,
        max_retries=10,
        **kwargs,
    )


def test_read_chats_equals_the_sandbox_exactly(
    sandbox: Sandbox, cluster: distributed.Client
) -> None:
    """Every chat of the range once, field by field as the server sent it, typed."""
    df = frame(sandbox)
    assert df.npartitions >= 2000 // 200
    got = df.compute()
    want = sandbox.expected(RANGE)
    assert len(got) == len(want)
    assert sorted(got["chat_id"]) == sorted(r["chat_id"] for r in want)
    by_id = {r["chat_id"]: r for r in want}
    for row in got.head(50).itertuples():
        r = by_id[row.chat_id]
        assert row.status == r.get("status")
        assert row.created_at.to_pydatetime() == imi.parse_utc(r["created_at"])
        assert row.asset_name == (r.get("asset") or {}).get("name")
        tag = r.get("tag")
        assert (None if row.tag is pd.NA else list(row.tag)) == (None if tag is None else tag)
    assert str(got.dtypes["created_at"]) == "timestamp[us, tz=UTC][pyarrow]"
    assert str(got.dtypes["tag"]).startswith("list<item: string>")


def test_filters_are_applied_in_the_workers(sandbox: Sandbox, cluster: distributed.Client) -> None:
    """Keyword filters reach every task."""
    got = frame(sandbox, status="closed", channel="sms").compute()
    want = sandbox.expected([*RANGE, ("status", "eq", "closed"), ("channel", "eq", "sms")])
    assert sorted(got["chat_id"]) == sorted(r["chat_id"] for r in want)


def test_the_token_never_enters_the_task_graph(sandbox: Sandbox) -> None:
    """With a callable token, the graph holds its name, never the token."""
    df = frame(sandbox)
    graph = pickle.dumps(dict(df.__dask_graph__()))
    assert sandbox.token.encode() not in graph
    assert TOKEN_VAR.encode() in graph
    assert sandbox.token not in repr(ClientSettings(base_url="u", team_id="t", token="secret"))
    assert "secret" not in repr(ClientSettings(base_url="u", team_id="t", token="secret"))


def test_to_parquet_is_readable_by_duckdb_with_the_schema(
    sandbox: Sandbox, cluster: distributed.Client, tmp_path: Path
) -> None:
    """`df.to_parquet(dir)` writes the documented schema; DuckDB reads every chat back."""
    frame(sandbox).to_parquet(str(tmp_path / "chats"))
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT count(*), count(DISTINCT chat_id) FROM read_parquet('{tmp_path}/chats/*.parquet')"
    ).fetchone()
    assert rows == (len(sandbox.expected(RANGE)),) * 2
    types = dict(
        con.execute(
            f"DESCRIBE SELECT * FROM read_parquet('{tmp_path}/chats/*.parquet')"
        ).fetchall()[i][:2]
        for i in range(len(CHAT_SCHEMA))
    )
    assert types["created_at"] == "TIMESTAMP WITH TIME ZONE"
    assert types["tag"] == "VARCHAR[]"
    assert list(types) == CHAT_SCHEMA.names


def test_a_worker_killed_mid_read_still_gives_the_exact_result(
    sandbox: Sandbox, cluster: distributed.Client
) -> None:
    """SIGKILL one worker process while tasks run: Dask reruns its tasks, nothing is lost
    or doubled."""
    df = frame(sandbox, rows_per_partition=100)
    before = sandbox.stats.requests_total
    future = cluster.compute(df)  # type: ignore[no-untyped-call]
    pids = cluster.run(os.getpid)
    deadline = time.monotonic() + 30
    while sandbox.stats.requests_total - before < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not future.done()
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    got = future.result(timeout=120)
    want = sandbox.expected(RANGE)
    assert len(got) == len(want)
    assert sorted(got["chat_id"]) == sorted(r["chat_id"] for r in want)


def test_partitions_are_planned_where_read_chats_is_called(sandbox: Sandbox) -> None:
    """The plan is made once, up front: a bad filter fails at the call, before any task."""
    before = sandbox.stats.requests_total
    with pytest.raises(imi.InvalidQueryError, match="stauts"):
        frame(sandbox, stauts="closed")
    assert sandbox.stats.requests_total == before
    assert Partition(0, 1).id  # the planned unit is the export's Partition


@pytest.mark.fleet  # a cluster and 3,000 chats at 100/s: ~20 s, CI runs it with --fleet
def test_tasks_share_the_tenants_budget_through_the_rate_store(
    cluster: distributed.Client, redis_url: str
) -> None:
    """Against a tenant limited to 100 requests/s, the cluster's tasks learn one rate in Redis:
    every chat once, at most 3 % of requests answered 429 (the fleet's bound), and the
    store holds the tenant's key."""
    limit = {"rate_limit": 100.0, "rate_burst": 25}
    with ThreadedSandbox(chats=3000, seed=22, latency=0.005, **limit) as sb:
        # the workers' environment holds the module sandbox's token: this one travels
        df = frame(sb, token=sb.token, rows_per_partition=300, rate_store=redis_url)
        got = cluster.compute(df["chat_id"]).result()  # type: ignore[no-untyped-call]
        want = sb.expected(RANGE)
        assert sorted(got) == sorted(r["chat_id"] for r in want)
        assert len(got) == len(want)
        share = sb.stats.rate_limited / sb.stats.requests_total
        assert share <= 0.03, (sb.stats.rate_limited, sb.stats.requests_total)
    keys = _redis_keys(redis_url)
    assert any(k.endswith(f"127.0.0.1:{sb.port}:{sb.team_id}") for k in keys), keys


def test_reads_go_on_when_the_rate_store_dies_mid_read(
    sandbox: Sandbox, cluster: distributed.Client
) -> None:
    """Redis killed once the cluster's reads are under way: each worker's client falls back
    to its own send rate, the reads go on, and the result is still exact."""
    server = started(RedisServer())
    stats = sandbox.stats
    killed: list[int] = []

    def kill_when_reading() -> None:
        deadline = time.monotonic() + 60
        while stats.requests_total < start + 40 and time.monotonic() < deadline:
            time.sleep(0.001)
        server.kill()
        killed.append(stats.requests_total)

    killer = threading.Thread(target=kill_when_reading, daemon=True)
    try:
        df = frame(sandbox, rows_per_partition=100, rate_store=server.url)
        start = stats.requests_total  # planned: what follows is the workers' reading
        killer.start()
        got = cluster.compute(df["chat_id"]).result()  # type: ignore[no-untyped-call]
        killer.join(5)
    finally:
        server.close()
    want = [r["chat_id"] for r in sandbox.expected(RANGE)]
    assert sorted(got) == sorted(want) and len(got) == len(want)
    assert killed and killed[0] < stats.requests_total  # it died mid-read: reads went on


def _redis_keys(url: str) -> list[str]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return sorted(k.decode() if isinstance(k, bytes) else k for k in client.keys("*"))
    finally:
        client.close()
