"""The public surface promised in public-api.md: names, importability, error tree."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import json
import pickle
import sys
from pathlib import Path

import pytest

import imichat_async as imi
import imichat_async.export as ex
from imichat_async import _errors as errors
from imichat_async import _protocol as protocol
from tests.helpers import imported_modules

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


#: The whole public surface, as a literal: adding or removing a name is a decision.
PUBLIC_NAMES = [
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


def test_all_is_exactly_the_public_surface() -> None:
    """__all__ equals the literal list of public names (nothing more, nothing less)."""
    assert sorted(imi.__all__) == PUBLIC_NAMES


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
        ("TokenProviderError", ["ImiChatError"]),
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


def _every_error_class() -> list[type[BaseException]]:
    return [
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if c.__module__ == errors.__name__ and issubclass(c, BaseException)
    ]


def _filled(cls: type[BaseException]) -> BaseException:
    """An instance of `cls` with every attribute it has set to a non-default value."""
    if issubclass(cls, errors.TransientError):
        return cls("d", status_code=2007, http_status=503, page=4, retry_after=7.5)
    if issubclass(cls, errors.ApiError):
        return cls("d", status_code=3445, http_status=400, page=4)
    if issubclass(cls, errors.DecodeError):
        return cls("cannot decode page 4", page=4, field="asset.id")
    return cls("message")


@pytest.mark.parametrize("cls", _every_error_class(), ids=lambda c: c.__name__)
def test_every_error_class_pickles_with_all_its_attributes(cls: type[BaseException]) -> None:
    """Each class of _errors round-trips through pickle: type, message and every attribute."""
    err = _filled(cls)
    if sys.version_info >= (3, 11):  # add_note is new in 3.11
        err.add_note("a note")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert str(back) == str(err)
    assert back.args == err.args
    assert vars(back) == vars(err)
    assert getattr(back, "retry_after", None) == (
        7.5 if isinstance(err, errors.TransientError) else None
    )
    assert getattr(back, "page", None) == (4 if hasattr(err, "page") else None)
    assert getattr(back, "field", None) == (
        "asset.id" if isinstance(err, errors.DecodeError) else None
    )


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


# -- integrations use public surfaces (issue #25) ------------------------------------------------

_LIBRARY = Path(imi.__file__).parent
_PUBLIC = {*imi.__all__, *ex.__all__}


def _private_reach(source: str) -> list[str]:
    """What a module of `imichat_async` takes of the library's privates: a private name, or a
    name no public `__all__` lists, imported from a private module (`export._plan.RawRecord`,
    `_limiter.Limiter`); a private attribute of another object (`client._portal`; its own
    `self._x` and dunders are fine)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (
            node.level or "imichat_async" in (node.module or "")
        ):
            parts = (node.module or "").split(".")
            private_module = any(p.startswith("_") for p in parts)
            for alias in node.names:
                if alias.name.startswith("_") or (private_module and alias.name not in _PUBLIC):
                    found.append(f"{node.module}.{alias.name}")
        elif (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.append(ast.unparse(node))
    return found


@pytest.mark.parametrize("module", ["dlt.py", "sync.py", "dask.py"])
def test_integrations_use_public_surfaces(module: str) -> None:
    """dlt.py and sync.py take only public names from the library: no `export._plan`,
    `export._syncplan`, `_limiter.Limiter`, `CONVERTER`, nor another object's `_portal`."""
    assert _private_reach((_LIBRARY / module).read_text()) == []


def test_private_reach_sees_what_the_integrations_did() -> None:
    """The check above catches each reach issue #25 found, and lets public names through."""
    source = (
        "from .export._plan import RawRecord, UserQuery\n"
        "from .export import _syncplan, sync_chats\n"
        "from ._limiter import Limiter\n"
        "from ._records import CONVERTER, Chat\n"
        "portal, client = blocking._portal, blocking._client\n"
        "x = self._ok\n"
    )
    assert _private_reach(source) == [
        "export._plan.RawRecord",
        "export._plan.UserQuery",
        "export._syncplan",
        "_limiter.Limiter",
        "_records.CONVERTER",
        "blocking._portal",
        "blocking._client",
    ]


# -- subpackages take the root's public names only (issue #25) ----------------------------------

#: The subpackages of `imichat_async` that build on its public surface.
_SUBPACKAGES = ("export", "cli", "sandbox")
_SUBPACKAGE_MODULES = sorted(
    path.relative_to(_LIBRARY) for sub in _SUBPACKAGES for path in (_LIBRARY / sub).rglob("*.py")
)


def _root_private_imports(path: Path, library: Path = _LIBRARY) -> list[str]:
    """The private modules of the root package (`imichat_async._records`) that `path`, a module
    under `library`, imports: relative (`from .._records import`, `from .. import _protocol`)
    or absolute (`imichat_async._arrow`), at the top or in a function. Dunders are public."""
    package = ".".join(path.relative_to(library.parent).parts[:-1])  # an __init__'s: its own
    found: set[str] = set()
    for name in imported_modules(path, package):
        root, _, rest = name.partition(".")
        first = rest.split(".")[0]
        if root == library.name and first.startswith("_") and not first.startswith("__"):
            found.add(f"{root}.{first}")
    return sorted(found)


@pytest.mark.parametrize("module", _SUBPACKAGE_MODULES, ids=str)
def test_subpackages_import_no_private_module_of_the_root(module: Path) -> None:
    """export/, cli/ and sandbox/ import from the root package only what it exports: no
    `.._records`, `.._query`, `from .. import _protocol` (their own private modules are theirs)."""
    assert _root_private_imports(_LIBRARY / module) == []


def test_the_subpackage_check_sees_every_form_of_a_private_import(tmp_path: Path) -> None:
    """The check above finds each way a module of a subpackage can import a private module of
    the root, and lets public names, dunders and the subpackage's own modules through."""
    library = tmp_path / "imichat_async"
    (library / "export").mkdir(parents=True)
    probe = library / "export" / "_probe.py"
    probe.write_text(
        "from .._records import CONVERTER as converter\n"
        "from .. import Filter, InvalidQueryError, __version__\n"
        "from .. import _protocol as protocol\n"
        "import imichat_async._arrow\n"
        "from imichat_async._query import build_query\n"
        "from ._plan import UserQuery\n"
        "from . import _sinks\n"
        "def late() -> None:\n"
        "    from .._errors import ConfigurationError\n"
    )
    assert _root_private_imports(probe, library) == [
        "imichat_async._arrow",
        "imichat_async._errors",
        "imichat_async._protocol",
        "imichat_async._query",
        "imichat_async._records",
    ]
    assert len(_SUBPACKAGE_MODULES) > 30  # every module of the three subpackages is checked


def test_the_ndjson_sink_writes_a_lone_surrogate_as_its_escape(tmp_path: Path) -> None:
    """A record holding a lone surrogate (valid JSON, no UTF-8), given as a dict or as a
    text the server spread over lines, is one line of compact JSON that reads back as it."""
    record = {"chat_id": "a", "note": "\ud800 \u00e9"}
    spread = imi.ChatText(b'{"chat_id": "a",\n "note": "\\ud800 \\u00e9"}', chat_id="a")
    out = ex.NdjsonSink(tmp_path / "x.ndjson").encode([record, spread])
    lines = out.splitlines()
    assert len(lines) == 2
    assert [json.loads(line) for line in lines] == [record, record]
    assert lines[0] == b'{"chat_id":"a","note":"\\ud800 \\u00e9"}'
