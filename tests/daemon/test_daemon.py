"""Daemon lifecycle on a real process: graceful SIGTERM, forced second SIGINT, SIGHUP reload."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from tests.cli.runner import Cli
from tests.servers import EchoServer

pytestmark = pytest.mark.timeout(90)


def connect_and_echo(port: int, data: bytes = b"ping") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(data)
    assert s.recv(len(data)) == data
    return s


def forward_config(path: Path, forwards: dict[str, int], drain: float = 10.0) -> None:
    text = f"[timeouts]\ndrain = {drain}\nprobe_interval = 0.5\n"
    for name, target in forwards.items():
        text += (f'[[forwards]]\nname = "{name}"\nbind = "127.0.0.1"\nhost = "127.0.0.1"\n'
                 f"host_port = {target}\n")
    path.write_text(text)


def test_sigterm_drains_a_connection_in_flight(cli: Cli, echo_server: EchoServer) -> None:
    proc = cli.popen("-L", f"127.0.0.1:0:127.0.0.1:{echo_server.port}")
    port = cli.wait_ready()["forwards"][0]["port"]
    conn = connect_and_echo(port)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    # Listening stopped, the open connection still works...
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    conn.sendall(b"still here")
    assert conn.recv(100) == b"still here"
    assert proc.poll() is None
    # ...and once it closes, the daemon exits 0.
    conn.shutdown(socket.SHUT_WR)
    assert conn.recv(100) == b""
    conn.close()
    assert proc.wait(timeout=10) == 0
    output = proc.stdout.read() if proc.stdout else ""
    assert "SIGTERM: shutting down gracefully" in output and "draining 1 connection(s)" in output


def test_drain_grace_period_ends_stuck_connections(cli: Cli, tmp_path: Path, echo_server: EchoServer) -> None:
    config = tmp_path / "c.toml"
    forward_config(config, {"echo": echo_server.port}, drain=1.0)
    proc = cli.popen("--config", str(config))
    port = cli.wait_ready()["forwards"][0]["port"]
    conn = connect_and_echo(port)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 5
    assert conn.recv(10) == b""  # closed by the daemon after the grace period
    conn.close()
    assert "grace period over: closing 1 connection(s)" in (proc.stdout.read() if proc.stdout else "")


def test_second_sigint_forces_exit(cli: Cli, echo_server: EchoServer) -> None:
    proc = cli.popen("-L", f"127.0.0.1:0:127.0.0.1:{echo_server.port}")
    port = cli.wait_ready()["forwards"][0]["port"]
    conn = connect_and_echo(port)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert proc.poll() is None  # draining the open connection
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 130
    conn.close()


def test_sighup_reload_touches_only_changed_forwards(cli: Cli, tmp_path: Path) -> None:
    with EchoServer() as one, EchoServer() as two, EchoServer() as three:
        config = tmp_path / "c.toml"
        forward_config(config, {"keep": one.port, "change": two.port, "drop": one.port})
        proc = cli.popen("--config", str(config))
        ports = {f["name"]: f["port"] for f in cli.wait_ready()["forwards"]}
        kept = connect_and_echo(ports["keep"])
        changed = connect_and_echo(ports["change"])

        forward_config(config, {"keep": one.port, "change": three.port, "new": two.port})
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = cli.status()
            names = {f["name"]: f for f in status["forwards"]}
            if set(names) == {"keep", "change", "new"} and status["state"] == "ready":
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"reload did not settle: {cli.status()}")
        # The unchanged forward kept its listener and its open connection.
        assert names["keep"]["port"] == ports["keep"] and names["keep"]["active"] == 1
        kept.sendall(b"after reload")
        assert kept.recv(100) == b"after reload"
        # The changed one drains its old connection (still relayed to the old target)...
        changed.sendall(b"old target")
        assert changed.recv(100) == b"old target"
        # ...while new clients reach the new target.
        accepted_before = three.accepted
        connect_and_echo(names["change"]["port"]).close()
        assert three.accepted == accepted_before + 1
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", ports["drop"]), timeout=5)
        for s in (kept, changed):
            s.close()

        # A broken config is rejected and the running one stays.
        config.write_text("[[forwards]]\nname = 1\n")
        reload = cli.run("reload")
        assert reload.returncode == 3 and "keeping the running config" in reload.stderr
        assert {f["name"] for f in cli.status()["forwards"]} == {"keep", "change", "new"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
