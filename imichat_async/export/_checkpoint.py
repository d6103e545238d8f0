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
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import attrs

from .. import ImiChatError
from .._records import CONVERTER as converter  # the one converter
from ._aio import in_thread

VERSION = 2
MAX_NOTES = 50  # notes kept in a checkpoint (the newest)
TENANT_KEYS = ("base_url", "team_id")  # in every checkpoint's and state's key (issue #23)


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


def tenant_of(base_url: str, team_id: str) -> dict[str, str]:
    """The tenant a checkpoint or a state is written for, part of its key: never the token.

    `base_url` is normalised to `host:port/path`: the host in lower case, the port the
    scheme's default when none is given, the path without trailing slashes. So
    `https://Acme.imi.chat/v3.0/` and `https://acme.imi.chat:443/v3.0` are one tenant,
    while another host, port or path is another (a staging API on `:8443`, `/v3.1`);
    the scheme adds nothing once the port is known (one port serves one scheme).
    """
    parts = urlsplit(base_url)
    host = (parts.hostname or "").lower()
    if ":" in host:  # IPv6
        host = f"[{host}]"
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    return {"base_url": f"{host}:{port}{parts.path.rstrip('/')}", "team_id": team_id}


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (where the platform allows opening a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def named_on_error(path: Path) -> Iterator[None]:
    """An `OSError` without a file name (a write or fsync that hit a full disk) names `path`:
    `No space left on device: 'chats.ndjson.part'`, not just the first half."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably: temp file, fsync, rename, fsync dir."""
    tmp = path.with_name(path.name + ".tmp")
    with named_on_error(tmp), open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


S = TypeVar("S")


class Checkpoint(Generic[S]):
    """The checkpoint file of one run (`path` None: no checkpoint, every call a no-op).

    `state_type` and `version` say what the file holds (an export's `ExportState` by
    default; a sync's state is another attrs class, saved the same way); `what` names
    it in messages.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        resume: bool,
        state_type: type[S] = ExportState,  # type: ignore[assignment]
        version: int = VERSION,
        what: str = "export",
        noun: str = "checkpoint",
    ) -> None:
        self.path = path
        self.resume = resume
        self.state_type = state_type
        self.version = version
        self.what = what
        self.noun = noun

    def load(self, key: dict[str, Any]) -> S | None:
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
        if not isinstance(raw, dict) or raw.get("version") != self.version:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is not a version-{self.version} {self.what} checkpoint"
            )
        self.check_key(raw.get("key"), key, f"{self.noun} {str(path)!r}", "delete it")
        try:
            state: S = converter.structure(raw, self.state_type)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {exc}") from None
        return state

    def check_key(self, saved: Any, key: dict[str, Any], subject: str, start_over: str) -> None:
        """Raise `CheckpointError` unless `saved` (a state's key) is `key`, saying what differs:
        `subject` names the state, `start_over` what to do with it to start over."""
        if saved == key:
            return
        if isinstance(saved, dict) and not all(k in saved for k in TENANT_KEYS):
            raise CheckpointError(
                f"{subject} records no tenant (it was written by an earlier release, before "
                f"the base URL and team id were part of its identity): {start_over} to start "
                "over"
            )
        raise CheckpointError(
            f"{subject} was written for another {self.what} "
            f"({self.mismatch_hint(saved, key)}); use the same arguments, or {start_over} "
            "to start over"
        )

    def mismatch_hint(self, saved: Any, key: dict[str, Any]) -> str:
        """Which arguments differ ("other filters, range or output" when it cannot tell);
        the tenant with both values ("team_id 'a' in the checkpoint, 'b' given")."""
        names = {"since": "range", "until": "range", "lag_us": "lag", "sink": "output"}
        if not isinstance(saved, dict):
            return "other filters, range or output"
        differ = [k for k in key if saved.get(k) != key[k]]
        other = [names.get(k, k) for k in differ if k not in TENANT_KEYS]
        said = [f"other {', '.join(dict.fromkeys(other))}"] if other else []
        said += [
            f"{k} {saved.get(k)!r} in the {self.noun}, {key[k]!r} given"
            for k in differ
            if k in TENANT_KEYS
        ]
        return "; ".join(said) or "other filters, range or output"

    async def save(self, state: S) -> None:
        """Write `state` atomically (off the event loop)."""
        if self.path is None:
            return
        raw = converter.unstructure(state)
        if "notes" in raw:
            raw["notes"] = raw["notes"][-MAX_NOTES:]
        data = json.dumps(raw, separators=(",", ":")).encode()
        await in_thread(atomic_write, self.path, data)

    def drop(self) -> None:
        """Delete the checkpoint (the run completed)."""
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
