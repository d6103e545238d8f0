"""Scenario 16 (`--only dask`): a tenant read by a Dask cluster against one export process.

Same tenant (the sandbox in its own process, L = 40 ms), same requests in flight
in all: one `export_chats` at k = 16, against `imichat_async.dask.read_chats` on a
`distributed.LocalCluster` of 2 worker processes x 2 threads, each worker's
client (one a process, shared by the tasks its threads run) at concurrency 8
(2 x 8 = 16), partitions of at most 10,000 chats. The
cluster is started, and the reader imported in its workers, before the clock (a
user runs one already); planning the partitions is timed. Every run's chat ids
are checked against the tenant's.

(a) No rate limit: the cluster's wall over the export's (2 cores: no speedup is
expected; the figure is what the engine costs). (b) The tenant limited to R
requests/s (burst 25, 429 with Retry-After in whole seconds): the export's
client learns the rate alone (`adaptive=True`); every task of the cluster shares
one learned rate through a Redis store (`rate_store`). Ideal = pages / R.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import time
from typing import Any

import imichat_async as imi

from .common import Config, ScenarioResult, Table, Target, pages_for
from .redis_proc import MISSING, RedisMissing, RedisServer
from .sandbox_proc import SandboxProcess

SINCE = "2024-01-01T00:00:00Z"  # the sandbox's data spans the year before 2025-01-01
UNTIL = "2025-01-02T00:00:00Z"
BURST = 25
WORKERS, THREADS = 2, 2
TOKEN_VAR = "IMICHAT_BENCH_TOKEN"


def _export(sb: SandboxProcess, k: int, **client_kw: Any) -> tuple[float, set[str]]:
    from imichat_async.export import CallableSink, export_chats

    ids: set[str] = set()

    async def collect(record: Any) -> None:
        ids.add(record["chat_id"])

    async def main() -> float:
        async with imi.ImiChatClient(
            base_url=sb.base_url,
            token=sb.token,
            team_id=sb.team_id,
            concurrency=k,
            max_retries=1000,
            **client_kw,
        ) as client:
            started = time.perf_counter()
            await export_chats(client, since=SINCE, until=UNTIL, sink=CallableSink(collect))
            return time.perf_counter() - started

    return asyncio.run(main()), ids


def _cluster_read(
    sb: SandboxProcess, client: Any, per_worker: int, rows: int, **kw: Any
) -> tuple[float, set[str], int]:
    from imichat_async.dask import EnvToken, read_chats

    started = time.perf_counter()
    df = read_chats(
        base_url=sb.base_url,
        token=EnvToken(TOKEN_VAR),
        team_id=sb.team_id,
        since=SINCE,
        until=UNTIL,
        concurrency=per_worker,
        max_retries=1000,
        rows_per_partition=rows,
        **kw,
    )
    ids = client.compute(df["chat_id"]).result()
    wall = time.perf_counter() - started
    return wall, set(ids), df.npartitions


def _limited_row(
    table: Table, label: str, sb: SandboxProcess, wall: float, ideal: float, exact: bool
) -> float:
    """A rate-limited run's row (wall against pages / rate, the server's 429s); its 429 share."""
    st = sb.stats()
    share: float = st["rate_limited"] / max(1, st["requests_total"])
    table.add(
        label,
        f"{wall:.2f} s",
        f"{wall / ideal:.2f} x ideal",
        st["requests_total"],
        f"{st['rate_limited']} ({share:.1%})",
        exact,
    )
    return share


def run(cfg: Config) -> ScenarioResult:
    n, k, limit, latency = cfg.s16_chats, cfg.s16_k, cfg.s16_limit, cfg.latency
    per_worker = max(1, k // WORKERS)  # a worker's one client serves its threads' tasks
    rows = cfg.s16_rows
    pages = pages_for(n)
    res = ScenarioResult(
        16,
        "A Dask cluster against one export process",
        f"N = {n} chats ({pages} pages), L = {latency * 1000:.0f} ms. One `export_chats` at "
        f"k = {k} vs `imichat_async.dask.read_chats` on a LocalCluster of {WORKERS} worker "
        f"processes x {THREADS} threads, each worker's client (shared by its threads' tasks) at "
        f"concurrency {per_worker}, "
        f"partitions of at most {rows} chats. (a) no limit; (b) the tenant limited to "
        f"{limit} requests/s (burst {BURST}): the export learns the rate alone, the cluster's "
        "tasks share one learned rate in Redis. Each figure from one run of each, in one run.",
    )
    try:
        import distributed
    except ImportError:
        res.error = "the dask extra is not installed"
        return res
    table = Table(
        "Wall times, 429s and exactness",
        ["variant", "wall", "ratio", "requests", "429s", "exact"],
    )
    with SandboxProcess(chats=n, latency=latency) as sb:
        os.environ[TOKEN_VAR] = sb.token  # the workers read it: the token is not in the graph
        expected = {r["chat_id"] for r in sb.expected()}
        with (
            distributed.LocalCluster(  # type: ignore[no-untyped-call]
                n_workers=WORKERS,
                threads_per_worker=THREADS,
                processes=True,
                dashboard_address=":0",
            ) as lc,
            distributed.Client(lc) as dclient,  # type: ignore[no-untyped-call]
        ):
            # A running cluster has its imports warm: load the reader in every worker first.
            dclient.run(importlib.import_module, "imichat_async.dask")
            sb.reset()
            e_wall, e_ids = _export(sb, k)
            e_req = sb.stats()["requests_total"]
            sb.reset()
            c_wall, c_ids, parts = _cluster_read(sb, dclient, per_worker, rows)
            c_req = sb.stats()["requests_total"]
            table.add("export, no limit", f"{e_wall:.2f} s", "1.00", e_req, 0, e_ids == expected)
            ratio = c_wall / e_wall
            table.add(
                f"cluster ({parts} partitions), no limit",
                f"{c_wall:.2f} s",
                f"{ratio:.2f}",
                c_req,
                0,
                c_ids == expected,
            )
            res.targets.append(
                Target("no limit: cluster wall / export wall (reported)", f"{ratio:.2f}", None)
            )
            ideal = pages / limit
            try:
                redis = RedisServer().start()
            except RedisMissing:
                res.notes.append(f"(b) not measured: {MISSING}")
                res.tables.append(table)
                return res
            url = redis.url
            try:
                sb.set_faults(rate_limit=float(limit), rate_burst=BURST)
                time.sleep(BURST / limit + 0.1)  # a full bucket for each run
                sb.reset()
                e_wall, e_ids = _export(sb, k, adaptive=True)
                _limited_row(table, f"export, {limit} req/s (learned alone)", sb, e_wall, ideal,
                             e_ids == expected)  # fmt: skip
                time.sleep(BURST / limit + 0.1)
                sb.reset()
                c_wall, c_ids, parts = _cluster_read(
                    sb, dclient, per_worker, rows, adaptive=True, rate_store=url
                )
                c_share = _limited_row(table, f"cluster, {limit} req/s (one rate in Redis)", sb,
                                       c_wall, ideal, c_ids == expected)  # fmt: skip
                res.targets.append(
                    Target(
                        f"{limit} req/s: cluster wall / (pages / rate) <= 1.10",
                        f"{c_wall / ideal:.3f}",
                        c_wall / ideal <= 1.10 and c_ids == expected,
                    )
                )
                res.targets.append(
                    Target(
                        f"{limit} req/s: cluster requests answered 429 <= 3 %",
                        f"{c_share:.2%}",
                        c_share <= 0.03,
                    )
                )
            finally:
                redis.stop()
    res.tables.append(table)
    return res
