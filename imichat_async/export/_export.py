"""`export_chats`: check the arguments, plan the range, resume or start, run, publish."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from datetime import date, datetime
from pathlib import Path
from typing import Any

import attrs

from .. import Filter, ImiChatClient, InvalidQueryError
from . import _plan
from ._checkpoint import Checkpoint, CheckpointError, ExportState, check_directory, tenant_of
from ._plan import Intervals, RawRecord, TimeRange, UserQuery, fmt, plan_range, to_dt, to_us
from ._progress import ExportProgress, ExportReport, Progress, Tally
from ._runner import Runner
from ._sinks import FileSink, Sink, make_sink

# Pages a slice may hold before it is split. Deeper slices would cost fewer requests
# and per-slice turns (#24), but a slice read longer sees more of the data change under
# it: at 30 or 50, chats inserted while an export runs were lost (the re-reads' counts met
# the totals with the new chats in place of shifted old ones: tests/test_export.py).
DEFAULT_SLICE_PAGES = 20


@attrs.define
class _Run:
    """One run's plan and counters, and how they become a checkpoint."""

    key: dict[str, Any]
    plan: TimeRange
    checkpoint: Checkpoint[ExportState]
    tally: Tally = attrs.field(factory=Tally)
    done: Intervals = attrs.field(factory=Intervals)
    offset: int | None = None
    resumed: bool = False
    before: tuple[int, int, int] = (0, 0, 0)  # records, duplicates, slices of earlier runs

    @classmethod
    def restore(
        cls, key: dict[str, Any], user: UserQuery, st: ExportState, ck: Checkpoint[ExportState]
    ) -> _Run:
        """The run a checkpoint describes."""
        tally = Tally(
            records=st.records,
            duplicates=st.duplicates,
            slices_done=st.slices,
            verified=st.verified,
            notes=[*st.notes, f"resumed: {st.records} chats in {st.slices} slices already written"],
        )
        plan = TimeRange(user, st.lo, st.hi, st.end_inclusive)
        before = (st.records, st.duplicates, st.slices)
        return cls(key, plan, ck, tally, Intervals(st.done), st.offset, True, before)

    def state(self, complete: bool = False) -> ExportState:
        p, t = self.plan, self.tally
        return ExportState(
            key=self.key,
            lo=p.lo,
            hi=p.hi,
            end_inclusive=p.end_inclusive,
            until=fmt(p.hi - 1 if p.end_inclusive else p.hi),
            done=[(lo, hi) for lo, hi in self.done.items],
            offset=self.offset,
            records=t.records,
            duplicates=t.duplicates,
            slices=t.slices_done,
            verified=t.verified,
            notes=t.notes,
            complete=complete,
        )

    async def save(self, offset: int | None) -> None:
        self.offset = offset
        await self.checkpoint.save(self.state())

    def report(self, progress: Progress, sink: Sink, frozen: bool) -> ExportReport:
        p, t = self.plan, self.tally
        records, duplicates, slices = self.before
        return ExportReport(
            records=t.records,
            duplicates=t.duplicates,
            slices=t.slices_done,
            splits=t.splits,
            slices_reread=t.rereads,
            pages=t.pages,
            requests=progress.requests(),
            retries=progress.retries(),
            elapsed=progress.elapsed(),
            since=to_dt(p.lo),
            until=to_dt(p.hi - 1 if p.end_inclusive else p.hi),
            until_frozen=frozen,
            verified=t.verified,
            resumed=self.resumed,
            output=sink.path if isinstance(sink, FileSink) else None,
            notes=tuple(t.notes),
            pages_wasted=t.wasted,
            records_this_run=t.records - records if self.resumed else None,
            duplicates_this_run=t.duplicates - duplicates if self.resumed else None,
            slices_this_run=t.slices_done - slices if self.resumed else None,
        )


async def export_chats(
    client: ImiChatClient,
    *,
    since: datetime | date | str,
    until: datetime | date | str | None = None,
    sink: Sink | str | os.PathLike[str] | Callable[[RawRecord], Any],
    filters: Iterable[Filter | tuple[str, str, Any]] | None = None,
    condition: str = "and",
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    slice_pages: int = DEFAULT_SLICE_PAGES,
    workers: int | None = None,
    progress: Callable[[ExportProgress], None] | None = None,
    **params: Any,
) -> ExportReport:
    """Export every chat created in `[since, until)` matching the filters, each once, to `sink`.

    - `since`, `until`: datetimes (naive means UTC), dates or ISO 8601 strings.
      Without `until`, the range ends at the start instant, inclusive, frozen.
    - `filters`, `condition` and keyword filters (`status="closed"`,
      `updated_at__gte=...`) as for `search_chats`; a `created_at` filter is
      kept and intersected with the range. `condition="or"` cannot be combined
      with the time slices unless there is at most one filter.
    - `sink`: a `Sink` (`NdjsonSink(path)`, `CsvSink(path)`, `CallableSink(fn)`),
      a path (`.csv` means CSV, else NDJSON) or an async callable taking one chat.
    - `checkpoint`: a file recording the progress after every slice. If it
      exists, `resume=True` continues from it (same arguments required);
      without `resume` a `CheckpointError` is raised rather than overwrite it.
      It is deleted when the export completes.
    - `slice_pages`: a slice with more pages than this is split by time.
    - `workers`: slices searched at once (default: the client's concurrency);
      requests in flight stay bounded by the client's concurrency.
    - `progress`: called with an `ExportProgress` as pages arrive (at most
      every 50 ms) and after every slice.

    Raises `InvalidQueryError` before any request for bad filters or range,
    `CheckpointError` for an unusable checkpoint, the client's `ApiError`
    subclasses for the API's errors. On any failure or cancellation the
    checkpoint stays consistent; no task outlives the call.
    """
    user = UserQuery.checked(filters, params, condition)
    if condition == "or" and user.count() > 1:
        raise InvalidQueryError(
            "export slices the range with created_at filters, which needs "
            "condition='and'; run one export per alternative instead of condition='or'"
        )
    since_us = to_us("since", since)
    until_us = None if until is None else to_us("until", until)
    _check_count("slice_pages", slice_pages)
    n_workers = client.concurrency if workers is None else workers
    _check_count("workers", n_workers)
    out = make_sink(sink)
    key = {
        "filters": user.identity(),
        "condition": condition,
        "since": since_us,
        "until": until_us,
        "sink": out.describe(),
        **tenant_of(client.base_url, client.team_id),
    }
    ckpt: Checkpoint[ExportState] = Checkpoint(
        Path(checkpoint) if checkpoint is not None else None, resume=resume
    )
    if isinstance(out, FileSink):
        check_directory(out.path, "sink")
    if ckpt.path is not None:
        check_directory(ckpt.path, "checkpoint")
    state = ckpt.load(key)
    if state is None and resume and ckpt.path is not None and isinstance(out, FileSink):
        _check_no_orphan(ckpt.path, out)
    if state is None:
        now = to_us("now", _plan.utcnow())
        run = _Run(key, plan_range(user, since_us, until_us, now), ckpt)
    else:
        run = _Run.restore(key, user, state, ckpt)
    bar = Progress(client, run.tally, progress)
    if state is not None and state.complete:
        await _finish_published(out, ckpt)
    else:
        await _run(client, run, out, bar, n_workers, slice_pages)
    bar.tell((), force=True)
    return run.report(bar, out, frozen=until is None)


async def _run(
    client: ImiChatClient, run: _Run, out: Sink, bar: Progress, workers: int, slice_pages: int
) -> None:
    """Open (or resume) the sink, read every window not done, publish; on failure leave the
    checkpoint consistent (or, without one, remove the partial output).

    A fresh run that fails (not cancelled) before writing a chat leaves nothing behind:
    a checkpoint of nothing would only make the same command, run again once the cause
    is fixed, refuse to start without `--resume` (issue #12).
    """
    ok = False
    nothing_written = False
    try:
        count = await out.open(run.offset if run.resumed else None)
        if run.offset is not None and count is not None and count != run.tally.records:
            raise CheckpointError(
                f"cannot resume: the partial output holds {count} chats, "
                f"the checkpoint recorded {run.tally.records}"
            )
        await run.save(await out.sync())
        runner = Runner(
            client,
            run.plan,
            out,
            tally=run.tally,
            done=run.done,
            save=run.save,
            progress=bar,
            workers=workers,
            slice_pages=slice_pages,
            text=out.takes_text,
            # No checkpoint, no resume: a slice need not be durable before the next (the
            # output is synced once, before it is published).
            durable=run.checkpoint.path is not None,
        )
        await runner.run(run.done.gaps(run.plan.lo, run.plan.hi))
        await run.checkpoint.save(run.state(complete=True))
        await out.complete()
        run.checkpoint.drop()
        ok = True
    except Exception:
        nothing_written = not run.resumed and run.tally.records == 0
        raise
    finally:
        if not ok:
            if run.checkpoint.path is None or nothing_written:
                out.discard()
                if nothing_written:
                    run.checkpoint.drop()
            else:
                out.close()


async def _finish_published(out: Sink, ckpt: Checkpoint[ExportState]) -> None:
    """A checkpoint marked complete: the run was killed while publishing. Finish that."""
    if isinstance(out, FileSink):
        if out.temp_path.exists():
            await out.complete()
        elif not out.path.exists():
            raise CheckpointError(
                f"checkpoint is complete but neither {str(out.path)!r} nor "
                "its .part file exists; delete the checkpoint (",
                ("checkpoint", str(ckpt.path)),
                ") to start over",
            )
    ckpt.drop()


def _check_no_orphan(path: Path, out: FileSink) -> None:
    """Resuming from a checkpoint that does not exist while the output's `.part` holds chats
    (a mistyped `--checkpoint`): starting over would overwrite what the real one points to."""
    if out.holds_partial():
        raise CheckpointError(
            f"cannot resume: checkpoint {str(path)!r} does not exist, but the partial output "
            f"{str(out.temp_path)!r} does; give the checkpoint that wrote it (",
            ("checkpoint", None),
            "), or delete the partial output to start over",
        )


def _check_count(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidQueryError(f"{name} must be an int >= 1, got {value!r:.40}")
