"""The SSH path of the relay (tunneld/ssh/wired.py), driven directly through the lab's real sshd.

client <-> [client socket | wired relay | SSH channel] <-> sshd <-> server, where the server is a
listener on this side of the lab's veth (``host_ip``), so sshd's direct-tcpip connection to it
crosses the namespace boundary and the test holds both ends. The relay contract as
tests/engine/test_relay_paths.py states it for the socket paths: half-close both ways, backpressure
both ways, a client's reset, cancellation; plus what only SSH has: the connection dying under a channel.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import anyio.abc
import pytest

from tests.helpers import read_to_eof
from tests.lab.lab import LabInfo
from tests.ssh.test_transport import TIMEOUTS, settings
from tunneld.engine.relay import RelayBroken, Traffic, relay
from tunneld.sockets import RawSocketStream
from tunneld.ssh.client import ChannelStream, SshConnection, open_connection

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


@asynccontextmanager
async def ssh_connection(lab: LabInfo) -> AsyncIterator[SshConnection]:
    conn = await open_connection(settings(lab), TIMEOUTS)
    try:
        yield conn
    finally:
        await conn.aclose()


@asynccontextmanager
async def relayed(lab: LabInfo, conn: SshConnection) -> AsyncIterator[Relayed]:
    listener = (await anyio.create_tcp_listener(local_host=lab.host_ip, local_port=0)).listeners[0]
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener:
        upstream = await conn.open_tcp(lab.host_ip, port)
        assert isinstance(upstream, ChannelStream) and upstream.relay_socket is not None
        with anyio.fail_after(10):
            server = await listener.accept()  # sshd connected to us: the channel is open end to end
    with socket.create_server(("127.0.0.1", 0)) as front:
        client = await anyio.connect_tcp("127.0.0.1", front.getsockname()[1])
        client_sock, _ = front.accept()
    r = Relayed(client, server, client_sock, Traffic(), [], anyio.Event(), anyio.CancelScope())

    async def run() -> None:
        try:
            with r.scope:
                await relay(RawSocketStream(client_sock), upstream, r.traffic)
        except RelayBroken as e:
            r.error.append(e)
        finally:
            r.finished.set()

    async with client, server, anyio.create_task_group() as tg:
        tg.start_soon(run)
        yield r
        with anyio.fail_after(20):
            await r.finished.wait()


async def test_client_half_close_then_reply(lab: LabInfo) -> None:
    request, reply = os.urandom(1 << 20), os.urandom(4 << 20)
    async with ssh_connection(lab) as conn, relayed(lab, conn) as r:
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


async def test_server_half_close_first(lab: LabInfo) -> None:
    banner, request = os.urandom(100_000), os.urandom(2 << 20)
    async with ssh_connection(lab) as conn, relayed(lab, conn) as r:
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
async def test_backpressure_bounds_what_the_relay_takes(lab: LabInfo, direction: str) -> None:
    data = os.urandom(1 << 20) * 48
    async with ssh_connection(lab) as conn, relayed(lab, conn) as r:
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


async def test_client_reset_closes_the_channel_and_blames_the_client(lab: LabInfo) -> None:
    async with ssh_connection(lab) as conn, relayed(lab, conn) as r:
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


async def test_connection_lost_resets_the_client(lab: LabInfo) -> None:
    async with ssh_connection(lab) as conn, relayed(lab, conn) as r:
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


async def test_cancelled_relay_resets_the_client_and_closes_the_channel(lab: LabInfo) -> None:
    async with ssh_connection(lab) as conn, relayed(lab, conn) as r:
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
