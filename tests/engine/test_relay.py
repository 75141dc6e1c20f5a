"""The relay's contract on real sockets, on both paths (Protocol fast path, stream pumps) and both loops."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import anyio
import pytest

from tests.helpers import FAST, echo_roundtrip, running_forward
from tests.servers import EchoServer, refusing_socket
from tests.standins.transports import GatedTransport, StreamOnlyTransport
from tunneld.config import TransportSpec
from tunneld.engine.forward import ForwardState
from tunneld.transports import Transport
from tunneld.transports.direct import DirectTransport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture(params=["fast", "streams"])
def transport(request: pytest.FixtureRequest) -> Transport:
    if request.param == "fast":
        return DirectTransport(TransportSpec(), FAST)
    return StreamOnlyTransport(TransportSpec(), FAST)


async def test_echo_4mib_half_close(transport: Transport, echo_server: EchoServer) -> None:
    data = os.urandom(4 * 1024 * 1024)
    async with running_forward(transport, echo_server.port) as fwd:
        got = await echo_roundtrip(fwd.port, data)
        assert got == data
        with anyio.fail_after(5):
            while fwd.stats.active:
                await anyio.sleep(0.01)
        assert fwd.stats.traffic.up == len(data) and fwd.stats.traffic.down == len(data)
        assert fwd.stats.errors == 0


class ReplyAfterEof:
    """Reads the whole request until EOF, then sends a 1 MiB reply and closes: only a relay that
    keeps the connection open after the client's half-close delivers the reply."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.reply = os.urandom(1024 * 1024)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._reply, args=(conn,), daemon=True).start()

    def _reply(self, conn: socket.socket) -> None:
        with conn:
            try:
                while conn.recv(65536):
                    pass
                conn.sendall(self.reply)
            except OSError:
                pass  # a readiness probe that hung up early


async def test_half_close_client_still_gets_whole_reply(transport: Transport) -> None:
    server = ReplyAfterEof()
    try:
        async with running_forward(transport, server.port, wait_ready=False) as fwd:
            assert await echo_roundtrip(fwd.port, b"request") == server.reply
    finally:
        server.sock.close()


async def test_early_bytes_and_eof_before_upstream_open(echo_server: EchoServer) -> None:
    gate = anyio.Event()
    transport = GatedTransport(gate)
    gate.set()  # let the readiness probe through, then close the gate for the client
    async with running_forward(transport, echo_server.port) as fwd:
        transport.gate = anyio.Event()
        data = os.urandom(300_000)
        async with await anyio.connect_tcp("127.0.0.1", fwd.port) as client:
            await client.send(data)
            await client.send_eof()  # all of it, and the EOF, before the upstream exists
            with anyio.fail_after(5):
                while transport.connects < 2:
                    await anyio.sleep(0.01)
            transport.gate.set()
            got = bytearray()
            with anyio.fail_after(10):
                while True:
                    try:
                        got.extend(await client.receive())
                    except anyio.EndOfStream:
                        break
        assert bytes(got) == data


async def test_upstream_refused_gives_client_clean_close(transport: Transport) -> None:
    refusing = refusing_socket()
    try:
        async with running_forward(transport, refusing.getsockname()[1], wait_ready=False) as fwd:
            with anyio.fail_after(5):
                while fwd.last_probe is None:
                    await anyio.sleep(0.01)
            assert fwd.state == ForwardState.STARTING
            assert "could not connect" in (fwd.last_error or "")
            async with await anyio.connect_tcp("127.0.0.1", fwd.port) as client:
                await client.send(b"hello")
                with anyio.fail_after(5), pytest.raises(anyio.EndOfStream):
                    await client.receive()  # EOF, not a reset
            assert fwd.stats.errors >= 1
    finally:
        refusing.close()


class Sink:
    """Accepts connections and reads nothing until ``read_all``; probes' connections come and go,
    ``relayed()`` finds the one a client's bytes arrived on."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def relayed(self, timeout: float = 5.0) -> socket.socket:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for conn in list(self.conns):
                try:
                    if conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                        return conn
                except (BlockingIOError, OSError):
                    pass
            time.sleep(0.01)
        raise TimeoutError("no relayed connection reached the sink")

    def read_all(self) -> bytes:
        conn = self.relayed()
        conn.settimeout(30)
        out = bytearray()
        while data := conn.recv(1 << 20):
            out.extend(data)
        return bytes(out)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


async def test_backpressure_bounds_memory(transport: Transport) -> None:
    sink = Sink()
    total = 64 * 1024 * 1024
    data = os.urandom(1024 * 1024) * 64
    try:
        async with running_forward(transport, sink.port, wait_ready=False) as fwd:
            async with await anyio.connect_tcp("127.0.0.1", fwd.port) as client:

                async def writer() -> None:
                    await client.send(data)
                    await client.send_eof()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(writer)
                    await anyio.sleep(1.0)
                    # The sink reads nothing: the relay must stop reading after a bounded amount
                    # (kernel buffers on both legs plus the relay's own write-buffer high-water mark).
                    assert fwd.stats.traffic.up < 24 * 1024 * 1024, fwd.stats.traffic.up
                    got = await anyio.to_thread.run_sync(sink.read_all)
                assert len(got) == total and got == data
    finally:
        sink.close()


async def test_a_client_resetting_its_own_connection_is_not_a_forward_error(transport: Transport) -> None:
    """A client that aborts (RST) ends the connection on both legs, but the forward did nothing
    wrong: the error counter and last_error stay for the far side's failures."""
    sink = Sink()
    try:
        async with running_forward(transport, sink.port, wait_ready=False) as fwd:
            client = await anyio.connect_tcp("127.0.0.1", fwd.port)
            await client.send(b"ping")
            conn = await anyio.to_thread.run_sync(sink.relayed)
            raw = client.extra(anyio.abc.SocketAttribute.raw_socket)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await client.aclose()
            conn.settimeout(5)

            def reset() -> bool:
                try:
                    while conn.recv(65536):
                        pass
                except ConnectionResetError:
                    return True
                return False

            # The far leg ends too; between sockets it is aborted (RST), not finished. An opaque
            # stream (SSH channel, Docker exec) closes as its transport closes it.
            assert await anyio.to_thread.run_sync(reset) or isinstance(transport, StreamOnlyTransport)
            with anyio.fail_after(5):
                while fwd.stats.active:
                    await anyio.sleep(0.01)
            assert fwd.stats.errors == 0 and "mid-stream" not in (fwd.last_error or ""), fwd.last_error
    finally:
        sink.close()


async def test_cancellation_closes_both_sides(transport: Transport) -> None:
    sink = Sink()
    try:
        async with anyio.create_task_group() as tg:
            async with running_forward(transport, sink.port, wait_ready=False) as fwd:
                client = await anyio.connect_tcp("127.0.0.1", fwd.port)
                await client.send(b"x" * 1000)
                with anyio.fail_after(5):
                    while fwd.stats.traffic.up < 1000:
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
        # The forward's task group was cancelled with the relay mid-stream: both sockets closed.
        with anyio.fail_after(5):
            try:
                assert await client.receive() == b""
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
        await client.aclose()
        assert len(await anyio.to_thread.run_sync(sink.read_all)) == 1000  # then EOF
    finally:
        sink.close()


async def test_reset_on_one_side_aborts_the_other(transport: Transport) -> None:
    sink = Sink()
    try:
        async with running_forward(transport, sink.port, wait_ready=False) as fwd:
            async with await anyio.connect_tcp("127.0.0.1", fwd.port) as client:
                await client.send(b"ping")
                conn = await anyio.to_thread.run_sync(sink.relayed)
                # SO_LINGER 0: close sends RST.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                with anyio.fail_after(5):
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        while True:
                            await client.receive()
            with anyio.fail_after(5):
                while fwd.stats.active:
                    await anyio.sleep(0.01)
            assert fwd.stats.errors == 1
    finally:
        sink.close()
