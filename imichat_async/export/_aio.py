"""No task or thread outlives its owner: waiting through cancellations, blocking calls in threads.

A cancellation that arrives while cleanup waits for tasks (or for a thread
that cannot be stopped) must not end the wait early: the owner would return
while the work still runs (and may write to a file the owner then closes).
So both helpers wait until the work is done, however many cancellations
arrive, and only then re-raise the cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_all(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Wait until every task is done (their errors ignored); then re-raise a cancellation
    that arrived meanwhile. Raises `asyncio.CancelledError` only after all are done."""
    pending = list(tasks)
    cancelled = False
    while pending:
        try:
            await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))
        except asyncio.CancelledError:
            cancelled = True
        pending = [t for t in pending if not t.done()]
    if cancelled:
        raise asyncio.CancelledError


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel the tasks and wait until they are all done (see `wait_all`)."""
    pending = list(tasks)
    for t in pending:
        t.cancel()
    await wait_all(pending)


async def uncancelled(aw: Awaitable[T]) -> T:
    """Await `aw` to its end even if cancelled meanwhile; then re-raise the cancellation.

    For work that must not stop half-way (a slice's sync and its checkpoint).
    """
    task = asyncio.ensure_future(aw)
    await wait_all([task])
    return task.result()


async def in_thread(fn: Callable[..., T], *args: Any, executor: Executor | None = None) -> T:
    """`fn(*args)` in a worker thread, so blocking I/O (fsync) does not stall the event loop:
    one of the loop's default executor, or of `executor`.

    A cancellation waits for the call to finish, then propagates; `fn`'s own error is raised.
    """
    if executor is None:
        return await uncancelled(asyncio.to_thread(fn, *args))
    return await uncancelled(asyncio.get_running_loop().run_in_executor(executor, fn, *args))
