"""Our own direct-tcpip channel (tunneld/ssh/channel.py): what opening early adds to the relay contract
(tests/ssh/test_wired.py runs that contract on it), through the lab's real sshd.

- a refusal is a clean EOF for the client and a TransportError naming the target and sshd's reason;
- what the client sends before the server confirms leaves with the confirmation, in order;
- no answer within the open timeout is a refusal too, and a late answer is closed, not leaked;
- the connection dying before the answer resets the client;
- the channel number goes back to asyncssh's table each time;
- reads stop at the server's window, and a CLOSE while they wait still ends the relay (that one against
  ``WindowedServer``, a stand-in: the lab's OpenSSH keeps its window open).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import pytest
from asyncssh.constants import MSG_CHANNEL_CLOSE

from tests.helpers import client_and_accepted, echo_roundtrip, listener_on, read_to_eof, running_forward, stream_echo
from tests.lab.lab import LabInfo
from tests.ssh.proxy import SshdProxy
from tests.ssh.test_transport import TIMEOUTS, settings
from tunneld.config import TransportSpec
from tunneld.engine.relay import RELAY_ENV, RelayBroken, Traffic, relay
from tunneld.errors import TransportError
from tunneld.sockets import RawSocketStream
from tunneld.ssh.channel import EarlyTcp, WiredChannel
from tunneld.ssh.client import SshConnection, open_connection
from tunneld.ssh.transport import SshTransport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

QUIET = dataclasses.replace(TIMEOUTS, probe_interval=60)  # one probe at start: the channels counted are ours


@dataclass
class Outcome:
    error: list[BaseException] = field(default_factory=list)
    finished: anyio.Event = field(default_factory=anyio.Event)


@asynccontextmanager
async def client_relayed(conn: SshConnection, host: str, port: int
                         ) -> AsyncIterator[tuple[anyio.abc.SocketStream, Outcome]]:
    """A client socket whose accepted end is relayed by an EarlyTcp to host:port (as a forward does)."""
    client, accepted = await client_and_accepted()
    out = Outcome()

    async def run() -> None:
        try:
            await relay(RawSocketStream(accepted), EarlyTcp(conn, host, port, lambda: None), Traffic())
        except (RelayBroken, TransportError) as e:
            out.error.append(e)
        finally:
            out.finished.set()

    async with client, anyio.create_task_group() as tg:
        tg.start_soon(run)
        yield client, out
        with anyio.fail_after(20):
            await out.finished.wait()


def closed_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])  # bound, never listening: connections to it are refused


async def test_a_refused_target_is_a_clean_eof_and_a_named_transport_error(lab: LabInfo) -> None:
    port = closed_port(lab.host_ip)
    conn = await open_connection(settings(lab), TIMEOUTS)
    try:
        before = dict(conn.fast._channels)  # type: ignore[union-attr]
        async with client_relayed(conn, lab.host_ip, port) as (client, out):
            await client.send(b"hello?")  # sent before the refusal: dropped, as a refused connect drops it
            with anyio.fail_after(10):
                assert await read_to_eof(client) == b""  # a clean EOF, not a reset
            await client.send_eof()
        assert len(out.error) == 1 and isinstance(out.error[0], TransportError), out.error
        message = str(out.error[0])
        assert f"{lab.host_ip}:{port}" in message and "refused" in message.lower(), message
        assert conn.fast._channels == before  # type: ignore[union-attr]  # the number went back
        assert await stream_echo(await conn.open_tcp("127.0.0.1", lab.echo_port), b"still") == b"still"
    finally:
        await conn.aclose()


async def test_bytes_sent_before_the_answer_leave_with_it_in_order(lab: LabInfo) -> None:
    request, reply = os.urandom(3 << 20), os.urandom(1 << 20)  # more than SEND_HIGH_WATER: reads pause meanwhile
    listener, port = await listener_on(lab.host_ip)
    conn = await open_connection(settings(lab), TIMEOUTS)
    try:
        async with listener, client_relayed(conn, lab.host_ip, port) as (client, out):
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    async def send_all() -> None:
                        await client.send(request)  # at once: the open is not answered yet
                        await client.send_eof()
                    tg.start_soon(send_all)
                    async with await listener.accept() as server:
                        assert await read_to_eof(server) == request
                        await server.send(reply)
                        await server.send_eof()
                        assert await read_to_eof(client) == reply
        assert not out.error
    finally:
        await conn.aclose()


@asynccontextmanager
async def held(lab: LabInfo, tmp_path: Path, open_timeout: float) -> AsyncIterator[tuple[SshdProxy, SshConnection]]:
    proxy = SshdProxy(lab)
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        timeouts = dataclasses.replace(TIMEOUTS, connect=open_timeout)
        conn = await open_connection(settings(lab, host="127.0.0.1", port=proxy.port,
                                              known_hosts=proxy.known_hosts(tmp_path)), timeouts)
        try:
            yield proxy, conn
        finally:
            proxy.go.set()
            await conn.aclose()
            tg.cancel_scope.cancel()


async def test_no_answer_in_time_is_a_refusal_and_a_late_answer_is_closed(lab: LabInfo, tmp_path: Path) -> None:
    listener, port = await listener_on(lab.host_ip)
    async with listener, held(lab, tmp_path, open_timeout=0.5) as (proxy, conn):
        before = dict(conn.fast._channels)  # type: ignore[union-attr]
        proxy.go = anyio.Event()  # from now on the server's packets wait: its confirmation with them
        async with client_relayed(conn, lab.host_ip, port) as (client, out):
            with anyio.fail_after(10):
                assert await read_to_eof(client) == b""  # given up on: a clean EOF
                async with await listener.accept():  # sshd did connect; its confirmation is late
                    proxy.go.set()  # and arrives while the refused client may still be sending
                    while conn.fast._channels != before:  # type: ignore[union-attr]  # our CLOSE, its CLOSE
                        await anyio.sleep(0.01)
            await client.send_eof()
        assert out.error and "no answer within 0.5s" in str(out.error[0]), out.error
        assert await stream_echo(await conn.open_tcp("127.0.0.1", lab.echo_port), b"fine") == b"fine"


async def test_the_connection_dying_before_the_answer_resets_the_client(lab: LabInfo, tmp_path: Path) -> None:
    listener, port = await listener_on(lab.host_ip)
    async with listener, held(lab, tmp_path, open_timeout=30) as (proxy, conn):
        proxy.go = anyio.Event()
        async with client_relayed(conn, lab.host_ip, port) as (client, out):
            with anyio.fail_after(10):
                async with await listener.accept():  # the open reached sshd; the answer is held
                    with socket.socket(fileno=os.dup(conn._conn.get_extra_info("socket").fileno())) as ssh_sock:
                        ssh_sock.shutdown(socket.SHUT_RDWR)
                    with pytest.raises(anyio.BrokenResourceError):  # a reset, not a clean end
                        await client.receive()
        assert out.error and isinstance(out.error[0], RelayBroken) and not out.error[0].by_client, out.error


async def test_keepalives_wait_while_the_server_talks_and_find_it_silent(lab: LabInfo, tmp_path: Path) -> None:
    """The keepalive timer (re-armed lazily by tunneld/ssh/wire.py): while the server keeps sending, no
    keepalive goes out; once it falls silent, keepalive_count_max unanswered ones end the connection."""
    proxy = SshdProxy(lab)
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        conn = await open_connection(settings(lab, host="127.0.0.1", port=proxy.port, keepalive_interval=0.2,
                                              keepalive_count_max=2, known_hosts=proxy.known_hosts(tmp_path)),
                                     TIMEOUTS)
        try:
            fast = conn.fast
            assert fast is not None
            stream = await conn.open_tcp("127.0.0.1", lab.echo_port)
            await anyio.sleep(0.3)  # whatever the set-up left to say has been said
            sent = fast._send_seq
            for _ in range(20):  # 1 s of round trips, five keepalive intervals: each answer puts it off
                await stream.send(b"ping")
                with anyio.fail_after(5):
                    assert await stream.receive() == b"ping"
                await anyio.sleep(0.05)
            assert fast._send_seq - sent == 20  # our 20 data packets and nothing else: no keepalive
            proxy.go = anyio.Event()  # the server falls silent (its bytes are held)
            started = anyio.current_time()
            with anyio.fail_after(5):
                reason = await conn.wait_closed()
            assert "keepalive" in reason, reason
            assert 0.4 <= anyio.current_time() - started < 2.0  # 2 unanswered after 0.2 s each, then the third
        finally:
            proxy.go.set()
            await conn.aclose()
            tg.cancel_scope.cancel()


async def test_a_forward_over_ssh_counts_a_refusal_and_closes_its_client_cleanly(lab: LabInfo) -> None:
    """Through a real Forward (which opens early): a target the server cannot reach is a clean EOF for
    the client, an error counted and named on the forward; the next connection to a live target works."""
    async with SshTransport(TransportSpec(kind="ssh", ssh=settings(lab)), TIMEOUTS) as transport, \
            running_forward(transport, closed_port("127.0.0.1"), timeouts=TIMEOUTS, wait_ready=False) as fwd:
        # (a port number nothing listens on here; inside the lab namespace, where sshd connects, neither)
        async with await anyio.connect_tcp("127.0.0.1", fwd.port) as client:
            await client.send(b"anyone?")
            with anyio.fail_after(10):
                assert await read_to_eof(client) == b""  # EOF, not a reset
        with anyio.fail_after(5):
            while not fwd.stats.errors:
                await anyio.sleep(0.01)
        assert "could not connect to 127.0.0.1:" in (fwd.last_error or "") and "via ssh" in (fwd.last_error or "")
        assert "refused" in (fwd.last_error or "").lower(), fwd.last_error
    async with SshTransport(TransportSpec(kind="ssh", ssh=settings(lab)), TIMEOUTS) as transport, \
            running_forward(transport, lab.echo_port, timeouts=QUIET) as fwd:
        opened = transport.channels_opened
        data = os.urandom(1 << 20)
        assert await echo_roundtrip(fwd.port, data) == data
        assert transport.channels_opened == opened + 1  # counted on the early path too


async def test_closing_the_connection_resets_wired_clients(lab: LabInfo) -> None:
    """asyncssh's close() (``SshConnection.aclose``, a transport shutting down) closes every channel in
    its table, ours included: the wired client is reset, and the relay names the far side."""
    listener, port = await listener_on(lab.host_ip)
    conn = await open_connection(settings(lab), TIMEOUTS)
    async with listener, client_relayed(conn, lab.host_ip, port) as (client, out):
        with anyio.fail_after(10):
            async with await listener.accept() as server:
                await server.send(b"up")
                assert await client.receive() == b"up"
                await conn.aclose()
                with pytest.raises(anyio.BrokenResourceError):
                    while True:
                        await client.receive()
    assert out.error and isinstance(out.error[0], RelayBroken) and not out.error[0].by_client, out.error


async def test_the_stream_path_still_serves_a_forward(lab: LabInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    """KCI_TUNNELD_RELAY=streams: the early connection is opened through asyncssh's channel on first use
    and relayed by the pump tasks, byte-exact, half-close included."""
    monkeypatch.setenv(RELAY_ENV, "streams")
    async with SshTransport(TransportSpec(kind="ssh", ssh=settings(lab)), TIMEOUTS) as transport, \
            running_forward(transport, lab.echo_port, timeouts=QUIET) as fwd:
        opened = transport.channels_opened
        data = os.urandom(1 << 20)
        assert await echo_roundtrip(fwd.port, data) == data
        assert transport.channels_opened == opened + 1


@pytest.mark.parametrize("late", ["refusal", "connection lost"])
async def test_an_answer_before_the_socket_is_wired_still_reaches_the_client(lab: LabInfo, late: str) -> None:
    """The relay wires the client's socket right after sending CHANNEL_OPEN, so the answer finds it
    wired; should the wiring come later, the refusal (a clean EOF) or the failure (a reset) is applied
    to the socket when it is."""
    conn = await open_connection(settings(lab), TIMEOUTS)
    try:
        assert conn.fast is not None
        client, accepted = await client_and_accepted()
        chan = WiredChannel(conn.fast, "127.0.0.1", closed_port("127.0.0.1"), Traffic(), "the target", 5.0)
        chan.open()
        with anyio.fail_after(10):
            if late == "refusal":
                while chan.refusal is None:  # the server's answer, taken before the socket is ours
                    await anyio.sleep(0.01)
            else:
                await conn.aclose()
                assert chan.error is not None
            await chan.wire(accepted)
            async with client:
                if late == "refusal":
                    assert await read_to_eof(client) == b""  # EOF, not a reset
                    await client.send_eof()
                    with pytest.raises(TransportError, match=r"could not connect to the target: .*refused"):
                        await chan.wait()
                else:
                    with pytest.raises(anyio.BrokenResourceError):
                        await client.receive()
                    with pytest.raises(RelayBroken):
                        await chan.wait()
    finally:
        await conn.aclose()


async def test_reads_stop_at_the_server_s_window_and_go_on_when_it_opens(lab: LabInfo) -> None:
    """The client's bytes are read no faster than the server's window takes them (the rest waits in the
    socket, as with ``ssh -L``): with 1000 bytes of window left, 1000 bytes are read and reads pause;
    a window update lets the rest through, in order."""
    data = os.urandom(300_000)  # less than sshd's real window: shrinking our view of it is allowed
    listener, port = await listener_on(lab.host_ip)
    conn = await open_connection(settings(lab), TIMEOUTS)
    try:
        async with listener, client_relayed(conn, lab.host_ip, port) as (client, out):
            with anyio.fail_after(20):
                await client.send(b"open")
                async with await listener.accept() as server:
                    assert await server.receive() == b"open"
                    [chan] = [c for c in conn.fast._channels.values()  # type: ignore[union-attr]
                              if isinstance(c, WiredChannel)]
                    real, chan.send_window = chan.send_window, 1000
                    await client.send(data)
                    got = bytearray()
                    while len(got) < 1000:
                        got += await server.receive()
                    await anyio.sleep(0.2)
                    assert chan.reads_paused and chan.send_window == 0 and not chan.pending
                    assert chan.traffic.up == 4 + 1000  # read no further than the window
                    chan.send_window = real - 4 - 1000  # the server's WINDOW_ADJUST, as take_packet applies it
                    chan._push()
                    assert not chan.reads_paused
                    await client.send_eof()
                    got += await read_to_eof(server)
                    assert got == data
                    await server.send_eof()
                assert await read_to_eof(client) == b""
        assert not out.error
    finally:
        await conn.aclose()



class WindowedServer:
    """A stand-in for the SSH connection under our channel (what the channel calls on it), for a server
    that holds to its window and closes the channel in the middle of an upload. The lab's OpenSSH does
    not: it takes what its target does not read and keeps opening the window (tests/ssh/test_wired.py,
    backpressure up), so its window does not stay shut. Keeps what the channel sends."""

    def __init__(self) -> None:
        self._channels: dict[int, object] = {}
        self.read_buffer = memoryview(bytearray(256 * 1024))
        self.data = bytearray()  # the client's bytes sent as data packets
        self.packets: list[int] = []  # the other packets' types

    def add_channel(self, chan: object) -> int:
        self._channels[1] = chan
        return 1

    def remove_channel(self, number: int) -> None:
        self._channels.pop(number, None)

    def _update_recv_pktlen(self, size: int) -> None:
        pass

    def send_packet(self, kind: int, *args: bytes) -> None:
        self.packets.append(kind)

    def corked(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def send_read(self, send_chan: int, nbytes: int, window: int, pktsize: int) -> int:
        take = min(nbytes, window)
        self.data += self.read_buffer[:take]
        return take

    def send_data(self, send_chan: int, data: bytes | memoryview, window: int, pktsize: int) -> int:
        take = min(len(data), window)
        self.data += data[:take]
        return take


async def test_a_close_while_reads_wait_for_the_window_ends_the_relay() -> None:
    """The server closes the channel while the client's reads are paused for its window: reads resume
    (nothing more can be sent), so the relay ends instead of holding the client's socket open for ever.
    The client's bytes still waiting are lost: the client gets the EOF, then a reset, and the relay a
    RelayBroken that is not the client's fault, as for any bytes sent after a CLOSE."""
    server = WindowedServer()
    client, accepted = await client_and_accepted()
    chan = WiredChannel(server, "127.0.0.1", 1, Traffic(), "127.0.0.1:1 via a stand-in", 5.0)  # type: ignore[arg-type]
    chan.open()
    chan.process_open_confirmation(7, 1000, 32768, None)  # a window of 1000 bytes
    errors: list[BaseException] = []

    async def run() -> None:
        await chan.wire(accepted)
        try:
            await chan.wait()
        except RelayBroken as e:
            errors.append(e)

    with anyio.fail_after(10):  # the relay's end included: without it, it never came
        async with client, anyio.create_task_group() as tg:
            tg.start_soon(run)
            await client.send(os.urandom(300_000))
            while len(server.data) < 1000:
                await anyio.sleep(0.01)
            await anyio.sleep(0.1)
            assert chan.reads_paused and chan.traffic.up == 1000
            assert chan.take_packet(MSG_CHANNEL_CLOSE, bytes([4, MSG_CHANNEL_CLOSE]) + (1).to_bytes(4, "big"), 6)
            assert await read_to_eof(client) == b""
    [error] = errors
    assert not error.by_client and "channel closed" in str(error), error
    assert MSG_CHANNEL_CLOSE in server.packets and not server._channels  # ours sent, the number given back
