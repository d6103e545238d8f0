"""The `imichat-async` group: global options (credentials, sandbox, verbosity) and commands."""

from __future__ import annotations

import logging
import sys

import click

from .. import __version__
from ..sandbox.cli import sandbox_command
from ._demo import demo
from ._export import export
from ._search import search
from ._wiring import ENV_BASE_URL, ENV_TEAM_ID, ENV_TOKEN, Settings


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


main.add_command(search)
main.add_command(export)
main.add_command(demo)
main.add_command(sandbox_command, "sandbox")
