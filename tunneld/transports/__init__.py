"""The transport seam: how a forward reaches host:port on the far side.

A transport is an async context manager (it may own background tasks and connections for its
lifetime) that opens one byte stream per client connection. Modules are imported lazily from
``_FACTORIES`` so ``--via direct`` never pays for aiodocker or asyncssh.
"""

from __future__ import annotations

import importlib
from types import TracebackType
from typing import Protocol

import anyio
import anyio.abc

from tunneld.config import Timeouts, TransportSpec
from tunneld.errors import TransportError


class Transport(Protocol):
    """Opens byte streams to addresses as seen from the far side."""

    name: str
    # True when connect() can send a client's first bytes along with its connection request, ahead
    # of the far side's answer (docker: one round trip through dockerd less per connection).
    pipelines_first_bytes: bool

    async def __aenter__(self) -> Transport: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None: ...

    async def connect(self, host: str, port: int, first: bytes = b"") -> anyio.abc.ByteStream:
        """Open a stream to host:port on the far side; ``first``: bytes to send on it first.

        :raises TransportError: naming the target and the reason.
        """
        ...

    def info(self) -> dict[str, object]:
        """A few facts for ``status`` (never secrets)."""
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
