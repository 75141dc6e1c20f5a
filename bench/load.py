"""Load generators and the echo target, each run as its own process: ``python3 -m bench.load KIND ...``.

Separate processes keep the measuring harness out of the CPU figures and let every tool use the
fastest Python shape for its job: blocking sockets for sequential round trips, uvloop Protocols
for the concurrent ones. Every command prints one JSON line and stops by itself (bounded counts,
deadlines); the idle holder also stops when its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import sys
import time
from collections.abc import Sequence

import uvloop

MSG = 64
HOST = "127.0.0.1"


def raise_nofile() -> int:
    """Lift the soft open-file limit to the hard one; 10,000 connections need it. Returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ---------------------------------------------------------------- echo target


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close once what was echoed is flushed: a half-close-aware echo


async def _echo(host: str, port: int, lifetime: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, host, port, backlog=4096, reuse_address=True)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    await asyncio.sleep(lifetime)  # a forgotten target ends by itself
    server.close()


# ---------------------------------------------------------------- sequential round trips


def rtt(port: int, count: int, warmup: int) -> dict[str, object]:
    """``count`` sequential 64-byte round trips on one connection; latency percentiles in µs."""
    payload = b"x" * MSG
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples: list[int] = []
        for i in range(warmup + count):
            t0 = time.perf_counter_ns()
            s.sendall(payload)
            got = 0
            while got < MSG:
                chunk = s.recv(MSG - got)
                if not chunk:
                    raise ConnectionError("echo closed the connection mid-test")
                got += len(chunk)
            if i >= warmup:
                samples.append(time.perf_counter_ns() - t0)
    samples.sort()
    return {
        "count": count,
        "p50_us": samples[len(samples) // 2] / 1000,
        "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))] / 1000,
    }


# ---------------------------------------------------------------- new connections per second


class _OneShot(asyncio.Protocol):
    """Connect, one 64-byte round trip, close: what a short-lived client (a probe, a curl) does."""

    def __init__(self, done: asyncio.Future[bool]) -> None:
        self.done = done
        self.got = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(b"x" * MSG)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= MSG and not self.done.done():
            self.done.set_result(True)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(False)


async def _conns(port: int, concurrency: int, seconds: float, per_connection: float) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    ok = errors = 0
    deadline = loop.time() + seconds

    async def worker() -> None:
        nonlocal ok, errors
        while loop.time() < deadline:
            done: asyncio.Future[bool] = loop.create_future()
            try:
                async with asyncio.timeout(per_connection):
                    await loop.create_connection(lambda done=done: _OneShot(done), HOST, port)  # type: ignore[misc]
                    success = await done
            except (OSError, TimeoutError):
                success = False
            if success:
                ok += 1
            else:
                errors += 1

    t0 = loop.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = loop.time() - t0
    return {"concurrency": concurrency, "per_second": ok / elapsed, "ok": ok, "errors": errors}


# ---------------------------------------------------------------- short HTTP requests, one per connection


class _OneGet(asyncio.Protocol):
    """Connect, ``GET PATH`` with ``Connection: close``, read the answer to EOF: a client without keep-alive."""

    def __init__(self, request: bytes, done: asyncio.Future[bool]) -> None:
        self.request = request
        self.done = done
        self.head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if len(self.head) < 16:
            self.head += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():  # a whole answer: a status line, then the server's EOF
            self.done.set_result(exc is None and self.head.startswith(b"HTTP/1.1 200"))


async def _http(port: int, concurrency: int, seconds: float, path: str, per_request: float) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
    ok = errors = 0
    took: list[float] = []
    deadline = loop.time() + seconds

    async def worker() -> None:
        nonlocal ok, errors
        while loop.time() < deadline:
            done: asyncio.Future[bool] = loop.create_future()
            t0 = loop.time()
            try:
                async with asyncio.timeout(per_request):
                    await loop.create_connection(lambda done=done: _OneGet(request, done), HOST, port)  # type: ignore[misc]
                    success = await done
            except (OSError, TimeoutError):
                success = False
            if success:
                ok += 1
                took.append(loop.time() - t0)
            else:
                errors += 1

    t0 = loop.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = loop.time() - t0
    took.sort()
    p50 = took[len(took) // 2] * 1000 if took else 0.0
    return {"concurrency": concurrency, "per_second": ok / elapsed, "ok": ok, "errors": errors, "p50_ms": p50}


# ---------------------------------------------------------------- idle connections


async def _idle(port: int, count: int, parallel: int, hold: float) -> None:
    """Open ``count`` connections (one round trip each, so each really reaches the target), report,
    then hold them until stdin closes or ``hold`` seconds pass."""
    loop = asyncio.get_running_loop()
    transports: list[asyncio.BaseTransport] = []
    ok = errors = 0
    gate = asyncio.Semaphore(parallel)

    class Held(asyncio.Protocol):
        def __init__(self, echoed: asyncio.Future[None]) -> None:
            self.echoed = echoed
            self.got = 0

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.write(b"x" * MSG)  # type: ignore[attr-defined]

        def data_received(self, data: bytes) -> None:
            self.got += len(data)
            if self.got >= MSG and not self.echoed.done():
                self.echoed.set_result(None)

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.echoed.done():
                self.echoed.set_exception(ConnectionError("closed before the echo"))

    async def one() -> None:
        nonlocal ok, errors
        async with gate:
            echoed: asyncio.Future[None] = loop.create_future()
            try:
                async with asyncio.timeout(30):
                    transport, _ = await loop.create_connection(lambda: Held(echoed), HOST, port)
                    transports.append(transport)
                    await echoed
                ok += 1
            except (OSError, TimeoutError):
                errors += 1

    t0 = loop.time()
    await asyncio.gather(*(one() for _ in range(count)))
    print(json.dumps({"open": ok, "errors": errors, "seconds": loop.time() - t0}), flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        async with asyncio.timeout(hold):
            await reader.read()
    except TimeoutError:
        pass
    for t in transports:
        t.close()
    await asyncio.sleep(0.2)  # let the FINs go out before the process ends


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.load")
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("echo", help="echo server on HOST:PORT (0 = pick); prints its port")
    p.add_argument("--host", default=HOST)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--lifetime", type=float, default=3600)
    p = sub.add_parser("rtt", help="sequential 64-byte round trips")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--warmup", type=int, default=500)
    p = sub.add_parser("conns", help="connect, one round trip, close; C clients for S seconds")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--timeout", type=float, default=10.0)
    p = sub.add_parser("http", help="C clients for S seconds, each connection one GET (Connection: close)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--path", default="/v2/")
    p.add_argument("--timeout", type=float, default=10.0)
    p = sub.add_parser("idle", help="hold N idle connections until stdin closes")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--parallel", type=int, default=64)
    p.add_argument("--hold", type=float, default=120.0)
    args = parser.parse_args(argv)
    raise_nofile()
    if args.kind == "echo":
        uvloop.run(_echo(args.host, args.port, args.lifetime))
    elif args.kind == "rtt":
        print(json.dumps(rtt(args.port, args.count, args.warmup)), flush=True)
    elif args.kind == "conns":
        print(json.dumps(uvloop.run(_conns(args.port, args.concurrency, args.seconds, args.timeout))), flush=True)
    elif args.kind == "http":
        result = _http(args.port, args.concurrency, args.seconds, args.path, args.timeout)
        print(json.dumps(uvloop.run(result)), flush=True)
    elif args.kind == "idle":
        uvloop.run(_idle(args.port, args.count, args.parallel, args.hold))
    return 0


if __name__ == "__main__":
    sys.exit(main())
