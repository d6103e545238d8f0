"""The vendor's page and the wire contract, as the sandbox reads them: its own copy.

Written from ``shared/spec/seed-chats-search.txt`` (params, operators,
values, page size, status codes) and ``shared/spec/wire-contract.md`` (path,
headers), independently of the client's ``imichat_async._protocol``: the
sandbox checks the client, it does not echo it. A wrong row in either copy
shows as a disagreement in ``tests/test_sandbox_vendor.py``, which compares
the two, and as a failing integration test. Nothing here is imported from
the client.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

# -- wire contract: "Request" ----------------------------------------------------------------

API_ROOT = "/v3.0"  # "the tenant's v3.0 root, e.g. https://acme.imi.chat/v3.0"
SEARCH_PATH = "/chats/search"
AUTH_HEADER = "Authorization"  # "Authorization: Bearer {access_token}"
TEAM_HEADER = "teamid"
TOTAL_HEADER = "X-Total-Count"  # "The server MAY send X-Total-Count: {n}"
RETRY_AFTER_HEADER = "Retry-After"
PAGE_SIZE = 10  # "This endpoint is paginated response and retrieves 10 records at a time"
CONDITIONS = ("and", "or")

# -- vendor page: "Supported Params and Operators" --------------------------------------------

#: The table as the page prints it: a param, its operators.
_PARAMS_AND_OPERATORS = """
status                  eq,not_eq
created_at              eq,lt,gt,lte,gte
updated_at              eq,lt,gt,lte,gte
channel                 eq
tag                     eq
assignee                eq
facebook_psid           eq
twitter_id              eq
email_id                eq
mobile                  eq
livechat_id             eq
abc_user_id             eq
whatsapp_mobile_number  eq
intent                  eq
group                   eq
"""
#: Each param and its operators, in the page's order (`intent`, `group`: "Applicable to
#: ABC channel").
OPERATORS: Mapping[str, tuple[str, ...]] = {
    param: tuple(ops.split(","))
    for param, ops in (row.split() for row in _PARAMS_AND_OPERATORS.strip().splitlines())
}
#: Params whose value is a datetime ("datetime - UTC Format").
DATETIMES = frozenset({"created_at", "updated_at"})
#: The Chat List OBJECT's enums: "Possible Values".
STATUSES = ("queued", "picked", "onhold", "closed")
CHANNELS = ("sms", "facebook", "twitter", "livechat", "email", "abc", "whatsapp", "api")
#: Params whose value must be one of the enum's values.
CLOSED_VALUES: Mapping[str, tuple[str, ...]] = {"status": STATUSES, "channel": CHANNELS}
#: The destination-id params and the channel of the `destination_id` each matches
#: (the `destination_id` row of the Chat List OBJECT; "API - User ID" has no param).
DESTINATIONS: Mapping[str, str] = {
    "mobile": "sms",  # "SMS - Mobile No"
    "facebook_psid": "facebook",  # "Facebook - PS ID"
    "twitter_id": "twitter",  # "Twitter - Twitter ID"
    "email_id": "email",  # "Email - Email ID"
    "livechat_id": "livechat",  # "Livechat - Livechat ID"
    "abc_user_id": "abc",  # "Apple Business Chat - ABC Opaque User ID"
    "whatsapp_mobile_number": "whatsapp",  # "WhatsApp Business - WhatsApp Mobile Number"
}

# -- vendor page: "Response Codes" -------------------------------------------------------------


class Code(NamedTuple):
    """One row of "Response Codes": the HTTP status and the description, as the page says
    them (`<param_name>`, `{0}` the value and `{1}` the param: see `describe`)."""

    http_status: int
    description: str


#: The table as the page prints it: status_code, HTTP status, description. The page breaks
#: 3114's description over two lines; on the wire it is one sentence.
_RESPONSE_CODES = """
4305 200 The list of chats retrieved successfully
2002 400 Invalid header param - could not find mandatory header parameters
2003 400 Invalid Access Token
2004 401 Access Token expired
2007 500 Internal Server Error
2010 404 Could not find details of team based on the teamid passed in the header
2099 405 Method not allowed
3114 400 Request body not provided. Check Content-Type header
3115 400 Request is invalid
3445 400 Provided filtration parameter: <param_name> is not valid
3446 400 Provided operator for filtration parameter: <param_name> is not valid
3447 400 Provided condition is not valid
3451 400 Search query request format is not valid
4303 400 Invalid input value:'{0}' provided for filtration parameter:'{1}'
3454 500 Chat list could not be retrieved
"""
SUCCESS = 4305
#: status_code -> its row, in the page's order.
CODES: Mapping[int, Code] = {
    int(code): Code(int(http_status), description)
    for code, http_status, description in (
        row.split(" ", 2) for row in _RESPONSE_CODES.strip().splitlines()
    )
}


def describe(code: int, param: str = "", value: str = "") -> str:
    """The description of row `code` with its blanks filled: `<param_name>` and `{1}` by
    `param`, `{0}` by `value` (raises `KeyError` for a code not on the page)."""
    text = CODES[code].description
    return _BLANK.sub(lambda m: value if m.group() == "{0}" else param, text)


_BLANK = re.compile(r"<param_name>|\{0\}|\{1\}")
