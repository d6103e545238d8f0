"""A dlt source: the tenant's chats, kept current in any dlt destination by the sync's plan.

    import dlt
    from imichat_async.dlt import chats_source

    pipeline = dlt.pipeline("imichat", destination="duckdb", dataset_name="imichat")
    pipeline.run(chats_source(base_url=..., token=..., team_id=..., since="2024-01-01"))

Needs the `dlt` extra (`pip install 'imichat-async[dlt]'`). This module is
`imichat_async.dlt`; inside it `import dlt` is the dlt library (imports are
absolute), so the two names never meet.

What it loads: one resource, `chats`, primary key `chat_id`, write
disposition `merge`, `updated_at` hinted `dedup_sort: desc`. Each load is one
run of `sync_chats` (README "Incremental sync"): the first reads the chats
created since `since`; each later one the chats created or updated in
`[B - lag, T1)`, B the previous completed run's start. Merge replaces a
chat's row, and `dedup_sort` keeps its newest version when one load carries
two (the lag window, or a chat changed while the run read it): one row per
chat, its current version.

The cursor is the sync's `SyncState`, kept in dlt's resource state
(`state_to_json(state)` under `"sync"`, the run's `SyncReport.summary()`
under `"last_run"`), not `dlt.sources.incremental`
on `updated_at`: the lower bound must be the previous run's START instant,
not the highest `updated_at` seen, or a version written while a long run
read the rest would be skipped. dlt commits resource state with the load
package, so a load that fails after the sync finished is re-delivered (the
pending package is loaded first, or, with the working directory lost, the
state restored from the destination predates the run and the run is read
again): at least once into dlt, and exactly one row per chat thanks to
merge on `chat_id`.

Why a loop thread: the sync runs on the library's async engine (the
concurrent client, its limiter and retries), on the private event loop of
the blocking client (`imichat_async.sync`), while dlt iterates a plain
generator on its own thread, where `dlt.current.resource_state()` works.
Between them a bounded handoff: the sync waits while `HANDOFF_SIZE` chats
are not yet taken by dlt, so memory holds that many chats plus the pages in
flight, whatever the range (a year of chats is never held at once).

Chats are yielded as the server sent them (raw JSON objects): dlt types and
flattens them itself (`asset` becomes `asset__id`, `asset__name`; `tag`, a
list, the child table `chats__tag`; `other_details` one column per key).
Hints fix what inference cannot: `created_at`/`updated_at` are timestamps,
`asset__id` text (the server sends an int or a string; `123` loads as "123").
A null `asset`, `other_details` or `tag` (the contract allows it) is left out
of the row dlt gets: dlt flattens these into other columns and tables, so a
null one would be a column of its own that never gets data (dlt warns of it
on the first load, and never makes it); left out, its columns are NULL all
the same. A type hint instead would make those columns, always empty.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable, Iterator, Mapping
from datetime import date, datetime
from typing import Any

import dlt
from dlt.extract.source import DltSource

from ._query import Filter
from ._ratestore import RedisRateStore
from .export import (
    DEFAULT_LAG,
    CheckpointError,
    SyncReport,
    SyncState,
    check_sync_arguments,
    state_from_json,
    state_to_json,
    sync_chats,
)
from .sync import ImiChatClient as BlockingClient
from .sync import SyncTokenSource

__all__ = ["HANDOFF_SIZE", "chats_source"]

HANDOFF_SIZE = 1000  # chats handed to dlt but not yet taken: the sync waits beyond this
_BATCH = 500  # the most chats dlt takes in one hop between threads
#: how the sync's messages say to start over with a state dlt keeps
_NAMES = {"new_state": 'load into a new pipeline (or run with refresh="drop_resources")'}
_END = object()  # the sync finished (or failed): nothing more will come
RawRecord = Mapping[str, Any]  # a chat as the server sent it
#: The fields dlt flattens into columns of their own (`asset__id`) or a child table (`tag`).
_NESTED = ("asset", "other_details", "tag")


def chats_source(
    *,
    base_url: str,
    token: SyncTokenSource,
    team_id: str,
    since: datetime | date | str,
    concurrency: int = 8,
    lag: float = DEFAULT_LAG,
    filters: Iterable[Filter | tuple[str, str, Any]] | None = None,
    client_options: Mapping[str, Any] | None = None,
    rate_store: str | RedisRateStore | None = None,
    **params: Any,
) -> DltSource:
    """A dlt source (`imichat`) with one resource, `chats`, loaded incrementally by merge.

    - `base_url`, `token` (a `str` or a callable returning one, plain or async),
      `team_id`, `concurrency`: the client's; `client_options` any other client
      keyword (`timeout`, `max_retries`, ...).
    - `rate_store`: a `redis://` URL (or `RedisRateStore`, extra `redis`): the
      pipeline learns its send rate with every other client of the tenant on
      that store (README "Fleet: one rate budget"); it then learns (`adaptive=True`).
    - `since`: the chats created since then are loaded and kept current.
    - `lag`: seconds re-read below the previous run's start (default 300).
    - `filters` and keyword filters (`status="closed"`) narrow every query;
      `created_at`/`updated_at` filters are refused (the sync owns them).

    Raises `InvalidQueryError` here, before any request, for a bad filter,
    `since` or `lag`. While loading: the client's errors, and `CheckpointError`
    when the resource state was made with another `since`, `lag` or filters, or
    for another tenant (`base_url` host, port and path, `team_id`) (load into a
    new pipeline, or run with `refresh="drop_resources"`).
    """
    filter_list = tuple(filters or ())
    check_sync_arguments(since=since, lag=lag, filters=filter_list, **params)
    client_kwargs = {
        **(client_options or {}),
        "base_url": base_url,
        "token": token,
        "team_id": team_id,
        "concurrency": concurrency,
    }
    if rate_store is not None:
        client_kwargs.setdefault("adaptive", True)
        client_kwargs["rate_store"] = rate_store
    sync_kwargs = {"since": since, "lag": lag, "filters": filter_list, **params}

    def chats() -> Iterator[list[RawRecord]]:
        yield from _load(dlt.current.resource_state(), client_kwargs, sync_kwargs)

    resource = dlt.resource(
        chats,
        name="chats",
        primary_key="chat_id",
        write_disposition="merge",
        columns={
            "chat_id": {"data_type": "text", "nullable": False},
            "created_at": {"data_type": "timestamp"},
            # an int or a str on the wire (`Asset.id`): one text column, not a variant pair
            "asset__id": {"data_type": "text"},
            # an instant, not text: as text "...:11Z" sorts after "...:11.001Z"
            "updated_at": {"data_type": "timestamp", "dedup_sort": "desc"},
        },
    )

    @dlt.source(name="imichat")
    def imichat() -> Any:
        return resource

    source: DltSource = imichat()
    return source


def _load(
    saved: dict[str, Any], client_kwargs: dict[str, Any], sync_kwargs: dict[str, Any]
) -> Iterator[list[RawRecord]]:
    """One sync run, its chats yielded in batches; `saved` (dlt's resource state) updated
    only when the run completed."""
    raw = saved.get("sync")
    state = SyncState() if raw is None else state_from_json(raw)
    with BlockingClient(**client_kwargs) as blocking:
        # The blocking client's loop thread and async client: the sync's engine.
        client = blocking.async_client
        handoff = DltHandoff(HANDOFF_SIZE)  # asyncio's queue and semaphore bind at first use

        async def produce() -> SyncReport:
            try:
                return await sync_chats(client, state=state, sink=handoff, **sync_kwargs)
            finally:
                handoff.finish()

        task = blocking.run(_start(produce()))
        try:
            while batch := blocking.run(handoff.take(_BATCH)):
                yield batch
            report = blocking.run(_result(task))
        except CheckpointError as exc:  # say how to start over in dlt's terms
            raise CheckpointError(exc.worded(_NAMES)) from None
        finally:  # dlt stopped early, or the sync failed: nothing runs on
            blocking.run(_cancel(task))
    saved["sync"] = state_to_json(state)
    saved["last_run"] = report.summary()


class DltHandoff:
    """The sync's sink: a bounded queue of chats, taken in batches by dlt's thread.

    (A callable sink is identified in the sync state by its kind alone, not by this
    class's name: renaming it keeps every pipeline's state usable.)
    """

    def __init__(self, size: int) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._slots = asyncio.Semaphore(size)

    async def __call__(self, chat: RawRecord) -> None:
        await self._slots.acquire()
        self._queue.put_nowait(_without_null_objects(chat))

    def finish(self) -> None:
        self._queue.put_nowait(_END)

    async def take(self, limit: int) -> list[RawRecord]:
        """Up to `limit` chats, waiting for the first; `[]` once the sync has finished."""
        out: list[RawRecord] = []
        item = await self._queue.get()
        while item is not _END:
            out.append(item)
            self._slots.release()
            if len(out) >= limit or self._queue.empty():
                return out
            item = self._queue.get_nowait()
        self._queue.put_nowait(_END)  # stays finished for the next take
        return out


def _without_null_objects(chat: RawRecord) -> RawRecord:
    """`chat`, or a copy without its null `_NESTED` fields (see the module docstring)."""
    if all(chat.get(name, ()) is not None for name in _NESTED):
        return chat
    return {k: v for k, v in chat.items() if v is not None or k not in _NESTED}


async def _start(coro: Coroutine[Any, Any, SyncReport]) -> asyncio.Task[SyncReport]:
    """`coro` as a task of the running loop (the blocking client's)."""
    return asyncio.ensure_future(coro)


async def _result(task: asyncio.Task[SyncReport]) -> SyncReport:
    return await task


async def _cancel(task: asyncio.Task[SyncReport]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
