"""The generic path: two pump tasks over anyio byte streams.

Taken for every pair that is not two plain sockets: SSH channels, Docker exec streams (and any
pair when ``KCI_TUNNELD_RELAY=streams``). Each pump reads up to CHUNK bytes and awaits the send
before reading again, so a slow reader stops reads on the other side.
"""

from __future__ import annotations

import anyio
import anyio.abc

from tunneld.engine.relay.common import BROKEN, RelayBroken, Traffic, linger_zero
from tunneld.sockets import CHUNK, RawSocketStream


async def _relay_streams(client: anyio.abc.ByteStream, upstream: anyio.abc.ByteStream, traffic: Traffic) -> None:
    failure: list[tuple[BaseException, bool]] = []  # (error, by the client's side)

    async def pump(src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream, up: bool) -> None:
        reading = True  # up: the client is src
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
                reading = False
                await dst.send(data)
                reading = True
            reading = False
            await dst.send_eof()
        except BROKEN as e:
            failure.append((e, reading == up))
            tg.cancel_scope.cancel()

    clean = False
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump, client, upstream, True)
            tg.start_soon(pump, upstream, client, False)
        clean = not failure
    finally:
        with anyio.CancelScope(shield=True):
            for s in (client, upstream):
                if not clean:
                    _reset_on_close(s)  # a failed relay must not look like a finished one to the client
                try:
                    await s.aclose()
                except BROKEN:
                    pass
    if failure:
        error, by_client = failure[0]
        raise RelayBroken(error, by_client=by_client) from error


def _reset_on_close(stream: anyio.abc.ByteStream) -> None:
    """Make the coming close of a socket stream a reset (RST), not a FIN that reads as a clean end."""
    if isinstance(stream, RawSocketStream):
        linger_zero(stream.sock)
