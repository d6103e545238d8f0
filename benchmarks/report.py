"""RESULTS.md and the PNG plots: machine description, target summary, every table."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .common import Config, ScenarioResult, Table

PLOT_SCALING = "scaling.png"
PLOT_MEMORY = "memory.png"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def git_rev() -> str:
    """The commit measured, and whether the tree differed from it: read before a run writes
    its own files (RESULTS.md, the plots), which would otherwise count as changes."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
            cwd=Path(__file__).resolve().parent,
        )
        rev = out.stdout.strip()
        if not rev:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
            cwd=Path(__file__).resolve().parent,
        )
        return rev + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def machine_table(load_at_start: str = "unknown", git: str | None = None) -> Table:
    t = Table("Machine and versions", ["what", "value"])
    t.add("date", _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))
    t.add("CPU", _cpu_model())
    t.add("cores (nproc)", os.cpu_count() or "?")
    t.add("load average 1/5/15 min, at start", load_at_start)
    t.add("load average 1/5/15 min, at end", load_average())
    t.add("memory", _memory_total())
    t.add("OS", f"{platform.system()} {platform.release()}")
    t.add("Python", f"{platform.python_implementation()} {platform.python_version()}")
    for dist in ("imichat-async", "aiohttp", "cattrs", "attrs", "tenacity", "yarl", "multidict"):
        t.add(dist, _version(dist))
    t.add("git", git if git is not None else git_rev())
    return t


def plots(results: Sequence[ScenarioResult], out: Path) -> list[str]:
    """Write the plots that have data; returns the file names written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    by_number = {r.number: r for r in results if r.plot}
    s1 = by_number.get(1)
    if s1 is not None:
        p = s1.plot
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        ks = p["k"]
        err = [
            [m - lo for m, lo in zip(p["client"], p["client_lo"], strict=True)],
            [hi - m for m, hi in zip(p["client"], p["client_hi"], strict=True)],
        ]
        ax.errorbar(ks, p["client"], yerr=err, marker="o", capsize=3, label="search_chats()")
        ax.plot(ks, p["gather"], marker="s", label="baseline 2: gather windows")
        ax.plot(ks, p["model"], linestyle=":", label="model (1 + ceil((P-1)/k)) x L")
        ax.plot(ks, p["ideal"], linestyle="--", label="ideal ceil(P/k) x L")
        ax.axhline(p["seq"], color="grey", linewidth=0.8, label="baseline 1: sequential")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("requests in flight k")
        ax.set_ylabel("wall time (s)")
        ax.set_title("Scenario 1: wall time vs k (L = 40 ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / PLOT_SCALING, dpi=110)
        plt.close(fig)
        written.append(PLOT_SCALING)
    s4 = by_number.get(4)
    if s4 is not None:
        p = s4.plot
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        err = [
            [m - lo for m, lo in zip(p["drop"], p["drop_lo"], strict=True)],
            [hi - m for m, hi in zip(p["drop"], p["drop_hi"], strict=True)],
        ]
        ax.errorbar(p["n"], p["drop"], yerr=err, marker="o", capsize=3, label="records dropped")
        ax.plot(p["n"], p["keep"], marker="s", linestyle="--", label="records kept (contrast)")
        ax.axhline(10, color="red", linewidth=0.8, linestyle=":", label="10 MB")
        ax.set_xscale("log")
        ax.set_xlabel("chats streamed N")
        ax.set_ylabel("peak RSS growth (MB)")
        ax.set_title("Scenario 4: peak RSS growth vs N")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / PLOT_MEMORY, dpi=110)
        plt.close(fig)
        written.append(PLOT_MEMORY)
    return written


def write(
    results: Sequence[ScenarioResult],
    cfg: Config,
    out: Path,
    images: Sequence[str],
    total: float,
    load_at_start: str = "unknown",
    git: str | None = None,
) -> Path:
    lines = ["# Benchmarks", ""]
    mode = (
        "quick mode (`--quick`): 1 run, small sizes; figures are indicative only"
        if (cfg.quick)
        else f"full run: {cfg.runs} repetitions per figure"
    )
    lines += [
        f"Written by `python -m benchmarks` ({mode}); {total:.0f} s in all. The sandbox "
        "server runs in its own process on 127.0.0.1 (`benchmarks/sandbox_proc.py`); "
        "the client runs in the benchmark process. Absolute times drift on shared "
        "machines, so every figure held against a target is a ratio of two timings "
        "taken back to back in the same repetition, shown as median (min-max).",
        "",
        machine_table(load_at_start, git).markdown(),
        "",
        "A load average well above 0 at the start means something else was running (or had "
        "just stopped: it is an average over the last minutes): the figures are then "
        "pessimistic, the ratios less so.",
        "",
        "## Targets",
        "",
        "| # | scenario | target | measured | verdict |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if r.error is not None and not r.targets:
            lines.append(f"| {r.number} | {r.title} | (scenario failed) | {r.error} | **error** |")
        for t in r.targets:
            lines.append(f"| {r.number} | {r.title} | {t.what} | {t.measured} | {t.verdict} |")
    for r in results:
        lines += ["", f"## {r.number}. {r.title}", "", r.setup, ""]
        if r.error is not None:
            lines += [f"**Error:** `{r.error}`", ""]
        for table in r.tables:
            lines += [table.markdown(), ""]
        if r.targets:
            lines += ["Targets:", ""]
            lines += [f"- {t.what}: {t.measured} — {t.verdict}" for t in r.targets]
            lines.append("")
        for note in r.notes:
            lines += [note, ""]
        if r.number == 1 and PLOT_SCALING in images:
            lines += [f"![wall time vs k]({PLOT_SCALING})", ""]
        if r.number == 4 and PLOT_MEMORY in images:
            lines += [f"![peak RSS growth vs N]({PLOT_MEMORY})", ""]
        lines.append(f"_{r.seconds:.1f} s_")
    lines += [
        "",
        "## How to reproduce",
        "",
        "```sh",
        'pip install -e ".[bench]"        # matplotlib and psutil',
        "python -m benchmarks              # full run, ~12 min: benchmarks/RESULTS.md + PNGs",
        "python -m benchmarks --quick      # under a minute; writes to a temp dir (printed)",
        "python -m benchmarks --only 2     # some scenarios; a temp dir (printed) unless --out",
        "python -m benchmarks --only 1,4 --runs 5 --out /tmp/bench",
        "python benchmarks/run.py --help   # the same, as a script",
        "```",
        "",
        "Run it on an otherwise idle machine with at least 2 cores (the sandbox takes one, "
        "the client the other). To poke at the server by hand: "
        "`python -m imichat_async.sandbox --port 0 --chats 4000 --latency 0.04`.",
        "",
        f"_Command: `python -m benchmarks {' '.join(sys.argv[1:])}`_",
        "",
    ]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path
