"""imichat_async: an asyncio client for the IMIchat (Webex Engage) chats-search API.

`ImiChatClient.search_chats()` streams every matching chat: pages prefetched
concurrently under one bound, handed out in order, transient failures retried,
an expired token refreshed once for all requests in flight, records decoded
into attrs classes.
"""

import logging

from ._client import ImiChatClient
from ._errors import (
    ApiError,
    AuthenticationError,
    BadRequestError,
    ChatListUnavailableError,
    ConfigurationError,
    DecodeError,
    GatewayError,
    ImiChatError,
    InternalServerError,
    InvalidConditionError,
    InvalidFilterOperatorError,
    InvalidFilterParamError,
    InvalidFilterValueError,
    InvalidQueryError,
    InvalidQueryFormatError,
    InvalidRequestError,
    InvalidTokenError,
    MethodNotAllowedError,
    MissingBodyError,
    MissingHeaderError,
    NetworkError,
    RateLimitedError,
    ResponseTooLargeError,
    SearchTimeoutError,
    TeamNotFoundError,
    TLSError,
    TokenExpiredError,
    TokenProviderError,
    TransientError,
    UnexpectedResponseError,
)
from ._fetch import ClientStats
from ._paging import PagingStats
from ._protocol import ChatText, PreparedRequest, RawChat
from ._query import Filter, check_filters
from ._ratestore import RedisRateStore
from ._records import Asset, Channel, Chat, ChatStatus, parse_utc
from ._results import ChatPage
from ._retry import RetryPolicy
from ._transport import MockTransport, RawResponse, Transport

__version__ = "0.1.0"

# A library logs, the application decides where it goes (no lastResort output on stderr).
logging.getLogger("imichat_async").addHandler(logging.NullHandler())

__all__ = [
    "ApiError",
    "Asset",
    "AuthenticationError",
    "BadRequestError",
    "Channel",
    "Chat",
    "ChatListUnavailableError",
    "ChatPage",
    "ChatStatus",
    "ChatText",
    "ClientStats",
    "ConfigurationError",
    "DecodeError",
    "Filter",
    "GatewayError",
    "ImiChatClient",
    "ImiChatError",
    "InternalServerError",
    "InvalidConditionError",
    "InvalidFilterOperatorError",
    "InvalidFilterParamError",
    "InvalidFilterValueError",
    "InvalidQueryError",
    "InvalidQueryFormatError",
    "InvalidRequestError",
    "InvalidTokenError",
    "MethodNotAllowedError",
    "MissingBodyError",
    "MissingHeaderError",
    "MockTransport",
    "NetworkError",
    "PagingStats",
    "PreparedRequest",
    "RateLimitedError",
    "RawChat",
    "RawResponse",
    "RedisRateStore",
    "ResponseTooLargeError",
    "RetryPolicy",
    "SearchTimeoutError",
    "TLSError",
    "TeamNotFoundError",
    "TokenExpiredError",
    "TokenProviderError",
    "TransientError",
    "Transport",
    "UnexpectedResponseError",
    "check_filters",
    "parse_utc",
]
