"""The daemon's end of the multiplexed relay (helper/mux.py): many connections over one exec.

- ``Channel`` owns one exec running helper/mux.py: the frames queued in one turn of the event loop
  leave in one write (a TLS record and a message through dockerd and the shim each), from a loop
  callback, not a writer task (a task wake-up per round trip was measurable); one reader task parses
  the relay's frames and hands each connection its own; a heartbeat finds an exec that stopped
  answering (a frozen relay, a Docker host that went away without a reset).
- ``MuxStream`` is one client's connection on a channel, with the anyio byte-stream contract, and
  with credit both ways: it sends only as many bytes as the relay has room for (its ``W`` frames),
  and the relay sends only as many as this stream has granted. Its grant is renewed as the client
  reads, so a client that never reads stops its own connection and no other: the reader never
  waits on a client, and a connection never holds more than its window here.
- A stream the engine relays to a client's socket is wired to it instead (mux_wired.py): then its
  ``sink`` gets the frames' events as calls, and nothing is queued here.

The frames are described in helper/mux.py. The channels of a helper are kept by
tunneld/docker/transport.py, which also decides which channel carries a new connection.

Why one module of this size: as in execs.py, one wire protocol seen from its two objects. A frame
read by the channel changes one stream's state, and everything a stream sends leaves through its
channel's writer.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Coroutine
from importlib import resources
from typing import Any, Protocol

import anyio
import anyio.abc

from tunneld.config import Timeouts, format_host
from tunneld.docker.api import ExecStream
from tunneld.engine.relay.common import Traffic
from tunneld.errors import TransportError
from tunneld.sockets import take

logger = logging.getLogger(__name__)

# The relay that runs in the helper (it runs under the helper's python3, not ours).
RELAY_MUX = (resources.files("tunneld.docker.helper") / "mux.py").read_text()
HEADER = struct.Struct(">cII")  # kind, connection id, payload length
COUNT = struct.Struct(">I")
DOWN_WINDOW = 4 * 1024 * 1024  # bytes the relay may send a connection before the client has read them
GRANT_AT = DOWN_WINDOW // 4  # read (or written to the client) since the last grant before the next
MAX_FRAME = 256 * 1024  # upstream bytes per data frame
SMALL_FRAME = 2048  # a payload up to this size is joined to its header at once (one piece to write, not two)
OUT_HIGH_WATER = 2 * 1024 * 1024  # bytes written to the exec and not yet taken before senders wait
PROTOCOL = "1"


class ChannelOwner(Protocol):
    """What a channel needs from the transport that runs it."""

    timeouts: Timeouts

    @property
    def helper_label(self) -> str:
        """"helper container NAME", for messages."""
        ...

    def spawn(self, func: Callable[..., Coroutine[Any, Any, None]], *args: object) -> None: ...

    async def reopen(self, host: str, port: int, first: bytes) -> MuxStream:
        """Open host:port again on a live channel, not waiting for the relay's answer (a retry of a
        stream whose exec died before the relay answered for it)."""
        ...


class MuxSink(Protocol):
    """Who takes a stream's events as they come, instead of its queue (mux_wired.py's client socket)."""

    def far_data(self, data: bytes | memoryview) -> None: ...

    def far_credit(self) -> None: ...

    def far_connected(self) -> None: ...

    def far_eof(self) -> None: ...

    def far_failed(self, reason: str) -> None: ...


class _NoWaiter:
    """Where a stream's wake-up Event is until someone waits: a wired stream never does, and making
    two anyio Events per connection was a measurable share of its set-up."""

    def set(self) -> None:
        pass


NO_WAITER = _NoWaiter()


class MuxStream(anyio.abc.ByteStream):
    """One client's connection over a channel; the anyio byte-stream contract."""

    def __init__(self, channel: Channel, cid: int, host: str, port: int) -> None:
        self.channel = channel
        self.cid = cid
        self.host = host
        self.port = port
        self.target = f"{format_host(host)}:{port}"
        self.sink: MuxSink | None = None  # set once wired to a client's socket (mux_wired.py)
        self.first = b""  # the client's bytes sent right behind the open
        self.settled = anyio.Event()  # connected, refused, or the channel died
        self.ok = False
        self.failure: str | None = None  # why it could not connect
        self.seen = False  # the relay answered for it (so a retry elsewhere would connect twice)
        self._down: deque[bytes] = deque()
        self._down_ready: anyio.Event | _NoWaiter = NO_WAITER  # an Event while receive() waits
        self._down_end: BaseException | None = None
        self._granted = 0  # read by the client since the last grant
        self.up_credit = channel.up_window
        self._credit_ready: anyio.Event | _NoWaiter = NO_WAITER  # an Event while send() waits
        self.up_eof = False
        self.down_done = False
        self.discard = False  # the client is gone: drop what still arrives
        self.broken: str | None = None
        self.forgotten = False  # over on both sides: the id is free of traffic

    # ---- the anyio contract

    async def receive(self, max_bytes: int = 256 * 1024) -> bytes:
        while not self._down:
            if self.discard:
                raise anyio.ClosedResourceError
            if self._down_end is not None:
                raise self._down_end
            self._down_ready = anyio.Event()
            await self._down_ready.wait()
        chunk = take(self._down, max_bytes)  # what piled up while the client was busy: one write to it
        self._grant(len(chunk))
        return chunk

    def _grant(self, size: int) -> None:
        # Renewed once a quarter of the window was read: fewer frames, and the relay never runs dry
        # while the client keeps up.
        self._granted += size
        if self._granted >= GRANT_AT:
            self.grant(self._granted)
            self._granted = 0

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        while view:
            if self.up_eof or self.discard:
                raise anyio.ClosedResourceError
            if self.broken is not None:
                raise anyio.BrokenResourceError(self.broken)
            if self.up_credit <= 0:
                self._credit_ready = anyio.Event()
                await self._credit_ready.wait()
                continue
            view = view[self.send_now(view):]
            await self.channel.drain()

    def send_now(self, view: bytes | memoryview) -> int:
        """Send as much of ``view`` as the credit allows, in one frame (no copy: joined once into the
        write); returns how many bytes went."""
        take = min(len(view), self.up_credit, MAX_FRAME)
        if take > 0:
            self.up_credit -= take
            self.channel.send_frame(b"D", self.cid, view[:take] if take < len(view) else view)
        return max(take, 0)

    async def send_eof(self) -> None:
        self.eof_now()

    def eof_now(self) -> None:
        """The client's EOF, behind the bytes already sent."""
        if self.up_eof or self.discard:
            return
        self.up_eof = True
        if self.broken is None:
            self.channel.send_frame(b"E", self.cid)
        self._maybe_forget()

    def abort_now(self) -> None:
        """The client is gone with a reset: reset the far side's connection too, now."""
        self.discard = True
        if not self.forgotten and self.broken is None:
            self.channel.send_frame(b"K", self.cid)
        self._forget()

    def grant(self, size: int) -> None:
        """Let the relay send ``size`` more bytes (the client took them)."""
        if not self.down_done and not self.forgotten:
            self.channel.send_frame(b"W", self.cid, COUNT.pack(size))

    async def aclose(self) -> None:
        if self.discard:
            return
        self.discard = True
        self._down.clear()
        self._down_ready.set()
        self._credit_ready.set()
        if self.forgotten or self.broken is not None:
            self._maybe_forget()
            return
        if not self.up_eof:
            # The far side sees FIN and usually closes soon; if it does not within timeouts.drain,
            # it is reset ("K").
            self.up_eof = True
            self.channel.send_frame(b"E", self.cid)
        if self.down_done:
            self._maybe_forget()
        else:
            self.channel.owner.spawn(self._abort_later)

    async def _abort_later(self) -> None:
        await anyio.sleep(self.channel.owner.timeouts.drain)
        if not self.forgotten:
            logger.debug("[channel %d conn %d] %s still open %gs after the client left: resetting it",
                         self.channel.number, self.cid, self.target, self.channel.owner.timeouts.drain)
            self.channel.send_frame(b"K", self.cid)
            self._forget()

    # ---- frames from the channel's reader

    def feed(self, data: bytes | memoryview) -> None:
        if self.sink is not None:
            self.sink.far_data(data)
            return
        if self.discard:
            self.channel.send_frame(b"W", self.cid, COUNT.pack(len(data)))  # let the far side drain
            return
        self._down.append(data if isinstance(data, bytes) else bytes(data))
        self._down_ready.set()

    def credit(self, size: int) -> None:
        self.up_credit += size
        if self.sink is not None:
            self.sink.far_credit()
        self._credit_ready.set()

    def connected(self) -> None:
        self.seen = self.ok = True
        self.settled.set()
        if self.sink is not None:
            self.sink.far_connected()

    def refused(self, reason: str) -> None:
        self.seen = True
        self.failure = reason
        self.fail(reason)

    def far_eof(self) -> None:
        self.down_done = True
        self._end(anyio.EndOfStream())
        self._maybe_forget()
        if self.sink is not None:
            self.sink.far_eof()

    def fail(self, reason: str) -> None:
        """A read or write failed at the relay, or the channel died: both directions are broken."""
        if self.broken is not None:
            return
        self.broken = reason
        self.down_done = True
        self._end(anyio.BrokenResourceError(reason))
        self._forget()
        self.settled.set()
        if self.sink is not None:
            self.sink.far_failed(reason)

    def take_queued(self) -> tuple[list[bytes], BaseException | None]:
        """What arrived before a sink was set (bytes, then how the stream ended, if it did), once."""
        queued, self._down = list(self._down), deque()
        return queued, self._down_end

    async def relay_socket(self, client: socket.socket, traffic: Traffic) -> None:
        """The relay's fast path (tunneld/engine/relay/__init__.py): wire this stream to the client's
        socket, both ways by callbacks; the stream is used up by it.

        :raises RelayBroken: when either side failed; both are closed by then.
        :raises TransportError: when the far side refused a stream opened early; the client got a
            clean EOF.
        """
        from tunneld.docker.mux_wired import WiredMux  # one module per path, as the engine's relay

        wired = WiredMux(self, traffic)
        await wired.wire(client)
        await wired.wait()

    def _end(self, end: BaseException) -> None:
        self._down_end = end
        self._down_ready.set()
        self._credit_ready.set()

    def _maybe_forget(self) -> None:
        if self.down_done and self.up_eof:
            self._forget()

    def _forget(self) -> None:
        if not self.forgotten:
            self.forgotten = True
            self.channel.forget(self)


class Channel:
    """One exec of helper/mux.py carrying many connections."""

    def __init__(self, owner: ChannelOwner, number: int) -> None:
        self.owner = owner
        self.number = number
        self.stream: ExecStream | None = None
        self.ready = anyio.Event()  # "R mux" seen, or the exec failed before it (then dead is set)
        self.mode = "?"  # "mux", or what relay.sh said instead ("socat", "nc": no python3)
        self.up_window = 0
        self.dead: str | None = None
        self.scope = anyio.CancelScope()
        self.conns: dict[int, MuxStream] = {}
        self.opened = 0
        self._next_id = 0
        self._line = b""
        self._startup_output: list[str] = []
        self._buf = bytearray()  # a frame header not yet whole
        self._data_left = 0  # bytes of the current "D" frame still to come
        self._data_conn: MuxStream | None = None
        self.last_heard = time.monotonic()
        self._drain_waiters: list[Callable[[], None]] = []

    # ---- connections

    def open(self, host: str, port: int, first: bytes = b"") -> MuxStream:
        """Ask the relay for host:port, with the client's ``first`` bytes right behind the request
        (up to the relay's window): they reach the target one Docker round trip sooner."""
        self._next_id += 1
        conn = MuxStream(self, self._next_id, host, port)
        self.conns[conn.cid] = conn
        self.opened += 1
        self.send_frame(b"O", conn.cid, b"%s %d %d" % (host.encode(), port, DOWN_WINDOW))
        if first:
            conn.first = first[:conn.up_credit]
            conn.up_credit -= len(conn.first)
            self.send_frame(b"D", conn.cid, conn.first)
        if self.dead is not None:
            conn.fail(self.dead)
        return conn

    def forget(self, conn: MuxStream) -> None:
        self.conns.pop(conn.cid, None)

    @property
    def load(self) -> int:
        return len(self.conns)

    # ---- stdin: one writer task, so frames never interleave and the reader never blocks

    def send_frame(self, kind: bytes, cid: int, payload: bytes | memoryview = b"") -> None:
        """Queue a frame for the relay: what is queued in one turn of the loop leaves in one write."""
        if self.dead is not None or self.stream is None:
            return
        if len(payload) <= SMALL_FRAME:
            self.stream.write_soon(HEADER.pack(kind, cid, len(payload)) + payload)
        else:
            self.stream.write_soon(HEADER.pack(kind, cid, len(payload)))
            self.stream.write_soon(payload)

    def over_high_water(self) -> bool:
        """The Docker host has not taken OUT_HIGH_WATER of what we wrote (credit bounds each
        connection; this bounds them all together)."""
        return self.stream is not None and self.dead is None and self.stream.buffered() > OUT_HIGH_WATER

    async def drain(self) -> None:
        """Wait while ``over_high_water()``."""
        assert self.stream is not None
        if self.over_high_water():
            try:
                await self.stream.drain()
            except TransportError as e:
                self.kill(str(e))

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once ``over_high_water()`` is over (or the channel died)."""
        self._drain_waiters.append(callback)
        if len(self._drain_waiters) == 1:
            self.owner.spawn(self._wake_drained)

    async def _wake_drained(self) -> None:
        try:
            while self.over_high_water():
                await self.drain()
        finally:
            waiters, self._drain_waiters = self._drain_waiters, []
            for callback in waiters:
                callback()

    async def heartbeat(self) -> None:
        """Ping every few seconds; an exec that has not answered anything for a while is dead."""
        interval = max(1.0, min(5.0, self.owner.timeouts.connect / 2))
        while True:
            await anyio.sleep(interval)
            if time.monotonic() - self.last_heard > 3 * interval:
                self.kill(f"the relay has not answered for {3 * interval:g}s")
                return
            self.send_frame(b"P", 0)

    # ---- stdout and stderr

    async def run(self) -> None:
        """Take the exec's output, as it arrives, until it ends."""
        assert self.stream is not None
        try:
            await self.stream.pump(self._output)
        except TransportError as e:
            self.kill(str(e))

    def _output(self, kind: int, data: bytes | memoryview) -> None:
        if self.dead is not None:
            return
        self.last_heard = time.monotonic()
        if kind == ExecStream.STDERR:
            self._stderr(data)
        elif self.mode == "mux":
            self._frames(data)
        elif not self.ready.is_set():
            self._startup_output.append(bytes(data).decode(errors="replace"))
        else:
            self.protocol_error(f"{len(data)} bytes before the relay said what it is")

    def _stderr(self, data: bytes | memoryview) -> None:
        self._line += data
        *lines, self._line = self._line.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").rstrip("\r")
            if self.ready.is_set():
                logger.warning("[channel %d] the relay says: %s", self.number, line)
            elif line.startswith("R "):
                words = line.split()
                self.mode = words[1]
                if self.mode == "mux":
                    if words[2:3] != [PROTOCOL]:
                        self.kill(f"the helper's relay speaks protocol {words[2:3]}, not {PROTOCOL}")
                        return
                    self.up_window = int(words[3])
                self.ready.set()
            else:
                self._startup_output.append(line)

    def _frames(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._data_left:  # inside a "D" frame: hand its bytes on as they come
                chunk, view = view[:self._data_left], view[self._data_left:]
                self._data_left -= len(chunk)
                if self._data_conn is not None:
                    # Most reads lie wholly inside one "D" frame: hand the read on, or a view of it.
                    self._data_conn.feed(data if len(chunk) == len(data) else chunk)
                continue
            if len(self._buf) < HEADER.size:
                need = HEADER.size - len(self._buf)
                self._buf += view[:need]
                view = view[need:]
                if len(self._buf) < HEADER.size:
                    return
            kind, cid, size = HEADER.unpack(self._buf)
            if kind == b"D":
                self._buf.clear()
                self._data_left = size
                self._data_conn = self.conns.get(cid)
                continue
            if len(self._buf) + len(view) < HEADER.size + size:
                self._buf += view
                return
            take = HEADER.size + size - len(self._buf)
            payload = bytes(self._buf[HEADER.size:]) + bytes(view[:take])
            view = view[take:]
            self._buf.clear()
            self._control(kind, cid, payload)

    def _control(self, kind: bytes, cid: int, payload: bytes) -> None:
        if kind == b"P":
            return  # a pong: reading it was the point (last_heard)
        conn = self.conns.get(cid)
        if conn is None:
            return  # for a connection already over here (reset after the client left)
        if kind == b"W":
            conn.credit(COUNT.unpack(payload)[0])
        elif kind == b"C":
            conn.connected()
        elif kind == b"E":
            conn.far_eof()
        elif kind == b"F":
            conn.refused(payload.decode(errors="replace"))
        elif kind == b"X":
            conn.fail(payload.decode(errors="replace"))
        else:
            self.protocol_error(f"unexpected frame {kind!r}")

    def protocol_error(self, what: str) -> None:
        logger.warning("[channel %d] relay protocol error (%s); dropping this exec", self.number, what)
        self.kill(f"relay protocol error: {what}")

    def kill(self, reason: str) -> None:
        """Drop this exec and fail every connection on it (the relay ends when its stdin goes away)."""
        if self.dead is None:
            self.dead = reason
        self.scope.cancel()
        self.ready.set()
        for conn in list(self.conns.values()):
            conn.fail(f"the exec carrying this connection ended: {reason}")
        self.conns.clear()

    def startup_output(self) -> str:
        return " ".join(s.strip() for s in self._startup_output if s.strip())[:300]
