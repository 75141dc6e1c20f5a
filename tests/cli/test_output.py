"""What the CLI says: progress while it waits (every few seconds, never a flood), a status table
that fits the terminal, help that reads well, the metrics URL once ready, and no pretending when a
running daemon keeps its own log level."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cli.runner import Cli
from tests.servers import EchoServer, refusing_socket
from tunneld.errors import ExitCode
from tunneld.version import __version__

pytestmark = pytest.mark.timeout(90)


def waiting_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("kci-tunneld: waiting ")]


def test_waiting_says_what_it_waits_for_every_few_seconds(cli: Cli) -> None:
    refusing = refusing_socket()
    port = refusing.getsockname()[1]
    forward = f"127.0.0.1:0:127.0.0.1:{port}"
    try:
        start = cli.run("start", "--detach", "--ready-timeout", "7", "-L", forward)
        cli.started.append(int(cli.status()["pid"]))
        assert start.returncode == ExitCode.NOT_READY, start.stderr
        (line,) = waiting_lines(start.stderr)  # at 5 s; not one per poll
        assert re.fullmatch(rf"kci-tunneld: waiting 5s: {re.escape(forward)} \((starting|degraded): could not "
                            rf"connect to 127\.0\.0\.1:{port}: .*\)", line), line

        wait = cli.run("wait", "--timeout", "11")
        assert wait.returncode == ExitCode.NOT_READY, wait.stderr
        lines = waiting_lines(wait.stderr)
        assert [line.split(":")[1] for line in lines] == [" waiting 5s", " waiting 10s"], lines
        assert all(forward in line and "could not connect" in line for line in lines)
        assert "not ready after 11s" in wait.stderr
    finally:
        refusing.close()
    assert cli.run("stop").returncode == 0


def test_nothing_is_said_when_everything_is_ready_at_once(cli: Cli, echo_server: EchoServer) -> None:
    start = cli.start_detached("-L", f"127.0.0.1:0:127.0.0.1:{echo_server.port}")
    assert start.returncode == 0 and start.stderr == "", start.stderr
    wait = cli.run("wait")
    assert wait.returncode == 0 and wait.stderr == "", wait.stderr
    assert cli.run("stop").returncode == 0


def test_the_status_table_fits_the_terminal(cli: Cli, echo_server: EchoServer) -> None:
    assert cli.start_detached("-L", f"localhost:0:127.0.0.1:{echo_server.port}").returncode == 0
    cli.env["COLUMNS"] = "80"
    narrow = cli.run("status")
    assert narrow.returncode == 0, narrow.stderr
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80, narrow.stdout
    header = narrow.stdout.splitlines()[1].split()
    assert header[:2] == ["NAME", "STATE"] and "LISTEN" in header and "TARGET" in header and "PROBE" in header
    cli.env["COLUMNS"] = "200"
    wide = cli.run("status")
    assert {"SINCE", "TOTAL", "UP", "DOWN", "ERRORS", "RECONN"} <= set(wide.stdout.splitlines()[1].split())
    assert cli.run("stop").returncode == 0


def test_help_reads_well(cli: Cli, tmp_path: Path) -> None:
    runtime = tmp_path / "run-user-with-hyphens"
    cli.env = {**{k: v for k, v in cli.env.items() if k != "KCI_TUNNELD_CONTROL"}, "XDG_RUNTIME_DIR": str(runtime),
               "COLUMNS": "80"}
    path = f"{runtime}/kci-tunneld/control.sock"
    for sub in ("start", "status", "wait", "stop", "reload", "up", "down"):
        text = cli.run(sub, "--help").stdout
        assert path in text, (sub, text)  # on one line, never split at a hyphen
    start = cli.run("start", "--help").stdout
    assert re.search(r"--log-level \{debug,info,warning,error\}\s+how much the daemon logs", start), start
    assert "with --auto: docker, never direct" in " ".join(start.split())
    assert "--registry-image IMAGE" in cli.run("up", "--help").stdout
    assert re.search(r"--registry-image IMAGE\s+image of the registry container", cli.run("up", "--help").stdout)
    stop = " ".join(cli.run("stop", "--help").stdout.split())
    assert "wait this long for the daemon to exit (default 30)" in stop and "--now" in stop
    for flag in ("-V", "--version"):
        version = cli.run(flag)
        assert version.returncode == 0 and version.stdout.strip() == f"kci-tunneld {__version__}"


def test_the_ready_line_names_the_metrics_url(cli: Cli, echo_server: EchoServer) -> None:
    result = cli.start_detached("-L", f"127.0.0.1:0:127.0.0.1:{echo_server.port}", "--metrics-port", "0")
    assert result.returncode == 0, result.stderr
    (address,) = cli.status()["metrics"]
    assert f"  metrics: http://{address}/metrics" in result.stdout.splitlines()
    assert cli.run("stop").returncode == 0


def test_a_running_daemon_keeps_its_log_level_and_says_so(cli: Cli, echo_server: EchoServer) -> None:
    forward = f"127.0.0.1:0:127.0.0.1:{echo_server.port}"
    assert cli.start_detached("-L", forward).returncode == 0
    same = cli.run("start", "--detach", "-L", forward)
    assert same.returncode == 0 and "keeps the log settings" not in same.stderr, same.stderr
    debug = cli.run("start", "--detach", "-L", forward, "--log-level", "debug")
    assert debug.returncode == 0, debug.stderr
    assert "already running with this config" in debug.stderr
    assert ("it keeps the log settings it was started with (--log-level applies when a daemon starts); "
            "to change them, `kci-tunneld stop`, then start it again") in debug.stderr
    assert cli.run("stop").returncode == 0
