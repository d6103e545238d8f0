"""`imichat-async demo`: the one-command tour against an embedded sandbox."""

from __future__ import annotations

import time

import click

from .. import Chat, ImiChatClient
from ._exit import run
from ._progress import ProgressLine, summary
from ._render import table_header, table_row
from ._wiring import Settings


@click.command()
@click.option("--chats", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option(
    "--latency",
    type=click.FloatRange(min=0.0),
    default=0.02,
    show_default=True,
    help="Seconds per request.",
)
@click.option(
    "--faults",
    type=click.FloatRange(0.0, 1.0),
    default=0.03,
    show_default=True,
    help="Probability of a transient fault per request.",
)
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--show", type=click.IntRange(min=0), default=5, show_default=True, help="Chats to print."
)
@click.pass_obj
def demo(
    settings: Settings, chats: int, latency: float, faults: float, concurrency: int, show: int
) -> None:
    """Start an embedded sandbox, search all its chats, print a few and a summary."""
    from ..sandbox import serve

    bar = ProgressLine.for_stderr(settings.quiet)

    async def go() -> None:
        async with serve(
            chats=chats,
            seed=0,
            latency=latency,
            p_2007=faults / 3,
            p_429=faults / 3,
            p_503=faults - 2 * (faults / 3),
            retry_after=0.05,
        ) as sb:
            async with ImiChatClient(
                base_url=sb.base_url, token=sb.token, team_id=sb.team_id, concurrency=concurrency
            ) as client:
                started = time.monotonic()
                first: list[Chat] = []
                records = 0
                try:
                    async for chat in client.search_chats():
                        if len(first) < show:
                            first.append(chat)
                        records += 1
                        bar.update(
                            records=records,
                            total=chats,
                            pages=client.stats.pages,
                            retries=client.stats.retries,
                            elapsed=time.monotonic() - started,
                        )
                finally:
                    bar.close()
                elapsed = time.monotonic() - started
            click.echo(
                f"sandbox: {chats} chats at {sb.base_url}, {latency * 1000:g} ms latency, "
                f"{faults:.0%} transient faults"
            )
            if first:
                click.echo(table_header())
                for chat in first:
                    click.echo(table_row(chat))
            faults_seen = sum(sb.stats.faults.values())
            click.echo(
                summary(
                    records,
                    client.stats.pages,
                    client.stats.requests,
                    client.stats.retries,
                    elapsed,
                )
                + f" server_requests={sb.stats.requests_total} faults={faults_seen}"
                + f" peak_in_flight={sb.stats.peak_in_flight}"
            )

    run(go())
