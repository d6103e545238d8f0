"""`imichat-async sync`: keep a change log current; each run appends what changed since the last."""

from __future__ import annotations

from typing import NoReturn

import click

from .. import TransientError
from ..export import DEFAULT_LAG, ExportProgress, make_sink, sync_chats
from ._exit import Resumable, api_message, run
from ._progress import ProgressLine
from ._wiring import Settings, echo_err, filter_option, open_client, parse_filters


@click.command()
@click.option(
    "--since",
    required=True,
    metavar="DATE",
    help="Chats created at or after DATE (ISO date or datetime; naive = UTC).",
)
@click.option(
    "--state",
    required=True,
    type=click.Path(dir_okay=False),
    help="State file (small JSON): the last completed run, the run in progress.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, writable=True),
    help="Change log, appended to: one line per new version of a chat.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["ndjson", "csv"]),
    default=None,
    help="Log format; default from the file's suffix (.csv), else ndjson.",
)
@click.option(
    "--lag",
    type=click.FloatRange(min=0.0),
    default=DEFAULT_LAG,
    show_default=True,
    metavar="SECONDS",
    help="Re-read this much before the previous run's start (late writes, clock skew).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    metavar="K",
    help="Requests in flight.",
)
@filter_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
@click.pass_obj
def sync(
    settings: Settings,
    since: str,
    state: str,
    output: str,
    fmt: str | None,
    lag: float,
    concurrency: int,
    filters: tuple[str, ...],
    quiet: bool,
) -> None:
    """Append every new version of every chat created since --since to a change log.

    The first run appends the chats created in [--since, start); each later run
    the chats created or updated since the previous run's start minus --lag,
    each version (chat_id, updated_at) once across runs. After a crash or
    Ctrl-C, run the same command again: it finishes the interrupted run.
    """
    if quiet:
        settings.quiet = True
    parsed = parse_filters(filters)
    bar = ProgressLine.for_stderr(settings.quiet)

    def show(p: ExportProgress) -> None:
        bar.update(
            records=p.records, total=None, pages=p.pages, retries=p.retries, elapsed=p.elapsed
        )

    async def go() -> None:
        async with open_client(settings, concurrency) as client:
            try:
                report = await sync_chats(
                    client,
                    since=since,
                    state=state,
                    sink=make_sink(output, fmt, append=True),
                    lag=lag,
                    filters=parsed,
                    progress=show if bar.enabled else None,
                )
            finally:
                bar.close()
        if not settings.quiet:
            for note in report.notes:
                click.echo(f"note: {note}", err=True)
        echo_err(settings, f"{report.summary()} output={output}")

    def interrupted() -> NoReturn:
        raise Resumable(
            f"interrupted; state saved to {state}. Run the same command to finish the run."
        )

    def transient(exc: TransientError) -> NoReturn:
        raise Resumable(
            f"{api_message(exc)} (retries exhausted); state saved to {state}. "
            "Run the same command to finish the run."
        )

    run(go(), on_interrupt=interrupted, on_transient=transient)
