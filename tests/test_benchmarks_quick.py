"""The benchmark code must not rot: `python -m benchmarks --quick` runs and writes its tables.

Asserts that every scenario produced its tables and targets, never timings
(those belong to `benchmarks/RESULTS.md`, written by a full run by hand).
Results go to a temporary directory: the committed RESULTS.md is never touched.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = range(1, 17)


@pytest.mark.bench
def test_quick_benchmarks_write_every_table(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    committed = ROOT / "benchmarks" / "RESULTS.md"
    before = committed.stat().st_mtime_ns if committed.exists() else None

    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    text = (out / "RESULTS.md").read_text()
    assert "Machine and versions" in text
    assert "## Targets" in text
    assert "## How to reproduce" in text
    for n in SCENARIOS:
        assert f"\n## {n}. " in text, f"scenario {n} missing from RESULTS.md"

    results = {r["number"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(results) == set(SCENARIOS)
    for n, r in results.items():
        assert r["error"] is None, f"scenario {n}: {r['error']}"
        assert r["tables"], f"scenario {n} produced no table"
        for table in r["tables"]:
            assert table["rows"], f"scenario {n}: empty table {table['title']!r}"
            assert all(len(row) == len(table["columns"]) for row in table["rows"])
    for n in (1, 2, 4, 5, 6, 7, 8, 9, 10, 13, 14, 15):
        assert results[n]["targets"], f"scenario {n} judged no target"

    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "scaling.png").stat().st_size > 0
        assert (out / "memory.png").stat().st_size > 0
        assert "scaling.png" in text and "memory.png" in text

    after = committed.stat().st_mtime_ns if committed.exists() else None
    assert after == before, "a quick run must not overwrite benchmarks/RESULTS.md"


def test_only_a_full_run_writes_the_committed_results(tmp_path: Path) -> None:
    """`--quick` and `--only` write to a new temporary directory; `--out` wins; a full run
    writes `benchmarks/` (where the committed RESULTS.md is)."""
    from benchmarks.run import output_dir

    committed = ROOT / "benchmarks"
    assert output_dir(None, quick=False, partial=False) == committed
    for quick, partial in ((True, False), (False, True), (True, True)):
        out = output_dir(None, quick=quick, partial=partial)
        assert out != committed and out.is_dir() and not any(out.iterdir())
        out.rmdir()
    assert output_dir(tmp_path, quick=False, partial=True) == tmp_path
    assert output_dir(tmp_path, quick=False, partial=False) == tmp_path
