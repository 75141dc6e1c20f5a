"""The relay: copy bytes both ways between a client and an upstream until both directions are done.

Contract, on every path:
- backpressure: a slow reader on one side stops reads on the other (bounded memory per connection);
- half-close: EOF on one side is forwarded as EOF to the other; both ends stay open until BOTH
  directions saw EOF, so a client that shut down its write side still gets the whole reply;
- errors: a reset (any failure) on either side reaches the other as a reset, never as a clean EOF;
  ``RelayBroken.by_client`` says whose socket failed; cancellation closes both ends.

Four paths sit behind ``relay()``, chosen by what the two ends are (docs/performance.md has the
numbers that chose them):
- plain TCP on both ends (the direct transport) on Linux, in ``splice.py``: ``splice(2)`` moves bytes
  socket -> pipe -> socket inside the kernel, driven by the loop's reader/writer callbacks; no bytes
  enter Python, so it needs about half the CPU per GiB of a Protocol relay, and wiring a connection
  costs no awaits;
- plain TCP elsewhere (or plain sockets that are not TCP), in ``protocols.py``: asyncio Protocols with
  flow control wired crosswise (no task wake-up per chunk, about 4x the throughput of pumps over
  streams);
- an upstream that relays to a socket itself (``relay_socket``: SSH TCP and unix-socket channels,
  tunneld/ssh/wired.py; Docker mux streams, tunneld/docker/mux_wired.py) gets the client's socket:
  callbacks both ways, no tasks;
- everything else (Docker exec streams, SSH exec channels), in ``generic.py``: two pump tasks over
  anyio byte streams.
``KCI_TUNNELD_RELAY=protocol|streams`` forces a slower path, for benchmarks and bug hunts.

What the paths share (``Traffic``, ``RelayBroken``, the reset on close) is in ``common.py``, which
the path modules import (never this package, so there is no import cycle); this module dispatches
and re-exports.
"""

from __future__ import annotations

import os

import anyio.abc

from tunneld.engine.relay.common import WRITE_HIGH_WATER, WRITE_LOW_WATER, RelayBroken, Traffic
from tunneld.engine.relay.generic import _relay_streams
from tunneld.engine.relay.protocols import _relay_sockets
from tunneld.engine.relay.splice import COPY_LIMIT, PIPE_SIZE, PIPES_KEPT, _relay_splice, can_splice
from tunneld.sockets import RawSocketStream

__all__ = [
    "COPY_LIMIT",
    "PIPES_KEPT",
    "PIPE_SIZE",
    "RELAY_ENV",
    "WRITE_HIGH_WATER",
    "WRITE_LOW_WATER",
    "RelayBroken",
    "Traffic",
    "relay",
    "relay_path",
]

RELAY_ENV = "KCI_TUNNELD_RELAY"


def relay_path() -> str:
    """The path ``KCI_TUNNELD_RELAY`` asks for ("" for the fastest the two ends allow). A forward reads it
    once, when it starts: looking up an unset variable raises and catches a KeyError inside
    ``os.environ``, a few percent of a short connection's CPU."""
    return os.environ.get(RELAY_ENV, "")


async def relay(client: anyio.abc.ByteStream, upstream: anyio.abc.ByteStream, traffic: Traffic,
                path: str | None = None) -> None:
    """Relay until both directions saw EOF, then close both streams. ``path``: ``relay_path()``'s answer
    read beforehand (read now when None).

    :raises RelayBroken: when either side failed; both are closed by then.
    :raises TransportError: from an upstream the transport opened early (``connect(early=True)``)
        whose far side then refused; the client got a clean EOF.
    """
    if path is None:
        path = relay_path()
    wired = getattr(upstream, "relay_socket", None)
    if wired is not None and isinstance(client, RawSocketStream) and path != "streams":
        await wired(client.detach(), traffic)
    elif isinstance(client, RawSocketStream) and isinstance(upstream, RawSocketStream) and path != "streams":
        if path != "protocol" and can_splice(client.sock) and can_splice(upstream.sock):
            await _relay_splice(client.detach(), upstream.detach(), traffic)
        else:
            await _relay_sockets(client.detach(), upstream.detach(), traffic)
    else:
        await _relay_streams(client, upstream, traffic)
