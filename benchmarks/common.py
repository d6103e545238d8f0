"""Shared pieces: the run configuration, summaries of repeated runs, tables and targets."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

PAGE_SIZE = 10

_Run = TypeVar("_Run")


@dataclass(frozen=True)
class Config:
    """Sizes and repetitions of one benchmark run; `quick()` is the under-a-minute form."""

    quick: bool = False
    runs: int = 3
    latency: float = 0.040
    # 1. latency-bound scaling
    s1_chats: int = 4000
    s1_ks: tuple[int, ...] = (1, 4, 16, 64)
    s1_jitter_ks: tuple[int, ...] = (16, 64)
    # 2. CPU-bound throughput (#24: N = 50,000)
    s2_chats: int = 50_000
    s2_k: int = 8
    s2_runs: int = 15  # CPU time on a shared 2-core VM swings +-30 % between repetitions
    # 3. decode alone
    s3_chats: int = 20_000
    s3_runs: int = 9
    # 4. memory
    s4_sizes: tuple[int, ...] = (1_000, 10_000, 30_000, 100_000)
    s4_k: int = 8
    # 5. time to first record
    s5_runs: int = 7
    # 6. wasted requests
    s6_chats: tuple[int, ...] = (4000, 4005)
    s6_k: tuple[int, ...] = (8, 16)  # concurrency; prefetch is the default, 4 x k
    s6_latency: float = 0.005
    # 7. faults
    s7_k: int = 16
    s7_p: float = 0.05
    # 8. adaptive vs fixed
    s8_chats: int = 2000
    s8_concurrency: int = 32
    s8_max_in_flight: int = 6
    s8_retry_after: float = 0.1
    # 9. sliced export
    s9_chats: int = 4000
    s9_k: int = 16
    s9_cpu_chats: int = 200_000  # the CPU comparison at L = 0 (#24)
    s9_cpu_k: int = 8
    # 10. head-of-line blocking: wall ratios against 1.03-1.10 targets swing +-5 % a repetition
    s10_runs: int = 7
    # 11. rate-limited tenant
    s12_chats: int = 3000
    s12_k: int = 16
    s12_limits: tuple[int, ...] = (50, 100, 400)
    s12_clean_chats: int = 4000
    # 13. latency for services: A (searches alone), B (beside a big one)
    s13_k: int = 16
    s13_searches: int = 100
    s13_small: int = 50
    s13_big_pages: int = 200
    # 14. Parquet export vs NDJSON export
    s14_chats: int = 200_000
    s14_big: int = 1_000_000
    s14_k: int = 16
    s14_latencies: tuple[float, ...] = (0.0, 0.040)
    # 15. a fleet of processes on one tenant's budget: (P processes, R requests/s)
    s15_chats: int = 1500
    s15_k: int = 16
    s15_cases: tuple[tuple[int, int], ...] = ((4, 100), (8, 100), (4, 50))
    s15_clean_chats: int = 4000
    # 16. a Dask cluster against one export process
    s16_chats: int = 200_000
    s16_k: int = 16
    s16_limit: int = 100
    s16_rows: int = 10_000

    @classmethod
    def full(cls, runs: int = 3) -> Config:
        return cls(runs=runs)

    @classmethod
    def quick_mode(cls) -> Config:
        return cls(
            quick=True,
            runs=1,
            s1_chats=400,
            s1_ks=(1, 4, 16, 64),
            s1_jitter_ks=(16,),
            s2_chats=3000,
            s2_runs=1,
            s3_chats=2000,
            s3_runs=1,
            s4_sizes=(1_000, 5_000),
            s5_runs=2,
            s6_chats=(400, 405),
            s6_k=(8,),
            s8_chats=300,
            s9_chats=400,
            s9_cpu_chats=3000,
            s10_runs=1,
            s12_chats=400,
            s12_limits=(200,),
            s12_clean_chats=400,
            s13_searches=20,
            s13_small=10,
            s13_big_pages=40,
            s14_chats=2000,
            s14_big=5000,
            s15_chats=200,
            s15_cases=((2, 100),),
            s15_clean_chats=400,
            s16_chats=2000,
            s16_limit=200,
            s16_rows=200,
        )


@dataclass(frozen=True)
class Summary:
    """Median and spread (min-max) of one figure over the runs."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    def fmt(self, digits: int = 2, scale: float = 1.0, unit: str = "") -> str:
        med, lo, hi = self.median * scale, self.lo * scale, self.hi * scale
        if len(self.values) == 1:
            return f"{med:.{digits}f}{unit}"
        return f"{med:.{digits}f}{unit} ({lo:.{digits}f}-{hi:.{digits}f})"


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("no values to summarize")
    return Summary(tuple(float(v) for v in values))


def per_run(runs: Sequence[_Run], fn: Callable[[_Run], float | None]) -> Summary | None:
    """A figure computed inside each run (a ratio of two timings of the same run)."""
    values = [v for v in (fn(r) for r in runs) if v is not None]
    return summarize(values) if values else None


def ideal_seconds(pages: int, k: int, latency: float) -> float:
    """`ceil(pages / k) x L`: each round of k requests costs one latency."""
    return math.ceil(pages / k) * latency


def pages_for(chats: int) -> int:
    return math.ceil(chats / PAGE_SIZE)


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        lines = [f"**{self.title}**", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)


@dataclass
class Target:
    what: str
    measured: str
    met: bool | None  # None: not measured (scenario skipped)

    @property
    def verdict(self) -> str:
        if self.met is None:
            return "not measured"
        return "**met**" if self.met else "**NOT met**"


@dataclass
class ScenarioResult:
    number: int
    title: str
    setup: str
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plot: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
