"""The progress line drawn on stderr, and the summary line that follows it."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressLine:
    """A one-line progress bar on a terminal stream, redrawn at most every `interval` seconds.

    Shows records (of the total when known), pages/s, retries and the ETA.
    Disabled (every call a no-op) when `enabled` is False.
    """

    def __init__(self, stream: TextIO, *, enabled: bool, interval: float = 0.1) -> None:
        self.stream = stream
        self.enabled = enabled
        self.interval = interval
        self._last = 0.0
        self._drawn = False

    @classmethod
    def for_stderr(cls, quiet: bool) -> ProgressLine:
        """Enabled when stderr is a terminal and not `quiet`."""
        stream = sys.stderr
        return cls(stream, enabled=not quiet and _isatty(stream))

    def render(
        self,
        *,
        records: int,
        total: int | None,
        pages: int,
        retries: int,
        elapsed: float,
        width: int = 24,
    ) -> str:
        """The text of the bar for these numbers."""
        rate = pages / elapsed if elapsed > 0 else 0.0
        if total:
            done = min(1.0, records / total)
            filled = int(done * width)
            bar = "#" * filled + "." * (width - filled)
            head = f"[{bar}] {records:,}/{total:,} records {done:4.0%}"
            per_record = elapsed / records if records else None
            if per_record is not None and records < total:
                eta = f"ETA {_duration(per_record * (total - records))}"
            elif records >= total:
                eta = "ETA 0s"
            else:
                eta = "ETA ?"
        else:
            head = f"{records:,} records"
            eta = "ETA ?"
        return f"{head} | {rate:.1f} pages/s | {retries} retries | {eta}"

    def update(
        self, *, records: int, total: int | None, pages: int, retries: int, elapsed: float
    ) -> None:
        """Redraw (throttled)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if self._drawn and now - self._last < self.interval:
            return
        self._last = now
        text = self.render(
            records=records, total=total, pages=pages, retries=retries, elapsed=elapsed
        )
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Erase the bar, leaving the line free for the summary."""
        if self.enabled and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def summary(records: int, pages: int, requests: int, retries: int, elapsed: float) -> str:
    return (
        f"records={records} pages={pages} requests={requests} retries={retries} "
        f"elapsed={elapsed:.2f}s"
    )
