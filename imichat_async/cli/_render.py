"""What `search` and `demo` print on stdout: the chats table, or JSON lines."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from .. import Chat

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


def json_lines(records: Iterable[Mapping[str, Any]]) -> str:
    """The objects as sent, one per line (UTF-8 kept, no spaces)."""
    return "\n".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in records)
