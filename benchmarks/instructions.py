"""Instructions per record, counted by valgrind: the CPU figures of #24 without the noise.

CPU time on this shared 2-core VM moves +-30 % between repetitions of the same
run (scenario 2), which hides a 4 % change. Instructions executed do not move:
valgrind (`cachegrind --cache-sim=no`) counts those of the client process, the
sandbox serving it from another process, not counted. Each figure is the
difference of two runs that differ only in how much work they do (400 and 100
pages; 5 and 1 passes), so start-up and imports cancel out. Kernel time (the
socket calls) is not counted: it is the same for every variant of a row.

    python -m benchmarks.instructions            # needs `valgrind` on PATH

The client runs are k = 8, L = 0, as scenario 2: the raw floor (aiohttp +
`json.loads`, 8 workers), `search_chats()`, and `search_pages(raw="text")`
(every cost of a decoded search but the decoding). The in-process rows split
the decoding: parsing a page body, building the records, and `Chat(...)` alone.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable

import aiohttp

import imichat_async as imi
from imichat_async import _protocol as protocol
from imichat_async import _records as records
from imichat_async._client import _PARSE_CHATS

from . import baselines, decoders
from .sandbox_proc import ROOT, SandboxProcess

K = 8
PAGES = (100, 400)  # client runs: the figure is the difference, per record
PASSES = (1, 5)  # in-process runs over SAMPLE records
SAMPLE = 1000
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


async def _floor(cfg: dict[str, str], pages: int) -> int:
    """The raw floor (scenario 2's), stopped after `pages` pages."""
    url = f"{cfg['base_url']}/chats/search"
    headers = baselines._headers(cfg["token"], cfg["team_id"])
    numbers = itertools.count(1)
    count = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=K)) as session:

        async def worker() -> None:
            nonlocal count
            while (page := next(numbers)) <= pages:
                got = await baselines._get_page(session, url, headers, page)
                count += len(got)

        await asyncio.gather(*(worker() for _ in range(K)))
    return count


async def _client(cfg: dict[str, str], pages: int, raw: bool) -> int:
    count = 0
    async with imi.ImiChatClient(
        base_url=cfg["base_url"], token=cfg["token"], team_id=cfg["team_id"], concurrency=K
    ) as client:
        if raw:
            async for page in client.search_pages(raw="text", max_pages=pages):
                count += len(page.items)
        else:
            async for _ in client.search_chats(max_pages=pages):
                count += 1
    return count


def _in_process(which: str, passes: int) -> int:
    """`passes` passes of one in-process step over SAMPLE sandbox records, each page's
    result dropped before the next (as the client drops a page once it is consumed)."""
    bodies, _ = decoders.sample_pages(SAMPLE)
    typed = [_PARSE_CHATS(200, {}, b, 1) for b in bodies]

    def loads() -> None:
        for b in bodies:
            json.loads(b)

    def parse_typed() -> None:
        for b in bodies:
            _PARSE_CHATS(200, {}, b, 1)

    def parse_texts() -> None:
        for b in bodies:
            protocol.parse_texts(200, {}, b, 1)

    def build() -> None:
        for d in typed:
            records.decode_page(d.records, 1, typed=True)

    def construct() -> None:
        for _ in range(SAMPLE):
            records.Chat("c", "a", None, None, "closed", "sms", None, "x", "y", "z", None, [], {})

    steps: dict[str, Callable[[], None]] = dict(
        zip(PROCESS_ROWS, [loads, parse_typed, parse_texts, build, construct], strict=True)
    )
    for _ in range(passes):
        steps[which]()
    return SAMPLE * passes


CLIENT_ROWS = {
    "raw floor: aiohttp + json.loads, k workers": lambda c, p: _floor(c, p),
    "`search_chats()` (decoded attrs records)": lambda c, p: _client(c, p, False),
    '`search_pages(raw="text")` (no decoding)': lambda c, p: _client(c, p, True),
}
PROCESS_ROWS = [
    "json.loads alone",
    "parse: typed, as the client reads a page",
    'parse: records as texts (`raw="text"`)',
    "build the records from a typed page (cattrs)",
    "`Chat(...)` alone (attrs' frozen, slotted `__init__`)",
]


def _child(argv: list[str]) -> None:
    kind, which, amount = argv[0], argv[1], int(argv[2])
    if kind == "client":
        cfg = json.loads(os.environ["IMICHAT_BENCH_SANDBOX"])
        got = asyncio.run(CLIENT_ROWS[which](cfg, amount))
        if got != amount * protocol.PAGE_SIZE:
            raise SystemExit(f"{which}: {got} records for {amount} pages")
    else:
        _in_process(which, amount)


def _count(args: list[str], env: dict[str, str]) -> int:
    out = subprocess.run(
        [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
            sys.executable,
            "-m",
            "benchmarks.instructions",
            "--child",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=True,
    )
    found = _REFS.search(out.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{out.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_record(kind: str, which: str, env: dict[str, str]) -> float:
    small, large = PAGES if kind == "client" else PASSES
    records_ = (large - small) * (protocol.PAGE_SIZE if kind == "client" else SAMPLE)
    a = _count([kind, which, str(small)], env)
    b = _count([kind, which, str(large)], env)
    return (b - a) / records_


def main() -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    rows: list[tuple[str, float]] = []
    with SandboxProcess(PAGES[1] * protocol.PAGE_SIZE) as sb:
        env = dict(os.environ)
        env["IMICHAT_BENCH_SANDBOX"] = json.dumps(
            {"base_url": sb.base_url, "token": sb.token, "team_id": sb.team_id}
        )
        for name in CLIENT_ROWS:
            rows.append((name, per_record("client", name, env)))
    for name in PROCESS_ROWS:
        rows.append((name, per_record("process", name, env)))
    floor = rows[0][1]
    print("| what | instructions / record | / raw floor |")
    print("|---|---|---|")
    for name, n in rows:
        print(f"| {name} | {n:,.0f} | {n / floor:.3f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2:])
    else:
        main()
