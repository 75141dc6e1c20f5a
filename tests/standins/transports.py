"""Named stand-in transports for tests: real TCP underneath, with a controllable delay or health."""

from __future__ import annotations

from types import TracebackType

import anyio
import anyio.abc

from tunneld.config import Timeouts, TransportSpec, format_host
from tunneld.errors import TransportError
from tunneld.sockets import RawSocketStream
from tunneld.transports import TransportHealth, TransportState
from tunneld.transports.direct import DirectTransport


class GatedTransport:
    """The direct transport, but every connect waits until ``gate`` is set (to test early bytes)."""

    name = "gated"
    pipelines_first_bytes = False

    def __init__(self, gate: anyio.Event | None = None) -> None:
        self.gate = gate or anyio.Event()
        self.inner = DirectTransport(TransportSpec(), Timeouts())
        self.health = TransportHealth(TransportState.CONNECTED)
        self.connects = 0

    async def __aenter__(self) -> GatedTransport:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def connect(self, host: str, port: int, first: bytes = b"", *, early: bool = False) -> RawSocketStream:
        self.connects += 1
        await self.gate.wait()
        return await self.inner.connect(host, port, first)

    def info(self) -> dict[str, object]:
        return {"kind": self.name}

    async def cleanup(self) -> None:
        return None


class OpaqueStream(anyio.abc.ByteStream):
    """Delegates to another byte stream while hiding its type from the relay."""

    def __init__(self, inner: anyio.abc.ByteStream) -> None:
        self.inner = inner

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self.inner.send(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


class StreamOnlyTransport(DirectTransport):
    """The direct transport behind an opaque stream, so the relay takes its generic stream path
    (the path Docker and SSH streams use)."""

    name = "stream-only"

    async def connect(self, host: str, port: int, first: bytes = b"", *, early: bool = False) -> OpaqueStream:  # type: ignore[override]
        return OpaqueStream(await super().connect(host, port, first))


class PipeliningTransport(StreamOnlyTransport):
    """Takes a client's first bytes with the connection request, as the docker transport does, and
    records them."""

    name = "pipelining"
    pipelines_first_bytes = True

    def __init__(self, spec: TransportSpec, timeouts: Timeouts) -> None:
        super().__init__(spec, timeouts)
        self.firsts: list[bytes] = []

    async def connect(self, host: str, port: int, first: bytes = b"", *, early: bool = False) -> OpaqueStream:  # type: ignore[override]
        self.firsts.append(first)
        return await super().connect(host, port, first)


class SwitchableTransport(DirectTransport):
    """The direct transport with the health a test sets, as the SSH and docker transports report
    theirs: ``connect()`` fails while it is not ``connected``, and with ``gate`` set to an unset
    event, waits on it (after that check) so a test can change the health while a probe is under way."""

    name = "switchable"

    def __init__(self, timeouts: Timeouts) -> None:
        super().__init__(TransportSpec(), timeouts)
        self.gate: anyio.Event | None = None
        self.connecting = anyio.Event()  # set (and replaced) as each connect() passes the health check

    async def connect(self, host: str, port: int, first: bytes = b"", *, early: bool = False) -> RawSocketStream:
        if self.health.state != TransportState.CONNECTED:
            what = f"{format_host(host)}:{port}"
            raise TransportError(f"could not connect to {what}: the transport is {self.health.state}")
        self.connecting.set()
        self.connecting = anyio.Event()
        if self.gate is not None:
            await self.gate.wait()
        return await super().connect(host, port, first)

    def info(self) -> dict[str, object]:
        return {"kind": self.name, "state": str(self.health.state)}
