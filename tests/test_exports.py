"""The public surface promised in public-api.md: names, importability, error tree."""

from __future__ import annotations

import builtins
import importlib
import inspect
import pickle

import pytest

import imichat_async as imi
from imichat_async import _errors as errors
from imichat_async import _protocol as protocol

PROMISED = [
    "ImiChatClient",
    "Filter",
    "Chat",
    "Asset",
    "ChatStatus",
    "Channel",
    "ImiChatError",
    "ApiError",
    "InvalidQueryError",
]


@pytest.mark.parametrize("name", PROMISED)
def test_promised_name_exported(name: str) -> None:
    """Each promised name is in __all__ and importable from the package."""
    assert name in imi.__all__
    module = importlib.import_module("imichat_async")
    assert getattr(module, name) is getattr(imi, name)


def test_all_is_importable_and_unique() -> None:
    """Every name of __all__ exists, once."""
    assert len(imi.__all__) == len(set(imi.__all__))
    for name in imi.__all__:
        assert hasattr(imi, name), name


def test_star_import() -> None:
    """from imichat_async import * gives the promised names."""
    ns: dict[str, object] = {}
    exec("from imichat_async import *", ns)
    assert set(PROMISED) <= set(ns)


@pytest.mark.parametrize("code", sorted(c for c, r in protocol.STATUS_TABLE.items() if r.error))
def test_one_api_error_subclass_per_row(code: int) -> None:
    """Each error row of the vendor's table maps to its own exported ApiError subclass."""
    cls = protocol.STATUS_TABLE[code].error
    assert cls is not None
    assert issubclass(cls, imi.ApiError)
    assert cls is not imi.ApiError
    assert getattr(imi, cls.__name__) is cls
    assert cls.__name__ in imi.__all__


def test_row_classes_are_distinct() -> None:
    """No two rows of the table share an error class."""
    classes = [r.error for r in protocol.STATUS_TABLE.values() if r.error]
    assert len(classes) == len(set(classes))


@pytest.mark.parametrize(
    ("child", "parents"),
    [
        ("ApiError", ["ImiChatError"]),
        ("InvalidQueryError", ["ImiChatError", "ValueError"]),
        ("TransientError", ["ApiError"]),
        ("InternalServerError", ["TransientError"]),
        ("ChatListUnavailableError", ["TransientError"]),
        ("RateLimitedError", ["TransientError"]),
        ("GatewayError", ["TransientError"]),
        ("NetworkError", ["TransientError"]),
        ("TokenExpiredError", ["ApiError"]),
        ("MissingHeaderError", ["AuthenticationError"]),
        ("InvalidTokenError", ["AuthenticationError"]),
        ("InvalidFilterParamError", ["BadRequestError"]),
        ("InvalidFilterValueError", ["BadRequestError"]),
        ("DecodeError", ["ImiChatError"]),
        ("SearchTimeoutError", ["ImiChatError", "TimeoutError"]),
        ("ConfigurationError", ["ImiChatError", "ValueError"]),
    ],
)
def test_error_tree(child: str, parents: list[str]) -> None:
    """The error classes subclass what the docs promise."""
    cls = getattr(imi, child)
    for parent in parents:
        base = getattr(imi, parent, None) or getattr(builtins, parent)
        assert issubclass(cls, base), (child, parent)


def test_every_library_exception_derives_from_base() -> None:
    """Every exception class in errors is an ImiChatError."""
    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__
    ]
    assert classes
    for cls in classes:
        assert issubclass(cls, imi.ImiChatError), cls


def test_api_error_attributes_and_pickle() -> None:
    """ApiError carries status_code, http_status, description and survives pickling."""
    err = imi.ApiError("boom", status_code=3445, http_status=400).with_page(3)
    assert (err.status_code, err.http_status, err.description, err.page) == (3445, 400, "boom", 3)
    assert "page 3" in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is imi.ApiError
    assert (back.status_code, back.http_status, back.description, back.page) == (
        3445,
        400,
        "boom",
        3,
    )
    assert str(back) == str(err)


def test_client_constructor_keywords() -> None:
    """ImiChatClient takes the promised keywords, with concurrency defaulting to 8."""
    params = inspect.signature(imi.ImiChatClient).parameters
    for name in (
        "base_url",
        "token",
        "team_id",
        "concurrency",
        "timeout",
        "max_retries",
        "session",
    ):
        assert name in params
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["concurrency"].default == 8


def test_search_chats_keywords() -> None:
    """search_chats takes filters, condition, prefetch, start_page, max_pages and **params."""
    params = inspect.signature(imi.ImiChatClient.search_chats).parameters
    for name in ("filters", "condition", "prefetch", "start_page", "max_pages"):
        assert name in params
    assert params["condition"].default == "and"
    assert params["start_page"].default == 1
    assert params["max_pages"].default is None
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
