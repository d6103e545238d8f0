"""The `imichat-async` command line: each command, each exit code, progress and secrecy."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from imichat_async import ImiChatClient, cli
from imichat_async.cli import _wiring
from imichat_async.sandbox import Sandbox
from imichat_async.sandbox import cli as sandbox_cli

from .sandbox_thread import ThreadedSandbox, env_for
from .test_export import _checkpoint

SINCE = "2024-01-01"
UNTIL = "2025-01-01"


def invoke(args: list[str], env: dict[str, str] | None = None) -> Result:
    """Run the CLI in-process, without the IMICHAT_* variables of the outer environment."""
    base: dict[str, str | None] = {
        "IMICHAT_BASE_URL": None,
        "IMICHAT_TOKEN": None,
        "IMICHAT_TEAM_ID": None,
    }
    base.update(env or {})
    return CliRunner(env=base).invoke(cli.main, args, catch_exceptions=False)


def sandbox_data(chats: int) -> list[dict[str, Any]]:
    """The chats of the embedded sandbox (`--sandbox` serves seed 0)."""
    return Sandbox(chats=chats, seed=0).data


def creds(sb: Sandbox, token: str | None = None) -> dict[str, str]:
    env = env_for(sb, token)
    return {k: env[k] for k in ("IMICHAT_BASE_URL", "IMICHAT_TOKEN", "IMICHAT_TEAM_ID")}


# -- search ----------------------------------------------------------------------------------------


def test_search_prints_a_table_and_a_summary() -> None:
    """`search` prints a header and one row per chat on stdout, the summary on stderr."""
    result = invoke(
        ["--sandbox", "--sandbox-chats", "400", "search", "-f", "status=closed", "--limit", "15"]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["chat_id", "created_at", "status", "channel", "assignee", "tags"]
    assert len(lines) == 16 and all(" closed " in line for line in lines[1:])
    assert "records=15 pages=2 requests=2 retries=0" in result.stderr
    assert "\r" not in result.stderr  # no progress bar when stderr is not a terminal


def test_search_json_lines_are_the_raw_objects_in_order() -> None:
    """`search --json` prints the server's objects, one per line, in page order."""
    result = invoke(
        [
            "--sandbox",
            "--sandbox-chats",
            "400",
            "search",
            "--filter",
            "channel=email",
            "--filter",
            "created_at__gte=2024-05-01",
            "--limit",
            "25",
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    got = [json.loads(line) for line in result.stdout.splitlines()]
    expected = [
        c
        for c in sandbox_data(400)
        if c.get("channel") == "email" and c["created_at"] >= "2024-05-01"
    ]
    assert got == expected[:25]


def test_search_reads_credentials_from_the_environment_and_quiet_silences_stderr() -> None:
    """IMICHAT_* variables configure the client; --quiet leaves stderr empty."""
    with ThreadedSandbox(chats=120, seed=21) as sb:
        result = invoke(["--quiet", "search", "--json"], creds(sb))
        data = list(sb.data)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["chat_id"] for line in result.stdout.splitlines()] == [
        c["chat_id"] for c in data
    ]
    assert result.stderr == ""
    assert sb.token not in result.output


# -- export --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["ndjson", "csv"])
def test_export_writes_every_chat_once(tmp_path: Path, fmt: str) -> None:
    """`export` writes the whole range, each chat once, in the format asked; checkpoint removed."""
    out = tmp_path / f"out.{fmt}"
    result = invoke(
        [
            "--sandbox",
            "--sandbox-chats",
            "2000",
            "export",
            "--since",
            SINCE,
            "--until",
            UNTIL,
            "--format",
            fmt,
            "-o",
            str(out),
            "--concurrency",
            "4",
        ]
    )
    assert result.exit_code == 0, result.output
    if fmt == "ndjson":
        ids = [json.loads(line)["chat_id"] for line in out.read_text().splitlines()]
    else:
        with open(out, encoding="utf-8", newline="") as f:
            ids = [row["chat_id"] for row in csv.DictReader(f)]
    expected = {c["chat_id"] for c in sandbox_data(2000)}
    assert len(ids) == len(expected) == len(set(ids)) and set(ids) == expected
    assert "records=2000 duplicates=0" in result.stderr and f"output={out}" in result.stderr
    assert not Path(str(out) + ".checkpoint.json").exists()


def test_export_format_defaults_from_the_suffix(tmp_path: Path) -> None:
    """Without --format, a .csv output is CSV."""
    out = tmp_path / "out.csv"
    result = invoke(
        ["--sandbox", "--sandbox-chats", "50", "-q", "export", "--since", SINCE, "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("chat_id,alias_id,created_at")


@pytest.mark.parametrize(
    ("command", "learns"), [("export", True), ("sync", True), ("search", False)]
)
def test_export_learns_the_rate_limit_search_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, learns: bool
) -> None:
    """`export` and `sync` run their client with a learned send rate; `search` does not."""
    made: list[ImiChatClient] = []

    class Recording(ImiChatClient):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            made.append(self)

    monkeypatch.setattr(_wiring, "ImiChatClient", Recording)
    args = ["export", "--since", SINCE, "-o", str(tmp_path / "o.ndjson")]
    if command == "search":
        args = ["search", "--limit", "1"]
    if command == "sync":
        args = ["sync", "--since", SINCE, "--state", str(tmp_path / "s.json")]
        args += ["-o", str(tmp_path / "log.ndjson")]
    result = invoke(["--sandbox", "--sandbox-chats", "20", "-q", *args])
    assert result.exit_code == 0, result.output
    assert len(made) == 1
    rate = made[0].limiter.rate
    assert (rate is not None and rate.adaptive) is learns


# -- exit codes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["search", "--filter", "status"],  # not PARAM=VALUE
        ["search", "--filter", "colour=red"],  # unknown param
        ["search", "--filter", "status=sleeping"],  # bad value
        ["search", "--filter", "channel__gte=sms"],  # bad operator
        ["search", "--limit", "0"],
        ["export", "--since", "last tuesday", "-o", "x.ndjson"],
        ["export", "--since", UNTIL, "--until", SINCE, "-o", "x.ndjson"],
        ["export", "--since", SINCE, "-o", "x.ndjson", "--format", "xml"],
        ["export", "-o", "x.ndjson"],  # --since missing
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(args: list[str], tmp_path: Path, monkeypatch: Any) -> None:
    """Bad options, filters and ranges exit with 2 before any request."""
    monkeypatch.chdir(tmp_path)
    result = invoke(["--sandbox", "--sandbox-chats", "10", *args])
    assert result.exit_code == 2, result.output
    assert "Error" in result.stderr
    assert not (tmp_path / "x.ndjson").exists()


def test_missing_credentials_exit_2() -> None:
    """Without credentials (flags, environment or --sandbox) the command exits with 2."""
    result = invoke(["search"])
    assert result.exit_code == 2
    assert "IMICHAT_TOKEN" in result.stderr and "--sandbox" in result.stderr


def test_existing_checkpoint_without_resume_exits_2(tmp_path: Path) -> None:
    """A checkpoint left by an earlier run is not overwritten without --resume (exit 2)."""
    out = tmp_path / "out.ndjson"
    ckpt = tmp_path / "out.ndjson.checkpoint.json"
    ckpt.write_text("{}")
    args = ["--sandbox", "--sandbox-chats", "10", "export", "--since", SINCE, "-o", str(out)]
    result = invoke(args)
    assert result.exit_code == 2 and "--resume" in result.stderr
    result = invoke([*args, "--resume"])  # not a checkpoint of this export
    assert result.exit_code == 2 and "checkpoint" in result.stderr


def test_permanent_api_error_exits_3_without_printing_the_token() -> None:
    """A refused token exits with 3, showing the vendor's code and description, never the token."""
    secret = "sbx.not-a-valid-token-7f3a9c"
    with ThreadedSandbox(chats=50, seed=22) as sb:
        from_env = invoke(["search"], creds(sb, secret))
        from_flag = invoke(
            ["--base-url", sb.base_url, "--team-id", sb.team_id, "--token", secret, "search"]
        )
    for result in (from_env, from_flag):
        assert result.exit_code == 3
        assert "API error: Invalid Access Token (HTTP 400, status_code 2003" in result.stderr
        assert secret not in result.output and "Traceback" not in result.output


def test_output_in_a_missing_directory_exits_2(tmp_path: Path) -> None:
    """An output in a missing directory is a bad argument, refused before any request (issue
    #25): exit 2, the directory named (it was exit 1 with the OS's bare message)."""
    out = tmp_path / "missing" / "out.ndjson"
    result = invoke(
        ["--sandbox", "--sandbox-chats", "10", "export", "--since", SINCE, "-o", str(out)]
    )
    assert result.exit_code == 2
    assert f"the directory {out.parent} of -o does not exist" in result.stderr


def test_output_under_a_file_exits_2(tmp_path: Path) -> None:
    """An output whose "directory" is a file: exit 2, said so, nothing written."""
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "out.ndjson"
    result = invoke(
        ["--sandbox", "--sandbox-chats", "10", "export", "--since", SINCE, "-o", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert f"the directory of -o is {out.parent}, not a directory" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_retries_running_out_exit_4_for_export_and_1_for_search(tmp_path: Path) -> None:
    """Transient errors past the retries: export stops resumably (4), search fails (1)."""
    out = tmp_path / "out.ndjson"
    with ThreadedSandbox(chats=300, seed=23, p_429=1.0, retry_after=0) as sb:
        env = creds(sb)
        args = ["export", "--since", SINCE, "--until", UNTIL, "-o", str(out), "--resume"]
        failed = invoke(args, env)
        search = invoke(["search"], env)
        sb.faults.p_429 = 0.0
        done = invoke(args, env)
        data = list(sb.data)
    assert failed.exit_code == 4, failed.output
    assert "HTTP 429" in failed.stderr and "retries exhausted" in failed.stderr
    assert "--resume" in failed.stderr
    assert search.exit_code == 1 and "retries exhausted" in search.stderr  # nothing to resume
    assert done.exit_code == 0, done.output
    ids = [json.loads(line)["chat_id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(c["chat_id"] for c in data)


@pytest.mark.slow
def test_ctrl_c_saves_the_checkpoint_exits_4_and_resume_completes(tmp_path: Path) -> None:
    """SIGINT during an export: exit 4 with how to resume; --resume then ends with the exact set."""
    out = tmp_path / "out.ndjson"
    ckpt = Path(str(out) + ".checkpoint.json")
    argv = [
        sys.executable,
        "-m",
        "imichat_async.cli",
        "export",
        "--since",
        SINCE,
        "--until",
        UNTIL,
        "-o",
        str(out),
        "--concurrency",
        "2",
        "--slice-pages",
        "5",
    ]
    with ThreadedSandbox(chats=2000, seed=24, latency=0.006) as sb:
        env = env_for(sb)
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if json.loads(ckpt.read_text())["slices"] >= 2:
                        break
                except (OSError, ValueError):
                    pass
                time.sleep(0.002)
            proc.send_signal(signal.SIGINT)
            _, err_bytes = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err = err_bytes.decode()
        assert proc.returncode == 4, err
        assert "checkpoint saved" in err and "--resume" in err and "Traceback" not in err
        state = json.loads(ckpt.read_text())
        assert 0 < state["records"] < 2000
        done = subprocess.run([*argv, "--resume"], env=env, capture_output=True, check=False)
        data = list(sb.data)
    assert done.returncode == 0, done.stderr.decode()
    assert b"resumed" in done.stderr
    ids = [json.loads(line)["chat_id"] for line in out.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 2000 and set(ids) == {c["chat_id"] for c in data}


# -- demo, sandbox, progress --------------------------------------------------------------------


def test_demo_searches_an_embedded_sandbox() -> None:
    """`demo` serves a sandbox with faults, searches it all, prints chats and a summary line."""
    result = invoke(["demo", "--chats", "300", "--latency", "0", "--faults", "0.1"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].startswith("chat_id") and len(lines) == 1 + 1 + 5 + 1
    summary = lines[-1]
    assert summary.startswith("records=300 pages=30 requests=")
    fields = dict(item.split("=", 1) for item in summary.split())
    assert int(fields["requests"]) == 30 + int(fields["retries"]) == int(fields["server_requests"])
    assert int(fields["retries"]) == int(fields["faults"]) > 0
    assert fields["elapsed"].endswith("s")


def test_sandbox_command_is_mounted() -> None:
    """`sandbox` is the sandbox helper's command."""
    result = invoke(["sandbox", "--help"])
    assert result.exit_code == 0
    assert "--port" in result.stdout and "--p-429" in result.stdout


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["demo", "--token", "abc"], "--token"),
        (["--base-url", "http://127.0.0.1:9/v3.0", "demo"], "--base-url"),
        (["demo", "--team-id", "t"], "--team-id"),
        (["--sandbox", "demo"], "--sandbox"),
        (
            ["demo", "--sandbox-chats", "10", "--sandbox-faults", "0.5"],
            "--sandbox-chats, --sandbox-faults",
        ),
        (["--sandbox-latency", "0.1", "demo"], "--sandbox-latency"),
    ],
)
def test_demo_refuses_the_options_it_would_ignore(args: list[str], named: str) -> None:
    """`demo` runs its own sandbox: credentials and --sandbox* exit 2, naming them (issue #25)."""
    result = invoke([*args, "--chats", "10", "--latency", "0"])
    assert result.exit_code == 2, result.output
    assert f"{named} given to demo" in result.stderr and "--chats" in result.stderr
    assert result.stdout == ""


def test_demo_ignores_credentials_from_the_environment() -> None:
    """IMICHAT_* in the environment are not options given to demo: nothing is refused."""
    env = {"IMICHAT_BASE_URL": "http://127.0.0.1:9/v3.0", "IMICHAT_TOKEN": "t"}
    result = invoke(["demo", "--chats", "10", "--latency", "0", "--faults", "0"], env)
    assert result.exit_code == 0, result.output


def test_demo_quiet_prints_the_chats_only() -> None:
    """`demo -q`: the chats table on stdout; no sandbox line, summary or next steps (issue #25)."""
    result = invoke(["demo", "-q", "--chats", "30", "--latency", "0", "--show", "3"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("chat_id") and len(lines) == 1 + 3
    assert "records=" not in result.output and "sandbox:" not in result.output
    assert result.stderr == ""


def test_sandbox_settings_are_ready_to_export() -> None:
    """`sandbox` prints its settings also as IMICHAT_* lines, the variables the CLI reads:
    exported as printed, they point `search` at the sandbox (issue #25)."""
    names = (_wiring.ENV_BASE_URL, _wiring.ENV_TEAM_ID, _wiring.ENV_TOKEN)
    assert names == sandbox_cli.ENV_NAMES
    with ThreadedSandbox(chats=12, seed=5) as sb:
        lines = sandbox_cli.settings_text(sb.base_url, sb.team_id, sb.token).splitlines()
        assert lines[:3] == [
            f"base_url={sb.base_url}",
            f"team_id={sb.team_id}",
            f"token={sb.token}",
        ]
        env = dict(shlex.split(line)[0].split("=", 1) for line in lines[3:])
        assert env == dict(zip(names, (sb.base_url, sb.team_id, sb.token), strict=True))
        result = invoke(["search", "-q"], env)
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1 + 12


def test_help_lists_commands_and_exit_codes() -> None:
    """The top-level help names every command and the exit codes."""
    result = invoke(["--help"])
    assert result.exit_code == 0
    for word in ("search", "export", "demo", "sandbox", "Exit codes"):
        assert word in result.stdout


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_shows_records_rate_retries_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    """click's bar on the terminal stream: records of the total, percentage, ETA, pages/s,
    retries; a total that comes late or grows; the line ended on close (issue #25)."""
    clock = itertools.count(0.0, 5.0)  # click's own clock (for its ETA): 5 s a reading
    monkeypatch.setattr("click._termui_impl.time", types.SimpleNamespace(time=clock.__next__))
    stream = _Tty()
    bar = cli.ProgressLine(stream, enabled=True, interval=0.0)
    bar.update(records=10, total=None, pages=1, retries=0, elapsed=1.0)
    assert "]  records 10  1.0 pages/s, 0 retries" in stream.getvalue()
    assert "%" not in stream.getvalue()  # no total yet: no percentage, no ETA
    bar.update(records=250, total=1000, pages=25, retries=3, elapsed=5.0)
    last = stream.getvalue().rsplit("\r", 1)[-1]
    assert "[######" + "-" * 18 + "]  records 250/1000   25%  " in last
    assert last.endswith("  5.0 pages/s, 3 retries")
    assert re.search(r"%  \d\d:\d\d:\d\d  5.0 pages/s", last)  # click's ETA
    bar.update(records=1000, total=1500, pages=100, retries=3, elapsed=9.0)
    assert "1000/1500   66%" in stream.getvalue().rsplit("\r", 1)[-1]
    bar.close()
    assert stream.getvalue().endswith("\n")  # the summary starts on a line of its own
    bar.close()  # idempotent


def test_progress_line_is_silent_when_disabled() -> None:
    """Disabled (piped or --quiet), the progress line writes nothing."""
    stream = _Tty()
    bar = cli.ProgressLine(stream, enabled=False)
    bar.update(records=1, total=2, pages=1, retries=0, elapsed=1.0)
    bar.close()
    assert stream.getvalue() == ""


# -- issue #12: signals, pipes, options in either place ------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "imichat_async.cli", *args]


def _stop(proc: subprocess.Popen[bytes], sig: int) -> tuple[int, str]:
    """Send `sig`, wait; the return code and stderr (the process is killed if it hangs)."""
    try:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.decode()


def test_sigterm_stops_export_resumably_and_resume_completes(tmp_path: Path) -> None:
    """SIGTERM during an export: checkpoint kept, exit 4 saying --resume (even with --quiet)."""
    out = tmp_path / "out.ndjson"
    ckpt = Path(str(out) + ".checkpoint.json")
    argv = _cli(
        "export", "--since", SINCE, "--until", UNTIL, "-o", str(out), "--quiet",
        "--concurrency", "2", "--slice-pages", "5",
    )  # fmt: skip
    with ThreadedSandbox(chats=1000, seed=40, latency=0.006) as sb:
        env = env_for(sb)
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            state = _checkpoint(ckpt)
            if state is not None and state["slices"] >= 1:
                break
            time.sleep(0.002)
        code, err = _stop(proc, signal.SIGTERM)
        assert code == 4, err
        assert "SIGTERM" in err and "--resume" in err and "Traceback" not in err
        assert 0 < json.loads(ckpt.read_text())["records"] < 1000
        done = subprocess.run([*argv, "--resume"], env=env, capture_output=True, check=False)
        data = list(sb.data)
    assert done.returncode == 0, done.stderr.decode()
    ids = [json.loads(line)["chat_id"] for line in out.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 1000 and set(ids) == {c["chat_id"] for c in data}


def test_sigterm_stops_search_with_130_and_no_traceback() -> None:
    """SIGTERM during a search on the embedded sandbox: exit 130, one line, no traceback."""
    argv = _cli("--sandbox", "--sandbox-latency", "0.05", "search", "--json", "--quiet")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith(b"{")  # ready: the first chat arrived
    code, err = _stop(proc, signal.SIGTERM)
    proc.stdout.close()
    assert code == 130
    assert err.strip() == "Error: terminated (SIGTERM)"


@pytest.mark.parametrize("table", [False, True])
def test_closed_stdout_pipe_exits_141_silently(table: bool) -> None:
    """`search | head -1` on the embedded sandbox: exit 141, nothing on stderr."""
    argv = _cli("--sandbox", "--sandbox-chats", "3000", "search", *([] if table else ["--json"]))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after its line
    try:
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert code == 141 and err == ""


def test_demo_ctrl_c_prints_one_line_and_exits_130() -> None:
    """Ctrl-C during the demo (embedded sandbox, slow pages): only `Error: interrupted`."""
    proc = subprocess.Popen(
        _cli("-vv", "demo", "--latency", "0.3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    lines: list[bytes] = []
    while proc.poll() is None:  # ready: the first page was logged
        lines.append(proc.stderr.readline())
        if b"imichat_async: page" in lines[-1]:
            break
    code, err = _stop(proc, signal.SIGINT)
    err = b"".join(lines).decode() + err
    assert code == 130, err
    assert err.rstrip().endswith("Error: interrupted")
    for noise in ("Traceback", "Error handling request", "Task was destroyed", "Unclosed"):
        assert noise not in err


def test_search_prints_no_header_when_the_first_request_fails() -> None:
    """A refused first request: exit 3 and an empty stdout (no table header)."""
    with ThreadedSandbox(chats=30, seed=41) as sb:
        result = invoke(["search"], creds(sb, "sbx.wrong"))
    assert result.exit_code == 3 and result.stdout == ""


def test_global_options_are_accepted_after_the_command(tmp_path: Path) -> None:
    """`search --sandbox -q`, `export ... --quiet`, `search -v`: as before the command."""
    found = invoke(["search", "--sandbox", "--sandbox-chats", "30", "--limit", "3", "-q"])
    assert found.exit_code == 0, found.output
    assert len(found.stdout.splitlines()) == 4 and found.stderr == ""
    out = tmp_path / "out.ndjson"
    args = ["export", "--since", SINCE, "-o", str(out), "--sandbox", "--sandbox-chats", "40"]
    exported = invoke([*args, "--quiet"])
    assert exported.exit_code == 0, exported.output
    assert exported.stderr == "" and len(out.read_text().splitlines()) == 40
    loud = invoke(["--quiet", "search", "--sandbox", "--sandbox-chats", "5", "-v"])
    assert loud.exit_code == 0 and "records=5" not in loud.stderr  # -q still holds


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--sandbox", "--token", "abc", "search"], "--token"),
        (["search", "--sandbox", "--base-url", "http://127.0.0.1:9/v3.0"], "--base-url"),
        (["--sandbox-latency", "0.1", "search"], "--sandbox-latency"),
        (["search", "--sandbox-chats", "10"], "--sandbox-chats"),
    ],
)
def test_options_that_would_be_ignored_are_refused(args: list[str], named: str) -> None:
    """Credentials with --sandbox, --sandbox-* without it: exit 2 naming both options."""
    with ThreadedSandbox(chats=10, seed=42) as sb:
        result = invoke(args, creds(sb))
    assert result.exit_code == 2, result.output
    assert named in result.stderr and "--sandbox" in result.stderr


def test_credentials_from_the_environment_do_not_clash_with_sandbox() -> None:
    """IMICHAT_* in the environment and --sandbox: the sandbox is used, nothing refused."""
    with ThreadedSandbox(chats=10, seed=43) as sb:
        result = invoke(["--sandbox", "--sandbox-chats", "7", "search", "-q"], creds(sb))
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1 + 7


def test_export_to_dash_is_refused(tmp_path: Path, monkeypatch: Any) -> None:
    """`export -o -` exits 2 pointing at `search --json`, and creates no file named `-`."""
    monkeypatch.chdir(tmp_path)
    result = invoke(["--sandbox", "--sandbox-chats", "10", "export", "--since", SINCE, "-o", "-"])
    assert result.exit_code == 2 and "search --json" in result.stderr
    assert os.listdir(tmp_path) == []


def test_huge_concurrency_is_capped_with_a_note(tmp_path: Path) -> None:
    """--concurrency 100000 runs at 256, says so; the export needs no more requests for it."""
    found = invoke(["--sandbox", "--sandbox-chats", "50", "search", "--concurrency", "100000"])
    assert found.exit_code == 0, found.output
    assert "--concurrency 100,000 capped at 256" in found.stderr
    out = tmp_path / "out.ndjson"
    exported = invoke(
        [
            "--sandbox",
            "--sandbox-chats",
            "300",
            "export",
            "--since",
            SINCE,
            "--until",
            UNTIL,
            "-o",
            str(out),
            "--concurrency",
            "100000",
        ]
    )
    assert exported.exit_code == 0, exported.output
    fields = dict(i.split("=", 1) for i in exported.stderr.splitlines()[-1].split())
    assert int(fields["requests"]) <= 30 + 8 and len(out.read_text().splitlines()) == 300


def test_bad_token_export_leaves_nothing_so_the_retry_runs(tmp_path: Path) -> None:
    """Exit 3 on a refused token leaves no checkpoint; the same command then succeeds."""
    out = tmp_path / "out.ndjson"
    args = ["export", "--since", SINCE, "--until", UNTIL, "-o", str(out)]
    with ThreadedSandbox(chats=60, seed=44) as sb:
        refused = invoke(args, creds(sb, "sbx.wrong"))
        retried = invoke(args, creds(sb))
    assert refused.exit_code == 3 and "--resume" not in refused.stderr
    assert retried.exit_code == 0, retried.output
    assert len(out.read_text().splitlines()) == 60
    assert os.listdir(tmp_path) == ["out.ndjson"]


def test_open_ended_export_does_not_claim_unverified_counts(tmp_path: Path) -> None:
    """`export --since` with no --until (empty slices up to now): no "not verified" note."""
    out = tmp_path / "out.ndjson"
    result = invoke(
        ["--sandbox", "--sandbox-chats", "200", "export", "--since", SINCE, "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "not verified" not in result.stderr and "records=200" in result.stderr
