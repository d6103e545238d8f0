"""The `sandbox` command: serve a simulated tenant on 127.0.0.1 until SIGINT or SIGTERM.

Mounted by the main CLI as `imichat-async sandbox`, and run by `python -m
imichat_async.sandbox`. On start it prints its settings to stdout, flushed:
three lines for scripts and benchmarks that start it with `--port 0`, then
the same as the variables `imichat-async` reads, ready to `export` in a
shell::

    base_url=http://127.0.0.1:8765/v3.0
    team_id=...
    token=...
    IMICHAT_BASE_URL=http://127.0.0.1:8765/v3.0
    IMICHAT_TEAM_ID=...
    IMICHAT_TOKEN=...
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal
import sys
from typing import Any

import click

from .faults import FAULT_KINDS, Faults
from .server import serve


def _fault_page(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[int, str]:
    pages: dict[int, str] = {}
    for item in values:
        page, sep, kind = item.partition("=")
        if not sep or not page.strip().isdigit() or kind not in FAULT_KINDS:
            raise click.BadParameter(f"{item!r}: expected PAGE=KIND, KIND one of {FAULT_KINDS}")
        pages[int(page)] = kind
    return pages


#: The variables `imichat-async` reads its credentials from (its `--base-url`, `--team-id`,
#: `--token`); written here, not imported: the sandbox imports nothing of the client.
ENV_NAMES = ("IMICHAT_BASE_URL", "IMICHAT_TEAM_ID", "IMICHAT_TOKEN")


def settings_text(base_url: str, team_id: str, token: str) -> str:
    """What the command prints on start: `key=value` lines, then `IMICHAT_*=value` lines."""
    values = (base_url, team_id, token)
    plain = [
        f"{key}={value}"
        for key, value in zip(("base_url", "team_id", "token"), values, strict=True)
    ]
    env = [f"{name}={shlex.quote(value)}" for name, value in zip(ENV_NAMES, values, strict=True)]
    return "\n".join(plain + env) + "\n"


_PROBABILITY = click.FloatRange(0.0, 1.0)
_SECONDS = click.FloatRange(min=0.0)


@click.command("sandbox")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8765,
    show_default=True,
    help="Port on 127.0.0.1; 0 picks a free one.",
)
@click.option("--chats", type=click.IntRange(min=0), default=5000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-total", is_flag=True, help="Do not send X-Total-Count.")
@click.option("--latency", type=_SECONDS, default=0.0, help="Seconds per request.")
@click.option("--jitter", type=_SECONDS, default=0.0, help="Uniform extra 0..JITTER seconds.")
@click.option("--latency-per-page", type=_SECONDS, default=0.0, help="Seconds per page number.")
@click.option("--p-2007", type=_PROBABILITY, default=0.0)
@click.option("--p-3454", type=_PROBABILITY, default=0.0)
@click.option("--p-429", type=_PROBABILITY, default=0.0)
@click.option("--retry-after", type=_SECONDS, default=None, help="Retry-After on 429s.")
@click.option("--p-502", type=_PROBABILITY, default=0.0)
@click.option("--p-503", type=_PROBABILITY, default=0.0)
@click.option("--p-504", type=_PROBABILITY, default=0.0)
@click.option("--p-reset", type=_PROBABILITY, default=0.0)
@click.option("--p-hang", type=_PROBABILITY, default=0.0)
@click.option("--hang-seconds", type=_SECONDS, default=30.0, show_default=True)
@click.option(
    "--fault-page",
    "fault_pages",
    multiple=True,
    callback=_fault_page,
    metavar="PAGE=KIND",
    help="Fault on the first request of PAGE (repeatable).",
)
@click.option(
    "--max-in-flight",
    type=click.IntRange(min=1),
    default=None,
    help="429 above this many requests in flight.",
)
@click.option(
    "--insert-every",
    type=click.IntRange(min=1),
    default=None,
    help="Insert a chat at the head every N searches.",
)
@click.option(
    "--rate-limit",
    type=click.FloatRange(min=0.0, min_open=True),
    default=None,
    help="Requests/s of a token bucket; over it, 429 with Retry-After in whole seconds.",
)
@click.option(
    "--rate-burst",
    type=click.IntRange(min=1),
    default=None,
    help="Size of the rate-limit bucket [default: one second of --rate-limit].",
)
@click.option(
    "--churn-every",
    type=click.IntRange(min=1),
    default=None,
    help="Every N searches, update and insert chats (--churn-updates, --churn-inserts).",
)
@click.option(
    "--churn-updates",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Chats updated per churn (status, updated_at = now; busy chats again and again).",
)
@click.option(
    "--churn-inserts",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Chats created (now) per churn.",
)
@click.option("--token-ttl", type=_SECONDS, default=None, help="Token lifetime, seconds.")
@click.option(
    "--clock-offset",
    type=float,
    default=0.0,
    metavar="SECONDS",
    help="The server's clock this far from this machine's (Date headers, times of changes).",
)
@click.option(
    "--token-max-uses",
    type=click.IntRange(min=1),
    default=None,
    help="Requests per token before it expires.",
)
def sandbox_command(
    port: int,
    chats: int,
    seed: int,
    no_total: bool,
    token_ttl: float | None,
    token_max_uses: int | None,
    clock_offset: float,
    **knobs: Any,
) -> None:
    """Serve a simulated IMIchat tenant on 127.0.0.1 until interrupted."""
    faults = Faults(**knobs)
    with contextlib.suppress(KeyboardInterrupt):  # platforms without loop signal handlers
        asyncio.run(
            _serve(port, chats, seed, not no_total, faults, token_ttl, token_max_uses, clock_offset)
        )


async def _serve(
    port: int,
    chats: int,
    seed: int,
    total_header: bool,
    faults: Faults,
    token_ttl: float | None,
    token_max_uses: int | None,
    clock_offset: float = 0.0,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows
            loop.add_signal_handler(sig, stop.set)
    async with serve(
        chats=chats,
        seed=seed,
        total_header=total_header,
        faults=faults,
        token_ttl=token_ttl,
        token_max_uses=token_max_uses,
        port=port,
        clock_offset=clock_offset,
    ) as sb:
        sys.stdout.write(settings_text(sb.base_url, sb.team_id, sb.token))
        sys.stdout.flush()
        click.echo(
            f"serving {chats} chats; SIGINT or SIGTERM to stop "
            "(`export` the IMICHAT_* lines to point imichat-async at it)",
            err=True,
        )
        await stop.wait()
