"""What the relay paths share: the traffic counters, the error they raise, and the reset on close.

Every path ends a failed relay the same way: the sockets still open are closed with a reset
(``linger_zero``), so no peer mistakes lost bytes for a clean end, and ``RelayBroken`` says whose
socket failed.

The path modules (streams, sockets, splice) import from here and never from the package itself,
so ``tunneld/engine/relay/__init__.py`` can import them all without a cycle; it re-exports ``Traffic``
and ``RelayBroken``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass

import anyio

# Bytes a side may queue for a slow peer before reads on the other side pause.
WRITE_HIGH_WATER = 1024 * 1024
WRITE_LOW_WATER = 256 * 1024

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
