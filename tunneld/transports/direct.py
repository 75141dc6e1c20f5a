"""The direct transport: plain TCP from this machine, for hosts it can already reach."""

from __future__ import annotations

import os
from types import TracebackType

from tunneld.config import Timeouts, TransportSpec, format_host
from tunneld.errors import TransportError
from tunneld.sockets import RawSocketStream, connect_tcp
from tunneld.transports import TransportHealth, TransportState, send_first


class DirectTransport:
    """Opens a TCP connection per client; the relay then runs on its fast socket path."""

    name = "direct"
    pipelines_first_bytes = False

    def __init__(self, spec: TransportSpec, timeouts: Timeouts) -> None:
        self.timeouts = timeouts
        self.health = TransportHealth(TransportState.CONNECTED)  # nothing to lose: each connect stands alone

    async def __aenter__(self) -> DirectTransport:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def connect(self, host: str, port: int, first: bytes = b"", *, early: bool = False) -> RawSocketStream:
        """Connect to host:port, then send ``first``.

        :raises TransportError: naming the target and the OS reason.
        """
        try:
            stream = await connect_tcp(host, port, timeout=self.timeouts.connect)
        except TimeoutError:
            raise TransportError(
                f"could not connect to {format_host(host)}:{port}: no answer within {self.timeouts.connect:g}s"
            ) from None
        except OSError as e:
            # asyncio puts "Connect call failed (...)" in strerror; the errno's own text is what people know.
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise TransportError(f"could not connect to {format_host(host)}:{port}: {reason}") from None
        await send_first(stream, first, f"{format_host(host)}:{port} closed the connection at once")
        return stream

    def info(self) -> dict[str, object]:
        return {"kind": self.name}  # no state: always connected, nothing for status to say

    async def cleanup(self) -> None:
        return None  # nothing is created on the far side
