"""Exit codes: each failure of a command turned into its message and code.

`run` is the one way a command runs its coroutine, so every command gets the
same handling of Ctrl-C, SIGTERM and a closed stdout pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, NoReturn

import click

from .. import ApiError, ConfigurationError, ImiChatError, InvalidQueryError, TransientError
from ..export import CheckpointError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_API = 3
EXIT_RESUMABLE = 4
EXIT_INTERRUPTED = 130
EXIT_PIPE = 128 + 13  # what a shell reports for a process killed by SIGPIPE


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
    """Exit code 4: the export (sync) stopped; its checkpoint (state) is saved."""

    exit_code = EXIT_RESUMABLE


class Interrupted(CliError):
    """Exit code 130: Ctrl-C, nothing to resume."""

    exit_code = EXIT_INTERRUPTED


def api_message(exc: ApiError) -> str:
    # The error's own message says what failed (no response, TLS, or the vendor's answer).
    return f"API error: {exc}" if exc.http_status else str(exc)


class Terminated(Exception):
    """The process got SIGTERM (`timeout`, `docker stop`, systemd, Kubernetes)."""


async def _until_terminated(coro: Coroutine[Any, Any, None]) -> None:
    """Run `coro`; SIGTERM cancels it as Ctrl-C does (so it cleans up and checkpoints),
    then raises `Terminated` instead of the cancellation."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    got: list[int] = []

    def on_term() -> None:
        got.append(signal.SIGTERM)
        if task is not None:
            task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, on_term)
        installed = True
    except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
        installed = False
    try:
        await coro
    except asyncio.CancelledError:
        if got:
            raise Terminated from None
        raise
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGTERM)


def run(
    coro: Coroutine[Any, Any, None],
    *,
    on_interrupt: Callable[[], NoReturn] | None = None,
    on_transient: Callable[[TransientError], NoReturn] | None = None,
    on_refused: Callable[[ApiError], NoReturn] | None = None,
    on_os_error: Callable[[OSError], NoReturn] | None = None,
    names: Mapping[str, str] | None = None,
) -> None:
    """`asyncio.run(coro)`, each failure turned into its message and exit code.

    `names` words the library's messages with the command's options (`--resume` for the
    API's `resume=True`: `CheckpointError.worded`).

    The hooks raise a command's own error for an interruption, retries run out, a
    permanent API error, or an OS error (a full disk) (the default: exit 130, 1, 3 and 1).

    Ctrl-C and SIGTERM cancel the coroutine (it cleans up), then `on_interrupt` raises the
    command's error (`Resumable` for an export); by default exit 130. A closed stdout pipe
    (`| head`) ends the command quietly with exit 141, as Unix tools do.
    """
    try:
        asyncio.run(_until_terminated(coro))
        sys.stdout.flush()  # a pipe closed after the last write fails here, not at exit
    except (KeyboardInterrupt, Terminated) as exc:
        why = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        try:
            if on_interrupt is not None:
                on_interrupt()
            raise Interrupted("interrupted")
        except CliError as err:
            if why == "interrupted":
                raise
            head, sep, rest = err.message.partition("interrupted")
            text = head + why + rest if sep and not head else f"{why}: {err.message}"
            raise type(err)(text) from None
    except BrokenPipeError:
        _silence_stdout()
        raise click.exceptions.Exit(EXIT_PIPE) from None
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except CheckpointError as exc:
        raise UsageFailure(exc.worded(names)) from None
    except (InvalidQueryError, ConfigurationError) as exc:
        raise click.UsageError(str(exc)) from None
    except TransientError as exc:
        if on_transient is not None:
            on_transient(exc)
        raise CliError(api_message(exc) + " (retries exhausted)") from None
    except ApiError as exc:
        if on_refused is not None:
            on_refused(exc)
        raise ApiFailure(api_message(exc)) from None
    except ImiChatError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        if on_os_error is not None:
            on_os_error(exc)
        raise CliError(os_message(exc)) from None


def run_resumable(
    coro: Coroutine[Any, Any, None],
    hint: Callable[[], str],
    *,
    on_refused: Callable[[ApiError], NoReturn] | None = None,
    names: Mapping[str, str] | None = None,
) -> None:
    """`run` for a command that can pick up where it stopped (export, sync): an
    interruption or retries run out exit 4 (`Resumable`), with `hint()` saying how; an
    OS error (a full disk: the message names the file) exits 1, with `hint()` too."""

    def interrupted() -> NoReturn:
        raise Resumable(f"interrupted; {hint()}")

    def transient(exc: TransientError) -> NoReturn:
        raise Resumable(f"{api_message(exc)} (retries exhausted); {hint()}")

    def os_error(exc: OSError) -> NoReturn:
        raise CliError(f"{os_message(exc)}; {hint()}")

    run(
        coro,
        on_interrupt=interrupted,
        on_transient=transient,
        on_refused=on_refused,
        on_os_error=os_error,
        names=names,
    )


def os_message(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of what is still buffered
    for the closed pipe prints no "Exception ignored ... BrokenPipeError"."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
