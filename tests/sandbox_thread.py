"""A sandbox served from a background thread, for tests that run the CLI (which owns its
event loop) or a subprocess against it."""

from __future__ import annotations

import asyncio
import os
import threading
from types import TracebackType
from typing import Any

from imichat_async.sandbox import Sandbox, serve


class ThreadedSandbox:
    """`with ThreadedSandbox(chats=..., latency=...) as sb:` serves `sb` until the block ends."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.sandbox: Sandbox | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="sandbox", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced by __enter__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(**self.kwargs) as sb:
            self.sandbox = sb
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> Sandbox:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None or self.sandbox is None:
            raise RuntimeError(f"sandbox did not start: {self._error!r}")
        return self.sandbox

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


def env_for(sb: Sandbox, token: str | None = None) -> dict[str, str]:
    """The process environment with the sandbox's credentials in IMICHAT_*."""
    env = dict(os.environ)
    env.update(
        IMICHAT_BASE_URL=sb.base_url,
        IMICHAT_TOKEN=token if token is not None else sb.token,
        IMICHAT_TEAM_ID=sb.team_id,
    )
    return env
