"""Scenario 13, latency for services: many small searches at once, alone or beside a big one.

One client (`concurrency = k = 16`), L = 40 ms. A: 100 searches of 3 pages
each, all started at once. B: 50 such searches started beside one 200-page
search. The figure is each search's latency (its start to its last page) in
multiples of L, p50 and p99 over the searches, and in B the big search's
wall. The reference is a plain `asyncio.Semaphore(k)` around every page
request (FIFO), the pages of a search all sent at once (the big one in
windows of 4 x k, the client's default prefetch). A small search is the last
3 pages of the tenant (`start_page`), so the client learns its size from the
first page's total, as a service's search would; the big one is the whole
tenant. Both run against the same server in each repetition, the order
alternating.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import statistics
import time
from collections.abc import Awaitable
from typing import Any

import aiohttp

import imichat_async as imi

from . import baselines
from .common import Config, ScenarioResult, Table, Target, per_run, summarize
from .sandbox_proc import SandboxProcess

SMALL_PAGES = 3
#: B on main at dbd7550 (searches took turns): the big search's wall / the semaphore's big
#: search wall, same run, this scenario: 0.98 both at load average 11 (35.3 L / 35.9 L) and
#: at 2.4 (25.6 L / 26.3 L), median of 3 on a shared 2-core VM. A ratio to the same run's
#: reference, so that the target holds on any machine's speed.
BIG_RATIO_BEFORE = 0.98
A_TARGET = 1.10  # A: client median / semaphore median
B_P50, B_P99 = 6.0, 12.0  # B: small searches' latency, in L


def _quantile(values: list[float], q: float) -> float:
    """The q-quantile, interpolated between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def _timed(search: Awaitable[int]) -> tuple[float, int]:
    started = time.perf_counter()
    pages = await search
    return time.perf_counter() - started, pages


async def _client_searches(
    sb: SandboxProcess, k: int, small: int, big: int | None, big_priority: str
) -> dict[str, Any]:
    pages_total = sb.chats // 10
    async with imi.ImiChatClient(
        base_url=sb.base_url, token=sb.token, team_id=sb.team_id, concurrency=k
    ) as client:
        extra: dict[str, Any] = {}
        if big_priority != "interactive":
            extra["priority"] = big_priority

        async def search(start: int, **kw: Any) -> int:
            n = 0
            async for _ in client.search_pages(start_page=start, raw=True, **kw):
                n += 1
            return n

        jobs = [_timed(search(1, **extra))] if big is not None else []
        jobs += [_timed(search(pages_total - SMALL_PAGES + 1)) for _ in range(small)]
        done = await asyncio.gather(*jobs)
    return _outcome(done, big is not None)


async def _semaphore_searches(
    sb: SandboxProcess, k: int, small: int, big: int | None
) -> dict[str, Any]:
    """The reference: every page request under one FIFO `asyncio.Semaphore(k)`."""
    url = f"{sb.base_url}/chats/search"
    headers = baselines._headers(sb.token, sb.team_id)
    pages_total = sb.chats // 10
    semaphore = asyncio.Semaphore(k)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def page(n: int) -> int:
            async with semaphore:
                return len(await baselines._get_page(session, url, headers, n))

        async def search(first: int, last: int, window: int) -> int:
            got = 0
            for start in range(first, last + 1, window):
                stop = min(last, start + window - 1)
                got += len(await asyncio.gather(*(page(n) for n in range(start, stop + 1))))
            return got

        jobs = [_timed(search(1, big, 4 * k))] if big is not None else []
        jobs += [
            _timed(search(pages_total - SMALL_PAGES + 1, pages_total, SMALL_PAGES))
            for _ in range(small)
        ]
        done = await asyncio.gather(*jobs)
    return _outcome(done, big is not None)


def _outcome(done: list[tuple[float, int]], with_big: bool) -> dict[str, Any]:
    smalls = done[1:] if with_big else done
    if any(pages != SMALL_PAGES for _, pages in smalls):
        raise RuntimeError(f"a small search got {[p for _, p in smalls]} pages, not 3 each")
    out: dict[str, Any] = {"latencies": [t for t, _ in smalls]}
    if with_big:
        out["big"] = done[0][0]
        out["big_pages"] = done[0][1]
    return out


def _big_ratio(r: dict[str, dict[str, Any]]) -> float:
    """The big search's wall in B, over the semaphore's in the same repetition."""
    client: float = r["B/client"]["big"]
    plain: float = r["B/semaphore"]["big"]
    return client / plain


def _run(make: Any) -> dict[str, Any]:
    result: dict[str, Any] = asyncio.run(make())
    return result


def run(cfg: Config) -> ScenarioResult:
    k, latency, big = cfg.s13_k, cfg.latency, cfg.s13_big_pages
    runs_n = cfg.runs
    background = "priority" in inspect.signature(imi.ImiChatClient.search_pages).parameters
    res = ScenarioResult(
        13,
        "Latency for services",
        f"One client, concurrency = {k}, L = {latency * 1000:.0f} ms. A: {cfg.s13_searches} "
        f"searches of {SMALL_PAGES} pages at once; B: {cfg.s13_small} such searches beside "
        f"one {big}-page search, all started together. Search latency (start to last page) "
        "in multiples of L, p50 / p99 over the small searches; the reference is a plain "
        f"asyncio.Semaphore({k}) around every page request (FIFO), a search's pages all sent "
        f"at once (the big one in windows of {4 * k}). Median (min-max) of {runs_n}.",
    )
    rows: list[tuple[str, int, bool, str]] = [
        ("A", cfg.s13_searches, False, "interactive"),
        ("B", cfg.s13_small, True, "interactive"),
    ]
    if background:
        rows.append(("B, big search background", cfg.s13_small, True, "background"))
    runs: list[dict[str, dict[str, Any]]] = []
    with SandboxProcess(big * 10, latency=latency) as sb:
        for rep in range(runs_n):
            run: dict[str, dict[str, Any]] = {}
            for name, small, with_big, priority in rows:
                b = big if with_big else None

                def client(small: int = small, b: int | None = b, p: str = priority) -> Any:
                    return _client_searches(sb, k, small, b, p)

                def plain(small: int = small, b: int | None = b) -> Any:
                    return _semaphore_searches(sb, k, small, b)

                order = [("client", client), ("semaphore", plain)]
                if rep % 2:
                    order.reverse()
                for who, make in order:
                    if who == "semaphore" and priority != "interactive":
                        continue  # the same reference as B
                    sb.reset()
                    out = _run(make)
                    if with_big and out["big_pages"] != big:
                        raise RuntimeError(f"the big search got {out['big_pages']} pages")
                    run[f"{name}/{who}"] = out
            runs.append(run)
    table = Table(
        f"Search latency in L (k = {k}, L = {latency * 1000:.0f} ms)",
        [
            "scenario",
            "client p50",
            "client p99",
            "semaphore p50",
            "semaphore p99",
            "client p50 / semaphore p50",
            "big search wall, client (L)",
            "big search wall, semaphore (L)",
        ],
    )

    def q(key: str, quant: float) -> Any:
        return summarize([_quantile(r[key]["latencies"], quant) / latency for r in runs])

    def big_wall(key: str) -> Any:
        return summarize([r[key]["big"] / latency for r in runs])

    for name, _small, with_big, priority in rows:
        ref = "B" if priority != "interactive" else name

        def ratio(r: dict[str, dict[str, Any]], name: str = name, ref: str = ref) -> float:
            client: list[float] = r[f"{name}/client"]["latencies"]
            plain: list[float] = r[f"{ref}/semaphore"]["latencies"]
            return statistics.median(client) / statistics.median(plain)

        rat = per_run(runs, ratio)
        assert rat is not None
        table.add(
            name,
            q(f"{name}/client", 0.5).fmt(1),
            q(f"{name}/client", 0.99).fmt(1),
            q(f"{ref}/semaphore", 0.5).fmt(1),
            q(f"{ref}/semaphore", 0.99).fmt(1),
            rat.fmt(2),
            big_wall(f"{name}/client").fmt(1) if with_big else "",
            big_wall(f"{ref}/semaphore").fmt(1) if with_big else "",
        )
        if name == "A":
            res.targets.append(
                Target(
                    f"A: client median <= {A_TARGET} x the semaphore's",
                    rat.fmt(2),
                    rat.median <= A_TARGET,
                )
            )
        elif name == "B":
            p50, p99 = q("B/client", 0.5), q("B/client", 0.99)
            big_ratio = per_run(runs, _big_ratio)
            assert big_ratio is not None
            res.targets.append(
                Target(f"B: small p50 <= {B_P50:.0f} L", p50.fmt(1), p50.median <= B_P50)
            )
            res.targets.append(
                Target(f"B: small p99 <= {B_P99:.0f} L", p99.fmt(1), p99.median <= B_P99)
            )
            res.targets.append(
                Target(
                    "B: big search wall / the semaphore's <= 1.1 x before "
                    f"({BIG_RATIO_BEFORE:.2f})",
                    big_ratio.fmt(2),
                    big_ratio.median <= 1.1 * BIG_RATIO_BEFORE,
                )
            )
    res.tables.append(table)
    res.notes.append(
        "Raw latencies (s) of the last repetition: "
        + json.dumps(
            {key: round(statistics.median(v["latencies"]), 4) for key, v in runs[-1].items()}
        )
    )
    if cfg.quick:
        res.notes.append("Quick sizes: the targets are for the full sizes (100, 50 + 200 pages).")
    return res
