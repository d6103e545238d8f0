"""Every Python block of the README runs as written, pasted into a file, against the sandbox.

Each block is written to a file of its own and run in a fresh interpreter, in an empty
directory, with `IMICHAT_BASE_URL`, `IMICHAT_TOKEN` and `IMICHAT_TEAM_ID` pointing at a
sandbox on 127.0.0.1 (what `imichat-async sandbox` prints, ready to `export`): the
README's examples read their credentials from there, as the CLI does. An HTML comment
on the line before a block may say how it runs:

- `<!-- readme-test: pytest -->`: the block is a test module, run by pytest;
- `<!-- readme-test: not run (needs X) -->`: it needs a package the project does not
  install (X, one of `NOT_INSTALLED`); it must still compile;
- `<!-- readme-test: run by tests/test_x.py -->`: a fragment (one line of Polars) that
  test module runs in its own setting.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.redis_proc import RedisMissing, RedisServer
from imichat_async.sandbox import Sandbox

from .sandbox_thread import ThreadedSandbox, env_for

README = Path(__file__).resolve().parent.parent / "README.md"
NOT_INSTALLED = {"Airflow"}  # packages a README example uses that no extra installs
_BLOCK = re.compile(
    r"(?:<!-- readme-test: (?P<how>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S
)


def blocks() -> list[tuple[int, str, str]]:
    """(line number, how it runs, code) for every Python block of the README."""
    text = README.read_text(encoding="utf-8")
    return [
        (text[: m.start("code")].count("\n") + 1, m.group("how") or "script", m.group("code"))
        for m in _BLOCK.finditer(text)
    ]


BLOCKS = blocks()


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with ThreadedSandbox(chats=300, seed=12) as sb:
        yield sb


@pytest.fixture(scope="module")
def rate_store() -> Iterator[str | None]:
    """A real Redis for the examples that share a rate (`IMICHAT_RATE_STORE`); without the
    package they run on, learning alone, as the README says they do when the store fails."""
    try:
        server = RedisServer().start()
    except RedisMissing:
        yield None
        return
    try:
        yield server.url
    finally:
        server.close()


def test_the_readme_has_examples_and_each_says_how_it_runs() -> None:
    """The parse finds the blocks; a block not run names a package the project lacks."""
    assert len(BLOCKS) >= 8
    for line, how, _ in BLOCKS:
        if how.startswith("not run"):
            needs = re.fullmatch(r"not run \(needs (\w+)\)", how)
            assert needs and needs[1] in NOT_INSTALLED, f"README line {line}: {how!r}"
        elif how.startswith("run by "):
            module = README.parent / how.removeprefix("run by ")
            assert "readme_code(" in module.read_text(encoding="utf-8"), f"README line {line}"
        else:
            assert how in ("script", "pytest"), f"README line {line}: unknown {how!r}"


@pytest.mark.slow
@pytest.mark.parametrize(("line", "how", "code"), BLOCKS, ids=[f"line{b[0]}" for b in BLOCKS])
def test_readme_block_runs_as_written(
    line: int, how: str, code: str, sandbox: Sandbox, rate_store: str | None, tmp_path: Path
) -> None:
    """The block, pasted into a file, runs to its end against the sandbox."""
    compile(code, f"README.md line {line}", "exec")
    if how.startswith(("not run", "run by ")):
        return
    path = tmp_path / ("test_readme_example.py" if how == "pytest" else "example.py")
    path.write_text(code, encoding="utf-8")
    argv = [sys.executable, str(path)]
    if how == "pytest":
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)]
    env = env_for(sandbox)
    env.pop("PYTHONPATH", None)
    if rate_store is not None:
        env["IMICHAT_RATE_STORE"] = rate_store
    env["PYTHONWARNINGS"] = "error::RuntimeWarning"  # an unawaited coroutine fails the run
    env["DLT_DATA_DIR"] = str(tmp_path / "dlt")  # dlt keeps pipelines there: one per run
    proc = subprocess.run(
        argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    output = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"README line {line}:\n{output}"
    if how == "pytest":
        assert re.search(r"\b1 passed\b", proc.stdout), proc.stdout[-2000:]
    assert os.environ.get("IMICHAT_TOKEN") != sandbox.token  # the test's own env is untouched
