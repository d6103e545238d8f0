"""`imichat-async demo`: the one-command tour against an embedded sandbox."""

from __future__ import annotations

import time

import click

from .. import Chat, ImiChatClient
from ._exit import run
from ._progress import ProgressLine, summary
from ._render import table_header, table_row
from ._wiring import CREDENTIALS, SANDBOX_SETTINGS, Settings, concurrency_option

#: The global options `demo` has no use for: it always runs its own sandbox.
IGNORED = (*CREDENTIALS, "sandbox", *SANDBOX_SETTINGS)


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
@concurrency_option
@click.option(
    "--show", type=click.IntRange(min=0), default=5, show_default=True, help="Chats to print."
)
@click.pass_obj
def demo(
    settings: Settings, chats: int, latency: float, faults: float, concurrency: int, show: int
) -> None:
    """Start an embedded sandbox, search all its chats, print a few and a summary.

    It always runs its own sandbox (set up by --chats, --latency, --faults): the
    credentials and --sandbox* options are refused. -q prints the chats only.
    """
    from ..sandbox import serve

    refuse_ignored(settings)
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
            if not settings.quiet:
                click.echo(
                    f"sandbox: {chats} chats at {sb.base_url}, {latency * 1000:g} ms latency, "
                    f"{faults:.0%} transient faults"
                )
            if first:
                click.echo(table_header())
                for chat in first:
                    click.echo(table_row(chat))
            if settings.quiet:
                return
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
        if not settings.quiet:
            click.echo(NEXT_STEPS, err=True)

    run(go())


def refuse_ignored(settings: Settings) -> None:
    """`click.UsageError` naming the `IGNORED` options given on the command line."""
    named = ["--" + name.replace("_", "-") for name in IGNORED if name in settings.given]
    if named:
        raise click.UsageError(
            f"{', '.join(named)} given to demo, which runs its own sandbox "
            "(set it up with --chats, --latency, --faults): drop "
            + ("it" if len(named) == 1 else "them")
        )


NEXT_STEPS = """
Try next (each against an embedded sandbox; drop --sandbox and set IMICHAT_BASE_URL,
IMICHAT_TOKEN and IMICHAT_TEAM_ID for your tenant):
  imichat-async --sandbox search --filter status=closed --filter channel=email --limit 10
  imichat-async --sandbox export --since 2024-01-01 --until 2025-01-01 -o chats.ndjson
  imichat-async --sandbox search --filter created_at__gte=2024-06-01 --json | head -3
  imichat-async sandbox --port 8765 --chats 5000    # serve a sandbox for other tools"""
