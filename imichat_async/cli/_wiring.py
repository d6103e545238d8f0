"""Settings from the group's options, `--filter` parsing, and the client they configure."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import attrs
import click

from .. import Filter, ImiChatClient

ENV_BASE_URL = "IMICHAT_BASE_URL"
ENV_TOKEN = "IMICHAT_TOKEN"
ENV_TEAM_ID = "IMICHAT_TEAM_ID"


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


_FILTER_HELP = (
    "PARAM=VALUE (eq) or PARAM__OP=VALUE, e.g. status=closed, created_at__gte=2024-05-01, "
    "status__not_eq=queued. Repeatable."
)


def filter_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--filter", "-f", "filters", multiple=True, metavar="PARAM[__OP]=VALUE", help=_FILTER_HELP
    )(f)


# -- running -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_client(
    settings: Settings, concurrency: int = 8, *, adaptive: bool = False
) -> AsyncIterator[ImiChatClient]:
    """A client on the configured API, or on an embedded sandbox with `--sandbox`.

    `adaptive=True` (export) learns the tenant's rate limit (see `ImiChatClient`).
    """
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


def echo_err(settings: Settings, text: str) -> None:
    if not settings.quiet:
        click.echo(text, err=True)
