"""The tenant's chats as they change (inserts, updates, churn) and the cached search answers.

`Tenant` owns the `Table` (chats in served order, with their index rows),
the generator churn draws from and its hot set, and two caches that live
exactly as long as the data does: the matches of recent queries and the
serialized pages. Every change forgets both.

It knows no HTTP and counts nothing: `Sandbox` composes it, calls it from its
handlers and keeps `Stats`.
"""

from __future__ import annotations

import collections
import json
import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attrs

from .data import AGENTS, END_US, ChatFactory, Row, Table, format_us, row_of
from .query import Query, make_query, select
from .vendor import PAGE_SIZE, STATUSES, SUCCESS, describe

HOT_SHARE = 0.8  # share of churn updates that hit the hot set
HOT_SIZE = 20  # the most chats in the hot set
_BODY_CACHE_SIZE = 20_000  # serialized pages kept (about 5 KB each)
_CACHE_SIZE = 128
_MS = 1000
#: How a success body is serialized (`Sandbox(json_style=)`): json.dumps' keywords.
JSON_STYLES: dict[str, dict[str, Any]] = {
    "compact": {"separators": (",", ":")},  # ASCII only: other characters as \u escapes
    "spaced": {"ensure_ascii": False},  # ", " and ": ", characters as they are (UTF-8)
    "pretty": {"ensure_ascii": False, "indent": 2},  # every record over several lines
}


@attrs.frozen
class Churn:
    """What one `Sandbox.churn` did: the new versions of updated chats, and the new chats.

    A chat updated twice in one call appears twice in `updated`, oldest version first.
    """

    updated: list[dict[str, Any]]
    inserted: list[dict[str, Any]]


class Tenant:
    """The chats of one tenant (`chats` of them, drawn from `seed`) and how they change.

    `wall_clock` (epoch seconds) stamps the `created_at`/`updated_at` of chats
    changed now.
    """

    def __init__(
        self, chats: int, seed: int, wall_clock: Callable[[], float], json_style: str = "compact"
    ) -> None:
        if json_style not in JSON_STYLES:
            raise ValueError(f"json_style must be one of {sorted(JSON_STYLES)}, got {json_style!r}")
        self._json = JSON_STYLES[json_style]
        self._wall_clock = wall_clock
        self._factory = ChatFactory(seed)
        self._table = Table(*self._factory.generate(chats))
        #: Every chat, in served order (the table's own list: read it, do not change it).
        self.data: list[dict[str, Any]] = self._table.chats
        self._rows: list[Row] = self._table.rows
        self._churn_rng = random.Random(f"churn-{seed}")
        self._hot: collections.deque[str] | None = None  # busy chats, made at the first churn
        self._cache: OrderedDict[Query, list[dict[str, Any]]] = OrderedDict()
        self._bodies: dict[tuple[Query, int], bytes] = {}  # serialized pages, same lifetime

    # -- reading -----------------------------------------------------------------------------

    def results(self, query: Query) -> list[dict[str, Any]]:
        """The chats matching `query`, in served order (cached: do not change the list)."""
        hit = self._cache.get(query)
        if hit is not None:
            self._cache.move_to_end(query)
            return hit
        result = select(self._table, query)
        self._cache[query] = result
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return result

    def page_body(self, query: Query, page: int, results: list[dict[str, Any]]) -> bytes:
        """The success body of `page` of `results` (the matches of `query`), serialized once."""
        body = self._bodies.get((query, page))
        if body is None:
            start = (page - 1) * PAGE_SIZE
            doc = {
                "status_code": SUCCESS,
                "description": describe(SUCCESS),
                "response": results[start : start + PAGE_SIZE],
            }
            body = json.dumps(doc, **self._json).encode()
            if len(self._bodies) >= _BODY_CACHE_SIZE:
                self._bodies.clear()
            self._bodies[(query, page)] = body
        return body

    def expected(
        self, filters: list[tuple[str, str, str]] | None, condition: str
    ) -> list[dict[str, Any]]:
        """See `Sandbox.expected`; raises `QueryError` for filters the server would refuse."""
        return list(self.results(make_query(filters, condition)))

    def current_records(self) -> dict[str, dict[str, Any]]:
        """See `Sandbox.current_records`."""
        return {chat["chat_id"]: chat for chat in self.data}

    # -- changing ----------------------------------------------------------------------------

    def _changed(self) -> None:
        """Forget every cached answer: the data changed."""
        self._cache.clear()
        self._bodies.clear()

    def insert_chats(self, n: int) -> list[dict[str, Any]]:
        """See `Sandbox.insert_chats`."""
        newest = max(self._rows[0].created_us if self._rows else 0, END_US)
        made = [self._factory.make(newest + (i + 1) * 1_000_000) for i in range(n)]
        made.reverse()  # newest first
        for chat, row in made:
            self._table.insert(chat, row)
        self._changed()
        return [chat for chat, _ in made]

    def _now_us(self) -> int:
        """The wall clock in whole milliseconds (what `format_us` serves), as microseconds."""
        return int(self._wall_clock() * 1000) * _MS

    def update_chat(self, chat_id: str, status: str | None = None) -> dict[str, Any]:
        """See `Sandbox.update_chat`; raises `KeyError` for an unknown id."""
        try:
            chat, row = self._table.get(chat_id)
        except KeyError:
            raise KeyError(f"no chat {chat_id!r} in this sandbox") from None
        if status is None:
            others = [s for s in STATUSES if s != chat.get("status")]
            status = others[int(self._churn_rng.random() * len(others))]
        updated_us = max(self._now_us(), row.updated_us + _MS)
        new = dict(chat)
        new["status"] = status
        new["updated_at"] = format_us(updated_us)
        if "assignee" in new:
            if status == "queued":
                new["assignee"] = None
            elif new["assignee"] is None:
                new["assignee"] = AGENTS[int(self._churn_rng.random() * len(AGENTS))]
        self._table.replace(new, row_of(new, row.created_us, updated_us))
        self._changed()
        return new

    def drop_updated_at(self, chat_id: str, missing: bool = False) -> dict[str, Any]:
        """See `Sandbox.drop_updated_at`; raises `KeyError` for an unknown id."""
        try:
            chat, row = self._table.get(chat_id)
        except KeyError:
            raise KeyError(f"no chat {chat_id!r} in this sandbox") from None
        new = dict(chat)
        if missing:
            new.pop("updated_at", None)
        else:
            new["updated_at"] = None
        self._table.replace(new, row)
        self._changed()
        return new

    def _insert_now(self) -> dict[str, Any]:
        """A new chat created now (`updated_at` = `created_at`), where the order puts it."""
        created_us = self._now_us()
        chat, row = self._factory.make(created_us)
        chat["updated_at"] = chat["created_at"]
        self._table.insert(chat, row._replace(updated_us=created_us))
        return chat

    def _hot_set(self) -> collections.deque[str]:
        """The busy chats: a tenth of the chats at the first churn, at most `HOT_SIZE`."""
        if self._hot is None:
            ids = self._table.ids()
            size = max(1, min(HOT_SIZE, len(ids) // 10))
            picked = self._churn_rng.sample(ids, min(size, len(ids)))
            self._hot = collections.deque(picked, maxlen=size)
        return self._hot

    def _pick_busy(self) -> str:
        """A chat to update (the tenant has some): from the hot set with probability `HOT_SHARE`."""
        rng = self._churn_rng
        hot = self._hot_set()
        if hot and rng.random() < HOT_SHARE:
            return hot[int(rng.random() * len(hot))]
        chat_id: str = self.data[int(rng.random() * len(self.data))]["chat_id"]
        return chat_id

    def churn(self, updates: int, inserts: int) -> Churn:
        """See `Sandbox.churn`; raises `ValueError` for a negative count."""
        if updates < 0 or inserts < 0:
            raise ValueError(f"updates and inserts must be >= 0, got {updates}, {inserts}")
        updated = [self.update_chat(self._pick_busy()) for _ in range(updates if self.data else 0)]
        hot = self._hot_set()  # made before the new chats join it
        inserted = [self._insert_now() for _ in range(inserts)]
        if inserted:
            hot.extend(chat["chat_id"] for chat in inserted)
            self._changed()
        return Churn(updated=updated, inserted=inserted)
