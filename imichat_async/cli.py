"""The `imichat-async` command line: search, export, demo and a sandbox server.

    imichat-async search --filter status=closed --filter created_at__gte=2024-05-01 --limit 20
    imichat-async export --since 2024-01-01 --until 2025-01-01 --format csv -o chats.csv
    imichat-async --sandbox export --since 2024-01-01 -o chats.ndjson   # against a local sandbox
    imichat-async demo                                                 # the one-command tour
    imichat-async sandbox --port 8765                                  # serve a sandbox

Credentials come from `--base-url`, `--token`, `--team-id` or the environment
variables `IMICHAT_BASE_URL`, `IMICHAT_TOKEN`, `IMICHAT_TEAM_ID`; `--sandbox`
runs the command against an embedded sandbox instead. The token is never
printed.

A progress bar is drawn on stderr when stderr is a terminal (not when piped,
nor with `--quiet`); a summary line follows on stderr unless `--quiet`.

Exit codes:

- 0: success.
- 1: any other error (I/O, a transient error whose retries ran out during `search`, ...).
- 2: usage error or invalid query (bad option or filter, missing credentials,
  a checkpoint that does not match the arguments or exists without `--resume`).
- 3: the API refused the request (permanent error); the message carries the
  vendor's status_code, the HTTP status and the description.
- 4: `export` interrupted but resumable (Ctrl-C, or a transient error whose
  retries ran out): the checkpoint is saved; run the same command with `--resume`.
- 130: `search` or `demo` interrupted by Ctrl-C (nothing to resume).

The export logic lives in `imichat_async.export`; this module only parses
arguments and calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, NoReturn, TextIO

import attrs
import click

from . import __version__
from ._client import ImiChatClient
from ._errors import (
    ApiError,
    ConfigurationError,
    ImiChatError,
    InvalidQueryError,
    TransientError,
)
from ._paging import PagingStats
from ._query import Filter, build_query, split_keyword
from ._records import Chat, decode_page
from .export import CheckpointError, ExportProgress, export_chats, make_sink
from .sandbox.cli import sandbox_command

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_API = 3
EXIT_RESUMABLE = 4
EXIT_INTERRUPTED = 130

ENV_BASE_URL = "IMICHAT_BASE_URL"
ENV_TOKEN = "IMICHAT_TOKEN"
ENV_TEAM_ID = "IMICHAT_TEAM_ID"


class CliError(click.ClickException):
    """An error printed as `Error: ...`, exit code 1."""

    exit_code = EXIT_ERROR


class UsageFailure(CliError):
    """Exit code 2: a usage error or an invalid query found after parsing."""

    exit_code = EXIT_USAGE


class ApiFailure(CliError):
    """Exit code 3: the API refused the request."""

    exit_code = EXIT_API


class Resumable(CliError):
    """Exit code 4: the export stopped; the checkpoint is saved."""

    exit_code = EXIT_RESUMABLE


class Interrupted(CliError):
    """Exit code 130: Ctrl-C, nothing to resume."""

    exit_code = EXIT_INTERRUPTED


@attrs.define
class Settings:
    """The group's options, handed to every command."""

    base_url: str | None
    token: str | None
    team_id: str | None
    sandbox: bool
    sandbox_chats: int
    sandbox_latency: float
    sandbox_faults: float
    quiet: bool


# -- progress ----------------------------------------------------------------------------------


class ProgressLine:
    """A one-line progress bar on a terminal stream, redrawn at most every `interval` seconds.

    Shows records (of the total when known), pages/s, retries and the ETA.
    Disabled (every call a no-op) when `enabled` is False.
    """

    def __init__(self, stream: TextIO, *, enabled: bool, interval: float = 0.1) -> None:
        self.stream = stream
        self.enabled = enabled
        self.interval = interval
        self._last = 0.0
        self._drawn = False

    @classmethod
    def for_stderr(cls, quiet: bool) -> ProgressLine:
        """Enabled when stderr is a terminal and not `quiet`."""
        stream = sys.stderr
        return cls(stream, enabled=not quiet and _isatty(stream))

    def render(
        self,
        *,
        records: int,
        total: int | None,
        pages: int,
        retries: int,
        elapsed: float,
        width: int = 24,
    ) -> str:
        """The text of the bar for these numbers."""
        rate = pages / elapsed if elapsed > 0 else 0.0
        if total:
            done = min(1.0, records / total)
            filled = int(done * width)
            bar = "#" * filled + "." * (width - filled)
            head = f"[{bar}] {records:,}/{total:,} records {done:4.0%}"
            per_record = elapsed / records if records else None
            if per_record is not None and records < total:
                eta = f"ETA {_duration(per_record * (total - records))}"
            elif records >= total:
                eta = "ETA 0s"
            else:
                eta = "ETA ?"
        else:
            head = f"{records:,} records"
            eta = "ETA ?"
        return f"{head} | {rate:.1f} pages/s | {retries} retries | {eta}"

    def update(
        self, *, records: int, total: int | None, pages: int, retries: int, elapsed: float
    ) -> None:
        """Redraw (throttled)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if self._drawn and now - self._last < self.interval:
            return
        self._last = now
        text = self.render(
            records=records, total=total, pages=pages, retries=retries, elapsed=elapsed
        )
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Erase the bar, leaving the line free for the summary."""
        if self.enabled and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _summary(records: int, pages: int, requests: int, retries: int, elapsed: float) -> str:
    return (
        f"records={records} pages={pages} requests={requests} retries={retries} "
        f"elapsed={elapsed:.2f}s"
    )


# -- arguments -----------------------------------------------------------------------------------


def parse_filters(values: Sequence[str]) -> list[Filter]:
    """`param=value` / `param__op=value` strings as `Filter`s; `click.BadParameter` if malformed.

    Values are checked later, by `build_query`.
    """
    out: list[Filter] = []
    for item in values:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(
                f"{item!r}: expected PARAM=VALUE or PARAM__OP=VALUE, e.g. status=closed",
                param_hint="'--filter'",
            )
        param, op = split_keyword(key)
        out.append(Filter(param, op, value))
    return out


_FILTER_HELP = (
    "PARAM=VALUE (eq) or PARAM__OP=VALUE, e.g. status=closed, created_at__gte=2024-05-01, "
    "status__not_eq=queued. Repeatable."
)


def _filter_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--filter", "-f", "filters", multiple=True, metavar="PARAM[__OP]=VALUE", help=_FILTER_HELP
    )(f)


# -- running -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _client(
    settings: Settings, concurrency: int = 8, *, adaptive: bool = False
) -> AsyncIterator[ImiChatClient]:
    """A client on the configured API, or on an embedded sandbox with `--sandbox`.

    `adaptive=True` (export) learns the tenant's rate limit (see `ImiChatClient`).
    """
    if settings.sandbox:
        from .sandbox import serve

        faults = settings.sandbox_faults
        async with (
            serve(
                chats=settings.sandbox_chats,
                seed=0,
                latency=settings.sandbox_latency,
                p_2007=faults / 2,
                p_503=faults / 2,
            ) as sb,
            ImiChatClient(
                base_url=sb.base_url,
                token=sb.token,
                team_id=sb.team_id,
                concurrency=concurrency,
                adaptive=adaptive,
            ) as client,
        ):
            yield client
        return
    missing = [
        f"--{name.replace('_', '-')} or {env}"
        for name, env, value in (
            ("base_url", ENV_BASE_URL, settings.base_url),
            ("token", ENV_TOKEN, settings.token),
            ("team_id", ENV_TEAM_ID, settings.team_id),
        )
        if not value
    ]
    if missing:
        raise click.UsageError(
            "missing credentials: set " + ", ".join(missing) + " (or use --sandbox)"
        )
    assert settings.base_url and settings.token and settings.team_id
    async with ImiChatClient(
        base_url=settings.base_url,
        token=settings.token,
        team_id=settings.team_id,
        concurrency=concurrency,
        adaptive=adaptive,
    ) as client:
        yield client


def _api_message(exc: ApiError) -> str:
    code = exc.status_code if exc.status_code is not None else "none"
    return f"API error {code} (HTTP {exc.http_status}): {exc.description}"


def _run(
    coro: Coroutine[Any, Any, None],
    *,
    on_interrupt: Callable[[], NoReturn] | None = None,
    on_transient: Callable[[TransientError], NoReturn] | None = None,
) -> None:
    """`asyncio.run(coro)`, each failure turned into its message and exit code."""
    try:
        asyncio.run(coro)
    except KeyboardInterrupt:
        if on_interrupt is not None:
            on_interrupt()
        raise Interrupted("interrupted") from None
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except CheckpointError as exc:
        raise UsageFailure(str(exc)) from None
    except (InvalidQueryError, ConfigurationError) as exc:
        raise click.UsageError(str(exc)) from None
    except TransientError as exc:
        if on_transient is not None:
            on_transient(exc)
        raise CliError(_api_message(exc) + " (retries exhausted)") from None
    except ApiError as exc:
        raise ApiFailure(_api_message(exc)) from None
    except ImiChatError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(_os_message(exc)) from None


def _os_message(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _echo_err(settings: Settings, text: str) -> None:
    if not settings.quiet:
        click.echo(text, err=True)


# -- table -----------------------------------------------------------------------------------------

_COLUMNS: tuple[tuple[str, int], ...] = (
    ("chat_id", 36),
    ("created_at", 20),
    ("status", 8),
    ("channel", 9),
    ("assignee", 22),
    ("tags", 24),
)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def table_header() -> str:
    """The header line of the chats table."""
    return "  ".join(name.ljust(width) for name, width in _COLUMNS).rstrip()


def table_row(chat: Chat) -> str:
    """One chat as a line of the table."""
    created = chat.created_at.strftime("%Y-%m-%d %H:%M:%S") if chat.created_at else ""
    cells = (
        chat.chat_id,
        created,
        str(chat.status or ""),
        str(chat.channel or ""),
        chat.assignee or "",
        ",".join(chat.tag),
    )
    return "  ".join(
        _clip(cell, width).ljust(width) for cell, (_, width) in zip(cells, _COLUMNS, strict=True)
    ).rstrip()


# -- commands ------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--base-url", envvar=ENV_BASE_URL, metavar="URL", help=f"API root (or ${ENV_BASE_URL})."
)
@click.option(
    "--token",
    envvar=ENV_TOKEN,
    metavar="TOKEN",
    help=f"Access token (or ${ENV_TOKEN}); never printed.",
)
@click.option("--team-id", envvar=ENV_TEAM_ID, metavar="ID", help=f"Team id (or ${ENV_TEAM_ID}).")
@click.option(
    "--sandbox",
    "use_sandbox",
    is_flag=True,
    help="Run the command against an embedded sandbox on 127.0.0.1.",
)
@click.option(
    "--sandbox-chats",
    type=click.IntRange(min=0),
    default=5000,
    show_default=True,
    help="Chats in the embedded sandbox.",
)
@click.option(
    "--sandbox-latency",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="Seconds per request of the embedded sandbox.",
)
@click.option(
    "--sandbox-faults",
    type=click.FloatRange(0.0, 1.0),
    default=0.0,
    show_default=True,
    help="Probability of a transient fault per request of the embedded sandbox.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
@click.option("-v", "--verbose", count=True, help="Log to stderr (-v info, -vv debug).")
@click.version_option(__version__, prog_name="imichat-async")
@click.pass_context
def main(
    ctx: click.Context,
    base_url: str | None,
    token: str | None,
    team_id: str | None,
    use_sandbox: bool,
    sandbox_chats: int,
    sandbox_latency: float,
    sandbox_faults: float,
    quiet: bool,
    verbose: int,
) -> None:
    """Search and export IMIchat chats (POST /chats/search), concurrently and resumably.

    Exit codes: 0 ok, 1 other error, 2 usage or invalid query, 3 API error
    (permanent), 4 export interrupted but resumable, 130 interrupted.
    """
    # Without -v the library's warnings stay off the terminal (it logs to a NullHandler);
    # retries are counted in the progress bar and the summary.
    if verbose:
        logging.basicConfig(
            level=logging.DEBUG if verbose > 1 else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    ctx.obj = Settings(
        base_url=base_url,
        token=token,
        team_id=team_id,
        sandbox=use_sandbox,
        sandbox_chats=sandbox_chats,
        sandbox_latency=sandbox_latency,
        sandbox_faults=sandbox_faults,
        quiet=quiet,
    )


@main.command()
@_filter_option
@click.option("--condition", type=click.Choice(["and", "or"]), default="and", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Stop after N chats.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines (the raw objects) on stdout.")
@click.option(
    "--concurrency", type=click.IntRange(min=1), default=8, show_default=True, metavar="K"
)
@click.pass_obj
def search(
    settings: Settings,
    filters: tuple[str, ...],
    condition: str,
    limit: int | None,
    as_json: bool,
    concurrency: int,
) -> None:
    """Print the matching chats as a table (or JSON lines with --json)."""
    try:
        query = build_query(None, parse_filters(filters), condition)
    except InvalidQueryError as exc:
        raise click.UsageError(f"invalid query: {exc}") from None
    bar = ProgressLine.for_stderr(settings.quiet)

    async def go() -> None:
        started = time.monotonic()
        records = 0
        stats = PagingStats()
        max_pages = math.ceil(limit / 10) if limit is not None else None
        async with _client(settings, concurrency) as client:
            pages = client.search_raw_pages(
                query,
                max_pages=max_pages,
                stats=stats,
                prefetch=min(concurrency, max_pages or concurrency),
            )
            try:
                if not as_json:
                    click.echo(table_header())
                async with contextlib.aclosing(pages) as it:
                    async for page in it:
                        items = list(page.items)
                        if limit is not None:
                            items = items[: limit - records]
                        if as_json:
                            click.echo(
                                "\n".join(
                                    json.dumps(r, ensure_ascii=False, separators=(",", ":"))
                                    for r in items
                                )
                            )
                        else:
                            for chat in decode_page(items, page.number):
                                click.echo(table_row(chat))
                        records += len(items)
                        bar.update(
                            records=records,
                            total=min(stats.total, limit)
                            if stats.total is not None and limit
                            else stats.total,
                            pages=stats.pages_yielded,
                            retries=client.stats.retries,
                            elapsed=time.monotonic() - started,
                        )
                        if limit is not None and records >= limit:
                            break
            finally:
                bar.close()
            _echo_err(
                settings,
                _summary(
                    records,
                    stats.pages_yielded,
                    client.stats.requests,
                    client.stats.retries,
                    time.monotonic() - started,
                ),
            )

    _run(go())


@main.command()
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
@_filter_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["ndjson", "csv"]),
    default=None,
    help="Output format; default from the file's suffix (.csv), else ndjson.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, writable=True),
    help="Output file.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    metavar="K",
    help="Requests in flight.",
)
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False),
    default=None,
    help="Checkpoint file; default: OUTPUT.checkpoint.json.",
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
    concurrency: int,
    checkpoint: str | None,
    resume: bool,
    slice_pages: int,
) -> None:
    """Export every chat created in [--since, --until) to a file, each exactly once.

    Resumable: the checkpoint is kept after every slice; after a crash or
    Ctrl-C, run the same command with --resume.
    """
    parsed = parse_filters(filters)
    ckpt = checkpoint if checkpoint is not None else output + ".checkpoint.json"
    bar = ProgressLine.for_stderr(settings.quiet)

    def show(p: ExportProgress) -> None:
        bar.update(
            records=p.records, total=p.total, pages=p.pages, retries=p.retries, elapsed=p.elapsed
        )

    async def go() -> None:
        # An export runs for long at the tenant's budget: learn its rate limit (costs
        # nothing without one; see benchmarks scenario 10).
        async with _client(settings, concurrency, adaptive=True) as client:
            try:
                report = await export_chats(
                    client,
                    since=since,
                    until=until,
                    filters=parsed,
                    sink=make_sink(output, fmt),
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
            _echo_err(settings, "note: the server sent no totals; slice counts were not verified")
        _echo_err(settings, f"{report.summary()} output={output}")

    def interrupted() -> NoReturn:
        raise Resumable(
            f"interrupted; checkpoint saved to {ckpt}. "
            "Run the same command with --resume to continue."
        )

    def transient(exc: TransientError) -> NoReturn:
        raise Resumable(
            f"{_api_message(exc)} (retries exhausted); checkpoint saved to {ckpt}. "
            "Run the same command with --resume to continue."
        )

    _run(go(), on_interrupt=interrupted, on_transient=transient)


@main.command()
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
    from .sandbox import serve

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
                _summary(
                    records,
                    client.stats.pages,
                    client.stats.requests,
                    client.stats.retries,
                    elapsed,
                )
                + f" server_requests={sb.stats.requests_total} faults={faults_seen}"
                + f" peak_in_flight={sb.stats.peak_in_flight}"
            )

    _run(go())


main.add_command(sandbox_command, "sandbox")


if __name__ == "__main__":
    main()
