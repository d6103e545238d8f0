"""imichat_async: an asyncio client for the IMIchat (Webex Engage) chats-search API.

`ImiChatClient.search_chats()` streams every matching chat: pages prefetched
concurrently under one bound, handed out in order, transient failures retried,
an expired token refreshed once for all requests in flight, records decoded
into attrs classes.
"""

import logging

from ._client import ChatPage, ClientStats, ImiChatClient
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
    TokenExpiredError,
    TransientError,
    UnexpectedResponseError,
)
from ._paging import PagingStats
from ._query import Filter
from ._records import Asset, Channel, Chat, ChatStatus

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
    "NetworkError",
    "PagingStats",
    "RateLimitedError",
    "ResponseTooLargeError",
    "SearchTimeoutError",
    "TeamNotFoundError",
    "TokenExpiredError",
    "TransientError",
    "UnexpectedResponseError",
]
