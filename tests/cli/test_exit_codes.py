"""Exit codes a script can rely on: 1 is only ever a bug. `status` says ready (0), not ready (4) or
no daemon (7), also when a daemon does not answer; `stop` that times out while connections drain
says so (4) and `stop --now` ends them; every code is documented where people look."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path
from types import TracebackType

import pytest

from tests.cli.runner import Cli
from tests.servers import EchoServer, refusing_socket
from tunneld.cli.main import EXIT_MEANINGS
from tunneld.errors import ExitCode

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[2]


class SilentControlSocket:
    """A control socket that accepts and reads, but never answers (a daemon that is stuck), or
    answers ``reply`` (something that is not kci-tunneld)."""

    def __init__(self, path: Path, reply: bytes = b"") -> None:
        self.reply = reply
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen()
        self.held: list[socket.socket] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> SilentControlSocket:
        self.thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.done.set()
        self.sock.close()
        for s in self.held:
            s.close()
        self.thread.join(timeout=5)

    def _accept(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            if self.reply:
                conn.sendall(self.reply)


def test_status_exit_code_says_ready_not_ready_or_no_daemon(cli: Cli, echo_server: EchoServer) -> None:
    assert cli.run("status").returncode == ExitCode.NOT_RUNNING
    refusing = refusing_socket()
    try:
        config = cli.tmp / "c.toml"
        config.write_text(
            f'[[forwards]]\nname = "up"\nbind = "127.0.0.1"\nhost = "127.0.0.1"\nhost_port = {echo_server.port}\n'
            f'[[forwards]]\nname = "down"\nbind = "127.0.0.1"\nhost = "127.0.0.1"\n'
            f"host_port = {refusing.getsockname()[1]}\n"
        )
        result = cli.run("start", "--detach", "--ready-timeout", "1", "--config", str(config))
        cli.started.append(int(cli.status()["pid"]))
        assert result.returncode == ExitCode.NOT_READY, result.stderr
        table = cli.run("status")
        assert table.returncode == ExitCode.NOT_READY, table.stderr
        assert "down" in table.stdout and "could not connect" in table.stdout  # printed all the same
        as_json = cli.run("status", "--json")
        assert as_json.returncode == ExitCode.NOT_READY
        assert {f["name"]: f["state"] for f in json.loads(as_json.stdout)["forwards"]}["up"] == "ready"
        config.write_text(config.read_text().split("[[forwards]]\nname = \"down\"")[0])
        assert cli.run("reload").returncode == 0
        cli.wait_ready()
        assert cli.run("status").returncode == ExitCode.OK
        assert cli.run("status", "--json").returncode == ExitCode.OK
        assert cli.run("stop").returncode == 0
    finally:
        refusing.close()


def test_a_daemon_that_does_not_answer_is_not_a_bug(cli: Cli) -> None:
    with SilentControlSocket(cli.control):
        for args in (("status",), ("status", "--json"), ("stop",), ("wait", "--timeout", "1")):
            started = time.monotonic()
            result = cli.run(*args, timeout=30)
            assert result.returncode == ExitCode.NOT_RUNNING, (args, result.returncode, result.stderr)
            assert f"the daemon on {cli.control} did not answer" in result.stderr, result.stderr
            assert "it is stuck" in result.stderr
            assert "Traceback" not in result.stderr
            assert time.monotonic() - started < 15


def test_something_else_on_the_control_socket_is_not_a_bug(cli: Cli) -> None:
    with SilentControlSocket(cli.control, reply=b"SSH-2.0-OpenSSH_9.6\r\n"):
        for args in (("status",), ("stop",), ("wait", "--timeout", "1")):
            result = cli.run(*args, timeout=30)
            assert result.returncode == ExitCode.NOT_RUNNING, (args, result.returncode, result.stderr)
            assert "what listens there is not a kci-tunneld daemon" in result.stderr, result.stderr


def held_connection(port: int) -> socket.socket:
    """A client connection through the forward, echoed once (so it is open end to end), kept open."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"hello")
    assert s.recv(5) == b"hello"
    return s


def until_closed(s: socket.socket, within: float) -> float:
    """Seconds until the far end closes (EOF or reset), or fail after ``within``."""
    started = time.monotonic()
    s.settimeout(within)
    try:
        while s.recv(1024):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def draining_daemon(cli: Cli, echo_server: EchoServer) -> int:
    config = cli.tmp / "c.toml"
    config.write_text(f'[timeouts]\ndrain = 60\n[[forwards]]\nname = "echo"\nbind = "127.0.0.1"\n'
                      f'host = "127.0.0.1"\nhost_port = {echo_server.port}\n')
    assert cli.start_detached("--config", str(config)).returncode == 0
    return int(cli.status()["forwards"][0]["port"])


def test_stop_that_times_out_while_draining_says_so_and_stop_now_ends_it(cli: Cli, echo_server: EchoServer) -> None:
    client = held_connection(draining_daemon(cli, echo_server))
    with client:
        stop = cli.run("stop", "--timeout", "1")
        assert stop.returncode == ExitCode.NOT_READY, stop.stderr
        assert re.search(r"the daemon \(pid \d+\) on .* is still draining 1 connection\(s\) after 1s; "
                         r"`kci-tunneld stop --now` ends them", stop.stderr), stop.stderr
        started = time.monotonic()
        now = cli.run("stop", "--now", "--timeout", "20")
        assert now.returncode == 0, now.stderr
        assert time.monotonic() - started < 10
        assert until_closed(client, 5) < 5
    assert cli.run("status").returncode == ExitCode.NOT_RUNNING
    log = Path(cli.control.with_suffix(".log")).read_text()
    assert "stop --now: ending the 1 connection(s) still draining" in log


def test_stop_now_does_not_drain(cli: Cli, echo_server: EchoServer) -> None:
    client = held_connection(draining_daemon(cli, echo_server))
    with client:
        started = time.monotonic()
        stop = cli.run("stop", "--now", "--timeout", "20")
        assert stop.returncode == 0, stop.stderr
        assert time.monotonic() - started < 10  # not the 60 s drain
        assert until_closed(client, 5) < 5
    log = Path(cli.control.with_suffix(".log")).read_text()
    assert "stopping now: no new connections; ending 1 open connection(s)" in log


# ---------------------------------------------------------------- every code, documented


def test_every_exit_code_is_in_help_readme_and_troubleshooting(cli: Cli) -> None:
    helptext = cli.run("--help").stdout
    readme = (REPO / "README.md").read_text()
    trouble = (REPO / "docs" / "troubleshooting.md").read_text()
    table = dict(re.findall(r"^\| (\d+) \| ([a-z ]+) \|", trouble, flags=re.MULTILINE))
    for code in ExitCode:
        name = code.name.lower().replace("_", " ")
        assert f"  {code.value:<4}{name}: {EXIT_MEANINGS[code]}" in helptext, code
        assert table.get(str(code.value)) == name, (code, table)
        assert re.search(rf"\b{code.value} {name}\b", readme), code
    assert set(table) == {str(c.value) for c in ExitCode}
