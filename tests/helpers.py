"""Small assertions shared by the tests."""

from __future__ import annotations

import asyncio
import os

import imichat_async

_LIBRARY = os.path.dirname(imichat_async.__file__)
_SANDBOX = os.path.join(_LIBRARY, "sandbox")


def _is_client_side(task: asyncio.Task[object]) -> bool:
    """A task running library code (not the in-process sandbox server's handlers)."""
    coro = task.get_coro()
    code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
    filename = getattr(code, "co_filename", "")
    if filename.startswith(_SANDBOX):
        return False
    return filename.startswith(_LIBRARY) or "aiohttp/client" in filename


async def assert_no_stray_tasks() -> None:
    """No task of the library is left on the loop (after letting cancellations land).

    The sandbox may share the loop in tests; its request handlers are not the client's.
    """
    for _ in range(5):
        await asyncio.sleep(0)
    current = asyncio.current_task()
    stray = [
        t for t in asyncio.all_tasks() if t is not current and not t.done() and _is_client_side(t)
    ]
    assert stray == [], f"tasks left behind: {stray}"
