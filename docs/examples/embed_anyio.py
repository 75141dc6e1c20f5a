"""Embed kci-tunneld in an anyio app: start a small TCP service, forward a local port to it, use it.

Run it: `python docs/examples/embed_anyio.py` (exits 0). In a real app the target would be a
port the remote Docker host publishes on its own 127.0.0.1, and `via` "docker" or
"ssh://user@host"; here the app serves the target itself so the example runs anywhere.

What it shows:
- `open_forward` is an async context manager that lives in the app's own task group;
- `fwd.address` is where to connect (port 0 = the kernel picks one);
- `fwd.wait_ready()` returns once a probe went through the transport to the target;
- `fwd.states()` streams state changes, and ends by itself when the forward stops.
"""

from __future__ import annotations

import logging
import sys

import anyio
import anyio.abc

import tunneld


async def shout(client: anyio.abc.SocketStream) -> None:
    """The stand-in service: answers every chunk in upper case; half-close aware."""
    async with client:
        try:
            while True:
                await client.send((await client.receive()).upper())
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return  # a readiness probe connects and closes at once: that is fine


async def watch(fwd: tunneld.ForwardHandle) -> None:
    async for state in fwd.states():
        print(f"forward {fwd.address}: {state}")


async def request(address: tuple[str, int], payload: bytes) -> bytes:
    """Send payload, half-close, read the answer to EOF."""
    async with await anyio.connect_tcp(*address) as stream:
        await stream.send(payload)
        await stream.send_eof()
        answer = b""
        try:
            while True:
                answer += await stream.receive()
        except anyio.EndOfStream:
            return answer


async def main() -> int:
    async with anyio.create_task_group() as tg:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        target_port = listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.start_soon(listener.serve, shout)

        # Listen on a free local port; reach 127.0.0.1:<target_port> "on the far side" (here: us).
        async with tunneld.open_forward(f"127.0.0.1:0:127.0.0.1:{target_port}", via="direct") as fwd:
            tg.start_soon(watch, fwd)
            await fwd.wait_ready(timeout=10)
            answer = await request((fwd.host, fwd.port), b"hello through kci-tunneld")
            print(f"{fwd.address} -> {fwd.target} answered {answer!r}")
            print(f"counters: {fwd.stats.total} connection(s), {fwd.stats.traffic.up} bytes up")
        # Leaving the block closed the listener and drained the forward; stop our service too.
        tg.cancel_scope.cancel()
    return 0 if answer == b"HELLO THROUGH KCI-TUNNELD" else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(anyio.run(main))
