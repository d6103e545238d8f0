"""`imichat-async sync`: keep a change log current; each run appends what changed since the last."""

from __future__ import annotations

from pathlib import Path

import click

from ..export import DEFAULT_LAG, ExportProgress, sync_chats
from ._exit import run_resumable
from ._progress import ProgressLine
from ._wiring import (
    UNVERIFIED,
    Settings,
    concurrency_option,
    echo_err,
    format_option,
    max_rows_option,
    open_client,
    output_sink,
    parse_filters,
    rate_store_option,
    sync_filter_option,
)

#: The sync's arguments as this command's options, for the library's messages.
NAMES = {
    "since": "--since {}",
    "filters": "--filter {}",
    "sink": "-o {}",
    "state": "--state {}",
    "lag": "--lag {}",
}


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
    help="Change log, appended to: one line per new version of a chat; with --format "
    "parquet a dataset directory or fsspec URL, new files added by each run.",
)
@format_option
@max_rows_option
@click.option(
    "--lag",
    type=click.FloatRange(min=0.0),
    default=DEFAULT_LAG,
    show_default=True,
    metavar="SECONDS",
    help="Re-read this much before the previous run's start (late writes, clock skew).",
)
@concurrency_option
@rate_store_option
@sync_filter_option
@click.pass_obj
def sync(
    settings: Settings,
    since: str,
    state: str,
    output: str,
    fmt: str | None,
    max_rows: int | None,
    lag: float,
    concurrency: int,
    rate_store: str | None,
    filters: tuple[str, ...],
) -> None:
    """Append every new version of every chat created since --since to a change log.

    The first run appends the chats created in [--since, start); each later run
    the chats created or updated since the previous run's start minus --lag,
    each version (chat_id, updated_at) once across runs. After a crash or
    Ctrl-C, run the same command again: it finishes the interrupted run.
    """
    sink = output_sink(output, fmt, max_rows, append=True)
    parsed = parse_filters(filters)
    bar = ProgressLine.for_stderr(settings.quiet)

    def show(p: ExportProgress) -> None:
        bar.update(
            records=p.records, total=None, pages=p.pages, retries=p.retries, elapsed=p.elapsed
        )

    async def go() -> None:
        async with open_client(
            settings, concurrency, adaptive=True, rate_store=rate_store
        ) as client:
            try:
                report = await sync_chats(
                    client,
                    since=since,
                    state=state,
                    sink=sink,
                    lag=lag,
                    filters=parsed,
                    progress=show if bar.enabled else None,
                )
            finally:
                bar.close()
        if not settings.quiet:
            for note in report.notes:
                click.echo(f"note: {note}", err=True)
        if not report.verified:
            echo_err(settings, UNVERIFIED)
        echo_err(settings, f"{report.summary()} output={output}")

    def hint() -> str:
        if Path(state).exists():
            return f"state saved to {state}. Run the same command to finish the run."
        # A first run that wrote nothing leaves nothing (issue #23): no state to finish.
        return "nothing was written yet. Run the same command to start again."

    run_resumable(go(), hint, names=NAMES)
