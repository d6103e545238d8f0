"""A simulated IMIchat tenant for tests, the demo and benchmarks: `serve(...)` it on 127.0.0.1.

    from imichat_async import sandbox

    async with sandbox.serve(chats=1000, seed=0, p_429=0.1) as sb:
        sb.base_url, sb.token, sb.team_id   # what a client needs
        sb.expected([("status", "eq", "closed")])  # the server's own answer
        sb.stats.requests_by_page            # what happened
        sb.churn(updates=50, inserts=5)      # the data changes, as a live tenant's does
        sb.current_records()                 # chat_id -> the record served now

The server speaks the wire contract (`shared/spec/wire-contract.md`) exactly,
from its own copy of the vendor's table (`vendor`, never the client's), filters
for real, and injects the `Faults` asked for. `python -m
imichat_async.sandbox` serves one from the command line (see `cli`).
"""

from __future__ import annotations

from .data import END, Row
from .faults import FAULT_KINDS, Faults, Stats
from .query import Query, QueryError
from .server import SANDBOX_KEY, Churn, Sandbox, make_app, serve

__all__ = [
    "END",
    "FAULT_KINDS",
    "SANDBOX_KEY",
    "Churn",
    "Faults",
    "Query",
    "QueryError",
    "Row",
    "Sandbox",
    "Stats",
    "make_app",
    "serve",
]
