"""The checkpoint: a run's state as versioned JSON, written atomically, read back checked.

The state is an attrs class of plain JSON values (ints, strings, lists, dicts),
(un)structured by `converter`, cattrs with its defaults: nothing in a state needs
a rule of the records' converter. Every write goes through `atomic_write` (temp file, fsync, rename,
fsync of the directory), in a worker thread: a reader, or a run killed at any
moment, sees the old state or the new one, never a torn file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import attrs
import cattrs

from .. import ImiChatError
from ._aio import in_thread
from ._plan import TIME_PARAMS, fmt

VERSION = 2
MAX_NOTES = 50  # notes kept in a checkpoint (the newest)
TENANT_KEYS = ("base_url", "team_id")  # in every checkpoint's and state's key (issue #23)
#: (Un)structures the states (`ExportState`, the sync's `SyncState`); errors name the field.
converter = cattrs.Converter(detailed_validation=True, forbid_extra_keys=False)


#: How the library names an argument in a message: a pattern for `str.format` (`{}` the
#: value; without one, the argument alone). The CLI words the same messages with its own
#: options (`CheckpointError.worded`).
API_NAMES: Mapping[str, str] = {
    "since": "since={}",
    "until": "until={}",
    "filters": "filters={}",
    "condition": "condition={}",
    "sink": "sink={}",
    "checkpoint": "checkpoint={}",
    "state": "state={}",
    "lag": "lag={}",
    "resume": "resume=True",
    "new_state": "use a new state",  # how to start over with a state the caller keeps
}

#: A piece of a message: text, or an argument's name (with its value, or None) worded
#: by a table of names.
Part = str | tuple[str, str | None]


class CheckpointError(ImiChatError, ValueError):
    """A checkpoint (an export's) or a state (a sync's) that cannot be used: written for
    other arguments, corrupt, not resumed, or in a directory that does not exist.

    Its message names arguments as the API spells them (`resume=True`, `since=...`);
    `worded(names)` gives the same message with other names (the CLI's `--resume`)."""

    def __init__(self, *parts: Part) -> None:
        self.parts = parts
        super().__init__(self.worded())

    def worded(self, names: Mapping[str, str] | None = None) -> str:
        """The message, each argument named by `names` (patterns as in `API_NAMES`; an
        argument it lacks is named as in the API)."""
        table = {**API_NAMES, **(names or {})}
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            name, value = part
            pattern = table.get(name, name + "={}")
            out.append(pattern.format("").strip() if value is None else pattern.format(value))
        return "".join(out)


def check_directory(path: Path, name: str) -> None:
    """Raise `CheckpointError` when the directory that is to hold `path` (the file given as
    argument `name`) does not exist: before any request, with nothing written."""
    where = path.parent
    if where.is_dir():
        return
    if where.exists():
        raise CheckpointError("the directory of ", (name, None), f" is {where}, not a directory")
    raise CheckpointError(f"the directory {where} of ", (name, None), " does not exist")


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
        noun = self.noun
        if not self.resume:
            raise CheckpointError(
                f"{noun} {str(path)!r} exists: resume it (",
                ("resume", None),
                ") or delete it to start over",
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {noun} {str(path)!r}: {exc}") from None
        if not isinstance(raw, dict) or raw.get("version") != self.version:
            raise CheckpointError(
                f"{noun} {str(path)!r} is not a version-{self.version} {self.what} {noun}"
            )
        self.check_key(raw.get("key"), key, f"{noun} {str(path)!r}", "delete it")
        try:
            state: S = converter.structure(raw, self.state_type)
        except Exception as exc:
            raise CheckpointError(f"{noun} {str(path)!r} is corrupt: {exc}") from None
        return state

    def check_key(self, saved: Any, key: dict[str, Any], subject: str, start_over: Part) -> None:
        """Raise `CheckpointError` unless `saved` (a state's key) is `key`, saying what differs:
        `subject` names the state, `start_over` what to do with it to start over."""
        if saved == key:
            return
        if isinstance(saved, dict) and not all(k in saved for k in TENANT_KEYS):
            raise CheckpointError(
                f"{subject} records no tenant (it was written by an earlier release, before "
                "the base URL and team id were part of its identity): ",
                start_over,
                " to start over",
            )
        raise CheckpointError(
            f"{subject} was written for another {self.what} (",
            *self.mismatch_hint(saved, key),
            "); use the same arguments, or ",
            start_over,
            " to start over",
        )

    def mismatch_hint(self, saved: Any, key: dict[str, Any]) -> list[Part]:
        """Each argument that differs, with both values as the user gives them: `since=`
        ISO 8601 in the {noun}, ISO 8601 given; the filters as `param__op=value`; the output's
        path; the lag in seconds; the tenant ("team_id 'a' in the checkpoint, 'b' given")."""
        if not isinstance(saved, dict):
            return [f"the {self.noun}'s arguments cannot be read: {saved!r:.60}"]
        said: list[Part] = []
        for k in key:
            if saved.get(k) == key[k]:
                continue
            if said:
                said.append("; ")
            if k in TENANT_KEYS:
                said.append(f"{k} {saved.get(k)!r} in the {self.noun}, {key[k]!r} given")
                continue
            name = _ARGUMENTS.get(k, k)
            was, now = _worded(k, saved.get(k), key[k])
            said += [(name, was), f" in the {self.noun}, {now} given"]
        return said or [f"a key this release does not write: {saved!r:.60}"]

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


_ARGUMENTS = {"lag_us": "lag"}  # a key's argument, where its name differs


def _worded(key: str, saved: Any, given: Any) -> tuple[str, str]:
    """A key's saved and given values as the user gives that argument."""
    if key in ("since", "until"):
        return _instant(saved), _instant(given)
    if key == "lag_us":
        return _seconds(saved), _seconds(given)
    if key == "filters":
        return _filters(saved), _filters(given)
    if key == "sink":
        return _sinks(saved, given)
    return repr(saved), repr(given)


def _instant(us: Any) -> str:
    if us is None:
        return "none (the start instant)"
    return fmt(us) if isinstance(us, int) else repr(us)


def _seconds(us: Any) -> str:
    return f"{us / 1_000_000:g} s" if isinstance(us, int) else repr(us)


def _filters(identity: Any) -> str:
    """A key's filters as `--filter` and the keyword filters spell them: `status=closed`."""
    if not isinstance(identity, list):
        return repr(identity)
    words = []
    for item in identity:
        if not (isinstance(item, list) and len(item) == 3):
            words.append(repr(item))
            continue
        param, op, value = item
        if param in TIME_PARAMS and isinstance(value, int):
            value = fmt(value)
        words.append(f"{param}{'' if op == 'eq' else '__' + str(op)}={value}")
    return "[" + ", ".join(words) + "]"


def _sinks(saved: Any, given: Any) -> tuple[str, str]:
    """The outputs' paths (a callable sink has none: its kind), with their kinds (ndjson,
    csv, ...) when the paths alone do not tell them apart."""

    def where(d: Any) -> str:
        return str(d.get("path") or d.get("kind")) if isinstance(d, dict) else repr(d)

    if where(saved) != where(given):
        return where(saved), where(given)

    def full(d: Any) -> str:
        if not isinstance(d, dict):
            return repr(d)
        more = ", ".join(f"{k} {v}" for k, v in d.items() if k != "path")
        return f"{where(d)} ({more})"

    return full(saved), full(given)
