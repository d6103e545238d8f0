"""The records users get: attrs classes, and the one cattrs converter that builds them.

All decoding policy lives in `make_converter`; its docstring lists each rule
and the line of the wire contract ("Record quirks a client must survive") or
the vendor's page that makes it necessary.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, TypedDict, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_structure_fn_from_attrs, override
from cattrs.v import format_exception

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
_UTC = timezone.utc
_fromisoformat = datetime.fromisoformat


def parse_utc(value: str) -> datetime:
    """An ISO 8601 string as an aware UTC datetime, by the rule `Chat` timestamps are decoded by.

    Naive means UTC, an offset is converted, `Z` is accepted (on 3.10 too). Raises
    `ValueError` for a string that is not ISO 8601. Public (`imi.parse_utc`): the
    timestamps of `raw=True` records (`RawChat`) are strings as sent; this reads them
    as `Chat` would.
    """
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
        if value.__class__ is str:  # the common case first: decoding is per field, per record
            return members.get(value, value)
        if value is None:
            return None
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {type(value).__name__}")
        return members.get(value, value)

    return structure


def _datetime(value: Any, _: Any) -> datetime | None:
    if value.__class__ is str:  # the common case inlined: `...Z` read by 3.11's fromisoformat
        try:
            parsed = _fromisoformat(value)
        except ValueError:
            return parse_utc(value)
        if parsed.tzinfo is _UTC:
            return parsed
        return parse_utc(value)
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"expected an ISO 8601 string, got {type(value).__name__}")
    return parse_utc(value)


def _optional_str(value: Any, _: Any) -> str | None:
    if value.__class__ is str or value is None:  # the common cases first
        return value
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a numeric id sent unquoted: keep its digits
    raise TypeError(f"expected a string, got {type(value).__name__}")


def _asset_name(value: Any, _: Any) -> str | None:
    """cattrs' own rule for `str | None` (None stays, anything else through `str`), one call."""
    if value.__class__ is str or value is None:
        return value
    return str(value)


def _asset_id(value: Any, _: Any) -> int | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError(f"expected an int or a string, got {type(value).__name__}")


def _tags(value: Any, _: Any) -> list[str]:
    if value.__class__ is list:  # the common case first: a short list of plain strings
        for tag in value:
            if tag.__class__ is not str:
                break
        else:
            return value
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
    if value.__class__ is dict:  # the common case first
        return value
    if value is None:
        return _EMPTY
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


#: Classes of an asset's `id` and `name` whose decoded `Asset` is kept for reuse: no two
#: values of them compare equal across classes (unlike 1, 1.0 and True).
_MEMO_CLASSES = frozenset({int, str, type(None)})
ASSET_MEMO_SIZE = 1024  # assets kept per converter; a tenant has a few dozen


class _AssetHook:
    """The `asset` hook (`structure`): cattrs' generated `Asset` function, its results reused.

    A tenant's chats come from a few dozen channel assets, so most records
    carry an asset object already decoded on an earlier one: the same frozen
    `Asset` (built by cattrs from an equal `id` and `name`) is handed back.
    At most `ASSET_MEMO_SIZE` are kept.
    """

    def __init__(self, converter: cattrs.Converter) -> None:
        self.structure_asset = make_dict_structure_fn(
            Asset,
            converter,
            id=override(struct_hook=_asset_id),
            name=override(struct_hook=_asset_name),
            _cattrs_forbid_extra_keys=False,
        )
        self.built: dict[tuple[Any, Any], Asset] = {}

    def structure(self, value: Any, _: Any) -> Asset | None:
        if value.__class__ is dict:  # the common case first
            key = (value.get("id"), value.get("name"))
            if key[0].__class__ not in _MEMO_CLASSES or key[1].__class__ not in _MEMO_CLASSES:
                return self.structure_asset(value, Asset)
            asset = self.built.get(key)
            if asset is None:
                asset = self.structure_asset(value, Asset)
                if len(self.built) >= ASSET_MEMO_SIZE:
                    self.built.clear()
                self.built[key] = asset
            return asset
        if value is None:
            return None
        if not isinstance(value, dict):
            raise TypeError(f"expected a JSON object, got {type(value).__name__}")
        return self.structure_asset(value, Asset)


def make_converter(*, detailed_validation: bool = True) -> cattrs.Converter:
    """The converter for `Chat` and `Asset`. Its rules, each from the wire contract:

    - datetimes: ISO 8601 strings, `Z` or an offset, become aware UTC; a naive
      one is taken as UTC;
    - `chat_id`: a non-empty string (a number sent unquoted keeps its digits);
    - `alias_id`, `customer_id`, `destination_id`, `assignee`, `flag`: a string,
      or a number sent unquoted, kept as its digits;
    - `asset.id`: int or str kept as sent ("integer" on the vendor's page, an
      email or service key in practice; a numeric string keeps its zeros);
    - `status`, `channel`: a known value becomes the enum member, an unknown
      one stays a plain `str` (new enum values may appear);
    - any optional field missing or `null` becomes `None`; `tag` becomes `[]`
      (a lone string becomes a one-tag list), `other_details` an empty
      mapping, `asset` `None`;
    - unknown extra fields are ignored;
    - `other_details` is kept as the free-form JSON object it is.

    Only `chat_id` is required. Every rule is a hook of cattrs' generated
    `Chat` function; nothing builds records by hand. `detailed_validation`
    only changes what an error says: the client decodes with it off (faster)
    and decodes a failing record again with it on, to name the field. The
    client first tries a third cattrs-generated function from the same rules,
    for a record carrying every field (`_every_key_hook`).
    """
    conv = cattrs.Converter(detailed_validation=detailed_validation, forbid_extra_keys=False)
    conv.register_structure_hook(datetime, _datetime)
    conv.register_structure_hook(Chat, make_dict_structure_fn(Chat, conv, **_chat_rules(conv)))
    return conv


def _chat_rules(converter: cattrs.Converter) -> dict[str, Any]:
    """The hook of each `Chat` field (cattrs overrides): the rules `make_converter` lists."""
    str_hook = override(struct_hook=_optional_str)
    return {
        "chat_id": override(struct_hook=_required_str),
        "alias_id": str_hook,
        "created_at": override(struct_hook=_datetime),
        "updated_at": override(struct_hook=_datetime),
        "status": override(struct_hook=_open_enum(ChatStatus)),
        "channel": override(struct_hook=_open_enum(Channel)),
        "asset": override(struct_hook=_AssetHook(converter).structure),
        "customer_id": str_hook,
        "destination_id": str_hook,
        "assignee": str_hook,
        "flag": str_hook,
        "tag": override(struct_hook=_tags),
        "other_details": override(struct_hook=_details),
    }


def _required_str(value: Any, _: Any) -> str:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"expected a non-empty string, got {value!r:.40}")


def _every_key_hook(converter: cattrs.Converter) -> Any:
    """cattrs' generated `Chat` function for a record that carries every field, from the
    same rules: no `in` test per field and a positional call (a quarter less time). A
    missing key raises `KeyError`; such a record goes to the converter's own hook.
    """
    every = [a.evolve(default=attrs.NOTHING) for a in attrs.fields(Chat)]
    rules = converter.get_structure_hook(Chat).overrides  # type: ignore[attr-defined]
    return make_dict_structure_fn_from_attrs(
        every, Chat, converter, _cattrs_forbid_extra_keys=False, **rules
    )


class WireChat(TypedDict, total=False):
    """One chat as the page's parse reads it (`protocol.typed_parse`), in the same pass: the
    JSON type of each field of a clean record, as a dict (unknown fields left out). A page
    with a chat that does not fit (a number for a string, a lone string for `tag`, a chat
    that is not an object) is parsed into plain dicts instead, so these types decide only
    which path a page takes, never what a record decodes to (property-tested).
    """

    chat_id: str
    alias_id: str | None
    created_at: str | None
    updated_at: str | None
    status: str | None
    channel: str | None
    asset: dict[str, Any] | None
    customer_id: str | None
    destination_id: str | None
    assignee: str | None
    flag: str | None
    tag: list[str] | None
    other_details: dict[str, Any] | None


def _as_sent(value: Any) -> Any:
    return value


def _wire_hook(converter: cattrs.Converter, *, every: bool) -> Any:
    """cattrs' generated `Chat` function for a `WireChat`, from the converter's rules: a
    field whose rule is `_optional_str` (a str or None, kept as it is) is passed to `Chat`
    as read, since a `WireChat` holds nothing else there. (cattrs emits no hook call for
    a field with an attrs converter when told to prefer those: `_as_sent` is that
    converter, seen by cattrs only; `Chat` has none.) With `every`, for a record that
    carries every field, as `_every_key_hook`.
    """
    rules = converter.get_structure_hook(Chat).overrides  # type: ignore[attr-defined]
    as_is = {name for name, rule in rules.items() if rule.struct_hook is _optional_str}
    fields = []
    for a in attrs.fields(Chat):
        if every:
            a = a.evolve(default=attrs.NOTHING)
        fields.append(a.evolve(converter=_as_sent) if a.name in as_is else a)
    return make_dict_structure_fn_from_attrs(
        fields,
        Chat,
        converter,
        _cattrs_forbid_extra_keys=False,
        _cattrs_prefer_attrib_converters=True,
        **{name: rule for name, rule in rules.items() if name not in as_is},
    )


#: The library's converter (detailed validation: errors name the field), used for records'
#: error messages and for the export checkpoint's state.
CONVERTER = make_converter(detailed_validation=True)
#: The hooks the client decodes with, all generated by cattrs from the same rules: for a
#: record with every field (the common case), for one with fields missing, both without
#: per-field bookkeeping; and the one that names the failing field when they fail.
_FAST = make_converter(detailed_validation=False)
_structure_full = _every_key_hook(_FAST)
_structure_chat = _FAST.get_structure_hook(Chat)
_explain_chat = CONVERTER.get_structure_hook(Chat)
#: The same two for `WireChat`s (`decode_page(typed=True)`).
_WIRE_HOOKS = (_wire_hook(_FAST, every=True), _wire_hook(_FAST, every=False))


def decode_chat(raw: Mapping[str, Any], *, page: int | None = None, index: int = 0) -> Chat:
    """One raw chat object as a `Chat`; raises `DecodeError` naming page, index and field."""
    where = f"page {page}, record {index}" if page is not None else f"record {index}"
    if not isinstance(raw, Mapping):
        raise DecodeError(f"cannot decode {where}: not a JSON object", page=page)
    try:
        return _structure_full(raw, Chat)  # type: ignore[no-any-return]
    except Exception:  # a field missing (the usual reason), or a bad value
        pass
    try:
        return _structure_chat(raw, Chat)  # type: ignore[no-any-return]
    except Exception:  # decode again with detailed validation, to say which field
        pass
    try:
        return _explain_chat(raw, Chat)  # type: ignore[no-any-return]  # (never succeeds)
    except Exception as exc:
        failures = _failures(exc)
    field, reason = failures[0]
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    chat_id = raw.get("chat_id")
    ident = f" (chat_id {chat_id!r:.60})" if isinstance(chat_id, str) else ""
    raise DecodeError(
        f"cannot decode {where}{ident}: field {field!r}: {reason}{more}", page=page, field=field
    ) from None


def decode_page(
    raws: Sequence[Mapping[str, Any]], page: int | None = None, *, typed: bool = False
) -> list[Chat]:
    """A page of raw chat objects as `Chat` records, in order; `typed`: they are `WireChat`s.

    Raises `DecodeError` naming the page, the record's index and its field.
    """
    structure, some = _WIRE_HOOKS if typed else (_structure_full, _structure_chat)
    chats: list[Chat] = []
    misses = 0
    try:
        for raw in raws:
            try:
                chats.append(structure(raw, Chat))
            except KeyError:  # a field missing: this record goes to the hook that allows it,
                if structure is some:  # and the rest of the page too after two
                    raise
                chats.append(some(raw, Chat))
                misses += 1
                if misses == 2:
                    structure = some
        return chats
    except Exception:
        pass  # decode record by record to find and name the failing one
    return [decode_chat(raw, page=page, index=i) for i, raw in enumerate(raws)]


def _failures(exc: BaseException, path: str = "") -> list[tuple[str, str]]:
    """(field path, reason) of each failure in a detailed cattrs error, in field order.

    Walks `ClassValidationError.group_exceptions()` as `cattrs.transform_error`
    does, keeping the path and the reason apart (the path is `DecodeError.field`).
    """
    if isinstance(exc, cattrs.ClassValidationError):
        with_notes, without = exc.group_exceptions()
        found: list[tuple[str, str]] = []
        for sub, note in with_notes:
            found += _failures(sub, f"{path}.{note.name}" if path else note.name)
        for sub in without:
            found += _failures(sub, path)
        return found
    if isinstance(exc, KeyError) or not str(exc):
        return [(path or "?", format_exception(exc, None))]
    return [(path or "?", str(exc))]
