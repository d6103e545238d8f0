"""The sandbox's side of a search body: validate it like the vendor does, then filter rows.

`parse_body` turns a decoded JSON body into a normalized, hashable `Query`, or
raises `QueryError` carrying the vendor's status code and description (3115,
3451, 3445, 3446, 3447, 4303). `predicate` compiles a `Query` into a function
of a `data.Row`; `select` answers a `Query` from a `data.Table` as an indexed
server does: the `created_at`/`updated_at` filters of an `and` query become
one range each, the narrower range is read from its index, and only those
candidates meet the other filters (an `or` query scans every row).
Everything about params and operators comes from the sandbox's own copy of
the vendor's table (`vendor`), never from the client's: a wrong row in the
client's table then shows as a refused or mis-filtered search.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from .data import Row, Table, parse_datetime_us
from .vendor import CLOSED_VALUES, CODES, CONDITIONS, DATETIMES, DESTINATIONS, OPERATORS, describe

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

    def __init__(self, code: int, param: str = "", value: str = "") -> None:
        self.code = code
        self.http_status = CODES[code].http_status
        self.description = describe(code, param, value)
        super().__init__(f"{code}: {self.description}")


@attrs.frozen
class Query:
    """A validated search: `condition` and the filters, normalized so equal searches hash equal."""

    condition: str
    terms: tuple[Term, ...]


def _term(param: Any, op: Any, value: Any) -> Term:
    if not (isinstance(param, str) and isinstance(op, str) and isinstance(value, str)):
        raise QueryError(3451)
    operators = OPERATORS.get(param)
    if operators is None:
        raise QueryError(3445, param=param)
    if op not in operators:
        raise QueryError(3446, param=param)
    if param in DATETIMES:
        us = parse_datetime_us(value)
        if us is None:
            raise QueryError(4303, value=value, param=param)
        return (param, op, us)
    allowed = CLOSED_VALUES.get(param)
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
    if param in DESTINATIONS:
        channel = DESTINATIONS[param]
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


#: The widest range of microseconds: no bound.
_ALL = (-(2**63), 2**63)


def _ranges(terms: Iterable[Term]) -> tuple[dict[str, tuple[int, int]], list[Term]]:
    """Fold the datetime terms of an `and` query into inclusive ranges; return the rest."""
    ranges: dict[str, tuple[int, int]] = {}
    rest: list[Term] = []
    for term in terms:
        param, op, value = term
        if param not in DATETIMES or not isinstance(value, int):
            rest.append(term)
            continue
        lo, hi = ranges.get(param, _ALL)
        if op in ("eq", "gte"):
            lo = max(lo, value)
        if op in ("eq", "lte"):
            hi = min(hi, value)
        if op == "gt":
            lo = max(lo, value + 1)
        if op == "lt":
            hi = min(hi, value - 1)
        ranges[param] = (lo, hi)
    return ranges, rest


def _all_of(preds: list[Predicate]) -> Predicate | None:
    if not preds:
        return None
    if len(preds) == 1:
        return preds[0]
    return lambda row: all(p(row) for p in preds)


def select(table: Table, query: Query) -> list[dict[str, Any]]:
    """The chats of `table` matching `query`, in served order (a new list).

    For an `and` query (or a single filter) with `created_at`/`updated_at`
    terms, the candidates come from the narrower of the two indexes and only
    they meet the remaining terms; otherwise every row is tested. Both paths
    give the same chats in the same (served) order.
    """
    if not query.terms:
        return list(table.chats)
    ranges, rest = (
        _ranges(query.terms) if query.condition == "and" or len(query.terms) == 1 else ({}, [])
    )
    if not ranges:
        match = predicate(query)
        assert match is not None  # there are terms
        return [chat for chat, row in zip(table.chats, table.rows, strict=True) if match(row)]
    if any(lo > hi for lo, hi in ranges.values()):
        return []
    created, updated = ranges.get("created_at"), ranges.get("updated_at")
    use_created = created is not None and (
        updated is None or table.count_created(*created) <= table.count_updated(*updated)
    )
    preds = [_predicate(t) for t in rest]
    if use_created:
        assert created is not None
        if updated is not None:
            u_lo, u_hi = updated
            preds.append(lambda row: u_lo <= row.updated_us <= u_hi)
        chats, rows = table.created_between(*created)
        pairs: Iterable[tuple[dict[str, Any], Row]] = zip(chats, rows, strict=True)
    else:
        assert updated is not None
        if created is not None:
            c_lo, c_hi = created
            preds.append(lambda row: c_lo <= row.created_us <= c_hi)
        pairs = table.updated_between(*updated)
    match = _all_of(preds)
    if match is None:
        return [chat for chat, _ in pairs]
    return [chat for chat, row in pairs if match(row)]
