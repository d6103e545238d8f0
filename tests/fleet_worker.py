"""One worker of a fleet, as its own process: `python -m tests.fleet_worker CONFIG_JSON`.

Reads every chat of the tenant with its own `ImiChatClient` (the config's
keywords), prints `page <monotonic time>` as each page is yielded, then
`done <json>`: the chat ids in order and the client's stats.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from imichat_async import ImiChatClient


async def work(config: dict[str, Any]) -> dict[str, Any]:
    ids: list[str] = []
    async with ImiChatClient(**config) as client:
        async for page in client.search_pages(raw=True):
            ids.extend(str(chat["chat_id"]) for chat in page.items)
            print(f"page {time.monotonic()}", flush=True)
        stats = client.stats
    return {
        "ids": ids,
        "requests": stats.requests,
        "fallbacks": stats.rate_store_fallbacks,
    }


def main() -> None:
    result = asyncio.run(work(json.loads(sys.argv[1])))
    print("done " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
