"""Each socket relay path on its own (splice, Protocol), on real loopback sockets, both loops.

tests/engine/test_relay.py proves the contract through a forward, on whichever path ``relay()`` picks;
here every path is driven directly, so a path that ``relay()`` does not pick on this machine is
still proven: half-close both ways, backpressure both ways, resets, cancellation, and (splice)
that idle connections hold no pipes. The direct path's connect (no wait when the handshake is
already done, a deadline when it is not) is here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from tests.helpers import read_to_eof
from tunneld.engine.relay import RelayBroken, Traffic
from tunneld.engine.relay.common import WiredClient
from tunneld.engine.relay.generic import _relay_streams as relay_byte_streams
from tunneld.engine.relay.protocols import _relay_sockets
from tunneld.engine.relay.splice import PIPES_KEPT, _relay_splice
from tunneld.sockets import RawSocketStream, connect_tcp

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

Path = Callable[[socket.socket, socket.socket, Traffic], Awaitable[None]]
async def _relay_streams(client: socket.socket, upstream: socket.socket, traffic: Traffic) -> None:
    """The path for transports that are not sockets (SSH channels, Docker exec streams), on sockets."""
    await relay_byte_streams(RawSocketStream(client), RawSocketStream(upstream), traffic)


PATHS: dict[str, Path] = {"protocol": _relay_sockets, "streams": _relay_streams}
if hasattr(os, "splice"):
    PATHS["splice"] = _relay_splice


@pytest.fixture(params=sorted(PATHS))
def path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Relayed:
    """client <-> [client_sock | relay | upstream_sock] <-> server, all real TCP on 127.0.0.1."""

    client: anyio.abc.SocketStream
    server: anyio.abc.SocketStream
    client_sock: socket.socket
    upstream_sock: socket.socket
    traffic: Traffic
    error: list[BaseException]
    finished: anyio.Event


async def _accepted_pair() -> tuple[anyio.abc.SocketStream, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        app = await anyio.connect_tcp("127.0.0.1", listener.getsockname()[1])
        sock, _ = listener.accept()
    return app, sock


@asynccontextmanager
async def relayed(path: str) -> AsyncIterator[Relayed]:
    client, client_sock = await _accepted_pair()
    server, upstream_sock = await _accepted_pair()
    r = Relayed(client, server, client_sock, upstream_sock, Traffic(), [], anyio.Event())

    async def run() -> None:
        try:
            # RawSocketStream makes the sockets non-blocking with TCP_NODELAY, as the daemon's are.
            await PATHS[path](RawSocketStream(client_sock).detach(), RawSocketStream(upstream_sock).detach(),
                              r.traffic)
        except RelayBroken as e:
            r.error.append(e)
        finally:
            r.finished.set()

    async with client, server, anyio.create_task_group() as tg:
        tg.start_soon(run)
        yield r
        with anyio.fail_after(10):
            await r.finished.wait()


async def test_client_half_close_then_reply(path: str) -> None:
    request, reply = os.urandom(1 << 20), os.urandom(3 << 20)
    async with relayed(path) as r:
        with anyio.fail_after(20):
            await r.client.send(request)
            await r.client.send_eof()
            assert await read_to_eof(r.server) == request  # the EOF came through...
            await r.server.send(reply)  # ...and the other direction still flows
            await r.server.send_eof()
            assert await read_to_eof(r.client) == reply
            await r.finished.wait()
    assert not r.error
    assert (r.traffic.up, r.traffic.down) == (len(request), len(reply))
    assert r.client_sock.fileno() == -1 and r.upstream_sock.fileno() == -1  # closed once both were done


async def test_server_half_close_first(path: str) -> None:
    banner, request = os.urandom(100_000), os.urandom(2 << 20)
    async with relayed(path) as r:
        with anyio.fail_after(20):
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
async def test_backpressure_bounds_what_the_relay_takes(path: str, direction: str) -> None:
    total = 64 << 20
    data = os.urandom(1 << 20) * 64
    async with relayed(path) as r:
        writer, reader = (r.client, r.server) if direction == "up" else (r.server, r.client)

        async def write() -> None:
            await writer.send(data)
            await writer.send_eof()

        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            await anyio.sleep(0.5)  # the buffers fill up
            cpu = time.process_time()
            await anyio.sleep(0.5)
            # Stalled, the relay waits for the loop to call it back; it must not spin on a full buffer.
            assert time.process_time() - cpu < 0.25
            moved = r.traffic.up if direction == "up" else r.traffic.down
            # Nobody reads: the relay may take no more than the far leg's kernel buffers plus its own
            # bounded buffer (a pipe, or the Protocol write-buffer high-water mark).
            assert 0 < moved < 24 << 20, moved
            with anyio.fail_after(30):
                got = await read_to_eof(reader)
        assert len(got) == total and got == data
        # Finish the other direction so the relay completes cleanly.
        other = r.server if direction == "up" else r.client
        await other.send_eof()
        with anyio.fail_after(10):
            assert await read_to_eof(writer) == b""


async def test_small_writes_into_a_stalled_reader_keep_order(path: str) -> None:
    # Small reads take the splice path's copy branch (recv + send); once the reader stalls, a send
    # comes up short and the rest must queue behind it, in order, in the pipe.
    chunks = [os.urandom(1000) for _ in range(6000)]
    async with relayed(path) as r:
        with anyio.fail_after(30):
            for i, c in enumerate(chunks):
                await r.client.send(c)
                if i % 8 == 0:
                    await anyio.lowlevel.checkpoint()  # let the relay read a few small chunks at a time
            await r.client.send_eof()
            assert await read_to_eof(r.server) == b"".join(chunks)
            await r.server.send_eof()
            assert await read_to_eof(r.client) == b""


@pytest.mark.parametrize("by", ["client", "server"])
async def test_reset_aborts_both_and_says_whose_socket_failed(path: str, by: str) -> None:
    """A reset on either side ends both; RelayBroken.by_client tells a client's own reset (not the
    forward's fault) from the far side's."""
    async with relayed(path) as r:
        await r.client.send(b"ping")
        with anyio.fail_after(5):
            assert await r.server.receive() == b"ping"
        resetter, other = (r.client, r.server) if by == "client" else (r.server, r.client)
        raw = resetter.extra(anyio.abc.SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await resetter.aclose()  # with SO_LINGER 0: a reset, not a FIN
        with anyio.fail_after(5):
            with pytest.raises(anyio.BrokenResourceError):  # passed on as a reset: a FIN would read as a clean end
                while True:
                    await other.receive()
            await r.finished.wait()
    assert r.error, "a reset must surface as RelayBroken"
    assert isinstance(r.error[0], RelayBroken) and r.error[0].by_client is (by == "client"), r.error
    assert r.client_sock.fileno() == -1 and r.upstream_sock.fileno() == -1


async def test_cancellation_closes_both(path: str) -> None:
    client, client_sock = await _accepted_pair()
    server, upstream_sock = await _accepted_pair()
    async with client, server:
        with anyio.move_on_after(0.5):
            await PATHS[path](RawSocketStream(client_sock).detach(), RawSocketStream(upstream_sock).detach(),
                              Traffic())
        with anyio.fail_after(5):
            # The peers see both relay ends closed: a FIN (the socket paths) or a reset (the streams
            # path resets what it did not finish). asyncio's transports close on the next loop
            # iteration, so the sockets may still look open right here.
            for peer in (client, server):
                with contextlib.suppress(anyio.BrokenResourceError):
                    assert await read_to_eof(peer) == b""


async def test_many_connections_in_parallel(path: str) -> None:
    payloads = [os.urandom(256_000 + i * 7919) for i in range(24)]

    async def one(data: bytes) -> None:
        async with relayed(path) as r:
            async with anyio.create_task_group() as tg:

                async def echo() -> None:
                    while True:
                        try:
                            chunk = await r.server.receive()
                        except anyio.EndOfStream:
                            await r.server.send_eof()
                            return
                        await r.server.send(chunk)

                tg.start_soon(echo)
                await r.client.send(data)
                await r.client.send_eof()
                assert await read_to_eof(r.client) == data

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for p in payloads:
                tg.start_soon(one, p)


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux-only")
async def test_idle_spliced_connections_hold_no_pipes() -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async with relayed("splice") as warm:  # the pool may keep a few pipes: take them out of the count
        await warm.client.send(b"x")
        await warm.server.receive()
        await warm.client.send_eof()
        await warm.server.send_eof()
        await read_to_eof(warm.client)
    before = open_fds()
    n = 40
    async with anyio.create_task_group() as tg:
        stops = []
        ready = 0
        done = anyio.Event()

        async def hold() -> None:
            nonlocal ready
            async with relayed("splice") as r:
                await r.client.send(b"hello")
                assert await r.server.receive() == b"hello"
                ready += 1
                if ready == n:
                    done.set()
                stop = anyio.Event()
                stops.append(stop)
                await stop.wait()
                await r.client.send_eof()
                await r.server.send_eof()
                await read_to_eof(r.client)

        for _ in range(n):
            tg.start_soon(hold)
        with anyio.fail_after(20):
            await done.wait()
        # Four sockets per relayed connection (two apps, two relay ends); pipes only up to the pool's spares
        # (without the pool's give-back every connection would hold one: 2 more fds each).
        held = open_fds() - before - 4 * n
        assert 0 <= held <= 2 * PIPES_KEPT < 2 * n, held
        for s in stops:
            s.set()


async def test_direct_connect_waits_when_the_handshake_is_slow() -> None:
    # To loopback the handshake completes inside connect() and connect_tcp does not wait; when it
    # does not (a full accept backlog drops the SYN), it waits for the handshake, within its deadline.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        port = srv.getsockname()[1]
        queued = []
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            queued.append(s)
        with pytest.raises(TimeoutError):
            await connect_tcp("127.0.0.1", port, timeout=0.3)

        def accept_all() -> None:
            srv.settimeout(1.5)
            try:
                while True:
                    srv.accept()[0].close()
            except OSError:
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, accept_all)
            stream = await connect_tcp("127.0.0.1", port, timeout=10)  # the SYN is retried after ~1 s
            assert stream.sock.getpeername()[1] == port
            await stream.aclose()
        for s in queued:
            s.close()


async def test_a_far_side_failing_after_a_clean_end_leaves_the_closed_socket_alone() -> None:
    """The wired paths' shared end (``WiredClient``): after a clean end whose close had to flush first, the
    far side may still fail (an SSH connection closing while its channel waits for the server's CLOSE).
    That drops the far side and touches nothing else: asyncio's abort() of such a transport raised."""
    dropped: list[bool] = []

    class Far(WiredClient, asyncio.Protocol):
        def drop_far(self) -> None:
            dropped.append(True)

    ours, peer = socket.socketpair()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    wired = Far()
    await wired.wire(ours)
    assert wired.transport is not None
    wired.transport.write(b"x" * (4 << 20))  # more than the socket takes: the close waits for a flush
    wired.close_client()
    async with RawSocketStream(peer) as stream:
        with anyio.fail_after(10):
            assert len(await read_to_eof(stream)) == 4 << 20
            await wired.wait()  # a clean end
    wired.fail(anyio.BrokenResourceError("the SSH connection is closing"), by_client=False)
    assert dropped == [True] and wired.error is None

