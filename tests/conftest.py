"""Shared test switches: `--soak` runs the long soak tests; everything else runs by default."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="run the long soak tests (minutes) instead of their short CI form",
    )


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    """True when the run asked for the long soak (`pytest --soak`)."""
    return bool(request.config.getoption("--soak"))
