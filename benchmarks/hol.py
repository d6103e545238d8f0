"""Scenario 10, head-of-line blocking: `search_chats()` against the raw retry loop, same run.

Three conditions at N = 4,000 chats (400 pages), L = 40 ms, k = 16, default
settings: clean, latency jittered U(L, 2L), and 5 % transient faults (2007,
503, 429 with `Retry-After: 0`, connection resets; 1.25 % each). The
reference is `baselines.retry_loop`: k requests always in flight, a failure
retried at once, no order, no backoff. Each repetition runs both back to
back against the same server; the figure is their ratio.
"""

from __future__ import annotations

from typing import Any

import imichat_async as imi

from . import baselines, measure
from .common import Config, ScenarioResult, Table, Target, per_run, summarize
from .sandbox_proc import SandboxProcess

CONDITIONS: list[tuple[str, dict[str, Any], float]] = [
    ("clean", {}, 1.03),
    ("latency jittered U(L, 2L)", {"jitter": 1.0}, 1.05),
    (
        "5 % transient faults (2007, 503, 429 Retry-After: 0, reset)",
        {"p_2007": 0.0125, "p_503": 0.0125, "p_429": 0.0125, "p_reset": 0.0125},
        1.10,
    ),
]
#: The default backoff before it was measured here: 0.25 s doubling (README, "Choices").
FORMER_BACKOFF = imi.RetryPolicy(backoff_initial=0.25, backoff_factor=2.0)
OFF = {"jitter": 0.0, "p_2007": 0.0, "p_503": 0.0, "p_429": 0.0, "p_reset": 0.0}


def _loop(sb: SandboxProcess, k: int) -> tuple[baselines.Outcome, measure.Timed]:
    return measure.baseline_run(lambda: baselines.retry_loop(sb.base_url, sb.token, sb.team_id, k))


def run(cfg: Config) -> ScenarioResult:
    n, latency, k = cfg.s1_chats, cfg.latency, cfg.s7_k
    runs_n = max(cfg.runs, cfg.s10_runs)
    res = ScenarioResult(
        10,
        "Head-of-line blocking",
        f"N = {n} chats ({n // 10} pages), L = {latency * 1000:.0f} ms, k = {k}, default "
        "settings (prefetch = 4 x concurrency, hedging on). `search_chats()` wall time / "
        "the raw retry loop's (k requests always in flight, a failure retried at once, no "
        "order, no backoff, no decoding), back to back in each repetition (the loop first "
        "every other one). "
        f"Median (min-max) of {runs_n}.",
    )
    runs: list[dict[str, Any]] = []
    with SandboxProcess(n, latency=latency) as sb:
        for rep in range(runs_n):
            run: dict[str, Any] = {}
            for name, knobs, _target in CONDITIONS:
                sb.set_faults(
                    **{
                        **OFF,
                        **{key: v * latency if key == "jitter" else v for key, v in knobs.items()},
                    },
                    retry_after=0.0,
                )
                sb.reset()
                if rep % 2 == 0:
                    c = measure.client_run(sb, k=k)
                    out, t = _loop(sb, k)
                else:  # the loop first every other repetition: a drift favours neither
                    out, t = _loop(sb, k)
                    c = measure.client_run(sb, k=k)
                measure.check(f"client {name}", c.records, n)
                measure.check(f"retry loop {name}", out.records, n)
                if knobs.get("p_2007"):  # the same faults with the former default backoff
                    old = measure.client_run(sb, k=k, retry_policy=FORMER_BACKOFF)
                    measure.check(f"client, former backoff, {name}", old.records, n)
                    run["former backoff"] = {"client": old.wall, "loop": t.wall}
                run[name] = {
                    "client": c.wall,
                    "loop": t.wall,
                    "cpu_rec": c.cpu / max(1, c.records),
                    "loop_cpu_rec": t.cpu / max(1, out.records),
                    "retries": c.retries,
                    "requests": c.requests,
                    "hedges": c.hedges,
                }
            runs.append(run)
    table = Table(
        f"search_chats() / raw retry loop, same run (k = {k})",
        [
            "condition",
            "client wall (s)",
            "loop wall (s)",
            "client / loop",
            "target",
            "client CPU/record / loop's",
            "hedges",
            "retries",
        ],
    )
    for name, _knobs, target in CONDITIONS:

        def wall_ratio(r: dict[str, dict[str, float]], name: str = name) -> float:
            return r[name]["client"] / r[name]["loop"]

        def cpu_ratio(r: dict[str, dict[str, float]], name: str = name) -> float:
            return r[name]["cpu_rec"] / r[name]["loop_cpu_rec"]

        ratio = per_run(runs, wall_ratio)
        cpu = per_run(runs, cpu_ratio)
        assert ratio is not None and cpu is not None
        table.add(
            name,
            summarize([r[name]["client"] for r in runs]).fmt(3),
            summarize([r[name]["loop"] for r in runs]).fmt(3),
            ratio.fmt(3),
            f"<= {target:.2f}",
            cpu.fmt(2),
            summarize([r[name]["hedges"] for r in runs]).fmt(0),
            summarize([r[name]["retries"] for r in runs]).fmt(0),
        )
        res.targets.append(
            Target(f"{name}: client / loop <= {target}", ratio.fmt(3), ratio.median <= target)
        )
        if name == "clean":
            res.targets.append(
                Target(
                    "CPU per record <= 1.5 x the raw loop's (clean)", cpu.fmt(2), cpu.median <= 1.5
                )
            )
    former = per_run(
        runs,
        lambda r: (
            r["former backoff"]["client"] / r["former backoff"]["loop"]
            if "former backoff" in r
            else None
        ),
    )
    if former is not None:
        table.add(
            "same faults, former backoff (0.25 s doubling)",
            summarize([r["former backoff"]["client"] for r in runs if "former backoff" in r]).fmt(
                3
            ),
            "",
            former.fmt(3),
            "",
            "",
            "",
            "",
        )
    res.tables.append(table)
    return res
