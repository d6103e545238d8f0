"""A real `redis-server` for the shared rate store's tests and benchmark (Debian's package
`redis-server`): started on a free loopback port with persistence off, stopped after.

Where the binary is missing, `start()` raises `RedisMissing` naming the package (the
tests skip on it; `.ci/run` installs the package, so CI never skips them).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

BINARY = "redis-server"
MISSING = "needs redis-server on PATH (Debian/Ubuntu package: redis-server)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisMissing(RuntimeError):
    """No `redis-server` on PATH."""


class RedisServer:
    """`redis-server` on 127.0.0.1:`port`, no persistence; `start()`, `kill()`, `stop()`."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="imichat-redis-")

    def start(self) -> RedisServer:
        binary = shutil.which(BINARY)
        if binary is None:
            raise RedisMissing(MISSING)
        self._proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self._dir.name, "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not answer within 10 s")

    def flush(self) -> None:
        """FLUSHALL: forget every key (a run that must start from nothing learned)."""
        with socket.create_connection(("127.0.0.1", self.port), 5) as s:
            s.sendall(b"FLUSHALL\r\n")
            if not s.recv(16).startswith(b"+OK"):
                raise RuntimeError("FLUSHALL refused")

    def kill(self) -> None:
        """SIGKILL, as a crash: connections drop without a word."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
