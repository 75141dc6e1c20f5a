"""Reload is a transaction: whatever a reload asks for, the forwards that run keep serving until
their replacement is up, a failed reload leaves them untouched, and SIGHUP never ends the daemon.

Each test runs the real daemon (``python -m tunneld start --config``) in the foreground under a
NOTIFY_SOCKET, with a byte-exact echo through its forward before, during and after.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.support import NotifyListener
from tests.servers import EchoServer, refusing_socket


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    """A NOTIFY_SOCKET at a path (test_systemd covers abstract names too)."""
    listener = NotifyListener(str(tmp_path / "notify.sock"), str(tmp_path / "notify.sock"))
    yield listener
    listener.close()


class Daemon:
    """The real daemon in the foreground, its config file, its log, its notify socket."""

    def __init__(self, tmp: Path, notify: NotifyListener, config: str) -> None:
        self.tmp, self.notify = tmp, notify
        self.config = tmp / "config.toml"
        self.control = tmp / "control.sock"
        self.log = tmp / "daemon.log"
        self.config.write_text(config)
        env = {**os.environ, "NOTIFY_SOCKET": notify.env_value}
        env.pop("WATCHDOG_USEC", None)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tunneld", "start", "--config", str(self.config), "--control",
                 str(self.control)], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tunneld", *args, "--control", str(self.control)],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    def status(self) -> dict[str, object]:
        import json

        result = self.cli("status", "--json")
        assert result.returncode in (0, 4), result.stderr
        reply: dict[str, object] = json.loads(result.stdout)
        return reply

    def forwards(self) -> dict[str, dict[str, object]]:
        return {str(f["name"]): f for f in self.status()["forwards"]}  # type: ignore[attr-defined]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def running(tmp: Path, notify: NotifyListener, config: str) -> Iterator[Daemon]:
    daemon = Daemon(tmp, notify, config)
    try:
        notify.wait_for("READY", "1", timeout=30)
        yield daemon
    except BaseException:
        print(daemon.log.read_text(errors="replace"))  # pytest shows it with the failure
        raise
    finally:
        daemon.close()


class Echo:
    """A connection held open through the forward, checked byte for byte."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def check(self, size: int = 64 * 1024) -> None:
        payload = os.urandom(size)
        self.sock.sendall(payload)
        got = bytearray()
        while len(got) < size:
            chunk = self.sock.recv(size - len(got))
            assert chunk, "the echo connection was closed"
            got += chunk
        assert bytes(got) == payload


class Hammer:
    """New connections, one after another, each a round trip, counting the ones that fail."""

    def __init__(self, port: int) -> None:
        self.port, self.ok, self.failed = port, 0, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.sendall(b"ping")
                    assert s.recv(4) == b"ping"
                self.ok += 1
            except (OSError, AssertionError) as e:
                self.failed.append(repr(e))

    def __enter__(self) -> Hammer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def forward_toml(name: str, port: int, target: int) -> str:
    return f'[[forwards]]\nname = "{name}"\nport = {port}\nhost = "127.0.0.1"\nhost_port = {target}\n'


UNREACHABLE = '[transport]\nvia = "ssh://nobody@127.0.0.1:1"\n[timeouts]\nconnect = 2\n'


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["cli", "sighup"])
def test_a_reload_to_an_unreachable_transport_keeps_every_forward_serving(
        how: str, notify: NotifyListener, tmp_path: Path) -> None:
    with EchoServer() as echo_server, running(tmp_path, notify, forward_toml("echo", 0, echo_server.port)) as d:
        before = d.forwards()["echo"]
        port = int(before["port"])  # type: ignore[call-overload]
        echo = Echo(port)
        echo.check()
        d.config.write_text(UNREACHABLE + forward_toml("echo", 0, echo_server.port))
        since = len(notify.messages)
        with Hammer(port) as hammer:
            if how == "cli":
                result = d.cli("reload")
                assert result.returncode == 6, (result.returncode, result.stderr)
                assert "reload rejected, keeping the running config" in result.stderr
                assert "127.0.0.1" in result.stderr
            else:
                d.proc.send_signal(signal.SIGHUP)
                notify.wait_for("RELOADING", "1", timeout=10, since=since)
                notify.wait_for("READY", "1", timeout=30, since=since)
            echo.check()
        assert hammer.ok > 0 and not hammer.failed, hammer.failed[:3]
        assert d.proc.poll() is None, "the daemon ended"
        after = d.forwards()["echo"]
        assert after["state"] == "ready" and after["port"] == port
        assert d.status()["transport"]["kind"] == "direct"  # type: ignore[index]
        log = d.log.read_text()
        assert "reload rejected, keeping the running config" in log
        if how == "cli":
            assert "reload requested over the control socket" in log
        # The same file, mended, is taken.
        d.config.write_text(forward_toml("echo", 0, echo_server.port))
        assert d.cli("reload").returncode == 0
        echo.check(4 << 20)
        echo.sock.close()  # else stopping the daemon waits out the drain


@pytest.mark.timeout(90)
def test_a_reload_that_cannot_bind_changes_nothing(notify: NotifyListener, tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    with EchoServer() as echo_server, running(tmp_path, notify, forward_toml("echo", 0, echo_server.port)) as d:
        port = int(d.forwards()["echo"]["port"])  # type: ignore[call-overload]
        echo = Echo(port)
        echo.check()
        # A new forward on a port someone holds, and a change to the running one: all or nothing.
        changed = forward_toml("echo", 0, echo_server.port) + "max_connections = 7\n"
        d.config.write_text(changed + forward_toml("second", taken.getsockname()[1], echo_server.port))
        result = d.cli("reload")
        assert result.returncode == 5, (result.returncode, result.stderr)
        assert f"127.0.0.1:{taken.getsockname()[1]}" in result.stderr
        forwards = d.forwards()
        assert list(forwards) == ["echo"] and forwards["echo"]["max_connections"] != 7
        assert forwards["echo"]["state"] == "ready"
        echo.check()
        echo.sock.close()
    taken.close()


@pytest.mark.timeout(90)
def test_a_new_transport_takes_over_the_same_port_without_a_gap(notify: NotifyListener, tmp_path: Path) -> None:
    """Changing the transport's settings starts a new generation beside the running one; the port
    (0 in the config: picked at start) is handed over, never closed, and open connections drain."""
    with EchoServer() as echo_server, running(tmp_path, notify, forward_toml("echo", 0, echo_server.port)) as d:
        port = int(d.forwards()["echo"]["port"])  # type: ignore[call-overload]
        echo = Echo(port)
        echo.check()
        d.config.write_text("[timeouts]\nprobe = 4\n" + forward_toml("echo", 0, echo_server.port))
        with Hammer(port) as hammer:
            time.sleep(0.2)
            result = d.cli("reload")
            assert result.returncode == 0, result.stderr
            time.sleep(0.3)
        assert hammer.ok > 0 and not hammer.failed, hammer.failed[:3]
        assert int(d.forwards()["echo"]["port"]) == port  # type: ignore[call-overload]
        echo.check()  # the old generation's connection drains on
        echo.sock.close()


@pytest.mark.timeout(90)
def test_after_a_reload_ready_waits_for_every_forward(notify: NotifyListener, tmp_path: Path) -> None:
    held = refusing_socket()  # bound, not yet listening: the new forward's target refuses
    with EchoServer() as echo_server, running(tmp_path, notify, forward_toml("echo", 0, echo_server.port)) as d:
        d.config.write_text(forward_toml("echo", 0, echo_server.port) + forward_toml("late", 0, held.getsockname()[1]))
        since = len(notify.messages)
        assert d.cli("reload").returncode == 0
        pending = notify.wait_for("STATUS", None, timeout=10, since=since)
        deadline = time.monotonic() + 10
        while "waiting for late" not in pending.fields["STATUS"]:
            assert time.monotonic() < deadline, notify.messages[since:]
            pending = notify.wait_for("STATUS", None, timeout=10, since=notify.messages.index(pending) + 1)
        assert pending.fields["STATUS"].startswith("1/2 forwards ready; waiting for late (")
        notify.drain(1.0)
        assert not any("READY" in m.fields for m in notify.messages[since:]), notify.messages[since:]
        held.listen(4)
        threading.Thread(target=_accept_and_close, args=(held,), daemon=True).start()
        ready = notify.wait_for("READY", "1", timeout=20, since=since)
        assert ready.fields["STATUS"] == "2/2 forwards ready"
    held.close()


def _accept_and_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while True:
            sock.accept()[0].close()


@pytest.mark.timeout(90)
def test_a_renamed_forward_keeps_its_port(notify: NotifyListener, tmp_path: Path) -> None:
    """The same address under a new name: the port is handed over, not bound twice (which would fail)."""
    with EchoServer() as echo_server, running(tmp_path, notify, forward_toml("old", 0, echo_server.port)) as d:
        port = int(d.forwards()["old"]["port"])  # type: ignore[call-overload]
        d.config.write_text(forward_toml("new", port, echo_server.port))
        with Hammer(port) as hammer:
            result = d.cli("reload")
            assert result.returncode == 0, result.stderr
            time.sleep(0.3)
        assert hammer.ok > 0 and not hammer.failed, hammer.failed[:3]
        forwards = d.forwards()
        assert list(forwards) == ["new"] and forwards["new"]["port"] == port
