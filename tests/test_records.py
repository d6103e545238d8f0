"""Record decoding: every quirk of the wire contract's "Record quirks" section."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import attrs
import cattrs
import pytest

import imichat_async as imi
from imichat_async import _records
from imichat_async._errors import DecodeError
from imichat_async._records import decode_chat, decode_page, parse_utc

UTC = timezone.utc
SAMPLES = Path(__file__).parent / "samples"
PAGE: list[dict[str, Any]] = json.loads((SAMPLES / "page_quirks.json").read_text())["response"]
BAD: list[dict[str, Any]] = json.loads((SAMPLES / "records_bad.json").read_text())
OPTIONAL_STR_FIELDS = ("alias_id", "customer_id", "destination_id", "assignee", "flag")
OPTIONAL_FIELDS = (*OPTIONAL_STR_FIELDS, "created_at", "updated_at", "status", "channel", "asset")


def chat(**fields: Any) -> imi.Chat:
    return decode_chat({"chat_id": "c-1", **fields})


@pytest.fixture(scope="module")
def page() -> dict[str, imi.Chat]:
    return {c.chat_id: c for c in decode_page(PAGE, page=1)}


def test_sample_page_decodes_in_order() -> None:
    """The quirky sample page decodes whole, in the order sent."""
    chats = decode_page(PAGE, page=1)
    assert [c.chat_id for c in chats] == [f"c-{i:04d}" for i in range(1, 11)]
    assert all(isinstance(c, imi.Chat) for c in chats)


def test_full_record(page: dict[str, imi.Chat]) -> None:
    """A complete record maps every vendor field."""
    c = page["c-0001"]
    assert c == imi.Chat(
        chat_id="c-0001",
        alias_id="a-0001",
        created_at=datetime(2024, 5, 1, 10, 0, tzinfo=UTC),
        updated_at=datetime(2024, 5, 1, 10, 5, 30, 250000, tzinfo=UTC),
        status=imi.ChatStatus.CLOSED,
        channel=imi.Channel.SMS,
        asset=imi.Asset(id=919876543210, name="Longcode"),
        customer_id="cust-1",
        destination_id="919812345678",
        assignee="agent1@acme.example",
        flag="green",
        tag=["billing", "vip"],
        other_details={"order": "A-17", "score": 4},
    )


# -- asset.id ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (919876543210, 919876543210),
        (0, 0),
        ("support@acme.example", "support@acme.example"),
        ("svc-key-1", "svc-key-1"),
        ("007123", "007123"),
        ("0", "0"),
        ("1234567890123456", "1234567890123456"),
        (None, None),
    ],
)
def test_asset_id_kept_as_sent(sent: Any, kept: Any) -> None:
    """asset.id: an int stays int, a str (even numeric, leading zeros) stays str."""
    asset = chat(asset={"id": sent, "name": "x"}).asset
    assert asset is not None
    assert asset.id == kept
    assert type(asset.id) is type(kept)


def test_asset_quirks_from_sample(page: dict[str, imi.Chat]) -> None:
    """Sample assets: email id, numeric string with zeros, null name, null/absent asset."""
    assert page["c-0002"].asset == imi.Asset("support@acme.example", "Support mailbox")
    assert page["c-0003"].asset == imi.Asset("007123", "WA service key")
    assert page["c-0004"].asset == imi.Asset(42, "IG page")  # extra "region" ignored
    assert page["c-0005"].asset == imi.Asset("svc-abc-1", None)
    assert page["c-0006"].asset is None
    assert page["c-0007"].asset is None


def test_asset_without_fields() -> None:
    """An empty asset object decodes to Asset(None, None)."""
    assert chat(asset={}).asset == imi.Asset(None, None)


def test_equal_assets_share_one_record_and_never_mix_up_kinds() -> None:
    """Chats of one asset share one frozen `Asset`; an id of another kind (1, "1", True,
    1.0) is never handed the record of an equal-comparing one, and the memo stays bounded."""
    raws = [
        {"chat_id": "a", "asset": {"id": 1, "name": "x"}},
        {"chat_id": "b", "asset": {"id": 1, "name": "x", "region": "eu"}},
        {"chat_id": "c", "asset": {"id": "1", "name": "x"}},
        {"chat_id": "d", "asset": {"id": 1, "name": None}},
        {"chat_id": "e", "asset": {"id": 1}},
    ]
    a, b, c, d, e = (x.asset for x in decode_page(raws))
    assert a is b and a == imi.Asset(1, "x")
    assert c == imi.Asset("1", "x")
    assert c is not None and type(c.id) is str
    assert d is e and d == imi.Asset(1, None)
    for bad in (True, 1.0):
        with pytest.raises(DecodeError, match=r"asset\.id"):
            decode_page([*raws, {"chat_id": "f", "asset": {"id": bad, "name": "x"}}])
    named = decode_chat({"chat_id": "g", "asset": {"id": 1, "name": 1}}).asset
    assert named == imi.Asset(1, "1")  # a name of another kind goes through cattrs' str rule

    generated = cast(Any, _records._structure_chat)  # cattrs sets `overrides` on its function
    hook: _records._AssetHook = generated.overrides["asset"].struct_hook.__self__
    decode_page([{"chat_id": str(i), "asset": {"id": i}} for i in range(3000)])
    assert 0 < len(hook.built) <= 1024
    assert decode_chat({"chat_id": "h", "asset": {"id": 5}}).asset == imi.Asset(5, None)


# -- optional fields --------------------------------------------------------------------


@pytest.mark.parametrize("field", OPTIONAL_FIELDS)
@pytest.mark.parametrize("how", ["missing", "null"])
def test_optional_field_missing_or_null_is_none(field: str, how: str) -> None:
    """Any optional field missing or null decodes to None."""
    raw: dict[str, Any] = dict(PAGE[0])
    if how == "missing":
        del raw[field]
    else:
        raw[field] = None
    decoded = decode_chat(raw)
    assert getattr(decoded, field) is None
    assert decoded.chat_id == "c-0001"


def test_minimal_record(page: dict[str, imi.Chat]) -> None:
    """A record with only chat_id decodes with every default."""
    assert page["c-0010"] == imi.Chat(chat_id="c-0010")
    c = page["c-0010"]
    assert c.tag == []
    assert dict(c.other_details) == {}
    assert c.asset is None


@pytest.mark.parametrize("tag", ["missing", None, []], ids=["missing", "null", "empty"])
def test_tag_absent_is_empty(tag: Any) -> None:
    """tag missing, null or [] decodes to an empty sequence."""
    raw = {"chat_id": "c-1"} if tag == "missing" else {"chat_id": "c-1", "tag": tag}
    decoded = decode_chat(raw)
    assert len(decoded.tag) == 0
    assert list(decoded.tag) == []


def test_tags_kept_in_order() -> None:
    """A tag list keeps its order and its values."""
    assert list(chat(tag=["b", "a", "b"]).tag) == ["b", "a", "b"]


@pytest.mark.parametrize("details", ["missing", None, {}], ids=["missing", "null", "empty"])
def test_other_details_absent_is_empty_mapping(details: Any) -> None:
    """other_details missing, null or {} decodes to an empty mapping."""
    raw = (
        {"chat_id": "c-1"} if details == "missing" else {"chat_id": "c-1", "other_details": details}
    )
    decoded = decode_chat(raw)
    assert dict(decoded.other_details) == {}
    assert len(decoded.other_details) == 0


def test_other_details_free_form(page: dict[str, imi.Chat]) -> None:
    """other_details keeps any JSON object, nested values included."""
    assert dict(page["c-0005"].other_details) == {
        "intent": "billing",
        "group": "tier1",
        "nested": {"a": [1, 2]},
    }


# -- enums ------------------------------------------------------------------------------


@pytest.mark.parametrize("member", list(imi.ChatStatus))
def test_known_status_is_member(member: imi.ChatStatus) -> None:
    """A known status decodes to the ChatStatus member (and equals its string)."""
    got = chat(status=member.value).status
    assert got is member
    assert got == member.value


@pytest.mark.parametrize("member", list(imi.Channel))
def test_known_channel_is_member(member: imi.Channel) -> None:
    """A known channel decodes to the Channel member (and equals its string)."""
    got = chat(channel=member.value).channel
    assert got is member
    assert got == member.value


@pytest.mark.parametrize(
    ("field", "value"),
    [("channel", "instagram"), ("status", "archived"), ("channel", "SMS"), ("status", "")],
)
def test_unknown_enum_value_kept_as_plain_str(field: str, value: str) -> None:
    """An unknown channel or status is kept as a plain str, equal to what was sent."""
    got = getattr(chat(**{field: value}), field)
    assert type(got) is str
    assert got == value


def test_unknown_enums_from_sample(page: dict[str, imi.Chat]) -> None:
    """The sample's instagram/archived chat decodes, comparing equal to the strings."""
    c = page["c-0004"]
    assert c.channel == "instagram"
    assert c.status == "archived"
    assert not isinstance(c.channel, imi.Channel)


def test_enum_values_match_vendor() -> None:
    """ChatStatus and Channel are str enums with exactly the vendor's values."""
    assert [s.value for s in imi.ChatStatus] == ["queued", "picked", "onhold", "closed"]
    assert [c.value for c in imi.Channel] == [
        "sms",
        "facebook",
        "twitter",
        "livechat",
        "email",
        "abc",
        "whatsapp",
        "api",
    ]
    assert issubclass(imi.ChatStatus, str)
    assert issubclass(imi.Channel, str)
    assert str(imi.Channel.SMS) == "sms"


# -- extra fields -----------------------------------------------------------------------


def test_extra_fields_ignored(page: dict[str, imi.Chat]) -> None:
    """Unknown top-level and asset fields are ignored, not errors nor attributes."""
    c = page["c-0004"]
    assert not hasattr(c, "priority")
    assert not hasattr(c, "sla")
    assert c.tag == ["new"]


# -- datetimes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("2024-05-01T10:00:00Z", datetime(2024, 5, 1, 10, 0, tzinfo=UTC)),
        ("2024-05-01T10:00:00.250Z", datetime(2024, 5, 1, 10, 0, 0, 250000, tzinfo=UTC)),
        ("2024-05-01T15:30:00+05:30", datetime(2024, 5, 1, 10, 0, tzinfo=UTC)),
        ("2024-05-01T06:00:00-04:00", datetime(2024, 5, 1, 10, 0, tzinfo=UTC)),
        ("2024-05-01T10:00:00", datetime(2024, 5, 1, 10, 0, tzinfo=UTC)),
        ("2024-05-01T10:00:00+00:00", datetime(2024, 5, 1, 10, 0, tzinfo=UTC)),
    ],
    ids=["Z", "fraction", "plus-0530", "minus-0400", "naive", "plus-0000"],
)
@pytest.mark.parametrize("field", ["created_at", "updated_at"])
def test_datetimes_are_aware_utc(field: str, sent: str, expected: datetime) -> None:
    """Datetimes decode to aware UTC: Z, offsets converted, naive taken as UTC."""
    got = getattr(chat(**{field: sent}), field)
    assert got == expected
    assert got.tzinfo is not None
    assert got.utcoffset().total_seconds() == 0
    assert (got.hour, got.minute) == (expected.hour, expected.minute)


def test_parse_utc_returns_utc_tzinfo() -> None:
    """parse_utc gives tzinfo UTC even for an offset string."""
    assert parse_utc("2024-05-01T15:30:00+05:30").tzinfo == UTC


def test_public_parse_utc_reads_a_raw_timestamp_as_a_chats() -> None:
    """`imi.parse_utc` is the rule of `Chat` timestamps: same instant, UTC; ValueError else."""
    raw = {"chat_id": "c", "created_at": "2024-05-01T15:30:00.5+05:30", "updated_at": "2024-05-01"}
    chat = decode_chat(raw)
    assert imi.parse_utc(raw["created_at"]) == chat.created_at
    assert imi.parse_utc(raw["updated_at"]) == chat.updated_at == datetime(2024, 5, 1, tzinfo=UTC)
    assert imi.parse_utc("2024-05-01T10:00:00Z").tzinfo == UTC
    with pytest.raises(ValueError):
        imi.parse_utc("yesterday")


# -- shape of the classes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "field"), [(imi.Chat("x"), "flag"), (imi.Asset(1, "n"), "name")], ids=["Chat", "Asset"]
)
def test_records_are_frozen_and_slotted(obj: object, field: str) -> None:
    """Chat and Asset are attrs classes, frozen and slotted."""
    cls = type(obj)
    assert attrs.has(cls)
    assert "__slots__" in cls.__dict__
    assert not hasattr(obj, "__dict__")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(obj, field, "y")
    with pytest.raises((attrs.exceptions.FrozenInstanceError, AttributeError)):
        setattr(obj, "brand_new", 1)  # noqa: B010


def test_chat_field_names_are_the_public_ones() -> None:
    """Chat exposes exactly the fields promised by the public API."""
    assert [f.name for f in attrs.fields(imi.Chat)] == [
        "chat_id",
        "alias_id",
        "created_at",
        "updated_at",
        "status",
        "channel",
        "asset",
        "customer_id",
        "destination_id",
        "assignee",
        "flag",
        "tag",
        "other_details",
    ]
    assert [f.name for f in attrs.fields(imi.Asset)] == ["id", "name"]


def test_records_compare_by_value() -> None:
    """Records decoded from equal JSON compare equal; an Asset is hashable."""
    a = chat(status="closed", tag=["x"], asset={"id": "007", "name": "n"})
    b = chat(status="closed", tag=["x"], asset={"id": "007", "name": "n"})
    assert a == b
    assert a != chat(status="closed", tag=["y"], asset={"id": "007", "name": "n"})
    assert hash(a.asset) == hash(imi.Asset("007", "n"))
    assert hash(a) == hash(b) and len({a, b}) == 1  # a Chat can go in a set, lists and all


# -- undecodable records ----------------------------------------------------------------


@pytest.mark.parametrize("case", BAD, ids=lambda c: c["name"])
def test_undecodable_record_raises_decode_error(case: dict[str, Any]) -> None:
    """A bad record raises DecodeError naming page, record and field, never a cattrs error."""
    with pytest.raises(DecodeError) as info:
        decode_chat(case["record"], page=4, index=2)
    err = info.value
    assert type(err) is DecodeError
    assert isinstance(err, imi.ImiChatError)
    assert err.page == 4
    assert err.field == case["field"]
    assert "page 4" in str(err)
    assert "record 2" in str(err)
    assert repr(case["field"]) in str(err)
    assert err.__cause__ is None
    assert err.__suppress_context__


@pytest.mark.parametrize("case", BAD, ids=lambda c: c["name"])
def test_bad_record_in_page_names_its_position(case: dict[str, Any]) -> None:
    """decode_page raises DecodeError naming the page and the bad record's index."""
    raws = [PAGE[0], PAGE[1], case["record"], PAGE[2]]
    with pytest.raises(DecodeError) as info:
        decode_page(raws, page=7)
    assert not isinstance(info.value, cattrs.BaseValidationError)
    assert info.value.page == 7
    assert info.value.field == case["field"]
    assert "page 7, record 2" in str(info.value)


@pytest.mark.parametrize("raw", [None, [], "c-1", 3])
def test_non_object_record(raw: Any) -> None:
    """A record that is not a JSON object raises DecodeError naming page and index."""
    with pytest.raises(DecodeError, match="page 5, record 1"):
        decode_page([PAGE[0], raw], page=5)
