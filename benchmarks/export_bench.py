"""Scenario 9: `imichat_async.export.export_chats` (time slices) vs one plain `search_chats()`.

Same tenant, same latency, same client concurrency. The export covers every
chat's `created_at` (a range wider than the data); its output is checked to
hold exactly the chats of the plain search (as sets of `chat_id`: the export
writes slice by slice, not in page order).
"""

from __future__ import annotations

import asyncio
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
        import json

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
        "`search_chats()`; the export to an NDJSON file (fsync after every slice) and to "
        "an async callable. Every run's output is checked against the plain search's "
        f"chat ids. Median (min-max) of {cfg.runs}.",
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
    return res


def _fmt(s: Any, digits: int = 3) -> str:
    return "n/a" if s is None else str(s.fmt(digits))
