"""The dlt source (`imichat_async.dlt.chats_source`): loads into a real DuckDB file (sandbox)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import dlt
import duckdb
import pytest
from dlt.pipeline.exceptions import PipelineStepFailed

import imichat_async as imi
from imichat_async import dlt as imi_dlt
from imichat_async._retry import RetryPolicy
from imichat_async.export import _plan, state_from_json
from imichat_async.sandbox import Faults, Sandbox

from .sandbox_thread import ThreadedSandbox
from .test_sync_chats import SINCE, FakeClock, Versions, _on_loop, in_scope


@pytest.fixture(autouse=True)
def quiet_dlt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No telemetry, and nothing written outside tmp_path."""
    monkeypatch.setenv("RUNTIME__DLTHUB_TELEMETRY", "false")
    monkeypatch.setenv("DLT_DATA_DIR", str(tmp_path / "dlt-data"))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """One wall clock for the sandbox's changes and the sync's T1 (no sleeps)."""
    fake = FakeClock()
    monkeypatch.setattr(_plan, "utcnow", fake.dt)
    return fake


class Loader:
    """Runs `chats_source` into `tmp_path/chats.duckdb`, counting the sandbox's requests."""

    def __init__(self, box: ThreadedSandbox, sb: Sandbox, tmp_path: Path) -> None:
        self.box, self.sb, self.tmp = box, sb, tmp_path
        self.db = tmp_path / "chats.duckdb"

    def source_args(self) -> dict[str, Any]:
        sb = self.sb
        return {
            "base_url": sb.base_url,
            "token": sb.token,
            "team_id": sb.team_id,
            "since": SINCE,
            "concurrency": 4,
            "client_options": {"retry_policy": RetryPolicy.testing(max_retries=5)},
        }

    def source(self) -> Any:
        return imi_dlt.chats_source(**self.source_args())

    def pipeline(self, workdir: str = "pipelines") -> Any:
        return dlt.pipeline(
            pipeline_name="imichat",
            destination=dlt.destinations.duckdb(str(self.db)),
            dataset_name="imichat",
            pipelines_dir=str(self.tmp / workdir),
        )

    def load(self, workdir: str = "pipelines") -> int:
        """One `pipeline.run`; the search requests it made."""
        before = self.sb.stats.requests_total
        self.pipeline(workdir).run(self.source())
        return self.sb.stats.requests_total - before

    def churn(self, clock: FakeClock, updates: int, inserts: int) -> None:
        """`updates` + `inserts` changes, a minute apart (on the sandbox's own loop)."""
        for i in range(max(updates, inserts)):
            clock.now += 60
            up, ins = int(i < updates), int(i < inserts)
            _on_loop(self.box, partial(self.sb.churn, updates=up, inserts=ins))
        clock.now += 1

    def rows(self) -> dict[str, tuple[str, int, int]]:
        """chat_id -> (status, updated_at us, tags) as loaded; asserts one row per chat."""
        with duckdb.connect(str(self.db), read_only=True) as con:
            got = con.sql(
                "SELECT c.chat_id, c.status, epoch_us(c.updated_at), count(t.value) "
                "FROM imichat.chats c LEFT JOIN imichat.chats__tag t ON t._dlt_root_id = c._dlt_id "
                "GROUP BY ALL"
            ).fetchall()
        ids = [r[0] for r in got]
        assert len(set(ids)) == len(ids), "a chat loaded as two rows"
        return {r[0]: (r[1], r[2], r[3]) for r in got}

    def current(self) -> dict[str, tuple[str, int, int]]:
        """The sandbox's current record of each chat created since SINCE, in `rows` form."""
        records = _on_loop(self.box, self.sb.current_records)
        keep = in_scope(list(records.values()))
        return {k: _row(r) for k, r in records.items() if k in keep}


def _row(record: dict[str, Any]) -> tuple[str, int, int]:
    return (
        record["status"],
        _plan.to_us("updated_at", record["updated_at"]),
        len(record.get("tag") or ()),
    )


@pytest.fixture
def served(tmp_path: Path, clock: FakeClock) -> Iterator[Loader]:
    box = ThreadedSandbox(chats=600, seed=11, wall_clock=clock)
    with box as sb:
        yield Loader(box, sb, tmp_path)


def test_second_load_merges_the_changes_and_reads_a_fraction_of_the_first(
    served: Loader, clock: FakeClock
) -> None:
    """Two loads with changes between: one current row per chat, the second load incremental."""
    first = served.load()
    assert served.rows() == served.current()
    served.churn(clock, updates=20, inserts=5)
    second = served.load()
    rows = served.rows()
    assert rows == served.current()
    assert len(rows) == len(in_scope(served.sb.data))
    assert second < first * 0.2, (first, second)
    print(f"requests: first load {first}, second load {second}")
    state = served.pipeline().state["sources"]["imichat"]["resources"]["chats"]
    assert state_from_json(state["sync"]).runs == 2


def test_changes_while_loading_settle_to_one_current_row_per_chat(
    served: Loader, clock: FakeClock
) -> None:
    """Chats change during and between loads: each load one row per chat, a version the
    sandbox served; once nothing changes, the next load leaves every chat current."""
    versions = Versions(served.sb)
    served.sb.faults = Faults(churn_every=4, churn_updates=3, churn_inserts=1)
    for _ in range(2):
        served.load()
        rows, current = served.rows(), served.current()
        served_versions = {(cid, _plan.to_us("u", at)) for cid, at in versions.known}
        assert {(cid, r[1]) for cid, r in rows.items()} <= served_versions
        assert all(rows[cid][1] <= current[cid][1] for cid in rows)
        served.churn(clock, updates=10, inserts=2)
    served.sb.faults = Faults()
    clock.now += 1
    served.load()
    assert served.rows() == served.current()
    assert served.sb.stats.updated > 40  # the loads did run under changes


def test_a_load_lost_after_the_sync_is_read_again_by_the_next(
    served: Loader, clock: FakeClock
) -> None:
    """The sync finished but its package never loaded, working dir lost: the next run starts
    from the destination's state and the table still ends current (at least once, merged)."""
    full = served.load()
    served.churn(clock, updates=10, inserts=3)
    served.pipeline().extract(served.source())  # synced; its package never loaded
    served.churn(clock, updates=5, inserts=1)
    again = served.load(workdir="fresh")  # a new machine: state restored from the destination
    assert served.rows() == served.current()
    assert again < full * 0.2, "an incremental run from the first load's state, not a full read"


def test_one_load_carrying_two_versions_of_a_chat_keeps_the_newer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dedup_sort` on updated_at: the newer version wins even when it arrives first."""
    new = {"chat_id": "c1", "status": "closed", "updated_at": "2024-05-01T10:00:00.5Z"}
    old = {"chat_id": "c1", "status": "active", "updated_at": "2024-05-01T10:00:00Z"}

    other = {"chat_id": "c2", "updated_at": "2024-05-02T00:00:00Z"}
    db = _load_with_a_fake_sync(tmp_path, monkeypatch, [new, old, other])
    with duckdb.connect(str(db), read_only=True) as con:
        got = con.sql("SELECT chat_id, status FROM imichat.chats ORDER BY chat_id").fetchall()
    assert got == [("c1", "closed"), ("c2", None)]


class _Report:
    def summary(self) -> str:
        return "fake"


def _load_with_a_fake_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chats: list[dict[str, Any]]
) -> Path:
    """One `pipeline.run` of `chats_source` whose sync hands `chats` over; the DuckDB file."""

    async def fake_sync(client: Any, *, sink: Any, **kwargs: Any) -> Any:
        for chat in chats:
            await sink(chat)
        return _Report()

    monkeypatch.setattr(imi_dlt, "sync_chats", fake_sync)
    source = imi_dlt.chats_source(
        base_url="http://127.0.0.1:9", token="t", team_id="x", since=SINCE
    )
    db = tmp_path / "fake.duckdb"
    pipeline = dlt.pipeline(
        pipeline_name="fake",
        destination=dlt.destinations.duckdb(str(db)),
        dataset_name="imichat",
        pipelines_dir=str(tmp_path / "p"),
    )
    pipeline.run(source)
    return db


class _Records(logging.Handler):
    """The messages logged to it at `level` or above."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_null_objects_load_without_a_warning_or_an_empty_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Null `asset`, `other_details`, `tag` (the contract allows them): the first load warns of
    no column without data, and makes none; the objects of the other chats still flatten."""
    full: dict[str, Any] = {
        "chat_id": "c1",
        "updated_at": "2024-05-01T10:00:00Z",
        "asset": {"id": 7, "name": "Support"},
        "other_details": {"intent": "billing"},
        "tag": ["vip"],
    }
    empty: dict[str, Any] = {"chat_id": "c2", "updated_at": "2024-05-01T10:00:00Z"}
    empty |= {"asset": None, "other_details": None, "tag": None}

    warnings = _Records(logging.WARNING)
    dlt_logger = logging.getLogger("dlt")  # dlt's own logger: it does not propagate
    dlt_logger.addHandler(warnings)
    try:
        db = _load_with_a_fake_sync(tmp_path, monkeypatch, [empty, full])
    finally:
        dlt_logger.removeHandler(warnings)
    assert warnings.messages == []
    with duckdb.connect(str(db), read_only=True) as con:
        columns = {row[0] for row in con.sql("DESCRIBE imichat.chats").fetchall()}
        got = con.sql(
            "SELECT chat_id, asset__id, asset__name, other_details__intent "
            "FROM imichat.chats ORDER BY chat_id"
        ).fetchall()
    assert not {"asset", "other_details", "tag"} & columns
    assert got == [("c1", "7", "Support", "billing"), ("c2", None, None, None)]
    assert empty["asset"] is None  # the sync's record itself is left as it was


def test_bad_arguments_are_refused_when_the_source_is_made() -> None:
    """A time filter, a bad `since` or lag: `InvalidQueryError` before any request."""
    args: dict[str, Any] = {"base_url": "http://127.0.0.1:9", "token": "t", "team_id": "x"}
    with pytest.raises(imi.InvalidQueryError, match="updated_at__gte"):
        imi_dlt.chats_source(since=SINCE, updated_at__gte="2024-05-01", **args)
    with pytest.raises(imi.InvalidQueryError, match="since"):
        imi_dlt.chats_source(since="not a date", **args)
    with pytest.raises(imi.InvalidQueryError, match="lag"):
        imi_dlt.chats_source(since=SINCE, lag=-1, **args)
    with pytest.raises(imi.InvalidQueryError, match="stauts"):
        imi_dlt.chats_source(since=SINCE, stauts="closed", **args)


def test_another_since_is_refused_until_the_resource_state_is_dropped(served: Loader) -> None:
    """A pipeline's state made with another `since` is refused; `drop_resources` starts over."""
    served.load()
    later = {**served.source_args(), "since": "2024-06-01"}
    with pytest.raises(PipelineStepFailed) as info:
        served.pipeline().run(imi_dlt.chats_source(**later))
    message = str(info.value)
    assert "since=2024-03-01T00:00:00Z in the state, 2024-06-01T00:00:00Z given" in message
    assert 'or load into a new pipeline (or run with refresh="drop_resources") to start' in message
    served.pipeline().run(imi_dlt.chats_source(**later), refresh="drop_resources")
    records = _on_loop(served.box, served.sb.current_records)
    floor = _plan.to_us("since", "2024-06-01")
    keep = {k for k, r in records.items() if _plan.to_us("c", r["created_at"]) >= floor}
    assert served.rows() == {k: _row(records[k]) for k in keep}


def test_dlt_stopping_early_leaves_nothing_running_and_the_cursor_unmoved(
    served: Loader,
) -> None:
    """`add_limit(1)`: one batch loaded, the sync cancelled, its thread gone, no state saved."""
    source = served.source()
    source.chats.add_limit(1)
    pipeline = served.pipeline()
    pipeline.run(source)
    assert 0 < len(served.rows()) <= imi_dlt.HANDOFF_SIZE
    assert not [t for t in threading.enumerate() if t.name == "imichat-sync-loop"]
    resources = pipeline.state.get("sources", {}).get("imichat", {}).get("resources", {})
    assert "sync" not in resources.get("chats", {})
