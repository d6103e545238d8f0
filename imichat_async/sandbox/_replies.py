"""Every answer the sandbox sends but a page of chats, each counted in `Stats.errors_by_code`.

The vendor's JSON error form (`{"status_code", "description", "response":
null}`, the status table's HTTP status) and a gateway's own answers, which are
not in that form: 429 with `{"message": "Too Many Requests"}`, nginx's HTML
404 (a path outside the API), 502 and 504, an empty 503.
"""

from __future__ import annotations

from aiohttp import web

from .faults import Stats
from .vendor import CODES, RETRY_AFTER_HEADER, describe

_TOO_MANY = {"message": "Too Many Requests"}

_HTML_404 = (
    "<html><head><title>404 Not Found</title></head><body><center><h1>404 Not Found</h1>"
    "</center><hr><center>nginx</center></body></html>\n"
)
_HTML_502 = (
    "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1>"
    "</center><hr><center>nginx</center></body></html>\n"
)
_HTML_504 = (
    "<html><head><title>504 Gateway Time-out</title></head><body><center><h1>504 Gateway "
    "Time-out</h1></center><hr><center>nginx</center></body></html>\n"
)


def vendor_error(stats: Stats, code: int) -> web.Response:
    """The vendor's row `code` (one without blanks to fill), in the vendor's JSON form."""
    return error_response(stats, code, CODES[code].http_status, describe(code))


def method_not_allowed(stats: Stats) -> web.Response:
    """2099 (HTTP 405) with the `Allow` header RFC 9110 requires of a 405: only POST is."""
    response = vendor_error(stats, 2099)
    response.headers["Allow"] = "POST"
    return response


def error_response(stats: Stats, code: int, http_status: int, description: str) -> web.Response:
    """A JSON error in the vendor's form; a 2004 also counts in `stats.expired_hits`."""
    stats.errors_by_code[code] += 1
    if code == 2004:
        stats.expired_hits += 1
    body = {"status_code": code, "description": description, "response": None}
    return web.json_response(body, status=http_status)


def not_found(stats: Stats) -> web.Response:
    """The front server's 404 for a path outside the API (nginx's HTML, not the vendor's JSON)."""
    stats.errors_by_code[404] += 1
    return web.Response(status=404, text=_HTML_404, content_type="text/html")


def too_many(stats: Stats, retry_after: str | None) -> web.Response:
    """A gateway's 429, with `Retry-After: retry_after` unless it is None."""
    stats.errors_by_code[429] += 1
    headers = {RETRY_AFTER_HEADER: retry_after} if retry_after is not None else None
    return web.json_response(_TOO_MANY, status=429, headers=headers)


def gateway_error(stats: Stats, status: int) -> web.Response:
    """A gateway's 502 or 504 (nginx's HTML page) or 503 (empty body)."""
    stats.errors_by_code[status] += 1
    if status == 503:
        return web.Response(status=503)
    html = _HTML_502 if status == 502 else _HTML_504
    return web.Response(status=status, text=html, content_type="text/html")
