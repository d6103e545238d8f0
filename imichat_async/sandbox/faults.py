"""The sandbox's knobs and counters: `Faults` (what to break) and `Stats` (what happened).

`Faults` is mutable on purpose: a test may change a knob between two searches
of the same sandbox (`sb.faults.p_429 = 0.2`). Every probabilistic fault is
drawn from one random number per request, from a generator seeded by the
sandbox's seed, so a sequential run is reproducible.

`Stats` counts every request on the search path; tests and benchmarks assert
on it (retries per page, peak concurrency, faults injected, tokens issued).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import attrs

#: The fault kinds, as named in `Faults.fault_pages` and counted in `Stats.faults`.
FAULT_KINDS: tuple[str, ...] = ("2007", "3454", "429", "502", "503", "504", "reset", "hang")

#: The probability knob of each fault kind, in the order they are drawn.
PROBABILITY_FIELDS: Mapping[str, str] = {kind: f"p_{kind}" for kind in FAULT_KINDS}


def _probability(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be within [0, 1], got {value!r}")


def _non_negative(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _optional_non_negative(
    instance: object, attribute: attrs.Attribute[float | None], value: float | None
) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} must be >= 0 or None, got {value!r}")


def _optional_positive_int(
    instance: object, attribute: attrs.Attribute[int | None], value: int | None
) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be >= 1 or None, got {value!r}")


def _optional_positive(
    instance: object, attribute: attrs.Attribute[float | None], value: float | None
) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be > 0 or None, got {value!r}")


def _non_negative_int(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _fault_pages(value: Mapping[Any, Any] | None) -> dict[int, str]:
    pages = {int(page): str(kind) for page, kind in (value or {}).items()}
    for page, kind in pages.items():
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault_pages[{page}]: unknown fault kind {kind!r}; use {FAULT_KINDS}")
    return pages


@attrs.define
class Faults:
    """What the sandbox breaks. Everything defaults to off.

    - `latency` seconds before every answer, plus a uniform `0..jitter`, plus
      `latency_per_page * page` (deeper pages are slower).
    - `p_2007`, `p_3454` (500 with the vendor's body), `p_429` (with
      `Retry-After: retry_after` unless `retry_after` is None), `p_502` (HTML
      body), `p_503` (empty body), `p_504` (HTML body), `p_reset` (connection
      dropped without an answer), `p_hang` (no answer for `hang_seconds`, then
      the connection is dropped): the probability of each, per request that
      passed authentication and validation. At most one fault per request; the
      probabilities should sum to at most 1.
    - `fault_pages`: page number -> fault kind, injected on the *first*
      request of that page only (the entry is then removed, so a retry
      succeeds; assigning again re-arms it).
    - `max_in_flight`: answer 429 (with `retry_after`) to a request arriving
      while more than that many search requests are in flight.
    - `insert_every`: insert one new chat at the head every N valid search
      requests (data changing under a search).
    - `rate_limit` (requests/s) and `rate_burst` (default: one second's worth,
      at least 1): a token bucket over every request on the search path, as a
      gateway keeps per tenant. Over it: 429 with `Retry-After` in whole
      seconds (the time until a token is back, rounded up, at least 1) and
      the JSON body of the other 429s; counted in `Stats.rate_limited` and
      `Stats.throttled`. Checked before latency, authentication and
      validation (the gateway answers it), after `requests_by_page`.
    - `churn_every`, `churn_updates`, `churn_inserts`: every N valid search
      requests, `Sandbox.churn(updates=churn_updates, inserts=churn_inserts)`
      (chats changing and arriving as on a live tenant).
    """

    latency: float = attrs.field(default=0.0, validator=_non_negative)
    jitter: float = attrs.field(default=0.0, validator=_non_negative)
    latency_per_page: float = attrs.field(default=0.0, validator=_non_negative)
    p_2007: float = attrs.field(default=0.0, validator=_probability)
    p_3454: float = attrs.field(default=0.0, validator=_probability)
    p_429: float = attrs.field(default=0.0, validator=_probability)
    p_502: float = attrs.field(default=0.0, validator=_probability)
    p_503: float = attrs.field(default=0.0, validator=_probability)
    p_504: float = attrs.field(default=0.0, validator=_probability)
    p_reset: float = attrs.field(default=0.0, validator=_probability)
    p_hang: float = attrs.field(default=0.0, validator=_probability)
    retry_after: float | None = attrs.field(default=None, validator=_optional_non_negative)
    hang_seconds: float = attrs.field(default=30.0, validator=_non_negative)
    fault_pages: dict[int, str] = attrs.field(factory=dict, converter=_fault_pages)
    max_in_flight: int | None = attrs.field(default=None, validator=_optional_positive_int)
    insert_every: int | None = attrs.field(default=None, validator=_optional_positive_int)
    rate_limit: float | None = attrs.field(default=None, validator=_optional_positive)
    rate_burst: int | None = attrs.field(default=None, validator=_optional_positive_int)
    churn_every: int | None = attrs.field(default=None, validator=_optional_positive_int)
    churn_updates: int = attrs.field(default=1, validator=_non_negative_int)
    churn_inserts: int = attrs.field(default=0, validator=_non_negative_int)

    @property
    def burst(self) -> int:
        """The bucket's size: `rate_burst`, or one second of `rate_limit` (at least 1)."""
        if self.rate_burst is not None:
            return self.rate_burst
        return max(1, math.ceil(self.rate_limit or 0))

    @classmethod
    def field_names(cls) -> frozenset[str]:
        """The names `serve(...)` accepts as keyword shortcuts for these knobs."""
        return frozenset(a.name for a in attrs.fields(cls))

    def pick(self, draw: float) -> str | None:
        """The probabilistic fault for one uniform `draw` in [0, 1), or None."""
        edge = 0.0
        for kind, name in PROBABILITY_FIELDS.items():
            p: float = getattr(self, name)
            if p <= 0.0:
                continue
            edge += p
            if draw < edge:
                return kind
        return None


@attrs.define
class Stats:
    """Counters of the search endpoint, for assertions.

    `requests_total` counts every request on the search path (any method,
    any outcome); `requests_by_page` counts requests per valid `page` number;
    `in_flight` is the number of search requests being handled now and
    `peak_in_flight` its maximum; `faults` counts injected faults by kind
    (`FAULT_KINDS`; a `max_in_flight` rejection counts as "429" and also in
    `throttled`); `tokens_issued` counts tokens from `new_token()` and the
    token endpoint (not the one issued at start); `expired_hits` counts 2004
    answers; `errors_by_code` counts error answers by vendor `status_code`,
    or by HTTP status for 429/502/503/504 and 404 (an unknown path, which is
    not the search path: not in `requests_total`).
    """

    requests_total: int = 0
    requests_by_page: Counter[int] = attrs.field(factory=Counter)
    in_flight: int = 0
    peak_in_flight: int = 0
    faults: Counter[str] = attrs.field(factory=Counter)
    tokens_issued: int = 0
    expired_hits: int = 0
    errors_by_code: Counter[int] = attrs.field(factory=Counter)
    throttled: int = 0
    rate_limited: int = 0
    inserted: int = 0
    updated: int = 0

    def reset(self) -> None:
        """Zero every counter; `in_flight` stays the truth and the peak restarts from it."""
        self.requests_total = 0
        self.requests_by_page = Counter()
        self.peak_in_flight = self.in_flight
        self.faults = Counter()
        self.tokens_issued = 0
        self.expired_hits = 0
        self.errors_by_code = Counter()
        self.throttled = 0
        self.rate_limited = 0
        self.inserted = 0
        self.updated = 0
