"""The CLI contract, driven as a real subprocess: start --detach, status, wait, stop, bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli.runner import Cli
from tests.servers import EchoServer, free_port_holder, refusing_socket

pytestmark = pytest.mark.timeout(90)


def echo_through(port: int, data: bytes) -> bytes:
    """A blocking client: send all, half-close, read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := s.recv(1 << 20):
            got.extend(chunk)
    return bytes(got)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_start_detach_status_stop(cli: Cli, echo_server: EchoServer) -> None:
    result = cli.start_detached("-L", f"127.0.0.1:0:127.0.0.1:{echo_server.port}")
    assert result.returncode == 0, result.stderr
    assert "ready" in result.stdout
    status = cli.status()
    (forward,) = status["forwards"]
    port = forward["port"]
    assert port != 0 and forward["listen"] == [f"127.0.0.1:{port}"] and forward["state"] == "ready"

    data = os.urandom(4 * 1024 * 1024)
    assert echo_through(port, data) == data

    forward = cli.status()["forwards"][0]
    assert forward["total"] == 1 and forward["bytes_up"] == len(data) and forward["bytes_down"] == len(data)
    table = cli.run("status")
    assert table.returncode == 0 and "ready" in table.stdout and f"127.0.0.1:{port}" in table.stdout
    assert Path(status["log_file"]).exists()
    assert (cli.control.stat().st_mode & 0o777) == 0o600

    stop = cli.run("stop")
    assert stop.returncode == 0, stop.stderr
    assert port_is_free(port)
    assert not cli.control.exists()
    assert cli.run("status").returncode == 7


def test_start_is_idempotent_for_the_same_config(cli: Cli, echo_server: EchoServer) -> None:
    forward = f"127.0.0.1:0:127.0.0.1:{echo_server.port}"
    assert cli.start_detached("-L", forward).returncode == 0
    pid = cli.status()["pid"]
    again = cli.run("start", "--detach", "-L", forward)
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stderr and cli.status()["pid"] == pid
    other = cli.run("start", "--detach", "-L", f"127.0.0.1:0:127.0.0.1:{echo_server.port + 0}", "-L",
                    f"127.0.0.1:0:127.0.0.1:{echo_server.port}x")
    assert other.returncode == 3  # malformed input is caught before anything else
    different = cli.run("start", "--detach", "-L", f"localhost:0:127.0.0.1:{echo_server.port}")
    assert different.returncode == 8 and "different config" in different.stderr
    assert cli.run("stop").returncode == 0


@pytest.mark.parametrize(
    ("forward", "message"),
    [
        ("5000", "-L '5000': expected [BIND:]PORT:HOST:HOSTPORT"),
        ("abc:127.0.0.1:5000", "local PORT: expected an integer 0..65535, got 'abc'"),
        ("0.0.0.0:5000:127.0.0.1:5000", "not a loopback address"),
    ],
)
def test_bad_forward_fails_fast_with_its_reason(cli: Cli, forward: str, message: str) -> None:
    result = cli.run("start", "--detach", "-L", forward)
    assert result.returncode == 3
    assert message in result.stderr
    assert not cli.control.exists()


def test_port_in_use_fails_naming_the_address(cli: Cli, echo_server: EchoServer) -> None:
    holder = free_port_holder()
    port = holder.getsockname()[1]
    try:
        result = cli.run("start", "--detach", "-L", f"127.0.0.1:{port}:127.0.0.1:{echo_server.port}")
    finally:
        holder.close()
    assert result.returncode == 5, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in result.stderr


def test_a_failed_start_shows_only_its_own_log_lines(cli: Cli, echo_server: EchoServer) -> None:
    """The log file is appended to by every daemon on the same control socket: what a failed start
    prints must be that daemon's lines, not an earlier run's "ready" and "stopped"."""
    first = cli.run("start", "--detach", "-L", f"127.0.0.1:0:127.0.0.1:{echo_server.port}")
    assert first.returncode == 0, first.stderr
    assert cli.run("stop").returncode == 0
    holder = free_port_holder()
    try:
        failed = cli.run("start", "--detach", "-L", f"127.0.0.1:{holder.getsockname()[1]}:127.0.0.1:1")
    finally:
        holder.close()
    assert failed.returncode == 5, failed.stderr
    assert "before it was ready" in failed.stderr and "address already in use" in failed.stderr
    assert "forward(s) ready" not in failed.stderr and "stopped" not in failed.stderr, failed.stderr


def test_unreachable_target_is_not_ready(cli: Cli) -> None:
    refusing = refusing_socket()
    try:
        result = cli.run("start", "--detach", "--ready-timeout", "2", "-L",
                         f"127.0.0.1:0:127.0.0.1:{refusing.getsockname()[1]}")
        cli.started.append(int(cli.status()["pid"]))  # it keeps running, retrying: ours to stop
        assert result.returncode == 4, result.stderr
        assert "not ready after 2s" in result.stderr and "could not connect" in result.stderr
        assert "kci-tunneld stop" in result.stderr
        assert cli.run("stop").returncode == 0
    finally:
        refusing.close()


def test_config_file_forwards(cli: Cli, tmp_path: Path, echo_server: EchoServer) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        f'[[forwards]]\nname = "echo"\nbind = "127.0.0.1"\nhost = "127.0.0.1"\nhost_port = {echo_server.port}\n'
    )
    assert cli.start_detached("--config", str(config)).returncode == 0
    status = cli.status()
    assert [f["name"] for f in status["forwards"]] == ["echo"]
    assert echo_through(status["forwards"][0]["port"], b"abc") == b"abc"
    assert cli.run("stop").returncode == 0


def test_commands_without_daemon_say_so(cli: Cli) -> None:
    for args in (("status",), ("wait", "--timeout", "1"), ("stop",)):
        result = cli.run(*args)
        assert result.returncode == 7
        assert "no kci-tunneld daemon answers on" in result.stderr


def test_help_teaches_with_examples(cli: Cli) -> None:
    for sub in ("start", "status", "wait", "stop"):
        result = cli.run(sub, "--help")
        assert result.returncode == 0 and "examples:" in result.stdout


def test_status_json_is_machine_readable(cli: Cli, echo_server: EchoServer) -> None:
    assert cli.start_detached("-L", f"127.0.0.1:0:127.0.0.1:{echo_server.port}").returncode == 0
    raw = cli.run("status", "--json").stdout
    reply = json.loads(raw)
    assert set(reply["forwards"][0]) >= {"name", "listen", "port", "target", "state", "active", "total",
                                         "bytes_up", "bytes_down", "errors", "last_probe", "last_error"}
    assert cli.run("stop").returncode == 0


def test_out_of_file_descriptors_the_forward_pauses_and_recovers(cli: Cli, echo_server: EchoServer) -> None:
    """At the process's open-file limit accept() fails (EMFILE): the daemon must neither spin nor stop
    accepting for good. Clients beyond the limit wait or are closed; once the held ones leave, new
    clients are served again."""
    proc = subprocess.Popen(
        ["prlimit", "--nofile=48:48", sys.executable, "-m", "tunneld", "start", "--control", str(cli.control),
         "-L", f"127.0.0.1:0:127.0.0.1:{echo_server.port}", "--log-level", "debug"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli.env, stdin=subprocess.DEVNULL,
    )
    cli.started.append(proc.pid)
    try:
        port = cli.wait_ready()["forwards"][0]["port"]
        held: list[socket.socket] = []
        try:
            for _ in range(40):  # two fds each in the daemon: far more than the 48 it may open
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"x")
                held.append(s)
            time.sleep(1.0)  # the daemon meets EMFILE, and must not busy-loop on it
            cpu = _cpu_seconds(proc.pid)
            time.sleep(1.0)
            assert _cpu_seconds(proc.pid) - cpu < 0.5, "the daemon spins while out of file descriptors"
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 10
        while echo_through_or_none(port, b"back") != b"back":
            assert time.monotonic() < deadline, "no connection served again after the held ones closed"
            time.sleep(0.2)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "accept failed: Too many open files; retrying" in out, out[-2000:]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def echo_through_or_none(port: int, data: bytes) -> bytes | None:
    try:
        return echo_through(port, data)
    except OSError:
        return None
