"""A tenant's chats as a Dask DataFrame: one Dask partition per planned partition.

    import imichat_async.dask as imd

    df = imd.read_chats(
        base_url=url, token=get_token, team_id=team,
        since="2024-01-01", until="2025-01-01",
        rate_store="redis://127.0.0.1:6379/0", status="closed",
    )
    df.to_parquet("chats/")  # or any Dask computation

Needs the `dask` extra (`pip install 'imichat-async[dask]'`: dask, distributed of the
same release, pyarrow).

- The range is planned once, where `read_chats` is called, into
  `export.Partition`s of at most `rows_per_partition` chats (from the server's
  totals); `dd.from_map` makes each a task. The plan freezes an open range at
  that instant, so a retried task asks the same question.
- Each task builds its own `ImiChatClient` in the worker from `ClientSettings`
  and reads its partition with the export's rules (`export.read_partition`);
  the rows become a pandas DataFrame of Arrow-backed columns with the Parquet
  dataset's schema (`CHAT_SCHEMA`: timestamps in UTC, `tag` a list of strings).
  A task that fails or whose worker dies is simply run again: a partition's
  rows do not depend on which attempt read them.
- Every task draws on the tenant's one rate budget through `rate_store`
  (a `redis://` URL: the fleet's shared, learned send rate). Without a store
  each worker's client learns the limit alone.
- The token: pass a picklable zero-argument callable (sync or async) and it is
  called in each worker, so the token itself never enters the task graph;
  `EnvToken("IMICHAT_TOKEN")` is one that reads an environment variable of
  the worker. A `str` travels with the tasks, as any argument does. The
  callable is also called where `read_chats` runs, to plan.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from datetime import date, datetime, timedelta
from typing import Any, TypeVar

import attrs

from . import ImiChatClient
from .export import (
    CHAT_SCHEMA,
    DEFAULT_ROWS_PER_PARTITION,
    Partition,
    chats_table,
    plan_partitions,
    read_partition,
)

try:
    import dask.dataframe as dd
    import pandas as pd
except ImportError as exc:  # pragma: no cover (the extra is installed where tests run)
    raise ImportError("imichat_async.dask needs Dask: pip install 'imichat-async[dask]'") from exc

__all__ = ["ClientSettings", "EnvToken", "read_chats", "read_partition_frame"]

T = TypeVar("T")
TokenArg = str | Callable[[], str | Awaitable[str]]


@attrs.frozen
class EnvToken:
    """A token read from the environment variable `name` where it is called (a worker):
    picklable, and the token itself never enters the task graph."""

    name: str = "IMICHAT_TOKEN"

    def __call__(self) -> str:
        value = os.environ.get(self.name)
        if not value:
            raise LookupError(f"environment variable {self.name} is not set in this process")
        return value


@attrs.frozen
class ClientSettings:
    """What a worker needs to build its client; one object, because `token` is a keyword
    of `dd.from_map` itself. Its repr never shows a token."""

    base_url: str
    team_id: str
    token: TokenArg = attrs.field(repr=False)
    concurrency: int = 8
    rate_store: str | None = None
    rate_limit: float | None = None
    adaptive: bool = True
    timeout: float | None = None
    max_retries: int | None = None

    def client(self) -> ImiChatClient:
        """A new client for these settings (the caller closes it)."""
        kwargs: dict[str, Any] = {}
        if self.timeout is not None:
            kwargs["timeout"] = self.timeout
        if self.max_retries is not None:
            kwargs["max_retries"] = self.max_retries
        if self.rate_store is not None:
            kwargs["rate_store"] = self.rate_store
        return ImiChatClient(
            base_url=self.base_url,
            token=_token_source(self.token),
            team_id=self.team_id,
            concurrency=self.concurrency,
            adaptive=self.adaptive,
            rate_limit=self.rate_limit,
            **kwargs,
        )


def _token_source(token: TokenArg) -> str | Callable[[], Awaitable[str]]:
    """A str as is; a callable (sync or async) as the async callable the client takes."""
    if isinstance(token, str):
        return token
    if not callable(token):
        raise TypeError(f"token must be a str or a zero-argument callable, got {type(token)}")

    async def fresh() -> str:
        value = token()
        if inspect.isawaitable(value):
            value = await value
        if not isinstance(value, str):
            raise TypeError(f"the token callable returned {type(value).__name__}, not a str")
        return value

    return fresh


def _run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to its end from sync code, also where a loop already runs (a
    notebook, a Dask worker's thread): then on a private loop in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_fn())
    box: list[T] = []
    error: list[BaseException] = []

    def main() -> None:
        try:
            box.append(asyncio.run(coro_fn()))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=main, name="imichat-dask")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return box[0]


def _meta() -> pd.DataFrame:
    return CHAT_SCHEMA.empty_table().to_pandas(types_mapper=pd.ArrowDtype)


def read_partition_frame(partition: Partition, settings: ClientSettings) -> pd.DataFrame:
    """One partition's chats as a pandas DataFrame of `CHAT_SCHEMA` (Arrow-backed dtypes).

    What each Dask task runs; usable alone (an Airflow task mapped over the partitions).
    """

    async def read() -> list[Any]:
        async with settings.client() as client:
            return await read_partition(client, partition)

    rows = _run(read)
    return chats_table(rows).to_pandas(types_mapper=pd.ArrowDtype)


def read_chats(
    *,
    base_url: str,
    token: TokenArg,
    team_id: str,
    since: datetime | date | str,
    until: datetime | date | str | None = None,
    rate_store: str | None = None,
    concurrency: int = 8,
    rate_limit: float | None = None,
    adaptive: bool = True,
    rows_per_partition: int = DEFAULT_ROWS_PER_PARTITION,
    span_without_total: timedelta = timedelta(days=1),
    timeout: float | None = None,
    max_retries: int | None = None,
    **filters: Any,
) -> dd.DataFrame:
    """The chats created in `[since, until)` matching `filters` as a `dask.dataframe`.

    Plans the partitions now (a few one-page requests: the server's totals), then
    returns a lazy DataFrame with one Dask partition per planned partition, each read
    in a worker by its own client (`concurrency` requests in flight each; `adaptive`
    send-rate learning, shared by every worker through `rate_store`). Columns: the
    Parquet dataset's (README: "Parquet"). Filters as for `export_chats`; raises
    `InvalidQueryError` before any request for bad ones.
    """
    settings = ClientSettings(
        base_url=base_url,
        team_id=team_id,
        token=token,
        concurrency=concurrency,
        rate_store=rate_store,
        rate_limit=rate_limit,
        adaptive=adaptive,
        timeout=timeout,
        max_retries=max_retries,
    )

    async def plan() -> list[Partition]:
        async with settings.client() as client:
            return await plan_partitions(
                client,
                since=since,
                until=until,
                rows_per_partition=rows_per_partition,
                span_without_total=span_without_total,
                **filters,
            )

    partitions = _run(plan)
    df: dd.DataFrame = dd.from_map(  # type: ignore[no-untyped-call]
        read_partition_frame,
        partitions,
        settings=settings,
        meta=_meta(),
        label="imichat-chats",
        enforce_metadata=False,
    )
    return df
