"""Scenario 12 (`--only ratelimit`): a tenant with a request budget the client is not told.

(a) The sandbox's own rate limit (`rate_limit=R, rate_burst=25`, a gateway's
token bucket): R requests/s, burst 25; over it, 429 with `Retry-After` in
whole seconds. One
`search_chats()` of every page at L = 40 ms, k = 16, for each way of running
the client: fixed concurrency; `adaptive="concurrency"` (AIMD on requests in
flight); `rate_limit=R` (the rate given by hand); `adaptive=True` (the send
rate learned). Ideal = pages / R (at R = 400, k / L is the same bound).

(b) No budget: the learned-rate mode against fixed concurrency in a clean
run, with jittered latency, and with 5 % transient faults (as scenario 7), to
see what the mode costs where there is nothing to learn.
"""

from __future__ import annotations

import time
from typing import Any

from imichat_async import _records as records

from . import measure
from .common import Config, ScenarioResult, Summary, Table, Target, pages_for, per_run, summarize
from .sandbox_proc import SandboxProcess

BURST = 25
REFILL_SLACK = 0.05  # seconds waited beyond a full refill of the bucket between runs


def _fmt(s: Summary | None, digits: int = 2, scale: float = 1.0, unit: str = "") -> str:
    return "n/a" if s is None else s.fmt(digits, scale, unit)


def _variants(limit: int, k: int) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"`concurrency={k}`", {}),
        ('`adaptive="concurrency"` (AIMD on requests in flight)', {"adaptive": "concurrency"}),
        (f"`rate_limit={limit}` (given by hand)", {"rate_limit": float(limit)}),
        ("`adaptive=True` (rate learned)", {"adaptive": True}),
    ]


def _one(sb: SandboxProcess, k: int, expected: Any, **kw: Any) -> dict[str, Any]:
    sb.reset()
    c = measure.client_run(sb, k=k, keep=True, max_retries=1000, **kw)
    st = sb.stats()
    run = {
        "wall": c.wall,
        "requests": st["requests_total"],
        "429": st["throttled"],
        "rate_limited": st["rate_limited"],
        "hedges": c.hedges,
        "exact": c.chats == expected,
        "rate": c.send_rate,
    }
    c.chats.clear()
    return run


def run(cfg: Config) -> ScenarioResult:
    n, latency, k = cfg.s12_chats, cfg.latency, cfg.s12_k
    pages = pages_for(n)
    res = ScenarioResult(
        12,
        "Rate-limited tenant",
        f"(a) N = {n} chats ({pages} pages), L = {latency * 1000:.0f} ms, k = {k}; the "
        f"sandbox's rate limit, a token bucket of R requests/s, burst {BURST}; over it, 429 "
        "with `Retry-After` in whole seconds (1 here), answered at once. R in "
        f"{list(cfg.s12_limits)}. Ideal = pages / R (at 400/s, k / L = 400/s is the same "
        "bound). 429s counted by the sandbox; every run's records compared with the "
        "tenant's, in order. (b) No rate limit: the learned-rate mode vs fixed concurrency, "
        f"clean, with latency U({latency * 1000:.0f}, {2 * latency * 1000:.0f}) ms, and with "
        f"{cfg.s7_p:.0%} transient faults (scenario 7's (a) and (b)). `max_retries=1000` "
        f"everywhere. Median (min-max) of {cfg.runs}.",
    )
    by_limit: dict[int, list[dict[str, Any]]] = {}
    with SandboxProcess(n, latency=latency) as sb:
        expected = records.decode_page(sb.expected())
        for limit in cfg.s12_limits:
            sb.set_faults(rate_limit=float(limit), rate_burst=BURST)
            runs: list[dict[str, Any]] = []
            for _ in range(cfg.runs):
                one: dict[str, Any] = {}
                for name, kw in _variants(limit, k):
                    time.sleep(BURST / limit + REFILL_SLACK)  # each run starts on a full bucket
                    one[name] = _one(sb, k, expected, **kw)
                runs.append(one)
            by_limit[limit] = runs
    for limit, runs in by_limit.items():
        ideal = pages / limit
        table = Table(
            f"R = {limit} requests/s, burst {BURST} (ideal {ideal:.2f} s)",
            [
                "client",
                "wall (s)",
                "wall / ideal",
                "requests answered 429",
                "requests (sandbox)",
                "hedges",
                "send rate at the end (/s)",
                "exact result set",
            ],
        )
        for name, _ in _variants(limit, k):
            rates = [r[name]["rate"] for r in runs if r[name]["rate"] is not None]

            def wall_vs_ideal(r: dict[str, Any], name: str = name, ideal: float = ideal) -> float:
                return float(r[name]["wall"] / ideal)

            def share_429(r: dict[str, Any], name: str = name) -> float:
                return float(r[name]["429"] / r[name]["requests"])

            table.add(
                name,
                summarize([r[name]["wall"] for r in runs]).fmt(2),
                _fmt(per_run(runs, wall_vs_ideal), 2),
                _fmt(per_run(runs, share_429), 1, 100, " %"),
                summarize([r[name]["requests"] for r in runs]).fmt(0),
                summarize([r[name]["hedges"] for r in runs]).fmt(0),
                summarize(rates).fmt(0) if rates else "unbounded",
                "yes, every run" if all(r[name]["exact"] for r in runs) else "**NO**",
            )
        res.tables.append(table)
    learned = _variants(0, k)[3][0]
    fixed = _variants(0, k)[0][0]
    for limit, runs in by_limit.items():
        ideal = pages / limit

        def learned_vs_ideal(r: dict[str, Any], ideal: float = ideal) -> float:
            return float(r[learned]["wall"] / ideal)

        wall = per_run(runs, learned_vs_ideal)
        share = per_run(runs, lambda r: r[learned]["429"] / r[learned]["requests"])
        if wall is None or share is None:
            continue
        if limit * latency < k:  # the budget is the bound
            res.targets.append(
                Target(
                    f"R = {limit}: `adaptive=True` wall / ideal <= 1.15",
                    wall.fmt(2),
                    wall.median <= 1.15,
                )
            )
            res.targets.append(
                Target(
                    f"R = {limit}: `adaptive=True` 429s <= 3 % of requests",
                    share.fmt(1, 100, " %"),
                    share.median <= 0.03,
                )
            )
        else:
            ratio = per_run(runs, lambda r: r[learned]["wall"] / r[fixed]["wall"])
            assert ratio is not None
            res.targets.append(
                Target(
                    f"R = {limit} (k / L the bound): `adaptive=True` no slower than fixed "
                    "(wall ratio <= 1.05, noise)",
                    ratio.fmt(3),
                    ratio.median <= 1.05,
                )
            )
    exact = all(r[name]["exact"] for runs in by_limit.values() for r in runs for name in r)
    res.targets.append(Target("exact result set in every run", str(exact), exact))
    res.tables.append(_no_budget(cfg, res))
    res.notes.append(
        "Requests waiting for the rate hold no slot and no connection; the one granted when a "
        "token comes is the lowest page of the search whose turn it is (the same queue as the "
        "slots). A throttled page waits out its `Retry-After` (1 s) while the default window "
        "(4 x k) keeps the rate busy behind it."
    )
    return res


def _no_budget(cfg: Config, res: ScenarioResult) -> Table:
    n, latency, k, p = cfg.s12_clean_chats, cfg.latency, cfg.s12_k, cfg.s7_p
    mixed = {f"p_{kind}": p / 5 for kind in ("2007", "3454", "502", "503", "504")}
    off = {f"p_{kind}": 0.0 for kind in ("2007", "3454", "429", "502", "503", "504")}
    cases: list[tuple[str, dict[str, Any]]] = [
        ("clean", {**off, "retry_after": None}),
        (
            f"latency U({latency * 1000:.0f}, {2 * latency * 1000:.0f}) ms",
            {**off, "retry_after": None, "jitter": latency},
        ),
        (f"{p:.0%} HTTP 429, Retry-After: 0", {**off, "p_429": p, "retry_after": 0.0}),
        (f"{p:.0%} mixed 2007/3454/502/503/504", {**off, **mixed, "retry_after": None}),
    ]
    modes: list[tuple[str, dict[str, Any]]] = [("fixed", {}), ("learned", {"adaptive": True})]
    runs: list[dict[tuple[str, str], dict[str, Any]]] = []
    with SandboxProcess(n, latency=latency) as sb:
        expected = records.decode_page(sb.expected())
        for _ in range(cfg.runs):
            one: dict[tuple[str, str], dict[str, Any]] = {}
            for case, knobs in cases:
                sb.set_faults(**{"latency": latency, "jitter": 0.0, **knobs})
                for mode, kw in modes:
                    one[(case, mode)] = _one(sb, k, expected, **kw)
            runs.append(one)
    table = Table(
        f"No budget: `adaptive=True` vs `concurrency={k}` (N = {n}, L = {latency * 1000:.0f} ms)",
        [
            "case",
            "fixed wall (s)",
            "adaptive=True wall (s)",
            "adaptive / fixed wall",
            "requests fixed / adaptive",
            "exact result set",
        ],
    )
    ratios: list[tuple[str, Summary]] = []
    for case, _ in cases:

        def learned_vs_fixed(r: dict[tuple[str, str], dict[str, Any]], case: str = case) -> float:
            return float(r[(case, "learned")]["wall"] / r[(case, "fixed")]["wall"])

        ratio = per_run(runs, learned_vs_fixed)
        assert ratio is not None
        ratios.append((case, ratio))
        table.add(
            case,
            summarize([r[(case, "fixed")]["wall"] for r in runs]).fmt(3),
            summarize([r[(case, "learned")]["wall"] for r in runs]).fmt(3),
            ratio.fmt(3),
            f"{summarize([r[(case, 'fixed')]['requests'] for r in runs]).fmt(0)} / "
            f"{summarize([r[(case, 'learned')]['requests'] for r in runs]).fmt(0)}",
            "yes, every run"
            if all(r[(case, m)]["exact"] for r in runs for m, _ in modes)
            else "**NO**",
        )
    worst = max(ratios, key=lambda cr: cr[1].median)
    res.targets.append(
        Target(
            f"no budget: `adaptive=True` costs nothing vs `concurrency={k}` "
            "(worst median wall ratio <= 1.05)",
            f"{worst[1].fmt(3)} ({worst[0]})",
            worst[1].median <= 1.05,
        )
    )
    return table
