"""The progress bar drawn on stderr (click's), and the summary line that follows it."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

import click

if TYPE_CHECKING:  # the class `click.progressbar` returns; click does not export it
    from click._termui_impl import ProgressBar


class ProgressLine:
    """click's progress bar on a terminal stream, redrawn at most every `interval` seconds.

    Shows the bar, records (of the total when known, with the percentage and
    click's ETA), pages/s and retries. Disabled (every call a no-op, nothing
    written) when `enabled` is False; `for_stderr` enables it on a terminal only.
    """

    def __init__(self, stream: TextIO, *, enabled: bool, interval: float = 0.1) -> None:
        self.stream = stream
        self.enabled = enabled
        self.interval = interval
        self._last = 0.0
        self._bar: ProgressBar[str] | None = None

    @classmethod
    def for_stderr(cls, quiet: bool) -> ProgressLine:
        """Enabled when stderr is a terminal and not `quiet`."""
        stream = sys.stderr
        return cls(stream, enabled=not quiet and _isatty(stream))

    def update(
        self, *, records: int, total: int | None, pages: int, retries: int, elapsed: float
    ) -> None:
        """Redraw (throttled) for these counts; `total` may come late, or grow."""
        if not self.enabled:
            return
        now = time.monotonic()
        bar = self._bar
        if bar is not None and now - self._last < self.interval:
            return
        self._last = now
        if bar is None:
            bar = self._bar = click.progressbar(
                length=total or 0,
                file=self.stream,
                width=24,
                bar_template="[%(bar)s]  records %(info)s",
                show_pos=True,
                item_show_func=lambda info: info,
            )
        bar.length = total or None  # unknown: no percentage, ETA or end; a moving mark
        bar.show_percent = bar.length is not None
        bar.finished = False  # a total that grew reopens a bar that had reached it
        rate = pages / elapsed if elapsed > 0 else 0.0
        bar.current_item = f"{rate:.1f} pages/s, {retries} retries"
        bar.make_step(records - bar.pos)  # records may also go back (a slice read again)
        bar.render_progress()

    def close(self) -> None:
        """End the bar's line (click's finish: the cursor shown again), for the summary."""
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.render_finish()


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def summary(records: int, pages: int, requests: int, retries: int, elapsed: float) -> str:
    return (
        f"records={records} pages={pages} requests={requests} retries={retries} "
        f"elapsed={elapsed:.2f}s"
    )
