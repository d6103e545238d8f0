"""One worker of a fleet, as its own process: `python -m benchmarks.fleet_worker CONFIG_JSON`.

Used by scenario 15 and by tests/test_ratestore.py. The config holds the
client's keywords, and `"barrier": true` to wait for a line on stdin before
starting (so that a fleet starts together, its imports done). The worker reads
every chat of the tenant with its own `ImiChatClient`, prints
`page <monotonic time>` as each page is yielded, `answered <time> <pages>` every
0.1 s, then `done <json>`: the chat
ids in order, the client's stats, and the monotonic times of the start and the
end of its search (CLOCK_MONOTONIC: one clock for every process of the machine).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from imichat_async import ImiChatClient

from .sandbox_proc import ROOT


class Worker:
    """The parent's side: start a worker (`barrier=True`: it waits for `go()`), read its
    page times as they come, `wait()` for its result, or `kill()` it (SIGKILL)."""

    def __init__(self, config: dict[str, Any], *, barrier: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.fleet_worker", json.dumps(
                {**config, "barrier": barrier})],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )  # fmt: skip
        self.pages: list[float] = []
        self.answered: list[tuple[float, int]] = []  # (time, pages answered by then)
        self.result: dict[str, Any] | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            kind, _, rest = line.partition(" ")
            if kind == "page":
                self.pages.append(float(rest))
            elif kind == "answered":
                at, pages = rest.split()
                self.answered.append((float(at), int(pages)))
            elif kind.strip() == "ready":
                self._ready.set()
            elif kind == "done":
                self.result = json.loads(rest)
        self._ready.set()

    def answered_by(self, when: float) -> int:
        """Pages answered by `when` (as last reported before it)."""
        return max((n for t, n in self.answered if t <= when), default=0)

    def ready(self, timeout: float = 60) -> None:
        """Wait until its imports are done and it waits for `go()`."""
        self._ready.wait(timeout)

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = 300) -> dict[str, Any] | None:
        """Its result (None if it died), once it has exited; killed if it takes longer."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
            raise
        self._reader.join(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        return self.result

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)


async def work(config: dict[str, Any]) -> dict[str, Any]:
    ids: list[str] = []
    async with ImiChatClient(**config) as client:
        started = time.monotonic()
        ticker = asyncio.ensure_future(_tick(client))
        try:
            async for page in client.search_pages(raw=True):
                ids.extend(str(chat["chat_id"]) for chat in page.items)
                print(f"page {time.monotonic()}", flush=True)
        finally:
            ticker.cancel()
        ended = time.monotonic()
        stats = client.stats
    return {
        "ids": ids,
        "requests": stats.requests,
        "fallbacks": stats.rate_store_fallbacks,
        "started": started,
        "ended": ended,
    }


async def _tick(client: ImiChatClient) -> None:
    """`answered <time> <pages>` every 0.1 s: pages answered so far, in whatever order (the
    pages yielded wait for the head, which may be waiting out a Retry-After)."""
    while True:
        print(f"answered {time.monotonic()} {client.stats.pages}", flush=True)
        await asyncio.sleep(0.1)


def main() -> None:
    logging.getLogger("imichat_async").setLevel(logging.ERROR)  # retry warnings cost CPU
    config = json.loads(sys.argv[1])
    if config.get("rate_store"):
        import redis.asyncio  # noqa: F401  # paid once per process, before the start
    if config.pop("barrier", False):
        print("ready", flush=True)
        sys.stdin.readline()
    result = asyncio.run(work(config))
    print("done " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
