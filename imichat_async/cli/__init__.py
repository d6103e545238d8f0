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

The work lives in the library (`ImiChatClient.search_pages`,
`imichat_async.export`); this package only parses, calls and prints:
`_main.py` the group and its options, `_search.py`, `_export.py` and
`_demo.py` one command each (`sandbox` is `imichat_async.sandbox.cli`),
`_wiring.py` settings, filters and the client, `_exit.py` errors to exit
codes, `_progress.py` the progress line and summary, `_render.py` the table.
"""

from __future__ import annotations

from ._main import main
from ._progress import ProgressLine

__all__ = ["ProgressLine", "main"]
