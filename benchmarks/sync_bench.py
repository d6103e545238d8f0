"""Scenario 11: a `sync_chats` run after 1 % of the chats changed, against a full export.

One in-process sandbox of N chats (latency L), client concurrency K. Measured:
the full `export_chats` of everything, the sync's first run, then a later run
after N/100 updates, twice: changes spread over an hour (a nightly job's
case) and all at one instant (the worst case for time splitting: every
change in one millisecond-wide cluster of a 300 s lag window). A shared fake
wall clock (the sandbox's `wall_clock`, the plan's `utcnow` seam) places the
changes in time; no sleeping.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import Any

import imichat_async as imi

from .common import Config, ScenarioResult, Table, Target

SINCE = "2024-01-01T00:00:00Z"
UNTIL = "2025-01-02T00:00:00Z"


class _Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def dt(self) -> datetime:
        return datetime.fromtimestamp(self.now, timezone.utc)


async def _measure(n: int, k: int, latency: float) -> dict[str, Any]:
    from imichat_async.export import SyncState, _plan, export_chats, sync_chats
    from imichat_async.sandbox import Faults, serve

    clock = _Clock()
    saved = _plan.utcnow
    _plan.utcnow = clock.dt
    out: dict[str, Any] = {}

    async def drop(record: Any) -> None:
        return None

    try:
        async with (
            serve(chats=n, seed=0, faults=Faults(latency=latency), wall_clock=clock) as sb,
            imi.ImiChatClient(
                base_url=sb.base_url, token=sb.token, team_id=sb.team_id, concurrency=k
            ) as client,
        ):
            t = time.perf_counter()
            rep = await export_chats(client, since=SINCE, until=UNTIL, sink=drop)
            out["export"] = (rep.records, rep.requests, time.perf_counter() - t)
            for name in ("spread", "instant"):
                state = SyncState()
                t = time.perf_counter()
                first = await sync_chats(client, since=SINCE, state=state, sink=drop)
                out[f"first-{name}"] = (first.appended, first.requests, time.perf_counter() - t)
                changes = n // 100  # distinct chats, every one created since SINCE
                step = max(1, len(sb.data) // changes)
                ids = [c["chat_id"] for c in sb.data[::step]][:changes]
                for chat_id in ids:
                    if name == "spread":
                        clock.now += 3600 / changes
                    sb.update_chat(chat_id)
                clock.now += 60
                t = time.perf_counter()
                later = await sync_chats(client, since=SINCE, state=state, sink=drop)
                out[f"later-{name}"] = (later.appended, later.requests, time.perf_counter() - t)
                clock.now += 7200
    finally:
        _plan.utcnow = saved
    return out


def run(cfg: Config) -> ScenarioResult:
    n, k, latency = (2000 if cfg.quick else 20_000), 8, 0.0
    res = ScenarioResult(
        11,
        "Incremental sync after 1 % changed vs a full export",
        f"N = {n} chats, L = {latency * 1000:.0f} ms, client concurrency {k}, in-process "
        "sandbox (client and server share one process and a loaded 2-core machine: wall "
        "times are indicative, request counts are exact). One run of each.",
    )
    got = asyncio.run(_measure(n, k, latency))
    table = Table("Requests and wall time", ["run", "versions appended", "requests", "wall (s)"])
    labels = {
        "export": "full `export_chats` of everything",
        "first-spread": "sync, first run",
        "later-spread": f"sync after {n // 100} updates spread over an hour",
        "first-instant": "sync, first run (again, fresh state)",
        "later-instant": f"sync after {n // 100} updates at one instant",
    }
    for key, label in labels.items():
        appended, requests, wall = got[key]
        table.add(label, appended, requests, f"{wall:.2f}")
    res.tables.append(table)
    ratio = got["later-spread"][1] / got["export"][1]
    res.targets.append(
        Target(
            "sync after 1 % changed (spread) costs < 10 % of the export's requests",
            f"{ratio:.1%}",
            ratio < 0.10,
        )
    )
    return res
