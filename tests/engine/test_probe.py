"""Probes end to end through a transport, and the forward states they drive (no lab needed).

HTTPS probes run against the API-server stand-in on loopback (tests/standins/apiserver.py),
with credentials from a real kubeconfig file (reading those: tests/test_kubeconfig.py).
"""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import anyio
import anyio.abc
import pytest

from tests.helpers import StateWatch, echo_roundtrip
from tests.servers import EchoServer, free_port_holder
from tests.standins.apiserver import ApiCerts, StandinApiServer, ensure_certs, write_kubeconfig
from tests.standins.transports import SwitchableTransport
from tunneld.config import ForwardSpec, Timeouts, TransportSpec
from tunneld.engine.forward import MIN_PROBE_GAP, Forward, ForwardState
from tunneld.engine.probe import probe
from tunneld.transports import TransportState
from tunneld.transports.direct import DirectTransport

pytestmark = pytest.mark.timeout(30)

QUICK = Timeouts(connect=2.0, probe=2.0, probe_interval=0.2, ready=10.0, drain=1.0)


@pytest.fixture(scope="module")
def certs() -> ApiCerts:
    return ensure_certs()


@pytest.fixture
def kubeconfig_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """KUBECONFIG pointing at a file in tmp_path (not there until a test writes it)."""
    path = tmp_path / "kubeconfig"
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


def spec_for(port: int, probe_kind: str = "tcp", path: str = "/") -> ForwardSpec:
    return ForwardSpec(name="p", bind="127.0.0.1", port=0, host="127.0.0.1", host_port=port,
                       probe=probe_kind, probe_path=path)  # type: ignore[arg-type]


def direct() -> DirectTransport:
    return DirectTransport(TransportSpec(), QUICK)


# ---------------------------------------------------------------- https


@pytest.mark.anyio
async def test_https_probe_gets_readyz_with_the_kubeconfigs_client_cert(certs: ApiCerts, kubeconfig_env: Path) -> None:
    with StandinApiServer(certs=certs, require_client_cert=True) as server:
        write_kubeconfig(kubeconfig_env, server.port, certs)
        result = await probe(direct(), spec_for(server.port, "https"), deadline=5, local_port=server.port)
    assert result.ok, result.error
    assert result.detail is not None and "GET /readyz HTTP 200" in result.detail
    assert [r.line for r in server.requests] == ["GET /readyz HTTP/1.1"]


@pytest.mark.anyio
async def test_https_probe_without_credentials_is_only_a_handshake(certs: ApiCerts, kubeconfig_env: Path) -> None:
    with StandinApiServer(certs=certs, require_client_cert=False) as server:
        result = await probe(direct(), spec_for(server.port, "https"), deadline=5, local_port=server.port)
        assert await anyio.to_thread.run_sync(server.handshaken.wait, 5)  # the server side finished too
    assert result.ok, result.error
    assert result.detail is not None and result.detail.startswith("TLS handshake")
    assert server.handshakes == 1 and server.requests == []  # nothing was sent over it


@pytest.mark.anyio
async def test_https_probe_fails_when_readyz_is_not_200(certs: ApiCerts, kubeconfig_env: Path) -> None:
    with StandinApiServer(certs=certs, readyz_failures=1) as server:  # /readyz answers 500 once
        write_kubeconfig(kubeconfig_env, server.port, certs)
        result = await probe(direct(), spec_for(server.port, "https"), deadline=5, local_port=server.port)
    assert not result.ok and result.error is not None
    assert "GET /readyz" in result.error and "HTTP 500" in result.error


@pytest.mark.anyio
async def test_https_probe_fails_on_a_server_the_kubeconfig_ca_did_not_sign(
        certs: ApiCerts, kubeconfig_env: Path) -> None:
    with StandinApiServer(certs=certs) as server:
        write_kubeconfig(kubeconfig_env, server.port, certs, ca=certs.other_ca)
        result = await probe(direct(), spec_for(server.port, "https"), deadline=5, local_port=server.port)
    assert not result.ok and result.error is not None
    assert "TLS handshake" in result.error and "certificate verify failed" in result.error, result.error


@pytest.mark.anyio
async def test_https_probe_against_a_plain_tcp_service_fails(echo_server: EchoServer, kubeconfig_env: Path) -> None:
    result = await probe(direct(), spec_for(echo_server.port, "https"), deadline=5)
    assert not result.ok and result.error is not None and f"127.0.0.1:{echo_server.port}" in result.error


# ---------------------------------------------------------------- http


class HttpStatusServer:
    """Answers every GET with ``status``; records the paths."""

    def __init__(self, status: int) -> None:
        paths = self.paths = []  # type: list[str]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                paths.append(self.path)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port: int = self.server.server_address[1]

    def __enter__(self) -> HttpStatusServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "ok"), [(200, True), (401, True), (503, False)])
async def test_http_probe_accepts_any_status_below_500(status: int, ok: bool) -> None:
    with HttpStatusServer(status) as server:
        result = await probe(direct(), spec_for(server.port, "http", "/v2/"), deadline=5)
    assert result.ok is ok and server.paths == ["/v2/"]
    assert (result.detail == f"HTTP {status}") if ok else (result.error is not None and "HTTP 503" in result.error)


# ---------------------------------------------------------------- states


class SwitchableEcho:
    """A TCP echo target that can go away (connects refused) and come back on the same port."""

    def __init__(self) -> None:
        self.sock = self._listen(0)
        self.port: int = self.sock.getsockname()[1]

    def _listen(self, port: int) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(16)
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()
        return sock

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def down(self) -> None:
        if self.sock.fileno() == -1:
            return
        # shutdown() first: a close() alone leaves the socket listening while a thread sits in accept().
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def up(self) -> None:
        self.sock = self._listen(self.port)


@pytest.fixture
def target() -> Iterator[SwitchableEcho]:
    t = SwitchableEcho()
    yield t
    t.down()


@pytest.mark.anyio
async def test_degraded_then_ready_again_counts_a_reconnect(target: SwitchableEcho) -> None:
    watch = StateWatch()
    async with anyio.create_task_group() as tg:
        fwd: Forward = await tg.start(Forward(spec_for(target.port), direct(), QUICK, on_change=watch).run)
        await watch.until(fwd, ForwardState.READY)
        target.down()
        await watch.until(fwd, ForwardState.DEGRADED)
        assert fwd.last_error is not None and "refused" in fwd.last_error.lower()
        target.up()
        await watch.until(fwd, ForwardState.READY)
        assert fwd.snapshot()["reconnects"] == 1 and fwd.last_ok is not None
        fwd.stop()


@pytest.mark.anyio
async def test_reconnecting_while_the_transport_says_so(target: SwitchableEcho) -> None:
    transport = SwitchableTransport(QUICK)
    watch = StateWatch()
    async with anyio.create_task_group() as tg:
        fwd: Forward = await tg.start(Forward(spec_for(target.port), transport, QUICK, on_change=watch).run)
        await watch.until(fwd, ForwardState.READY)
        transport.health.set(TransportState.RECONNECTING)
        target.down()
        await watch.until(fwd, ForwardState.RECONNECTING)
        transport.health.set(TransportState.CONNECTED)
        target.up()
        await watch.until(fwd, ForwardState.READY)
        transport.health.set(TransportState.FAILED)  # the transport gave up
        target.down()
        await watch.until(fwd, ForwardState.FAILED)
        fwd.stop()


# A forward at rest: the transport's health, not the probe interval, must bring its next probe.
RESTING = Timeouts(connect=2.0, probe=2.0, probe_interval=60.0, ready=10.0, drain=1.0)


@pytest.mark.anyio
async def test_a_transport_change_reaches_a_resting_forward_at_once(target: SwitchableEcho) -> None:
    """Event-driven: the forward probes as soon as the health changes, not at a poll tick (it used to
    look every 0.5 s, which took up to 0.5 s more) nor at its 60 s interval."""
    transport = SwitchableTransport(RESTING)
    watch = StateWatch()
    async with anyio.create_task_group() as tg:
        fwd: Forward = await tg.start(Forward(spec_for(target.port), transport, RESTING, on_change=watch).run)
        await watch.until(fwd, ForwardState.READY)
        # Time must pass here, nothing to wait for: probes are at least MIN_PROBE_GAP apart, and
        # a change inside that gap would measure the gap, not how the change travels.
        await anyio.sleep(MIN_PROBE_GAP + 0.05)
        transport.health.set(TransportState.RECONNECTING, "link lost (stand-in)")
        assert await watch.until(fwd, ForwardState.RECONNECTING, within=5) < 0.3
        assert fwd.last_error is not None and "the transport is reconnecting" in fwd.last_error
        transport.health.set(TransportState.CONNECTED)
        await watch.until(fwd, ForwardState.READY, within=5)
        fwd.stop()


@pytest.mark.anyio
async def test_a_transport_change_while_a_probe_runs_is_not_lost(target: SwitchableEcho) -> None:
    """The probe that was under way when the transport went down still succeeds; the change must
    bring the next probe (after the gap), not wait for the 60 s interval."""
    transport = SwitchableTransport(RESTING)
    transport.gate = anyio.Event()
    probing = transport.connecting
    watch = StateWatch()
    async with anyio.create_task_group() as tg:
        fwd: Forward = await tg.start(Forward(spec_for(target.port), transport, RESTING, on_change=watch).run)
        with anyio.fail_after(5):
            await probing.wait()  # the first probe passed the health check and waits at the gate
        transport.health.set(TransportState.RECONNECTING)
        transport.gate.set()
        await watch.until(fwd, ForwardState.READY)
        assert await watch.until(fwd, ForwardState.RECONNECTING, within=5) < 3
        fwd.stop()


@pytest.mark.anyio
async def test_a_client_that_cannot_connect_triggers_a_probe_at_once(target: SwitchableEcho) -> None:
    slow = Timeouts(connect=2.0, probe=2.0, probe_interval=60.0, ready=10.0, drain=1.0)
    watch = StateWatch()
    async with anyio.create_task_group() as tg:
        fwd: Forward = await tg.start(Forward(spec_for(target.port), direct(), slow, on_change=watch).run)
        await watch.until(fwd, ForwardState.READY)
        target.down()
        assert await echo_roundtrip(fwd.port, b"x") == b""  # the far side refused: closed cleanly
        assert await watch.until(fwd, ForwardState.DEGRADED, within=3) < 2  # not after the 60 s interval
        fwd.stop()


@pytest.mark.anyio
async def test_starting_turns_degraded_after_the_ready_timeout(target: SwitchableEcho) -> None:
    target.down()
    short = Timeouts(connect=1.0, probe=1.0, probe_interval=0.2, ready=0.5, drain=1.0)
    watch = StateWatch()
    async with anyio.create_task_group() as tg:
        fwd: Forward = await tg.start(Forward(spec_for(target.port), direct(), short, on_change=watch).run)
        assert fwd.state == ForwardState.STARTING
        assert 0.3 < await watch.until(fwd, ForwardState.DEGRADED) < 5
        fwd.stop()


@pytest.mark.anyio
async def test_a_port_in_use_is_failed_then_retried(echo_server: EchoServer) -> None:
    holder = free_port_holder()
    port = holder.getsockname()[1]
    spec = ForwardSpec(name="busy", bind="127.0.0.1", port=port, host="127.0.0.1", host_port=echo_server.port)
    watch = StateWatch()
    try:
        async with anyio.create_task_group() as tg:
            fwd: Forward = await tg.start(Forward(spec, direct(), QUICK, watch, retry_bind=0.1).run)
            assert fwd.state == ForwardState.FAILED
            assert fwd.last_error is not None and "address already in use" in fwd.last_error
            holder.close()
            await watch.until(fwd, ForwardState.READY)
            assert await echo_roundtrip(port, b"bound at last") == b"bound at last"
            fwd.stop()
    finally:
        holder.close()


@pytest.mark.anyio
async def test_stop_while_failed_ends_the_forward() -> None:
    holder = free_port_holder()
    spec = ForwardSpec(name="busy", bind="127.0.0.1", port=holder.getsockname()[1], host="127.0.0.1", host_port=9)
    try:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                fwd: Forward = await tg.start(Forward(spec, direct(), QUICK, retry_bind=30).run)
                fwd.stop()
        assert fwd.state == ForwardState.STOPPED
    finally:
        holder.close()


@pytest.mark.anyio
async def test_probe_goes_through_the_transport_not_the_listener() -> None:
    """A forward whose far side is down is not ready, although its listener accepts."""
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))
    try:
        async with anyio.create_task_group() as tg:
            fwd: Forward = await tg.start(Forward(spec_for(refusing.getsockname()[1]), direct(), QUICK).run)
            async with await anyio.connect_tcp("127.0.0.1", fwd.port):
                pass  # the listener is there...
            await anyio.sleep(0.5)
            assert fwd.state == ForwardState.STARTING and fwd.last_probe is not None and not fwd.last_probe.ok
            fwd.stop()
    finally:
        refusing.close()


class BreakingStream(anyio.abc.ByteStream):
    """Answers a request with a few bytes, then fails as a lost transport does (a helper removed)."""

    def __init__(self) -> None:
        self.requested = anyio.Event()
        self.delivered = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self.delivered:
            await self.requested.wait()  # the client's bytes are all read: nothing unread to force a reset
            self.delivered = True
            return b"partial"
        raise anyio.BrokenResourceError("the exec carrying this connection ended")

    async def send(self, item: bytes) -> None:
        self.requested.set()

    async def send_eof(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class BreakingTransport(DirectTransport):
    """Every stream breaks after its first bytes."""

    name = "breaking"

    async def connect(self, host: str, port: int, first: bytes = b"", *, early: bool = False) -> BreakingStream:  # type: ignore[override]
        return BreakingStream()


@pytest.mark.anyio
async def test_a_stream_that_breaks_mid_way_resets_the_client() -> None:
    """Bytes lost with a broken transport must not look like a complete answer: RST, never a clean EOF."""
    async with anyio.create_task_group() as tg:
        fwd: Forward = await tg.start(Forward(spec_for(9), BreakingTransport(TransportSpec(), QUICK), QUICK).run)
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", fwd.port) as client:
                await client.send(b"request")
                assert await client.receive() == b"partial"
                with pytest.raises(anyio.BrokenResourceError):  # ECONNRESET
                    await client.receive()
        assert fwd.last_error is not None and "broke mid-stream" in fwd.last_error
        fwd.stop()
