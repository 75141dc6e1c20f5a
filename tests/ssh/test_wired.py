"""The SSH paths of the relay, driven directly through the lab's real sshd: asyncssh's channel wired
to the client socket (tunneld/ssh/wired.py, "stream") and our own channel, opened early
(tunneld/ssh/channel.py, "channel": what a forward uses).

client <-> [client socket | wired relay | SSH channel] <-> sshd <-> server, where the server is a
listener on this side of the lab's veth (``host_ip``), so sshd's direct-tcpip connection to it
crosses the namespace boundary and the test holds both ends. The relay contract as
tests/engine/test_relay_paths.py states it for the socket paths: half-close both ways, backpressure
both ways, a client's reset, cancellation; plus what only SSH has: the connection dying under a channel,
a key exchange in the middle of a stream, a corrupted packet. Each runs with both ciphers the lanes of
tunneld/ssh/wire.py seal and open (chacha20-poly1305 and AES-GCM), which carry the wired path's data.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import pytest

from tests.helpers import client_and_accepted, listener_on, read_to_eof, stream_echo
from tests.lab.lab import LabInfo
from tests.ssh.proxy import SshdProxy
from tests.ssh.test_asyncssh_seams import CHACHA, GCM, cipher_config
from tests.ssh.test_transport import TIMEOUTS, settings
from tunneld.engine.relay import RelayBroken, Traffic, relay
from tunneld.errors import TransportError
from tunneld.sockets import RawSocketStream
from tunneld.ssh.channel import EarlyTcp
from tunneld.ssh.client import ChannelStream, SshConnection, open_connection
from tunneld.ssh.wire import FastConnection

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]


@dataclass
class Relayed:
    client: anyio.abc.SocketStream
    server: anyio.abc.SocketStream
    client_sock: socket.socket
    traffic: Traffic
    error: list[BaseException]
    finished: anyio.Event
    scope: anyio.CancelScope


@pytest.fixture(params=[CHACHA, GCM])
def cipher(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def ssh_connection(lab: LabInfo, cipher: str, **changes: object) -> AsyncIterator[SshConnection]:
    with tempfile.TemporaryDirectory() as d:
        conn = await open_connection(settings(lab, config_file=cipher_config(Path(d), lab, cipher), **changes),
                                     TIMEOUTS)
    try:
        assert conn.describe()["cipher"] == cipher
        yield conn
    finally:
        await conn.aclose()


@pytest.fixture(params=["stream", "channel"])
def path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def relayed(lab: LabInfo, conn: SshConnection, path: str) -> AsyncIterator[Relayed]:
    """A client socket relayed to a server on this side of the veth, through ``conn``: asyncssh's channel
    opened first ("stream"), or ours, opened by the relay itself ("channel")."""
    client, client_sock = await client_and_accepted()
    r = Relayed(client, None, client_sock, Traffic(), [], anyio.Event(), anyio.CancelScope())  # type: ignore[arg-type]
    listener, port = await listener_on(lab.host_ip)
    upstream: anyio.abc.ByteStream
    if path == "stream":
        upstream = await conn.open_tcp(lab.host_ip, port)
        assert isinstance(upstream, ChannelStream) and upstream.relay_socket is not None
    else:
        upstream = EarlyTcp(conn, lab.host_ip, port, lambda: None)
        assert upstream.relay_socket is not None

    async def run() -> None:
        try:
            with r.scope:
                await relay(RawSocketStream(client_sock), upstream, r.traffic)
        except (RelayBroken, TransportError) as e:
            r.error.append(e)
        finally:
            r.finished.set()

    async with client, anyio.create_task_group() as tg:
        tg.start_soon(run)
        async with listener:
            with anyio.fail_after(10):
                r.server = await listener.accept()  # sshd connected to us: the channel is open end to end
        async with r.server:
            yield r
            with anyio.fail_after(20):
                await r.finished.wait()


async def test_client_half_close_then_reply(lab: LabInfo, cipher: str, path: str) -> None:
    request, reply = os.urandom(1 << 20), os.urandom(4 << 20)
    async with ssh_connection(lab, cipher) as conn, relayed(lab, conn, path) as r:
        with anyio.fail_after(30):
            await r.client.send(request)
            await r.client.send_eof()
            assert await read_to_eof(r.server) == request  # the EOF came through...
            await r.server.send(reply)  # ...and the other direction still flows
            await r.server.send_eof()
            assert await read_to_eof(r.client) == reply
            await r.finished.wait()
    assert not r.error
    assert (r.traffic.up, r.traffic.down) == (len(request), len(reply))
    assert r.client_sock.fileno() == -1  # closed once both directions were done


async def test_server_half_close_first(lab: LabInfo, cipher: str, path: str) -> None:
    banner, request = os.urandom(100_000), os.urandom(2 << 20)
    async with ssh_connection(lab, cipher) as conn, relayed(lab, conn, path) as r:
        with anyio.fail_after(30):
            await r.server.send(banner)
            await r.server.send_eof()
            assert await read_to_eof(r.client) == banner
            assert not r.finished.is_set()  # one direction done: the connection stays up
            await r.client.send(request)
            await r.client.send_eof()
            assert await read_to_eof(r.server) == request
            await r.finished.wait()
    assert not r.error


@pytest.mark.parametrize("direction", ["up", "down"])
async def test_backpressure_bounds_what_the_relay_takes(lab: LabInfo, direction: str, cipher: str, path: str) -> None:
    data = os.urandom(1 << 20) * 48
    async with ssh_connection(lab, cipher) as conn, relayed(lab, conn, path) as r:
        writer, reader = (r.client, r.server) if direction == "up" else (r.server, r.client)

        async def write() -> None:
            await writer.send(data)
            await writer.send_eof()

        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            await anyio.sleep(1.0)  # the buffers and the SSH window fill up
            cpu = time.process_time()
            await anyio.sleep(0.5)
            # Stalled, the relay waits for callbacks: it must not spin on a full buffer.
            assert time.process_time() - cpu < 0.25
            if direction == "down":
                # Nobody reads: what the relay took is bounded by the client socket's kernel buffers
                # and its write buffer; the rest waits in asyncssh, which stops window updates.
                assert 0 < r.traffic.down < 24 << 20, r.traffic.down
            # Up, sshd (9.2) itself takes what its target does not read and keeps opening the window
            # (measured: all 48 MiB), so there the bound is sshd's memory, not ours.
            with anyio.fail_after(60):
                got = await read_to_eof(reader)
        assert got == data
        other = r.server if direction == "up" else r.client
        await other.send_eof()
        with anyio.fail_after(10):
            assert await read_to_eof(writer) == b""
    assert not r.error


async def test_client_reset_closes_the_channel_and_blames_the_client(lab: LabInfo, cipher: str, path: str) -> None:
    async with ssh_connection(lab, cipher) as conn, relayed(lab, conn, path) as r:
        await r.client.send(b"ping")
        with anyio.fail_after(10):
            assert await r.server.receive() == b"ping"
        raw = r.client.extra(anyio.abc.SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await r.client.aclose()  # with SO_LINGER 0: a reset, not a FIN
        with anyio.fail_after(10):
            # SSH has no reset: the far side sees the channel end (sshd closes its socket).
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                while True:
                    await r.server.receive()
            await r.finished.wait()
        assert not conn.closed  # the one SSH connection is unharmed
    assert r.error and isinstance(r.error[0], RelayBroken) and r.error[0].by_client, r.error
    assert r.client_sock.fileno() == -1


async def test_connection_lost_resets_the_client(lab: LabInfo, cipher: str, path: str) -> None:
    async with ssh_connection(lab, cipher) as conn, relayed(lab, conn, path) as r:
        await r.server.send(b"pong")
        with anyio.fail_after(10):
            assert await r.client.receive() == b"pong"
        # The link dies (as when sshd is killed or a NAT forgets us): the channel dies with it.
        # (uvloop's transport socket refuses shutdown(): a duplicate of its descriptor does it.)
        with socket.socket(fileno=os.dup(conn._conn.get_extra_info("socket").fileno())) as ssh_sock:
            ssh_sock.shutdown(socket.SHUT_RDWR)
        with anyio.fail_after(10):
            with pytest.raises(anyio.BrokenResourceError):  # a reset: a FIN would read as a clean end
                while True:
                    await r.client.receive()
            await r.finished.wait()
    assert r.error and isinstance(r.error[0], RelayBroken) and not r.error[0].by_client, r.error


async def test_cancelled_relay_resets_the_client_and_closes_the_channel(lab: LabInfo, cipher: str, path: str) -> None:
    async with ssh_connection(lab, cipher) as conn, relayed(lab, conn, path) as r:
        await r.client.send(b"ping")
        with anyio.fail_after(10):
            assert await r.server.receive() == b"ping"
        r.scope.cancel()
        with anyio.fail_after(10):
            await r.finished.wait()
            with pytest.raises(anyio.BrokenResourceError):
                while True:
                    await r.client.receive()
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                while True:
                    await r.server.receive()
        assert not conn.closed
    assert r.client_sock.fileno() == -1


async def _both_ways(r: Relayed, up: bytes, down: bytes) -> tuple[bytes, bytes]:
    """Send ``up`` from the client and ``down`` from the server at once, each then half-closing; what
    each end read to EOF. A round trip first: from then on the channel is wired to the client socket
    (what arrives before that waits in the channel's stream, and reaches the client from there)."""
    got: dict[str, bytes] = {}
    await r.client.send(b"ping")
    assert await r.server.receive() == b"ping"
    await r.server.send(b"pong")
    assert await r.client.receive() == b"pong"

    async def send(stream: anyio.abc.SocketStream, data: bytes) -> None:
        await stream.send(data)
        await stream.send_eof()

    async def read(name: str, stream: anyio.abc.SocketStream) -> None:
        got[name] = await read_to_eof(stream)

    async with anyio.create_task_group() as tg:
        tg.start_soon(send, r.client, up)
        tg.start_soon(send, r.server, down)
        tg.start_soon(read, "server", r.server)
        tg.start_soon(read, "client", r.client)
    return got["server"], got["client"]


async def test_the_lanes_carry_the_wired_path(lab: LabInfo, cipher: str, path: str) -> None:
    """The client's bytes go out sealed by the send lane, the far side's come in opened by the receive
    lane; 12 MiB down is more than our 8 MiB window, so the lane's window updates are needed too."""
    up, down = os.urandom(12 << 20), os.urandom(12 << 20)
    async with ssh_connection(lab, cipher) as conn, relayed(lab, conn, path) as r:
        fast = conn._conn
        assert isinstance(fast, FastConnection)
        sent, received = fast.lane_sent, fast.lane_received
        with anyio.fail_after(60):
            assert await _both_ways(r, up, down) == (up, down)
            await r.finished.wait()
        assert fast.lane_sent - sent >= len(up) // (32 * 1024)  # sshd's maximum packet: 32 KiB
        assert fast.lane_received - received > 0
    assert not r.error
    assert (r.traffic.up, r.traffic.down) == (len(up) + 4, len(down) + 4)  # and the ping, the pong


async def test_a_key_exchange_in_the_middle_of_the_stream(lab: LabInfo, cipher: str, path: str) -> None:
    """Keys change while data flows both ways: the lanes step aside while asyncssh holds packets back,
    take up the new keys' ciphers after it, and not a byte is lost, doubled or reordered."""
    up, down = os.urandom(16 << 20), os.urandom(16 << 20)
    async with ssh_connection(lab, cipher) as conn, relayed(lab, conn, path) as r:
        fast = conn._conn
        assert isinstance(fast, FastConnection)
        before = fast._send_encryption
        limit = fast._rekey_bytes
        fast._rekey_bytes = fast._rekey_bytes_sent + (4 << 20)  # a key exchange after 4 MiB more

        with anyio.fail_after(60):
            assert await _both_ways(r, up, down) == (up, down)
            await r.finished.wait()
        fast._rekey_bytes = limit
        assert fast._send_encryption is not before  # the keys did change
        sent = fast.lane_sent
        data = os.urandom(1 << 20)
        assert await stream_echo(await conn.open_tcp("127.0.0.1", lab.echo_port), data) == data
        assert fast.lane_sent > sent  # and the lane seals with the new ones
    assert not r.error


async def test_a_corrupted_packet_ends_the_connection_not_the_daemon(lab: LabInfo, cipher: str, path: str,
                                                                    tmp_path: Path) -> None:
    """A data packet whose tag does not match (one bit flipped on the way) is handed to asyncssh, which
    disconnects with its MAC error; the wired client is reset, and nothing corrupt reaches it.

    The bit is the last of what sshd wrote at once, which ends a packet: its tag. (Should TCP cut
    sshd's write elsewhere and the bit land in a chacha20 length, asyncssh disconnects for the length.)
    """
    proxy = SshdProxy(lab)
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        async with ssh_connection(lab, cipher, host="127.0.0.1", port=proxy.port,
                                  known_hosts=proxy.known_hosts(tmp_path)) as conn, \
                relayed(lab, conn, path) as r:
            await r.server.send(b"fine")
            with anyio.fail_after(10):
                assert await r.client.receive() == b"fine"
            proxy.corrupt_next = True
            sent = os.urandom(200_000)
            await r.server.send(sent)
            got = bytearray()
            with anyio.fail_after(10):
                with pytest.raises(anyio.BrokenResourceError):  # a reset, not a clean end
                    while True:
                        got += await r.client.receive()
                await r.finished.wait()
            assert len(got) < len(sent) and sent.startswith(got)  # what came before the bad packet, intact
            assert conn.closed
        tg.cancel_scope.cancel()
    assert r.error and ("MAC" in str(r.error[0]) or "packet size" in str(r.error[0])), r.error
