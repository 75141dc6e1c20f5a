"""The splice path: ``splice(2)`` moves bytes socket -> pipe -> socket inside the kernel.

Taken when both ends are plain TCP sockets on a system with ``os.splice`` (Linux), unless
``KCI_TUNNELD_RELAY`` asks for another path. Each direction is driven by the loop's reader/writer
callbacks; no bulk bytes enter Python, so it needs about half the CPU per GiB of a Protocol relay,
and wiring a connection costs no awaits. docs/performance.md ("How the direct path is fast") has
the measurements behind the choices here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket

from tunneld.engine.relay.common import RelayBroken, Traffic, linger_zero

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


def can_splice(sock: socket.socket) -> bool:
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
            linger_zero(sock)  # a failed relay must not look like a finished one to either side
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
