"""Scenario 4's child: stream chats in a fresh process and report its peak RSS growth.

    python -m benchmarks.memory_probe BASE_URL TEAM_ID --pages P --concurrency K [--keep]

The token comes on stdin (never on the command line). A fresh process per
measurement so that peaks never mix. After a warm-up search (session, caches,
allocator pools), it takes the current RSS, resets the kernel's peak
(`/proc/self/clear_refs`, Linux) and samples RSS every 2 ms while streaming;
the peak is the larger of the kernel's high-water mark and the samples. The
consumer drops each record, or keeps them all with `--keep` (a contrast that
shows the probe does see growth). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import imichat_async as imi

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return _status_kb("VmRSS") * 1024


def _status_kb(key: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> bool:
    """Reset the kernel's peak RSS (VmHWM); False where that is not possible."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = rss_bytes()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        self.peak = max(self.peak, rss_bytes())
        return self.peak


async def probe(
    base_url: str, token: str, team_id: str, pages: int, concurrency: int, keep: bool
) -> dict[str, Any]:
    kept: list[imi.Chat] = []
    async with imi.ImiChatClient(
        base_url=base_url, token=token, team_id=team_id, concurrency=concurrency
    ) as client:
        async for _ in client.search_chats(max_pages=20):  # warm-up
            pass
        gc.collect()
        before = rss_bytes()
        cleared = reset_peak()
        sampler = Sampler()
        sampler.start()
        started = time.perf_counter()
        records = 0
        async for chat in client.search_chats(max_pages=pages):
            records += 1
            if keep:
                kept.append(chat)
        wall = time.perf_counter() - started
        peak = sampler.stop()
        if cleared:
            peak = max(peak, _status_kb("VmHWM") * 1024)
        return {
            "records": records,
            "rss_before": before,
            "rss_peak": peak,
            "growth": peak - before,
            "wall": wall,
            "peak_in_flight": client.limiter.peak,
            "kernel_peak": cleared,
            "kept": len(kept),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("base_url")
    parser.add_argument("team_id")
    parser.add_argument("--pages", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    token = sys.stdin.readline().strip()
    result = asyncio.run(
        probe(args.base_url, token, args.team_id, args.pages, args.concurrency, args.keep)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
