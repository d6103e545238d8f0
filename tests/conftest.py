"""Shared test switches: `--soak` runs the long soak tests; everything else runs by default."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks.redis_proc import RedisServer

from .helpers import started


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fleet",
        action="store_true",
        default=False,
        help="also run the tests marked `fleet` (a fleet sharing a live Redis store, ~1 min)",
    )
    parser.addoption(
        "--bench",
        action="store_true",
        default=False,
        help="also run the tests marked `bench` (the quick benchmark run, over a minute)",
    )
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


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A real `redis-server` on a free loopback port (persistence off) for a module's tests."""
    server = started(RedisServer())
    try:
        yield server.url
    finally:
        server.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `bench` run only with `--bench`, `fleet` only with `--fleet` (CI runs
    both): deselected otherwise, so the default run stays within a few minutes on 2 cores.
    `fleet` holds the slow tests of a fleet sharing a live store (worker processes, a Dask
    cluster: about a minute); the quick ones on a live store run by default."""
    opted = {name for name in ("bench", "fleet") if config.getoption(f"--{name}")}
    kept = [
        item
        for item in items
        if all(
            item.get_closest_marker(name) is None
            for name in ("bench", "fleet")
            if name not in opted
        )
    ]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept
