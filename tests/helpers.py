"""Small assertions shared by the tests."""

from __future__ import annotations

import ast
import asyncio
import os
from pathlib import Path

import pytest

import imichat_async
from benchmarks.redis_proc import RedisMissing, RedisServer

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


def imported_modules(path: Path, package: str) -> set[str]:
    """The absolute names of the modules `path` (a module of `package`) imports, and of
    each name it imports from one (which may be a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            full = ".".join(part for part in (base, node.module) if part)
            names.add(full)
            names.update(f"{full}.{alias.name}" for alias in node.names)
    return names


def started(server: RedisServer) -> RedisServer:
    """`server.start()`, or the test skipped naming the Debian package when `redis-server` is
    not installed (`.ci/run` installs it, so CI never skips)."""
    try:
        return server.start()
    except RedisMissing as exc:
        pytest.skip(str(exc))
