"""The transport seam: how a forward reaches host:port on the far side.

A transport is an async context manager (it may own background tasks and connections for its
lifetime) that opens one byte stream per client connection, and says how it is through its
``health`` (a typed state whose changes can be awaited: a forward wakes on them). Modules are
imported lazily from ``_FACTORIES`` so ``--via direct`` never pays for aiodocker or asyncssh.
"""

from __future__ import annotations

import enum
import importlib
from types import TracebackType
from typing import Protocol

import anyio
import anyio.abc

from tunneld.config import Timeouts, TransportSpec
from tunneld.errors import TransportError


class TransportState(enum.StrEnum):
    """How a transport is; the value is what ``info()["state"]`` shows (status, metrics)."""

    CONNECTING = "connecting"  # entering: not connected yet
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # lost its far side and is getting it back; clients may wait or fail
    FAILED = "failed"  # gave up: it will not recover by itself
    CLOSED = "closed"


class TransportHealth:
    """A transport's state and last error, with a change notification for whoever acts on it.

    The transport calls ``set()``; a forward reads ``state`` after a failed probe, and awaits
    ``changed()`` to probe again at once instead of asking the transport now and then.
    """

    def __init__(self, state: TransportState = TransportState.CONNECTING) -> None:
        self.state = state
        self.last_error: str | None = None  # kept after a recovery unless the transport clears it
        self._changed = anyio.Event()

    def set(self, state: TransportState, error: str | None = None) -> None:
        """Enter ``state``, waking every ``changed()`` waiter if it is a new one; ``error``, when given,
        becomes ``last_error`` (also without a change of state: one more failed attempt)."""
        if error is not None:
            self.last_error = error
        if state == self.state:
            return
        self.state = state
        self._changed.set()
        self._changed = anyio.Event()

    async def changed(self) -> TransportState:
        """Wait for the next change of ``state`` and return the new one.

        A change made between reading ``state`` and calling this is not seen: a waiter that must not
        miss one keeps waiting in a loop (as the forward does) and reads ``state`` after each wake.
        """
        await self._changed.wait()
        return self.state


class Transport(Protocol):
    """Opens byte streams to addresses as seen from the far side."""

    name: str
    # True when connect() can send a client's first bytes along with its connection request, ahead
    # of the far side's answer (docker: one round trip through dockerd less per connection).
    pipelines_first_bytes: bool
    health: TransportHealth

    async def __aenter__(self) -> Transport: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None: ...

    async def connect(self, host: str, port: int, first: bytes = b"", *, early: bool = False) -> anyio.abc.ByteStream:
        """Open a stream to host:port on the far side; ``first``: bytes to send on it first.

        ``early``: the caller relays the stream with ``relay()``, which then learns whether the far
        side answered, so a transport may return before it has (docker's mux: the client's bytes
        leave at once, one round trip through Docker sooner); a refusal found there is raised by
        ``relay()`` as TransportError. Transports that cannot do this ignore it.

        :raises TransportError: naming the target and the reason.
        """
        ...

    def info(self) -> dict[str, object]:
        """A few facts for ``status`` (never secrets); ``state`` and ``last_error``, when there, from ``health``."""
        ...

    async def cleanup(self) -> None:
        """Remove what the transport created on the far side (``stop --cleanup``)."""
        ...


async def send_first(stream: anyio.abc.ByteStream, first: bytes, broken: str) -> None:
    """Send a client's ``first`` bytes on a stream just opened for it.

    :raises TransportError: ``broken`` and the reason, when the stream breaks at once (it is closed).
    """
    if not first:
        return
    try:
        await stream.send(first)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError) as e:
        await stream.aclose()
        raise TransportError(f"{broken}: {e}") from None


class TransportFactory(Protocol):
    def __call__(self, spec: TransportSpec, timeouts: Timeouts) -> Transport: ...


_FACTORIES: dict[str, str] = {
    "direct": "tunneld.transports.direct:DirectTransport",
    "docker": "tunneld.docker.transport:DockerTransport",
    "ssh": "tunneld.ssh.transport:SshTransport",
}


def create_transport(spec: TransportSpec, timeouts: Timeouts) -> Transport:
    """Build the transport ``spec.kind`` names (not yet entered)."""
    module, _, attr = _FACTORIES[spec.kind].partition(":")
    factory: TransportFactory = getattr(importlib.import_module(module), attr)
    return factory(spec, timeouts)
