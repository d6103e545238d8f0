"""Settings from the group's options, `--filter` parsing, and the client they configure."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import attrs
import click

from .. import ConfigurationError, Filter, ImiChatClient
from ..export import ParquetSink, Sink, make_sink

ENV_BASE_URL = "IMICHAT_BASE_URL"
ENV_TOKEN = "IMICHAT_TOKEN"
ENV_TEAM_ID = "IMICHAT_TEAM_ID"
ENV_RATE_STORE = "IMICHAT_RATE_STORE"


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
    given: set[str] = attrs.field(factory=set)  # the options given on the command line

    def check(self) -> None:
        """Refuse options that would be silently ignored: credentials given with `--sandbox`
        (it has its own), `--sandbox-*` settings without it. Raises `click.UsageError`."""
        if self.sandbox:
            extra, why = CREDENTIALS, "the embedded sandbox has its own credentials"
        else:
            extra, why = SANDBOX_SETTINGS, "they set up the embedded sandbox"
        named = [_flag(name) for name in extra if name in self.given]
        if named:
            state = "with" if self.sandbox else "without"
            raise click.UsageError(
                f"{', '.join(named)} given {state} --sandbox ({why}): "
                + ("drop one or the other" if self.sandbox else "add --sandbox or drop them")
            )


CREDENTIALS = ("base_url", "token", "team_id")
SANDBOX_SETTINGS = ("sandbox_chats", "sandbox_latency", "sandbox_faults")
MAX_CONCURRENCY = 256


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_filters(values: Sequence[str]) -> list[Filter]:
    """`param=value` / `param__op=value` strings as `Filter`s; `click.BadParameter` if malformed.

    Params, operators and values are checked later, by the client, before any request.
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
        param, sep, op = key.rpartition("__")  # the keyword form of `search_chats`
        if not sep:
            param, op = key, "eq"
        out.append(Filter(param, op, value))
    return out


_FILTER_HELP = "PARAM=VALUE (eq) or PARAM__OP=VALUE, e.g. status=closed, {}status__not_eq=queued{}."


def filter_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--filter`, any parameter (`created_at__gte=...` too)."""
    text = _FILTER_HELP.format("created_at__gte=2024-05-01, ", ". Repeatable")
    return click.option(
        "--filter", "-f", "filters", multiple=True, metavar="PARAM[__OP]=VALUE", help=text
    )(f)


def sync_filter_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--filter` of `sync`: not on `created_at`/`updated_at` (the sync owns them and
    refuses them), so its help suggests none."""
    text = _FILTER_HELP.format(
        "", "; not on created_at or updated_at (the sync sets them). Repeatable"
    )
    return click.option(
        "--filter", "-f", "filters", multiple=True, metavar="PARAM[__OP]=VALUE", help=text
    )(f)


def format_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--format ndjson|csv|parquet` (parameter `fmt`); default from the file's suffix."""
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(["ndjson", "csv", "parquet"]),
        default=None,
        help="File format; default from the file's suffix (.csv), else ndjson. parquet: "
        "-o is a directory or an fsspec URL (s3://bucket/prefix), written as a "
        "partitioned dataset (extra `parquet`).",
    )(f)


def max_rows_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--max-rows-per-file N` (parameter `max_rows`), Parquet only."""
    return click.option(
        "--max-rows-per-file",
        "max_rows",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="Parquet: rows of one file at most, and rows held in memory before a batch "
        "of files is written [default: 25000].",
    )(f)


def output_sink(output: str, fmt: str | None, max_rows: int | None, *, append: bool) -> Sink:
    """The sink of `-o OUTPUT --format FMT`: a file (checked as click does) or, for
    `--format parquet`, a dataset directory or URL."""
    if fmt == "parquet":
        try:
            if max_rows is None:
                return ParquetSink(output, append=append)
            return ParquetSink(output, append=append, max_rows_per_file=max_rows)
        except ConfigurationError as exc:  # the extra is missing
            raise click.UsageError(str(exc)) from None
    if max_rows is not None:
        raise click.BadParameter("only with --format parquet", param_hint="'--max-rows-per-file'")
    ctx = click.get_current_context()
    param = next((p for p in ctx.command.params if p.name == "output"), None)
    click.Path(dir_okay=False, writable=True).convert(output, param, ctx)
    return make_sink(output, fmt, append=append)


def _cap_concurrency(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value > MAX_CONCURRENCY:
        # Every request in flight holds a connection (a file descriptor), and an export
        # reads that many slices at once: 20,000 ran out of descriptors (issue #12).
        click.echo(
            f"note: --concurrency {value:,} capped at {MAX_CONCURRENCY} "
            "(each request in flight holds a connection)",
            err=True,
        )
        return MAX_CONCURRENCY
    return value


def concurrency_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--concurrency K`: requests in flight, 8 by default, capped at `MAX_CONCURRENCY`."""
    return click.option(
        "--concurrency",
        type=click.IntRange(min=1),
        default=8,
        show_default=True,
        metavar="K",
        callback=_cap_concurrency,
        help=f"Requests in flight (at most {MAX_CONCURRENCY}; more is capped, with a note).",
    )(f)


def rate_store_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--rate-store URL` (or `$IMICHAT_RATE_STORE`): the fleet's shared send rate."""
    return click.option(
        "--rate-store",
        "rate_store",
        envvar=ENV_RATE_STORE,
        default=None,
        metavar="URL",
        help=(
            f"redis:// or rediss:// URL (or ${ENV_RATE_STORE}): share one learned send rate "
            "with every process reading this tenant through the same Redis (extra `redis`)."
        ),
    )(f)


def configure_logging(verbose: int) -> None:
    """`-v`: INFO to stderr, `-vv`: DEBUG. Without it the library logs to a NullHandler, so
    its warnings stay off the terminal (retries are counted in the progress and summary)."""
    if verbose:
        logging.basicConfig(
            level=logging.DEBUG if verbose > 1 else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
            force=True,
        )


# -- running -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_client(
    settings: Settings,
    concurrency: int = 8,
    *,
    adaptive: bool = False,
    rate_store: str | None = None,
) -> AsyncIterator[ImiChatClient]:
    """A client on the configured API, or on an embedded sandbox with `--sandbox`.

    `adaptive=True` (export, sync) learns the tenant's rate limit (see `ImiChatClient`);
    a `rate_store` URL shares that learned rate with the fleet (so it implies adaptive).
    """
    settings.check()
    adaptive = adaptive or bool(rate_store)
    store = rate_store or None
    if settings.sandbox:
        from ..sandbox import serve

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
                rate_store=store,
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
        rate_store=store,
    ) as client:
        yield client


def echo_err(settings: Settings, text: str) -> None:
    if not settings.quiet:
        click.echo(text, err=True)


UNVERIFIED = (
    "warning: not every slice's count matched the server's total (it sent none, or a "
    "slice stayed short after its re-reads: see the notes); the counts are not verified"
)
