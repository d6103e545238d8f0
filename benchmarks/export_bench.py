"""Scenario 9: `imichat_async.export.export_chats` (time slices) vs one plain `search_chats()`.

Same tenant, same latency, same client concurrency. The export covers every
chat's `created_at` (a range wider than the data); its output is checked to
hold exactly the chats of the plain search (as sets of `chat_id`: the export
writes slice by slice, not in page order).

Then the CPU comparison of #24, at L = 0 on a bigger tenant: the client's CPU
per chat of an NDJSON export (records written as sent, never decoded) against
a plain `search_chats()` that decodes every chat, and their wall times.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import imichat_async as imi

from . import measure
from .common import Config, ScenarioResult, Table, Target, ideal_seconds, pages_for, per_run
from .common import summarize as _summarize
from .sandbox_proc import SandboxProcess

SINCE = "2024-01-01T00:00:00Z"  # the sandbox's data spans the year before 2025-01-01
UNTIL = "2025-01-02T00:00:00Z"


def _client(sb: SandboxProcess, k: int) -> imi.ImiChatClient:
    return imi.ImiChatClient(
        base_url=sb.base_url, token=sb.token, team_id=sb.team_id, concurrency=k
    )


async def _plain(sb: SandboxProcess, k: int) -> tuple[float, set[str], int]:
    async with _client(sb, k) as client:
        started = time.perf_counter()
        ids = {chat.chat_id async for chat in client.search_chats()}
        return time.perf_counter() - started, ids, client.stats.requests


async def _export(sb: SandboxProcess, k: int, path: Path | None) -> tuple[float, set[str], Any]:
    from imichat_async.export import CallableSink, NdjsonSink, export_chats

    ids: set[str] = set()

    async def collect(record: Any) -> None:
        ids.add(record["chat_id"])

    sink = NdjsonSink(path) if path is not None else CallableSink(collect)
    async with _client(sb, k) as client:
        started = time.perf_counter()
        report = await export_chats(client, since=SINCE, until=UNTIL, sink=sink)
        wall = time.perf_counter() - started
    if path is not None:
        with path.open("rb") as f:
            ids = {json.loads(line)["chat_id"] for line in f if line.strip()}
    return wall, ids, report


def run(cfg: Config) -> ScenarioResult:
    n, k, latency = cfg.s9_chats, cfg.s9_k, cfg.latency
    pages = pages_for(n)
    res = ScenarioResult(
        9,
        "Sliced export vs one search_chats()",
        f"N = {n} chats ({pages} pages), L = {latency * 1000:.0f} ms, client concurrency "
        f"{k} for both. `export_chats(client, since, until, sink=...)` over a range "
        "covering every chat (slices searched at once, split when deep) vs one plain "
        "`search_chats()`; the export to an NDJSON file (no checkpoint: synced once, at "
        "the end) and to an async callable. Every run's output is checked against the "
        f"plain search's chat ids. Median (min-max) of {cfg.runs}.",
    )
    try:
        import imichat_async.export  # noqa: F401
    except ImportError:
        res.error = "imichat_async.export is not available"
        res.targets.append(Target("export wall / plain wall (no target set)", "n/a", None))
        return res
    runs: list[dict[str, Any]] = []
    with SandboxProcess(n, latency=latency) as sb, tempfile.TemporaryDirectory() as tmp:
        for i in range(cfg.runs):
            plain_wall, plain_ids, plain_req = asyncio.run(_plain(sb, k))
            measure.check("plain search", len(plain_ids), n)
            path = Path(tmp) / f"export-{i}.ndjson"
            file_wall, file_ids, file_rep = asyncio.run(_export(sb, k, path))
            cb_wall, cb_ids, cb_rep = asyncio.run(_export(sb, k, None))
            runs.append(
                {
                    "plain": plain_wall,
                    "plain_req": plain_req,
                    "file": file_wall,
                    "file_req": file_rep.requests,
                    "file_ok": file_ids == plain_ids,
                    "cb": cb_wall,
                    "cb_req": cb_rep.requests,
                    "cb_ok": cb_ids == plain_ids,
                    "slices": cb_rep.slices,
                    "splits": cb_rep.splits,
                }
            )
    ideal = ideal_seconds(pages, k, latency)
    table = Table(
        f"Export vs plain search (ideal {ideal:.2f} s)",
        ["variant", "wall (s)", "wall / plain wall", "wall / ideal", "requests", "same chats"],
    )
    for name, key in (
        ("one `search_chats()`", "plain"),
        ("`export_chats` to NDJSON file", "file"),
        ("`export_chats` to async callable", "cb"),
    ):
        ok = "yes" if key == "plain" else ("yes" if all(r[f"{key}_ok"] for r in runs) else "**NO**")

        def vs_plain(r: dict[str, float], key: str = key) -> float:
            return r[key] / r["plain"]

        def vs_ideal(r: dict[str, float], key: str = key) -> float:
            return r[key] / ideal

        table.add(
            name,
            _summarize([r[key] for r in runs]).fmt(3),
            _fmt(per_run(runs, vs_plain)),
            _fmt(per_run(runs, vs_ideal)),
            _summarize([r[f"{key}_req"] for r in runs]).fmt(0),
            ok,
        )
    res.tables.append(table)
    ratio = per_run(runs, lambda r: r["cb"] / r["plain"])
    res.notes.append(
        f"Slices finished: {runs[0]['slices']}, splits: {runs[0]['splits']} (first run)."
    )
    same = all(r["file_ok"] and r["cb_ok"] for r in runs)
    res.targets.append(
        Target(
            "export returns exactly the plain search's chats (no time target set)",
            "yes" if same else "no",
            same,
        )
    )
    if ratio is not None:
        res.notes.append(
            f"Export (callable sink) / plain search wall: {ratio.fmt(3)}; no target was set "
            "for this ratio."
        )
    _cpu_vs_plain(cfg, res)
    return res


def _timed_run(make: Any) -> tuple[Any, float, float]:
    """`asyncio.run(make())`: its result, wall seconds, CPU seconds of this process."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = asyncio.run(make())
    return result, time.perf_counter() - wall0, time.process_time() - cpu0


async def _decoded_search(sb: SandboxProcess, k: int) -> int:
    async with _client(sb, k) as client:
        return sum([1 async for _ in client.search_chats()])


async def _ndjson_export(sb: SandboxProcess, k: int, path: Path) -> Any:
    from imichat_async.export import NdjsonSink, export_chats

    async with _client(sb, k) as client:
        return await export_chats(client, since=SINCE, until=UNTIL, sink=NdjsonSink(path))


def _cpu_vs_plain(cfg: Config, res: ScenarioResult) -> None:
    """#24: export client CPU per chat <= 1.0 x a decoded search's; wall <= 1.3 x, L = 0."""
    n, k = cfg.s9_cpu_chats, cfg.s9_cpu_k
    runs: list[dict[str, float]] = []
    with SandboxProcess(n, latency=0.0) as sb, tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_decoded_search(sb, k))  # warm-up: the sandbox's caches, the allocator
        for i in range(cfg.runs):
            path = Path(tmp) / f"cpu-{i}.ndjson"
            run: dict[str, float] = {}
            for name in ("plain", "export") if i % 2 == 0 else ("export", "plain"):
                if name == "plain":
                    got, wall, cpu = _timed_run(lambda: _decoded_search(sb, k))
                else:
                    report, wall, cpu = _timed_run(lambda path=path: _ndjson_export(sb, k, path))
                    got = report.records
                measure.check(name, got, n)
                run[name], run[f"{name}_cpu"] = wall, cpu
            with path.open("rb") as f:  # outside the timings: the file holds every chat once
                measure.check("export chats", len({json.loads(line)["chat_id"] for line in f}), n)
            path.unlink()
            runs.append(run)
    table = Table(
        f"Export vs decoded search at L = 0 (N = {n}, k = {k}; median (min-max) of {cfg.runs})",
        ["variant", "wall (s)", "client CPU µs / chat", "CPU / plain's", "wall / plain's"],
    )

    def cpu_ratio(r: dict[str, float]) -> float:
        return r["export_cpu"] / r["plain_cpu"]

    def wall_ratio(r: dict[str, float]) -> float:
        return r["export"] / r["plain"]

    for name, label in (("plain", "one `search_chats()`, decoded"), ("export", "NDJSON export")):
        table.add(
            label,
            _summarize([r[name] for r in runs]).fmt(2),
            _summarize([r[f"{name}_cpu"] / n for r in runs]).fmt(1, 1e6),
            "1" if name == "plain" else _fmt(per_run(runs, cpu_ratio), 2),
            "1" if name == "plain" else _fmt(per_run(runs, wall_ratio), 2),
        )
    res.tables.append(table)
    for what, fn, limit in (
        ("export client CPU per chat <= 1.0 x a decoded search's (L = 0)", cpu_ratio, 1.0),
        ("export wall <= 1.3 x a decoded search's (L = 0)", wall_ratio, 1.3),
    ):
        ratio = per_run(runs, fn)
        if ratio is not None:
            res.targets.append(Target(f"{what}, N = {n}", ratio.fmt(2), ratio.median <= limit))


def _fmt(s: Any, digits: int = 3) -> str:
    return "n/a" if s is None else str(s.fmt(digits))
