"""Exit codes: each failure of a command turned into its message and code."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
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


def api_message(exc: ApiError) -> str:
    # The error's own message says what failed (no response, TLS, or the vendor's answer).
    return f"API error: {exc}" if exc.http_status else str(exc)


def run(
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
        raise CliError(api_message(exc) + " (retries exhausted)") from None
    except ApiError as exc:
        raise ApiFailure(api_message(exc)) from None
    except ImiChatError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(os_message(exc)) from None


def os_message(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"
