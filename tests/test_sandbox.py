"""The sandbox server, tested with raw aiohttp requests: wire contract, filters, faults, stats."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner

from imichat_async import sandbox
from imichat_async._protocol import (
    DESTINATION_PARAMS,
    PAGE_SIZE,
    PARAM_OPERATORS,
    STATUS_TABLE,
    SUCCESS_CODE,
    TOTAL_HEADER,
)
from imichat_async.sandbox import cli as sandbox_cli
from imichat_async.sandbox.data import ChatFactory, Row, Table, parse_datetime_us
from imichat_async.sandbox.query import make_query, select

UTC = timezone.utc
Filter = tuple[str, str, str]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def headers(sb: sandbox.Sandbox, token: str | None = None) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token or sb.token}",
        "teamid": sb.team_id,
        "Content-Type": "application/json",
    }


def body(filters: list[Filter] | None = None, condition: str = "and") -> dict[str, Any]:
    return {
        "condition": condition,
        "filters": [{"param": p, "operator": o, "value": v} for p, o, v in filters or []],
    }


async def post(
    s: aiohttp.ClientSession,
    sb: sandbox.Sandbox,
    page: int | str | None = 1,
    payload: Any = None,
    hdrs: dict[str, str] | None = None,
    data: bytes | None = None,
) -> tuple[int, Any, dict[str, str]]:
    """POST one search; returns (HTTP status, decoded JSON body or raw text, headers)."""
    params = {} if page is None else {"page": str(page)}
    if data is None:
        data = json.dumps(body() if payload is None else payload).encode()
    async with s.post(sb.search_url, params=params, data=data, headers=hdrs or headers(sb)) as resp:
        raw = await resp.read()
        try:
            doc: Any = json.loads(raw)
        except ValueError:
            doc = raw.decode()
        return resp.status, doc, dict(resp.headers)


def assert_error(status: int, doc: Any, code: int) -> None:
    assert status == STATUS_TABLE[code].http_status
    assert doc["status_code"] == code
    assert doc["response"] is None
    assert isinstance(doc["description"], str) and doc["description"]


async def fetch_all(
    s: aiohttp.ClientSession,
    sb: sandbox.Sandbox,
    filters: list[Filter] | None = None,
    condition: str = "and",
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    page = 1
    while True:
        status, doc, _ = await post(s, sb, page, body(filters, condition))
        assert status == 200 and doc["status_code"] == SUCCESS_CODE
        if not doc["response"]:
            return out
        assert len(doc["response"]) <= PAGE_SIZE
        out.extend(doc["response"])
        page += 1


def _dt(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def brute(chat: dict[str, Any], param: str, op: str, value: str) -> bool:
    """An independent reading of the filter table, on the raw record."""
    if param in ("created_at", "updated_at"):
        a, b = _dt(chat[param]), _dt(value)
        return {"eq": a == b, "lt": a < b, "gt": a > b, "lte": a <= b, "gte": a >= b}[op]
    if param == "status":
        return (chat.get("status") == value) == (op == "eq")
    if param == "tag":
        return value in (chat.get("tag") or [])
    if param in ("channel", "assignee"):
        return bool(chat.get(param) == value)
    if param in DESTINATION_PARAMS:
        return (
            chat.get("channel") == DESTINATION_PARAMS[param] and chat.get("destination_id") == value
        )
    assert param in ("intent", "group")
    details = chat.get("other_details") or {}
    return chat.get("channel") == "abc" and details.get(param) == value


def brute_all(
    data: list[dict[str, Any]], filters: list[Filter], condition: str = "and"
) -> list[dict[str, Any]]:
    combine = all if condition == "and" else any
    return [c for c in data if combine(brute(c, *f) for f in filters)]


# -- paging ------------------------------------------------------------------------------------


async def test_serves_on_loopback_only() -> None:
    """The base URL is http://127.0.0.1:PORT/v3.0 and the token URL hangs off it."""
    async with sandbox.serve(chats=5) as sb:
        assert sb.base_url.startswith("http://127.0.0.1:")
        assert sb.base_url.endswith("/v3.0")
        assert sb.token_url == sb.base_url + "/oauth/token"
        assert sb.port > 0


async def test_paging_walks_every_chat_then_empty(session: aiohttp.ClientSession) -> None:
    """Pages hold 10 chats in server order; past the end is 200 with []; X-Total-Count is sent."""
    async with sandbox.serve(chats=95) as sb:
        seen = []
        for page in range(1, 11):
            status, doc, hdrs = await post(session, sb, page)
            assert status == 200 and doc["status_code"] == SUCCESS_CODE
            assert hdrs[TOTAL_HEADER] == "95"
            assert len(doc["response"]) == (5 if page == 10 else 10)
            seen.extend(doc["response"])
        assert seen == sb.data
        status, doc, _ = await post(session, sb, 11)
        assert status == 200 and doc["response"] == []
        assert sb.stats.requests_by_page[11] == 1


async def test_page_defaults_to_one(session: aiohttp.ClientSession) -> None:
    """A request without ?page= is page 1."""
    async with sandbox.serve(chats=30) as sb:
        _, doc, _ = await post(session, sb, page=None)
        assert doc["response"] == sb.data[:10]


async def test_no_total_header(session: aiohttp.ClientSession) -> None:
    """total_header=False omits X-Total-Count."""
    async with sandbox.serve(chats=30, total_header=False) as sb:
        status, _, hdrs = await post(session, sb)
        assert status == 200 and TOTAL_HEADER not in hdrs


async def test_empty_tenant(session: aiohttp.ClientSession) -> None:
    """A tenant without chats answers page 1 with [] and a total of 0."""
    async with sandbox.serve(chats=0) as sb:
        status, doc, hdrs = await post(session, sb)
        assert status == 200 and doc["response"] == [] and hdrs[TOTAL_HEADER] == "0"


@pytest.mark.parametrize("page", ["0", "-1", "abc", "1.5", ""])
async def test_invalid_page_is_3115(session: aiohttp.ClientSession, page: str) -> None:
    """A page that is not a positive integer answers 3115."""
    async with sandbox.serve(chats=5) as sb:
        assert_error(*(await post(session, sb, page))[:2], 3115)


# -- authentication and validation -------------------------------------------------------------


@pytest.mark.parametrize("drop", ["Authorization", "teamid"])
async def test_missing_header_is_2002(session: aiohttp.ClientSession, drop: str) -> None:
    """A missing Authorization or teamid header answers 2002."""
    async with sandbox.serve(chats=5) as sb:
        hdrs = headers(sb)
        del hdrs[drop]
        assert_error(*(await post(session, sb, hdrs=hdrs))[:2], 2002)


@pytest.mark.parametrize("auth", ["Bearer nope", "Basic abc", "Bearer "])
async def test_unknown_token_is_2003(session: aiohttp.ClientSession, auth: str) -> None:
    """A token the server never issued (or no bearer token) answers 2003."""
    async with sandbox.serve(chats=5) as sb:
        hdrs = headers(sb) | {"Authorization": auth}
        assert_error(*(await post(session, sb, hdrs=hdrs))[:2], 2003)


async def test_wrong_team_is_2010(session: aiohttp.ClientSession) -> None:
    """A valid token with another teamid answers 2010 (HTTP 404)."""
    async with sandbox.serve(chats=5) as sb:
        hdrs = headers(sb) | {"teamid": "someone-else"}
        assert_error(*(await post(session, sb, hdrs=hdrs))[:2], 2010)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_other_methods_are_2099(session: aiohttp.ClientSession, method: str) -> None:
    """Any method but POST on the search path answers 2099 (HTTP 405), with `Allow: POST`."""
    async with (
        sandbox.serve(chats=5) as sb,
        session.request(method, sb.search_url, headers=headers(sb)) as resp,
    ):
        assert_error(resp.status, await resp.json(), 2099)
        assert resp.headers["Allow"] == "POST"  # RFC 9110: a 405 lists the allowed methods


@pytest.mark.parametrize(
    ("content_type", "data"),
    [("application/json", b""), ("text/plain", b"{}"), (None, b"{}")],
)
async def test_missing_body_or_content_type_is_3114(
    session: aiohttp.ClientSession, content_type: str | None, data: bytes
) -> None:
    """An empty body, or a Content-Type that is not JSON, answers 3114."""
    async with sandbox.serve(chats=5) as sb:
        hdrs = headers(sb)
        del hdrs["Content-Type"]
        if content_type:
            hdrs["Content-Type"] = content_type
        assert_error(*(await post(session, sb, hdrs=hdrs, data=data))[:2], 3114)


@pytest.mark.parametrize(
    "data",
    [
        b"{not json",
        b'{"filters": {}}',
        b'{"filters": ["status"]}',
        b'{"filters": [{"param": "status", "operator": "eq"}]}',
        b'{"filters": [{"param": "status", "operator": "eq", "value": 1}]}',
        b'{"condition": 1, "filters": []}',
    ],
)
async def test_malformed_query_is_3451(session: aiohttp.ClientSession, data: bytes) -> None:
    """Unparsable JSON or a body of the wrong shape answers 3451."""
    async with sandbox.serve(chats=5) as sb:
        assert_error(*(await post(session, sb, data=data))[:2], 3451)


@pytest.mark.parametrize("data", [b"[]", b'"filters"', b"3"])
async def test_body_not_an_object_is_3115(session: aiohttp.ClientSession, data: bytes) -> None:
    """A JSON body that is not an object answers 3115."""
    async with sandbox.serve(chats=5) as sb:
        assert_error(*(await post(session, sb, data=data))[:2], 3115)


async def test_unknown_param_is_3445(session: aiohttp.ClientSession) -> None:
    """An unknown param answers 3445, naming the param."""
    async with sandbox.serve(chats=5) as sb:
        status, doc, _ = await post(session, sb, payload=body([("colour", "eq", "red")]))
        assert_error(status, doc, 3445)
        assert doc["description"] == "Provided filtration parameter: colour is not valid"


@pytest.mark.parametrize(("param", "op"), [("status", "gt"), ("tag", "not_eq"), ("mobile", "lt")])
async def test_bad_operator_is_3446(session: aiohttp.ClientSession, param: str, op: str) -> None:
    """An operator outside the param's row answers 3446, naming the param."""
    async with sandbox.serve(chats=5) as sb:
        status, doc, _ = await post(session, sb, payload=body([(param, op, "x")]))
        assert_error(status, doc, 3446)
        assert param in doc["description"]


@pytest.mark.parametrize("condition", ["xor", "AND", ""])
async def test_bad_condition_is_3447(session: aiohttp.ClientSession, condition: str) -> None:
    """A condition other than and/or answers 3447."""
    async with sandbox.serve(chats=5) as sb:
        assert_error(*(await post(session, sb, payload=body([], condition)))[:2], 3447)


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("status", "archived"),
        ("channel", "instagram"),
        ("created_at", "yesterday"),
        ("updated_at", "2024-13-01T00:00:00Z"),
        ("created_at", "2024-05-01T00:00:00"),
    ],
)
async def test_bad_value_is_4303(session: aiohttp.ClientSession, param: str, value: str) -> None:
    """An unknown status or channel, or a bad or zoneless datetime, answers 4303."""
    async with sandbox.serve(chats=5) as sb:
        status, doc, _ = await post(session, sb, payload=body([(param, "eq", value)]))
        assert_error(status, doc, 4303)
        assert doc["description"] == (
            f"Invalid input value:'{value}' provided for filtration parameter:'{param}'"
        )


async def test_validation_order_auth_before_body(session: aiohttp.ClientSession) -> None:
    """A bad token with a bad body answers 2003: authentication is checked first."""
    async with sandbox.serve(chats=5) as sb:
        hdrs = headers(sb, token="nope")
        assert_error(*(await post(session, sb, hdrs=hdrs, data=b"{bad"))[:2], 2003)
        assert sb.stats.errors_by_code == {2003: 1}


# -- filters -----------------------------------------------------------------------------------


def _filter_cases(data: list[dict[str, Any]]) -> list[list[Filter]]:
    """At least one filter per (param, operator), with values that match some chats."""
    mid = data[len(data) // 2]
    first = {c["channel"]: c for c in reversed(data) if c.get("destination_id")}
    abc = next(c for c in data if c["channel"] == "abc" and c.get("other_details"))
    cases: list[list[Filter]] = []
    for param in ("created_at", "updated_at"):
        for op in PARAM_OPERATORS[param]:
            cases.append([(param, op, mid[param])])
    cases += [
        [("status", "eq", "closed")],
        [("status", "not_eq", "closed")],
        [("channel", "eq", "whatsapp")],
        [("tag", "eq", "vip")],
        [("assignee", "eq", next(c["assignee"] for c in data if c.get("assignee")))],
        [("intent", "eq", abc["other_details"]["intent"])],
        [("group", "eq", abc["other_details"]["group"])],
        [("mobile", "eq", first["email"]["destination_id"])],  # wrong channel: nothing
    ]
    for param, channel in DESTINATION_PARAMS.items():
        cases.append([(param, "eq", first[channel]["destination_id"])])
    assert {f[0][0] for f in cases} == set(PARAM_OPERATORS)
    return cases


async def test_every_param_filter_matches_brute_force(session: aiohttp.ClientSession) -> None:
    """Each param and operator filters exactly as a brute-force reading of the vendor's table."""
    async with sandbox.serve(chats=400, seed=3) as sb:
        cases = _filter_cases(sb.data)
        matched = 0
        for filters in cases:
            want = brute_all(sb.data, filters)
            assert sb.expected(filters) == want, filters
            _, doc, hdrs = await post(session, sb, 1, body(filters))
            assert doc["response"] == want[:10], filters
            matched += bool(want)
            assert hdrs[TOTAL_HEADER] == str(len(want))
        assert matched == len(cases) - 1  # all but the wrong-channel case match some chats
        got = await fetch_all(session, sb, [("channel", "eq", "sms")])
        assert got == brute_all(sb.data, [("channel", "eq", "sms")])
        assert len(got) > 10


async def test_intent_matches_abc_chats_only() -> None:
    """An intent filter ignores the intent other channels may carry in other_details."""
    async with sandbox.serve(chats=2000) as sb:
        livechat = [
            c
            for c in sb.data
            if c["channel"] == "livechat" and (c.get("other_details") or {}).get("intent")
        ]
        assert livechat
        intent = livechat[0]["other_details"]["intent"]
        got = sb.expected([("intent", "eq", intent)])
        assert got and all(c["channel"] == "abc" for c in got)


async def test_conditions_and_ranges(session: aiohttp.ClientSession) -> None:
    """`and` needs every filter, `or` any; two filters on one param make a time range."""
    async with sandbox.serve(chats=300, seed=1) as sb:
        times = sorted(c["created_at"] for c in sb.data)
        lo, hi = times[50], times[150]
        cases: list[tuple[list[Filter], str]] = [
            ([("created_at", "gte", lo), ("created_at", "lt", hi)], "and"),
            ([("status", "eq", "queued"), ("channel", "eq", "email")], "or"),
            ([("status", "eq", "closed"), ("tag", "eq", "refund")], "and"),
        ]
        for filters, condition in cases:
            want = brute_all(sb.data, filters, condition)
            assert await fetch_all(session, sb, filters, condition) == want
        ranged = sb.expected(cases[0][0])
        assert len(ranged) == 100


async def test_empty_or_missing_filters_mean_all(session: aiohttp.ClientSession) -> None:
    """No filters (empty list, missing key, or `or` with none) is every chat."""
    async with sandbox.serve(chats=25) as sb:
        payloads: list[dict[str, Any]] = [{"filters": []}, {}, {"condition": "or", "filters": []}]
        for payload in payloads:
            _, _, hdrs = await post(session, sb, 1, payload)
            assert hdrs[TOTAL_HEADER] == "25"
        assert sb.expected() == sb.data


async def test_datetime_values_with_fractions_and_offsets() -> None:
    """Datetime values may carry fractional seconds or an offset; equal instants match."""
    async with sandbox.serve(chats=50) as sb:
        chat = sb.data[7]
        instant = _dt(chat["created_at"])
        plus2 = instant.astimezone(timezone(timedelta(hours=2)))
        for value in (
            chat["created_at"],
            plus2.isoformat(),
            instant.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        ):
            assert chat in sb.expected([("created_at", "eq", value)]), value


def test_parse_datetime_us() -> None:
    """The server's datetime parser: Z, offsets, fractions; zoneless and garbage refused."""
    assert parse_datetime_us("1970-01-01T00:00:01Z") == 1_000_000
    assert parse_datetime_us("1970-01-01T01:00:01.5+01:00") == 1_500_000
    assert parse_datetime_us("1970-01-01T00:00:00.000001Z") == 1
    assert parse_datetime_us("1970-01-01T00:00:00") is None
    assert parse_datetime_us("1970-02-30T00:00:00Z") is None
    assert parse_datetime_us("soon") is None


async def test_expected_refuses_bad_filters() -> None:
    """`expected` validates like the server: a bad param raises QueryError with its code."""
    async with sandbox.serve(chats=5) as sb:
        with pytest.raises(sandbox.QueryError) as info:
            sb.expected([("nope", "eq", "x")])
        assert info.value.code == 3445
        with pytest.raises(ValueError):
            sb.expected([], condition="nand")


# -- data --------------------------------------------------------------------------------------


async def test_data_is_deterministic_from_seed() -> None:
    """The same seed gives the same chats and team; another seed gives others."""
    async with (
        sandbox.serve(chats=200, seed=7) as a,
        sandbox.serve(chats=200, seed=7) as b,
        sandbox.serve(chats=200, seed=8) as c,
    ):
        assert a.data == b.data and a.team_id == b.team_id
        assert a.data != c.data
        assert a.token != b.token


async def test_server_order_newest_first() -> None:
    """Chats are served newest created_at first, ties broken by chat_id."""
    async with sandbox.serve(chats=1000) as sb:
        keys = [(-_dt(c["created_at"]).timestamp(), c["chat_id"]) for c in sb.data]
        assert keys == sorted(keys)
        assert all(_dt(c["updated_at"]) >= _dt(c["created_at"]) for c in sb.data)
        span = _dt(sb.data[0]["created_at"]) - _dt(sb.data[-1]["created_at"])
        assert span.days > 300
        assert _dt(sb.data[0]["created_at"]) <= sandbox.END


async def test_data_is_realistic_and_quirky() -> None:
    """Every status and channel occurs, asset ids fit their channel, and each quirk appears."""
    async with sandbox.serve(chats=3000) as sb:
        data = sb.data
        statuses = {c["status"] for c in data}
        channels = {c["channel"] for c in data}
        assert statuses == {"queued", "picked", "onhold", "closed", "archived"}
        assert channels >= {"sms", "facebook", "twitter", "livechat", "email", "abc"}
        assert channels >= {"whatsapp", "api", "instagram"}
        for c in data:
            asset = c.get("asset")
            if not asset:
                continue
            if c["channel"] in ("email", "api", "abc", "whatsapp"):
                assert isinstance(asset["id"], str)
            if c["channel"] == "email":
                assert "@" in asset["id"] and "@" in c["destination_id"]
            if c["channel"] == "sms":
                assert c["destination_id"].startswith("+")
            if c["status"] == "queued" and "assignee" in c:
                assert c["assignee"] is None
        assert any(
            c["channel"] in ("sms", "facebook", "twitter", "livechat")
            and isinstance((c.get("asset") or {}).get("id"), str)
            and c["asset"]["id"].startswith("0")
            for c in data
        )
        assert any("tag" not in c for c in data)
        assert any(c.get("tag") == [] for c in data)
        assert any("priority" in c for c in data)  # unknown extra fields
        assert any(any(k not in c for k in ("alias_id", "flag", "customer_id")) for c in data)
        assert any(c.get("asset", {}) is None or c.get("other_details", {}) is None for c in data)
        assert any("." in c["created_at"] for c in data)
        assert all(c["created_at"].endswith("Z") for c in data)
        json.dumps(data)


async def test_insert_chats_goes_to_the_head_and_shifts_pages(
    session: aiohttp.ClientSession,
) -> None:
    """insert_chats puts newer chats first, so every page shifts by the number inserted."""
    async with sandbox.serve(chats=40) as sb:
        _, before, _ = await post(session, sb, 1)
        new = sb.insert_chats(3)
        assert len(new) == 3 and sb.data[:3] == new and len(sb.data) == 43
        assert _dt(new[-1]["created_at"]) > _dt(before["response"][0]["created_at"])
        assert _dt(new[0]["created_at"]) > _dt(new[-1]["created_at"])
        _, after, hdrs = await post(session, sb, 1)
        assert after["response"][3:] == before["response"][:7]
        assert hdrs[TOTAL_HEADER] == "43"
        assert sb.stats.inserted == 3


async def test_insert_every(session: aiohttp.ClientSession) -> None:
    """insert_every=N inserts one chat at the head every N valid searches."""
    async with sandbox.serve(chats=20, insert_every=2) as sb:
        head = sb.data[0]
        for _ in range(4):
            await post(session, sb, 1)
        await post(session, sb, 1, hdrs=headers(sb, token="bad"))  # refused: not counted
        assert len(sb.data) == 22 and sb.data[2] == head


# -- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["2007", "3454"])
async def test_vendor_500_faults(session: aiohttp.ClientSession, kind: str) -> None:
    """A 2007 or 3454 fault answers HTTP 500 with the vendor's body."""
    async with sandbox.serve(chats=20, fault_pages={1: kind}) as sb:
        status, doc, _ = await post(session, sb, 1)
        assert_error(status, doc, int(kind))
        assert sb.stats.faults == {kind: 1}


@pytest.mark.parametrize("retry_after", [None, 0, 2.5])
async def test_429_fault_with_or_without_retry_after(
    session: aiohttp.ClientSession, retry_after: float | None
) -> None:
    """A 429 fault sends Retry-After when retry_after is set, none when it is None."""
    async with sandbox.serve(chats=20, p_429=1.0, retry_after=retry_after) as sb:
        status, _, hdrs = await post(session, sb, 1)
        assert status == 429
        if retry_after is None:
            assert "Retry-After" not in hdrs
        else:
            assert float(hdrs["Retry-After"]) == retry_after
        assert sb.stats.faults["429"] == 1 and sb.stats.errors_by_code[429] == 1


async def test_gateway_faults(session: aiohttp.ClientSession) -> None:
    """502 and 504 answer an HTML page, 503 an empty body."""
    async with sandbox.serve(chats=20, fault_pages={1: "502", 2: "503", 3: "504"}) as sb:
        for page, code in ((1, 502), (2, 503), (3, 504)):
            async with session.post(
                sb.search_url, params={"page": page}, json={}, headers=headers(sb)
            ) as resp:
                text = await resp.text()
                assert resp.status == code
                if code == 503:
                    assert text == ""
                else:
                    assert resp.content_type == "text/html" and str(code) in text
        assert sb.stats.faults == {"502": 1, "503": 1, "504": 1}


async def test_reset_drops_the_connection(session: aiohttp.ClientSession) -> None:
    """A reset fault closes the connection without any answer."""
    async with sandbox.serve(chats=20, p_reset=1.0) as sb:
        with pytest.raises(aiohttp.ClientError):
            await post(session, sb, 1)
        assert sb.stats.faults["reset"] == 1


async def test_hang_then_drop(session: aiohttp.ClientSession) -> None:
    """A hang fault answers nothing for hang_seconds, then drops the connection."""
    async with sandbox.serve(chats=20, fault_pages={1: "hang"}, hang_seconds=0.03) as sb:
        with pytest.raises(aiohttp.ClientError):
            await post(session, sb, 1)
        assert sb.stats.faults["hang"] == 1
        assert (await post(session, sb, 1))[0] == 200  # the retry succeeds


async def test_hang_ends_when_the_sandbox_closes(session: aiohttp.ClientSession) -> None:
    """A client timing out on a hang leaves nothing behind: closing the sandbox ends the hang."""
    async with sandbox.serve(chats=20, p_hang=1.0) as sb:
        with pytest.raises(asyncio.TimeoutError):
            async with session.post(
                sb.search_url,
                json={},
                headers=headers(sb),
                timeout=aiohttp.ClientTimeout(total=0.03),
            ):
                pass
        assert sb.stats.in_flight == 1
    assert sb.stats.in_flight == 0


async def test_fault_pages_fire_on_the_first_request_only(
    session: aiohttp.ClientSession,
) -> None:
    """A fault_pages entry strikes the first request of its page; the retry succeeds."""
    async with sandbox.serve(chats=50, fault_pages={2: "3454"}) as sb:
        assert (await post(session, sb, 1))[0] == 200
        assert (await post(session, sb, 2))[0] == 500
        status, doc, _ = await post(session, sb, 2)
        assert status == 200 and doc["response"] == sb.data[10:20]
        assert sb.faults.fault_pages == {}
        assert sb.stats.requests_by_page == {1: 1, 2: 2}
        sb.faults.fault_pages = {2: "2007"}  # re-armed by assignment
        assert (await post(session, sb, 2))[0] == 500


@pytest.mark.parametrize("kind", sandbox.FAULT_KINDS)
async def test_each_probabilistic_fault_fires_and_is_counted(
    session: aiohttp.ClientSession, kind: str
) -> None:
    """p_<kind>=1 strikes every valid request, and stats.faults counts it by kind."""
    knobs: dict[str, Any] = {f"p_{kind}": 1.0, "hang_seconds": 0.01}
    async with sandbox.serve(chats=20, **knobs) as sb:
        for _ in range(2):
            try:
                status = (await post(session, sb, 1))[0]
            except aiohttp.ClientError:
                status = 0
            assert status != 200
        assert sb.stats.faults == {kind: 2}


async def test_faults_never_hit_refused_requests(session: aiohttp.ClientSession) -> None:
    """A request refused by authentication or validation never draws a fault."""
    async with sandbox.serve(chats=20, p_2007=1.0, fault_pages={1: "502"}) as sb:
        assert_error(*(await post(session, sb, 1, hdrs=headers(sb, "bad")))[:2], 2003)
        bad = body([("colour", "eq", "x")])
        assert_error(*(await post(session, sb, 1, bad))[:2], 3445)
        assert sb.stats.faults == {}
        assert (await post(session, sb, 1))[0] == 502


async def test_fault_rates_are_roughly_honoured(session: aiohttp.ClientSession) -> None:
    """Mixed probabilities inject about the asked share of faults, deterministically per seed."""
    counts = []
    for _ in range(2):
        async with sandbox.serve(chats=20, seed=5, p_2007=0.2, p_503=0.2) as sb:
            statuses = [(await post(session, sb, 1))[0] for _ in range(100)]
            counts.append((statuses.count(500), statuses.count(503)))
            assert sum(sb.stats.faults.values()) == 100 - statuses.count(200)
    assert counts[0] == counts[1]
    assert 5 < counts[0][0] < 40 and 5 < counts[0][1] < 40


async def test_latency_knobs_still_answer(session: aiohttp.ClientSession) -> None:
    """latency, jitter and latency_per_page delay but do not change answers."""
    async with sandbox.serve(chats=30, latency=0.005, jitter=0.005, latency_per_page=0.002) as sb:
        _, doc, _ = await post(session, sb, 2)
        assert doc["response"] == sb.data[10:20]


async def test_max_in_flight_throttles_and_peak_is_counted(
    session: aiohttp.ClientSession,
) -> None:
    """Above max_in_flight requests get 429; peak_in_flight records the concurrency seen."""
    async with sandbox.serve(chats=30, latency=0.04, max_in_flight=2, retry_after=0) as sb:
        results = await asyncio.gather(*(post(session, sb, 1) for _ in range(6)))
        statuses = sorted(r[0] for r in results)
        assert set(statuses) == {200, 429} and statuses.count(200) >= 2
        assert sb.stats.peak_in_flight >= 3  # all 6 unless the machine is very slow
        assert sb.stats.in_flight == 0
        assert sb.stats.throttled == statuses.count(429) == sb.stats.faults["429"]


def test_faults_validate_their_knobs() -> None:
    """Faults refuses a probability above 1, a negative latency and an unknown fault kind."""
    with pytest.raises(ValueError):
        sandbox.Faults(p_429=1.5)
    with pytest.raises(ValueError):
        sandbox.Faults(latency=-1)
    with pytest.raises(ValueError):
        sandbox.Faults(fault_pages={1: "teapot"})
    f = sandbox.Faults()
    with pytest.raises(ValueError):
        f.p_2007 = 2.0


async def test_serve_merges_fault_keywords() -> None:
    """serve() takes Faults fields as keywords over `faults`; other keywords are refused."""
    base = sandbox.Faults(latency=0.01)
    async with sandbox.serve(chats=1, faults=base, p_429=0.5) as sb:
        assert sb.faults.latency == 0.01 and sb.faults.p_429 == 0.5
        assert base.p_429 == 0
    async with sandbox.serve(chats=1, faults=base) as sb:
        assert sb.faults is base
    with pytest.raises(TypeError):
        async with sandbox.serve(chats=1, colour="red"):
            pass


# -- tokens ------------------------------------------------------------------------------------


async def test_token_max_uses_expire_with_2004(session: aiohttp.ClientSession) -> None:
    """A token past token_max_uses answers 2004; a new token works and is counted."""
    async with sandbox.serve(chats=20, token_max_uses=2) as sb:
        assert (await post(session, sb, 1))[0] == 200
        assert (await post(session, sb, 1))[0] == 200
        assert_error(*(await post(session, sb, 1))[:2], 2004)
        fresh = await sb.new_token()
        assert (await post(session, sb, 1, hdrs=headers(sb, fresh)))[0] == 200
        assert sb.stats.expired_hits == 1
        assert sb.stats.tokens_issued == 1
        assert sb.stats.errors_by_code == {2004: 1}


async def test_token_ttl_expires(session: aiohttp.ClientSession) -> None:
    """A token older than token_ttl seconds answers 2004."""
    async with sandbox.serve(chats=20, token_ttl=0.02) as sb:
        await asyncio.sleep(0.03)
        assert_error(*(await post(session, sb, 1))[:2], 2004)
        assert (await post(session, sb, 1, hdrs=headers(sb, await sb.new_token())))[0] == 200


async def test_expire_token_by_hand(session: aiohttp.ClientSession) -> None:
    """expire_token() makes the tokens issued so far answer 2004."""
    async with sandbox.serve(chats=20) as sb:
        sb.expire_token()
        assert_error(*(await post(session, sb, 1))[:2], 2004)


async def test_token_endpoint(session: aiohttp.ClientSession) -> None:
    """POST to token_url issues a working token; other methods answer 2099 with `Allow: POST`."""
    async with sandbox.serve(chats=20, token_ttl=60) as sb:
        async with session.post(sb.token_url) as resp:
            doc = await resp.json()
        assert resp.status == 200 and doc["expires_in"] == 60
        assert (await post(session, sb, 1, hdrs=headers(sb, doc["access_token"])))[0] == 200
        assert sb.stats.tokens_issued == 1
        for method in ("GET", "PUT", "DELETE"):
            async with session.request(method, sb.token_url) as resp:
                assert_error(resp.status, await resp.json(), 2099)
                assert resp.headers["Allow"] == "POST"


# -- stats, app, command line ------------------------------------------------------------------


async def test_stats_reset_keeps_tokens(session: aiohttp.ClientSession) -> None:
    """Stats.reset zeroes the counters and leaves tokens valid."""
    async with sandbox.serve(chats=20) as sb:
        await post(session, sb, 1)
        await post(session, sb, 1, hdrs=headers(sb, "bad"))
        assert sb.stats.requests_total == 2 and sb.stats.peak_in_flight == 1
        sb.stats.reset()
        assert sb.stats == sandbox.Stats()
        assert (await post(session, sb, 3))[0] == 200
        assert sb.stats.requests_by_page == {3: 1}


def test_make_app_builds_an_application() -> None:
    """make_app returns the aiohttp application, the sandbox stored at SANDBOX_KEY."""
    app = sandbox.make_app(chats=3, seed=1)
    assert isinstance(app, web.Application)
    assert len(app[sandbox.SANDBOX_KEY].data) == 3


@pytest.mark.slow
async def test_command_line_serves_and_stops_on_sigterm() -> None:
    """`python -m imichat_async.sandbox` prints base_url, team_id, token, then the same as
    IMICHAT_* lines; SIGTERM stops it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imichat_async.sandbox",
        "--port",
        "0",
        "--chats",
        "30",
        "--no-total",
        "--fault-page",
        "2=503",
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        lines = [(await asyncio.wait_for(proc.stdout.readline(), 20)).decode() for _ in range(6)]
        info = dict(line.strip().split("=", 1) for line in lines)
        assert info["base_url"].startswith("http://127.0.0.1:")
        assert (info["IMICHAT_BASE_URL"], info["IMICHAT_TEAM_ID"], info["IMICHAT_TOKEN"]) == (
            info["base_url"],
            info["team_id"],
            info["token"],
        )
        hdrs = {"Authorization": f"Bearer {info['token']}", "teamid": info["team_id"]}
        async with aiohttp.ClientSession(headers=hdrs) as s:
            url = info["base_url"] + "/chats/search"
            async with s.post(url, json={}) as resp:
                assert resp.status == 200 and TOTAL_HEADER not in resp.headers
                assert len((await resp.json())["response"]) == 10
            async with s.post(url, params={"page": "2"}, json={}) as resp:
                assert resp.status == 503
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


# -- odd requests answered in the vendor's JSON form -------------------------------------------


async def test_page_of_5000_digits_is_3115_after_auth(session: aiohttp.ClientSession) -> None:
    """A page of 5,000 digits answers 3115 (not a 500), and only after the token check."""
    async with sandbox.serve(chats=5) as sb:
        huge = "9" * 5000
        assert_error(*(await post(session, sb, huge))[:2], 3115)
        assert_error(*(await post(session, sb, huge, hdrs=headers(sb, "nope")))[:2], 2003)
        assert sb.stats.errors_by_code == {3115: 1, 2003: 1}


async def test_page_bounds_are_a_64_bit_integer(session: aiohttp.ClientSession) -> None:
    """Pages up to 2**63 - 1 are pages (past the end: []); 2**63 is 3115; leading zeros are fine."""
    async with sandbox.serve(chats=15) as sb:
        status, doc, _ = await post(session, sb, str(2**63 - 1))
        assert status == 200 and doc["response"] == []
        assert_error(*(await post(session, sb, str(2**63)))[:2], 3115)
        _, doc, _ = await post(session, sb, "0002")
        assert doc["response"] == sb.data[10:15]


async def test_body_over_the_limit_is_3115_json(session: aiohttp.ClientSession) -> None:
    """A body over 1 MiB answers 3115 in the vendor's JSON form, not aiohttp's plain-text 413."""
    async with sandbox.serve(chats=5) as sb:
        big = json.dumps({"filters": [], "pad": "x" * (1024 * 1024)}).encode()
        async with session.post(sb.search_url, data=io.BytesIO(big), headers=headers(sb)) as resp:
            assert resp.content_type == "application/json"
            assert_error(resp.status, await resp.json(), 3115)


@pytest.mark.parametrize(
    ("method", "path", "api"),
    [
        ("POST", "/v3.0/chats", True),
        ("GET", "/v3.0/", True),
        ("POST", "/v3.0/chats/search/x", True),
        ("POST", "/chats/search", False),
        ("GET", "/", False),
        ("PUT", "/v2/a", False),
        ("POST", "/v3.0", False),
    ],
)
async def test_unknown_path_is_404(
    session: aiohttp.ClientSession, method: str, path: str, api: bool
) -> None:
    """An unknown path under /v3.0/ answers the API's 404 in the vendor's JSON form; outside
    it (a base URL without /v3.0) the front server's HTML 404, without that body (issue #25)."""
    async with sandbox.serve(chats=5) as sb:
        url = f"http://127.0.0.1:{sb.port}{path}"
        async with session.request(method, url, headers=headers(sb)) as resp:
            assert resp.status == 404
            assert resp.content_type == ("application/json" if api else "text/html")
            text = await resp.text()
        if api:
            assert json.loads(text) == {
                "status_code": 404,
                "description": f"No such resource: {method} {path}",
                "response": None,
            }
        else:
            assert "404 Not Found" in text and "status_code" not in text
        assert sb.stats.errors_by_code[404] == 1 and sb.stats.requests_total == 0


class _WatchedSandbox(sandbox.Sandbox):
    """A sandbox telling when a search request starts and when its handler is done."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entered = asyncio.Event()
        self.done = asyncio.Event()

    async def handle_search(self, request: web.Request) -> web.StreamResponse:
        self.entered.set()
        try:
            return await super().handle_search(request)
        finally:
            self.done.set()


async def test_a_client_hanging_up_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A client closing its connection while its request waits leaves no log record at all."""
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    async with _WatchedSandbox(chats=5, faults=sandbox.Faults(latency=0.05)) as sb:
        assert isinstance(sb, _WatchedSandbox)
        payload = json.dumps(body()).encode()
        request = (
            f"POST /v3.0/chats/search?page=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {sb.token}\r\nteamid: {sb.team_id}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        for _ in range(3):
            sb.entered.clear()
            sb.done.clear()
            _, writer = await asyncio.open_connection("127.0.0.1", sb.port)
            writer.write(request + payload)
            await writer.drain()
            await sb.entered.wait()  # the server has the request and sleeps its latency
            writer.close()
            await writer.wait_closed()
            await sb.done.wait()  # it woke, found the client gone, and returned
        assert sb.stats.requests_total == 3
    noisy = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert noisy == [], [r.getMessage() for r in noisy]


# -- rate limit --------------------------------------------------------------------------------


class FakeClock:
    """A clock that moves only when told: `clock.now += 0.5`."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_rate_limit_admits_the_burst_then_429s(session: aiohttp.ClientSession) -> None:
    """A bucket of 5 at 2/s admits exactly 5, then 429 + Retry-After 1; a second refills 2."""
    clock = FakeClock()
    async with sandbox.serve(chats=20, rate_limit=2, rate_burst=5, clock=clock) as sb:
        answers = [await post(session, sb, 1) for _ in range(8)]
        assert [a[0] for a in answers] == [200] * 5 + [429] * 3
        assert all(a[2]["Retry-After"] == "1" for a in answers[5:])
        assert answers[5][1] == {"message": "Too Many Requests"}
        clock.now += 1.0
        assert [(await post(session, sb, 1))[0] for _ in range(3)] == [200, 200, 429]
        stats = sb.stats
        assert stats.rate_limited == stats.throttled == stats.errors_by_code[429] == 4
        assert stats.requests_total == 11 and stats.requests_by_page[1] == 11
        assert not stats.faults


async def test_rate_limit_retry_after_is_whole_seconds_rounded_up(
    session: aiohttp.ClientSession,
) -> None:
    """At 0.25/s an empty bucket says Retry-After 4; a second later 3; never below 1."""
    clock = FakeClock()
    async with sandbox.serve(chats=5, rate_limit=0.25, rate_burst=1, clock=clock) as sb:
        assert (await post(session, sb, 1))[0] == 200
        assert (await post(session, sb, 1))[2]["Retry-After"] == "4"
        clock.now += 1.0
        assert (await post(session, sb, 1))[2]["Retry-After"] == "3"
        clock.now += 2.9
        assert (await post(session, sb, 1))[2]["Retry-After"] == "1"  # 0.4 s left
        clock.now += 0.1
        assert (await post(session, sb, 1))[0] == 200


async def test_rate_limit_comes_before_auth_and_defaults_burst(
    session: aiohttp.ClientSession,
) -> None:
    """The bucket (default size: one second of the rate, rounded up) counts refused requests too."""
    clock = FakeClock()
    async with sandbox.serve(chats=5, rate_limit=2.5, clock=clock) as sb:
        bad = headers(sb, "nope")
        statuses = [(await post(session, sb, 1, hdrs=bad))[0] for _ in range(4)]
        assert statuses == [400, 400, 400, 429]
        sb.faults.rate_limit = 1  # new knobs: a full bucket of 1
        assert [(await post(session, sb, 1))[0] for _ in range(2)] == [200, 429]
        assert sb.stats.rate_limited == 2


def test_rate_limit_knobs_are_validated() -> None:
    """rate_limit must be > 0 and rate_burst >= 1."""
    for knobs in ({"rate_limit": 0}, {"rate_limit": -1.0}, {"rate_burst": 0}):
        with pytest.raises(ValueError):
            sandbox.Faults(**knobs)


# -- indexed time ranges -----------------------------------------------------------------------


def _random_filters(rng: random.Random, data: list[dict[str, Any]]) -> list[Filter]:
    """One to four filters, mostly time bounds (several on one param), some other params."""
    filters: list[Filter] = []
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.8:
            param = rng.choice(["created_at", "updated_at"])
            op = rng.choice(PARAM_OPERATORS[param])
            filters.append((param, op, rng.choice(data)[param]))
        elif roll < 0.9:
            filters.append(("status", rng.choice(["eq", "not_eq"]), "closed"))
        else:
            filters.append(("channel", "eq", rng.choice(["sms", "email", "whatsapp"])))
    return filters


async def test_time_ranges_match_a_full_scan_in_order() -> None:
    """Indexed answers equal a brute-force scan, same order, before and after the data changes."""
    clock = FakeClock(datetime(2025, 3, 1, tzinfo=UTC).timestamp())
    rng = random.Random(11)
    async with sandbox.serve(chats=600, seed=4, wall_clock=clock) as sb:
        for round_ in range(3):
            for _ in range(150):
                filters = _random_filters(rng, sb.data)
                condition = "or" if rng.random() < 0.2 else "and"
                want = brute_all(sb.data, filters, condition)
                assert sb.expected(filters, condition) == want, (filters, condition)
            clock.now += 3600 * (round_ + 1)
            sb.churn(updates=60, inserts=5)


def test_a_narrow_time_range_reads_only_its_range() -> None:
    """A created_at or updated_at range never walks every row: only the range's candidates."""

    class NoScan(list[Row]):
        def __iter__(self) -> Iterator[Row]:
            raise AssertionError("the whole table was scanned")

    chats, rows = ChatFactory(2).generate(300)
    table = Table(chats, rows)
    table.rows = NoScan(rows)  # built; from here on, walking every row fails
    mid = chats[150]
    for filters in (
        [("created_at", "gte", mid["created_at"]), ("status", "eq", "closed")],
        [("updated_at", "lt", mid["updated_at"]), ("created_at", "gt", chats[250]["created_at"])],
    ):
        got = select(table, make_query(filters))
        assert got == brute_all(chats, filters)
    with pytest.raises(AssertionError, match="scanned"):
        select(table, make_query([("status", "eq", "closed")]))  # no range: a scan


# -- data that changes -------------------------------------------------------------------------


def _utc(value: str) -> datetime:
    assert value.endswith("Z")
    return _dt(value)


async def test_update_chat_makes_strictly_newer_versions(session: aiohttp.ClientSession) -> None:
    """Each version has a new status and a later updated_at (Z, ms), even if the clock stalls."""
    frozen = datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    clock = FakeClock(frozen.timestamp())
    async with sandbox.serve(chats=40, wall_clock=clock) as sb:
        at = 17
        old = sb.data[at]
        versions = [old]
        for _ in range(3):
            versions.append(sb.update_chat(old["chat_id"]))
        clock.now -= 60  # the wall clock steps back: versions still move forward
        versions.append(sb.update_chat(old["chat_id"], status="onhold"))
        stamps = [_utc(v["updated_at"]) for v in versions]
        assert stamps[1] == frozen.replace(microsecond=123000)
        assert all(b - a >= timedelta(milliseconds=1) for a, b in itertools.pairwise(stamps))
        assert stamps[-1] - stamps[1] == timedelta(milliseconds=3)
        assert all(a["status"] != b["status"] for a, b in itertools.pairwise(versions[:-1]))
        assert versions[-1]["status"] == "onhold"
        assert sb.data[at] is versions[-1] and sb.data[at]["created_at"] == old["created_at"]
        assert old is versions[0] and old["updated_at"] != versions[-1]["updated_at"]  # not mutated
        assert sb.current_records()[old["chat_id"]] == versions[-1]
        assert sb.stats.updated == 4
        newest = versions[-1]["updated_at"]
        _, doc, hdrs = await post(session, sb, 1, body([("updated_at", "gte", newest)]))
        assert doc["response"] == [versions[-1]] and hdrs[TOTAL_HEADER] == "1"
        with pytest.raises(KeyError):
            sb.update_chat("no-such-chat")


async def test_churn_updates_busy_chats_and_inserts_new_ones_at_the_head() -> None:
    """Updates mostly hit a small hot set, again and again; new chats are created now, first."""
    now = datetime(2026, 6, 1, tzinfo=UTC)
    clock = FakeClock(now.timestamp())
    async with sandbox.serve(chats=1000, seed=2, wall_clock=clock) as sb:
        result = sb.churn(updates=200, inserts=5)
        hits = Counter(c["chat_id"] for c in result.updated)
        assert sum(hits.values()) == 200
        assert len(hits) < 100 and hits.most_common(1)[0][1] >= 5
        assert len(result.inserted) == 5 and len(sb.data) == 1005
        for chat in result.inserted:
            assert chat["created_at"] == chat["updated_at"] == "2026-06-01T00:00:00Z"
        assert {c["chat_id"] for c in sb.data[:5]} == {c["chat_id"] for c in result.inserted}
        keys = [(-_dt(c["created_at"]).timestamp(), c["chat_id"]) for c in sb.data]
        assert keys == sorted(keys)
        assert sb.stats.updated == 200 and sb.stats.inserted == 5
        again = sb.churn(updates=50)
        assert set(c["chat_id"] for c in again.updated) & {c["chat_id"] for c in result.inserted}


async def test_inserted_chats_go_where_the_order_puts_them() -> None:
    """A chat created at a time older than the newest chats lands in the middle, not the head."""
    clock = FakeClock(datetime(2024, 7, 1, tzinfo=UTC).timestamp())
    async with sandbox.serve(chats=200, seed=3, wall_clock=clock) as sb:
        (new,) = sb.churn(inserts=1).inserted
        at = sb.data.index(new)
        assert 0 < at < 199
        assert _dt(sb.data[at - 1]["created_at"]) >= _dt(new["created_at"])
        assert _dt(sb.data[at + 1]["created_at"]) <= _dt(new["created_at"])


async def test_change_log_newest_versions_equal_current_records() -> None:
    """Every version churn makes, newest per chat, is the sandbox's current record; none repeat."""
    clock = FakeClock(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
    async with sandbox.serve(chats=300, seed=6, wall_clock=clock) as sb:
        log = list(sb.data)
        for _ in range(5):
            clock.now += 0.0004  # less than a millisecond: versions must still differ
            made = sb.churn(updates=40, inserts=3)
            log += made.updated + made.inserted
        versions = [(c["chat_id"], c["updated_at"]) for c in log]
        assert len(versions) == len(set(versions))
        newest: dict[str, dict[str, Any]] = {}
        for chat in log:
            seen = newest.get(chat["chat_id"])
            if seen is None or _dt(chat["updated_at"]) > _dt(seen["updated_at"]):
                newest[chat["chat_id"]] = chat
        assert newest == sb.current_records()
        assert len(newest) == 315


async def test_churn_every_knob_and_pages_follow_the_changes(
    session: aiohttp.ClientSession,
) -> None:
    """churn_every=N churns every N valid searches; cached pages never serve old data."""
    async with sandbox.serve(chats=50, churn_every=3, churn_updates=2, churn_inserts=1) as sb:
        closed = body([("status", "eq", "closed")])
        for _ in range(9):
            await post(session, sb, 1, closed)
        await post(session, sb, 1, closed, hdrs=headers(sb, "bad"))  # refused: not counted
        assert (sb.stats.updated, sb.stats.inserted, len(sb.data)) == (6, 3, 53)
        sb.faults.churn_every = None
        _, before, _ = await post(session, sb, 1, closed)
        target = before["response"][0]["chat_id"]
        sb.update_chat(target, status="queued")
        _, after, hdrs = await post(session, sb, 1, closed)
        assert target not in [c["chat_id"] for c in after["response"]]
        assert after["response"] == sb.expected([("status", "eq", "closed")])[:10]
        assert hdrs[TOTAL_HEADER] == str(len(sb.expected([("status", "eq", "closed")])))


async def test_churn_on_an_empty_tenant_only_inserts() -> None:
    """With no chats there is nothing to update; inserts still happen; negative counts refused."""
    async with sandbox.serve(chats=0) as sb:
        made = sb.churn(updates=3, inserts=2)
        assert made.updated == [] and len(made.inserted) == 2 and len(sb.data) == 2
        with pytest.raises(ValueError):
            sb.churn(updates=-1)


def test_command_line_passes_rate_and_churn_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """`sandbox --rate-limit --rate-burst --churn-*` become the served Faults."""
    seen: list[sandbox.Faults] = []

    async def fake_serve(*args: Any) -> None:
        seen.extend(a for a in args if isinstance(a, sandbox.Faults))

    monkeypatch.setattr(sandbox_cli, "_serve", fake_serve)
    argv = "--rate-limit 100 --rate-burst 25 --churn-every 7 --churn-updates 3 --churn-inserts 2"
    result = CliRunner().invoke(sandbox_cli.sandbox_command, argv.split())
    assert result.exit_code == 0, result.output
    (faults,) = seen
    assert (faults.rate_limit, faults.rate_burst) == (100, 25)
    assert (faults.churn_every, faults.churn_updates, faults.churn_inserts) == (7, 3, 2)
    bad = CliRunner().invoke(sandbox_cli.sandbox_command, ["--rate-limit", "0"])
    assert bad.exit_code == 2


def test_command_line_passes_the_clock_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    """`sandbox --clock-offset -3600` serves a tenant whose clock is an hour behind."""
    seen: list[Any] = []

    async def fake_serve(*args: Any) -> None:
        seen.extend(args)

    monkeypatch.setattr(sandbox_cli, "_serve", fake_serve)
    result = CliRunner().invoke(sandbox_cli.sandbox_command, ["--clock-offset", "-3600"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == -3600.0
