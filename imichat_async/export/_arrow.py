"""Chats as Arrow: the one schema of the Parquet dataset, and raw records -> `pyarrow.Table`.

Needs the `parquet` extra (`pip install 'imichat-async[parquet]'`); import it through
`require_pyarrow()` to get that message instead of a bare `ImportError`. The Parquet
sink (`_parquet.py`) and the Dask reader (`imichat_async.dask`, through this package's
public `chats_table`) both build their tables with `chats_table`, so every file and
every partition has exactly `CHAT_SCHEMA`. Timestamps are read by `imi.parse_utc`,
the rule `Chat` records are decoded by.

What a value of the wrong kind becomes (the wire contract's record quirks); nothing
fails, nothing the server sent is lost:

- `chat_id` (not null): a string as sent, a number as its text; missing or null: "".
- the other string columns: a string as sent, a number as its text (`12` -> "12"),
  anything else (a boolean, a list, an object) as its JSON text; missing or null: null.
- `created_at`, `updated_at`: ISO 8601 read as UTC (naive means UTC, offsets
  converted), microseconds. A value that is not such a string becomes null, and the
  value as sent is kept in `extra` under its own name.
- `asset_id`: an int as its decimal text, a string as sent (`00123` keeps its zeros);
  `asset_name` a string. An `asset` that is not an object: its value is the
  `asset_id`. An asset with fields other than `id` and `name`: the whole asset
  object is also kept in `extra` under "asset".
- `tag`: a list of strings; a lone string -> a list of one; a non-string element as
  its text (number) or JSON text; missing or null: null.
- `other_details`: the value as sent, as JSON text (an object, usually); null when
  missing or null.
- `extra`: a JSON object of the top-level fields not in the schema (and of the
  values above that could not be kept in their column); null when there is none.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from itertools import repeat
from typing import Any, cast

import msgspec

from .. import ConfigurationError, parse_utc

try:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet  # loaded with the module, not during an export

    AVAILABLE = True
except ImportError:  # pragma: no cover (the extra is installed where tests run)
    AVAILABLE = False

EXTRA_HINT = "pip install 'imichat-async[parquet]'"

#: Top-level fields of a chat that have a column of their own (`asset` -> two columns).
_STRING_FIELDS = (
    "alias_id",
    "status",
    "channel",
    "customer_id",
    "destination_id",
    "assignee",
    "flag",
)
KNOWN_FIELDS = frozenset(
    {"chat_id", "created_at", "updated_at", "asset", "tag", "other_details", *_STRING_FIELDS}
)
_ASSET_FIELDS = frozenset({"id", "name"})


def require_pyarrow() -> None:
    """Raise `ConfigurationError` naming the extra when pyarrow is missing."""
    if not AVAILABLE:
        raise ConfigurationError(f"Parquet output needs pyarrow: {EXTRA_HINT}")


def preload() -> None:
    """Load what pyarrow loads on its first conversion of Python values: pandas, when it
    is installed (~0.3 s of CPU and ~40 MB, once a process). A sink calls it when it is
    built, beside pyarrow's own import, not in the event loop's thread while an export
    converts its first chunk."""
    require_pyarrow()
    pa.array([], pa.string())


def _schema() -> pa.Schema:
    ts = pa.timestamp("us", tz="UTC")
    return pa.schema(
        [
            pa.field("chat_id", pa.string(), nullable=False),
            pa.field("alias_id", pa.string()),
            pa.field("created_at", ts),
            pa.field("updated_at", ts),
            pa.field("status", pa.string()),
            pa.field("channel", pa.string()),
            pa.field("asset_id", pa.string()),
            pa.field("asset_name", pa.string()),
            pa.field("customer_id", pa.string()),
            pa.field("destination_id", pa.string()),
            pa.field("assignee", pa.string()),
            pa.field("flag", pa.string()),
            pa.field("tag", pa.list_(pa.string())),
            pa.field("other_details", pa.string()),
            pa.field("extra", pa.string()),
        ]
    )


#: The schema of every file of a Parquet export or sync (README: "Parquet").
CHAT_SCHEMA: pa.Schema = _schema() if AVAILABLE else None


_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # JSON text
_encode = msgspec.json.encode  # the same text, UTF-8, ~20x faster: but see `_maybe_other`
#: Where msgspec's text may differ from `_json`'s: only floats do (`1e16` for `1e+16`,
#: `1e-7` for `1e-07`, `0.00001` for `1e-05`, `null` for NaN and Infinity).
_DIGITS = bytes.maketrans(b"123456789E", b"000000000e")


def _maybe_other(text: bytes) -> bool:
    """False: `text` (msgspec's) is `_json`'s text too. True for any text with a float
    `_json` writes otherwise; also for a few that are the same ("1e" or "null" in a
    string), which `_json` then redoes at no other cost. (Plain scans, not a regex:
    a few times faster.)"""
    return b"null" in text or b"0.0000" in text or b"0e" in text.translate(_DIGITS)


_ENCODE_ERRORS = (TypeError, ValueError, OverflowError, msgspec.EncodeError)


def _text(value: Any) -> str | None:
    """A string column's value: a string as sent, a number as its text, else JSON text."""
    if value is None or value.__class__ is str:
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return _json(value)


def _strings(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values, pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([_text(v) for v in values], pa.string())


def _json_texts(values: list[Any]) -> pa.Array:
    """A JSON text column: each value as `_json`'s text, null for None."""
    try:
        texts = [None if v is None else _encode(v) for v in values]
    except _ENCODE_ERRORS:  # not JSON's kinds (a caller's mapping): `_json` says what it can
        return pa.array([None if v is None else _json(v) for v in values], pa.string())
    # Most chunks hold no float: one scan of all the texts at once clears them.
    if _maybe_other(b"".join([t for t in texts if t is not None])):
        redone = [
            t if t is None or not _maybe_other(t) else _json(v)
            for t, v in zip(texts, values, strict=True)
        ]
        return pa.array(redone, pa.string())
    # msgspec writes UTF-8: the bytes are the strings (a view, no second check)
    return pa.array(texts, pa.binary()).view(pa.string())


def _tag(value: Any) -> list[str | None] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [_text(t) for t in value]
    return [_text(value)]


def _tags(values: list[Any]) -> pa.Array:
    kind = pa.list_(pa.string())
    try:
        return pa.array(values, kind)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([_tag(v) for v in values], kind)


def _parse(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_utc(value)
    except ValueError:
        return None


_TS = CHAT_SCHEMA.field("created_at").type if AVAILABLE else None  # the schema's, not a copy
_BY_VALUE = 64  # a run of values Arrow refuses is parsed value by value below this length


def _times(
    name: str, values: list[Any], extras: list[dict[str, Any] | None], at: int = 0
) -> pa.Array:
    """A timestamp column (of the records from `at` on): cast by Arrow where it reads every
    value; a run of values where it does not is halved until Arrow reads the halves or the
    run is short, and a short run is parsed value by value (a value that does not parse
    becomes null, kept as sent in `extras`). So one odd value costs a few casts, not a
    parse of every value of the chunk."""
    try:
        return pc.cast(pa.array(values, pa.string()), _TS)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        pass
    if len(values) > _BY_VALUE:
        half = len(values) // 2
        return pa.concat_arrays(
            [
                _times(name, values[:half], extras, at),
                _times(name, values[half:], extras, at + half),
            ]
        )
    parsed: list[datetime | None] = []
    for i, value in enumerate(values, at):
        when = _parse(value)
        if when is None and value is not None:
            extras[i] = {**(extras[i] or {}), name: value}
        parsed.append(when)
    return pa.array(parsed, _TS)


def _asset(asset: Any) -> tuple[Any, Any, bool]:
    """(`asset_id`, `asset_name`, whether the asset holds more than both)."""
    if asset is None:
        return None, None, False
    if isinstance(asset, Mapping):
        return asset.get("id"), asset.get("name"), not asset.keys() <= _ASSET_FIELDS
    return asset, None, False


def _asset_id(value: Any) -> str | None:
    if value is None or value.__class__ is str:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # decimal text
    return _text(value)


def _assets(
    assets: list[Any], extras: list[dict[str, Any] | None]
) -> tuple[list[str | None], list[Any]]:
    """The `asset_id` texts and `asset_name` values of the `asset` values; an asset with
    more than both goes whole to `extras` too."""
    if all(a is None or a.__class__ is dict for a in assets):  # as JSON gives them: by column
        ids = [None if a is None else a.get("id") for a in assets]
        names = [None if a is None else a.get("name") for a in assets]
        fields = _ASSET_FIELDS.issuperset
        more = [i for i, a in enumerate(assets) if a is not None and not fields(a)]
    else:
        triples = [_asset(a) for a in assets]
        ids, names = [t[0] for t in triples], [t[1] for t in triples]
        more = [i for i, t in enumerate(triples) if t[2]]
    for i in more:
        extras[i] = {**(extras[i] or {}), "asset": assets[i]}
    # ints (most ids) inline: `str` is their decimal text, as `_asset_id` gives it
    ids = [
        v if v is None or v.__class__ is str else str(v) if v.__class__ is int else _asset_id(v)
        for v in ids
    ]
    return ids, names


def chats_table(records: Sequence[Mapping[str, Any]]) -> pa.Table:
    """The chats as one `pyarrow.Table` of `CHAT_SCHEMA`, one row per record, in order.

    `records` are the JSON objects the server sent (any `Mapping[str, Any]`). Never
    raises for a value of the wrong kind: the module's docstring says what each becomes.

    Built column by column (a list per field, converted by Arrow at once), each with a
    fast path for the values JSON gives and the rules above only where it is refused.
    """
    require_pyarrow()
    n = len(records)
    extras: list[dict[str, Any] | None] = [None] * n
    known = KNOWN_FIELDS
    plain = list(map(known.issuperset, records))  # no field without a column of its own
    if not all(plain):
        for i, r in enumerate(records):
            if not plain[i]:
                extras[i] = {k: v for k, v in r.items() if k not in known}

    if all(map(isinstance, records, repeat(dict))):  # JSON's objects: `dict.get` by `map`
        dicts = cast("Sequence[dict[str, Any]]", records)

        def column(name: str) -> list[Any]:
            return list(map(dict.get, dicts, repeat(name)))

    else:

        def column(name: str) -> list[Any]:
            return [r.get(name) for r in records]

    chat_ids = column("chat_id")
    try:
        chat_id = pa.array(chat_ids, pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        chat_id = None
    if chat_id is None or chat_id.null_count:
        chat_id = pa.array([_text(c) or "" for c in chat_ids], pa.string())
    asset_ids, asset_names = _assets(column("asset"), extras)
    columns = [
        chat_id,
        _strings(column("alias_id")),
        _times("created_at", column("created_at"), extras),
        _times("updated_at", column("updated_at"), extras),
        _strings(column("status")),
        _strings(column("channel")),
        pa.array(asset_ids, pa.string()),
        _strings(asset_names),
        _strings(column("customer_id")),
        _strings(column("destination_id")),
        _strings(column("assignee")),
        _strings(column("flag")),
        _tags(column("tag")),
        _json_texts(column("other_details")),
        _json_texts(extras),
    ]
    return pa.Table.from_arrays(columns, schema=CHAT_SCHEMA)
