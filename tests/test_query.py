"""Query building: every accepted form, and every rejected one with a message naming the fault."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from typing import Any

import pytest

import imichat_async as imi
from imichat_async._query import Filter, Query, build_query, format_datetime, split_keyword

UTC = timezone.utc
IST = timezone(timedelta(hours=5, minutes=30))


def triples(**kwargs: Any) -> list[tuple[str, str, str]]:
    return list(build_query(kwargs).filters)


# -- accepted forms ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"status": "closed"}, [("status", "eq", "closed")]),
        ({"status__eq": "closed"}, [("status", "eq", "closed")]),
        ({"status__not_eq": "closed"}, [("status", "not_eq", "closed")]),
        ({"channel": "whatsapp"}, [("channel", "eq", "whatsapp")]),
        ({"tag": "vip"}, [("tag", "eq", "vip")]),
        ({"assignee": "agent1@acme.example"}, [("assignee", "eq", "agent1@acme.example")]),
        ({"facebook_psid": "psid-1"}, [("facebook_psid", "eq", "psid-1")]),
        ({"twitter_id": "tw-1"}, [("twitter_id", "eq", "tw-1")]),
        ({"email_id": "a@b.example"}, [("email_id", "eq", "a@b.example")]),
        ({"mobile": "919812345678"}, [("mobile", "eq", "919812345678")]),
        ({"livechat_id": "lc-1"}, [("livechat_id", "eq", "lc-1")]),
        ({"abc_user_id": "urn:mbid:x"}, [("abc_user_id", "eq", "urn:mbid:x")]),
        ({"whatsapp_mobile_number": "9198"}, [("whatsapp_mobile_number", "eq", "9198")]),
        ({"intent": "billing"}, [("intent", "eq", "billing")]),
        ({"group": "tier1"}, [("group", "eq", "tier1")]),
        ({"group__eq": "tier1"}, [("group", "eq", "tier1")]),
    ],
)
def test_keyword_forms(kwargs: dict[str, Any], expected: list[tuple[str, str, str]]) -> None:
    """param=value means eq; param__op=value means that operator."""
    assert triples(**kwargs) == expected


@pytest.mark.parametrize("param", ["created_at", "updated_at"])
@pytest.mark.parametrize("op", ["eq", "lt", "gt", "lte", "gte"])  # the vendor's table
def test_every_datetime_operator(param: str, op: str) -> None:
    """created_at and updated_at accept eq, lt, gt, lte and gte."""
    key = param if op == "eq" else f"{param}__{op}"
    value = datetime(2024, 5, 1, tzinfo=UTC)
    assert triples(**{key: value}) == [(param, op, "2024-05-01T00:00:00Z")]


DATETIME_CASES = [
    (datetime(2024, 5, 1, 10, 0, tzinfo=UTC), "2024-05-01T10:00:00Z"),
    (datetime(2024, 5, 1, 15, 30, tzinfo=IST), "2024-05-01T10:00:00Z"),
    (datetime(2024, 5, 1, 10, 0), "2024-05-01T10:00:00Z"),
    (datetime(2024, 5, 1, 10, 0, 0, 250000, tzinfo=UTC), "2024-05-01T10:00:00.250000Z"),
    ("2024-05-01T10:00:00Z", "2024-05-01T10:00:00Z"),
    ("2024-05-01T10:00:00z", "2024-05-01T10:00:00Z"),
    ("2024-05-01T15:30:00+05:30", "2024-05-01T10:00:00Z"),
    ("2024-05-01T06:00:00-04:00", "2024-05-01T10:00:00Z"),
    ("2024-05-01T10:00:00", "2024-05-01T10:00:00Z"),
    ("2024-05-01T10:00:00.123Z", "2024-05-01T10:00:00.123000Z"),
    ("2024-05-01", "2024-05-01T00:00:00Z"),
    (" 2024-05-01T10:00:00Z ", "2024-05-01T10:00:00Z"),
    (date(2024, 5, 1), "2024-05-01T00:00:00Z"),
]
DATETIME_IDS = [
    "aware-utc",
    "aware-ist",
    "naive-is-utc",
    "fraction",
    "str-Z",
    "str-z",
    "str-plus-offset",
    "str-minus-offset",
    "str-naive",
    "str-fraction",
    "str-date",
    "str-padded",
    "date",
]


@pytest.mark.parametrize(("value", "wire"), DATETIME_CASES, ids=DATETIME_IDS)
def test_datetime_values_become_utc_z(value: Any, wire: str) -> None:
    """datetime (aware, naive=UTC), ISO strings with Z/offset, and dates all go out as UTC Z."""
    assert triples(created_at__gte=value) == [("created_at", "gte", wire)]


def test_format_datetime_crosses_midnight() -> None:
    """An offset that moves the instant to the previous UTC day is converted, not truncated."""
    assert format_datetime(datetime(2024, 5, 1, 2, 0, tzinfo=IST)) == "2024-04-30T20:30:00Z"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"status": imi.ChatStatus.CLOSED}, ("status", "eq", "closed")),
        ({"status__not_eq": imi.ChatStatus.QUEUED}, ("status", "not_eq", "queued")),
        ({"channel": imi.Channel.WHATSAPP}, ("channel", "eq", "whatsapp")),
        ({"channel": imi.Channel.ABC}, ("channel", "eq", "abc")),
    ],
)
def test_enum_members_as_values(kwargs: dict[str, Any], expected: tuple[str, str, str]) -> None:
    """ChatStatus and Channel members go on the wire as their plain values."""
    (got,) = triples(**kwargs)
    assert got == expected
    assert type(got[2]) is str


@pytest.mark.parametrize("value", [status.value for status in imi.ChatStatus])
def test_every_status_value(value: str) -> None:
    """Every vendor status is accepted for status eq and not_eq."""
    assert triples(status=value, status__not_eq=value) == [
        ("status", "eq", value),
        ("status", "not_eq", value),
    ]


@pytest.mark.parametrize("value", [channel.value for channel in imi.Channel])
def test_every_channel_value(value: str) -> None:
    """Every vendor channel is accepted for channel eq."""
    assert triples(channel=value) == [("channel", "eq", value)]


def test_explicit_filters_and_tuples() -> None:
    """Filter objects and plain 3-tuples are both accepted in filters=, in order."""
    q = build_query(
        None,
        [
            Filter("created_at", "gte", datetime(2024, 5, 1, tzinfo=UTC)),
            ("created_at", "lt", "2024-06-01T00:00:00Z"),
            ["tag", "eq", "vip"],  # type: ignore[list-item]
        ],
    )
    assert q.filters == (
        ("created_at", "gte", "2024-05-01T00:00:00Z"),
        ("created_at", "lt", "2024-06-01T00:00:00Z"),
        ("tag", "eq", "vip"),
    )


def test_filters_accept_any_iterable() -> None:
    """filters= may be a generator or a tuple, not only a list."""
    gen = (Filter("tag", "eq", t) for t in ("a", "b"))
    assert build_query(None, gen).filters == (("tag", "eq", "a"), ("tag", "eq", "b"))
    assert build_query(None, (("tag", "eq", "a"),)).filters == (("tag", "eq", "a"),)


def test_mixing_both_forms_keeps_every_filter() -> None:
    """Keyword filters and filters= combine: explicit ones first, then the keywords."""
    q = build_query(
        {"status": "closed", "updated_at__lt": "2024-06-01T00:00:00Z"},
        [Filter("channel", "eq", "sms")],
        "or",
    )
    doc = json.loads(q.body())
    assert doc == {
        "condition": "or",
        "filters": [
            {"param": "channel", "operator": "eq", "value": "sms"},
            {"param": "status", "operator": "eq", "value": "closed"},
            {"param": "updated_at", "operator": "lt", "value": "2024-06-01T00:00:00Z"},
        ],
    }


@pytest.mark.parametrize("condition", ["and", "or"])
def test_conditions(condition: str) -> None:
    """condition "and" and "or" are accepted and sent as given."""
    assert json.loads(build_query({"tag": "x"}, None, condition).body())["condition"] == condition


def test_empty_query_is_every_chat() -> None:
    """No filters gives condition and with an empty filter list."""
    assert json.loads(build_query().body()) == {"condition": "and", "filters": []}


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("status", ("status", "eq")),
        ("status__not_eq", ("status", "not_eq")),
        ("created_at__gte", ("created_at", "gte")),
        ("whatsapp_mobile_number", ("whatsapp_mobile_number", "eq")),
        ("abc_user_id__eq", ("abc_user_id", "eq")),
        ("foo__bar", ("foo", "bar")),
    ],
)
def test_split_keyword(key: str, expected: tuple[str, str]) -> None:
    """A keyword splits at the last double underscore; no suffix means eq."""
    assert split_keyword(key) == expected


# -- rejected forms ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"foo": "x"}, ["'foo'"]),
        ({"foo__eq": "x"}, ["'foo'"]),
        ({"chat_id": "c-1"}, ["'chat_id'"]),
        ({"Status": "closed"}, ["'Status'"]),
        ({"status__lt": "closed"}, ["'lt'", "'status'"]),
        ({"status__gte": "closed"}, ["'gte'", "'status'"]),
        ({"channel__not_eq": "sms"}, ["'not_eq'", "'channel'"]),
        ({"tag__not_eq": "vip"}, ["'not_eq'", "'tag'"]),
        ({"mobile__gt": "1"}, ["'gt'", "'mobile'"]),
        ({"created_at__not_eq": "2024-05-01T00:00:00Z"}, ["'not_eq'", "'created_at'"]),
        ({"created_at__between": "2024-05-01"}, ["'between'", "'created_at'"]),
        ({"updated_at__GTE": "2024-05-01"}, ["'GTE'", "'updated_at'"]),
        ({"status__": "closed"}, ["''", "'status'"]),
        ({"status": "archived"}, ["'archived'", "status"]),
        ({"status": "Closed"}, ["'Closed'", "status"]),
        ({"status__not_eq": "done"}, ["'done'", "status__not_eq"]),
        ({"channel": "instagram"}, ["'instagram'", "channel"]),
        ({"created_at__gte": "yesterday"}, ["'yesterday'", "created_at__gte"]),
        ({"updated_at": "2024-13-01T00:00:00Z"}, ["2024-13-01", "updated_at"]),
        ({"created_at": ""}, ["created_at"]),
        ({"created_at__lt": 1714521600}, ["1714521600", "created_at__lt"]),
        ({"created_at__lt": None}, ["None", "created_at__lt"]),
        ({"tag": None}, ["None", "tag", "NoneType"]),
        ({"tag": 1.5}, ["1.5", "tag", "float"]),
        ({"tag": True}, ["True", "tag", "bool"]),
        ({"tag": ["a", "b"]}, ["tag", "list"]),
        ({"assignee": {"id": 1}}, ["assignee", "dict"]),
        ({"tag": ""}, ["tag", "empty"]),
        ({"assignee": "   "}, ["assignee", "empty"]),
        ({"status": ""}, ["status"]),
    ],
)
def test_rejected_keywords_name_the_fault(kwargs: dict[str, Any], needles: list[str]) -> None:
    """A bad param, operator or value raises InvalidQueryError naming it."""
    with pytest.raises(imi.InvalidQueryError) as info:
        build_query(kwargs)
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.parametrize(
    ("item", "needles"),
    [
        (Filter("foo", "eq", "x"), ["'foo'"]),
        (Filter("status", "lt", "closed"), ["'lt'", "'status'"]),
        (Filter("channel", "not_eq", "sms"), ["'not_eq'", "'channel'"]),
        (Filter("status", "eq", "archived"), ["'archived'"]),
        (Filter("created_at", "gte", "not a date"), ["'not a date'", "created_at__gte"]),
        (Filter(None, "eq", "x"), ["None"]),  # type: ignore[arg-type]
        (Filter("tag", None, "x"), ["None", "'tag'"]),  # type: ignore[arg-type]
        (("status", "eq"), ["('status', 'eq')"]),
        (("status", "eq", "closed", "extra"), ["extra"]),
        ("status", ["'status'"]),
        ({"param": "status"}, ["status"]),
        (42, ["42"]),
    ],
)
def test_rejected_explicit_filters(item: Any, needles: list[str]) -> None:
    """A bad Filter or filter item raises InvalidQueryError naming it."""
    with pytest.raises(imi.InvalidQueryError) as info:
        build_query(None, [item])
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.parametrize(
    "filters",
    [
        {"status": "closed"},
        {},
        "status",
        "",
        b"status",
        {"param": "tag", "operator": "eq", "value": "x"},
    ],
)
def test_filters_must_be_a_list(filters: Any) -> None:
    """filters= given a dict (even empty), a str or bytes is rejected, pointing to imi.Filter."""
    with pytest.raises(imi.InvalidQueryError, match=r"filters= takes a list of imi\.Filter"):
        build_query(None, filters)


@pytest.mark.parametrize("condition", ["AND", "Or", "xor", "", None, "and ", ["and"]])
def test_bad_condition(condition: Any) -> None:
    """Only "and" and "or" are valid conditions; the message names the bad one."""
    with pytest.raises(imi.InvalidQueryError, match="condition") as info:
        build_query({"tag": "x"}, None, condition)
    assert repr(condition)[:20] in str(info.value)


def test_first_fault_wins_and_nothing_is_built() -> None:
    """A bad filter after good ones still rejects the whole query."""
    with pytest.raises(imi.InvalidQueryError, match="'nope'"):
        build_query({"status": "closed", "nope": "x"})


def test_invalid_query_error_types() -> None:
    """InvalidQueryError is both a ValueError and an ImiChatError, and not an ApiError."""
    with pytest.raises(ValueError) as info:
        build_query({"foo": 1})
    assert isinstance(info.value, imi.ImiChatError)
    assert isinstance(info.value, imi.InvalidQueryError)
    assert not isinstance(info.value, imi.ApiError)


def test_int_value_is_sent_as_a_string() -> None:
    """An int for a string param (e.g. a mobile number) goes on the wire as its digits."""
    assert triples(mobile=919812345678) == [("mobile", "eq", "919812345678")]


# -- the local zone of the machine plays no part -----------------------------------------


@pytest.fixture
def new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local zone is New York (UTC-4 in May, UTC-5 in January), then restored."""
    monkeypatch.setenv("TZ", "EST5EDT,M3.2.0,M11.1.0")  # POSIX rule: needs no tz database
    time.tzset()
    assert time.timezone == 5 * 3600  # the change took effect
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(("value", "wire"), DATETIME_CASES, ids=DATETIME_IDS)
def test_datetime_values_ignore_the_local_zone(new_york: None, value: Any, wire: str) -> None:
    """Away from UTC: naive still means UTC, aware values convert to UTC, not to local time."""
    assert triples(created_at__gte=value) == [("created_at", "gte", wire)]


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (datetime(2024, 1, 15, 23, 30), "2024-01-15T23:30:00Z"),
        (datetime(2024, 1, 15, 23, 30, tzinfo=UTC), "2024-01-15T23:30:00Z"),
        (datetime(2024, 7, 1, 2, 0, tzinfo=IST), "2024-06-30T20:30:00Z"),
    ],
)
def test_format_datetime_ignores_the_local_zone(new_york: None, value: datetime, wire: str) -> None:
    """format_datetime gives the same UTC Z text in New York as on a UTC machine."""
    assert format_datetime(value) == wire


def test_query_defaults_to_and_with_no_filters() -> None:
    """Query() is the contract's default: condition "and", an empty filter list."""
    assert json.loads(Query().body()) == {"condition": "and", "filters": []}


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"status": "archived"}, "for status:"),
        ({"status__eq": "archived"}, "for status:"),
        ({"status__not_eq": "archived"}, "for status__not_eq:"),
        ({"created_at": "soon"}, "for created_at:"),
        ({"created_at__lt": "soon"}, "for created_at__lt:"),
    ],
)
def test_message_names_the_keyword_as_written(kwargs: dict[str, Any], where: str) -> None:
    """A bad value is named `param` for eq and `param__op` otherwise, as a user writes it."""
    with pytest.raises(imi.InvalidQueryError) as info:
        build_query(kwargs)
    assert where in str(info.value)


def test_check_filters_is_a_searchs_check_without_a_client() -> None:
    """`imi.check_filters`: both forms and the condition checked as a search checks them, the
    filters returned as the request sends them (explicit first, then the keywords)."""
    at = datetime(2024, 5, 1, 2, tzinfo=timezone(timedelta(hours=2)))
    got = imi.check_filters(
        {"status": "closed", "created_at__gte": at},
        filters=[imi.Filter("channel", "eq", imi.Channel.SMS)],
        condition="or",
    )
    assert got == (
        ("channel", "eq", "sms"),
        ("status", "eq", "closed"),
        ("created_at", "gte", "2024-05-01T00:00:00Z"),
    )
    assert got == build_query({"status": "closed", "created_at__gte": at}, got[:1], "or").filters
    assert imi.check_filters() == ()
    with pytest.raises(imi.InvalidQueryError, match="condition"):
        imi.check_filters(condition="xor")
    with pytest.raises(imi.InvalidQueryError, match="'limit'"):
        imi.check_filters({"limit": 5})  # not a filter: refused, never sent as one
