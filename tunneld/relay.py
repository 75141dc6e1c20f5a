"""The relay: copy bytes both ways between a client and an upstream until both directions are done.

Contract, on every path:
- backpressure: a slow reader on one side stops reads on the other (bounded memory per connection);
- half-close: EOF on one side is forwarded as EOF to the other; both ends stay open until BOTH
  directions saw EOF, so a client that shut down its write side still gets the whole reply;
- errors: a reset on either side aborts both ends; cancellation aborts both ends.

Three paths sit behind ``relay()``, chosen by what the two ends are (docs/performance.md has the
numbers that chose them):
- plain TCP on both ends (the direct transport) on Linux: ``splice(2)`` moves bytes socket -> pipe ->
  socket inside the kernel, driven by the loop's reader/writer callbacks; no bytes enter Python, so
  it needs about half the CPU per GiB of a Protocol relay, and wiring a connection costs no awaits;
- plain TCP elsewhere: asyncio Protocols with flow control wired crosswise (no task wake-up per
  chunk, about 4x the throughput of pumps over streams);
- everything else (Docker exec streams, SSH channels): two pump tasks over anyio byte streams.
``KCI_TUNNELD_RELAY=protocol|streams`` forces a slower path, for benchmarks and bug hunts.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
from dataclasses import dataclass

import anyio
import anyio.abc

from tunneld.streams import CHUNK, RawSocketStream

# Bytes a side may queue for a slow peer before reads on the other side pause.
WRITE_HIGH_WATER = 1024 * 1024
WRITE_LOW_WATER = 256 * 1024

_BROKEN = (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError, OSError)

RELAY_ENV = "KCI_TUNNELD_RELAY"
# Bytes one splice may move: the pipe's capacity. A bigger pipe means fewer wake-ups per GiB; 1 MiB
# is the most an unprivileged process may ask for (/proc/sys/fs/pipe-max-size).
PIPE_SIZE = 1024 * 1024
# Reads smaller than this go through Python (recv + send): for a 64-byte request that is cheaper than
# two splices and a pipe. A read that fills it means bulk data: the next reads splice.
COPY_LIMIT = 32 * 1024
# Empty pipes kept for reuse. A direction holds a pipe only while bytes are in flight, so idle
# connections hold none; this bounds the spare ones (each pipe is two file descriptors).
PIPES_KEPT = 16
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_TCP = (socket.AF_INET, socket.AF_INET6)


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


async def relay(client: anyio.abc.ByteStream, upstream: anyio.abc.ByteStream, traffic: Traffic) -> None:
    """Relay until both directions saw EOF, then close both streams.

    :raises RelayBroken: when either side failed; both are closed by then.
    """
    path = os.environ.get(RELAY_ENV, "")
    if isinstance(client, RawSocketStream) and isinstance(upstream, RawSocketStream) and path != "streams":
        if path != "protocol" and _can_splice(client.sock) and _can_splice(upstream.sock):
            await _relay_splice(client.detach(), upstream.detach(), traffic)
        else:
            await _relay_sockets(client.detach(), upstream.detach(), traffic)
    else:
        await _relay_streams(client, upstream, traffic)


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
        except _BROKEN as e:
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
                except _BROKEN:
                    pass
    if failure:
        error, by_client = failure[0]
        raise RelayBroken(error, by_client=by_client) from error


def _reset_on_close(stream: anyio.abc.ByteStream) -> None:
    """Make the coming close of a socket stream a reset (RST), not a FIN that reads as a clean end."""
    if isinstance(stream, RawSocketStream):
        _linger_zero(stream.sock)


def _linger_zero(sock: socket.socket | None) -> None:
    """SO_LINGER 0: closing ``sock`` sends a reset, so the peer cannot mistake lost bytes for an end."""
    if sock is not None and sock.fileno() != -1:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Side(asyncio.Protocol):
    """One socket of a Protocol relay; ``peer`` is the other socket's side."""

    def __init__(self, pair: _SocketPair, up: bool) -> None:
        self.pair = pair
        self.up = up
        self.peer: _Side
        self.transport: asyncio.Transport | None = None
        self.read_eof = False
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        if self.up:
            self.pair.traffic.up += len(data)
        else:
            self.pair.traffic.down += len(data)
        peer = self.peer.transport
        if peer is None:
            # uvloop reads as soon as a socket is wired, possibly before its peer is: hold the bytes.
            self.early.append(data)
            assert self.transport is not None
            self.transport.pause_reading()
            return
        peer.write(data)

    def eof_received(self) -> bool:
        self.read_eof = True
        peer = self.peer.transport
        if peer is not None:
            with contextlib.suppress(OSError, RuntimeError):
                peer.write_eof()  # sent once the peer's buffer is flushed
            if self.peer.read_eof:
                self.pair.close()
        return True  # keep this socket open: the other direction may still be sending

    def flush_early(self) -> None:
        """Once both sockets are wired: pass on what arrived before, then read on."""
        assert self.transport is not None and self.peer.transport is not None
        for data in self.early:
            self.peer.transport.write(data)
        self.early.clear()
        if self.read_eof:
            with contextlib.suppress(OSError, RuntimeError):
                self.peer.transport.write_eof()
        elif not self.transport.is_closing():
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        if self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.lost(self, exc)


class _SocketPair:
    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic
        self.sides = (_Side(self, up=True), _Side(self, up=False))
        self.sides[0].peer, self.sides[1].peer = self.sides[1], self.sides[0]
        self.remaining = 2
        self.error: BaseException | None = None
        self.error_by_client = False
        self.done = asyncio.get_running_loop().create_future()

    def close(self) -> None:
        for side in self.sides:
            if side.transport is not None:
                side.transport.close()

    def abort(self) -> None:
        for side in self.sides:
            if side.transport is not None:
                side.transport.abort()

    def lost(self, side: _Side, exc: BaseException | None) -> None:
        if exc is not None and self.error is None:
            self.error, self.error_by_client = exc, side.up  # the up side reads the client's socket
        peer = side.peer.transport
        if peer is not None and not peer.is_closing():
            # One socket went away before both directions finished: nothing more can be relayed.
            if exc is not None or not (side.read_eof and side.peer.read_eof):
                if exc is not None:  # it failed: the other side must not read a clean end either
                    _linger_zero(peer.get_extra_info("socket"))
                peer.abort()
            else:
                peer.close()
        self.remaining -= 1
        if self.remaining == 0 and not self.done.done():
            self.done.set_result(None)


async def _relay_sockets(client: socket.socket, upstream: socket.socket, traffic: Traffic) -> None:
    loop = asyncio.get_running_loop()
    pair = _SocketPair(traffic)
    wired = 0
    try:
        for side, sock in zip(pair.sides, (client, upstream), strict=True):
            transport, _ = await loop.connect_accepted_socket(lambda side=side: side, sock=sock)  # type: ignore[misc]
            side.transport = transport
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
            wired += 1
    except BaseException:
        pair.abort()
        for sock in (client, upstream)[wired:]:
            sock.close()
        raise
    if pair.error is not None or pair.remaining < 2:
        pair.abort()  # one side died while the other was being wired
    else:
        for side in pair.sides:
            side.flush_early()
        if all(side.read_eof for side in pair.sides):
            pair.close()
    try:
        await pair.done
    except BaseException:
        pair.abort()
        raise
    if pair.error is not None:
        raise RelayBroken(pair.error, by_client=pair.error_by_client) from pair.error


def _can_splice(sock: socket.socket) -> bool:
    return hasattr(os, "splice") and sock.family in _TCP and sock.type == socket.SOCK_STREAM


class _Pipes:
    """Kernel pipes that carry spliced bytes, reused across connections; only empty ones come back."""

    def __init__(self) -> None:
        self.free: list[tuple[int, int]] = []

    def take(self) -> tuple[int, int]:
        """An empty pipe (read end, write end).

        :raises OSError: when no file descriptor is left (EMFILE).
        """
        if self.free:
            return self.free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a lower pipe-max-size: the default 64 KiB works, slower
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        return r, w

    def give(self, pipe: tuple[int, int], *, empty: bool) -> None:
        if empty and len(self.free) < PIPES_KEPT:
            self.free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])


# Process-wide: a pipe is tied to no event loop, and list pop/append are atomic, so loops on other
# threads (tests run several) may share it.
_pipes = _Pipes()


class _Flow:
    """One direction of a spliced pair: src socket -> pipe -> dst socket.

    The pipe is the direction's buffer: reads go on while it has room, so the source keeps flowing
    while the destination drains; a full pipe stops reads at the source (backpressure: at most
    PIPE_SIZE in flight, plus the kernel's socket buffers).
    """

    __slots__ = ("copy", "dst", "dst_sock", "eof", "finished", "loop", "pair", "pending", "pipe", "reading", "src",
                 "src_sock", "up", "writing")

    def __init__(self, pair: _SplicePair, src: socket.socket, dst: socket.socket, up: bool) -> None:
        self.pair = pair
        self.loop = pair.loop
        self.src_sock = src
        self.dst_sock = dst
        self.src = src.fileno()
        self.dst = dst.fileno()
        self.up = up
        self.copy = True  # the first bytes are usually small (a request line, a TLS hello)
        self.pipe: tuple[int, int] | None = None
        self.pending = 0  # bytes in the pipe, not yet taken by dst
        self.reading = False
        self.writing = False  # dst took less than we had: a writer callback waits for room
        self.eof = False
        self.finished = False

    def start(self) -> None:
        self.reading = True
        self.loop.add_reader(self.src, self._readable)

    def _readable(self) -> None:
        if self.copy and not self.pending:
            self._copy()
            return
        if self.pipe is None:
            try:
                self.pipe = _pipes.take()
            except OSError as e:
                self.pair.fail(e)
                return
        try:
            n = os.splice(self.src, self.pipe[1], PIPE_SIZE - self.pending, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            n = -1  # the pipe is full (its slots are pages, not bytes), or woken for nothing
        except OSError as e:
            self.pair.fail(e, by_client=self.up)
            return
        if n == 0:
            self.eof = True
            self._stop_reading()
        elif n > 0:
            self.copy = not self.pending and n < COPY_LIMIT  # the source trickles: copy the next read
            self.pending += n
            if self.up:
                self.pair.traffic.up += n
            else:
                self.pair.traffic.down += n
            if self.pending >= PIPE_SIZE:
                self._stop_reading()
        elif self.pending:
            self._stop_reading()
        if not self.writing:  # else dst is known to be full: its writer callback flushes
            self._flush()

    def _copy(self) -> None:
        """Small reads, with the pipe empty: recv and send; what dst does not take waits in the pipe."""
        try:
            data = self.src_sock.recv(COPY_LIMIT)
        except BlockingIOError:
            return
        except OSError as e:
            self.pair.fail(e, by_client=self.up)
            return
        n = len(data)
        if not n:
            self.eof = True
            self._stop_reading()
            self._finish()
            return
        self.copy = n < COPY_LIMIT
        if self.up:
            self.pair.traffic.up += n
        else:
            self.pair.traffic.down += n
        try:
            sent = self.dst_sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self.pair.fail(e, by_client=not self.up)
            return
        if sent < n:
            try:
                self.pipe = _pipes.take()
                # An empty pipe holds at least 64 KiB, more than COPY_LIMIT: this write is whole.
                self.pending = os.write(self.pipe[1], data[sent:])
            except OSError as e:
                self.pair.fail(e)
                return
            self._flush()  # dst is full: this arms the writer callback

    def _writable(self) -> None:
        before = self.pending
        self._flush()
        if self.pending and self.pending < before and not self.reading and not self.eof:
            self.start()  # room in the pipe again

    def _flush(self) -> None:
        while self.pending:
            assert self.pipe is not None
            try:
                self.pending -= os.splice(self.pipe[0], self.dst, self.pending, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                break
            except OSError as e:
                self.pair.fail(e, by_client=not self.up)
                return
        if self.pending:
            if not self.writing:
                self.writing = True
                self.loop.add_writer(self.dst, self._writable)
            return
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dst)
        if self.pipe is not None:
            _pipes.give(self.pipe, empty=True)  # idle connections hold no pipe
            self.pipe = None
        if self.eof:
            self._finish()
        elif not self.reading:
            self.start()

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.src)

    def _finish(self) -> None:
        """Everything before src's EOF reached dst: pass the EOF on."""
        with contextlib.suppress(OSError):  # dst already gone: its own direction reports that
            self.dst_sock.shutdown(socket.SHUT_WR)
        self.finished = True
        self.pair.check_done()

    def stop(self) -> None:
        """Unhook from the loop and drop the pipe (bytes still in it are lost: the pair is aborting)."""
        self._stop_reading()
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dst)
        if self.pipe is not None:
            _pipes.give(self.pipe, empty=self.pending == 0)
            self.pipe = None
            self.pending = 0


class _SplicePair:
    def __init__(self, client: socket.socket, upstream: socket.socket, traffic: Traffic) -> None:
        self.loop = asyncio.get_running_loop()
        self.socks = (client, upstream)
        self.traffic = traffic
        self.flows = (_Flow(self, client, upstream, up=True), _Flow(self, upstream, client, up=False))
        self.error: BaseException | None = None
        self.error_by_client = False
        self.done: asyncio.Future[None] = self.loop.create_future()

    def check_done(self) -> None:
        if all(f.finished for f in self.flows):
            self.close()

    def fail(self, exc: BaseException, *, by_client: bool = False) -> None:
        """Abort the pair; ``by_client``: the client's socket failed (else the far side's, or ours)."""
        if self.error is None:
            self.error, self.error_by_client = exc, by_client
        for sock in self.socks:
            _linger_zero(sock)  # a failed relay must not look like a finished one to either side
        self.close()

    def close(self) -> None:
        """Unhook both flows, then close both sockets (in that order: the loop must not poll a closed fd)."""
        for f in self.flows:
            f.stop()
        for sock in self.socks:
            sock.close()
        if not self.done.done():
            self.done.set_result(None)


async def _relay_splice(client: socket.socket, upstream: socket.socket, traffic: Traffic) -> None:
    pair = _SplicePair(client, upstream, traffic)
    try:
        for flow in pair.flows:
            flow.start()
        # A client usually speaks first, and its bytes are often here already: take them now
        # rather than one loop round trip later.
        pair.flows[0]._readable()
        await pair.done
    except BaseException:
        pair.close()  # cancelled (or the loop refused a socket): abort both ends
        raise
    if pair.error is not None:
        raise RelayBroken(pair.error, by_client=pair.error_by_client) from pair.error
