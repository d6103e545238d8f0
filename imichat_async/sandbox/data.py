"""The sandbox's chats: deterministic, realistic records and the index the filters run on.

`ChatFactory(seed)` draws chats from `random.Random(seed)`: the vendor's Chat
List OBJECT and Asset OBJECT fields, spread over the twelve months before
`END` (2025-01-01T00:00:00Z), with the record quirks the wire contract warns
about on a small deterministic fraction (about 2% each): a numeric-string
`asset.id` with a leading zero, a missing or null optional field, a missing
`tag`, an unknown channel ("instagram") or status ("archived"), and extra
unknown fields.

Each chat comes with a `Row`: the values the filters compare, with the
datetimes already parsed to integer microseconds, so that filtering never
parses a string and datetime comparisons are exact.

`Table` holds the chats in served order with the two time indexes an indexed
server keeps (by `created_at`, by `updated_at`), so that a time-range query
reads its range instead of every row.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import gc
import itertools
import random
import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: The fixed instant the generated data ends at (the newest possible created_at).
END = datetime(2025, 1, 1, tzinfo=UTC)
_US = 1_000_000
END_US = (END - EPOCH) // timedelta(microseconds=1)
SPAN_S = 365 * 86_400  # created_at is spread over the 12 months before END

QUIRK_RATE = 0.02
UNKNOWN_CHANNEL = "instagram"
UNKNOWN_STATUS = "archived"

_STATUS_WEIGHTS = (("closed", 55), ("picked", 20), ("onhold", 10), ("queued", 15))
_CHANNEL_WEIGHTS = (
    ("sms", 20),
    ("whatsapp", 20),
    ("livechat", 15),
    ("email", 12),
    ("facebook", 12),
    ("api", 8),
    ("twitter", 7),
    ("abc", 6),
)
TAGS = (
    "billing",
    "refund",
    "vip",
    "complaint",
    "feedback",
    "sales",
    "urgent",
    "support",
    "order",
    "delivery",
)
FLAGS = ("important", "follow_up", "escalated", "spam")
AGENTS = tuple(f"agent{i:02d}@acme.com" for i in range(1, 25))
INTENTS = ("order_status", "billing", "returns", "product_info", "support")
GROUPS = ("retail", "premium", "care")
LANGUAGES = ("en", "hi", "es", "fr", "ar")
SOURCES = ("web", "app", "campaign", "qr")
_FIRST = ("asha", "ben", "chen", "dev", "elif", "femi", "gita", "hugo", "ines", "jon", "kiri")
_LAST = ("rao", "smith", "li", "patel", "kaya", "ade", "nair", "moreau", "silva", "berg")
#: Number of tags of a chat, drawn by indexing with int(random() * 100).
_TAG_COUNTS = (0,) * 30 + (1,) * 40 + (2,) * 20 + (3,) * 10
_TAG_SETS = [list(itertools.permutations(TAGS, k)) for k in range(4)]
_OPTIONAL_FIELDS = ("alias_id", "customer_id", "flag", "other_details", "asset", "assignee")

_DATETIME_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:?\d{2})\Z"
)


class Row(NamedTuple):
    """What the filters see of one chat: exactly the values served, datetimes in microseconds."""

    created_us: int
    updated_us: int
    status: Any
    channel: Any
    tags: tuple[Any, ...]
    assignee: Any
    destination_id: Any
    intent: Any
    group: Any


_DAY_US = 86_400 * _US
_day_cache: dict[int, str] = {}


def format_us(us: int) -> str:
    """ISO 8601 UTC with `Z`; milliseconds only when the instant has some."""
    day, rest = divmod(us, _DAY_US)
    date = _day_cache.get(day)
    if date is None:
        date = _day_cache[day] = (EPOCH + timedelta(days=day)).strftime("%Y-%m-%d")
    seconds, micro = divmod(rest, _US)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if micro:
        return f"{date}T{hours:02d}:{minutes:02d}:{seconds:02d}.{micro // 1000:03d}Z"
    return f"{date}T{hours:02d}:{minutes:02d}:{seconds:02d}Z"


def parse_datetime_us(value: str) -> int | None:
    """Microseconds since the epoch for an ISO 8601 datetime with `Z` or an offset, else None.

    A datetime without a zone is refused: the contract's values are UTC with `Z`.
    """
    m = _DATETIME_RE.match(value.strip())
    if m is None:
        return None
    year, month, day, hour, minute, second, frac, zone = m.groups()
    try:
        dt = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=UTC
        )
    except ValueError:
        return None
    us = (dt - EPOCH) // timedelta(microseconds=1)
    if frac:
        us += int(frac[:6].ljust(6, "0"))
    if zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:])
        if hours > 23 or minutes > 59:
            return None
        us -= sign * (hours * 3600 + minutes * 60) * _US
    return us


def row_of(chat: dict[str, Any], created_us: int, updated_us: int) -> Row:
    """The filter row of a chat as served (after quirks)."""
    tags = chat.get("tag")
    details = chat.get("other_details")
    if not isinstance(details, dict):
        details = {}
    return Row(
        created_us,
        updated_us,
        chat.get("status"),
        chat.get("channel"),
        tuple(tags) if isinstance(tags, list) else (),
        chat.get("assignee"),
        chat.get("destination_id"),
        details.get("intent"),
        details.get("group"),
    )


def order_key(chat: dict[str, Any], row: Row) -> tuple[int, str]:
    """The served order: newest `created_at` first, ties by `chat_id`."""
    return (-row.created_us, chat["chat_id"])


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No garbage collection inside: it would rescan the growing heap again and again (4x)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class ChatFactory:
    """Draws chats from one seeded generator; the same seed gives the same chats, in order."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        rng = self.rng
        self._statuses = [s for s, w in _STATUS_WEIGHTS for _ in range(w)]
        self._channels = [c for c, w in _CHANNEL_WEIGHTS for _ in range(w)]
        self.assets: dict[str, list[dict[str, Any]]] = {
            "sms": [{"id": rng.randrange(50_000, 99_999), "name": f"Acme SMS {i}"} for i in (1, 2)],
            "facebook": [
                {"id": rng.randrange(10**14, 10**15), "name": name}
                for name in ("Acme Store", "Acme Care")
            ],
            "twitter": [{"id": rng.randrange(10**9, 10**10), "name": "@acme_support"}],
            "livechat": [
                {"id": rng.randrange(1_000, 99_999), "name": name}
                for name in ("Acme Web Chat", "Acme App Chat")
            ],
            "email": [
                {"id": "support@acme.com", "name": "Acme Support"},
                {"id": "billing@acme.com", "name": "Acme Billing"},
            ],
            "api": [{"id": self._key(), "name": "Acme Custom API"}],
            "abc": [{"id": self._key(), "name": "Acme Business Chat"}],
            "whatsapp": [
                {"id": self._key(), "name": name} for name in ("Acme WhatsApp", "Acme WA Promo")
            ],
            UNKNOWN_CHANNEL: [{"id": rng.randrange(10**14, 10**15), "name": "Acme Insta"}],
        }
        self._customers: dict[str, list[tuple[str, str]]] = {}
        self.pool_size = 8  # customers per channel; set by `generate` from the data size

    def _key(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def _uuid(self) -> str:
        h = f"{self.rng.getrandbits(128):032x}"
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}"

    def _destination(self, channel: str, k: int) -> str:
        rng = self.rng
        if channel == "sms":
            return f"+9198{rng.randrange(10**8):08d}"
        if channel == "whatsapp":
            return f"9197{rng.randrange(10**8):08d}"
        if channel == "facebook":
            return str(rng.randrange(10**15, 10**16))
        if channel == "twitter":
            return str(rng.randrange(10**17, 10**19))
        if channel == "email":
            return f"{rng.choice(_FIRST)}.{rng.choice(_LAST)}{k}@example.com"
        if channel == "livechat":
            return f"{rng.getrandbits(96):024x}"
        if channel == "abc":
            return "urn:mbid:" + base64.b64encode(rng.randbytes(36)).decode()
        if channel == "api":
            return f"user_{rng.randrange(10**6):06d}"
        return str(rng.randrange(10**15, 10**17))  # instagram-scoped id

    def _customer(self, channel: str, pool_size: int) -> tuple[str, str]:
        pool = self._customers.setdefault(channel, [])
        k = int(self.rng.random() * pool_size)
        while len(pool) <= k:
            pool.append((self._uuid(), self._destination(channel, len(pool))))
        return pool[k]

    def make(self, created_us: int) -> tuple[dict[str, Any], Row]:
        """One chat created at `created_us`, and its filter row."""
        r = self.rng.random  # hot path: index sequences with random() instead of choice()
        status = UNKNOWN_STATUS if r() < QUIRK_RATE else self._statuses[int(r() * 100)]
        channel = UNKNOWN_CHANNEL if r() < QUIRK_RATE else self._channels[int(r() * 100)]
        if status == "queued":
            updated_us = created_us + int(r() * 600) * _US
        else:
            updated_us = created_us + (60 + int(r() * 5 * 86_400)) * _US
        assets = self.assets[channel]
        asset = dict(assets[int(r() * len(assets))])
        if isinstance(asset["id"], int) and r() < QUIRK_RATE:
            asset["id"] = f"00{asset['id']}"  # numeric string with a leading zero
        customer_id, destination_id = self._customer(channel, self.pool_size)
        tag_sets = _TAG_SETS[_TAG_COUNTS[int(r() * 100)]]
        details: dict[str, Any] = {
            "language": LANGUAGES[int(r() * len(LANGUAGES))],
            "source": SOURCES[int(r() * len(SOURCES))],
        }
        if channel == "abc":
            details["intent"] = INTENTS[int(r() * len(INTENTS))]
            details["group"] = GROUPS[int(r() * len(GROUPS))]
        elif channel == "livechat" and r() < 0.1:
            # other channels may carry an intent too; only abc chats match an intent filter
            details["intent"] = INTENTS[int(r() * len(INTENTS))]
        chat: dict[str, Any] = {
            "chat_id": self._uuid(),
            "alias_id": f"AC-{int(r() * 10**9):09d}",
            "created_at": format_us(created_us),
            "updated_at": format_us(updated_us),
            "status": status,
            "channel": channel,
            "asset": asset,
            "customer_id": customer_id,
            "destination_id": destination_id,
            "assignee": None if status == "queued" else AGENTS[int(r() * len(AGENTS))],
            "flag": FLAGS[int(r() * len(FLAGS))] if r() < 0.3 else None,
            "tag": list(tag_sets[int(r() * len(tag_sets))]),
            "other_details": details,
        }
        if r() < QUIRK_RATE:
            field = _OPTIONAL_FIELDS[int(r() * len(_OPTIONAL_FIELDS))]
            if r() < 0.5:
                del chat[field]
            else:
                chat[field] = None
        if r() < QUIRK_RATE:
            del chat["tag"]
        if r() < QUIRK_RATE:
            chat["priority"] = 1 + int(r() * 4)
            chat["sla"] = {"breached": r() < 0.5, "policy": "gold"}
        return chat, row_of(chat, created_us, updated_us)

    def generate(self, n: int) -> tuple[list[dict[str, Any]], list[Row]]:
        """`n` chats in server order (newest `created_at` first, ties by `chat_id`), with rows."""
        r = self.rng.random
        self.pool_size = max(8, n // 40)
        end_s = END_US // _US
        made = []
        with _gc_paused():
            for _ in range(n):
                created_us = (end_s - 1 - int(r() * (SPAN_S - 1))) * _US
                if r() < QUIRK_RATE:
                    created_us += (1 + int(r() * 999)) * 1000  # fractional seconds
                made.append(self.make(created_us))
            made.sort(key=lambda cr: order_key(*cr))
            return [c for c, _ in made], [row for _, row in made]


class Table:
    """The chats in served order, and the indexes a time-range query reads.

    `chats` and `rows` are parallel lists in served order (`order_key`), so a
    `created_at` range is one contiguous slice found by bisection on
    `-created_us`. The `updated_at` index is a sorted array of `updated_us`
    with the `chat_id` of each entry beside it. Inserting or changing a chat
    keeps all three in place (bisect plus list insert: a memmove, about 0.1 ms
    at 200,000 chats), so no query ever scans the table to find a time range.
    """

    def __init__(self, chats: list[dict[str, Any]], rows: list[Row]) -> None:
        self.chats = chats
        self.rows = rows
        with _gc_paused():  # no new container per chat either: lists of ints and strs
            ids = [chat["chat_id"] for chat in chats]
            self._neg_created = [-row.created_us for row in rows]
            self._chat_by_id = dict(zip(ids, chats, strict=True))
            self._row_by_id = dict(zip(ids, rows, strict=True))
            updated = [row.updated_us for row in rows]
            order = sorted(range(len(rows)), key=updated.__getitem__)
            self._updated_us = [updated[i] for i in order]
            self._updated_ids = [ids[i] for i in order]

    def __len__(self) -> int:
        return len(self.chats)

    def get(self, chat_id: str) -> tuple[dict[str, Any], Row]:
        """The current record of `chat_id` and its row; raises `KeyError` for an unknown id."""
        return self._chat_by_id[chat_id], self._row_by_id[chat_id]

    def ids(self) -> list[str]:
        """Every `chat_id`, in served order."""
        return [chat["chat_id"] for chat in self.chats]

    def _position(self, chat: dict[str, Any], row: Row) -> int:
        """Where `chat` sits (or would sit) in served order."""
        lo = bisect.bisect_left(self._neg_created, -row.created_us)
        hi = bisect.bisect_right(self._neg_created, -row.created_us, lo)
        chat_id = chat["chat_id"]
        return bisect.bisect_left(self.chats, chat_id, lo, hi, key=lambda c: c["chat_id"])

    def insert(self, chat: dict[str, Any], row: Row) -> int:
        """Add a new chat where the served order puts it; return its position."""
        if chat["chat_id"] in self._chat_by_id:
            raise ValueError(f"chat {chat['chat_id']!r} exists already")
        at = self._position(chat, row)
        self.chats.insert(at, chat)
        self.rows.insert(at, row)
        self._neg_created.insert(at, -row.created_us)
        self._chat_by_id[chat["chat_id"]] = chat
        self._row_by_id[chat["chat_id"]] = row
        self._index_updated(row.updated_us, chat["chat_id"])
        return at

    def replace(self, chat: dict[str, Any], row: Row) -> None:
        """Swap in a new version of an existing chat (same `chat_id`, same `created_at`).

        Its place in the served order stays; only the `updated_at` index moves.
        """
        chat_id = chat["chat_id"]
        old_chat, old_row = self.get(chat_id)
        if old_row.created_us != row.created_us:
            raise ValueError(f"chat {chat_id!r}: created_at cannot change")
        at = self._position(old_chat, old_row)
        self.chats[at] = chat
        self.rows[at] = row
        self._chat_by_id[chat_id] = chat
        self._row_by_id[chat_id] = row
        lo = bisect.bisect_left(self._updated_us, old_row.updated_us)
        hi = bisect.bisect_right(self._updated_us, old_row.updated_us, lo)
        k = self._updated_ids.index(chat_id, lo, hi)
        del self._updated_us[k], self._updated_ids[k]
        self._index_updated(row.updated_us, chat_id)

    def _index_updated(self, updated_us: int, chat_id: str) -> None:
        k = bisect.bisect_right(self._updated_us, updated_us)
        self._updated_us.insert(k, updated_us)
        self._updated_ids.insert(k, chat_id)

    def _created_bounds(self, lo: int, hi: int) -> tuple[int, int]:
        start = bisect.bisect_left(self._neg_created, -hi)
        return start, bisect.bisect_right(self._neg_created, -lo, start)

    def _updated_bounds(self, lo: int, hi: int) -> tuple[int, int]:
        start = bisect.bisect_left(self._updated_us, lo)
        return start, bisect.bisect_right(self._updated_us, hi, start)

    def count_created(self, lo: int, hi: int) -> int:
        """How many chats have `lo <= created_us <= hi`."""
        start, stop = self._created_bounds(lo, hi)
        return stop - start

    def count_updated(self, lo: int, hi: int) -> int:
        """How many chats have `lo <= updated_us <= hi`."""
        start, stop = self._updated_bounds(lo, hi)
        return stop - start

    def created_between(self, lo: int, hi: int) -> tuple[list[dict[str, Any]], list[Row]]:
        """The chats with `lo <= created_us <= hi` and their rows, in served order."""
        start, stop = self._created_bounds(lo, hi)
        return self.chats[start:stop], self.rows[start:stop]

    def updated_between(self, lo: int, hi: int) -> list[tuple[dict[str, Any], Row]]:
        """The chats with `lo <= updated_us <= hi` with their rows, in served order."""
        start, stop = self._updated_bounds(lo, hi)
        chats, rows = self._chat_by_id, self._row_by_id
        found = [(chats[chat_id], rows[chat_id]) for chat_id in self._updated_ids[start:stop]]
        found.sort(key=lambda pair: order_key(*pair))
        return found
