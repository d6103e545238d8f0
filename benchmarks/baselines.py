"""The baselines, written as a user of aiohttp would write them without this library.

They speak the same wire contract (POST {base_url}/chats/search?page=n, bearer
token and teamid headers, an empty filter list) and return raw JSON objects:
`json.loads` only, no decoding, no retries. Each calls `consume(record)` per
record (a no-op by default, so that memory stays flat) and returns the number
of records and the number of HTTP requests it sent.

1. `sequential`: page 1, 2, ... until an empty page.
2. `gather_windows`: `asyncio.gather` over windows of k pages, a semaphore of k,
   until a window holds a short page.
3. `workers` (the CPU floor of scenario 2): k worker coroutines pulling page
   numbers from a shared counter, so k requests stay in flight continuously,
   until one sees an empty page. No ordering, no decoding: the least a
   concurrent fetch can cost.
4. `retry_loop` (the reference of scenario 10): `workers`, plus a failure
   retried at once (no backoff): what the server and its faults allow.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from typing import Any, NamedTuple

import aiohttp

BODY = json.dumps({"condition": "and", "filters": []}).encode()


class Outcome(NamedTuple):
    records: int
    requests: int


def _drop(record: dict[str, Any]) -> None:
    pass


def _headers(token: str, team_id: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "teamid": team_id,
        "Content-Type": "application/json",
        "Accept": "application/json",
    }


async def _get_page(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], page: int
) -> list[dict[str, Any]]:
    async with session.post(url, params={"page": page}, headers=headers, data=BODY) as resp:
        resp.raise_for_status()
        doc = json.loads(await resp.read())
    records: list[dict[str, Any]] = doc["response"] or []
    return records


async def sequential(
    base_url: str,
    token: str,
    team_id: str,
    consume: Callable[[dict[str, Any]], None] = _drop,
) -> Outcome:
    """Baseline 1: one page after the other until an empty page."""
    url = f"{base_url}/chats/search"
    headers = _headers(token, team_id)
    count = requests = 0
    async with aiohttp.ClientSession() as session:
        page = 1
        while True:
            records = await _get_page(session, url, headers, page)
            requests += 1
            if not records:
                break
            for record in records:
                consume(record)
            count += len(records)
            page += 1
    return Outcome(count, requests)


async def gather_windows(
    base_url: str,
    token: str,
    team_id: str,
    k: int,
    consume: Callable[[dict[str, Any]], None] = _drop,
) -> Outcome:
    """Baseline 2: `asyncio.gather` over windows of k pages, under a semaphore of k."""
    url = f"{base_url}/chats/search"
    headers = _headers(token, team_id)
    semaphore = asyncio.Semaphore(k)
    count = requests = 0
    async with aiohttp.ClientSession() as session:

        async def fetch(page: int) -> list[dict[str, Any]]:
            async with semaphore:
                return await _get_page(session, url, headers, page)

        first = 1
        done = False
        while not done:
            window = await asyncio.gather(*(fetch(p) for p in range(first, first + k)))
            requests += k
            for records in window:
                for record in records:
                    consume(record)
                count += len(records)
                if len(records) < 10:
                    done = True
                    break
            first += k
    return Outcome(count, requests)


async def workers(
    base_url: str, token: str, team_id: str, k: int, *, retry: bool = False
) -> Outcome:
    """The raw floor: k workers, k requests in flight continuously, json.loads only.

    With `retry`, a failed request (an error status, a reset, a bad body) is sent again at
    once, with no backoff: the raw retry loop.
    """
    url = f"{base_url}/chats/search"
    headers = _headers(token, team_id)
    pages = itertools.count(1)
    end = asyncio.Event()
    count = requests = 0
    connector = aiohttp.TCPConnector(limit=k)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal count, requests
            while not end.is_set():
                page = next(pages)
                while True:
                    requests += 1
                    try:
                        records = await _get_page(session, url, headers, page)
                        break
                    except (aiohttp.ClientError, ValueError, KeyError):
                        if not retry:
                            raise
                count += len(records)
                if len(records) < 10:
                    end.set()

        await asyncio.gather(*(worker() for _ in range(k)))
    return Outcome(count, requests)


async def retry_loop(base_url: str, token: str, team_id: str, k: int) -> Outcome:
    """What the server and the faults allow: k requests always in flight, a failure retried at
    once (no backoff, no order, no decoding), until one worker sees a short page."""
    return await workers(base_url, token, team_id, k, retry=True)
