"""Client-side helpers for tests: real sockets, bounded by deadlines."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc

from tunneld.config import ForwardSpec, Timeouts
from tunneld.engine.forward import Forward, ForwardState
from tunneld.transports import Transport

FAST = Timeouts(connect=3.0, probe=2.0, probe_interval=0.2, ready=10.0, drain=2.0)


class StateWatch:
    """A forward's state changes, for a test to wait on: pass it as the forward's ``on_change``."""

    def __init__(self) -> None:
        self._changed = anyio.Event()

    def __call__(self, forward: Forward) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def until(self, forward: Forward, state: ForwardState, within: float = 10.0) -> float:
        """Wait (at most ``within``) until ``forward`` is in ``state``; return how long it took."""
        started = time.monotonic()
        with anyio.fail_after(within):
            while forward.state != state:
                await self._changed.wait()  # taken right after reading the state: no change is missed
        return time.monotonic() - started


async def listener_on(host: str) -> tuple[anyio.abc.SocketListener, int]:
    """A TCP listener on ``host`` (the port picked) and its port: a target the test holds both ends of."""
    listener = (await anyio.create_tcp_listener(local_host=host, local_port=0)).listeners[0]
    return listener, listener.extra(anyio.abc.SocketAttribute.local_port)


async def client_and_accepted() -> tuple[anyio.abc.SocketStream, socket.socket]:
    """A connected pair on loopback: the client's end as a stream, the accepted end as the socket a
    forward would hand to ``relay()``."""
    with socket.create_server(("127.0.0.1", 0)) as front:
        client = await anyio.connect_tcp("127.0.0.1", front.getsockname()[1])
        accepted, _ = front.accept()
    return client, accepted


async def read_to_eof(stream: anyio.abc.ByteStream) -> bytes:
    """Everything ``stream`` sends until its EOF."""
    out = bytearray()
    while True:
        try:
            out.extend(await stream.receive(1 << 20))
        except anyio.EndOfStream:
            return bytes(out)


async def stream_echo(stream: anyio.abc.ByteStream, data: bytes) -> bytes:
    """On a stream a transport opened to an echo server: send ``data``, half-close, read to EOF,
    close; return what came back."""
    if data:
        await stream.send(data)
    await stream.send_eof()
    got = b""
    try:
        while True:
            got += await stream.receive()
    except anyio.EndOfStream:
        pass
    await stream.aclose()
    return got


async def echo_roundtrip(port: int, data: bytes, *, host: str = "127.0.0.1") -> bytes:
    """Send ``data``, half-close, and read until EOF; return what came back."""
    async with await anyio.connect_tcp(host, port) as stream:
        got = bytearray()

        async def reader() -> None:
            while True:
                try:
                    got.extend(await stream.receive(262144))
                except anyio.EndOfStream:
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await stream.send(data)
            await stream.send_eof()
        return bytes(got)


async def parallel_echoes(port: int, data: bytes, count: int = 8) -> None:
    """``count`` echoes at once through a forward, each of a distinct payload (``data`` rotated by a
    different amount, so a chunk of one connection's bytes delivered on another's is caught, not just
    the last byte); every one comes back whole."""
    payloads = [data[i * 4099 % max(1, len(data)):] + data[:i * 4099 % max(1, len(data))] + bytes([i])
                for i in range(count)]
    results: list[bytes] = []

    async def one(payload: bytes) -> None:
        results.append(await echo_roundtrip(port, payload))

    async with anyio.create_task_group() as tg:
        for payload in payloads:
            tg.start_soon(one, payload)
    assert sorted(results) == sorted(payloads)


@asynccontextmanager
async def running_forward(
    transport: Transport, target_port: int, *, bind: str = "127.0.0.1", port: int = 0,
    timeouts: Timeouts = FAST, max_connections: int = 1024, wait_ready: bool = True,
) -> AsyncIterator[Forward]:
    """Run one forward in a task group; stop it (drain) on exit."""
    spec = ForwardSpec(name="t", bind=bind, port=port, host="127.0.0.1", host_port=target_port,
                       max_connections=max_connections)
    watch = StateWatch()
    async with anyio.create_task_group() as tg:
        forward: Forward = await tg.start(Forward(spec, transport, timeouts, on_change=watch).run)
        if wait_ready:
            await watch.until(forward, ForwardState.READY, within=10)
        try:
            yield forward
        finally:
            forward.stop()
