"""Peak RSS growth of one `export_chats` run, in a fresh process, against a sandbox process.

    python -m benchmarks.export_memory --chats 10000 --chats 200000

For each size it starts the sandbox in its own process (`SandboxProcess`),
then a fresh child (`--child`) that warms up, resets the kernel's peak RSS and
exports every chat to an async callable that drops them; the child prints the
growth of its peak RSS over the RSS before the export, and the chats written.
An export that keeps a set of every chat id seen grows with the export; one
that de-duplicates within a slice stays flat.

`--format ndjson|parquet --out PATH` (child) exports to that sink instead: scenario 13
(`parquet_bench.py`) compares the two, wall and peak RSS, through `run_child`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import time
from typing import Any

import imichat_async as imi

from .memory_probe import Sampler, _status_kb, reset_peak, rss_bytes
from .sandbox_proc import ROOT, SandboxProcess

SINCE = "2024-01-01T00:00:00Z"
UNTIL = "2025-01-02T00:00:00Z"


async def _probe(
    base_url: str,
    token: str,
    team_id: str,
    concurrency: int,
    fmt: str | None = None,
    out: str | None = None,
) -> dict[str, Any]:
    from imichat_async.export import CallableSink, Sink, export_chats, make_sink

    written = 0

    async def drop(record: Any) -> None:
        nonlocal written
        written += 1

    # Built before the baseline: a Parquet sink imports pyarrow (its libraries are not the
    # export's memory; `peak` below reports the whole process for that comparison).
    sink: Sink = CallableSink(drop) if fmt is None else make_sink(out or "", fmt)

    async with imi.ImiChatClient(
        base_url=base_url, token=token, team_id=team_id, concurrency=concurrency
    ) as client:
        async for _ in client.search_chats(max_pages=20):  # warm-up: session, pools
            pass
        gc.collect()
        before = rss_bytes()
        cleared = reset_peak()
        sampler = Sampler()
        sampler.start()
        started, cpu = time.perf_counter(), time.process_time()
        report = await export_chats(client, since=SINCE, until=UNTIL, sink=sink)
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu  # every thread's (a Parquet sink's writers too)
        peak = sampler.stop()
        if cleared:
            peak = max(peak, _status_kb("VmHWM") * 1024)
    return {
        "records": report.records,
        "written": written if fmt is None else report.records,
        "wall": wall,
        "cpu": cpu,
        "peak": peak,
        "rss_before": before,
        "growth": peak - before,
        "requests": report.requests,
        "elapsed": report.elapsed,
    }


def run_child(
    sb: SandboxProcess, concurrency: int, fmt: str | None = None, out: str | None = None
) -> dict[str, Any]:
    """One export from `sb` in a fresh child process (to `fmt` at `out`, else dropped)."""
    child = ["--child", sb.base_url, sb.team_id, "--concurrency", str(concurrency)]
    if fmt is not None:
        child += ["--format", fmt, "--out", out or ""]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.export_memory", *child],
        input=sb.token + "\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def measure(chats: int, concurrency: int) -> dict[str, Any]:
    """One export of `chats` chats in a fresh child process; its JSON result."""
    with SandboxProcess(chats) as sb:
        result = run_child(sb, concurrency)
    result["chats"] = chats
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chats", type=int, action="append")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--child", nargs=2, metavar=("BASE_URL", "TEAM_ID"))
    parser.add_argument("--format", default=None, choices=["ndjson", "csv", "parquet"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child:
        token = sys.stdin.readline().strip()
        base_url, team_id = args.child
        probe = _probe(base_url, token, team_id, args.concurrency, args.format, args.out)
        print(json.dumps(asyncio.run(probe)))
        return
    for chats in args.chats or [10_000, 200_000]:
        r = measure(chats, args.concurrency)
        print(
            f"chats={r['chats']} written={r['written']} peak RSS growth="
            f"{r['growth'] / 2**20:.1f} MB requests={r['requests']} elapsed={r['elapsed']:.1f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
