"""Hostile input: property-based tests of the query builder, the record decoder and the classifier.

Each property states the library's promise on *any* input: the result is well formed, or the
library's own typed error is raised; never a `KeyError`, a `TypeError`, a cattrs error or any
other foreign exception.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from datetime import date, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

import imichat_async as imi
from imichat_async import _errors as errors
from imichat_async import _protocol as protocol
from imichat_async._client import _PARSE_CHATS, ImiChatClient
from imichat_async._query import Filter, Query, build_query
from imichat_async._records import CONVERTER, Asset, Chat, decode_chat, decode_page, parse_utc

SETTINGS = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,  # the same examples on every run: a CI failure reproduces locally
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

PARAMS = sorted(protocol.PARAM_OPERATORS)
ALL_OPS = sorted({op for ops in protocol.PARAM_OPERATORS.values() for op in ops})


class Colour(enum.Enum):
    """A foreign enum: not a valid filter value anywhere but as its `.value`."""

    RED = "red"
    CLOSED = "closed"


# -- strategies: queries ---------------------------------------------------------------------

timezones = st.one_of(
    st.none(),
    st.just(timezone.utc),
    st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59).map(
        lambda m: timezone(timedelta(minutes=m))
    ),
)
datetimes = st.datetimes(timezones=timezones)
datetime_texts = st.one_of(
    datetimes.map(lambda d: d.isoformat()),
    datetimes.map(lambda d: d.replace(tzinfo=None).isoformat() + "Z"),
    st.from_regex(r"\A\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?)?(Z|[+-]\d{2}:\d{2})?\Z"),
)
scalar_values = st.one_of(
    st.text(max_size=30),
    st.sampled_from(protocol.STATUS_VALUES + protocol.CHANNEL_VALUES),
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    datetimes,
    st.dates(),
    datetime_texts,
    st.sampled_from(list(imi.ChatStatus) + list(imi.Channel) + list(Colour)),
    st.binary(max_size=10),
)
values = st.one_of(
    scalar_values,
    st.lists(scalar_values, max_size=3),
    st.dictionaries(st.text(max_size=5), scalar_values, max_size=2),
)
param_names = st.one_of(st.sampled_from(PARAMS), st.text(max_size=20))
operator_names = st.one_of(
    st.sampled_from([*ALL_OPS, "not_eq", "in", "ne", ""]), st.text(max_size=8)
)
keyword_keys = st.one_of(
    st.sampled_from(PARAMS),
    st.builds(lambda p, o: f"{p}__{o}", param_names, operator_names),
    st.text(max_size=25),
    st.sampled_from(["__", "status__", "__eq", "created_at__gte__lt", "tag__eq__eq", "a__b"]),
)
keywords = st.dictionaries(keyword_keys, values, max_size=5)
garbage_params = st.one_of(
    st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2), st.binary(max_size=4)
)
filter_items = st.one_of(
    st.builds(Filter, st.one_of(param_names, garbage_params), operator_names, values),
    st.tuples(param_names, operator_names, values),
    st.lists(st.one_of(param_names, values), min_size=0, max_size=4),
    st.text(max_size=5),
    st.integers(),
    st.none(),
    st.dictionaries(st.text(max_size=5), values, max_size=3),
)
filter_lists = st.one_of(
    st.none(),
    st.lists(filter_items, max_size=4),
    st.lists(filter_items, max_size=4).map(tuple),
    st.text(max_size=5),
    st.dictionaries(st.text(max_size=5), values, max_size=2),
)
conditions = st.one_of(
    st.sampled_from(protocol.CONDITIONS),
    st.sampled_from(["AND", "Or", " and", "xor", ""]),
    st.text(max_size=5),
    st.none(),
    st.integers(),
    st.lists(st.text(max_size=2), max_size=2),
)


def _assert_wire_shape(query: Query, n_filters: int) -> None:
    """The body is the contract's JSON: a condition and checked, string-valued filters."""
    assert isinstance(query, Query)
    doc = json.loads(query.body())
    assert set(doc) == {"condition", "filters"}
    assert doc["condition"] in protocol.CONDITIONS
    assert isinstance(doc["filters"], list)
    assert len(doc["filters"]) == n_filters
    for f in doc["filters"]:
        assert set(f) == {"param", "operator", "value"}
        param, op, value = f["param"], f["operator"], f["value"]
        assert param in protocol.PARAM_OPERATORS
        assert op in protocol.PARAM_OPERATORS[param]
        assert isinstance(value, str) and value.strip()
        if param in protocol.ENUM_PARAM_VALUES:
            assert value in protocol.ENUM_PARAM_VALUES[param]
        if param in protocol.DATETIME_PARAMS:
            assert value.endswith("Z")
            assert parse_utc(value).tzinfo is not None


@SETTINGS
@given(kw=keywords, filters=filter_lists, condition=conditions)
def test_build_query_builds_a_valid_body_or_raises_invalid_query(
    kw: dict[str, Any], filters: Any, condition: Any
) -> None:
    """Any keywords, filter list and condition: a contract-shaped body, or InvalidQueryError."""
    try:
        query = build_query(kw, filters, condition)
    except imi.InvalidQueryError:
        return
    except Exception as exc:  # the property: nothing but the library's own error escapes
        pytest.fail(f"build_query leaked {type(exc).__name__}: {exc!r:.200}")
    n = len(kw) + (len(list(filters)) if filters is not None else 0)
    _assert_wire_shape(query, n)


@SETTINGS
@given(
    kw=st.dictionaries(
        st.sampled_from(PARAMS).flatmap(
            lambda p: st.sampled_from([f"{p}__{op}" for op in protocol.PARAM_OPERATORS[p]] + [p])
        ),
        st.one_of(
            st.sampled_from(protocol.STATUS_VALUES + protocol.CHANNEL_VALUES),
            datetimes.filter(lambda d: date(2, 1, 1) < d.date() < date(9998, 1, 1)),
            st.text(min_size=1, max_size=10).filter(str.strip),
        ),
        max_size=6,
    ),
    condition=st.sampled_from(protocol.CONDITIONS),
)
def test_build_query_accepts_well_typed_queries(kw: dict[str, Any], condition: str) -> None:
    """Real params and operators with plausible values: never a foreign exception, often a body."""
    try:
        query = build_query(kw, None, condition)
    except imi.InvalidQueryError:
        return
    _assert_wire_shape(query, len(kw))


# -- strategies: JSON and records ------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    datetime_texts,
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

VALID_CHAT: dict[str, Any] = {
    "chat_id": "5f0c7c3e-1b0a-4c55-9f8e-0e0b6f5f7a11",
    "alias_id": "AC-000000042",
    "created_at": "2024-05-01T10:00:00Z",
    "updated_at": "2024-05-01T10:05:00.123Z",
    "status": "closed",
    "channel": "whatsapp",
    "asset": {"id": "0a1b2c3d", "name": "Acme WhatsApp"},
    "customer_id": "c-1",
    "destination_id": "919700000000",
    "assignee": "agent01@acme.com",
    "flag": None,
    "tag": ["billing", "vip"],
    "other_details": {"language": "en", "intent": "billing"},
}
CHAT_FIELDS = sorted(VALID_CHAT)


@st.composite
def mutated_chats(draw: st.DrawFn) -> dict[str, Any]:
    """A valid chat with some fields deleted, replaced by any JSON, or extra fields added."""
    chat = dict(VALID_CHAT)
    chat["asset"] = dict(VALID_CHAT["asset"])
    for field in draw(st.lists(st.sampled_from(CHAT_FIELDS), max_size=4, unique=True)):
        if draw(st.booleans()):
            del chat[field]
        else:
            chat[field] = draw(json_values)
    if isinstance(chat.get("asset"), dict) and draw(st.booleans()):
        chat["asset"]["id"] = draw(json_values)
    chat.update(draw(st.dictionaries(st.text(max_size=10), json_values, max_size=3)))
    return chat


def _assert_well_formed(chat: Any) -> None:
    """A decoded record honours the public promises on its fields' types."""
    assert isinstance(chat, Chat)
    assert isinstance(chat.chat_id, str) and chat.chat_id
    for stamp in (chat.created_at, chat.updated_at):
        assert stamp is None or (isinstance(stamp, datetime) and stamp.utcoffset() == timedelta(0))
    for name in ("alias_id", "customer_id", "destination_id", "assignee", "flag"):
        assert getattr(chat, name) is None or isinstance(getattr(chat, name), str)
    assert chat.status is None or isinstance(chat.status, str)
    assert chat.channel is None or isinstance(chat.channel, str)
    assert chat.asset is None or isinstance(chat.asset, Asset)
    if chat.asset is not None:
        assert chat.asset.id is None or isinstance(chat.asset.id, (int, str))
        assert not isinstance(chat.asset.id, bool)
    assert all(isinstance(t, str) for t in chat.tag)
    assert isinstance(chat.other_details, Mapping)


def _decode_or_typed_error(fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except imi.DecodeError as exc:
        assert str(exc)
        return None
    except Exception as exc:  # the property: nothing but DecodeError escapes
        pytest.fail(f"{fn.__name__} leaked {type(exc).__name__}: {exc!r:.200}")


@SETTINGS
@given(raw=st.one_of(json_values, mutated_chats()))
@example(raw={"chat_id": "x", "created_at": "0001-01-01T00:00:00+01:00"})
@example(raw={"chat_id": "x", "updated_at": "9999-12-31T23:59:59-01:00"})
@example(raw={"chat_id": "x", "asset": {"id": True}})
@example(raw={"chat_id": True})
@example(raw={"chat_id": "x", "tag": "vip", "asset": []})
def test_decode_chat_returns_a_chat_or_raises_decode_error(raw: Any) -> None:
    """Any JSON value or mutated chat decodes to a well-formed Chat, or raises DecodeError."""
    chat = _decode_or_typed_error(decode_chat, raw, page=3, index=1)
    if chat is not None:
        _assert_well_formed(chat)


@SETTINGS
@given(raws=st.lists(st.one_of(mutated_chats(), json_values), max_size=5))
def test_decode_page_returns_chats_in_order_or_raises_decode_error(raws: list[Any]) -> None:
    """A page of any objects decodes whole and in order, or raises one DecodeError naming it."""
    try:
        chats = decode_page(raws, page=7)
    except imi.DecodeError as exc:
        assert exc.page == 7
        assert "page 7" in str(exc)
        return
    except Exception as exc:
        pytest.fail(f"decode_page leaked {type(exc).__name__}: {exc!r:.200}")
    assert len(chats) == len(raws)
    for chat, raw in zip(chats, raws, strict=True):
        _assert_well_formed(chat)
        assert chat == decode_chat(raw)


@SETTINGS
@given(raws=st.lists(mutated_chats(), max_size=10))
def test_every_fast_path_decodes_as_the_converter_does(raws: list[dict[str, Any]]) -> None:
    """The client's hooks (every key present; keys missing) give exactly the record the
    library's converter gives from the same rules, whatever keys a page's records lack."""
    expected: list[Chat | type[Exception]] = []
    for raw in raws:
        try:
            expected.append(CONVERTER.structure(raw, Chat))
        except Exception:
            expected.append(imi.DecodeError)
    for i, raw in enumerate(raws):
        if expected[i] is imi.DecodeError:
            with pytest.raises(imi.DecodeError):
                decode_chat(raw)
        else:
            assert decode_chat(raw) == expected[i]
    if imi.DecodeError in expected:
        with pytest.raises(imi.DecodeError):
            decode_page(raws)
    else:
        assert decode_page(raws) == expected


def _converted(raws: list[Any]) -> list[Chat] | None:
    """The library's converter's records for `raws`; None if it refuses one."""
    try:
        return [CONVERTER.structure(raw, Chat) for raw in raws]
    except Exception:
        return None


_OPTIONAL_TEXT = st.none() | st.text(max_size=8)
#: For each field, values of its JSON type in `WireChat` (what the typed parse lets
#: through), including values its rule refuses or changes: "" for `chat_id`, any string
#: for a timestamp, unknown statuses, an asset of any JSON.
_WIRE_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "chat_id": st.text(max_size=8),
    "alias_id": _OPTIONAL_TEXT,
    "created_at": st.none() | datetime_texts | st.text(max_size=12),
    "updated_at": st.none() | datetime_texts | st.text(max_size=12),
    "status": st.none() | st.sampled_from(protocol.STATUS_VALUES) | st.text(max_size=8),
    "channel": st.none() | st.sampled_from(protocol.CHANNEL_VALUES) | st.text(max_size=8),
    "asset": st.none() | st.dictionaries(st.sampled_from(["id", "name", "x"]), json_values),
    "customer_id": _OPTIONAL_TEXT,
    "destination_id": _OPTIONAL_TEXT,
    "assignee": _OPTIONAL_TEXT,
    "flag": _OPTIONAL_TEXT,
    "tag": st.none() | st.lists(st.text(max_size=5), max_size=3),
    "other_details": st.none() | st.dictionaries(st.text(max_size=5), json_values, max_size=3),
}


@st.composite
def wire_typed_chats(draw: st.DrawFn) -> dict[str, Any]:
    """A valid chat with some fields deleted or given another value of their JSON type, and
    unknown fields added: every one fits `WireChat`."""
    chat = dict(VALID_CHAT)
    for field in draw(st.lists(st.sampled_from(CHAT_FIELDS), max_size=5, unique=True)):
        if draw(st.booleans()):
            del chat[field]
        else:
            chat[field] = draw(_WIRE_VALUES[field])
    extra = st.dictionaries(st.text(max_size=10).filter(lambda k: k not in VALID_CHAT), json_values)
    chat.update(draw(extra.filter(lambda d: len(d) <= 3)))
    return chat


@SETTINGS
@given(raws=st.lists(wire_typed_chats(), max_size=10))
@example(raws=[{**VALID_CHAT, "chat_id": ""}])
@example(raws=[{**VALID_CHAT, "alias_id": None, "tag": None, "other_details": None}])
@example(raws=[{k: v for k, v in VALID_CHAT.items() if k != "chat_id"}])
def test_a_page_read_typed_decodes_as_the_converter_does(raws: list[dict[str, Any]]) -> None:
    """A page whose chats fit `WireChat` is read typed, in the same pass as the body
    (`PageData.typed`), and its records are exactly the converter's (or a `DecodeError`
    where the converter refuses one): the fields passed as read are never other than the
    rules make them."""
    body = json.dumps({"status_code": 4305, "response": raws}).encode()
    data = _PARSE_CHATS(200, {"X-Total-Count": "7"}, body, 4)
    assert data.typed
    assert data.total == 7
    expected = _converted(json.loads(body)["response"])
    if expected is None:
        with pytest.raises(imi.DecodeError) as got:
            ImiChatClient._decoded(data, 4)
        assert got.value.page == 4
    else:
        page = ImiChatClient._decoded(data, 4)
        assert page.items == expected
        assert [type(c.alias_id) for c in page.items] == [type(c.alias_id) for c in expected]


@pytest.mark.parametrize(
    "chat",
    [
        {"chat_id": 42},  # a number for a string: the converter keeps its digits
        {"chat_id": "a", "alias_id": 7},
        {"chat_id": "a", "tag": "vip"},  # a lone tag
        {"chat_id": "a", "other_details": []},
        {"chat_id": "a", "status": 3},
    ],
)
def test_a_chat_that_does_not_fit_the_wire_types_sends_its_page_to_the_dicts(
    chat: dict[str, Any],
) -> None:
    """The typed parse lets through only the JSON types `WireChat` names: any other page is
    read as `parse_response` reads it, and decoded (or refused) as the converter does."""
    body = json.dumps({"status_code": 4305, "response": [VALID_CHAT, chat]}).encode()
    data = _PARSE_CHATS(200, {}, body, 2)
    assert not data.typed
    assert list(data.records) == [VALID_CHAT, chat]
    expected = _converted([VALID_CHAT, chat])
    if expected is None:
        with pytest.raises(imi.DecodeError):
            ImiChatClient._decoded(data, 2)
    else:
        assert ImiChatClient._decoded(data, 2).items == expected


JSON_DUMPS_STYLES: list[dict[str, Any]] = [
    {"separators": (",", ":")},
    {"ensure_ascii": False},
    {"ensure_ascii": False, "indent": 1},
]


@SETTINGS
@given(raws=st.lists(mutated_chats(), max_size=10), style=st.sampled_from(JSON_DUMPS_STYLES))
def test_the_client_path_from_bytes_decodes_as_the_converter_does(
    raws: list[dict[str, Any]], style: dict[str, Any]
) -> None:
    """The client's whole path, a page body parsed by msgspec then decoded by the fast hooks,
    gives exactly what the converter gives from `json.loads` of the same body, whichever
    way the page is read (typed in the same pass, or as dicts when a chat does not fit);
    and the records as sent (`raw_records`) are those objects, each with its own text."""
    body = json.dumps({"status_code": 4305, "response": raws}, **style).encode()
    reference = json.loads(body)["response"]
    data = protocol.parse_response(200, {}, body, page=4)
    assert repr(list(data.records)) == repr(reference)
    expected = _converted(reference)
    if expected is None:
        with pytest.raises(imi.DecodeError):
            decode_page(data.records, 4)
        with pytest.raises(imi.DecodeError):
            ImiChatClient._decoded(_PARSE_CHATS(200, {}, body, 4), 4)
    else:
        assert decode_page(data.records, 4) == expected
        assert ImiChatClient._decoded(_PARSE_CHATS(200, {}, body, 4), 4).items == expected
    sent = protocol.raw_records(data)
    assert sent == reference
    assert [json.loads(r.raw) for r in sent] == reference
    at = 0
    for r in sent:  # each text is the body's own bytes, in order
        at = body.index(r.raw, at) + len(r.raw)


@SETTINGS
@given(value=json_values | st.floats(), style=st.sampled_from(JSON_DUMPS_STYLES))
def test_msgspec_reads_any_json_as_json_loads_does(value: Any, style: dict[str, Any]) -> None:
    """Whatever msgspec reads, it reads as `json.loads` (value and type); what it refuses
    (NaN, infinities) goes to `json.loads` itself."""
    body = json.dumps({"v": value}, **style).encode()
    assert repr(protocol._decode_json(body)) == repr(json.loads(body))


@SETTINGS
@given(raw=mutated_chats())
def test_unknown_enums_and_extra_fields_never_fail(raw: dict[str, Any]) -> None:
    """New status/channel strings and unknown extra fields always decode (a contract quirk)."""
    raw = {k: v for k, v in raw.items() if k in ("chat_id", "extra") or k not in VALID_CHAT}
    raw["chat_id"] = VALID_CHAT["chat_id"]
    raw["status"] = "archived"
    raw["channel"] = "instagram"
    chat = decode_chat(raw)
    assert chat.status == "archived" and not isinstance(chat.status, imi.ChatStatus)
    assert chat.channel == "instagram" and not isinstance(chat.channel, imi.Channel)


# -- strategies: HTTP answers ----------------------------------------------------------------

header_values = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["0", "1", "-1", "1.5", "nan", "inf", "1e400", " 3 ", "Wed, 21 Oct 2015"]),
    st.integers(min_value=-(10**6), max_value=10**20).map(str),
    st.just("9" * 5000),
)
header_names = st.one_of(
    st.sampled_from(
        ["Retry-After", "retry-after", "X-Total-Count", "x-total-count", "Content-Type"]
    ),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=10),
)
headers_st = st.one_of(
    st.dictionaries(header_names, header_values, max_size=4),
    st.lists(st.tuples(header_names, header_values), max_size=4).map(
        lambda items: CIMultiDictProxy(CIMultiDict(items))
    ),
)
codes = st.one_of(
    st.sampled_from(sorted(protocol.STATUS_TABLE)),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.just(4305.0),
    json_values,
)
documents = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "status_code": codes,
            "description": st.one_of(st.text(max_size=30), json_values),
            "response": st.one_of(
                st.lists(st.one_of(mutated_chats(), json_values), max_size=4), json_values
            ),
        },
    ),
    json_values,
)
bodies = st.one_of(
    documents.map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=60),
    st.sampled_from(
        [
            b"",
            b"<html><body>502 Bad Gateway</body></html>",
            b"\xff\xfe{",
            b'{"status_code": 4305, "response": [',
            b'{"status_code": 4305, "response": [[[]]]}',
        ]
    ),
)
statuses = st.one_of(
    st.sampled_from([200, 200, 200, 400, 401, 404, 405, 429, 500, 502, 503, 504, 301, 302]),
    st.integers(min_value=100, max_value=599),
)


@SETTINGS
@given(status=statuses, headers=headers_st, body=bodies)
def test_parse_response_returns_page_data_or_raises_api_error(
    status: int, headers: Mapping[str, str], body: bytes
) -> None:
    """Any status, headers and body: a PageData of dicts, or an ApiError subclass, never else."""
    try:
        data = protocol.parse_response(status, headers, body, page=4)
    except errors.ApiError as exc:
        assert exc.http_status == status
        assert exc.page == 4
        assert isinstance(exc.description, str) and exc.description
        assert exc.status_code is None or isinstance(exc.status_code, int)
        if isinstance(exc, errors.TransientError) and exc.retry_after is not None:
            assert math.isfinite(exc.retry_after)
            assert 0 <= exc.retry_after <= protocol.MAX_RETRY_AFTER
        if status in protocol.TRANSIENT_HTTP and exc.status_code is None:
            assert isinstance(exc, errors.TransientError)
        str(exc)  # the message builds
        return
    except Exception as exc:  # the property: nothing but ApiError escapes
        pytest.fail(f"parse_response leaked {type(exc).__name__}: {exc!r:.200}")
    assert status == 200
    assert isinstance(data, protocol.PageData)
    assert all(isinstance(r, dict) for r in data.records)
    assert data.total is None or (isinstance(data.total, int) and data.total >= 0)


@SETTINGS
@given(
    status=st.sampled_from(sorted(protocol.TRANSIENT_HTTP)),
    retry_after=header_values,
    body=st.one_of(st.just(b""), st.binary(max_size=20)),
)
def test_gateway_answers_are_always_transient(status: int, retry_after: str, body: bytes) -> None:
    """HTTP 429/502/503/504 with any non-vendor body and any Retry-After is a TransientError."""
    with pytest.raises(errors.TransientError) as info:
        protocol.parse_response(status, {"Retry-After": retry_after}, body)
    ra = info.value.retry_after
    assert ra is None or (math.isfinite(ra) and 0 <= ra <= protocol.MAX_RETRY_AFTER)


# -- regressions: the minimal inputs the properties above found ------------------------------

OFFSET_PLUS_5 = timezone(timedelta(hours=5))
OFFSET_MINUS_5 = timezone(-timedelta(hours=5))


@pytest.mark.parametrize(
    ("kw", "filters"),
    [
        ({"created_at__gte": datetime.min.replace(tzinfo=OFFSET_PLUS_5)}, None),
        ({"updated_at__lt": datetime.max.replace(tzinfo=OFFSET_MINUS_5)}, None),
        ({"created_at": "0001-01-01T00:00:00+05:00"}, None),
        ({}, [Filter("updated_at", "gt", "9999-12-31T23:59:59-05:00")]),
    ],
    ids=["datetime-min+05", "datetime-max-05", "text-min+05", "filter-text-max-05"],
)
def test_out_of_range_datetime_value_raises_invalid_query(kw: dict[str, Any], filters: Any) -> None:
    """A datetime whose UTC instant is outside year 1..9999 is an InvalidQueryError."""
    try:
        build_query(kw, filters)
    except imi.InvalidQueryError:
        return
    except Exception as exc:
        pytest.fail(
            f"BUG: build_query leaked {type(exc).__name__} ({exc}) for an aware datetime whose "
            "UTC instant overflows: query.format_datetime/_datetime_value must turn "
            "OverflowError into InvalidQueryError"
        )
    pytest.fail("an out-of-range datetime was accepted")


@pytest.mark.parametrize(
    "filters", [5, Filter("status", "eq", "closed"), 1.5], ids=["int", "bare-Filter", "float"]
)
def test_non_iterable_filters_raise_invalid_query(filters: Any) -> None:
    """filters= that is not a list (e.g. one bare Filter) is an InvalidQueryError, not TypeError."""
    try:
        build_query({}, filters)
    except imi.InvalidQueryError:
        return
    except Exception as exc:
        pytest.fail(
            f"BUG: build_query leaked {type(exc).__name__} ({exc}) for filters={filters!r}: "
            "query.build_query iterates `filters` without checking it is iterable"
        )
    pytest.fail("a non-iterable filters= was accepted")


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, b"[" * 100_000),
        (502, b"[" * 100_000),
        (200, b'{"status_code":4305,"response":' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    ],
    ids=["200-open-brackets", "502-open-brackets", "200-deep-success"],
)
def test_deeply_nested_json_body_raises_api_error(status: int, body: bytes) -> None:
    """A hostile body nested deeper than the recursion limit is an ApiError, not RecursionError."""
    try:
        protocol.parse_response(status, {}, body, page=1)
    except errors.ApiError:
        return
    except RecursionError:
        pytest.fail(
            f"BUG: parse_response (HTTP {status}) leaked RecursionError on a deeply nested body: "
            "protocol._decode_json catches only ValueError/UnicodeDecodeError, not RecursionError"
        )
    pytest.fail("a deeply nested body was accepted as a page")


def test_every_sandbox_record_decodes() -> None:
    """Every sandbox record (quirks included) decodes; a page equals its records one by one."""
    from imichat_async.sandbox.data import ChatFactory

    data, _ = ChatFactory(3).generate(3000)
    chats = decode_page(data, page=1)
    assert len(chats) == len(data)
    for chat, raw in zip(chats, data, strict=True):
        _assert_well_formed(chat)
        assert chat.chat_id == str(raw["chat_id"])
        assert chat == decode_chat(raw)


UTC = timezone.utc
_DECODE_ERROR = imi.DecodeError

#: One field of a valid chat replaced: what the record then holds (literal, from the rules of
#: README "Records keep what the server sent" and public-api.md "Records"), or DecodeError.
ONE_FIELD_CASES: list[tuple[str, Any, Any]] = [
    ("created_at", "2024-05-01T10:00:00+05:30", datetime(2024, 5, 1, 4, 30, tzinfo=UTC)),
    ("created_at", "2024-05-01T10:00:00z", datetime(2024, 5, 1, 10, 0, tzinfo=UTC)),
    ("created_at", "2024-05-01T10:00:00", datetime(2024, 5, 1, 10, 0, tzinfo=UTC)),
    ("updated_at", "2024-05-01Z", datetime(2024, 5, 1, 0, 0, tzinfo=UTC)),
    ("updated_at", "2024-13-01T00:00:00Z", _DECODE_ERROR),
    ("updated_at", 1714557600, _DECODE_ERROR),
    ("updated_at", None, None),
    ("asset", {"id": True, "name": "x"}, _DECODE_ERROR),
    ("asset", {"id": 1.5}, _DECODE_ERROR),
    ("asset", {"id": "007", "name": "n"}, Asset("007", "n")),
    ("asset", {"id": 7, "extra": 1}, Asset(7, None)),
    ("asset", {}, Asset(None, None)),
    ("asset", None, None),
    ("asset", [1, 2], _DECODE_ERROR),
    ("asset", {"id": 7, "name": None}, Asset(7, None)),
    ("asset", {"id": 7, "name": 42}, Asset(7, "42")),  # cattrs' rule for str: str(value)
    ("asset", {"id": 7, "name": True}, Asset(7, "True")),
    ("tag", ["a", None], _DECODE_ERROR),
    ("tag", "vip", ["vip"]),
    ("tag", None, []),
    ("customer_id", 12345, "12345"),
    ("alias_id", 1.5, "1.5"),
    ("flag", True, _DECODE_ERROR),
    ("assignee", {"a": 1}, _DECODE_ERROR),
    ("chat_id", "", _DECODE_ERROR),
    ("chat_id", 42, "42"),
    ("chat_id", None, _DECODE_ERROR),
    ("status", "closed", imi.ChatStatus.CLOSED),
    ("status", "archived", "archived"),
    ("status", 3, _DECODE_ERROR),
    ("channel", "instagram", "instagram"),
    ("channel", "whatsapp", imi.Channel.WHATSAPP),
    ("other_details", None, {}),
    ("other_details", ["a"], _DECODE_ERROR),
    ("other_details", {"k": [1, {"x": None}]}, {"k": [1, {"x": None}]}),
]


@pytest.mark.parametrize(("field", "sent", "kept"), ONE_FIELD_CASES)
def test_one_field_decodes_to_its_literal_value(field: str, sent: Any, kept: Any) -> None:
    """A valid chat with one field replaced decodes to the literal expected value, or fails
    with a DecodeError naming that field."""
    raw = {**VALID_CHAT, field: sent}
    if kept is _DECODE_ERROR:
        with pytest.raises(imi.DecodeError) as info:
            decode_chat(raw, page=2, index=5)
        assert info.value.field is not None and info.value.field.split(".")[0] == field
        assert "page 2, record 5" in str(info.value)
        return
    chat = decode_chat(raw)
    assert getattr(chat, field) == kept
    if isinstance(kept, str):
        assert type(getattr(chat, field)) is type(kept)  # an unknown enum stays a plain str
    assert decode_page([raw]) == [chat]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(field=st.sampled_from(CHAT_FIELDS), value=json_values)
def test_any_value_in_one_field_decodes_or_names_that_field(field: str, value: Any) -> None:
    """A valid chat with one field replaced by any JSON value: a well-formed Chat whose other
    fields are unchanged, or a DecodeError naming that field."""
    raw = {**VALID_CHAT, field: value}
    try:
        chat = decode_chat(raw)
    except imi.DecodeError as exc:
        assert exc.field is not None and exc.field.split(".")[0] == field
        return
    _assert_well_formed(chat)
    reference = decode_chat(VALID_CHAT)
    for other in CHAT_FIELDS:
        if other != field:
            assert getattr(chat, other) == getattr(reference, other)


_TEXT_BODIES = st.one_of(
    bodies,
    st.sampled_from(
        [
            b'{"status_code":4305,"response":[{"chat_id":"a","x":"\xff"}]}',  # not UTF-8
            b'{"status_code":4305,"response":[{"chat_id":"a","x":"\xed\xa0\x80"}]}',
            b'{"status_code":4305,"response":[{"chat_id":"a","x":"\\ud800"}]}',
            b'{"status_code":4305,"response":[{"chat_id":"a","x":NaN}]}',
            b'{"status_code":4305,"response":[{"chat_id":"a","x":1e400}]}',
            b'{"status_code":4305,"response":[{"chat_id":"a","chat_id":7}]}',
            b'{"status_code":4305,"response":[{"a":1}],"response":[{"b":2},{"c":3}]}',
            b'{"status_code":4305.0,"response":[{"chat_id":"a",\n"created_at":"x"}]}',
            b'{"status_code":4305,"response":[{"chat_id":"a"},1]}',
            b'\xef\xbb\xbf{"status_code":4305,"response":[{"chat_id":"a"}]}',
        ]
    ),
)


@SETTINGS
@given(status=statuses, headers=headers_st, body=_TEXT_BODIES)
def test_parse_texts_reads_every_body_as_parse_response_and_raw_records_do(
    status: int, headers: Mapping[str, str], body: bytes
) -> None:
    """The records as texts (`parse_texts`, no dict built on a clean body): the same error
    (class, codes), or the same total and, chat for chat, the same bytes and fields as
    `parse_response` then `raw_records` give."""
    try:
        expected = protocol.parse_response(status, headers, body, page=4)
    except errors.ApiError as exc:
        with pytest.raises(type(exc)) as got:
            protocol.parse_texts(status, headers, body, page=4)
        assert (got.value.status_code, got.value.description) == (exc.status_code, exc.description)
        return
    data = protocol.parse_texts(status, headers, body, page=4)
    assert data.total == expected.total
    assert all(type(r) is imi.ChatText for r in data.records)
    want = [
        (r.raw, r.get("chat_id"), r.get("created_at"), r.get("updated_at"))
        for r in protocol.raw_records(expected)
    ]
    got_fields = [(r.raw, r.chat_id, r.created_at, r.updated_at) for r in data.records]
    assert repr(got_fields) == repr(want)


@SETTINGS
@given(status=statuses, headers=headers_st, body=_TEXT_BODIES)
def test_the_typed_parse_reads_every_body_as_parse_response_does(
    status: int, headers: Mapping[str, str], body: bytes
) -> None:
    """`typed_parse`: the same error (class, codes) as `parse_response`, or the same total
    and the same chats (a typed chat holds the fields `WireChat` names, as parsed)."""
    try:
        expected = protocol.parse_response(status, headers, body, page=4)
    except errors.ApiError as exc:
        with pytest.raises(type(exc)) as got:
            _PARSE_CHATS(status, headers, body, 4)
        assert (got.value.status_code, got.value.description) == (exc.status_code, exc.description)
        return
    data = _PARSE_CHATS(status, headers, body, 4)
    assert data.total == expected.total
    want = list(expected.records)
    if data.typed:
        want = [{k: v for k, v in r.items() if k in VALID_CHAT} for r in want]
    assert repr(list(data.records)) == repr(want)
