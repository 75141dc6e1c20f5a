"""Byte streams on raw sockets: the client side of every forward, and the direct transport's upstream.

They implement anyio's ``ByteStream`` contract (``receive`` raising ``EndOfStream``, ``send``,
``send_eof`` for half-close, ``aclose``), so the relay treats every transport alike, and they keep
the socket itself reachable so the relay can take a faster path when both ends are plain TCP.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.abc

CHUNK = 256 * 1024


def take(chunks: deque[bytes], max_bytes: int) -> bytes:
    """What piled up in ``chunks`` (not empty), joined in one piece of at most ``max_bytes``: a stream
    fed by another task hands its reader everything that arrived while it was busy, in one write."""
    first = chunks.popleft()
    if len(first) > max_bytes:
        chunks.appendleft(first[max_bytes:])
        return first[:max_bytes]
    if not chunks or len(first) + len(chunks[0]) > max_bytes:
        return first
    parts = [first]
    size = len(first)
    while chunks and size + len(chunks[0]) <= max_bytes:
        parts.append(chunks.popleft())
        size += len(parts[-1])
    return b"".join(parts)


class RawSocketStream(anyio.abc.ByteStream):
    """A connected, non-blocking socket owned by exactly one relay."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._loop = asyncio.get_running_loop()

    async def receive(self, max_bytes: int = CHUNK) -> bytes:
        try:
            data = await self._loop.sock_recv(self.sock, max_bytes)
        except OSError as e:
            raise anyio.BrokenResourceError(str(e)) from e
        if not data:
            raise anyio.EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        try:
            await self._loop.sock_sendall(self.sock, item)
        except OSError as e:
            raise anyio.BrokenResourceError(str(e)) from e

    async def send_eof(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is already gone; the reading side will see it

    async def aclose(self) -> None:
        self.sock.close()

    def detach(self) -> socket.socket:
        """Hand the socket to a faster relay; this stream must not be used afterwards."""
        return self.sock

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {anyio.abc.SocketAttribute.raw_socket: lambda: self.sock}


async def connect_tcp(host: str, port: int, *, timeout: float) -> RawSocketStream:
    """Open a TCP connection (happy-eyeballs-free: addresses are tried in order).

    :raises OSError: the last connect error, or TimeoutError after ``timeout``.
    """
    deadline = anyio.current_time() + timeout  # a deadline scope only around real waits: it costs a timer
    infos = _numeric_address(host, port)
    if infos is None:
        with anyio.fail_at(deadline):
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError = OSError(f"no address for {host}")
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await _connect(sock, addr, deadline)
        except OSError as e:
            sock.close()
            last = e
            continue
        except BaseException:
            sock.close()
            raise
        return RawSocketStream(sock)
    raise last


def _numeric_address(host: str, port: int) -> list[tuple[Any, ...]] | None:
    """An IP literal's address without a resolver round trip (the loop's getaddrinfo runs in a
    thread pool, which costs a connection more than the connect itself); None for a name."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        return None


async def _connect(sock: socket.socket, addr: Any, deadline: float) -> None:
    """Connect a non-blocking socket, waiting only if the handshake did not complete inside connect():
    to loopback and other local peers it does, and skipping the wait raised the connection rate
    through a forward by about half (docs/performance.md).

    :raises OSError: the connect error (refused, unreachable, ...); TimeoutError at ``deadline``.
    """
    err = sock.connect_ex(addr)
    if err == errno.EINPROGRESS:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err and not _established(sock):
            with anyio.fail_at(deadline):
                await anyio.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _established(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False  # ENOTCONN: the handshake is still under way
    return True
