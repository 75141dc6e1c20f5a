"""The relay protocol of the docker transport: what runs inside one exec, and the two objects that
speak to it from here.

- RELAY_SCRIPT runs in the helper container as one long-lived ``docker exec`` (a *slot*) and
  carries one TCP connection at a time, many in its life.
- ``Slot`` owns that exec's stream: one writer task frames upstream bytes (``LEN\\n`` + bytes, so
  a client's half-close is a ``0\\n`` frame and works over TLS, where an exec stream cannot
  half-close), one reader task sends stdout to the connection and turns stderr lines into events.
- ``DockerStream`` is one client's connection on a slot, with the anyio byte-stream contract.
  When the far side has sent EOF, the relay prints a per-connection random nonce on stdout: the
  bytes before it are the far side's data, and the nonce marks their end, in order.
- With python3 in the helper, RELAY_PYTHON (helper/relay.py) replaces the script: same stdin, but
  bytes and events come in frames on stdout, in one ordered stream: no nonce, no ``F``, no ``Q``.

The pool of slots and ``connect()`` live in tunneld/docker/transport.py, the helper container in
tunneld/docker/helper/.

Why one module of this size: it is one wire protocol seen from two ends. What a ``DockerStream``
knows of the far side (reached or refused, its bytes and their end, errors) is set by its slot's
reader as frames and events arrive, and everything it sends leaves through its slot's writer. The
relays' events (``R``, ``P``, ``C``, ``E``, ``X``, ``D`` and socat's stderr) are read in one place
because one event moves both objects at once. Split into a stream module and a slot module, each
would reach into the other's state.
"""

from __future__ import annotations

import logging
import re
import secrets
import struct
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import anyio
import anyio.abc

from tunneld.config import Timeouts, format_host
from tunneld.docker.api import ExecStream
from tunneld.errors import TransportError
from tunneld.sockets import take

logger = logging.getLogger(__name__)

MAX_FRAME = 4 * 1024 * 1024  # upstream bytes per frame: one dd in the relay each
OUT_HIGH_WATER = 2 * 1024 * 1024  # upstream bytes queued per connection before send() waits
DOWN_HIGH_WATER = 1024 * 1024  # downstream bytes waiting for the client before we stop reading the exec
# A client's first bytes go out right behind the connection request, before the relay has reached
# the target: if it never does, they sit in the FIFO (64 KiB) until the exec moves on, so no more.
FIRST_LIMIT = 32 * 1024

# The script a slot runs: tunneld/docker/helper/relay.sh (its comments say what it speaks). Comment lines
# are dropped: the script travels in every exec-create request.
_SCRIPT_FILE = resources.files("tunneld.docker.helper") / "relay.sh"
RELAY_SCRIPT = "".join(line for line in _SCRIPT_FILE.read_text().splitlines(True) if not line.lstrip().startswith("#"))
# The relay that takes over from the script when the helper image has python3: no process per
# connection (tunneld/docker/helper/relay.py; it runs under the helper's python3, not ours).
RELAY_PYTHON = (resources.files("tunneld.docker.helper") / "relay.py").read_text()
PYTHON_TOO_OLD = "the python relay needs 3.5 or later"  # what helper/relay.py says under an older python3
RELAY_MODES = ("mux", "python", "socat", "nc")


# socat's -d -d notices, "socat[PID] LEVEL TEXT", as socat 1.7.4 (Debian 12) and 1.8.0 (alpine/socat,
# Debian 13) print them for the relay's `socat STDIO TCP:HOST:PORT` (measured; docs/docker-transport.md):
#   connected       N starting data transfer loop with FDs [0,1] and [5,5]                      both
#   far side's EOF  N socket 2 (fd 5) is at EOF                                                 both
#   exit            N exiting with status 0 / N exit(1)                                         both
#   refused         1.7: E connect(5, AF=2 127.0.0.1:1, 16): Connection refused; exit(1)
#                   1.8: W connect(...): Connection refused; E TCP:127.0.0.1:1: Connection refused; exit(1)
#   reset           1.7: W read(5, ...): Connection reset by peer; N socket 2 to socket 1 is in error;
#                        then EOF and exit status 0, so "in error" is what marks the stream broken
#                   1.8: E read(5, ...): Connection reset by peer; exit(1), with no EOF notice
# 1.8 says more on the way ("opening connection to", "successfully connected to"): ignored. What a
# connection needs is read in `Slot._event`, the reason a person sees is made by `short_reason`.
_SOCAT_RE = re.compile(r"socat\[(\d+)\] ([A-Z]) (.*)$")
_SOCAT_EXIT_RE = re.compile(r"exiting with status (\d+)|exit\((\d+)\)")
_SOCAT_EOF_RE = re.compile(r"socket 2 \(fd \d+\) is at EOF")
_SOCAT_IN_ERROR_RE = re.compile(r"socket \d to socket \d is in error")
_SOCAT_IO_RE = re.compile(r"(read|write|recv|send)\w*\(")
# What precedes the reason in an error: the call that failed (1.7: "connect(5, AF=2 ...): ") or the
# socat address whose opening failed (1.8: "TCP:127.0.0.1:1: ", "TCP:[::1]:1: ").
_REASON_RE = re.compile(r"(?:\w+\([^)]*\)|[A-Z][A-Z0-9-]*:\S*): (.*)$")
_PY_HEADER = struct.Struct(">cI")  # helper/relay.py's stdout frames: kind, length
_SOCAT_PRIMED_RE = re.compile(r'N opening named pipe ".*-([0-9a-f]+)" for reading')


class SlotOwner(Protocol):
    """What a slot needs from the pool that owns it (the docker transport)."""

    timeouts: Timeouts

    def release(self, slot: Slot) -> None: ...

    def spawn(self, func: Callable[..., Coroutine[Any, Any, None]], *args: object) -> None: ...


class DockerStream(anyio.abc.ByteStream):
    """One client's connection, carried by a slot; the anyio byte-stream contract."""

    def __init__(self, slot: Slot, host: str, port: int) -> None:
        self.slot = slot
        self.target = f"{format_host(host)}:{port}"
        self.nonce = secrets.token_hex(16).encode()
        # Downstream bytes wait here for the relay; while it is busy sending, they pile up and leave
        # together (one client write for many Docker frames).
        self._down: deque[bytes] = deque()
        self._down_size = 0
        self._down_ready = anyio.Event()  # bytes, the end, or an error to hand out
        self._down_space = anyio.Event()
        self._down_end: BaseException | None = None  # raised once the bytes are handed out
        self.settled = anyio.Event()  # connected, refused, or the slot died
        self.ok = False  # the relay reached host:port
        self.errors: list[str] = []
        self.relay_pid: int | None = None
        self.relay_status: int | None = None
        self.up_eof_written = False
        self.flush_requested = False  # "F" sent: the nonce is on its way
        self.held = b""  # while scanning: bytes that may be the start of the nonce
        self.down_done = False
        self.up_eof = False
        self.quit_sent = False
        self.discard = False  # the client is gone: drop what still arrives
        self.broken: str | None = None

    # ---- the anyio contract (the relay's side)

    async def receive(self, max_bytes: int = 256 * 1024) -> bytes:
        while not self._down:
            if self.discard:
                raise anyio.ClosedResourceError
            if self._down_end is not None:
                raise self._down_end
            self._down_ready = anyio.Event()
            await self._down_ready.wait()
        chunk = take(self._down, max_bytes)
        self._down_size -= len(chunk)
        if self._down_size < DOWN_HIGH_WATER:
            self._down_space.set()
        return chunk

    async def send(self, item: bytes) -> None:
        if self.up_eof or self.discard:
            raise anyio.ClosedResourceError
        if self.broken is not None:
            raise anyio.BrokenResourceError(self.broken)
        if item:
            await self.slot.put_data(item)

    async def send_eof(self) -> None:
        if self.up_eof or self.discard:
            return
        self.up_eof = True
        self.slot.control(b"0\n")
        self.slot.maybe_finish(self)

    async def aclose(self) -> None:
        if not self.discard:
            self.discard = True
            self._down.clear()
            self._down_space.set()
            self._down_ready.set()
            self.slot.abandon(self)

    # ---- events from the slot's reader

    async def feed(self, data: bytes) -> None:
        """Downstream bytes from the relay's stdout; after "F", look for the nonce that ends them."""
        if self.flush_requested:
            data = self.held + data
            at = data.find(self.nonce)
            if at < 0:
                keep = len(self.nonce) - 1
                self.held, data = data[-keep:], data[:-keep]
            else:
                if len(data) > at + len(self.nonce):
                    self.slot.protocol_error("bytes after the end marker")
                self.held = b""
                await self._put(data[:at])
                self.finish_down()
                return
        await self._put(data)

    async def _put(self, data: bytes) -> None:
        if not data or self.discard:
            return
        self._down.append(data)
        self._down_size += len(data)
        self._down_ready.set()
        while self._down_size >= DOWN_HIGH_WATER and not self.discard:  # the client reads slowly: wait
            self._down_space = anyio.Event()
            await self._down_space.wait()

    def finish_down(self) -> None:
        self.down_done = True
        self._end(self.broken)
        self.slot.maybe_finish(self)

    def fail(self, reason: str) -> None:
        """The slot died under this connection: both directions are broken."""
        self.broken = reason
        self.down_done = True
        self._end(reason)
        self.settled.set()

    def _end(self, error: str | None) -> None:
        self._down_end = anyio.BrokenResourceError(error) if error is not None else anyio.EndOfStream()
        self._down_ready.set()
        self._down_space.set()


@dataclass
class _Frame:
    """Upstream bytes that will leave as one ``LEN\\n`` frame."""

    chunks: list[bytes]
    size: int


class Slot:
    """One long-lived exec of RELAY_SCRIPT: carries one connection at a time."""

    def __init__(self, transport: SlotOwner, number: int) -> None:
        self.transport = transport
        self.stream: ExecStream | None = None
        self.number = number
        self.mode = "?"
        self.primed = False  # socat started ahead of each request (FIFO mode)
        self.waiting: set[str] = set()  # targets (keys) whose socat waits on its FIFO
        self.retire = False  # drop this exec after the current connection
        self.ready = anyio.Event()  # "R" seen, or the exec failed before it (then dead is set)
        self.conn: DockerStream | None = None
        self.idle_since = time.monotonic()
        self.dead: str | None = None
        self.scope = anyio.CancelScope()
        self._line = b""
        self._frames = bytearray()  # helper/relay.py's stdout: a frame header or events not yet whole
        self._data_left = 0  # bytes of the current "d" frame still to come
        self._startup_output: list[str] = []
        self._out: deque[bytes | _Frame] = deque()  # control frames, and data waiting to be framed
        self._out_size = 0
        self._wake = anyio.Event()
        self._space = anyio.Event()

    # ---- stdin: one writer task per slot, so frames never interleave and the reader never blocks

    async def put_data(self, data: bytes) -> None:
        """Queue upstream bytes; they leave in frames as large as what piled up (fewer forks in the relay)."""
        while self._out_size >= OUT_HIGH_WATER and self.dead is None:
            self._space = anyio.Event()
            await self._space.wait()
        if self.dead is not None:
            raise anyio.BrokenResourceError(self.dead)
        self._queue(data)

    def _queue(self, data: bytes) -> None:
        last = self._out[-1] if self._out else None
        if isinstance(last, _Frame) and last.size + len(data) <= MAX_FRAME:
            last.chunks.append(data)
            last.size += len(data)
        else:
            self._out.append(_Frame([data], len(data)))
        self._out_size += len(data)
        self._wake.set()

    def control(self, frame: bytes, *, urgent: bool = False) -> None:
        """Queue a control frame; ``urgent`` ones may overtake queued data (never a frame being written)."""
        if urgent:
            self._out.appendleft(frame)
        else:
            self._out.append(frame)
        self._wake.set()

    async def writer(self) -> None:
        try:
            await self._write_loop()
        except TransportError as e:
            self.kill(str(e))

    async def _write_loop(self) -> None:
        assert self.stream is not None
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while self._out:
                # Everything queued leaves in one write: each write is a TLS record and a send(),
                # and a connection's request usually comes with its first bytes.
                parts: list[bytes] = []
                size = 0
                eof = False
                while self._out and size < MAX_FRAME:
                    item = self._out.popleft()
                    if isinstance(item, _Frame):
                        self._out_size -= item.size
                        size += item.size
                        parts += [b"%d\n" % item.size, *item.chunks]
                    else:
                        parts.append(item)
                        eof = eof or item == b"0\n"
                self._space.set()
                await self.stream.write(parts[0] if len(parts) == 1 else b"".join(parts))
                if eof and self.conn is not None:
                    self.conn.up_eof_written = True

    def open(self, host: str, port: int, first: bytes = b"") -> DockerStream:
        """Ask the relay for host:port, with the client's ``first`` bytes (at most FIRST_LIMIT) right
        behind the request: they reach the target one Docker round trip sooner than if we waited."""
        conn = DockerStream(self, host, port)
        self.conn = conn
        self.waiting.discard(relay_key(host, port))  # this request consumes it
        self.control(b"C %s %d %s %s\n" % (host.encode(), port, conn.nonce, relay_key(host, port).encode()))
        if first:
            self._queue(first)
        return conn

    async def run(self) -> None:
        """Read the exec's frames until it ends: stdout to the connection, stderr lines to events."""
        try:
            await self._read_loop()
        except TransportError as e:
            self.kill(str(e))

    async def _read_loop(self) -> None:
        assert self.stream is not None
        while True:
            item = await self.stream.read()
            if item is None:
                return
            kind, data = item
            if kind == ExecStream.STDERR:
                self._line += data
                *lines, self._line = self._line.split(b"\n")
                for raw in lines:
                    self._event(raw.decode(errors="replace").rstrip("\r"))
            elif self.mode == "python":
                await self._python_frames(data)
            elif self.conn is not None and not self.conn.down_done:
                await self.conn.feed(data)
            elif not self.ready.is_set():
                self._startup_output.append(data.decode(errors="replace"))  # e.g. "exec: sh: not found"
            else:
                self.protocol_error(f"{len(data)} unexpected bytes on stdout")

    async def _python_frames(self, data: bytes) -> None:
        """helper/relay.py's stdout: ``d`` frames (the far side's bytes) and ``e`` frames (events), in
        order, so the far side's EOF needs no nonce and no ``F``."""
        view = memoryview(data)
        while view:
            if self._data_left:  # inside a "d" frame: pass its bytes on as they come, no buffering
                chunk, view = view[:self._data_left], view[self._data_left:]
                self._data_left -= len(chunk)
                if self.conn is None or self.conn.down_done:
                    self.protocol_error(f"{len(chunk)} bytes with no connection to take them")
                    return
                await self.conn.feed(bytes(chunk))
                continue
            self._frames += view
            view = view[len(view):]
            while len(self._frames) >= 5:
                kind, size = _PY_HEADER.unpack_from(self._frames)
                if kind == b"d":
                    self._data_left = size
                    view = memoryview(bytes(self._frames[5:]))  # the rest of this read: the frame's bytes first
                    self._frames.clear()
                    break
                if kind != b"e":
                    self.protocol_error(f"unexpected frame {kind!r} of {size} bytes")
                    return
                if len(self._frames) < 5 + size:
                    break
                lines = bytes(self._frames[5:5 + size]).decode(errors="replace").splitlines()
                del self._frames[:5 + size]
                for line in lines:
                    self._event(line)

    def _event(self, line: str) -> None:
        conn = self.conn
        if not self.ready.is_set():
            if line.startswith("R "):
                words = line.split()
                self.mode, self.primed = words[1], "primed" in words
                self.ready.set()
            else:
                self._startup_output.append(line)
            return
        logger.debug("[slot %d] %s", self.number, line)
        if (primed := _SOCAT_PRIMED_RE.search(line)) is not None:
            self.waiting.add(primed.group(1))
            return
        if conn is None:
            return
        m = _SOCAT_RE.search(line)
        if m:
            pid, level, text = m.groups()
            if conn.relay_pid != int(pid):
                return  # a socat waiting for a later connection, not this one's
            if text.startswith("starting data transfer loop"):
                conn.ok = True
                conn.settled.set()
            elif _SOCAT_EOF_RE.match(text):
                self._remote_eof(conn)
            elif _SOCAT_IN_ERROR_RE.match(text) and conn.broken is None:
                # A read or write failed (a reset, most often): socat reports EOF next and exits 0,
                # but the client must see a broken stream, not a clean end.
                conn.broken = short_reason(conn.errors[-1]) if conn.errors else "the connection broke"
            elif level == "W" and _SOCAT_IO_RE.match(text):
                conn.errors.append(text)  # the reason for the "is in error" that follows
            elif (x := _SOCAT_EXIT_RE.match(text)) is not None:
                self._relay_exited(conn, int(x.group(1) or x.group(2)))
            elif level in "EF":
                conn.errors.append(text)
        elif line.startswith("P "):
            conn.relay_pid = int(line[2:]) if line[2:].strip().isdigit() else None
        elif line == "C":
            conn.ok = True
            conn.settled.set()
        elif line == "E":  # helper/relay.py: the far side is at EOF
            self._remote_eof(conn)
        elif line.startswith("X "):
            status = line[2:].strip()
            self._relay_exited(conn, int(status) if status.isdigit() else 1)
        elif line == "D":
            if self.mode == "python":  # it ends a connection by itself once both sides are done
                if not conn.down_done:
                    conn.finish_down()
            elif not conn.quit_sent:
                self.protocol_error("the connection ended before it was quit")
                return
            self.conn = None
            if self.retire:
                self.kill("its relay died mid-connection")
            else:
                self.transport.release(self)
        else:
            conn.errors.append(line.removeprefix("nc: "))

    def _relay_exited(self, conn: DockerStream, status: int) -> None:
        if conn.relay_status is not None:
            return
        conn.relay_status = status
        if status == 0 and not self.primed:
            conn.ok = True  # busybox nc exits 0 at the far side's EOF, maybe before "C"
        elif conn.ok and status != 0:  # socat 1.8 after a reset, or its relay killed ("K")
            conn.broken = short_reason(conn.errors[-1]) if conn.errors else f"the relay exited with status {status}"
        if conn.ok and self.primed and not conn.up_eof_written:
            # Frames still on their way may now block the relay's writer on a FIFO nobody reads:
            # this exec cannot be trusted with another connection.
            self.retire = True
        conn.settled.set()
        self._remote_eof(conn)

    def _remote_eof(self, conn: DockerStream) -> None:
        if self.mode == "python":  # everything before the event was the far side's data
            if not conn.down_done:
                conn.finish_down()
            return
        if not conn.flush_requested:
            conn.flush_requested = True
            self.control(b"F\n", urgent=True)

    def maybe_finish(self, conn: DockerStream) -> None:
        """Both directions are over, or the client left and the far side is done: end the connection."""
        if self.mode == "python":
            return  # the python relay ends it by itself ("D")
        if conn.down_done and (conn.up_eof or conn.discard) and not conn.quit_sent and self.conn is conn:
            conn.quit_sent = True
            self.control(b"Q\n")

    def abandon(self, conn: DockerStream) -> None:
        """The client closed early: let the far side finish within timeouts.drain, else end the relay."""
        if self.conn is not conn or self.dead is not None:
            return
        if conn.down_done and self.mode != "python":
            self.maybe_finish(conn)  # "Q": the script's relay is done with it
            return
        if not conn.up_eof:
            # The far side sees FIN and usually closes soon; the python relay ends the connection by
            # itself once it has this and the far side's EOF.
            conn.up_eof = True
            self.control(b"0\n")
        if not conn.down_done:
            self.transport.spawn(self._abort_later, conn)

    async def _abort_later(self, conn: DockerStream) -> None:
        grace = self.transport.timeouts.drain
        await anyio.sleep(grace)
        if self.conn is conn and not conn.down_done and (self.primed or self.mode == "python"):
            # End just this connection ("K": its socat is killed, or the python relay aborts it): the
            # exec stays.
            logger.debug("[slot %d] %s still open %gs after the client left: ending it",
                         self.number, conn.target, grace)
            self.control(b"K\n", urgent=True)
            await anyio.sleep(grace)
        if self.conn is conn and not conn.down_done:
            self.kill(f"{conn.target} kept the connection open after the client left")

    def protocol_error(self, what: str) -> None:
        logger.warning("[slot %d] relay protocol error (%s); dropping this exec", self.number, what)
        self.kill(f"relay protocol error: {what}")

    def kill(self, reason: str) -> None:
        """Drop this exec: closing its stream closes the relay's stdin, and the relay then kills itself."""
        if self.dead is None:
            self.dead = reason
        self.scope.cancel()
        self.ready.set()
        self._space.set()

    def startup_output(self) -> str:
        return " ".join(s.strip() for s in self._startup_output if s.strip())[:300]



def relay_key(host: str, port: int) -> str:
    """The target as the relay names its FIFO: hex, so no ':' reaches socat's address syntax."""
    return f"{host}:{port}".encode().hex()


def short_reason(reason: str) -> str:
    """socat's error without what failed: "connect(5, AF=2 127.0.0.1:1, 16): Connection refused" (1.7)
    and "TCP:127.0.0.1:1: Connection refused" (1.8) -> "Connection refused"; the same for read(),
    write() and the like."""
    m = _REASON_RE.match(reason)
    return m.group(1) if m else reason

