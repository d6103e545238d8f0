"""The `imichat-async` group: global options (credentials, sandbox, verbosity) and commands.

The global options may come before the command or after it (`export ... --quiet`):
every command added to the group gets a copy of them that updates the settings.
"""

from __future__ import annotations

from typing import Any

import click
from click.core import ParameterSource

from .. import __version__
from ..sandbox.cli import sandbox_command
from ._demo import demo
from ._export import export
from ._search import search
from ._sync import sync
from ._wiring import ENV_BASE_URL, ENV_TEAM_ID, ENV_TOKEN, Settings, configure_logging

_OWN_OPTIONS = frozenset({"sandbox"})  # commands whose options are their own (a server)


def _global_options(*, copy: bool) -> list[click.Option]:
    """The group's options; `copy=True`: the same flags for a command, without defaults or
    environment variables, merged into the settings only when given (`_merge`)."""

    def opt(decls: list[str], name: str, **kw: Any) -> click.Option:
        if copy:
            for key in ("envvar", "default", "show_default"):
                kw.pop(key, None)
            kw.update(expose_value=False, callback=_merge)
        return click.Option([*decls, name], **kw)

    return [
        opt(["--base-url"], "base_url", envvar=ENV_BASE_URL, metavar="URL",
            help=f"API root (or ${ENV_BASE_URL})."),
        opt(["--token"], "token", envvar=ENV_TOKEN, metavar="TOKEN",
            help=f"Access token (or ${ENV_TOKEN}); never printed."),
        opt(["--team-id"], "team_id", envvar=ENV_TEAM_ID, metavar="ID",
            help=f"Team id (or ${ENV_TEAM_ID})."),
        opt(["--sandbox"], "sandbox", is_flag=True,
            help="Run the command against an embedded sandbox on 127.0.0.1."),
        opt(["--sandbox-chats"], "sandbox_chats", type=click.IntRange(min=0), default=5000,
            show_default=True, help="Chats in the embedded sandbox."),
        opt(["--sandbox-latency"], "sandbox_latency", type=click.FloatRange(min=0.0),
            default=0.0, show_default=True, help="Seconds per request of the embedded sandbox."),
        opt(["--sandbox-faults"], "sandbox_faults", type=click.FloatRange(0.0, 1.0),
            default=0.0, show_default=True,
            help="Probability of a transient fault per request of the embedded sandbox."),
        opt(["-q", "--quiet"], "quiet", is_flag=True,
            help="No progress bar and no summary line."),
        opt(["-v", "--verbose"], "verbose", count=True,
            help="Log to stderr (-v info, -vv debug)."),
    ]  # fmt: skip


def _merge(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """A global option given after the command: it overrides the group's value."""
    settings = ctx.find_object(Settings)
    name = param.name
    if settings is None or name is None:
        return
    if ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
        return
    if name == "verbose":
        configure_logging(value)
        return
    setattr(settings, name, value)
    settings.given.add(name)


class _Group(click.Group):
    """Adds the global options to every command it is given (but `sandbox`'s own)."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if (name or cmd.name) not in _OWN_OPTIONS:
            taken = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
            cmd.params.extend(
                o for o in _global_options(copy=True) if not taken.intersection(o.opts)
            )
        super().add_command(cmd, name)


@click.group(
    cls=_Group,
    params=_global_options(copy=False),
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="imichat-async")
@click.pass_context
def main(ctx: click.Context, /, verbose: int, **options: Any) -> None:
    """Search and export IMIchat chats (POST /chats/search), concurrently and resumably.

    The options below may also follow the command (`imichat-async search --sandbox -v`).

    Exit codes: 0 ok, 1 other error, 2 usage or invalid query, 3 API error
    (permanent), 4 export or sync interrupted (Ctrl-C, SIGTERM) but resumable,
    130 interrupted, 141 stdout closed (`| head`).
    """
    configure_logging(verbose)
    given = {
        name for name in options if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    }
    ctx.obj = Settings(**options, given=given)


main.add_command(search)
main.add_command(export)
main.add_command(sync)
main.add_command(demo)
main.add_command(sandbox_command, "sandbox")
