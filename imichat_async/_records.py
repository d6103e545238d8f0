"""The records users get: attrs classes, and the one cattrs converter that builds them.

All decoding policy lives in `make_converter`; its docstring lists each rule
and the line of the wire contract ("Record quirks a client must survive") or
the vendor's page that makes it necessary.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, override

from ._errors import DecodeError

_EMPTY: Mapping[str, Any] = MappingProxyType({})


class ChatStatus(str, enum.Enum):
    """The vendor's chat statuses. Unknown ones from the server stay plain `str`."""

    QUEUED = "queued"
    PICKED = "picked"
    ONHOLD = "onhold"
    CLOSED = "closed"

    def __str__(self) -> str:
        return self.value


class Channel(str, enum.Enum):
    """The vendor's channels. Unknown ones from the server stay plain `str`."""

    SMS = "sms"
    FACEBOOK = "facebook"
    TWITTER = "twitter"
    LIVECHAT = "livechat"
    EMAIL = "email"
    ABC = "abc"
    WHATSAPP = "whatsapp"
    API = "api"

    def __str__(self) -> str:
        return self.value


@attrs.frozen
class Asset:
    """The channel asset a chat was created on.

    `id` is kept as the server sent it: an int, or a str (an email address, a
    service key, or a numeric string whose leading zeros must survive).
    """

    id: int | str | None = None
    name: str | None = None


@attrs.frozen
class Chat:
    """One chat of the search result (the vendor's "Chat List OBJECT")."""

    chat_id: str
    alias_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    status: ChatStatus | str | None = None
    channel: Channel | str | None = None
    asset: Asset | None = None
    customer_id: str | None = None
    destination_id: str | None = None
    assignee: str | None = None
    flag: str | None = None
    tag: list[str] = attrs.field(factory=list, hash=False)  # JSON's list, compares to one
    other_details: Mapping[str, Any] = attrs.field(default=_EMPTY, hash=False)


E = TypeVar("E", bound=enum.Enum)


def parse_utc(value: str) -> datetime:
    """An ISO 8601 string as an aware UTC datetime; naive means UTC, `Z` is accepted on 3.10."""
    try:
        parsed = datetime.fromisoformat(value)  # 3.11+ reads "Z" itself: the fast path
    except ValueError:
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        parsed = datetime.fromisoformat(text)
    tz = parsed.tzinfo
    if tz is timezone.utc:
        return parsed
    if tz is None:
        return parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def _open_enum(cls: type[E]) -> Any:
    members = {m.value: m for m in cls}

    def structure(value: Any, _: Any) -> E | str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {type(value).__name__}")
        return members.get(value, value)

    return structure


def _datetime(value: Any, _: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"expected an ISO 8601 string, got {type(value).__name__}")
    return parse_utc(value)


def _optional_str(value: Any, _: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a numeric id sent unquoted: keep its digits
    raise TypeError(f"expected a string, got {type(value).__name__}")


def _asset_id(value: Any, _: Any) -> int | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError(f"expected an int or a string, got {type(value).__name__}")


def _tags(value: Any, _: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]  # a lone tag sent as a string
    if not isinstance(value, list):
        raise TypeError(f"expected a list of strings, got {type(value).__name__}")
    if not all(isinstance(t, str) for t in value):
        raise TypeError("expected a list of strings")
    return value


def _details(value: Any, _: Any) -> Mapping[str, Any]:
    if value is None:
        return _EMPTY
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _asset(converter: cattrs.Converter) -> Any:
    structure_asset = make_dict_structure_fn(
        Asset, converter, id=override(struct_hook=_asset_id), _cattrs_forbid_extra_keys=False
    )

    def structure(value: Any, _: Any) -> Asset | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise TypeError(f"expected a JSON object, got {type(value).__name__}")
        return structure_asset(value, Asset)

    return structure


def make_converter() -> cattrs.Converter:
    """The converter for `Chat` and `Asset`. Its rules, each from the wire contract:

    - datetimes: ISO 8601 strings, `Z` or an offset, become aware UTC; a naive
      one is taken as UTC;
    - `asset.id`: int or str kept as sent ("integer" on the vendor's page, an
      email or service key in practice; a numeric string keeps its zeros);
    - `status`, `channel`: a known value becomes the enum member, an unknown
      one stays a plain `str` (new enum values may appear);
    - any optional field missing or `null` becomes `None`; `tag` becomes `[]`,
      `other_details` an empty mapping, `asset` `None`;
    - unknown extra fields are ignored;
    - `other_details` is kept as the free-form JSON object it is.

    Only `chat_id` is required. The hook for `Chat` is the generated one
    behind a fast path for the common shapes (`_with_fast_path`), which builds
    the same records.
    """
    conv = cattrs.Converter(detailed_validation=True, forbid_extra_keys=False)
    conv.register_structure_hook(datetime, _datetime)
    conv.register_structure_hook(Chat, _with_fast_path(detailed_chat_hook(conv)))
    return conv


def detailed_chat_hook(conv: cattrs.Converter) -> Callable[[Any, Any], Chat]:
    """cattrs' generated hook for `Chat`, with every rule of `make_converter` (no fast path)."""
    str_hook = override(struct_hook=_optional_str)
    return make_dict_structure_fn(
        Chat,
        conv,
        chat_id=override(struct_hook=_required_str),
        alias_id=str_hook,
        created_at=override(struct_hook=_datetime),
        updated_at=override(struct_hook=_datetime),
        status=override(struct_hook=_open_enum(ChatStatus)),
        channel=override(struct_hook=_open_enum(Channel)),
        asset=override(struct_hook=_asset(conv)),
        customer_id=str_hook,
        destination_id=str_hook,
        assignee=str_hook,
        flag=str_hook,
        tag=override(struct_hook=_tags),
        other_details=override(struct_hook=_details),
    )


class _Unusual(Exception):
    """A field outside the common shapes: the generated hook decides."""


if sys.version_info >= (3, 11):
    _from_z = datetime.fromisoformat  # reads "Z" itself, returns timezone.utc
else:  # pragma: no cover - exercised on 3.10 only

    def _from_z(value: str) -> datetime:
        return datetime.fromisoformat(value[:-1] + "+00:00")


def _with_fast_path(detailed: Callable[[Any, Any], Chat]) -> Callable[[Any, Any], Chat]:
    """The Chat hook: a plain function for the shapes real pages carry, else cattrs' own.

    The generated hook (`detailed`) is the rule; the fast path only takes a
    record whose every field already has its common type (str or null, a
    `...Z` datetime, a list of str, an object) and builds exactly what the
    generated hook would. Anything else (a number where a str belongs, an
    offset datetime, a missing `chat_id`, ...) goes to the generated hook,
    which converts it or raises the detailed error. Decoding a page costs
    about two thirds as much this way (see benchmarks/RESULTS.md, scenario 3).
    """
    statuses = {m.value: m for m in ChatStatus}
    channels = {m.value: m for m in Channel}
    empty = _EMPTY
    utc = timezone.utc

    def text(v: Any) -> str | None:
        if v is None or v.__class__ is str:
            return v
        raise _Unusual

    def when(v: Any) -> datetime | None:
        if v is None:
            return None
        if v.__class__ is str and v[-1:] == "Z":
            parsed = _from_z(v)
            if parsed.tzinfo is utc:
                return parsed
        raise _Unusual

    def fast(o: Any) -> Chat:
        g = o.get
        chat_id = g("chat_id")
        if chat_id.__class__ is not str or not chat_id:
            raise _Unusual
        a = g("asset")
        if a is not None:
            if a.__class__ is not dict:
                raise _Unusual
            aid = a.get("id")
            if not (aid is None or aid.__class__ is int or aid.__class__ is str):
                raise _Unusual
            a = Asset(aid, text(a.get("name")))
        tag = g("tag")
        if tag is None:
            tag = []
        elif tag.__class__ is not list or not all(t.__class__ is str for t in tag):
            raise _Unusual
        details = g("other_details")
        if details is None:
            details = empty
        elif details.__class__ is not dict:
            raise _Unusual
        st, ch = g("status"), g("channel")
        if not (st is None or st.__class__ is str) or not (ch is None or ch.__class__ is str):
            raise _Unusual
        return Chat(
            chat_id,
            text(g("alias_id")),
            when(g("created_at")),
            when(g("updated_at")),
            None if st is None else statuses.get(st, st),
            None if ch is None else channels.get(ch, ch),
            a,
            text(g("customer_id")),
            text(g("destination_id")),
            text(g("assignee")),
            text(g("flag")),
            tag,
            details,
        )

    def structure(raw: Any, cls: Any) -> Chat:
        if raw.__class__ is dict:
            try:
                return fast(raw)
            except Exception:  # _Unusual, or a value fromisoformat refuses
                pass
        return detailed(raw, cls)

    return structure


def _required_str(value: Any, _: Any) -> str:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"expected a non-empty string, got {value!r:.40}")


_CONVERTER = make_converter()
_structure_chat = _CONVERTER.get_structure_hook(Chat)


def decode_chat(raw: Mapping[str, Any], *, page: int | None = None, index: int = 0) -> Chat:
    """One raw chat object as a `Chat`; raises `DecodeError` naming page, index and field."""
    where = f"page {page}, record {index}" if page is not None else f"record {index}"
    if not isinstance(raw, Mapping):
        raise DecodeError(f"cannot decode {where}: not a JSON object", page=page)
    try:
        return _structure_chat(raw, Chat)  # type: ignore[no-any-return]
    except Exception as exc:  # cattrs wraps per-field errors; unwrap to a plain message
        field, reason = _first_failure(exc)
        chat_id = raw.get("chat_id")
        ident = f" (chat_id {chat_id!r:.60})" if isinstance(chat_id, str) else ""
        raise DecodeError(
            f"cannot decode {where}{ident}: field {field!r}: {reason}", page=page, field=field
        ) from None


def decode_page(raws: Sequence[Mapping[str, Any]], page: int | None = None) -> list[Chat]:
    """A page of raw chat objects as `Chat` records, in order."""
    structure = _structure_chat
    try:
        return [structure(raw, Chat) for raw in raws]
    except Exception:
        pass  # slow path below finds and names the failing record
    return [decode_chat(raw, page=page, index=i) for i, raw in enumerate(raws)]


def _first_failure(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, cattrs.ClassValidationError):
        for sub in exc.exceptions:
            notes = getattr(sub, "__notes__", None) or []
            field = "?"
            for note in notes:
                if hasattr(note, "name"):
                    field = str(note.name)
                elif isinstance(note, str) and "attribute" in note:
                    field = note.split("attribute", 1)[1].strip().split(" ")[0].strip("'")
            if isinstance(sub, KeyError):
                return field, "missing"
            if isinstance(sub, cattrs.ClassValidationError):
                inner_field, reason = _first_failure(sub)
                return f"{field}.{inner_field}", reason
            return field, str(sub) or type(sub).__name__
    if isinstance(exc, (TypeError, AttributeError)):
        return "?", "not a JSON object"
    return "?", f"{type(exc).__name__}: {exc}"
