"""A blocking client for scripts and notebooks: the async client, run on a private loop thread.

    from imichat_async.sync import ImiChatClient

    with ImiChatClient(base_url=..., token=..., team_id=...) as client:
        for chat in client.search_chats(status="closed"):
            ...

Why a thread: `asyncio.run()` fails where a loop already runs (a Jupyter
cell, an async framework calling sync code). So the client starts its own
event loop in a daemon thread it owns (as anyio's `start_blocking_portal`
does) and the caller's thread only waits on it; that works with or without a
loop in the caller's thread. One thread per client, ended by `close()`.

Streaming: each `next()` asks the loop thread for one page (the async
`search_pages` generator steps once), then hands out its chats. The handoff
holds one page; the async engine keeps at most `prefetch` pages ahead, as
with the async client, so memory stays bounded however long the search.

Leaving early (`break`, closing or dropping the generator, an exception, or
Ctrl-C while waiting) closes the async generator on the loop thread, which
cancels and awaits its requests in flight: no task, no held limiter slot,
no connection stays behind. `close()` closes open searches, the client's
session and the loop, and joins the thread (its executor threads too).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterator
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, TypeVar

from ._client import ImiChatClient as AsyncImiChatClient
from ._errors import ConfigurationError, ImiChatError
from ._fetch import ClientStats
from ._records import Chat
from ._results import ChatPage

__all__ = ["ImiChatClient"]

T = TypeVar("T")
SyncTokenSource = str | Callable[[], str] | Callable[[], Awaitable[str]]
_DONE = object()  # the async generator is exhausted


class LimiterView(Protocol):
    """What `ImiChatClient.limiter` shows of the client-wide limiter, whatever its class."""

    @property
    def peak(self) -> int: ...  # the most requests in flight at once so far

    @property
    def in_flight(self) -> int: ...

    @property
    def limit(self) -> int: ...  # the bound now (below `concurrency` while adaptive backs off)

    @property
    def rate(self) -> object: ...  # the send rate in force (None without one)


class ImiChatClient:
    """Blocking `ImiChatClient`: the async client's keywords, errors and guarantees.

    `token` is a `str`, or a zero-argument callable returning one: a plain
    function (run in a worker thread of the client's loop, so it may block) or
    an async one. Every other keyword is the async client's (`concurrency`,
    `timeout`, `max_retries`, `rate_store`, ...) except `session`: a session
    belongs to the loop that made it, and this client runs its own. With
    `rate_store=`, the store's connection and task live on that loop too. Raises what the async
    constructor raises (`ConfigurationError`, `TypeError`).
    """

    def __init__(self, *, token: SyncTokenSource, **kwargs: Any) -> None:
        if kwargs.get("session") is not None:
            raise ConfigurationError(
                "the sync client runs its own event loop; an aiohttp session made on "
                "another loop cannot be used there (drop session=)"
            )
        kwargs.pop("session", None)
        portal = _LoopThread()
        try:
            self._client: AsyncImiChatClient = portal.call(
                functools.partial(AsyncImiChatClient, token=_async_token(token), **kwargs)
            )
        except BaseException:
            portal.stop()
            raise
        self._portal = portal
        self._open: weakref.WeakSet[AsyncGenerator[Any, None]] = weakref.WeakSet()
        # A client dropped without close() still closes its session and ends its thread.
        self._finalizer = weakref.finalize(self, _shutdown, portal, self._client, self._open)

    def __repr__(self) -> str:
        return "<sync " + repr(self._client)[1:]

    def __enter__(self) -> ImiChatClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close open searches and the session, stop the loop and join its thread. Idempotent."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._portal.closed

    @property
    def stats(self) -> ClientStats:
        """The async client's counters (requests, retries, token refreshes, pages, records)."""
        return self._client.stats

    @property
    def limiter(self) -> LimiterView:
        """The client-wide limiter of requests in flight (`peak`, `in_flight`, `limit`)."""
        return self._client.limiter

    @property
    def server_date(self) -> datetime | None:
        """The server's clock at its latest answer (`Date`, aware UTC), as the async client's."""
        return self._client.server_date

    @property
    def async_client(self) -> AsyncImiChatClient:
        """The async client this one drives; use it only in coroutines given to `run`."""
        return self._client

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the client's event loop and wait for its result (or exception).

        For async code using `async_client` (an export, a sync). Interrupted
        (Ctrl-C), `coro` is cancelled on the loop and waited for. Raises
        `ImiChatError` once the client is closed, `RuntimeError` if called from
        the loop thread itself (a coroutine given to `run`).
        """
        return self._portal.run(coro)

    def search_chats(self, **kwargs: Any) -> Iterator[Chat]:
        """Every matching `Chat`, in page order: the keywords of the async `search_chats`.

        Raises `InvalidQueryError` here, at the call, for a bad param, operator,
        value or argument; while iterating, what the async search raises.
        """
        return _chats(self.search_pages(**kwargs))

    def search_pages(self, **kwargs: Any) -> Iterator[ChatPage[Any]]:
        """Like `search_chats`, one `ChatPage` (`number`, `items`, `total`, `last`) at a time."""
        client = self._client
        pages: AsyncGenerator[ChatPage[Any], None] = self._portal.call(
            functools.partial(client.search_pages, **kwargs)
        )
        self._open.add(pages)
        return _pages(self._portal, pages, self._open)


def _chats(pages: Iterator[ChatPage[Any]]) -> Iterator[Chat]:
    with contextlib.closing(pages):  # type: ignore[type-var]  # a generator has close()
        for page in pages:
            yield from page.items


def _pages(
    portal: _LoopThread,
    pages: AsyncGenerator[ChatPage[Any], None],
    open_searches: weakref.WeakSet[AsyncGenerator[Any, None]],
) -> Iterator[ChatPage[Any]]:
    try:
        while True:
            page = portal.run(_step(pages))
            if page is _DONE:
                return
            assert isinstance(page, ChatPage)
            yield page
    finally:
        open_searches.discard(pages)
        portal.close_generator(pages)


async def _step(pages: AsyncGenerator[T, None]) -> T | object:
    try:
        return await pages.__anext__()
    except StopAsyncIteration:
        return _DONE


def _async_token(token: SyncTokenSource) -> Any:
    """The token in the async client's form: a plain callable runs in the loop's executor."""
    if isinstance(token, str) or not callable(token):
        return token  # the async client checks it
    if inspect.iscoroutinefunction(token) or inspect.iscoroutinefunction(
        getattr(token, "__call__", None)  # noqa: B004  # an object with an async __call__
    ):
        return token

    async def fetch() -> Any:
        result = await asyncio.to_thread(token)  # may block (an HTTP call): not on the loop
        if inspect.isawaitable(result):
            result = await result
        return result

    return fetch


def _shutdown(
    portal: _LoopThread,
    client: AsyncImiChatClient,
    open_searches: weakref.WeakSet[AsyncGenerator[Any, None]],
) -> None:
    """Close the searches still open and the client on the loop, then stop it."""
    if portal.closed:
        return

    async def close_all() -> None:
        await portal.cancel_running()
        for pages in list(open_searches):
            with contextlib.suppress(Exception):
                await pages.aclose()
        await client.close()

    if portal.on_loop_thread():  # garbage collected on the loop thread: nothing may block
        portal.spawn(close_all()).add_done_callback(lambda _: portal.stop())
        return
    try:
        portal.run(close_all())
    finally:
        portal.stop()


class _LoopThread:
    """An event loop in a daemon thread, and blocking calls into it from other threads."""

    def __init__(self) -> None:
        self.closed = False
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.main_task: asyncio.Task[Any] | None = None  # the loop's own, waiting for stop()
        self._stop: asyncio.Event | None = None
        self._running: set[asyncio.Task[Any]] = set()
        self._spawned: set[asyncio.Task[Any]] = set()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="imichat-sync-loop", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            # asyncio.run ends by cancelling leftovers, closing async generators and joining
            # the default executor's threads.
            asyncio.run(self._serve())
        except BaseException as exc:  # only if the loop could not start
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.main_task = asyncio.current_task()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()

    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()` on the loop thread; its result or its exception here."""

        async def run_fn() -> T:
            return fn()

        return self.run(run_fn())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop and wait for it. Interrupted (Ctrl-C), it is cancelled there
        and waited for, so it never runs on behind the caller's back."""
        if self.closed or self._loop is None:
            coro.close()
            raise ImiChatError("the client is closed")
        if self.on_loop_thread():
            coro.close()
            raise RuntimeError("the sync client cannot be called from its own loop thread")
        finished = threading.Event()
        try:
            future = asyncio.run_coroutine_threadsafe(self._tracked(coro, finished), self._loop)
        except RuntimeError:  # the loop closed meanwhile
            coro.close()
            raise ImiChatError("the client is closed") from None
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise ImiChatError("the client was closed during the call") from None
        except BaseException:
            if not future.done():
                future.cancel()
                finished.wait()
            raise

    async def _tracked(self, coro: Coroutine[Any, Any, T], finished: threading.Event) -> T:
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)
        try:
            return await coro
        finally:
            self._running.discard(task)
            finished.set()

    async def cancel_running(self) -> None:
        """Cancel the calls other threads are waiting on (close() from another thread)."""
        current = asyncio.current_task()
        others = [t for t in self._running if t is not current]
        for task in others:
            task.cancel()
        if others:
            await asyncio.gather(*others, return_exceptions=True)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A task on the loop, from the loop thread, kept referenced until done."""
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)
        return task

    def close_generator(self, pages: AsyncGenerator[Any, None]) -> None:
        """Close an async generator on the loop (cancelling its requests) and wait for it."""
        if self.closed:
            return
        if self.on_loop_thread():  # finalized by the garbage collector on the loop thread
            self.spawn(pages.aclose())
            return
        self.run(pages.aclose())

    def stop(self) -> None:
        """End the loop (asyncio.run's cleanup) and join the thread, unless called from it."""
        if self.closed:
            return
        self.closed = True
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # already closed
                self._loop.call_soon_threadsafe(self._stop.set)
        if not self.on_loop_thread():
            self._thread.join()
