"""The Protocol path: an asyncio Protocol per socket, with flow control wired crosswise.

Taken when both ends are plain sockets but splice cannot be used (no ``os.splice``, not TCP), or
when ``KCI_TUNNELD_RELAY=protocol``. A side whose write buffer passes WRITE_HIGH_WATER pauses reads
on its peer, with no task wake-up per chunk (about 4x the throughput of pumps over streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from tunneld.engine.relay.common import WRITE_HIGH_WATER, WRITE_LOW_WATER, RelayBroken, Traffic, linger_zero


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
        self.error_by_client = False
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
            self.error, self.error_by_client = exc, side.up  # the up side reads the client's socket
        peer = side.peer.transport
        if peer is not None and not peer.is_closing():
            # One socket went away before both directions finished: nothing more can be relayed.
            if exc is not None or not (side.read_eof and side.peer.read_eof):
                if exc is not None:  # it failed: the other side must not read a clean end either
                    linger_zero(peer.get_extra_info("socket"))
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
        raise RelayBroken(pair.error, by_client=pair.error_by_client) from pair.error
