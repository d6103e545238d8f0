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

No `pa.array` here: on its first call with Python values (a list, an iterator, a numpy
array: anything not Arrow's) pyarrow imports pandas when it is installed, to ask whether
the values are pandas objects (`_is_array_like` in pyarrow's array.pxi; so does
`pa.scalar`), ~40 MB a process that never needs it. The columns are built from their
buffers instead (`pa.Array.from_buffers`: the text joined, the offsets summed by numpy),
at about the same CPU.
"""

from __future__ import annotations

import contextlib
import json
from array import array
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from itertools import chain, compress, repeat
from operator import is_not
from typing import Any, cast

import msgspec

from .. import ConfigurationError, parse_utc

try:
    import numpy as np  # pyarrow's own dependency
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
#: Where chats' tables and the Parquet sink allocate, wherever pyarrow lets them choose:
#: the C library's malloc, not Arrow's default pool (mimalloc in pyarrow's wheels), whose
#: arena Linux backs with transparent huge pages, so that each 2 MiB region it touches
#: counts whole in RSS: an export held 9-16 MB of it for under 1 MB allocated.
POOL: pa.MemoryPool = pa.system_memory_pool() if AVAILABLE else None


_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # JSON text
_encode = msgspec.json.encode  # the same text, UTF-8, ~20x faster: but see `_maybe_other`
_encode_lines = msgspec.json.Encoder().encode_lines  # values' texts, each and a newline
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
        return _utf8(values)
    except TypeError:
        return _utf8([_text(v) for v in values])


def _json_texts(values: list[Any]) -> pa.Array:
    """A JSON text column: each value as `_json`'s text, null for None."""
    valid, present = _split(values)
    if not present:
        return _nulls(len(values))
    try:
        lines = _encode_lines(present)  # each text and a newline (JSON text holds none)
    except _ENCODE_ERRORS:  # not JSON's kinds (a caller's mapping): `_json` says what it can
        return _utf8([None if v is None else _json(v) for v in values])
    # Most chunks hold no float: one scan of all the texts at once clears them.
    if _maybe_other(lines):
        redone = [
            None if v is None else t if not _maybe_other(t := _encode(v)) else _json(v).encode()
            for v in values
        ]
        return _utf8(redone, encoded=True)
    return _texts(lines, b"\n", valid, len(values), terminated=True)


def _tag(value: Any) -> list[str | None] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [_text(t) for t in value]
    return [_text(value)]


def _tags(values: list[Any]) -> pa.Array:
    try:
        return _utf8_lists(values)
    except TypeError:
        return _utf8_lists([_tag(v) for v in values])


def _parse(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_utc(value)
    except ValueError:
        return None


_TS = CHAT_SCHEMA.field("created_at").type if AVAILABLE else None  # the schema's, not a copy
_TAGS = CHAT_SCHEMA.field("tag").type if AVAILABLE else None
#: Bytes of one column's text in one array at most (Arrow's `string`: 32-bit offsets).
_MAX_TEXT = 2**31 - 1


class _TooLarge(Exception):
    """A column's text is over `_MAX_TEXT` bytes: `chats_table` builds it in halves."""


def _nulls(n: int) -> pa.Array:
    return pa.nulls(n, pa.string(), memory_pool=POOL)


def _present(values: Sequence[Any]) -> bytes | None:
    """None when no value is None; else a byte a value, 1 where it is not None (in C)."""
    return bytes(map(is_not, values, repeat(None))) if None in values else None


def _split(values: Sequence[Any]) -> tuple[bytes | None, Sequence[Any]]:
    """(`_present(values)`, the values that are not None, in order)."""
    valid = _present(values)
    return valid, values if valid is None else list(compress(values, valid))


def _validity(valid: bytes | None) -> tuple[Any, int]:
    """Arrow's validity bitmap of `valid` (a byte 0 or 1 a value; None: no null, no bitmap)
    and the null count."""
    if valid is None:
        return None, 0
    return pa.py_buffer(
        np.packbits(np.frombuffer(valid, np.bool_), bitorder="little")
    ), valid.count(0)


def _bounds(lengths: Any, count: int) -> Any:
    """The `count + 1` offsets of values of `lengths` (an iterable of ints), as numpy."""
    bounds = np.zeros(count + 1, np.int32)
    np.frombuffer(array("i", lengths), np.intc).cumsum(out=bounds[1:])
    return bounds


def _offsets(bounds: Any, valid: bytes | None) -> Any:
    """Arrow's offsets buffer: `bounds` (the offsets of the values present), with a value
    of length 0 at each null `valid` gives (a 0 byte; None: no null)."""
    if valid is not None:
        offsets = np.zeros(len(valid) + 1, np.int32)
        offsets[1:] = bounds[np.frombuffer(valid, np.bool_).cumsum()]
        bounds = offsets
    return pa.py_buffer(bounds)


def _utf8(values: Sequence[Any], *, encoded: bool = False) -> pa.Array:
    """`values`, each a `str` (or, `encoded`, its UTF-8 `bytes`) or None, as an Arrow
    string array. Raises `TypeError` for a value of another kind (and
    `UnicodeEncodeError` for a lone surrogate, as `pa.array` does).

    The values present joined by NUL and encoded at once (`_texts` cuts them apart);
    only a chunk with a NUL in a value takes each value's length on its own."""
    n = len(values)
    sep: Any = b"\0" if encoded else "\0"
    try:
        joined, valid, texts = sep.join(values), None, values
    except TypeError:  # a None (or a value of another kind: raised below)
        valid, texts = _split(values)
        if not texts:
            return _nulls(n)
        joined = sep.join(texts)  # TypeError: a value of another kind
    try:
        return _texts(joined if encoded else joined.encode(), b"\0", valid, n)
    except _Inside:
        encoded_texts = texts if encoded else [t.encode() for t in texts]
        bounds = _bounds(map(len, encoded_texts), len(texts))
        return _string_array(n, valid, bounds, b"".join(encoded_texts))


def _string_array(n: int, valid: bytes | None, bounds: Any, data: bytes) -> pa.Array:
    """The string array of `n` values, `valid` saying which are null: the others' UTF-8
    back to back in `data`, `bounds` their offsets in it."""
    bitmap, nulls = _validity(valid)
    buffers = [bitmap, _offsets(bounds, valid), pa.py_buffer(data)]
    return pa.Array.from_buffers(pa.string(), n, buffers, null_count=nulls)


class _Inside(Exception):
    """A value holds the byte that separates the values."""


def _texts(
    data: bytes, sep: bytes, valid: bytes | None, n: int, *, terminated: bool = False
) -> pa.Array:
    """The string array of `n` values, `valid` saying which are null (None: none is), the
    others' UTF-8 in `data`, each after the one before and `sep` (`terminated`: each
    followed by `sep`). numpy finds the separators, which give the offsets; then they
    are removed. Raises `_Inside` when a value holds `sep` (a NUL in a value)."""
    count = n if valid is None else n - valid.count(0)
    if not count:
        return _nulls(n)
    seps = count if terminated else count - 1
    if len(data) - seps > _MAX_TEXT:
        raise _TooLarge
    ends = (np.frombuffer(data, np.uint8) == sep[0]).nonzero()[0]
    if len(ends) != seps:
        raise _Inside
    bounds = np.empty(count + 1, np.int32)
    bounds[0], bounds[count] = 0, len(data) - seps
    bounds[1 : seps + 1] = ends
    bounds[1 : seps + 1] -= np.arange(seps, dtype=np.int32)  # the separators before each end
    return _string_array(n, valid, bounds, data.replace(sep, b""))


def _utf8_lists(values: Sequence[Any]) -> pa.Array:
    """`values`, each a list of `str` or None (or None), as Arrow's `list<string>`; raises
    `TypeError` for anything else."""
    n = len(values)
    if not {list, type(None)}.issuperset(map(type, values)):
        raise TypeError("not a list")
    valid, lists = _split(values)
    child = _utf8(list(chain.from_iterable(lists)))
    bitmap, nulls = _validity(valid)
    offsets = _offsets(_bounds(map(len, lists), len(lists)), valid)
    return pa.Array.from_buffers(_TAGS, n, [bitmap, offsets], null_count=nulls, children=[child])


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def _timestamps(values: Sequence[datetime | None]) -> pa.Array:
    """Aware datetimes (or None) as the schema's timestamps, microseconds since the epoch."""
    n = len(values)
    micros = [0 if v is None else (v - _EPOCH) // _MICROSECOND for v in values]
    bitmap, nulls = _validity(_present(values))
    data = pa.py_buffer(np.array(micros, np.int64))
    return pa.Array.from_buffers(_TS, n, [bitmap, data], null_count=nulls)


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
        return pc.cast(_utf8(values), _TS, memory_pool=POOL)
    except (TypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    if len(values) > _BY_VALUE:
        half = len(values) // 2
        return pa.concat_arrays(
            [
                _times(name, values[:half], extras, at),
                _times(name, values[half:], extras, at + half),
            ],
            memory_pool=POOL,
        )
    parsed: list[datetime | None] = []
    for i, value in enumerate(values, at):
        when = _parse(value)
        if when is None and value is not None:
            extras[i] = {**(extras[i] or {}), name: value}
        parsed.append(when)
    return _timestamps(parsed)


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


def _assets(assets: list[Any], extras: list[dict[str, Any] | None]) -> tuple[pa.Array, list[Any]]:
    """The `asset_id` column and the `asset_name` values of the `asset` values; an asset
    with more than both goes whole to `extras` too."""
    fields = _ASSET_FIELDS.issuperset
    if None in assets:
        assets = [_NO_ASSET if a is None else a for a in assets]
    if set(map(type, assets)) == {dict}:  # as JSON gives them: by column, in C
        ids = list(map(dict.get, assets, repeat("id")))
        names = list(map(dict.get, assets, repeat("name")))
        more = (
            [] if all(map(fields, assets)) else [i for i, a in enumerate(assets) if not fields(a)]
        )
    else:
        triples = [_asset(a) for a in assets]
        ids, names = [t[0] for t in triples], [t[1] for t in triples]
        more = [i for i, t in enumerate(triples) if t[2]]
    for i in more:
        extras[i] = {**(extras[i] or {}), "asset": assets[i]}
    return _asset_ids(ids), names


_NO_ASSET: dict[str, Any] = {}  # stands for a null asset (read only)


def _asset_ids(ids: list[Any]) -> pa.Array:
    """The `asset_id` column: ints (most ids) as `str` gives them, their decimal text (as
    `_asset_id` does), strings as sent."""
    valid, present = _split(ids)
    if not present:
        return _nulls(len(ids))
    if {str, int}.issuperset(map(type, present)):
        with contextlib.suppress(_Inside):
            return _texts("\0".join(map(str, present)).encode(), b"\0", valid, len(ids))
    return _utf8([_asset_id(v) for v in ids])


def chats_table(records: Sequence[Mapping[str, Any]]) -> pa.Table:
    """The chats as one `pyarrow.Table` of `CHAT_SCHEMA`, one row per record, in order.

    `records` are the JSON objects the server sent (any `Mapping[str, Any]`). Never
    raises for a value of the wrong kind: the module's docstring says what each becomes.

    Built column by column (a list per field, converted at once), each with a fast path
    for the values JSON gives and the rules above only where it is refused.
    """
    require_pyarrow()
    try:
        return _table(records)
    except _TooLarge:  # a column's text over 2 GiB: in halves (each a chunk of the columns)
        half = len(records) // 2
        return pa.concat_tables([chats_table(records[:half]), chats_table(records[half:])])


def _table(records: Sequence[Mapping[str, Any]]) -> pa.Table:
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
        chat_id = _utf8(chat_ids)
    except TypeError:
        chat_id = None
    if chat_id is None or chat_id.null_count:
        chat_id = _utf8([_text(c) or "" for c in chat_ids])
    asset_id, asset_names = _assets(column("asset"), extras)
    columns = [
        chat_id,
        _strings(column("alias_id")),
        _times("created_at", column("created_at"), extras),
        _times("updated_at", column("updated_at"), extras),
        _strings(column("status")),
        _strings(column("channel")),
        asset_id,
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
