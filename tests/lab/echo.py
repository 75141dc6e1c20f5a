"""Half-close-aware TCP echo service for the lab's "remote host" loopback.

Run inside the lab namespace (``nsenter --net=/var/run/netns/kcilab python3 echo.py``).
It stands in for a service that the remote host publishes only on its own loopback,
so tunnel tests can check byte-exact relaying and EOF propagation end to end:

* every byte received is written back, with backpressure (``drain``);
* on EOF from the client it finishes writing, then shuts down its write side
  (``write_eof``), so the client sees EOF only after the last echoed byte;
* only then is the socket closed.

Stdlib only: it runs under whatever python3 the machine has, before any project
dependency is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket

CHUNK = 64 * 1024


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(CHUNK):
            writer.write(chunk)
            await writer.drain()
        # EOF from the client: everything read has been written (drain above), so
        # half-close now; the client reads to EOF and then closes its side.
        if writer.can_write_eof():
            writer.write_eof()
            await writer.drain()
    except (ConnectionError, OSError):
        # A reset client is normal in fault tests; nothing to report back to it.
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


def _write_pidfile(path: str) -> None:
    # Atomically: a reader never sees an empty file.
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


async def _serve(hosts: list[str], port: int, pidfile: str | None) -> None:
    servers: list[asyncio.Server] = []
    for host in hosts:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            servers.append(await asyncio.start_server(_echo, host, port, family=family, reuse_address=True))
        except OSError as exc:
            raise SystemExit(f"echo: cannot listen on [{host}]:{port}: {exc}") from exc
    # The pid file is written only once every listener is bound, so "pid file present
    # and process alive" means "listening" for whoever started us.
    if pidfile:
        _write_pidfile(pidfile)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()
    for server in servers:
        await server.wait_closed()


def main() -> None:
    """Parse arguments and serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", action="append", dest="hosts", help="repeatable")
    parser.add_argument("--port", type=int, default=7007)
    parser.add_argument("--pidfile")
    args = parser.parse_args()
    asyncio.run(_serve(args.hosts or ["127.0.0.1", "::1"], args.port, args.pidfile))


if __name__ == "__main__":
    main()
