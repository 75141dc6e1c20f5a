"""The control protocol: one pure parser that turns any bytes into a checked request or a named
error, and a live daemon that answers whatever it is sent, keeps forwarding, and stays up.

The fuzzing runs against a real daemon (``python -m tunneld start``) in a subprocess, with a
byte-exact echo flowing through its forward before, during and after.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli.runner import Cli
from tests.servers import EchoServer
from tunneld.daemon import control
from tunneld.daemon.control import MAX_CLIENTS, MAX_REQUEST, BadRequest, Request, parse_request
from tunneld.errors import AccessError, ConfigError

# ---------------------------------------------------------------- the parser, as a property

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
commands = st.sampled_from(["status", "wait", "stop", "reload", "tasks", "", "STATUS", "bogus"]) | json_values
requests = st.builds(lambda cmd, extra: {"cmd": cmd, **extra}, commands,
                     st.dictionaries(st.sampled_from(["timeout", "cleanup", "x", "cmd2"]) | st.text(max_size=6),
                                     json_values, max_size=3))


@given(st.binary(max_size=512))
def test_any_bytes_are_a_request_or_a_bad_request(line: bytes) -> None:
    try:
        req = parse_request(line)
    except BadRequest as e:
        assert str(e)
    else:
        assert isinstance(req, Request)


@given(requests)
def test_any_json_object_is_a_checked_request_or_names_the_problem(data: dict[str, Any]) -> None:
    try:
        req = parse_request(json.dumps(data).encode())
    except BadRequest as e:
        assert str(e)
        return
    assert req.cmd == data["cmd"]
    if req.timeout is not None:
        assert 0 < req.timeout <= control.MAX_WAIT
    assert isinstance(req.cleanup, bool)


@pytest.mark.parametrize(("line", "says"), [
    (b'{"cmd":"wait","timeout":"abc"}', "timeout: expected a number of seconds, got str 'abc'"),
    (b'{"cmd":"wait","timeout":0}', "timeout: expected seconds greater than 0"),
    (b'{"cmd":"wait","timeout":-5}', "timeout: expected seconds greater than 0"),
    (b'{"cmd":"wait","timeout":NaN}', "NaN is not a number JSON allows"),
    (b'{"cmd":"wait","timeout":1e999}', "expected seconds greater than 0 and at most"),
    (b'{"cmd":"wait","timeout":true}', "timeout: expected a number of seconds, got bool"),
    (b'{"cmd":"stop","cleanup":"yes"}', "cleanup: expected true or false, got str 'yes'"),
    (b'{"cmd":"stop","now":1}', "now: expected true or false, got int 1"),
    (b'{"cmd":"wait","now":true}', "'now': not a field of 'wait' (it takes timeout)"),
    (b'{"cmd":"status","timeout":1}', "'timeout': not a field of 'status' (it takes no fields)"),
    (b'{"cmd":"launch"}', "cmd: expected one of status, wait, stop, reload, tasks, got 'launch'"),
    (b'[1,2]', "expected a JSON object, got list"),
    (b'\xff\xfe', "not a JSON request line"),
    (b'[' * 100_000, "request of 100000 bytes; the limit is 65536"),
    (b'[' * 60_000, "not a JSON request line"),
])
def test_bad_requests_name_the_problem(line: bytes, says: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_request(line)
    assert says in str(caught.value)


def test_good_requests() -> None:
    assert parse_request(b'{"cmd":"wait","timeout":2.5}') == Request("wait", timeout=2.5)
    assert parse_request(b'{"cmd":"wait","timeout":null}') == Request("wait")
    assert parse_request(b'{"cmd":"stop","cleanup":true}') == Request("stop", cleanup=True)
    assert parse_request(b'{"cmd":"stop","now":true}') == Request("stop", now=True)
    assert parse_request(b'{"cmd":"status"}') == Request("status")


# ---------------------------------------------------------------- paths and directories


def test_a_control_path_too_long_for_a_socket_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / ("d" * 120) / "control.sock"
    with pytest.raises(ConfigError, match="a unix socket path has at most 107"):
        control.check_control_path(path)
    control.check_control_path(tmp_path / "control.sock")


def test_a_control_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError) as caught:
        control.check_control_dir(shared)
    assert f"control directory {shared} is writable by group or others (mode 0777)" in str(caught.value)
    assert f"chmod go-w {shared}" in str(caught.value)
    shared.chmod(0o700)
    control.check_control_dir(shared)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory another user owns")
def test_a_control_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(ConfigError, match="belongs to uid 65534, not to you"):
        control.check_control_dir(theirs)


def test_the_cli_refuses_an_unsafe_control_directory_before_starting(tmp_path: Path, echo_server: EchoServer) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    cli = Cli(shared)
    try:
        result = cli.run("start", "-L", f"127.0.0.1:0:127.0.0.1:{echo_server.port}", timeout=30)
    finally:
        cli.cleanup()
    assert result.returncode == 3, result.stderr
    assert "is writable by group or others" in result.stderr
    assert not cli.control.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_cannot_remove_a_running_daemons_socket(tmp_path: Path, echo_server: EchoServer) -> None:
    """The other user gets "permission denied", and root's daemon still answers afterwards."""
    tmp_path.chmod(0o755)  # others may look in, as in /run
    with daemon(tmp_path, echo_server) as cli:
        cli.control.chmod(0o600)
        # The interpreter lives under /root (0700 here), so the other user is made after the
        # imports: the CLI's own code runs as uid 65534.
        as_nobody = ("import os, sys, anyio._backends._asyncio, uvloop, tunneld.cli.main as m, "
                     "tunneld.daemon.lifecycle; os.setgroups([]); os.setgid(65534); os.setuid(65534); "
                     "sys.exit(m.main(sys.argv[1:]))")
        other = subprocess.run(
            [sys.executable, "-c", as_nobody, "start", "-L", f"127.0.0.1:0:127.0.0.1:{echo_server.port}",
             "--control", str(cli.control)],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )
        assert other.returncode == 10, other.stderr
        assert f"permission denied on the control socket {cli.control}" in other.stderr
        assert "Traceback" not in other.stderr
        assert cli.control.is_socket()
        assert cli.status()["state"] == "ready"


@pytest.mark.anyio
async def test_a_stale_socket_of_another_user_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # bound, never listening: connections are refused, as after a crash
    if os.geteuid() != 0:
        pytest.skip("needs root to give the socket file another owner")
    os.chown(path, 65534, 65534)
    with pytest.raises(AccessError, match="leftover socket of uid 65534, not yours; it is left alone"):
        await control.probe_existing(path)
    assert path.is_socket()
    os.chown(path, 0, 0)
    assert await control.probe_existing(path) is None
    assert not path.exists()


@pytest.mark.anyio
async def test_a_connection_closed_before_the_request_is_sent_is_not_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon that accepts and closes before reading (one exiting, as when `start --detach` asks its
    child, which failed to bind, whether it is ready) makes the request's send fail with a broken pipe:
    that is NotRunningError, which `start` answers by looking at why its child exited, not a traceback
    (seen once in CI: `start` exited 1 with BrokenResourceError instead of 5, "port in use")."""
    path = tmp_path / "control.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    connect = control._connect

    async def connect_then_closed(p: Path, io_timeout: float) -> Any:
        stream = await connect(p, io_timeout)
        accepted, _ = listener.accept()
        accepted.close()  # closed before the request is read: the send meets a broken pipe
        return stream

    monkeypatch.setattr(control, "_connect", connect_then_closed)
    try:
        with pytest.raises(control.NotRunningError, match="closed the control connection"):
            await control.request(path, "status")
    finally:
        listener.close()


def test_the_daemons_log_file_is_private(tmp_path: Path, echo_server: EchoServer) -> None:
    log = tmp_path / "daemon.log"
    log.write_text("an earlier run\n")
    log.chmod(0o644)
    with daemon(tmp_path, echo_server, "--log-file", str(log)):
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        assert stat.S_IMODE(tmp_path.stat().st_mode) & 0o022 == 0


# ---------------------------------------------------------------- a live daemon under fire


@contextlib.contextmanager
def daemon(tmp: Path, echo: EchoServer, *args: str) -> Iterator[Cli]:
    cli = Cli(tmp)
    try:
        result = cli.start_detached("-L", f"127.0.0.1:0:127.0.0.1:{echo.port}", *args, timeout=60)
        assert result.returncode == 0, result.stderr
        yield cli
    finally:
        cli.run("stop", "--timeout", "10")
        cli.cleanup()


class Echoer:
    """One long-lived connection through the forward, checked byte for byte on every round."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.rounds = 0

    def check(self, size: int = 4096) -> None:
        payload = os.urandom(size)
        self.sock.sendall(payload)
        got = b""
        while len(got) < size:
            chunk = self.sock.recv(size - len(got))
            assert chunk, "the forward closed the echo connection"
            got += chunk
        assert got == payload
        self.rounds += 1


def send_raw(path: Path, data: bytes, *, pieces: int = 1, close_early: bool = False, timeout: float = 15) -> bytes:
    """Send ``data`` (in ``pieces``), then read the reply line, if the daemon sends one."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        step = max(1, len(data) // pieces)
        try:
            for at in range(0, len(data), step):
                s.sendall(data[at:at + step])
                if pieces > 1:
                    time.sleep(0.002)
        except BrokenPipeError:
            pass  # an oversized request: the daemon answered and closed before reading it all
        if close_early:
            s.shutdown(socket.SHUT_WR)
        reply = b""
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while not reply.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply


def assert_answered(reply: bytes) -> dict[str, Any]:
    assert reply.endswith(b"\n"), reply[:200]
    data = json.loads(reply)
    assert isinstance(data, dict) and "ok" in data, data
    if not data["ok"]:
        assert isinstance(data["error"], str) and data["error"], data
        assert "internal error" not in data["error"], data
    return data


# Valid requests that would end or restart the daemon are not thrown at it: "stop" always carries
# a field stop does not take, so it is refused as malformed (and must be).
def _harmless(data: dict[str, Any]) -> dict[str, Any]:
    if data.get("cmd") == "stop":
        return {**data, "not-a-field": 1}
    if data.get("cmd") == "wait" and "timeout" in data:
        return {**data, "timeout": data["timeout"] if not isinstance(data["timeout"], (int, float)) else 1}
    return data


malformed = st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"") + b"\n"),
    requests.map(lambda d: json.dumps(_harmless(d)).encode() + b"\n"),
    st.integers(min_value=1, max_value=5).map(lambda n: b'{"cmd": "wait", "timeout": "abc"}' * n + b"\n"),
    st.sampled_from([b"[" * 50_000 + b"\n", b"{" + b" " * (MAX_REQUEST + 10) + b"}\n", b"\n", b"null\n",
                     b'{"cmd":"wait","timeout":NaN}\n', b'{"cmd":"wait","timeout":1e999}\n']),
)


def test_malformed_requests_never_end_the_daemon(tmp_path: Path, echo_server: EchoServer) -> None:
    with daemon(tmp_path, echo_server) as cli:
        status = cli.status()
        pid, port = int(status["pid"]), int(status["forwards"][0]["port"])
        echo = Echoer(port)
        echo.check()

        @settings(max_examples=150, print_blob=False, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        @given(malformed, st.integers(min_value=1, max_value=4))
        def throw(line: bytes, pieces: int) -> None:
            assert_answered(send_raw(cli.control, line, pieces=pieces))
            echo.check(512)

        throw()

        # Truncated: the request ends before its newline; the daemon says so and closes.
        data = assert_answered(send_raw(cli.control, b'{"cmd":"status"', close_early=True))
        assert data == {"ok": False, "error": "the request ended before its newline"}

        # Concurrent: many at once, each answered, none lost.
        replies: list[bytes] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            reply = send_raw(cli.control, [b'{"cmd":"status"}\n', b'{"cmd":"wait","timeout":"x"}\n',
                                           b"garbage\n"][i % 3])
            with lock:
                replies.append(reply)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(replies) == 24
        for reply in replies:
            assert_answered(reply)
        echo.check(1 << 20)

        # Slow: more idle clients than the daemon serves at once; the next one is told "busy" at
        # once (not made to wait), and once they go, requests are served again.
        idle = [socket.socket(socket.AF_UNIX) for _ in range(MAX_CLIENTS)]
        try:
            for s in idle:
                s.connect(str(cli.control))
            deadline = time.monotonic() + 10
            while True:  # the daemon accepts the idle ones in its own time: until all are held
                busy = assert_answered(send_raw(cli.control, b'{"cmd":"status"}\n', timeout=5))
                if not busy["ok"] or time.monotonic() > deadline:
                    break
            assert busy["ok"] is False and busy["error"].startswith("busy:"), busy
            echo.check()
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 10
        while not assert_answered(send_raw(cli.control, b'{"cmd":"status"}\n'))["ok"]:
            assert time.monotonic() < deadline, "the control socket stayed busy after the idle clients left"
            time.sleep(0.05)

        after = cli.status()
        assert after["pid"] == pid and after["state"] == "ready"
        echo.check(4 << 20)
        assert echo.rounds > 150
        echo.sock.close()
