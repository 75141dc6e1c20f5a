"""The relay: copy bytes both ways between a client and an upstream until both directions are done.

Contract, on every path:
- backpressure: a slow reader on one side stops reads on the other (bounded memory per connection);
- half-close: EOF on one side is forwarded as EOF to the other; both ends stay open until BOTH
  directions saw EOF, so a client that shut down its write side still gets the whole reply;
- errors: a reset on either side aborts both ends; cancellation aborts both ends.

Two paths sit behind ``relay()``. Plain TCP on both ends (the direct transport) runs on asyncio
Protocols with flow control wired crosswise: no task wake-up per chunk, about 4x the throughput of
a pump over streams (docs/performance.md). Everything else (Docker exec streams, SSH channels) goes
through two pump tasks over anyio byte streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass

import anyio
import anyio.abc

from tunneld.streams import CHUNK, RawSocketStream

# Bytes a side may queue for a slow peer before reads on the other side pause.
WRITE_HIGH_WATER = 1024 * 1024
WRITE_LOW_WATER = 256 * 1024

_BROKEN = (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError, OSError)


@dataclass
class Traffic:
    """Byte counters one forward shares among its connections (up: client -> far side)."""

    up: int = 0
    down: int = 0


class RelayBroken(Exception):
    """One side of a relayed connection failed mid-stream (reset, broken pipe, lost transport)."""


async def relay(client: anyio.abc.ByteStream, upstream: anyio.abc.ByteStream, traffic: Traffic) -> None:
    """Relay until both directions saw EOF, then close both streams.

    :raises RelayBroken: when either side failed; both are closed by then.
    """
    if isinstance(client, RawSocketStream) and isinstance(upstream, RawSocketStream):
        await _relay_sockets(client.detach(), upstream.detach(), traffic)
    else:
        await _relay_streams(client, upstream, traffic)


async def _relay_streams(client: anyio.abc.ByteStream, upstream: anyio.abc.ByteStream, traffic: Traffic) -> None:
    failure: list[BaseException] = []

    async def pump(src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream, up: bool) -> None:
        try:
            while True:
                try:
                    data = await src.receive(CHUNK)
                except anyio.EndOfStream:
                    break
                if up:
                    traffic.up += len(data)
                else:
                    traffic.down += len(data)
                await dst.send(data)
            await dst.send_eof()
        except _BROKEN as e:
            failure.append(e)
            tg.cancel_scope.cancel()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump, client, upstream, True)
            tg.start_soon(pump, upstream, client, False)
    finally:
        with anyio.CancelScope(shield=True):
            for s in (client, upstream):
                try:
                    await s.aclose()
                except _BROKEN:
                    pass
    if failure:
        raise RelayBroken(str(failure[0]) or type(failure[0]).__name__) from failure[0]


class _Side(asyncio.Protocol):
    """One socket of a Protocol relay; ``peer`` is the other socket's side."""

    def __init__(self, pair: _SocketPair, up: bool) -> None:
        self.pair = pair
        self.up = up
        self.peer: _Side
        self.transport: asyncio.Transport | None = None
        self.read_eof = False
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        if self.up:
            self.pair.traffic.up += len(data)
        else:
            self.pair.traffic.down += len(data)
        peer = self.peer.transport
        if peer is None:
            # uvloop reads as soon as a socket is wired, possibly before its peer is: hold the bytes.
            self.early.append(data)
            assert self.transport is not None
            self.transport.pause_reading()
            return
        peer.write(data)

    def eof_received(self) -> bool:
        self.read_eof = True
        peer = self.peer.transport
        if peer is not None:
            with contextlib.suppress(OSError, RuntimeError):
                peer.write_eof()  # sent once the peer's buffer is flushed
            if self.peer.read_eof:
                self.pair.close()
        return True  # keep this socket open: the other direction may still be sending

    def flush_early(self) -> None:
        """Once both sockets are wired: pass on what arrived before, then read on."""
        assert self.transport is not None and self.peer.transport is not None
        for data in self.early:
            self.peer.transport.write(data)
        self.early.clear()
        if self.read_eof:
            with contextlib.suppress(OSError, RuntimeError):
                self.peer.transport.write_eof()
        elif not self.transport.is_closing():
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        if self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.lost(self, exc)


class _SocketPair:
    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic
        self.sides = (_Side(self, up=True), _Side(self, up=False))
        self.sides[0].peer, self.sides[1].peer = self.sides[1], self.sides[0]
        self.remaining = 2
        self.error: BaseException | None = None
        self.done = asyncio.get_running_loop().create_future()

    def close(self) -> None:
        for side in self.sides:
            if side.transport is not None:
                side.transport.close()

    def abort(self) -> None:
        for side in self.sides:
            if side.transport is not None:
                side.transport.abort()

    def lost(self, side: _Side, exc: BaseException | None) -> None:
        if exc is not None and self.error is None:
            self.error = exc
        peer = side.peer.transport
        if peer is not None and not peer.is_closing():
            # One socket went away before both directions finished: nothing more can be relayed.
            if exc is not None or not (side.read_eof and side.peer.read_eof):
                peer.abort()
            else:
                peer.close()
        self.remaining -= 1
        if self.remaining == 0 and not self.done.done():
            self.done.set_result(None)


async def _relay_sockets(client: socket.socket, upstream: socket.socket, traffic: Traffic) -> None:
    loop = asyncio.get_running_loop()
    pair = _SocketPair(traffic)
    wired = 0
    try:
        for side, sock in zip(pair.sides, (client, upstream), strict=True):
            transport, _ = await loop.connect_accepted_socket(lambda side=side: side, sock=sock)  # type: ignore[misc]
            side.transport = transport
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
            wired += 1
    except BaseException:
        pair.abort()
        for sock in (client, upstream)[wired:]:
            sock.close()
        raise
    if pair.error is not None or pair.remaining < 2:
        pair.abort()  # one side died while the other was being wired
    else:
        for side in pair.sides:
            side.flush_early()
        if all(side.read_eof for side in pair.sides):
            pair.close()
    try:
        await pair.done
    except BaseException:
        pair.abort()
        raise
    if pair.error is not None:
        raise RelayBroken(str(pair.error) or type(pair.error).__name__) from pair.error
