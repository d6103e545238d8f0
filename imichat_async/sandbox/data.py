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
"""

from __future__ import annotations

import base64
import gc
import itertools
import random
import re
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
        was_enabled = gc.isenabled()
        gc.disable()  # the collector would rescan the growing heap again and again: 4x slower
        try:
            for _ in range(n):
                created_us = (end_s - 1 - int(r() * (SPAN_S - 1))) * _US
                if r() < QUIRK_RATE:
                    created_us += (1 + int(r() * 999)) * 1000  # fractional seconds
                made.append(self.make(created_us))
            made.sort(key=lambda cr: (-cr[1].created_us, cr[0]["chat_id"]))
            return [c for c, _ in made], [row for _, row in made]
        finally:
            if was_enabled:
                gc.enable()
