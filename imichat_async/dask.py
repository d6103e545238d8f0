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
- Each worker process builds one client from `ClientSettings` (the blocking
  client: its own event loop thread), shared by the tasks its threads run, and
  reads each partition with the export's rules (`export.read_partition`);
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

import os
import threading
from datetime import date, datetime, timedelta
from typing import Any

import attrs

from .export import (
    CHAT_SCHEMA,
    DEFAULT_ROWS_PER_PARTITION,
    Partition,
    chats_table,
    plan_partitions,
    read_partition,
)
from .sync import ImiChatClient as BlockingClient
from .sync import SyncTokenSource

try:
    import dask.dataframe as dd
    import pandas as pd
except ImportError as exc:  # pragma: no cover (the extra is installed where tests run)
    raise ImportError("imichat_async.dask needs Dask: pip install 'imichat-async[dask]'") from exc

__all__ = ["ClientSettings", "EnvToken", "read_chats", "read_partition_frame"]

TokenArg = SyncTokenSource


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

    def client_kwargs(self) -> dict[str, Any]:
        """The client's keywords for these settings."""
        kwargs: dict[str, Any] = {
            "base_url": self.base_url,
            "token": self.token,
            "team_id": self.team_id,
            "concurrency": self.concurrency,
            "adaptive": self.adaptive,
            "rate_limit": self.rate_limit,
        }
        if self.timeout is not None:
            kwargs["timeout"] = self.timeout
        if self.max_retries is not None:
            kwargs["max_retries"] = self.max_retries
        if self.rate_store is not None:
            kwargs["rate_store"] = self.rate_store
        return kwargs


#: One client per worker process and settings, shared by the tasks its threads run: its
#: limiter bounds the process's requests in flight, and its place in the rate store (its
#: learned share of the tenant's budget) lasts as long as the worker, not one task.
_CLIENTS: dict[ClientSettings, BlockingClient] = {}
_CLIENTS_LOCK = threading.Lock()


def _client_for(settings: ClientSettings) -> BlockingClient:
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(settings)
        if client is None or client.closed:
            client = _CLIENTS[settings] = BlockingClient(**settings.client_kwargs())
        return client


def _meta() -> pd.DataFrame:
    return CHAT_SCHEMA.empty_table().to_pandas(types_mapper=pd.ArrowDtype)


def read_partition_frame(partition: Partition, settings: ClientSettings) -> pd.DataFrame:
    """One partition's chats as a pandas DataFrame of `CHAT_SCHEMA` (Arrow-backed dtypes).

    What each Dask task runs; usable alone (an Airflow task mapped over the partitions).
    """

    client = _client_for(settings)
    rows = client.run(read_partition(client.async_client, partition))
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

    with BlockingClient(**settings.client_kwargs()) as client:
        partitions = client.run(
            plan_partitions(
                client.async_client,
                since=since,
                until=until,
                rows_per_partition=rows_per_partition,
                span_without_total=span_without_total,
                **filters,
            )
        )
    df: dd.DataFrame = dd.from_map(  # type: ignore[no-untyped-call]
        read_partition_frame,
        partitions,
        settings=settings,
        meta=_meta(),
        label="imichat-chats",
        enforce_metadata=False,
    )
    return df
