"""Every wire detail of POST /chats/search, and nothing else: no I/O here.

Sources: the vendor's page (``shared/spec/seed-chats-search.txt``) for the
params, operators, fields and status codes; the wire contract
(``shared/spec/wire-contract.md``) for the request's shape, the headers, the
end of data and the error classes. A change in the real service is a change in
this file.

`build_request` turns (base URL, team, token, page, body) into a
`PreparedRequest`; `parse_response` turns (HTTP status, headers, body bytes)
into a `PageData` or raises the typed `ApiError` subclass of its class;
`raw_records` gives a page's chats with the bytes each was sent as;
`parse_texts` classifies as `parse_response` does and gives each chat as those
bytes alone (`ChatText`), never parsed into a dict; `typed_parse(R)` gives a
`parse_response` that reads each chat as the TypedDict `R` in the same pass.

Bodies are parsed by msgspec (README: "Choices"): about twice as fast as
`json.loads`, and it hands out each record's text as a slice of the body
(`msgspec.Raw`), which the NDJSON export writes without encoding it again.
Whatever msgspec refuses goes to `json.loads`, so the classification of a
body is the one `json.loads` gives.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import math
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from typing import Any, Generic, TypeVar

import attrs
import msgspec

from . import _errors as e

SEARCH_PATH = "/chats/search"
PAGE_SIZE = 10  # vendor page: "retrieves 10 records at a time"
SUCCESS_CODE = 4305
AUTH_HEADER = "Authorization"  # "Bearer {token}"
TEAM_HEADER = "teamid"
TOTAL_HEADER = "X-Total-Count"
RETRY_AFTER_HEADER = "Retry-After"
DATE_HEADER = "Date"  # the server's clock (RFC 9110 section 6.6.1)
MAX_RETRY_AFTER = 300.0  # a Retry-After above five minutes is clamped, not obeyed blindly

ORDER_OPS = ("eq", "lt", "gt", "lte", "gte")
STATUS_VALUES = ("queued", "picked", "onhold", "closed")
CHANNEL_VALUES = ("sms", "facebook", "twitter", "livechat", "email", "abc", "whatsapp", "api")
CONDITIONS = ("and", "or")

#: The vendor's "Supported Params and Operators" table.
PARAM_OPERATORS: Mapping[str, tuple[str, ...]] = {
    "status": ("eq", "not_eq"),
    "created_at": ORDER_OPS,
    "updated_at": ORDER_OPS,
    "channel": ("eq",),
    "tag": ("eq",),
    "assignee": ("eq",),
    "facebook_psid": ("eq",),
    "twitter_id": ("eq",),
    "email_id": ("eq",),
    "mobile": ("eq",),
    "livechat_id": ("eq",),
    "abc_user_id": ("eq",),
    "whatsapp_mobile_number": ("eq",),
    "intent": ("eq",),
    "group": ("eq",),
}
DATETIME_PARAMS = frozenset({"created_at", "updated_at"})
#: Params whose value must be one of a closed set.
ENUM_PARAM_VALUES: Mapping[str, tuple[str, ...]] = {
    "status": STATUS_VALUES,
    "channel": CHANNEL_VALUES,
}
#: Destination-id params and the channel whose destination_id they match.
DESTINATION_PARAMS: Mapping[str, str] = {
    "facebook_psid": "facebook",
    "twitter_id": "twitter",
    "email_id": "email",
    "mobile": "sms",
    "livechat_id": "livechat",
    "abc_user_id": "abc",
    "whatsapp_mobile_number": "whatsapp",
}


@attrs.frozen
class StatusRow:
    """One row of the vendor's "Response Codes" table."""

    code: int
    http_status: int
    description: str
    error: type[e.ApiError] | None  # None for the success row


#: The vendor's "Response Codes" table, mapped to the error class of each row.
STATUS_TABLE: Mapping[int, StatusRow] = {
    row.code: row
    for row in (
        StatusRow(4305, 200, "The list of chats retrieved successfully", None),
        StatusRow(
            2002,
            400,
            "Invalid header param - could not find mandatory header parameters",
            e.MissingHeaderError,
        ),
        StatusRow(2003, 400, "Invalid Access Token", e.InvalidTokenError),
        StatusRow(2004, 401, "Access Token expired", e.TokenExpiredError),
        StatusRow(2007, 500, "Internal Server Error", e.InternalServerError),
        StatusRow(
            2010,
            404,
            "Could not find details of team based on the teamid passed in the header",
            e.TeamNotFoundError,
        ),
        StatusRow(2099, 405, "Method not allowed", e.MethodNotAllowedError),
        StatusRow(
            3114, 400, "Request body not provided. Check Content-Type header", e.MissingBodyError
        ),
        StatusRow(3115, 400, "Request is invalid", e.InvalidRequestError),
        StatusRow(
            3445,
            400,
            "Provided filtration parameter: {param} is not valid",
            e.InvalidFilterParamError,
        ),
        StatusRow(
            3446,
            400,
            "Provided operator for filtration parameter: {param} is not valid",
            e.InvalidFilterOperatorError,
        ),
        StatusRow(3447, 400, "Provided condition is not valid", e.InvalidConditionError),
        StatusRow(3451, 400, "Search query request format is not valid", e.InvalidQueryFormatError),
        StatusRow(
            4303,
            400,
            "Invalid input value:'{value}' provided for filtration parameter:'{param}'",
            e.InvalidFilterValueError,
        ),
        StatusRow(3454, 500, "Chat list could not be retrieved", e.ChatListUnavailableError),
    )
}

#: HTTP statuses seen in front of the service, transient whatever the body says.
TRANSIENT_HTTP: Mapping[int, type[e.TransientError]] = {
    429: e.RateLimitedError,
    502: e.GatewayError,
    503: e.GatewayError,
    504: e.GatewayError,
}


@attrs.frozen
class PreparedRequest:
    """Everything the transport needs to send one page request. `repr` hides the headers."""

    method: str
    url: str
    headers: Mapping[str, str] = attrs.field(repr=False)
    body: bytes = attrs.field(repr=False)
    page: int


@attrs.frozen
class PageData:
    """A successful page: the raw chat objects (`parse_texts`: their texts), the server's
    total when it sent one, and the body they were parsed from (for `raw_records`).
    `typed`: the chats are the TypedDicts of a `typed_parse` (types checked)."""

    records: Sequence[Any]  # dicts (typed ones when `typed`); `ChatText`s from `parse_texts`
    total: int | None = None
    body: bytes = attrs.field(default=b"", repr=False, eq=False)
    typed: bool = False


class RawChat(dict[str, Any]):
    """One chat object as the server sent it: its parsed JSON object (a `dict`, so every
    mapping use of it works), and `raw`, the exact bytes of its JSON text in the page body.

    `raw` is what the NDJSON export writes; changing the dict does not change it.
    """

    __slots__ = ("raw",)

    def __init__(self, parsed: Mapping[str, Any], raw: bytes) -> None:
        super().__init__(parsed)
        self.raw = raw


class _Records(msgspec.Struct):
    """A success body's `response`, each chat kept as its text (a slice of the body)."""

    response: list[msgspec.Raw] | None = None


_split_records = msgspec.json.Decoder(_Records).decode


def raw_records(data: PageData) -> list[RawChat]:
    """`data.records` as `RawChat`s: each with the bytes of its JSON text in `data.body`.

    A body msgspec cannot read (a BOM, UTF-16, `NaN`: `json.loads` read it) gives no
    slices: each record's `raw` is then its compact JSON, UTF-8.
    """
    records = data.records
    try:
        texts = _split_records(data.body).response or ()
    except (msgspec.DecodeError, RecursionError):
        texts = ()
    if len(texts) != len(records):
        return [RawChat(r, compact_json(r)) for r in records]
    return [RawChat(r, bytes(t)) for r, t in zip(records, texts, strict=True)]


class ChatText(msgspec.Struct, gc=False):
    """One chat as the server sent it, never parsed into a dict: `raw`, the exact bytes of
    its JSON text in the page body, and the fields that place it, as sent (None when absent):
    `chat_id`, `created_at`, `updated_at`.

    What `search_pages(raw="text")` gives and the NDJSON export writes: no dict per chat
    to build, and (holding no container of its own) nothing for the garbage collector to
    track while a slice is read.
    """

    raw: bytes
    chat_id: Any = None
    created_at: Any = None
    updated_at: Any = None


R = TypeVar("R")
#: Reads one answer: `parse_response`'s signature (and `parse_texts`', `typed_parse`'s).
Parse = Callable[[int, Mapping[str, str], bytes, "int | None"], PageData]


class _TypedPage(msgspec.Struct, Generic[R]):
    """A body's status code and its chats, each read as `R` (msgspec checks the types)."""

    status_code: Any = None
    response: list[R] | None = None


def _clean_success(http_status: int, body: bytes, decode: Callable[[bytes], Any]) -> Any:
    """`decode(body)` (a `_TypedPage`) for a clean success body: HTTP 200, strict UTF-8,
    read by msgspec, the success status code. None for any other body (it goes through
    `parse_response`, for its classification and its `json.loads` fallback)."""
    if http_status != 200 or not (body.isascii() or _is_utf8(body)):
        return None
    try:
        doc = decode(body)
    except (msgspec.DecodeError, RecursionError):  # a ValidationError too
        return None
    return doc if doc.status_code == SUCCESS_CODE else None


class _Head(msgspec.Struct, gc=False):
    """The fields of one chat object that `ChatText` keeps; the others are skipped."""

    chat_id: Any = None
    created_at: Any = None
    updated_at: Any = None


_split_heads = msgspec.json.Decoder(_TypedPage[_Head]).decode


def parse_texts(
    http_status: int, headers: Mapping[str, str], body: bytes, page: int | None = None
) -> PageData:
    """`parse_response`, each record a `ChatText`: the same classification, the same bytes
    as `raw_records` gives, without turning the chats into dicts.

    A clean success body (UTF-8, read by msgspec, every chat an object, each with its
    text) is read in two passes that build no dict; anything else goes through
    `parse_response` (its errors, its `json.loads` fallback), then `raw_records`.
    """
    heads = _clean_success(http_status, body, _split_heads)
    if heads is not None:
        texts = _split_records(body).response or ()  # the body was read: no error here
        found = heads.response or ()
        if len(found) == len(texts):
            records = [
                ChatText(bytes(t), h.chat_id, h.created_at, h.updated_at)
                for t, h in zip(texts, found, strict=True)
            ]
            return PageData(records, _parse_total(_header(headers, TOTAL_HEADER)), body)
    data = parse_response(http_status, headers, body, page)
    return PageData(text_records(data), data.total, data.body)


def text_records(data: PageData) -> list[ChatText]:
    """`raw_records(data)` as `ChatText`s."""
    return [
        ChatText(r.raw, r.get("chat_id"), r.get("created_at"), r.get("updated_at"))
        for r in raw_records(data)
    ]


def typed_parse(record: type[Any]) -> Parse:
    """`parse_response`, reading a success body's chats as `record` (a TypedDict: the JSON
    type of each field) in the same pass: a `PageData` whose `typed` is True.

    A body that is not clean UTF-8, or whose chats do not fit those types (a field sent
    as another JSON type, a chat that is not an object), and every other body, go
    through `parse_response`: what it raises or returns for them is unchanged.
    """
    decode = msgspec.json.Decoder(_TypedPage[record]).decode  # type: ignore[valid-type]

    def parse(
        http_status: int, headers: Mapping[str, str], body: bytes, page: int | None = None
    ) -> PageData:
        doc = _clean_success(http_status, body, decode)
        if doc is not None:
            total = _parse_total(_header(headers, TOTAL_HEADER))
            return PageData(doc.response or [], total, body, typed=True)
        return parse_response(http_status, headers, body, page)

    return parse


def _is_utf8(body: bytes) -> bool:
    """Strict UTF-8 (what msgspec reads when it decodes every string; skipping one, it does
    not look)."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def compact_json(obj: Any) -> bytes:
    """`obj` as compact JSON text, UTF-8 (non-ASCII characters kept, not escaped). A string
    holding a lone surrogate (`"\\ud800"` is valid JSON, and has no UTF-8) keeps it as
    that escape, and the rest of the text ASCII."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode()


def build_body(filters: Sequence[tuple[str, str, str]], condition: str = "and") -> bytes:
    """The JSON body for already-validated (param, operator, value) triples."""
    payload = {
        "condition": condition,
        "filters": [{"param": p, "operator": o, "value": v} for p, o, v in filters],
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def search_url(base_url: str) -> str:
    """The endpoint's URL without the page query: `{base_url}/chats/search`."""
    return base_url.rstrip("/") + SEARCH_PATH


def build_headers(token: str, team_id: str) -> dict[str, str]:
    """The four headers the contract requires."""
    return {
        AUTH_HEADER: f"Bearer {token}",
        TEAM_HEADER: team_id,
        "Content-Type": "application/json",
        "Accept": "application/json",
    }


def build_request(url: str, headers: Mapping[str, str], body: bytes, page: int) -> PreparedRequest:
    """The request for 1-based `page`, from `search_url`, `build_headers` and `build_body`."""
    return PreparedRequest("POST", f"{url}?page={page}", headers, body, page)


def last_page(total: int) -> int:
    """The number of the last page holding records, for a total number of matches."""
    return math.ceil(total / PAGE_SIZE)


def ends_search(page: int, count: int, total: int | None) -> bool:
    """Whether the search ends at `page`, which held `count` records.

    The contract promises at most 10 records a page, not exactly 10. With a
    total (`X-Total-Count`): the total's last page ends it, or an empty page
    before it (the data shrank meanwhile); a short page before it does not.
    Without a total: a short page (a page past the last one is empty).
    """
    if total is not None:
        return count == 0 or page >= last_page(total)
    return count < PAGE_SIZE


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds form), clamped; None if absent or odd."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # an HTTP-date or garbage: fall back to our own backoff
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER)


def parse_date(headers: Mapping[str, str]) -> int | None:
    """The server's clock from a response's `Date` header, in whole seconds since the epoch.

    RFC 9110 section 6.6.1: IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), or the
    obsolete RFC 850 and asctime forms, always GMT; a header has whole seconds, so
    the instant is rounded down. None when the header is absent, empty or unreadable.
    """
    value = _header(headers, DATE_HEADER)
    if not value or not value.strip():
        return None
    try:
        at = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if at.tzinfo is None:  # asctime, or "-0000": the RFC says GMT
        at = at.replace(tzinfo=datetime.timezone.utc)
    return math.floor(at.timestamp())


#: HTTP statuses by which a server says it is overloaded: adaptive concurrency backs off.
OVERLOAD_STATUSES = frozenset({429, 503})


def is_throttle(http_status: int, headers: Mapping[str, str]) -> bool:
    """The server says "too fast": HTTP 429, or 503 with `Retry-After` (a gateway's rate limit).

    A bare 503 is an overloaded or failing service, not a rate: it lowers no send rate.
    Nor does `Retry-After: 0`: a server that asks for the retry at once is not asking
    for a slower pace (a rate limiter names the wait until its next token).
    """
    if http_status not in OVERLOAD_STATUSES:
        return False
    retry_after = _header(headers, RETRY_AFTER_HEADER)
    if retry_after is None:
        return http_status == 429
    return parse_retry_after(retry_after) != 0


_raw_decode = json.JSONDecoder().raw_decode  # the decoder json.loads uses, without its wrapper
_msgspec_decode = msgspec.json.Decoder().decode


def _decode_json(body: bytes) -> Any:
    """`json.loads(body)`, or None where it raises.

    msgspec reads the body first: what it reads, it reads as `json.loads` does
    (property-tested); what it refuses (a BOM, UTF-16/32, `NaN`, a lone
    surrogate escape, a number out of a float's range, nesting too deep) goes
    to `_loads`.
    """
    try:
        return _msgspec_decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        # msgspec before 0.19 raises UnicodeDecodeError for bytes that are not UTF-8
        return _loads(body)


def _loads(body: bytes) -> Any:
    """`json.loads(body)`, or None where it raises.

    A body opening with `{` and then a byte other than NUL is UTF-8 to `json.loads`
    (no BOM, no UTF-16/32): it is decoded as `json.loads` would and scanned at once,
    skipping the encoding sniff and the two whitespace matches. A document that
    does not end the text (trailing space, extra data) goes to `json.loads`.
    """
    try:
        if body[:1] == b"{" and body[1:2] != b"\x00":
            text = body.decode("utf-8", "surrogatepass")
            doc, end = _raw_decode(text)
            if end == len(text):
                return doc
        return json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def _parse_total(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        total = int(value.strip())
    except ValueError:
        return None
    return total if total >= 0 else None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        lower = name.lower()
        for key, val in headers.items():
            if key.lower() == lower:
                return val
    return value


def _error_from_body(http_status: int, doc: Any) -> tuple[int | None, str, bool]:
    """(status_code, description, whether the body carried a status_code we cannot classify).

    A status_code that is not a JSON integer (`"2007"`, `2007.0`, `true`, `[2007]`) is
    malformed: it is dropped, and said in the description; an integer outside the
    vendor's error rows is unknown. Either way the body does not follow the contract.
    """
    if not isinstance(doc, dict):
        return None, f"HTTP {http_status}", False
    raw = doc.get("status_code")
    desc = doc.get("description")
    code = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
    text = desc if isinstance(desc, str) and desc else None
    row = STATUS_TABLE.get(code) if code is not None else None
    if text is None and row is not None and row.error is not None:
        text = row.description  # an error row's text; never the success row's
    text = text or f"HTTP {http_status}"
    if raw is not None and code is None:
        text = f"malformed status_code {json.dumps(raw)[:40]}: {text}"
    unclassified = raw is not None and (row is None or row.error is None)
    return code, text, unclassified


def parse_response(
    http_status: int, headers: Mapping[str, str], body: bytes, page: int | None = None
) -> PageData:
    """Classify one response: return its page, or raise the error of its class.

    Raises a `TransientError` subclass (2007, 3454, HTTP 429/502/503/504 whatever
    the body's code, a 500 without the vendor's JSON body), `TokenExpiredError`
    (2004), or a permanent `ApiError` subclass. A 200 whose body is not the
    contract's success document, or an error body whose `status_code` is unknown
    or not an integer (outside HTTP 429/502/503/504), raises
    `UnexpectedResponseError` rather than crashing.
    """
    doc = _decode_json(body)
    if http_status == 200 and isinstance(doc, dict) and doc.get("status_code") == SUCCESS_CODE:
        records = doc.get("response")
        if records is None:
            records = []
        if not isinstance(records, list) or not all(map(isinstance, records, repeat(dict))):
            raise e.UnexpectedResponseError(
                "response is not a list of chat objects",
                status_code=SUCCESS_CODE,
                http_status=http_status,
                page=page,
            )
        return PageData(records, _parse_total(_header(headers, TOTAL_HEADER)), body)

    code, description, unclassified = _error_from_body(http_status, doc)
    row = STATUS_TABLE.get(code) if code is not None else None
    if http_status in TRANSIENT_HTTP:  # the contract's table: transient whatever the body says
        cls: type[e.ApiError] = TRANSIENT_HTTP[http_status]
    elif row is not None and row.error is not None:
        cls = row.error
    elif unclassified and http_status != 200:
        cls = e.UnexpectedResponseError  # a vendor body we cannot read: not retried blindly
    elif http_status == 500:
        cls = e.InternalServerError  # a bare 500 without the vendor's body
    elif http_status == 401:
        cls = e.TokenExpiredError
    elif http_status == 404 and code is None:  # not the service's own 404 (2010 has a body)
        cls = e.UnexpectedResponseError
        description = (
            "HTTP 404 without the vendor's JSON body: is base_url the tenant's v3.0 root, "
            "e.g. https://acme.imi.chat/v3.0?"
        )
    elif 300 <= http_status < 400:
        cls = e.UnexpectedResponseError
        description = f"redirect refused (HTTP {http_status}): the bearer token is never resent"
    else:
        cls = e.UnexpectedResponseError
        if http_status == 200:
            description = "malformed success body" if doc is None else "unexpected success body"
    if issubclass(cls, e.TransientError):
        return _raise_transient(cls, description, code, http_status, page, headers)
    raise cls(description, status_code=code, http_status=http_status, page=page)


def _raise_transient(
    cls: type[e.TransientError],
    description: str,
    code: int | None,
    http_status: int,
    page: int | None,
    headers: Mapping[str, str],
) -> PageData:
    raise cls(
        description,
        status_code=code,
        http_status=http_status,
        page=page,
        retry_after=parse_retry_after(_header(headers, RETRY_AFTER_HEADER)),
    )


def is_loopback_host(host: str) -> bool:
    """True for localhost and the loopback ranges 127.0.0.0/8 and ::1."""
    import ipaddress

    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
