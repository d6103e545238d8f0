"""The checkpoint: a run's state as versioned JSON, written atomically, read back checked.

The state is an attrs class (un)structured by the library's one cattrs
converter. Every write goes through `atomic_write` (temp file, fsync, rename,
fsync of the directory), in a worker thread: a reader, or a run killed at any
moment, sees the old state or the new one, never a torn file.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import attrs

from .. import ImiChatError
from .._records import CONVERTER as converter  # the one converter
from ._aio import in_thread

VERSION = 2
MAX_NOTES = 50  # notes kept in a checkpoint (the newest)


class CheckpointError(ImiChatError, ValueError):
    """A checkpoint that cannot be used: written for other arguments, corrupt, or not resumed."""


@attrs.define
class ExportState:
    """What a resumed run needs: its identity, the range, the windows done, the output length."""

    key: dict[str, Any]  # what the run was started with (filters, range, sink)
    lo: int  # the range, microseconds: [lo, hi)
    hi: int
    end_inclusive: bool  # the upper bound is an instant frozen at the start (sent as lte)
    until: str  # the upper bound, for people reading the file
    done: list[tuple[int, int]] = attrs.field(factory=list)  # windows finished
    offset: int | None = None  # output bytes covered by `done` (None: not a file)
    records: int = 0
    duplicates: int = 0
    slices: int = 0
    verified: bool = True
    notes: list[str] = attrs.field(factory=list)
    complete: bool = False  # everything written; only publishing the output was left
    version: int = VERSION


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (where the platform allows opening a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably: temp file, fsync, rename, fsync dir."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Checkpoint:
    """The checkpoint file of one run (`path` None: no checkpoint, every call a no-op)."""

    def __init__(self, path: Path | None, *, resume: bool) -> None:
        self.path = path
        self.resume = resume

    def load(self, key: dict[str, Any]) -> ExportState | None:
        """The saved state of a run started with `key`, or None when there is none.

        Raises `CheckpointError` when one exists without `resume`, cannot be read, or was
        written for another run.
        """
        path = self.path
        if path is None or not path.exists():
            return None
        if not self.resume:
            raise CheckpointError(
                f"checkpoint {str(path)!r} exists: resume it (resume=True, --resume) "
                "or delete it to start over"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from None
        if not isinstance(raw, dict) or raw.get("version") != VERSION:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is not a version-{VERSION} export checkpoint"
            )
        if raw.get("key") != key:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was written for another export (other filters, "
                "range or output); use the same arguments, or delete it to start over"
            )
        try:
            state: ExportState = converter.structure(raw, ExportState)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {exc}") from None
        return state

    async def save(self, state: ExportState) -> None:
        """Write `state` atomically (off the event loop)."""
        if self.path is None:
            return
        raw = converter.unstructure(state)
        raw["notes"] = raw["notes"][-MAX_NOTES:]
        data = json.dumps(raw, separators=(",", ":")).encode()
        await in_thread(atomic_write, self.path, data)

    def drop(self) -> None:
        """Delete the checkpoint (the run completed)."""
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
