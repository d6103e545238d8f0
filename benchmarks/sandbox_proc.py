"""The sandbox in its own process, with a control channel for the benchmark runner.

`python -m imichat_async.sandbox` serves a tenant but cannot report its counters
or change its knobs once started; benchmarks need both (wasted pages and 429s
seen by the *server*, one server reused across runs with a new latency). So the
child here runs the same `imichat_async.sandbox.serve(...)` and reads one JSON
command per line on stdin, answering one JSON line on stdout:

    {"op": "stats"}                      -> the server's counters
    {"op": "reset"}                      -> zero the counters
    {"op": "faults", "knobs": {...}}     -> set `Faults` fields (latency, p_429, ...)
    {"op": "total", "on": false}         -> send X-Total-Count or not
    {"op": "expected"}                   -> every chat of the tenant, as served

End of stdin (or SIGTERM) stops it. The parent side is `SandboxProcess`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

HOST_PREFIX = "http://127.0.0.1:"
#: The directory holding the `benchmarks` package: children run with it as their cwd, so
#: that `python -m benchmarks.…` works however the runner was started.
ROOT = Path(__file__).resolve().parent.parent


class SandboxProcess:
    """Start the child (`with SandboxProcess(chats=4000, latency=0.04) as sb:`) and steer it."""

    def __init__(
        self, chats: int, *, seed: int = 1, total_header: bool = True, **faults: Any
    ) -> None:
        self.config = {"chats": chats, "seed": seed, "total_header": total_header, "faults": faults}
        self.chats = chats
        self.base_url = ""
        self.token = ""
        self.team_id = ""
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> SandboxProcess:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.sandbox_proc", json.dumps(self.config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            cwd=ROOT,
        )
        out = self._out()
        fields: dict[str, str] = {}
        while True:
            line = out.readline()
            if not line:
                self.close()
                raise RuntimeError("the sandbox process exited before serving")
            key, _, value = line.strip().partition("=")
            if key == "ready":
                break
            fields[key] = value
        self.base_url, self.token, self.team_id = (
            fields["base_url"],
            fields["token"],
            fields["team_id"],
        )
        if not self.base_url.startswith(HOST_PREFIX):
            self.close()
            raise RuntimeError(f"unexpected base_url {self.base_url!r}: loopback only")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def _out(self) -> IO[str]:
        assert self._proc is not None and self._proc.stdout is not None
        return self._proc.stdout

    def command(self, op: str, **args: Any) -> Any:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self._proc.stdin.flush()
        line = self._out().readline()
        if not line:
            raise RuntimeError(f"the sandbox process died during {op!r}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"sandbox {op!r}: {reply['error']}")
        return reply["result"]

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.command("stats")
        return result

    def reset(self) -> None:
        self.command("reset")

    def set_faults(self, **knobs: Any) -> None:
        self.command("faults", knobs=knobs)

    def set_total(self, on: bool) -> None:
        self.command("total", on=on)

    def expected(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.command("expected")
        return result

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# -- the child ------------------------------------------------------------------------------


def _stats(sb: Any) -> dict[str, Any]:
    st = sb.stats
    return {
        "requests_total": st.requests_total,
        "requests_by_page": {str(k): v for k, v in st.requests_by_page.items()},
        "peak_in_flight": st.peak_in_flight,
        "faults": dict(st.faults),
        "errors_by_code": {str(k): v for k, v in st.errors_by_code.items()},
        "throttled": st.throttled,
        "rate_limited": st.rate_limited,
    }


def _handle(sb: Any, cmd: dict[str, Any]) -> Any:
    op = cmd.get("op")
    if op == "stats":
        return _stats(sb)
    if op == "reset":
        sb.stats.reset()
        return None
    if op == "faults":
        for key, value in cmd["knobs"].items():
            if not hasattr(sb.faults, key):
                raise ValueError(f"unknown fault knob {key!r}")
            setattr(sb.faults, key, value)
        return None
    if op == "total":
        sb.total_header = bool(cmd["on"])
        return None
    if op == "expected":
        return sb.expected()
    raise ValueError(f"unknown op {op!r}")


async def _child(config: dict[str, Any]) -> None:
    import logging

    from imichat_async.sandbox import serve

    # A client that leaves early (cancelled prefetch) resets connections: expected here.
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    commands: asyncio.Queue[str | None] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line)
        loop.call_soon_threadsafe(commands.put_nowait, None)

    async with serve(
        chats=config["chats"],
        seed=config["seed"],
        total_header=config["total_header"],
        **config["faults"],
    ) as sb:
        sys.stdout.write(
            f"base_url={sb.base_url}\nteam_id={sb.team_id}\ntoken={sb.token}\nready=1\n"
        )
        sys.stdout.flush()
        threading.Thread(target=read_stdin, daemon=True).start()
        stopping = asyncio.ensure_future(stop.wait())
        while True:
            getting = asyncio.ensure_future(commands.get())
            await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not getting.done():
                getting.cancel()
                break
            line = getting.result()
            if line is None:
                break
            try:
                reply: dict[str, Any] = {"result": _handle(sb, json.loads(line))}
            except Exception as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(json.dumps(reply, separators=(",", ":")) + "\n")
            sys.stdout.flush()
        stopping.cancel()


def main() -> None:
    asyncio.run(_child(json.loads(sys.argv[1])))


if __name__ == "__main__":
    main()
