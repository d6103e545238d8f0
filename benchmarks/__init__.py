"""Benchmarks of imichat-async against a sandbox server in its own process.

Run `python -m benchmarks` (or `python benchmarks/run.py`); `--quick` for the
under-a-minute form. Results: `benchmarks/RESULTS.md` and its PNG plots.
"""
