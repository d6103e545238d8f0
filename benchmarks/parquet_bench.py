"""Scenario 14: a Parquet export (`--format parquet`) against the NDJSON export of the same.

One sandbox process of N chats; at each latency L (0 and 40 ms), client concurrency
k, each run exports every chat twice, each export in a fresh child process
(`export_memory.run_child`), the order alternating between runs: to an NDJSON file
and to a Parquet dataset (default settings). Measured: the export's wall, its CPU
(every thread of the child: on a loaded machine the steadier ratio), its peak RSS (the
whole process, pyarrow's libraries included) and the growth of the peak over the RSS
before the export, and the dataset's size against the NDJSON file's. Then the
Parquet export's peak RSS growth at N and at a larger N (L = 0): it must stay flat.

    python -m benchmarks --only parquet
    python -m benchmarks.parquet_bench --chats 20000 --big 100000   # one pass, printed
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .common import Config, ScenarioResult, Table, Target, per_run
from .common import summarize as _summarize
from .export_memory import run_child
from .sandbox_proc import SandboxProcess

MB = 2**20
WALL_RATIO = 1.2  # Parquet wall <= 1.2 x NDJSON wall
RSS_ABOVE = 64 * MB  # Parquet peak RSS <= NDJSON's + 64 MB
FLAT = 1.10  # peak RSS growth at the big N <= 1.10 x at N


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _one(sb: SandboxProcess, k: int, fmt: str, tmp: Path) -> dict[str, Any]:
    out = tmp / ("chats.ndjson" if fmt == "ndjson" else "chats")
    result = run_child(sb, k, fmt, str(out))
    result["size"] = _size(out)
    if out.is_dir():
        result["files"] = sum(1 for _ in out.rglob("*.parquet"))
        shutil.rmtree(out)
    else:
        out.unlink()
    return result


def _pair(sb: SandboxProcess, k: int, order: tuple[str, str], tmp: Path) -> dict[str, Any]:
    runs = {fmt: _one(sb, k, fmt, tmp) for fmt in order}
    nd, pq = runs["ndjson"], runs["parquet"]
    if nd["records"] != pq["records"]:
        raise AssertionError(f"NDJSON wrote {nd['records']} chats, Parquet {pq['records']}")
    return {
        "records": pq["records"],
        "nd_wall": nd["wall"],
        "pq_wall": pq["wall"],
        "nd_cpu": nd["cpu"],
        "pq_cpu": pq["cpu"],
        "nd_peak": nd["peak"],
        "pq_peak": pq["peak"],
        "nd_growth": nd["growth"],
        "pq_growth": pq["growth"],
        "nd_size": nd["size"],
        "pq_size": pq["size"],
        "files": pq.get("files", 0),
    }


def _growth(chats: int, k: int, tmp: Path) -> dict[str, Any]:
    with SandboxProcess(chats) as sb:
        return _one(sb, k, "parquet", tmp)


def run(cfg: Config) -> ScenarioResult:
    n, big, k = cfg.s14_chats, cfg.s14_big, cfg.s14_k
    res = ScenarioResult(
        14,
        "Parquet export vs NDJSON export",
        f"N = {n} chats, k = {k}, L = "
        + " and ".join(f"{lat * 1000:.0f} ms" for lat in cfg.s14_latencies)
        + ". Each run: `export --format parquet` (a dataset, default "
        "`--max-rows-per-file` 25,000) and the NDJSON export of the same chats, each in a "
        "fresh child process, order alternating. CPU is the export's, every thread of the "
        "child (user + system). Peak RSS is the whole child's (pyarrow's "
        "libraries included); growth is the peak over the RSS before the export. Then the "
        f"Parquet export's peak RSS growth at N = {n} and N = {big} (L = 0). Median "
        f"(min-max) of {cfg.runs}.",
    )
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        res.error = "pyarrow is not installed (the parquet extra)"
        return res
    table = Table(
        "Parquet vs NDJSON",
        [
            "L",
            "NDJSON wall (s)",
            "Parquet wall (s)",
            "Parquet / NDJSON wall",
            "Parquet / NDJSON CPU",
            "NDJSON peak RSS (MB)",
            "Parquet peak RSS (MB)",
            "Parquet - NDJSON peak (MB)",
            "growth NDJSON / Parquet (MB)",
            "size Parquet / NDJSON",
        ],
    )
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        with SandboxProcess(n) as sb:
            for latency in cfg.s14_latencies:
                sb.set_faults(latency=latency)
                runs: list[dict[str, Any]] = []
                for i in range(cfg.runs):
                    order = ("ndjson", "parquet") if i % 2 == 0 else ("parquet", "ndjson")
                    runs.append(_pair(sb, k, order, tmp))
                wall = per_run(runs, lambda r: r["pq_wall"] / r["nd_wall"])
                cpu = per_run(runs, lambda r: r["pq_cpu"] / r["nd_cpu"])
                above = per_run(runs, lambda r: r["pq_peak"] - r["nd_peak"])
                size = runs[0]["pq_size"] / runs[0]["nd_size"]
                table.add(
                    f"{latency * 1000:.0f} ms",
                    _summarize([r["nd_wall"] for r in runs]).fmt(2),
                    _summarize([r["pq_wall"] for r in runs]).fmt(2),
                    "n/a" if wall is None else wall.fmt(3),
                    "n/a" if cpu is None else cpu.fmt(3),
                    _summarize([r["nd_peak"] for r in runs]).fmt(0, 1 / MB),
                    _summarize([r["pq_peak"] for r in runs]).fmt(0, 1 / MB),
                    "n/a" if above is None else above.fmt(0, 1 / MB),
                    f"{_summarize([r['nd_growth'] for r in runs]).median / MB:.0f} / "
                    f"{_summarize([r['pq_growth'] for r in runs]).median / MB:.0f}",
                    f"{size:.3f} ({runs[0]['pq_size'] / MB:.1f} / "
                    f"{runs[0]['nd_size'] / MB:.1f} MB, {runs[0]['files']} files)",
                )
                ms = f"L = {latency * 1000:.0f} ms"
                if wall is not None:
                    res.targets.append(
                        Target(
                            f"{ms}: Parquet wall <= {WALL_RATIO} x NDJSON wall",
                            f"{wall.median:.3f}",
                            wall.median <= WALL_RATIO,
                        )
                    )
                if above is not None:
                    res.targets.append(
                        Target(
                            f"{ms}: Parquet peak RSS <= NDJSON's + 64 MB",
                            f"+{above.median / MB:.1f} MB",
                            above.median <= RSS_ABOVE,
                        )
                    )
        res.tables.append(table)
        small = _growth(n, k, tmp)
        large = _growth(big, k, tmp)
    flat = Table(
        "Parquet export: peak RSS growth by size (L = 0)",
        ["chats", "peak RSS growth (MB)", "peak RSS (MB)", "files"],
    )
    for r in (small, large):
        flat.add(r["records"], f"{r['growth'] / MB:.1f}", f"{r['peak'] / MB:.0f}", r["files"])
    res.tables.append(flat)
    ratio = large["growth"] / max(1, small["growth"])
    res.targets.append(
        Target(
            f"Parquet peak RSS growth flat from {n} to {big} chats (<= +10 %)",
            f"{ratio:.3f} x",
            ratio <= FLAT,
        )
    )
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=20_000)
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    cfg = Config(runs=args.runs, s14_chats=args.chats, s14_big=args.big)
    result = run(cfg)
    for table in result.tables:
        print(table.markdown(), "\n")
    for target in result.targets:
        print(f"{target.what}: {target.measured} -> {target.verdict}")


if __name__ == "__main__":
    main()
