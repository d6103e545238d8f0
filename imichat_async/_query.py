"""Queries: keyword and `Filter` forms into checked (param, operator, value) triples.

The param/operator table and the closed value sets are data in `protocol`;
this module only checks against them. Everything wrong raises
`InvalidQueryError` naming the param, the operator or the value, before any
request is sent.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, timezone
from typing import Any

import attrs

from . import _protocol as protocol
from ._errors import InvalidQueryError
from ._records import parse_utc


@attrs.frozen
class Filter:
    """One filter in the explicit form: `Filter("created_at", "gte", datetime(...))`."""

    param: str
    operator: str
    value: Any


@attrs.frozen
class Query:
    """A checked query: wire-ready (param, operator, value) triples and the condition."""

    filters: tuple[tuple[str, str, str], ...] = ()
    condition: str = "and"

    def body(self) -> bytes:
        """The request body for this query."""
        return protocol.build_body(self.filters, self.condition)


def format_datetime(value: datetime) -> str:
    """ISO 8601 in UTC with a `Z` suffix; a naive datetime is taken as UTC.

    Raises `OverflowError` for an instant outside years 1-9999 once in UTC.
    """
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    text = value.astimezone(timezone.utc).replace(tzinfo=None).isoformat()
    return text + "Z"


def _check_value(param: str, operator: str, value: Any) -> str:
    where = f"{param}__{operator}" if operator != "eq" else param
    if param in protocol.DATETIME_PARAMS:
        return _datetime_value(where, value)
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidQueryError(
            f"invalid value {value!r:.80} for {where}: "
            f"expected a string, got {type(value).__name__}"
        )
    text = str(value)
    allowed = protocol.ENUM_PARAM_VALUES.get(param)
    if allowed is not None and text not in allowed:
        raise InvalidQueryError(
            f"invalid value {text!r:.80} for {where}: expected one of {', '.join(allowed)}"
        )
    if not text.strip():
        raise InvalidQueryError(f"invalid value {text!r} for {where}: must not be empty")
    return text


def _datetime_value(where: str, value: Any) -> str:
    try:
        if isinstance(value, datetime):
            return format_datetime(value)
        if isinstance(value, date):
            return format_datetime(
                datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
            )
        if isinstance(value, str):
            return format_datetime(parse_utc(value))
    except (ValueError, OverflowError):
        raise InvalidQueryError(
            f"invalid value {value!r:.80} for {where}: expected an ISO 8601 datetime "
            "within years 1-9999 in UTC"
        ) from None
    raise InvalidQueryError(
        f"invalid value {value!r:.80} for {where}: expected a datetime or an ISO 8601 string"
    )


def check_filter(param: Any, operator: Any, value: Any) -> tuple[str, str, str]:
    """One (param, operator, value) checked against the vendor's table."""
    if not isinstance(param, str) or param not in protocol.PARAM_OPERATORS:
        raise InvalidQueryError(
            f"unknown filter param {param!r:.80}; known: {', '.join(protocol.PARAM_OPERATORS)}"
        )
    ops = protocol.PARAM_OPERATORS[param]
    if not isinstance(operator, str) or operator not in ops:
        raise InvalidQueryError(
            f"operator {operator!r:.40} is not valid for param {param!r}; valid: {', '.join(ops)}"
        )
    return (param, operator, _check_value(param, operator, value))


def split_keyword(key: str) -> tuple[str, str]:
    """`"created_at__gte"` -> `("created_at", "gte")`; `"status"` -> `("status", "eq")`."""
    param, sep, operator = key.rpartition("__")
    if not sep:
        return key, "eq"
    if param in protocol.PARAM_OPERATORS:
        return param, operator
    if key in protocol.PARAM_OPERATORS:
        return key, "eq"
    return param, operator


def build_query(
    keywords: Mapping[str, Any] | None = None,
    filters: Iterable[Filter | tuple[str, str, Any]] | None = None,
    condition: str = "and",
) -> Query:
    """Check both filter forms and the condition; raise `InvalidQueryError` on the first fault."""
    if condition not in protocol.CONDITIONS:
        raise InvalidQueryError(
            f"invalid condition {condition!r:.40}: expected one of {', '.join(protocol.CONDITIONS)}"
        )
    checked: list[tuple[str, str, str]] = []
    if filters is not None:
        if isinstance(filters, (str, bytes, Mapping, Filter)) or not isinstance(filters, Iterable):
            raise InvalidQueryError(
                f"filters= takes a list of imi.Filter(param, operator, value), "
                f"got {type(filters).__name__}"
            )
        for item in filters:
            checked.append(_explicit(item))
    for key, value in (keywords or {}).items():
        param, operator = split_keyword(key)
        if param not in protocol.PARAM_OPERATORS:
            raise InvalidQueryError(
                f"unknown filter param {param!r:.80} (from keyword {key!r:.80}); "
                f"known: {', '.join(protocol.PARAM_OPERATORS)}"
            )
        checked.append(check_filter(param, operator, value))
    return Query(tuple(checked), condition)


def check_filters(
    keywords: Mapping[str, Any] | None = None,
    /,
    *,
    filters: Iterable[Filter | tuple[str, str, Any]] | None = None,
    condition: str = "and",
) -> tuple[tuple[str, str, str], ...]:
    """A search's filters, checked as `search_chats` checks them, as its request sends them.

    `keywords` is the keyword form as a mapping (`{"status": "closed",
    "created_at__gte": dt}`), `filters` the explicit form, `condition` "and" or
    "or". Raises `InvalidQueryError` naming the first fault, with no client and no
    request. Returns each filter as (param, operator, value), the value as sent (a
    datetime as UTC ISO 8601 with a `Z`): the explicit ones first, in the order
    given, then the keywords. Public (`imi.check_filters`): for checking a query long
    before it runs (a form, a config file, a scheduled job's arguments), or keying
    what it asks; the export and the partition planner check theirs with it.
    """
    return build_query(keywords, filters, condition).filters


def _explicit(item: Any) -> tuple[str, str, str]:
    if isinstance(item, Filter):
        return check_filter(item.param, item.operator, item.value)
    if isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 3:
        return check_filter(item[0], item[1], item[2])
    raise InvalidQueryError(
        f"invalid filter {item!r:.80}: expected imi.Filter(param, operator, value)"
    )
