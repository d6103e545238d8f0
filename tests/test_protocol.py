"""The pure wire module: request building and response classification, table-driven."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imichat_async import _errors as e
from imichat_async import _protocol as protocol

SAMPLES = Path(__file__).parent / "samples"
STATUS_ROWS: list[dict[str, Any]] = json.loads((SAMPLES / "status_codes.json").read_text())
GATEWAY_HTML = (SAMPLES / "gateway_502.html").read_bytes()
PAGE_QUIRKS = (SAMPLES / "page_quirks.json").read_bytes()
TOKEN = "tok-SECRET-8f2c1b"

KIND_BASE = {
    "permanent": e.ApiError,
    "transient": e.TransientError,
    "token_expired": e.TokenExpiredError,
}


def _body(status_code: int | str | None, description: str | None, response: Any = None) -> bytes:
    return json.dumps(
        {"status_code": status_code, "description": description, "response": response}
    ).encode()


def _ok(records: list[dict[str, Any]]) -> bytes:
    return _body(4305, "The list of chats retrieved successfully", records)


# -- the vendor's tables, literally ------------------------------------------------------


def test_params_and_operators_are_the_vendor_table() -> None:
    """PARAM_OPERATORS is the "Supported Params and Operators" table, nothing more or less."""
    order = ("eq", "lt", "gt", "lte", "gte")
    destination = ("facebook_psid", "twitter_id", "email_id", "mobile", "livechat_id")
    assert dict(protocol.PARAM_OPERATORS) == {
        "status": ("eq", "not_eq"),
        "created_at": order,
        "updated_at": order,
        **{p: ("eq",) for p in ("channel", "tag", "assignee", *destination)},
        **{p: ("eq",) for p in ("abc_user_id", "whatsapp_mobile_number", "intent", "group")},
    }
    assert {"created_at", "updated_at"} == protocol.DATETIME_PARAMS
    assert protocol.CONDITIONS == ("and", "or")


def test_closed_value_sets_are_the_vendor_values() -> None:
    """status and channel take the vendor's values only; the others take any string."""
    assert dict(protocol.ENUM_PARAM_VALUES) == {
        "status": ("queued", "picked", "onhold", "closed"),
        "channel": ("sms", "facebook", "twitter", "livechat", "email", "abc", "whatsapp", "api"),
    }


def test_destination_params_match_their_channel() -> None:
    """Each destination-id param matches the destination_id of the vendor's one channel."""
    assert dict(protocol.DESTINATION_PARAMS) == {
        "facebook_psid": "facebook",
        "twitter_id": "twitter",
        "email_id": "email",
        "mobile": "sms",
        "livechat_id": "livechat",
        "abc_user_id": "abc",
        "whatsapp_mobile_number": "whatsapp",
    }


# -- classification of the vendor's status table -------------------------------------------


def test_status_table_covers_every_vendor_row() -> None:
    """STATUS_TABLE holds exactly the vendor's codes with the vendor's HTTP statuses."""
    expected = {row["status_code"]: row["http_status"] for row in STATUS_ROWS}
    expected[4305] = 200
    assert {c: r.http_status for c, r in protocol.STATUS_TABLE.items()} == expected


@pytest.mark.parametrize("row", STATUS_ROWS, ids=lambda r: str(r["status_code"]))
def test_every_error_row_raises_its_class(row: dict[str, Any]) -> None:
    """Each row (HTTP status + status_code) raises its class carrying code, status, text."""
    body = _body(row["status_code"], row["description"])
    with pytest.raises(e.ApiError) as info:
        protocol.parse_response(row["http_status"], {}, body, page=3)
    err = info.value
    assert type(err) is getattr(e, row["error"])
    assert isinstance(err, KIND_BASE[row["kind"]])
    assert err.status_code == row["status_code"]
    assert err.http_status == row["http_status"]
    assert err.description == row["description"]
    assert err.page == 3
    assert row["description"] in str(err)
    assert str(row["status_code"]) in str(err)


#: The vendor page's "Response Codes" descriptions, copied by hand (its placeholders
#: `<param_name>`, `{0}` and `{1}` written `{param}` and `{value}`).
VENDOR_TEXT = {
    2002: "Invalid header param - could not find mandatory header parameters",
    2003: "Invalid Access Token",
    2004: "Access Token expired",
    2007: "Internal Server Error",
    2010: "Could not find details of team based on the teamid passed in the header",
    2099: "Method not allowed",
    3114: "Request body not provided. Check Content-Type header",
    3115: "Request is invalid",
    3445: "Provided filtration parameter: {param} is not valid",
    3446: "Provided operator for filtration parameter: {param} is not valid",
    3447: "Provided condition is not valid",
    3451: "Search query request format is not valid",
    4303: "Invalid input value:'{value}' provided for filtration parameter:'{param}'",
    3454: "Chat list could not be retrieved",
}


def test_status_table_texts_are_the_vendor_page() -> None:
    """Every row's description is the vendor page's, the success row's included."""
    expected = {**VENDOR_TEXT, 4305: "The list of chats retrieved successfully"}
    assert {c: r.description for c, r in protocol.STATUS_TABLE.items()} == expected


@pytest.mark.parametrize("row", STATUS_ROWS, ids=lambda r: str(r["status_code"]))
@pytest.mark.parametrize(
    "description", [None, "", 123, ["x"]], ids=["null", "empty", "int", "list"]
)
def test_error_row_without_description_uses_the_vendor_text(
    row: dict[str, Any], description: Any
) -> None:
    """A known status_code whose description is absent, empty or not a string gets the
    vendor page's text, and keeps its class."""
    with pytest.raises(e.ApiError) as info:
        protocol.parse_response(row["http_status"], {}, _body(row["status_code"], description))
    assert type(info.value) is getattr(e, row["error"])
    assert info.value.description == VENDOR_TEXT[row["status_code"]]


@pytest.mark.parametrize(
    ("kind", "retryable"),
    [("permanent", False), ("transient", True), ("token_expired", False)],
)
def test_error_kinds_match_the_contract(kind: str, retryable: bool) -> None:
    """Only the contract's transient rows are TransientError; the others are not."""
    for row in (r for r in STATUS_ROWS if r["kind"] == kind):
        with pytest.raises(e.ApiError) as info:
            protocol.parse_response(row["http_status"], {}, _body(row["status_code"], "x"))
        assert isinstance(info.value, e.TransientError) is retryable, row


@pytest.mark.parametrize("http_status", [500, 401, 400, 404])
@pytest.mark.parametrize(
    ("status_code", "shown"),
    [("2007", '"2007"'), (2007.0, "2007.0"), (True, "true"), ([2007], "[2007]"), ({}, "{}")],
    ids=["string", "float", "bool", "list", "object"],
)
def test_malformed_status_code_is_unexpected_response(
    http_status: int, status_code: Any, shown: str
) -> None:
    """A status_code that is not a JSON integer is UnexpectedResponseError (never retried),
    whatever the HTTP status short of a gateway's; the message shows the odd value."""
    with pytest.raises(e.ApiError) as info:
        protocol.parse_response(http_status, {}, _body(status_code, "Internal Server Error"))
    assert type(info.value) is e.UnexpectedResponseError
    assert (info.value.status_code, info.value.http_status) == (None, http_status)
    assert info.value.description == f"malformed status_code {shown}: Internal Server Error"


@pytest.mark.parametrize("http_status", [500, 401])
@pytest.mark.parametrize("status_code", [9999, 4305, 0, -2007])
def test_unknown_status_code_on_500_or_401_is_not_retried(
    http_status: int, status_code: int
) -> None:
    """An integer outside the vendor's error rows on a 500 or 401 is UnexpectedResponseError,
    not a retried InternalServerError nor a token refresh."""
    with pytest.raises(e.ApiError) as info:
        protocol.parse_response(http_status, {}, _body(status_code, ""))
    assert type(info.value) is e.UnexpectedResponseError
    assert (info.value.status_code, info.value.http_status) == (status_code, http_status)
    assert info.value.description == f"HTTP {http_status}"


@pytest.mark.parametrize("status", [429, 502, 503, 504])
@pytest.mark.parametrize("status_code", ["2007", 2007.0, 9999])
def test_gateway_status_wins_over_an_odd_status_code(status: int, status_code: Any) -> None:
    """HTTP 429/502/503/504 stay transient, Retry-After kept, when the body's code is odd."""
    with pytest.raises(e.ApiError) as info:
        protocol.parse_response(status, {"Retry-After": "2"}, _body(status_code, "x"))
    assert type(info.value) is (e.RateLimitedError if status == 429 else e.GatewayError)
    assert info.value.retry_after == 2.0


#: The wire contract's error classes table, literally: its transient row's HTTP statuses
#: ("HTTP 429/502/503/504") and the vendor codes of every row.
CONTRACT_TRANSIENT_HTTP = (429, 502, 503, 504)
CONTRACT_TRANSIENT_CODES = (2007, 3454)
CONTRACT_TOKEN_EXPIRED_CODES = (2004,)
CONTRACT_PERMANENT_CODES = (2002, 2003, 2010, 2099, 3114, 3115, 3445, 3446, 3447, 3451, 4303)


@pytest.mark.parametrize("status", CONTRACT_TRANSIENT_HTTP)
@pytest.mark.parametrize(
    "status_code",
    CONTRACT_TRANSIENT_CODES + CONTRACT_TOKEN_EXPIRED_CODES + CONTRACT_PERMANENT_CODES,
)
def test_gateway_status_is_transient_whatever_vendor_code(status: int, status_code: int) -> None:
    """HTTP 429/502/503/504 are transient whatever vendor code the body carries (a 503 with
    3115, a 429 with 2003): retried, Retry-After kept, the body's code and text reported."""
    with pytest.raises(e.ApiError) as info:
        protocol.parse_response(status, {"Retry-After": "2"}, _body(status_code, "odd"), page=4)
    err = info.value
    assert type(err) is (e.RateLimitedError if status == 429 else e.GatewayError)
    assert isinstance(err, e.TransientError)
    assert (err.http_status, err.status_code, err.description, err.page) == (
        status,
        status_code,
        "odd",
        4,
    )
    assert err.retry_after == 2.0


def test_unknown_status_code_is_unexpected_response() -> None:
    """A status_code outside the vendor's table raises UnexpectedResponseError, keeping it."""
    with pytest.raises(e.UnexpectedResponseError) as info:
        protocol.parse_response(418, {}, _body(9999, "I'm a teapot"))
    assert (info.value.status_code, info.value.http_status) == (9999, 418)
    assert info.value.description == "I'm a teapot"


# -- success ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "total"),
    [
        ({}, None),
        ({"X-Total-Count": "95"}, 95),
        ({"x-total-count": "95"}, 95),
        ({"X-Total-Count": " 0 "}, 0),
        ({"X-Total-Count": "many"}, None),
        ({"X-Total-Count": "-3"}, None),
    ],
)
def test_success_parse_with_and_without_total(headers: dict[str, str], total: int | None) -> None:
    """A 200/4305 page gives its records, and the total only when X-Total-Count is sane."""
    data = protocol.parse_response(200, headers, PAGE_QUIRKS, page=1)
    assert len(data.records) == 10
    assert data.records[0]["chat_id"] == "c-0001"
    assert data.total == total


@pytest.mark.parametrize("response", [[], None])
def test_empty_page_past_the_end(response: Any) -> None:
    """A 200 with an empty (or null) response past the last page is an empty page."""
    data = protocol.parse_response(200, {"X-Total-Count": "10"}, _ok(response))
    assert list(data.records) == []
    assert data.total == 10


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{not json",
        b"\xff\xfe\x00garbage",
        b"<html>ok</html>",
        b"[]",
        b'"text"',
        _body(4305, "ok", {"chat_id": "x"}),
        _body(4305, "ok", ["x", "y"]),
        json.dumps({"description": "no code", "response": []}).encode(),
    ],
    ids=[
        "empty",
        "truncated",
        "binary",
        "html",
        "json-list",
        "json-string",
        "response-object",
        "response-strings",
        "no-status-code",
    ],
)
def test_malformed_success_is_unexpected_response(body: bytes) -> None:
    """A 200 whose body is not the success document raises UnexpectedResponseError."""
    with pytest.raises(e.UnexpectedResponseError) as info:
        protocol.parse_response(200, {}, body, page=2)
    assert info.value.http_status == 200
    assert info.value.page == 2


@pytest.mark.parametrize(
    ("body", "code", "description"),
    [
        (b"{not json", None, "malformed success body"),
        (b"", None, "malformed success body"),
        (b"[]", None, "unexpected success body"),
        (_body(None, "ok", []), None, "unexpected success body"),
        (_body(9999, "ok", []), 9999, "unexpected success body"),
        (_body("4305", "ok", []), None, "unexpected success body"),
        (_body(4305, "ok", {"chat_id": "x"}), 4305, "response is not a list of chat objects"),
        (_body(4305, "ok", [{"chat_id": "x"}, 7]), 4305, "response is not a list of chat objects"),
    ],
    ids=["truncated", "empty", "json-list", "no-code", "unknown", "str-code", "object", "mixed"],
)
def test_malformed_success_says_what_was_wrong(
    body: bytes, code: int | None, description: str
) -> None:
    """The error on a bad 200 tells unparsable from unexpected JSON and keeps the code."""
    with pytest.raises(e.UnexpectedResponseError) as info:
        protocol.parse_response(200, {}, body)
    assert (info.value.status_code, info.value.description) == (code, description)


# -- gateways, rate limits, redirects, bare statuses ------------------------------------


@pytest.mark.parametrize("status", [502, 503, 504])
@pytest.mark.parametrize("body", [GATEWAY_HTML, b"", b"   "], ids=["html", "empty", "blank"])
def test_gateway_bodies_are_transient(status: int, body: bytes) -> None:
    """HTTP 502/503/504 with an HTML or empty body is a GatewayError without a code."""
    with pytest.raises(e.GatewayError) as info:
        protocol.parse_response(status, {"Content-Type": "text/html"}, body)
    assert info.value.http_status == status
    assert info.value.status_code is None
    assert str(status) in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("7", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        (" 12 ", 12.0),
        ("garbage", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
        ("", None),
        ("-5", None),
        ("nan", None),
        ("inf", None),
        ("300", 300.0),
        ("300.5", 300.0),  # clamped at five minutes: the transport never waits longer
        ("86400", 300.0),
        ("1e12", 300.0),
    ],
)
@pytest.mark.parametrize("body", [b"", _body(None, "Too Many Requests")], ids=["empty", "json"])
def test_429_retry_after(value: str | None, expected: float | None, body: bytes) -> None:
    """HTTP 429 is RateLimitedError; Retry-After parsed, garbage/negative ignored, huge clamped."""
    headers = {} if value is None else {"Retry-After": value}
    with pytest.raises(e.RateLimitedError) as info:
        protocol.parse_response(429, headers, body)
    assert info.value.retry_after == expected
    assert info.value.http_status == 429


def test_retry_after_header_name_is_case_insensitive() -> None:
    """A lower-case retry-after header is read too."""
    with pytest.raises(e.RateLimitedError) as info:
        protocol.parse_response(429, {"retry-after": "3"}, b"")
    assert info.value.retry_after == 3.0


@pytest.mark.parametrize("body", [b"{broken", GATEWAY_HTML, b""], ids=["json", "html", "empty"])
def test_malformed_body_on_500_is_transient(body: bytes) -> None:
    """A 500 without the vendor's JSON body is an InternalServerError (retried), no code."""
    with pytest.raises(e.InternalServerError) as info:
        protocol.parse_response(500, {}, body)
    assert info.value.status_code is None
    assert info.value.http_status == 500


@pytest.mark.parametrize(
    ("status", "cls"), [(500, e.InternalServerError), (401, e.TokenExpiredError)]
)
@pytest.mark.parametrize(
    "doc",
    [{"status_code": None, "description": "oops"}, {"description": "oops"}],
    ids=["null-code", "no-code"],
)
def test_json_body_without_status_code_is_a_bare_status(
    status: int, cls: type[e.ApiError], doc: dict[str, Any]
) -> None:
    """A 500 or 401 whose JSON has no status_code is classified by its HTTP status alone."""
    with pytest.raises(e.ApiError) as info:
        protocol.parse_response(status, {}, json.dumps(doc).encode())
    assert type(info.value) is cls
    assert (info.value.status_code, info.value.description) == (None, "oops")


@pytest.mark.parametrize("body", [b"", b"Unauthorized"])
def test_bare_401_is_token_expired(body: bytes) -> None:
    """A 401 without the vendor's body is treated as an expired token."""
    with pytest.raises(e.TokenExpiredError) as info:
        protocol.parse_response(401, {}, body)
    assert info.value.http_status == 401


@pytest.mark.parametrize("status", [300, 301, 302, 303, 307, 308, 399])
def test_redirects_are_refused(status: int) -> None:
    """A 3xx is classified as UnexpectedResponseError (never a page, never transient)."""
    headers = {"Location": "https://evil.example/steal"}
    with pytest.raises(e.UnexpectedResponseError) as info:
        protocol.parse_response(status, headers, b"")
    assert not isinstance(info.value, e.TransientError)
    assert info.value.http_status == status
    assert "redirect" in str(info.value)
    assert "evil.example" not in str(info.value)


@pytest.mark.parametrize("status", [299, 400, 403, 404, 418])
def test_other_bare_statuses_are_permanent(status: int) -> None:
    """A bare non-table 4xx is an UnexpectedResponseError, not retried."""
    with pytest.raises(e.UnexpectedResponseError) as info:
        protocol.parse_response(status, {}, b"nope")
    assert not isinstance(info.value, e.TransientError)
    assert info.value.http_status == status
    # not called a redirect; a bare 404 adds the base_url hint
    assert info.value.description.startswith(f"HTTP {status}")
    assert ("base_url" in info.value.description) == (status == 404)


# -- request building -------------------------------------------------------------------


@pytest.mark.parametrize(
    "base_url",
    ["https://acme.imi.chat/v3.0", "https://acme.imi.chat/v3.0/", "https://acme.imi.chat/v3.0//"],
)
@pytest.mark.parametrize("page", [1, 2, 37])
def test_request_url_and_method(base_url: str, page: int) -> None:
    """POST {base_url}/chats/search?page=n, whatever trailing slashes base_url has."""
    url = protocol.search_url(base_url)
    req = protocol.build_request(url, protocol.build_headers(TOKEN, "team-1"), b"{}", page)
    assert req.method == "POST"
    assert req.url == f"https://acme.imi.chat/v3.0/chats/search?page={page}"
    assert req.page == page


def test_request_headers_are_the_four_of_the_contract() -> None:
    """Authorization Bearer, teamid, Content-Type and Accept JSON, nothing else."""
    assert protocol.build_headers(TOKEN, "team-1") == {
        "Authorization": f"Bearer {TOKEN}",
        "teamid": "team-1",
        "Content-Type": "application/json",
        "Accept": "application/json",
    }


@pytest.mark.parametrize(
    ("filters", "condition"),
    [
        ([], "and"),
        ([("status", "eq", "closed")], "and"),
        (
            [
                ("status", "eq", "closed"),
                ("created_at", "gte", "2024-05-01T00:00:00Z"),
                ("created_at", "lt", "2024-06-01T00:00:00Z"),
            ],
            "or",
        ),
    ],
)
def test_request_body_shape(filters: list[tuple[str, str, str]], condition: str) -> None:
    """The body is {"condition", "filters": [{"param", "operator", "value"}]} in order."""
    doc = json.loads(protocol.build_body(filters, condition))
    assert doc == {
        "condition": condition,
        "filters": [{"param": p, "operator": o, "value": v} for p, o, v in filters],
    }


def test_request_is_the_contract_example() -> None:
    """The whole request, built from its parts, is the wire contract's example, literally."""
    filters = [("status", "eq", "closed"), ("created_at", "gte", "2024-05-01T00:00:00Z")]
    req = protocol.build_request(
        protocol.search_url("https://acme.imi.chat/v3.0"),
        protocol.build_headers(TOKEN, "team-1"),
        protocol.build_body(filters),
        2,
    )
    assert (req.method, req.url, req.page) == (
        "POST",
        "https://acme.imi.chat/v3.0/chats/search?page=2",
        2,
    )
    assert dict(req.headers) == {
        "Authorization": f"Bearer {TOKEN}",
        "teamid": "team-1",
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    assert json.loads(req.body) == {
        "condition": "and",
        "filters": [
            {"param": "status", "operator": "eq", "value": "closed"},
            {"param": "created_at", "operator": "gte", "value": "2024-05-01T00:00:00Z"},
        ],
    }
    assert req.body.startswith(b'{"condition":"and","filters":[{"param":"status"')  # compact


def test_prepared_request_repr_hides_token() -> None:
    """repr/str of a PreparedRequest never shows the token (nor the headers)."""
    req = protocol.build_request(
        protocol.search_url("https://acme.imi.chat/v3.0"),
        protocol.build_headers(TOKEN, "team-1"),
        b"{}",
        1,
    )
    assert TOKEN not in repr(req)
    assert TOKEN not in str(req)
    assert "page=1" in repr(req)
    assert "{}" not in repr(req)  # nor the body, which may name a customer


@pytest.mark.parametrize(
    ("total", "last"), [(0, 0), (1, 1), (9, 1), (10, 1), (11, 2), (95, 10), (100, 10)]
)
def test_last_page(total: int, last: int) -> None:
    """last_page(total) is ceil(total / 10)."""
    assert protocol.last_page(total) == last


@pytest.mark.parametrize(
    ("page", "count", "total", "ends"),
    [
        # with a total: its last page, or an empty page; a short page before it does not end
        (1, 10, 35, False),
        (2, 4, 35, False),
        (3, 10, 35, False),
        (4, 5, 35, True),
        (4, 10, 40, True),
        (2, 0, 35, True),
        (1, 0, 0, True),
        (5, 3, 35, True),
        # without one: a short page
        (1, 10, None, False),
        (2, 9, None, True),
        (2, 4, None, True),
        (3, 0, None, True),
    ],
)
def test_ends_search(page: int, count: int, total: int | None, ends: bool) -> None:
    """The end-of-data rule: at most 10 records a page, not exactly 10 (wire contract)."""
    assert protocol.ends_search(page, count, total) is ends


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("[::1]", True),
        ("api.localhost", True),
        ("acme.imi.chat", False),
        ("10.0.0.1", False),
        ("localhost.evil.example", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    """Only localhost and the loopback ranges count as loopback."""
    assert protocol.is_loopback_host(host) is loopback


@pytest.mark.parametrize(
    ("status", "headers", "throttle"),
    [
        (429, {}, True),
        (429, {"Retry-After": "1"}, True),
        (503, {"Retry-After": "1"}, True),
        (503, {"retry-after": "2"}, True),
        (503, {}, False),
        (429, {"Retry-After": "0"}, False),
        (503, {"Retry-After": "0"}, False),
        (429, {"Retry-After": "soon"}, True),
        (502, {"Retry-After": "1"}, False),
        (500, {}, False),
        (200, {}, False),
    ],
)
def test_is_throttle(status: int, headers: dict[str, str], throttle: bool) -> None:
    """A throttle: 429, or 503 with Retry-After (any case); not a bare 503 nor `Retry-After: 0`."""
    assert protocol.is_throttle(status, headers) is throttle


def test_overload_statuses_are_429_and_503() -> None:
    """The statuses adaptive concurrency backs off on: 429 and 503, nothing else."""
    assert {429, 503} == protocol.OVERLOAD_STATUSES


# -- reading the body: exactly what json.loads reads ---------------------------------------

_DOC = '{"status_code": 4305, "response": [{"chat_id": "c-1", "tag": ["é", "✓"]}]}'
JSON_BODIES = [
    _DOC.encode(),
    b'{"a":1}',
    b"{}",
    b' {"a":1}',  # leading space
    b'{"a":1} ',  # trailing space: not the end of the text
    b'{"a":1}\r\n\t',
    b'{"a":1}x',  # extra data
    b'{"a":1}{"b":2}',
    b"{",
    b"{ ",
    b"",
    b"[1, 2]",
    b'"text"',
    b"\xef\xbb\xbf" + _DOC.encode(),  # a UTF-8 BOM: json.loads reads it
    _DOC.encode("utf-16"),
    _DOC.encode("utf-16-le"),
    _DOC.encode("utf-16-be"),
    _DOC.encode("utf-32"),
    b'{\x00"a":1}',
    b'{"a":"\\ud800"}',  # a lone surrogate, escaped
    b'{"a":"\xed\xa0\x80"}',  # a lone surrogate, encoded: json.loads takes it (surrogatepass)
    b'{"a":"\xff"}',  # not UTF-8
    b'{"a":NaN,"b":-Infinity}',
    b'{"a":1e400,"b":123456789012345678901234567890}',
    b'{"a":1,"a":2}',
    b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}",  # deeper than the recursion limit
]


@pytest.mark.parametrize("body", JSON_BODIES, ids=range(len(JSON_BODIES)))
def test_decode_json_reads_what_json_loads_reads(body: bytes) -> None:
    """The body is read exactly as `json.loads` reads it, or not at all where it raises."""
    try:
        expected = json.loads(body)
    except (ValueError, RecursionError):
        assert protocol._decode_json(body) is None
        return
    got = protocol._decode_json(body)
    assert repr(got) == repr(expected)  # repr: NaN equals itself, key order counts
    assert type(got) is type(expected)


def test_a_body_msgspec_reads_skips_json_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The common body, UTF-8 JSON, is read by msgspec alone (the reason `_decode_json`
    exists); a body msgspec refuses (here a BOM) still goes through `json.loads`."""
    calls: list[bytes] = []
    loads = json.loads

    def counting_loads(body: bytes) -> Any:
        calls.append(body)
        return loads(body)

    monkeypatch.setattr("imichat_async._protocol.json.loads", counting_loads)
    assert protocol._decode_json(_DOC.encode()) == loads(_DOC)
    assert protocol._decode_json(b' {"a":1} ') == {"a": 1}
    assert calls == []
    bom = b"\xef\xbb\xbf" + _DOC.encode()
    assert protocol._decode_json(bom) == loads(_DOC)
    assert calls == [bom]


# -- records as sent ---------------------------------------------------------------------------

_ODD_RECORDS = [
    '{"chat_id":"c-1","tag":["\\u00e9","\\u2713"]}',  # escapes, as an ASCII server sends them
    '{ "chat_id" : "c-2" ,\t"note": "caf\u00e9 \u2713 \U0001f600" }',  # spaces, UTF-8 as is
    '{"chat_id":"c-3","q":"\\"quoted\\" \\\\ back\\/slash \\n \\t \\ud83d\\ude00"}',
    '{"chat_id":"c-4","n":1.50e+2,"big":123456789012345678901234567890,"z":-0.0}',
    '{"chat_id":"c-5","nested":{"a":[1,{"b":null}],"c":true}}',
]


def _success_body(records: list[str], sep: str = ",") -> bytes:
    return (
        '{"status_code": 4305, "description": "ok",\n "response": [ ' + sep.join(records) + " ]}"
    ).encode()


@pytest.mark.parametrize("sep", [",", " ,\n  ", "\r\n,\t"])
def test_raw_records_are_the_bytes_the_server_sent(sep: str) -> None:
    """Each record's `raw` is its JSON text exactly as in the body (whitespace, escapes and
    UTF-8 kept); the record itself is the dict `json.loads` reads from that text."""
    body = _success_body(_ODD_RECORDS, sep)
    data = protocol.parse_response(200, {}, body, page=1)
    got = protocol.raw_records(data)
    assert [r.raw for r in got] == [t.encode() for t in _ODD_RECORDS]
    assert got == [json.loads(t) for t in _ODD_RECORDS]
    assert all(type(r) is protocol.RawChat and isinstance(r, dict) for r in got)


def test_raw_records_of_a_body_msgspec_refuses_are_compact_json() -> None:
    """A body only `json.loads` reads (a BOM here) has no slices: `raw` is compact UTF-8 JSON."""
    body = b"\xef\xbb\xbf" + _success_body(_ODD_RECORDS)
    got = protocol.raw_records(protocol.parse_response(200, {}, body, page=1))
    assert got == [json.loads(t) for t in _ODD_RECORDS]
    compact = [
        json.dumps(json.loads(t), ensure_ascii=False, separators=(",", ":")) for t in _ODD_RECORDS
    ]
    assert [r.raw for r in got] == [text.encode() for text in compact]


def test_a_lone_surrogate_escape_is_kept_as_its_escape_in_records_as_sent() -> None:
    """`"\\ud800"` is valid JSON with no UTF-8: msgspec gives no slices, and the text written
    for such a record (records as dicts, or as texts) is its compact JSON with the escape,
    not a `UnicodeEncodeError` out of the search."""
    body = b'{"status_code":4305,"response":[{"chat_id":"a","note":"\\ud800 \xc3\xa9"}]}'
    want = json.loads(body)["response"]
    sent = protocol.raw_records(protocol.parse_response(200, {}, body, page=1))
    texts = protocol.parse_texts(200, {}, body, page=1).records
    assert sent == want
    for raw in (sent[0].raw, texts[0].raw):
        assert json.loads(raw) == want[0]
        assert raw == b'{"chat_id":"a","note":"\\ud800 \\u00e9"}'


def test_raw_records_of_a_body_with_response_twice_are_the_last_ones() -> None:
    """A body naming `response` twice: the records and their texts are both the last one's
    (as `json.loads` reads it), never one's objects with the other's bytes."""
    body = b'{"status_code":4305,"response":[{"a":1}],"response":[{"b": 2}]}'
    got = protocol.raw_records(protocol.parse_response(200, {}, body, page=1))
    assert got == [{"b": 2}] and [r.raw for r in got] == [b'{"b": 2}']


def test_raw_chat_pickles_and_copies_with_its_bytes() -> None:
    import copy
    import pickle

    chat = protocol.RawChat({"chat_id": "c-1"}, b'{"chat_id": "c-1"}')
    for clone in (pickle.loads(pickle.dumps(chat)), copy.deepcopy(chat), copy.copy(chat)):
        assert clone == {"chat_id": "c-1"} and clone.raw == chat.raw
        assert type(clone) is protocol.RawChat
    assert json.loads(json.dumps(chat)) == chat  # a dict to every JSON encoder


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # RFC 9110 section 5.6.7's three forms of one instant
        ({"Date": "Sun, 06 Nov 1994 08:49:37 GMT"}, 784111777),
        ({"date": "Sunday, 06-Nov-94 08:49:37 GMT"}, 784111777),
        ({"DATE": "Sun Nov  6 08:49:37 1994"}, 784111777),
        ({}, None),
        ({"Date": ""}, None),
        ({"Date": "yesterday"}, None),
        ({"Date": "Sun, 31 Feb 1994 08:49:37 GMT"}, None),
    ],
)
def test_parse_date_reads_the_servers_clock_in_whole_seconds(
    headers: dict[str, str], expected: int | None
) -> None:
    """The Date header in any of its three forms, any case; None when absent or unreadable."""
    assert protocol.parse_date(headers) == expected
