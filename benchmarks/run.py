"""The benchmark runner: `python -m benchmarks [--quick] [--out DIR] [--runs N] [--only 1,2]`.

Also runs as a script, `python benchmarks/run.py ...`. A full run writes
`benchmarks/RESULTS.md` and the PNG plots beside it. `--quick` (under a minute,
one run, small sizes) and `--only` (some scenarios) write to a new temporary
directory unless `--out` is given, so they never overwrite the committed results.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from benchmarks import report
from benchmarks.common import Config, ScenarioResult
from benchmarks.scenarios import ALIASES, SCENARIOS, TITLES

HERE = Path(__file__).resolve().parent


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="under a minute: 1 run, small N")
    parser.add_argument("--out", type=Path, default=None, help="directory for RESULTS.md + PNGs")
    parser.add_argument("--runs", type=int, default=None, help="repetitions (default 3; quick 1)")
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated scenario numbers, of {sorted(SCENARIOS)}, or {sorted(ALIASES)}",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser.parse_args(argv)


def output_dir(out: Path | None, *, quick: bool, partial: bool) -> Path:
    """Where a run writes: `--out`, else `benchmarks/` for a full run only. A quick run or
    a partial one (`--only`) gets a new temporary directory, so that it never replaces the
    committed RESULTS.md with a report of some scenarios.
    """
    if out is not None:
        return out
    if quick or partial:
        return Path(tempfile.mkdtemp(prefix="imichat-bench-"))
    return HERE


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    cfg = Config.quick_mode() if args.quick else Config.full()
    if args.runs is not None:
        if args.runs < 1:
            raise SystemExit("--runs must be >= 1")
        cfg = dataclasses.replace(cfg, runs=args.runs)
    numbers = sorted(SCENARIOS)
    if args.only:
        try:
            names = [x.strip() for x in args.only.split(",") if x.strip()]
            numbers = sorted({n for x in names for n in (ALIASES[x] if x in ALIASES else [int(x)])})
        except ValueError:
            raise SystemExit(f"--only takes numbers like 1,4 or names: {args.only!r}") from None
        unknown = set(numbers) - set(SCENARIOS)
        if unknown:
            raise SystemExit(f"unknown scenario(s) {sorted(unknown)}; known {sorted(SCENARIOS)}")
    out = output_dir(args.out, quick=cfg.quick, partial=bool(args.only))
    out.mkdir(parents=True, exist_ok=True)
    # Retry warnings would go to stderr through logging's last-resort handler, and cost CPU.
    logging.getLogger("imichat_async").setLevel(logging.ERROR)

    load_at_start = report.load_average()
    git = report.git_rev()  # before this run writes RESULTS.md and the plots
    started = time.perf_counter()
    results: list[ScenarioResult] = []
    failed = False
    for n in numbers:
        print(f"[{time.perf_counter() - started:6.1f}s] scenario {n}: {TITLES[n]} ...", flush=True)
        # Each scenario starts clean: what earlier scenarios left in this process is collected,
        # and the harness's own long-lived objects are frozen out of the collector's walks.
        gc.collect()
        gc.freeze()
        t0 = time.perf_counter()
        try:
            result = SCENARIOS[n](cfg)
        except Exception as exc:
            failed = True
            traceback.print_exc()
            result = ScenarioResult(n, TITLES[n], "", error=f"{type(exc).__name__}: {exc}")
        result.seconds = time.perf_counter() - t0
        if result.error is not None:
            failed = True
        results.append(result)
        for t in result.targets:
            print(f"    {t.what}: {t.measured} -> {t.verdict.strip('*')}", flush=True)
    total = time.perf_counter() - started
    images = [] if args.no_plots else report.plots(results, out)
    path = report.write(results, cfg, out, images, total, load_at_start, git)
    raw = [
        {
            "number": r.number,
            "title": r.title,
            "tables": [dataclasses.asdict(t) for t in r.tables],
            "targets": [dataclasses.asdict(t) for t in r.targets],
            "notes": r.notes,
            "error": r.error,
            "seconds": r.seconds,
        }
        for r in results
    ]
    (out / "results.json").write_text(json.dumps(raw, indent=1, ensure_ascii=False))
    print(f"[{total:6.1f}s] wrote {path}" + "".join(f", {out / i}" for i in images))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
