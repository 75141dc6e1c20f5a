"""What the relay paths share: the traffic counters, the error they raise, and the reset on close.

Every path ends a failed relay the same way: the sockets still open are closed with a reset
(``linger_zero``), so no peer mistakes lost bytes for a clean end, and ``RelayBroken`` says whose
socket failed.

The path modules (streams, sockets, splice) import from here and never from the package itself,
so ``tunneld/engine/relay/__init__.py`` can import them all without a cycle; it re-exports ``Traffic``
and ``RelayBroken``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass

import anyio

# Bytes a side may queue for a slow peer before reads on the other side pause.
WRITE_HIGH_WATER = 1024 * 1024
WRITE_LOW_WATER = 256 * 1024
# How long a client whose far side refused (a transport that opens early) may go on sending before its
# socket closes: it got a clean EOF; reading on meanwhile keeps its last bytes from turning into a reset.
REFUSE_LINGER = 1.0

# What a side that failed raises: anyio's stream errors, or the OS's (a reset, a broken pipe).
BROKEN = (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError, OSError)


@dataclass
class Traffic:
    """Byte counters one forward shares among its connections (up: client -> far side)."""

    up: int = 0
    down: int = 0


class RelayBroken(Exception):
    """One side of a relayed connection failed mid-stream (reset, broken pipe, lost transport).

    ``by_client`` tells whose socket failed: the client's (it reset or vanished: its own business,
    not the forward's) or the far side's (the target, the transport, or the relay itself).
    """

    def __init__(self, error: BaseException, *, by_client: bool) -> None:
        super().__init__(str(error) or type(error).__name__)
        self.by_client = by_client


def linger_zero(sock: socket.socket | None) -> None:
    """SO_LINGER 0: closing ``sock`` sends a reset, so the peer cannot mistake lost bytes for an end."""
    if sock is not None and sock.fileno() != -1:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class WiredClient(asyncio.BaseProtocol):
    """The client's socket wired to a far side that is not a socket and writes to it by callbacks (an
    SSH channel: ours, tunneld/ssh/channel.py, or asyncssh's, tunneld/ssh/wired.py; a Docker mux
    stream, tunneld/docker/mux_wired.py).

    What those paths share: taking the socket over (``wire``), its write buffer limits, passing the
    far side's EOF on (``write_eof_to_client``), the end of the relay (``close_client`` for a clean
    one; ``fail`` for a failed one, which resets the client's socket and drops the far side,
    remembering whose fault it was; ``refuse_client`` when an early open was refused), and waiting
    for that end (``wait``). A subclass handles the bytes and EOFs and says how its far side is
    dropped (``drop_far``), and how it takes the client's bytes: as asyncio.Protocol's ``data_received``
    or asyncio.BufferedProtocol's ``get_buffer`` (uvloop reads into the buffer only for a protocol that
    is not an asyncio.Protocol, so this class is neither).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.finished = False
        self.error: BaseException | None = None
        self.by_client = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost = False  # connection_lost ran: the client's socket is closed

    def drop_far(self) -> None:
        """Close (or reset) the far side at once: the relay failed, or never started."""
        raise NotImplementedError

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.fail(exc, by_client=True)
        elif not self.finished:  # closed under us, e.g. by the loop at shutdown
            self.fail(ConnectionResetError("the client socket closed"), by_client=True)
        self.lost = True
        if not self.done.done():
            self.done.set_result(None)

    def fail(self, error: BaseException, *, by_client: bool) -> None:
        """One side failed: reset the client socket, drop the far side, remember whose fault it was."""
        if self.error is None and not self.finished:
            self.error, self.by_client = error, by_client
        self.finished = True
        self.drop_far()
        # Not once the socket is gone: the far side may fail after a clean end, e.g. the SSH connection
        # closing while a channel waits for the server's CLOSE, and asyncio's abort() of a transport closed
        # after flushing its buffer raises (its loop is already None).
        if self.transport is not None and not self.lost:
            linger_zero(self.transport.get_extra_info("socket"))  # a failed relay must not look like a finished one
            self.transport.abort()

    def write_eof_to_client(self) -> None:
        """Pass the far side's EOF on to the client (sent once its socket's buffer is flushed)."""
        if self.transport is not None and not self.finished:
            with contextlib.suppress(OSError, RuntimeError):
                self.transport.write_eof()

    def close_client(self) -> None:
        """End the relay cleanly: the client's socket closes once flushed (connection_lost sets done)."""
        if not self.finished:
            self.finished = True
            if self.transport is not None:
                self.transport.close()

    def refuse_client(self, client_eof: bool) -> None:
        """The far side refused (after an early open): a clean EOF for the client, as a failed connect
        gives it, and its socket closed at once if it has stopped sending, else after REFUSE_LINGER."""
        if self.transport is None or self.finished:
            return
        self.write_eof_to_client()
        if client_eof:
            self.close_client()
        else:
            asyncio.get_running_loop().call_later(REFUSE_LINGER, self.close_client)

    async def wire(self, client: socket.socket) -> None:
        """Take over ``client``: from now on its bytes go to the far side."""
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: self, sock=client)
        except BaseException:
            self.finished = True
            self.drop_far()
            linger_zero(client)
            client.close()
            raise

    async def wait(self) -> None:
        """Relay until both directions are done (or one failed).

        :raises RelayBroken: when either side failed; both are closed by then.
        """
        try:
            await self.done
        except BaseException:  # cancelled: both ends go, the client's with a reset
            self.fail(anyio.get_cancelled_exc_class()(), by_client=False)
            raise
        if self.error is not None:
            raise RelayBroken(self.error, by_client=self.by_client) from self.error
