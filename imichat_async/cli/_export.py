"""`imichat-async export`: a range of chats to a file, each once, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import click

from .. import ApiError
from ..export import ExportProgress, export_chats
from ._exit import ApiFailure, UsageFailure, api_message, run_resumable
from ._progress import ProgressLine
from ._wiring import (
    UNVERIFIED,
    Settings,
    concurrency_option,
    echo_err,
    filter_option,
    format_option,
    max_rows_option,
    open_client,
    output_sink,
    parse_filters,
)


@click.command()
@click.option(
    "--since",
    required=True,
    metavar="DATE",
    help="created_at >= DATE (ISO date or datetime; naive = UTC).",
)
@click.option(
    "--until",
    default=None,
    metavar="DATE",
    help="created_at < DATE; default: now, frozen at the start.",
)
@filter_option
@format_option
@click.option(
    "-o",
    "--output",
    required=True,
    help="Output file (not `-`: the export resumes into a real file; see `search --json`); "
    "with --format parquet a directory or an fsspec URL (s3://bucket/prefix).",
)
@max_rows_option
@concurrency_option
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False),
    default=None,
    help="Checkpoint file (always local); default: OUTPUT.checkpoint.json "
    "(required for a URL output).",
)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint, if there is one.")
@click.option(
    "--slice-pages",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Split slices deeper than this many pages.",
)
@click.pass_obj
def export(
    settings: Settings,
    since: str,
    until: str | None,
    filters: tuple[str, ...],
    fmt: str | None,
    output: str,
    max_rows: int | None,
    concurrency: int,
    checkpoint: str | None,
    resume: bool,
    slice_pages: int,
) -> None:
    """Export every chat created in [--since, --until) to a file, each exactly once.

    Resumable: the checkpoint is kept after every slice; after a crash or
    Ctrl-C, run the same command with --resume.
    """
    if output == "-":
        # The export writes FILE.part, syncs it and renames it; a resume truncates it to the
        # checkpointed length. None of that works on a pipe.
        raise click.BadParameter(
            "an export needs a real file to resume into; for chats on stdout use "
            "`imichat-async search --json` (the same objects, one per line)",
            param_hint="'-o' / '--output'",
        )
    if checkpoint is None and "://" in output:
        raise click.BadParameter(
            "an output URL needs a local --checkpoint FILE", param_hint="'--checkpoint'"
        )
    sink = output_sink(output, fmt, max_rows, append=False)
    parsed = parse_filters(filters)
    default_ckpt = output.rstrip("/") + ".checkpoint.json"
    ckpt = checkpoint if checkpoint is not None else default_ckpt
    mistyped = not Path(ckpt).exists() and Path(default_ckpt).exists()
    if resume and mistyped and Path(default_ckpt).resolve() != Path(ckpt).resolve():
        # A mistyped --checkpoint would start over and overwrite the partial output that the
        # real checkpoint points to (the library refuses that too, naming the .part).
        raise UsageFailure(
            f"--checkpoint {ckpt} does not exist, but {default_ckpt} (the default "
            "checkpoint of this output) does: resume with that one (drop --checkpoint), "
            "or delete it to start over"
        )
    bar = ProgressLine.for_stderr(settings.quiet)

    def show(p: ExportProgress) -> None:
        # Chats read count from the first page, before their slice is written.
        shown = p.received if p.total is None else min(p.received, p.total)
        bar.update(
            records=shown, total=p.total, pages=p.pages, retries=p.retries, elapsed=p.elapsed
        )

    def resume_hint() -> str:
        if Path(ckpt).exists():
            return f"checkpoint saved to {ckpt}. Run the same command with --resume to continue."
        return "nothing was written yet. Run the same command (--resume or not) to start again."

    async def go() -> None:
        # An export runs for long at the tenant's budget: learn its rate limit (it costs
        # nothing without one: benchmarks/RESULTS.md, "Rate-limited tenant").
        async with open_client(settings, concurrency, adaptive=True) as client:
            try:
                report = await export_chats(
                    client,
                    since=since,
                    until=until,
                    filters=parsed,
                    sink=sink,
                    checkpoint=ckpt,
                    resume=resume,
                    slice_pages=slice_pages,
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

    def refused(exc: ApiError) -> NoReturn:
        if Path(ckpt).exists():
            # Chats were written before the API refused: once fixed, resume (not restart).
            raise ApiFailure(f"{api_message(exc)}; {resume_hint()}")
        raise ApiFailure(api_message(exc))

    run_resumable(go(), resume_hint, on_refused=refused)
