"""Scenario 15 (`--only fleet`): one tenant's rate budget, drawn on by a fleet of processes.

(a) P worker processes (`benchmarks/fleet_worker.py`), each with its own
`ImiChatClient(concurrency=k)`, each reading the whole tenant (N chats) from
the sandbox (its own process) limited to R requests/s (a token bucket, burst
25; over it, 429 with `Retry-After: 1`), L = 40 ms. The workers start together
(a barrier after their imports); wall = from the start to the last worker's
end (CLOCK_MONOTONIC, one clock for every process). Ideal = P x pages / R. Ways
of running the fleet: fixed concurrency; `adaptive=True`, each learning alone;
`rate_limit=R/P` each (split by hand); `adaptive=True` with one shared
`rate_store` (a real `redis-server`, `benchmarks/redis_proc.py`).

(b) No limit at all: one client, `adaptive=True`, in-process vs with the
shared store: what the store costs where there is nothing to share.
"""

from __future__ import annotations

import time
from typing import Any

from imichat_async import _records as records

from . import measure
from .common import Config, ScenarioResult, Table, Target, pages_for, per_run, summarize
from .fleet_worker import Worker
from .redis_proc import RedisServer
from .sandbox_proc import SandboxProcess

BURST = 25
REFILL_SLACK = 0.05  # seconds waited beyond a full refill of the bucket between runs
SHARED = "`adaptive=True`, one shared `rate_store`"


def _variants(p: int, limit: int, k: int, full: bool) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if full:
        out.append((f"`concurrency={k}` each", {}))
    out += [
        ("`adaptive=True`, each learning alone", {"adaptive": True}),
        (f"`rate_limit={limit / p:g}` each (split by hand)", {"rate_limit": limit / p}),
        (SHARED, {"adaptive": True, "rate_store": "shared"}),
    ]
    return out


def _fleet(sb: SandboxProcess, p: int, k: int, store: str, **kw: Any) -> dict[str, Any]:
    """One run of P workers started together; the sandbox's counts, the wall, exactness."""
    sb.reset()
    if kw.get("rate_store") == "shared":
        kw["rate_store"] = store
    config = {
        "base_url": sb.base_url,
        "token": sb.token,
        "team_id": sb.team_id,
        "concurrency": k,
        "max_retries": 1000,
        **kw,
    }
    workers = [Worker(config, barrier=True) for _ in range(p)]
    for w in workers:
        w.ready()
    started = time.monotonic()
    for w in workers:
        w.go()
    results = [w.wait() for w in workers]
    st = sb.stats()
    ends = [r["ended"] for r in results if r is not None]
    return {
        "wall": max(ends) - started if len(ends) == p else float("nan"),
        "requests": st["requests_total"],
        "429": st["rate_limited"],
        "ids": [None if r is None else r["ids"] for r in results],
        "fallbacks": sum(r["fallbacks"] for r in results if r is not None),
    }


def _setup(cfg: Config) -> str:
    return (
        f"(a) P worker processes, each `ImiChatClient(concurrency={cfg.s15_k})` reading all "
        f"N = {cfg.s15_chats} chats ({pages_for(cfg.s15_chats)} pages) of one tenant limited "
        f"to R requests/s (token bucket, burst {BURST}; over it 429 with `Retry-After: 1`), "
        f"L = {cfg.latency * 1000:.0f} ms; started together, wall to the last worker's end; "
        f"ideal = P x pages / R; (P, R) in {list(cfg.s15_cases)} (fixed concurrency in the "
        "first only: it is the slowest by far). The shared store is a real "
        f"`redis-server` on 127.0.0.1. (b) No limit: one client, N = {cfg.s15_clean_chats}, "
        f"k = {cfg.s15_k}, `adaptive=True` in-process vs with the store. `max_retries=1000`. "
        f"Median (min-max) of {cfg.runs}."
    )


def run(cfg: Config) -> ScenarioResult:
    res = ScenarioResult(15, "Fleet: one rate budget", _setup(cfg))
    n, k, pages = cfg.s15_chats, cfg.s15_k, pages_for(cfg.s15_chats)
    with RedisServer() as redis, SandboxProcess(n, latency=cfg.latency) as sb:
        expected = [str(c["chat_id"]) for c in sb.expected()]
        for i, (p, limit) in enumerate(cfg.s15_cases):
            sb.set_faults(rate_limit=float(limit), rate_burst=BURST)
            variants = _variants(p, limit, k, full=i == 0 and not cfg.quick)
            runs: list[dict[str, dict[str, Any]]] = []
            for _ in range(cfg.runs):
                one: dict[str, dict[str, Any]] = {}
                for name, kw in variants:
                    time.sleep(BURST / limit + REFILL_SLACK)  # each run starts on a full bucket
                    redis.flush()  # each run starts from nothing learned
                    one[name] = _fleet(sb, p, k, redis.url, **kw)
                runs.append(one)
            res.tables.append(_table(res, p, limit, pages, variants, runs, expected))
    res.tables.append(_no_limit(cfg, res))
    res.notes.append(
        "Each shared run starts from nothing learned: the store is flushed before it (the "
        "learned rate outlives a run by 60 s, and a warm start would flatter the store)."
    )
    return res


def _table(
    res: ScenarioResult,
    p: int,
    limit: int,
    pages: int,
    variants: list[tuple[str, dict[str, Any]]],
    runs: list[dict[str, dict[str, Any]]],
    expected: list[str],
) -> Table:
    ideal = p * pages / limit
    table = Table(
        f"P = {p} processes, R = {limit} requests/s, burst {BURST} (ideal {ideal:.2f} s)",
        ["fleet", "wall (s)", "wall / ideal", "requests answered 429", "requests", "exact"],
    )
    for name, _ in variants:

        def wall_vs_ideal(r: dict[str, Any], name: str = name) -> float:
            return float(r[name]["wall"] / ideal)

        def share_429(r: dict[str, Any], name: str = name) -> float:
            return float(r[name]["429"] / r[name]["requests"])

        exact = all(ids == expected for r in runs for ids in r[name]["ids"])
        wall, share = per_run(runs, wall_vs_ideal), per_run(runs, share_429)
        assert wall is not None and share is not None
        walls = summarize([r[name]["wall"] for r in runs])
        requests = summarize([r[name]["requests"] for r in runs])
        cells = [walls.fmt(2), wall.fmt(2), share.fmt(1, 100, " %"), requests.fmt(0)]
        table.add(name, *cells, "yes, every run" if exact else "**NO**")
        if name == SHARED:
            res.targets += [
                Target(f"P = {p}, R = {limit}: shared store wall / ideal <= 1.10",
                       wall.fmt(2), wall.median <= 1.10),
                Target(f"P = {p}, R = {limit}: shared store 429s <= 3 % of requests",
                       share.fmt(1, 100, " %"), share.median <= 0.03),
                Target(f"P = {p}, R = {limit}: shared store exact in every worker, every run",
                       str(exact), exact),
            ]  # fmt: skip
    return table


def _no_limit(cfg: Config, res: ScenarioResult) -> Table:
    n, latency, k = cfg.s15_clean_chats, cfg.latency, cfg.s15_k
    import redis.asyncio  # noqa: F401  # paid once per process: not what is compared

    runs: list[dict[str, float]] = []
    with RedisServer() as server, SandboxProcess(n, latency=latency) as sb:
        expected = records.decode_page(sb.expected())
        exact = True
        for i in range(cfg.runs):
            one: dict[str, float] = {}
            order = [None, server.url] if i % 2 == 0 else [server.url, None]
            for store in order:
                c = measure.client_run(sb, k=k, keep=True, adaptive=True, rate_store=store)
                exact = exact and c.chats == expected
                one["store" if store else "local"] = c.wall
            runs.append(one)
    ratio = per_run(runs, lambda r: r["store"] / r["local"])
    assert ratio is not None
    table = Table(
        f"No limit: one client, N = {n}, k = {k}, L = {latency * 1000:.0f} ms, `adaptive=True`",
        ["rate store", "wall (s)", "store / in-process wall", "exact"],
    )
    table.add("in-process (default)", summarize([r["local"] for r in runs]).fmt(3), "1", exact)
    table.add("shared (Redis)", summarize([r["store"] for r in runs]).fmt(3), ratio.fmt(3), exact)
    res.targets.append(
        Target("no limit: the shared store costs <= 3 % wall against in-process",
               ratio.fmt(3), ratio.median <= 1.03)
    )  # fmt: skip
    return table
