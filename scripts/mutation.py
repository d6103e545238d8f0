"""Mutation testing of one core module against its own unit tests (not part of the suite).

    .venv/bin/python scripts/mutation.py paging protocol query retry auth limiter  # or paths
    .venv/bin/python scripts/mutation.py retry --list                # mutants, no run
    .venv/bin/python scripts/mutation.py protocol --only _error_from_body  # some of them

Why a small AST mutator rather than mutmut 3: mutmut 3 copies the tree into
`mutants/`, rewrites every function into a trampoline and picks tests by
tracing the whole suite (sandbox and subprocess tests included), which takes
many minutes on two cores; here each module meets only its own unit tests
(`_protocol.py` -> `tests/test_protocol.py`; `TESTS` names the modules whose
unit tests span several files), so a module takes seconds to a few minutes
(paging, 294 mutants, about 3 minutes with the default 2 jobs).

How: the parent imports the package and pytest once; for each mutant it forks,
the child re-executes the module's mutated source in the module's own namespace
(so `protocol.X` lookups from other modules see the mutant too), then runs
`pytest -x` on the test files, which it imports only now. A failing or
timed-out run kills the mutant. Nothing on disk is changed. A module that
imported a name from the mutated one (`from ._retry import RetryPolicy`) keeps
the original: that is why each module is measured with its own unit tests.

Mutations: comparison flips (`==`/`!=`, `<`/`<=`, `>`/`>=`, `in`/`not in`,
`is`/`is not`), `and`/`or`, drop `not` and unary minus, arithmetic and
augmented-assignment operator swaps, `min`/`max` swap, constants (bools
flipped, numbers +1, strings emptied, "" -> "XX"), each call argument and
keyword removed, call statements removed, assignments and returns inside
functions set to None. Docstrings, annotations and f-string text are left alone.

Score = killed / (total - equivalent). `EQUIVALENT` below lists, per module,
the mutants that no test can kill because the program behaves the same; each
key is `function: original -> mutant` (line numbers shift, these keys do not).
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "imichat_async"

#: module -> its unit test files, where they are not just `tests/test_MODULE.py`.
TESTS: dict[str, list[str]] = {
    "paging": ["tests/test_paging.py", "tests/test_engine.py"],
    # The limiter's parts (issue 25) are tested through it and alone, in one file.
    "sched": ["tests/test_limiter.py"],
    "slots": ["tests/test_limiter.py"],
    "gate": ["tests/test_limiter.py"],
}

#: module -> {mutant key: why it is equivalent}. Keys as printed by `--list`.
EQUIVALENT: dict[str, dict[str, str]] = {
    "query": {
        "_datetime_value: datetime(value.year, value.month, value.day, tzinfo=timezone.utc)"
        " -> datetime(value.year, value.month, value.day)": (
            "a naive datetime is UTC to format_datetime, so the date's midnight is the same"
        ),
        "split_keyword: param in protocol.PARAM_OPERATORS"
        " -> param not in protocol.PARAM_OPERATORS": (
            "no vendor param contains '__', so both branches return (param, operator)"
        ),
        "split_keyword: 'eq' -> '' #2": "unreachable: no vendor param contains '__'",
        "split_keyword: return (key, 'eq') -> return None #2": (
            "unreachable: no vendor param contains '__'"
        ),
    },
    "protocol": {
        "_header: value = headers.get(name) -> value = None": (
            "the case-insensitive scan that follows finds the exact-case name too (only slower)"
        ),
    },
    "paging": {
        "_Alarm.wait: self._timer[0] > deadline -> self._timer[0] >= deadline": (
            "a timer armed for exactly the new deadline is replaced by one for the same"
            " instant: it rings at the same time either way"
        ),
        "<module>: 'T' -> ''": "a TypeVar's name matters to type checkers only",
        "iterate_pages: 8 -> 9": (
            "the engine's own default: its one caller, the client, always passes prefetch"
            " (4 x concurrency unless given)"
        ),
        "iterate_pages.stalled: next_launch > end -> next_launch >= end": (
            "the window is topped up before a page is taken, so it is short only for the first"
            " page fetched alone; there `next_launch == end` means nothing behind the head, and"
            " the `all()` that follows is True as well"
        ),
        "iterate_pages: tasks.clear() -> pass": (
            "the last statement of the generator: the dict goes with its frame"
        ),
        "_reaped: return False -> return None": "callers only test its truth; None is false",
        "_reaped: True -> False": (
            "a finished hedge task then stays in the cleanup list (its outcome already"
            " retrieved): at most 2 per hedge, within the hedge budget; nothing else changes"
        ),
        "_reaped: task.exception() -> pass": (
            "every task reaped was cancel()ed first (a loser, a page past the end, cleanup) or"
            " had its outcome read in race(); Future.cancel() clears the 'exception was never"
            " retrieved' flag even on a finished task"
        ),
        "_cancel_all: _reaped(t) -> pass": (
            "every task here was cancel()ed just before, which clears the 'exception was never"
            " retrieved' flag even on a finished task"
        ),
        "_reaped: return True -> return None": (
            "a finished hedge task then stays in the cleanup list (its outcome already"
            " retrieved): at most 2 per hedge, within the hedge budget; nothing else changes"
        ),
    },
    "auth": {
        "TokenProvider.get: token = self._token -> token = None": (
            "every get() then takes the lock; with no refresh running the lock is free and"
            " asyncio.Lock.acquire() takes a free lock without yielding: the same token at once"
            " (in the turn right after a refresh it queues behind the waiters just woken, who"
            " take no new token: the same token a turn later)"
        ),
    },
    "retry": {
        "<module>: 'T' -> ''": "a TypeVar's name matters to type checkers only",
        "backoff_seconds: policy.backoff_initial <= 0 -> policy.backoff_initial < 0": (
            "initial 0 gives tenacity's jitter an upper bound of 0: the wait is 0 either way"
        ),
        "_log_retry.before_sleep: 0.0 -> 1.0": (
            "tenacity always sets next_action before before_sleep: the fallback never runs"
        ),
    },
    "slots": {
        "Slots.take: self.in_flight > self.peak -> self.in_flight >= self.peak": (
            "when they are equal, peak is set to the value it already has"
        ),
        "Slots.release: 1 -> 2 #2": (
            "an epoch is only compared for equality with the current one: any bump that"
            " never repeats a value (+2 as +1) behaves the same"
        ),
        "Slots.release: self.epoch += 1 -> self.epoch -= 1": (
            "an epoch is only compared for equality with the current one: 0, -1, -2... never"
            " repeat either"
        ),
    },
    "gate": {
        "Waiter.__init__: self.granted = False -> self.granted = None": (
            "`granted` is only read for its truth, and None is false as False is"
        ),
        "RateGate.delay: 0.0 -> 1.0": (
            "without a rate, delay() is asked only by the limiter's fast path: without it the"
            " request joins the empty queue and `_wake` (which asks no delay without a rate)"
            " grants it at once, same slot and ticket, no await suspends"
        ),
        "RateGate.relieve: return False -> return None": (
            "the result is only read for its truth, and None is false as False is"
        ),
    },
    "sched": {
        "<module>: 'T' -> ''": "a TypeVar's name matters to type checkers only",
        "<module>: 'interactive' -> ''": (
            "the `Priority` Literal is read by type checkers only (PRIORITIES is checked)"
        ),
        "<module>: 'background' -> ''": (
            "the `Priority` Literal is read by type checkers only (PRIORITIES is checked)"
        ),
        "Scheduler.remove: return False -> return None": (
            "the result is only read for its truth, and None is false as False is"
        ),
    },
    "limiter": {
        "<module>: 'Limiter' -> ''": "`__all__` of a private module: read by no import here",
        "<module>: 'Ticket' -> ''": "`__all__` of a private module: read by no import here",
    },
}


@dataclass(frozen=True)
class Mutant:
    """One mutation: the index of the node it replaces and a stable, line-free key."""

    index: int
    line: int
    key: str


_CMP_SWAP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_BIN_SWAP: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
    ast.BitOr: ast.BitAnd,
    ast.BitAnd: ast.BitOr,
}


def _replacements(node: ast.AST, in_function: bool) -> Iterator[ast.AST]:
    """Every mutant of `node` (each a new node standing in its place)."""
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            swap = _CMP_SWAP.get(type(op))
            if swap is not None:
                new = copy.deepcopy(node)
                new.ops[i] = swap()
                yield new
    elif isinstance(node, ast.BoolOp):
        new_bool = copy.deepcopy(node)
        new_bool.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        yield new_bool
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        yield copy.deepcopy(node.operand)
    elif isinstance(node, (ast.BinOp, ast.AugAssign)):
        swap_bin = _BIN_SWAP.get(type(node.op))
        if swap_bin is not None:
            new_op = copy.deepcopy(node)
            new_op.op = swap_bin()
            yield new_op
    elif isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool):
            yield ast.Constant(not value)
        elif isinstance(value, (int, float)):
            yield ast.Constant(value + 1)
        elif isinstance(value, str):
            yield ast.Constant("" if value else "XX")
    elif isinstance(node, ast.Call):
        if isinstance(node.func, ast.Name) and node.func.id in ("min", "max"):
            new_call = copy.deepcopy(node)
            new_call.func = ast.Name("max" if node.func.id == "min" else "min", ast.Load())
            yield new_call
        for i in range(len(node.args)):
            new_call = copy.deepcopy(node)
            del new_call.args[i]
            yield new_call
        for i in range(len(node.keywords)):
            new_call = copy.deepcopy(node)
            del new_call.keywords[i]
            yield new_call
    elif in_function and isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        yield ast.Pass()
    elif in_function and isinstance(node, ast.Assign) and not _is_none(node.value):
        new_assign = copy.deepcopy(node)
        new_assign.value = ast.Constant(None)
        yield new_assign
    elif in_function and isinstance(node, ast.Return) and not _is_none(node.value):
        yield ast.Return(ast.Constant(None))


def _is_none(node: ast.expr | None) -> bool:
    return node is None or (isinstance(node, ast.Constant) and node.value is None)


class _Walker:
    """Visits the nodes worth mutating in a fixed order, numbering each (mutant) candidate."""

    def __init__(self, visit: Callable[[ast.AST, int, str, bool], ast.AST | None]) -> None:
        self.visit_fn = visit
        self.count = 0
        self.scope: list[str] = []

    def walk(self, node: ast.AST, in_function: bool = False) -> ast.AST:
        if _skipped(node):
            return node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.scope.append(node.name)
            inner = in_function or not isinstance(node, ast.ClassDef)
            self._children(node, inner)
            self.scope.pop()
            return node
        self._children(node, in_function)
        self.count += 1
        replacement = self.visit_fn(node, self.count - 1, ".".join(self.scope), in_function)
        return node if replacement is None else replacement

    def _children(self, node: ast.AST, in_function: bool) -> None:
        for field, value in ast.iter_fields(node):
            if field in ("annotation", "returns", "type_comment"):
                continue
            if isinstance(value, list):
                body = _without_docstring(node, field, value)
                for i, item in enumerate(value):
                    if isinstance(item, ast.AST) and item in body:
                        value[i] = self.walk(item, in_function)
            elif isinstance(value, ast.AST):
                setattr(node, field, self.walk(value, in_function))


def _skipped(node: ast.AST) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.JoinedStr)):
        return True
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING"
    )


def _without_docstring(node: ast.AST, field: str, items: list[ast.AST]) -> list[ast.AST]:
    if (
        field == "body"
        and isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and items
        and isinstance(items[0], ast.Expr)
        and isinstance(items[0].value, ast.Constant)
        and isinstance(items[0].value.value, str)
    ):
        return items[1:]
    return items


def _short(node: ast.AST) -> str:
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= 70 else text[:67] + "..."


def list_mutants(source: str) -> list[Mutant]:
    """Every mutant of `source`, each keyed `scope: original -> mutant` (#n when repeated)."""
    mutants: list[Mutant] = []
    seen: dict[str, int] = {}

    def visit(node: ast.AST, index: int, scope: str, in_function: bool) -> None:
        for j, new in enumerate(_replacements(node, in_function)):
            key = f"{scope or '<module>'}: {_short(node)} -> {_short(new)}"
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > 1:
                key += f" #{seen[key]}"
            mutants.append(Mutant(index * 1000 + j, getattr(node, "lineno", 0), key))

    _Walker(visit).walk(ast.parse(source))
    return mutants


def mutate(source: str, mutant: Mutant) -> ast.Module:
    """The module's tree with `mutant` applied."""
    target, which = divmod(mutant.index, 1000)

    def visit(node: ast.AST, index: int, scope: str, in_function: bool) -> ast.AST | None:
        if index != target:
            return None
        new = list(_replacements(node, in_function))[which]
        return ast.copy_location(new, node)

    tree = _Walker(visit).walk(ast.parse(source))
    assert isinstance(tree, ast.Module)
    return ast.fix_missing_locations(tree)


def _child(module: str, path: Path, tree: ast.Module | None, tests: list[Path]) -> int:
    """In the forked child: install the mutant, run the tests, return pytest's exit code."""
    import pytest

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    if tree is not None:
        mod = sys.modules[module]
        exec(compile(tree, str(path), "exec"), mod.__dict__)
    args = [*map(str, tests), "-x", "-q", "-p", "no:cacheprovider", "--assert=plain"]
    return int(pytest.main(args))


def _preload(module: str) -> None:
    """Import once, before forking, what every child needs: pytest, its plugins, the package.

    This cuts a mutant's run from seconds to about half a second. `--assert=plain`
    in the child keeps pytest from objecting to plugins it can no longer rewrite.
    """
    from importlib.metadata import entry_points

    import pytest  # noqa: F401

    for entry in entry_points(group="pytest11"):
        importlib.import_module(entry.module)
    importlib.import_module(PACKAGE)
    importlib.import_module(module)


def _start(module: str, path: Path, tree: ast.Module | None, tests: list[Path]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 3
        try:
            code = _child(module, path, tree, tests)
        finally:
            os._exit(code)
    return pid


def run_module(
    name: str, jobs: int, timeout: float | None, only_list: bool, only: str | None = None
) -> float:
    """Run every mutant of one module; print survivors; return the score in percent."""
    short = name.removeprefix("_").removesuffix(".py").split("/")[-1].removeprefix("_")
    module = f"{PACKAGE}._{short}"
    path = ROOT / PACKAGE / f"_{short}.py"
    tests = [ROOT / t for t in TESTS.get(short, [f"tests/test_{short}.py"])]
    names = " + ".join(t.name for t in tests)
    source = path.read_text()
    mutants = [m for m in list_mutants(source) if only is None or only in m.key]
    equivalent = EQUIVALENT.get(short, {})
    if only_list:
        for m in mutants:
            print(f"{path.name}:{m.line}: {m.key}")
        return 0.0
    _preload(module)

    started = time.monotonic()
    pid = _start(module, path, None, tests)
    _, status = os.waitpid(pid, 0)
    baseline = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{names} fails on the unmutated code: fix that first")
    limit = timeout or max(10.0, 5 * baseline)

    results: dict[Mutant, str] = {}
    pending = list(mutants)
    running: dict[int, tuple[Mutant, float]] = {}
    while pending or running:
        while pending and len(running) < jobs:
            m = pending.pop(0)
            running[_start(module, path, mutate(source, m), tests)] = (m, time.monotonic())
        time.sleep(0.02)
        for pid, (m, t0) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                results[m] = "survived" if code == 0 else "killed"
                del running[pid]
            elif time.monotonic() - t0 > limit:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                results[m] = "timeout"  # an endless loop is caught: it counts as killed
                del running[pid]

    mutants.sort(key=lambda m: m.line)
    survivors = [m for m in mutants if results[m] == "survived" and m.key not in equivalent]
    equivalents = [m for m in mutants if results[m] == "survived" and m.key in equivalent]
    stale = sorted(set(equivalent) - {m.key for m in mutants}) if only is None else []
    killed = len(mutants) - len(survivors) - len(equivalents)
    denominator = len(mutants) - len(equivalents)
    score = 100.0 * killed / denominator if denominator else 100.0
    print(f"\n== {path.name} against {names} ({time.monotonic() - started:.0f} s)")
    for m in equivalents:
        print(f"  equivalent  line {m.line}: {m.key}\n              ({equivalent[m.key]})")
    for m in survivors:
        print(f"  SURVIVED    line {m.line}: {m.key}")
    for key in stale:
        print(f"  (stale equivalent entry, no such mutant: {key})")
    print(
        f"  {len(mutants)} mutants, {killed} killed, {len(survivors)} survived, "
        f"{len(equivalents)} equivalent: score {score:.1f} %"
    )
    return score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("modules", nargs="+", help="protocol, query, retry, auth, ...")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    parser.add_argument("--timeout", type=float, help="seconds per mutant (default 5x baseline)")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument("--only", help="run only the mutants whose key contains this text")
    parser.add_argument("--min-score", type=float, default=0.0, help="exit 1 below this score")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    scores = {m: run_module(m, args.jobs, args.timeout, args.list, args.only) for m in args.modules}
    if not args.list and len(scores) > 1:
        print("\n" + "  ".join(f"{m}: {s:.1f} %" for m, s in scores.items()))
    return 0 if args.list or min(scores.values()) >= args.min_score else 1


if __name__ == "__main__":
    sys.exit(main())
