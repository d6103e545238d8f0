"""`imichat-async search`: the matching chats as a table, or JSON lines, on stdout."""

from __future__ import annotations

import contextlib
import time

import click

from .. import InvalidQueryError
from ._exit import run
from ._progress import ProgressLine, summary
from ._render import json_lines, table_header, table_row
from ._wiring import (
    Settings,
    concurrency_option,
    echo_err,
    filter_option,
    open_client,
    parse_filters,
    rate_store_option,
)


@click.command()
@filter_option
@click.option("--condition", type=click.Choice(["and", "or"]), default="and", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Stop after N chats.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines (the raw objects) on stdout.")
@concurrency_option
@rate_store_option
@click.pass_obj
def search(
    settings: Settings,
    filters: tuple[str, ...],
    condition: str,
    limit: int | None,
    as_json: bool,
    concurrency: int,
    rate_store: str | None,
) -> None:
    """Print the matching chats as a table (or JSON lines with --json)."""
    parsed = parse_filters(filters)
    bar = ProgressLine.for_stderr(settings.quiet)

    async def go() -> None:
        started = time.monotonic()
        records = pages_read = 0
        async with open_client(settings, concurrency, rate_store=rate_store) as client:
            try:
                pages = client.search_pages(
                    filters=parsed,
                    condition=condition,
                    limit=limit,
                    prefetch=concurrency,
                    raw=as_json,
                )
            except InvalidQueryError as exc:
                raise click.UsageError(f"invalid query: {exc}") from None
            try:
                async with contextlib.aclosing(pages) as it:
                    async for page in it:
                        if not as_json and not pages_read:
                            click.echo(table_header())  # not before the first answer came
                        if as_json:
                            click.echo(json_lines(page.items))
                        else:
                            for chat in page.items:
                                click.echo(table_row(chat))
                        records += len(page.items)
                        pages_read += 1
                        bar.update(
                            records=records,
                            total=_expected(page.total, limit),
                            pages=pages_read,
                            retries=client.stats.retries,
                            elapsed=time.monotonic() - started,
                        )
            finally:
                bar.close()
            echo_err(
                settings,
                summary(
                    records,
                    pages_read,
                    client.stats.requests,
                    client.stats.retries,
                    time.monotonic() - started,
                ),
            )

    run(go())


def _expected(total: int | None, limit: int | None) -> int | None:
    """The records the search will show: the server's total, capped by `--limit`."""
    if total is None or limit is None:
        return total
    return min(total, limit)
