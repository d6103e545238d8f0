"""Every exception the library raises, one class per row of the vendor's status table.

The tree::

    ImiChatError
    ├── InvalidQueryError (also ValueError)   rejected before any request is sent
    ├── ConfigurationError (also ValueError)  bad client argument (e.g. http:// to a remote host)
    ├── SearchTimeoutError (also TimeoutError) a whole search's deadline passed
    ├── TokenProviderError                    the token callable raised (its error chained)
    ├── DecodeError                           an undecodable record (names page and field)
    └── ApiError                              an answer: status_code, http_status, description
        ├── TransientError                    retried with backoff; raised when retries run out
        │   ├── InternalServerError           2007 / HTTP 500
        │   ├── ChatListUnavailableError      3454 / HTTP 500
        │   ├── RateLimitedError              HTTP 429 (carries retry_after)
        │   ├── GatewayError                  HTTP 502, 503, 504 (HTML or empty body)
        │   └── NetworkError                  no response: refused, reset, DNS, timeout
        ├── TLSError                          TLS/SSL handshake failed; never retried
        ├── TokenExpiredError                 2004 / HTTP 401 (refreshed once, then retried)
        ├── AuthenticationError
        │   ├── MissingHeaderError            2002
        │   └── InvalidTokenError             2003
        ├── TeamNotFoundError                 2010
        ├── MethodNotAllowedError             2099
        ├── BadRequestError
        │   ├── MissingBodyError              3114
        │   ├── InvalidRequestError           3115
        │   ├── InvalidFilterParamError       3445
        │   ├── InvalidFilterOperatorError    3446
        │   ├── InvalidConditionError         3447
        │   ├── InvalidQueryFormatError       3451
        │   └── InvalidFilterValueError       4303
        ├── ResponseTooLargeError             body above the client's cap
        └── UnexpectedResponseError           anything else: unknown code, redirect, malformed body

No message built here ever contains a token: errors are made from the status
code, the HTTP status and the vendor's description only.

Every class pickles with all its attributes (`ImiChatError.__reduce__`), so an
error crosses a process pool intact.
"""

from __future__ import annotations

from typing import Any


class ImiChatError(Exception):
    """Base of everything imichat_async raises."""

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuild without calling __init__ (whose keywords differ per class), then restore
        # the message and every attribute: retry_after, page, field, ... all survive.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


def _rebuild(cls: type[ImiChatError], args: tuple[object, ...], state: dict[str, object]) -> Any:
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class InvalidQueryError(ImiChatError, ValueError):
    """A query rejected before any request: unknown param, operator, or a bad value."""


class ConfigurationError(ImiChatError, ValueError):
    """A client argument that cannot work (e.g. a cleartext URL to a remote host)."""


class SearchTimeoutError(ImiChatError, TimeoutError):
    """A search's `deadline` passed before it finished."""


class TokenProviderError(ImiChatError):
    """The token callable raised instead of returning a token; its exception is `__cause__`.

    The message names the exception's type only: its text, which may quote a
    credential, stays on the chained original.
    """


class DecodeError(ImiChatError):
    """A record the server sent that cannot be decoded into a `Chat`.

    The message names the page, the record's index on the page and the field.
    """

    def __init__(self, message: str, *, page: int | None = None, field: str | None = None):
        super().__init__(message)
        self.page = page
        self.field = field


class ApiError(ImiChatError):
    """An answer from the API that is an error (or a transient one whose retries ran out).

    `status_code` is the vendor's code (None when the body carried none, e.g. a
    gateway's HTML page or a dropped connection); `http_status` is the HTTP
    status (0 when no response arrived); `description` is the vendor's text.
    """

    def __init__(
        self,
        description: str,
        *,
        status_code: int | None = None,
        http_status: int = 0,
        page: int | None = None,
    ) -> None:
        self.description = description
        self.status_code = status_code
        self.http_status = http_status
        self.page = page
        super().__init__(self._message())

    def _message(self) -> str:
        where = f", page {self.page}" if self.page is not None else ""
        if self.http_status == 0:  # nothing came back: the description says what failed
            return f"{self.description}{f' (page {self.page})' if self.page is not None else ''}"
        code = (
            f"status_code {self.status_code}"
            if self.status_code is not None
            else "no vendor status_code"
        )
        return f"{self.description} (HTTP {self.http_status}, {code}{where})"

    def with_page(self, page: int) -> ApiError:
        """Return this error stamped with the page it happened on (for the message)."""
        self.page = page
        self.args = (self._message(),)
        return self


class TransientError(ApiError):
    """Worth retrying (the contract's transient class); `retry_after` is the server's hint, in s."""

    def __init__(
        self,
        description: str,
        *,
        status_code: int | None = None,
        http_status: int = 0,
        page: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(description, status_code=status_code, http_status=http_status, page=page)


class InternalServerError(TransientError):
    """2007: Internal Server Error."""


class ChatListUnavailableError(TransientError):
    """3454: Chat list could not be retrieved."""


class RateLimitedError(TransientError):
    """HTTP 429 in front of the service; honour `retry_after`."""


class GatewayError(TransientError):
    """HTTP 502/503/504 from a gateway, usually with an HTML or empty body."""


class NetworkError(TransientError):
    """No usable response: connection refused or reset, DNS failure, or a timeout.

    The description says which, e.g. "no response from the server: connection
    refused by 127.0.0.1:1".
    """


class TLSError(ApiError):
    """The TLS/SSL handshake failed: certificate verification, or https:// to a plain-HTTP port.

    Never retried: the same handshake fails the same way. `http_status` is 0.
    """


class TokenExpiredError(ApiError):
    """2004: access token expired. Refreshed once (single flight), then retried."""


class AuthenticationError(ApiError):
    """The credentials were refused."""


class MissingHeaderError(AuthenticationError):
    """2002: a mandatory header is missing."""


class InvalidTokenError(AuthenticationError):
    """2003: invalid access token."""


class TeamNotFoundError(ApiError):
    """2010: no team for the teamid header."""


class MethodNotAllowedError(ApiError):
    """2099: method not allowed."""


class BadRequestError(ApiError):
    """The server rejected the request's body or filters."""


class MissingBodyError(BadRequestError):
    """3114: request body not provided."""


class InvalidRequestError(BadRequestError):
    """3115: request is invalid."""


class InvalidFilterParamError(BadRequestError):
    """3445: a filtration parameter is not valid."""


class InvalidFilterOperatorError(BadRequestError):
    """3446: an operator is not valid for its parameter."""


class InvalidConditionError(BadRequestError):
    """3447: the condition is not valid."""


class InvalidQueryFormatError(BadRequestError):
    """3451: search query request format is not valid."""


class InvalidFilterValueError(BadRequestError):
    """4303: invalid input value for a filtration parameter."""


class ResponseTooLargeError(ApiError):
    """A response body above the client's `max_response_bytes`."""


class UnexpectedResponseError(ApiError):
    """An answer outside the contract: unknown code, redirect, malformed JSON on a 200."""
