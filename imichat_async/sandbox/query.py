"""The sandbox's side of a search body: validate it like the vendor does, then filter rows.

`parse_body` turns a decoded JSON body into a normalized, hashable `Query`, or
raises `QueryError` carrying the vendor's status code and description (3115,
3451, 3445, 3446, 3447, 4303). `predicate` compiles a `Query` into a function
of a `data.Row`. Everything about params and operators comes from
`imichat_async._protocol`, so the sandbox and the client read the same table.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from imichat_async._protocol import (
    CONDITIONS,
    DATETIME_PARAMS,
    DESTINATION_PARAMS,
    ENUM_PARAM_VALUES,
    PARAM_OPERATORS,
    STATUS_TABLE,
)

from .data import Row, parse_datetime_us

#: One normalized filter: (param, operator, value); a datetime value is in microseconds.
Term = tuple[str, str, "str | int"]
Predicate = Callable[[Row], bool]

_ORDER: Mapping[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "not_eq": operator.ne,
    "lt": operator.lt,
    "gt": operator.gt,
    "lte": operator.le,
    "gte": operator.ge,
}


class QueryError(ValueError):
    """A body the vendor would refuse: `code`, `http_status` and `description` of the table."""

    def __init__(self, code: int, **fields: str) -> None:
        row = STATUS_TABLE[code]
        self.code = code
        self.http_status = row.http_status
        self.description = row.description.format(**fields) if fields else row.description
        super().__init__(f"{code}: {self.description}")


@attrs.frozen
class Query:
    """A validated search: `condition` and the filters, normalized so equal searches hash equal."""

    condition: str
    terms: tuple[Term, ...]


def _term(param: Any, op: Any, value: Any) -> Term:
    if not (isinstance(param, str) and isinstance(op, str) and isinstance(value, str)):
        raise QueryError(3451)
    operators = PARAM_OPERATORS.get(param)
    if operators is None:
        raise QueryError(3445, param=param)
    if op not in operators:
        raise QueryError(3446, param=param)
    if param in DATETIME_PARAMS:
        us = parse_datetime_us(value)
        if us is None:
            raise QueryError(4303, value=value, param=param)
        return (param, op, us)
    allowed = ENUM_PARAM_VALUES.get(param)
    if allowed is not None and value not in allowed:
        raise QueryError(4303, value=value, param=param)
    return (param, op, value)


def _query(condition: Any, terms: Iterable[Term]) -> Query:
    if not isinstance(condition, str):
        raise QueryError(3451)
    if condition not in CONDITIONS:
        raise QueryError(3447)
    # The same filters in another order are the same search: sort for the cache key.
    return Query(condition, tuple(sorted(set(terms), key=repr)))


def parse_body(doc: Any) -> Query:
    """Validate a decoded body `{"condition": ..., "filters": [...]}`; raise `QueryError`.

    `condition` defaults to "and" and `filters` to `[]`; unknown keys are ignored.
    """
    if not isinstance(doc, dict):
        raise QueryError(3115)
    filters = doc.get("filters", [])
    if filters is None:
        filters = []
    if not isinstance(filters, list):
        raise QueryError(3451)
    terms = []
    for f in filters:
        if not isinstance(f, dict):
            raise QueryError(3451)
        terms.append(_term(f.get("param"), f.get("operator"), f.get("value")))
    return _query(doc.get("condition", "and"), terms)


def make_query(filters: Iterable[tuple[str, str, str]] | None, condition: str = "and") -> Query:
    """The `Query` for (param, operator, value) triples, validated like a body."""
    return _query(condition, [_term(p, o, v) for p, o, v in filters or ()])


def _predicate(term: Term) -> Predicate:
    param, op, value = term
    compare = _ORDER[op]
    if param == "created_at":
        return lambda row: compare(row.created_us, value)
    if param == "updated_at":
        return lambda row: compare(row.updated_us, value)
    if param == "status":
        return lambda row: compare(row.status, value)
    if param == "channel":
        return lambda row: row.channel == value
    if param == "tag":
        return lambda row: value in row.tags
    if param == "assignee":
        return lambda row: row.assignee == value
    if param in DESTINATION_PARAMS:
        channel = DESTINATION_PARAMS[param]
        return lambda row: row.channel == channel and row.destination_id == value
    if param == "intent":
        return lambda row: row.channel == "abc" and row.intent == value
    if param == "group":
        return lambda row: row.channel == "abc" and row.group == value
    raise AssertionError(f"no predicate for {param!r}")  # parse_body refused it already


def predicate(query: Query) -> Predicate | None:
    """A function telling whether a row matches, or None when every row does."""
    if not query.terms:
        return None
    preds = [_predicate(t) for t in query.terms]
    if len(preds) == 1:
        return preds[0]
    if query.condition == "and":
        return lambda row: all(p(row) for p in preds)
    return lambda row: any(p(row) for p in preds)
