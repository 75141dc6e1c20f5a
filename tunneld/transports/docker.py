"""--via docker: reach host:port as a helper container on the Docker host sees it, over exec streams.

How it works (docs/docker-transport.md has the full story and the numbers):

- A helper container runs on the Docker host with host networking (``--net=host``), idle. It needs
  only a POSIX shell, ``sleep``, ``dd`` and either socat or busybox ``nc``.
- A *slot* is one long-lived ``docker exec`` of RELAY_SCRIPT with stdin/stdout/stderr attached. It
  carries one TCP connection at a time and many in its life, so the ~80 ms an exec costs is paid
  once per slot, not per connection. A pool keeps ``pool_size`` idle slots warm, grows under load
  and is refilled in the background when slots (or the whole helper) go away.
- With socat, each slot keeps a socat per target already started and blocked opening a FIFO, so a
  request costs no process start; it connects only when a request opens the FIFO.
- Upstream bytes are framed in band (``LEN\\n`` + bytes), so a client's half-close is a ``0\\n``
  frame: it works the same over a unix socket and over TLS, where an exec stream cannot half-close.
- Downstream bytes arrive raw on stdout. When the far side has sent EOF (socat's log on stderr, or
  busybox nc's exit) we ask the relay to print a per-connection random nonce on stdout (``F``):
  everything before it is the far side's data, and the nonce marks its end, in order.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from tunneld.config import Timeouts, TransportSpec, format_host
from tunneld.docker_api import DockerAPIError, DockerClient, Endpoint, ExecStream, resolve_endpoint
from tunneld.errors import TransportError

logger = logging.getLogger(__name__)

HELPER_LABELS = {"io.kci-tunneld.role": "helper"}
# The helper's main process: idle forever, but let `docker stop` end it at once.
HELPER_ENTRYPOINT = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 86400 & wait $!; done"]

MAX_SLOTS = 512  # one exec (and one Docker connection) each
IDLE_TTL = 60.0  # idle slots beyond pool_size are closed after this long
EXEC_STARTS_AT_ONCE = 4  # runc starts barely overlap on small hosts: more would only queue
MAX_FRAME = 4 * 1024 * 1024  # upstream bytes per frame: one dd in the relay each
OUT_HIGH_WATER = 2 * 1024 * 1024  # upstream bytes queued per connection before send() waits
DOWN_HIGH_WATER = 1024 * 1024  # downstream bytes waiting for the client before we stop reading the exec
PULL_TIMEOUT = 600.0
# A client's first bytes go out right behind the connection request, before the relay has reached
# the target: if it never does, they sit in the FIFO (64 KiB) until the exec moves on, so no more.
FIRST_LIMIT = 32 * 1024

# One connection at a time over this exec. stdin: "C HOST PORT NONCE KEY", then frames: "LEN" + LEN
# bytes, "0" (upstream EOF), "F" (print NONCE on stdout: downstream is over), "Q" (connection over),
# "K" (kill this connection's relay), anything else kills this exec. stderr: "R MODE" (ready),
# "P PID" (the relay process for this connection), "C" (nc connected), socat's notices,
# "X STATUS" (relay exited), "D" (connection over, next request please).
#
# With socat and a FIFO (mkfifo in a writable /tmp), a socat for each target this exec has served
# is started ahead of time, blocked opening its FIFO: it has loaded and only connects once a request
# opens the FIFO, so a connection costs no process start. The shell keeps a read end of the FIFO
# open while writing to it, so a frame is never cut short by EPIPE (that would desynchronise the
# framing); a relay that dies mid-connection gets its exec retired instead. Without a FIFO, or with
# busybox nc, each connection forks a pipeline "frames | relay" and the relay drains what is left.
RELAY_SCRIPT = r"""
exec 3>&1
trap '' PIPE
T=$1
read -r _ _ _ _ pg _ </proc/self/stat
f=/tmp/.kci-tunneld-$$
die() { rm -f "$f"-*; if [ "$pg" = $$ ]; then kill 0; fi; exit 1; }
if command -v socat >/dev/null 2>&1; then mode=socat
elif command -v nc >/dev/null 2>&1; then mode=nc
else echo "Z the helper image has neither socat nor nc" >&2; exit 1; fi
fifo=
if [ $mode = socat ]; then
  rm -f "$f"-* 2>/dev/null
  if mkfifo "$f-probe" 2>/dev/null || busybox mkfifo "$f-probe" 2>/dev/null; then fifo=1; rm -f "$f-probe"; fi
fi
addr() { case $1 in *:*) echo "[$1]:$2" ;; *) echo "$1:$2" ;; esac; }
prime() {  # HOST PORT KEY (KEY: the target in hex, safe in a file name and in a socat address)
  [ -p "$f-$3" ] || mkfifo "$f-$3" 2>/dev/null || busybox mkfifo "$f-$3" || die
  socat -d -d -t 86400 -b 262144 "GOPEN:$f-$3,rdonly!!STDOUT" "TCP:$(addr "$1" "$2"),connect-timeout=$T" </dev/null &
  echo $! >"$f-$3.pid"
}
watch() {
  n=0
  while { read -r st </proc/$1/stat; } 2>/dev/null; do
    case ${st#*) } in Z*) return ;; esac
    l=$(ls -l /proc/$1/fd/ 2>/dev/null)
    case $l in *socket:*)
      ino=${l##*socket:\[}; ino=${ino%%\]*}
      if grep -qs "^ *[0-9]*: [0-9A-F]*:[0-9A-F]* [0-9A-F]*:[0-9A-F]* 0[18] .* $ino " /proc/net/tcp /proc/net/tcp6
      then echo C >&2; return; fi
    esac
    n=$((n+1)); [ $n -gt 3 ] && sleep 0.01
  done
}
frames() {
  while :; do
    read -r n || die
    case $n in
      [1-9]*) dd bs=262144 count="$n" iflag=count_bytes 2>/dev/null ;;
      0) exec >/dev/null 5>&- ;;
      F) printf %s "$nonce" >&3 ;;
      Q) return ;;
      K) if [ -n "$fifo" ]; then kill "$sp" 2>/dev/null; else die; fi ;;
      *) die ;;
    esac
  done
}
relay() {
  exec 3>&-
  if [ $mode = socat ]; then
    (read -r pid _ </proc/self/stat; echo "P $pid" >&2
     exec socat -d -d -t 86400 -b 262144 STDIO "TCP:$(addr "$1" "$2"),connect-timeout=$T")
  else
    exec 4<&0
    nc -w "$T" "$1" "$2" <&4 4<&- &
    echo "P $!" >&2
    watch $!
    wait $!
  fi
  echo "X $?" >&2
  exec cat >/dev/null
}
[ -n "$fifo" ] && [ -n "$4" ] && prime "$2" "$3" "$4"
echo "R $mode${fifo:+ primed}" >&2
while read -r op host port nonce key; do
  [ "$op" = C ] || die
  if [ -n "$fifo" ]; then
    p="$f-$key"
    { read -r sp <"$p.pid" && kill -0 "$sp"; } 2>/dev/null || prime "$host" "$port" "$key"
    read -r sp <"$p.pid"
    echo "P $sp" >&2
    exec 5>"$p" 6<"$p"
    frames >&5
    exec 5>&- 6<&-
    wait "$sp"
    echo "X $?" >&2
    echo D >&2
    prime "$host" "$port" "$key"
  else
    frames | relay "$host" "$port"
    echo D >&2
  fi
done
die
"""

_HOST_RE = re.compile(r"^[A-Za-z0-9._:%-]+$")
_SOCAT_RE = re.compile(r"socat\[(\d+)\] ([A-Z]) (.*)$")
_SOCAT_EXIT_RE = re.compile(r"exiting with status (\d+)|exit\((\d+)\)")
_SOCAT_EOF_RE = re.compile(r"socket 2 \(fd \d+\) is at EOF")
_SOCAT_PRIMED_RE = re.compile(r'N opening named pipe ".*-([0-9a-f]+)" for reading')


class DockerStream(anyio.abc.ByteStream):
    """One client's connection, carried by a slot; the anyio byte-stream contract."""

    def __init__(self, slot: _Slot, host: str, port: int) -> None:
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
        first = self._down.popleft()
        if len(first) > max_bytes:
            self._down.appendleft(first[max_bytes:])
            first = first[:max_bytes]
        parts = [first]
        size = len(first)
        while self._down and size + len(self._down[0]) <= max_bytes:
            chunk = self._down.popleft()
            parts.append(chunk)
            size += len(chunk)
        self._down_size -= size
        if self._down_size < DOWN_HIGH_WATER:
            self._down_space.set()
        return first if len(parts) == 1 else b"".join(parts)

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


class _Slot:
    """One long-lived exec of RELAY_SCRIPT: carries one connection at a time."""

    def __init__(self, transport: DockerTransport, number: int) -> None:
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
                item = self._out.popleft()
                if isinstance(item, _Frame):
                    self._out_size -= item.size
                    self._space.set()
                    await self.stream.write(b"".join([b"%d\n" % item.size, *item.chunks]))
                    continue
                await self.stream.write(item)
                if item == b"0\n" and self.conn is not None:
                    self.conn.up_eof_written = True

    def open(self, host: str, port: int, first: bytes = b"") -> DockerStream:
        """Ask the relay for host:port, with the client's ``first`` bytes (at most FIRST_LIMIT) right
        behind the request: they reach the target one Docker round trip sooner than if we waited."""
        conn = DockerStream(self, host, port)
        self.conn = conn
        self.waiting.discard(_key(host, port))  # this request consumes it
        self.control(b"C %s %d %s %s\n" % (host.encode(), port, conn.nonce, _key(host, port).encode()))
        if first:
            self._out.append(_Frame([first], len(first)))
            self._out_size += len(first)
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
            elif self.conn is not None and not self.conn.down_done:
                await self.conn.feed(data)
            elif not self.ready.is_set():
                self._startup_output.append(data.decode(errors="replace"))  # e.g. "exec: sh: not found"
            else:
                self.protocol_error(f"{len(data)} unexpected bytes on stdout")

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
            elif (x := _SOCAT_EXIT_RE.match(text)) is not None:
                self._relay_exited(conn, int(x.group(1) or x.group(2)))
            elif level in "EF":
                conn.errors.append(text)
        elif line.startswith("P "):
            conn.relay_pid = int(line[2:]) if line[2:].strip().isdigit() else None
        elif line == "C":
            conn.ok = True
            conn.settled.set()
        elif line.startswith("X "):
            status = line[2:].strip()
            self._relay_exited(conn, int(status) if status.isdigit() else 1)
        elif line == "D":
            if not conn.quit_sent:
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
        elif conn.ok and status != 0:
            conn.broken = conn.errors[-1] if conn.errors else f"the relay exited with status {status}"
        if conn.ok and self.primed and not conn.up_eof_written:
            # Frames still on their way may now block the relay's writer on a FIFO nobody reads:
            # this exec cannot be trusted with another connection.
            self.retire = True
        conn.settled.set()
        self._remote_eof(conn)

    def _remote_eof(self, conn: DockerStream) -> None:
        if not conn.flush_requested:
            conn.flush_requested = True
            self.control(b"F\n", urgent=True)

    def maybe_finish(self, conn: DockerStream) -> None:
        """Both directions are over, or the client left and the far side is done: end the connection."""
        if conn.down_done and (conn.up_eof or conn.discard) and not conn.quit_sent and self.conn is conn:
            conn.quit_sent = True
            self.control(b"Q\n")

    def abandon(self, conn: DockerStream) -> None:
        """The client closed early: let the far side finish within timeouts.drain, else end the relay."""
        if self.conn is not conn or self.dead is not None:
            return
        if conn.down_done:
            self.maybe_finish(conn)
            return
        if not conn.up_eof:
            conn.up_eof = True
            self.control(b"0\n")  # the far side sees FIN and usually closes soon
        self.transport.spawn(self._abort_later, conn)

    async def _abort_later(self, conn: DockerStream) -> None:
        grace = self.transport.timeouts.drain
        await anyio.sleep(grace)
        if self.conn is conn and not conn.down_done and self.primed:
            # Kill just this connection's socat ("K"): the exec and its other socats stay.
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


class _Waiter:
    def __init__(self) -> None:
        self.event = anyio.Event()
        self.slot: _Slot | None = None


class DockerTransport:
    """Opens streams to host:port as seen from a helper container on the Docker host."""

    name = "docker"
    pipelines_first_bytes = True

    def __init__(self, spec: TransportSpec, timeouts: Timeouts) -> None:
        self.settings = spec.docker
        self.timeouts = timeouts
        self.endpoint: Endpoint | None = None
        self.client: DockerClient | None = None
        self.helper_id: str | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._helper_lock = anyio.Lock()
        self._exec_starts = anyio.Semaphore(EXEC_STARTS_AT_ONCE)
        self._idle: list[_Slot] = []
        self._waiters: deque[_Waiter] = deque()
        self._slots: set[_Slot] = set()
        self._starting = 0
        self._numbers = 0
        self._closing = False
        self._last_error: str | None = None
        self._failures = 0
        self.reconnects = 0
        self.mode = "?"
        self._hint: tuple[str, int] | None = None
        self._primed = False
        self._helper_suspect = False
        self.connections = 0
        self.execs_started = 0

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> DockerTransport:
        """Reach the Docker host, make sure the helper runs, start one slot to prove it works.

        :raises TransportError: naming the Docker host (or helper image) and what to check.
        """
        self.endpoint = resolve_endpoint(self.settings)
        client = DockerClient(self.endpoint, timeout=self.timeouts.connect)
        await client.__aenter__()
        try:
            self.client = client
            version = await client.ping()
            logger.info("docker: %s (engine %s, API %s)", self.endpoint.describe(),
                        version.get("Version", "?"), version.get("ApiVersion", "?"))
            await self._ensure_helper(None)
            tg = anyio.create_task_group()
            await tg.__aenter__()
            self._tg = tg
        except BaseException:
            await client.__aexit__(None, None, None)
            raise
        try:
            self.release(await self._start_slot())
        except BaseException as e:
            await self.__aexit__(type(e), e, e.__traceback__)
            raise
        self._top_up()
        tg.start_soon(self._housekeeping)
        logger.info("docker: helper %s (%s) ready, relay %s, pool %d", self.settings.helper_name,
                    self.settings.helper_image, self.mode, self.settings.pool_size)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing = True
        try:
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
                await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            self._tg = None
            if self.client is not None:
                await self.client.__aexit__(None, None, None)
                self.client = None

    def spawn(self, func: Callable[..., Coroutine[Any, Any, None]], *args: object) -> None:
        """Run a helper task in the transport's task group (it ends with the transport)."""
        if self._tg is not None:
            self._tg.start_soon(func, *args)

    # ---------------------------------------------------------------- the helper container

    async def _ensure_helper(self, stale_id: str | None) -> str:
        """Reuse the helper if it runs our image, start it if stopped, (re)create it otherwise."""
        assert self.client is not None
        async with self._helper_lock:
            if self.helper_id is not None and self.helper_id != stale_id:
                return self.helper_id  # someone else already repaired it
            name, image = self.settings.helper_name, self.settings.helper_image
            image_id = await self._image_id(image)
            info = await self.client.inspect_container(name)
            if info is not None and info.labels.get("io.kci-tunneld.role") != "helper":
                raise TransportError(
                    f"a container named {name} exists on {self.client.endpoint.host} but was not created by "
                    "kci-tunneld; remove it or choose another docker.helper_name"
                )
            if info is not None and info.image_id != image_id:
                logger.info("docker: helper %s runs another image than %s; recreating it", name, image)
                await self.client.remove_container(info.id)
                info = None
            if info is None:
                cid = await self._create_helper(name, image)
                logger.info("docker: created helper container %s (%s) on %s", name, image, self.client.endpoint.host)
            else:
                cid = info.id
            if info is None or not info.running:
                await self.client.start_container(cid)
            self.helper_id = cid
            return cid

    async def _image_id(self, image: str) -> str:
        assert self.client is not None
        image_id = await self.client.image_id(image)
        if image_id is None:
            logger.info("docker: pulling helper image %s", image)
            try:
                await self.client.pull_image(image, deadline=PULL_TIMEOUT)
            except TransportError as e:
                raise TransportError(
                    f"helper image {image} is not on the Docker host and could not be pulled ({e}); "
                    "load it there or set --helper-image"
                ) from None
            image_id = await self.client.image_id(image)
        if image_id is None:
            raise TransportError(f"helper image {image} is still missing on the Docker host after a pull")
        return image_id

    async def _create_helper(self, name: str, image: str) -> str:
        assert self.client is not None
        try:
            return await self.client.create_container(
                name, image, entrypoint=HELPER_ENTRYPOINT[:1], cmd=HELPER_ENTRYPOINT[1:], labels=HELPER_LABELS
            )
        except DockerAPIError as e:
            if e.status != 409:
                raise
        # Another daemon created it between our inspect and create: use theirs.
        info = await self.client.inspect_container(name)
        if info is None:
            raise TransportError(f"helper container {name} vanished while being created; try again")
        return info.id

    async def cleanup(self) -> None:
        """Remove the helper container (``stop --cleanup``)."""
        self._closing = True
        for slot in list(self._slots):
            slot.kill("cleanup")
        if self.client is None:
            return
        info = await self.client.inspect_container(self.settings.helper_name)
        if info is not None and info.labels.get("io.kci-tunneld.role") == "helper":
            await self.client.remove_container(info.id)
            logger.info("docker: removed helper container %s", self.settings.helper_name)

    # ---------------------------------------------------------------- the slot pool

    async def _start_slot(self) -> _Slot:
        """Start one exec of the relay and wait until it reports ready.

        :raises TransportError: when the exec cannot be started or the relay does not come up.
        """
        assert self._tg is not None
        async with self._exec_starts:
            self._numbers += 1
            slot = _Slot(self, self._numbers)
            self._tg.start_soon(self._run_slot, slot)
            with anyio.move_on_after(self.timeouts.connect):
                await slot.ready.wait()
            if not slot.ready.is_set():
                slot.kill(f"the relay in helper {self.settings.helper_name} did not start within "
                          f"{self.timeouts.connect:g}s {slot.startup_output()}".rstrip())
        if slot.dead is not None:
            raise TransportError(slot.dead)
        self.mode, self._primed = slot.mode, slot.primed
        return slot

    async def _open_exec(self, cmd: list[str]) -> tuple[AbstractAsyncContextManager[ExecStream], ExecStream]:
        assert self.client is not None
        if self._closing:
            raise TransportError("the docker transport is shutting down")
        if self._helper_suspect:
            self._helper_suspect = False
            await self._ensure_helper(self.helper_id)
        helper = self.helper_id or self.settings.helper_name
        for attempt in (1, 2):
            cm = self.client.exec_stream(helper, cmd)
            try:
                return cm, await cm.__aenter__()
            except DockerAPIError as e:
                gone = e.status in (404, 409) or "is not running" in str(e)  # 500 while being removed
                if not gone or attempt == 2 or self._closing:
                    raise
                # The helper was removed or stopped under us: repair it, then try once more.
                logger.info("docker: helper container %s is gone or stopped; recreating it", self.settings.helper_name)
                helper = await self._ensure_helper(self.helper_id)
        raise AssertionError("unreachable")

    async def _run_slot(self, slot: _Slot) -> None:
        # The last target reached: a new slot starts a socat for it ahead of its first request.
        hint = [self._hint[0], str(self._hint[1]), _key(*self._hint)] if self._hint else []
        cmd = ["/bin/sh", "-c", RELAY_SCRIPT, "kci-tunneld-relay", str(math.ceil(self.timeouts.connect)), *hint]
        try:
            cm, slot.stream = await self._open_exec(cmd)
        except TransportError as e:
            slot.kill(str(e))
            return
        self.execs_started += 1
        self._slots.add(slot)
        try:
            with slot.scope:
                async with anyio.create_task_group() as io:
                    io.start_soon(slot.writer)
                    await slot.run()
                    io.cancel_scope.cancel()
            if slot.mode not in ("socat", "nc") and slot.dead is None:
                slot.kill(await self._why_no_relay(slot))
            slot.kill("the exec ended")
        finally:
            self._slots.discard(slot)
            if slot in self._idle:
                self._idle.remove(slot)
            if slot.conn is not None:
                slot.conn.fail(f"the exec carrying this connection ended: {slot.dead}")
            with anyio.CancelScope(shield=True):
                await cm.__aexit__(None, None, None)
            logger.debug("[slot %d] closed: %s", slot.number, slot.dead)
            if not self._closing:
                self._top_up()

    async def _why_no_relay(self, slot: _Slot) -> str:
        """The exec ended before the relay said it was ready: the helper went away, or its image lacks tools."""
        assert self.client is not None
        with anyio.CancelScope(shield=True):
            try:
                info = await self.client.inspect_container(self.settings.helper_name)
            except TransportError as e:
                return str(e)
        if info is None or not info.running:
            self._helper_suspect = True  # the next exec repairs it first
            return f"helper container {self.settings.helper_name} stopped or was removed"
        return (f"helper image {self.settings.helper_image} cannot run the relay (it needs sh, sleep, dd, "
                f"and socat or nc): {slot.startup_output() or 'the exec ended without output'}")

    async def _fill_one(self) -> None:
        try:
            slot = await self._start_slot()
        except TransportError as e:
            self._starting -= 1
            self._failures += 1
            self._last_error = str(e)
            if not self._closing:
                logger.warning("docker: could not start a relay stream: %s", e)
            await anyio.sleep(min(0.1 * 2 ** min(self._failures, 6), 5.0))
            self._top_up()
            return
        self._starting -= 1
        if self._failures:
            self.reconnects += 1  # relay streams start again after the Docker host was unreachable
            logger.info("docker: relay streams start again after %d failed attempt(s)", self._failures)
        self._failures = 0
        self._last_error = None
        self.release(slot)

    def _top_up(self) -> None:
        """Keep pool_size slots idle, plus one per waiting connect()."""
        if self._closing or self._tg is None:
            return
        want = self.settings.pool_size + len(self._waiters) - len(self._idle) - self._starting
        want = min(want, MAX_SLOTS - len(self._slots) - self._starting)
        for _ in range(max(0, want)):
            self._starting += 1
            self._tg.start_soon(self._fill_one)

    def release(self, slot: _Slot) -> None:
        """A slot is free: hand it to the oldest waiter, or keep it idle."""
        if slot.dead is not None or self._closing:
            return
        slot.idle_since = time.monotonic()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.event.is_set():
                waiter.slot = slot
                waiter.event.set()
                return
        self._idle.append(slot)

    async def _acquire(self, key: str) -> _Slot:
        """An idle slot, best one whose socat for ``key`` already waits; else wait for one."""
        self._idle = [s for s in self._idle if s.dead is None]
        if self._idle:
            # The most recently used that is ready for this target (the others may age out); a
            # slot that just finished a connection is still starting its next socat.
            ready = [s for s in self._idle if key in s.waiting]
            slot = ready[-1] if ready else self._idle[-1]
            self._idle.remove(slot)
            self._top_up()
            return slot
        waiter = _Waiter()
        self._waiters.append(waiter)
        self._top_up()
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.slot is not None:
                self.release(waiter.slot)
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        assert waiter.slot is not None
        return waiter.slot

    async def _housekeeping(self) -> None:
        while True:
            await anyio.sleep(IDLE_TTL / 4)
            now = time.monotonic()
            extra = len(self._idle) - self.settings.pool_size
            for slot in sorted(self._idle, key=lambda s: s.idle_since)[: max(0, extra)]:
                if now - slot.idle_since > IDLE_TTL:
                    self._idle.remove(slot)
                    slot.kill("idle")

    # ---------------------------------------------------------------- connections

    async def connect(self, host: str, port: int, first: bytes = b"") -> DockerStream:
        """Open a stream to host:port as the helper container sees it, with ``first`` sent first;
        returns once the relay reached it.

        :raises TransportError: naming the target and the reason (refused, unreachable, no relay).
        """
        target = f"{format_host(host)}:{port}"
        if not _HOST_RE.match(host) or not 0 < port < 65536:
            raise TransportError(f"could not connect to {target}: not a valid host name or address")
        if self._tg is None or self._closing:
            raise TransportError(f"could not connect to {target}: the docker transport is not running")
        conn: DockerStream | None = None
        try:
            with anyio.fail_after(self.timeouts.connect):
                for _ in range(3):
                    slot = await self._acquire(_key(host, port))
                    conn = slot.open(host, port, first[:FIRST_LIMIT])
                    await conn.settled.wait()
                    if conn.ok:
                        self.connections += 1
                        self._hint = (host, port)
                        if len(first) > FIRST_LIMIT:
                            try:
                                await conn.send(first[FIRST_LIMIT:])
                            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as e:
                                raise TransportError(f"could not connect to {target}: {e}") from None
                        return conn
                    await conn.aclose()
                    if conn.relay_status is None and not conn.errors:
                        continue  # the exec died before it saw the request: safe to retry elsewhere
                    reason = _short(conn.errors[-1]) if conn.errors else f"the relay exited with {conn.relay_status}"
                    raise TransportError(
                        f"could not connect to {target} from helper container {self.settings.helper_name}: {reason}"
                    )
                broken = conn.broken if conn else None
                raise TransportError(f"could not connect to {target}: relay streams keep failing ({broken})")
        except TimeoutError:
            reason = f": {self._last_error}" if self._last_error else ""
            raise TransportError(
                f"could not connect to {target} via helper container {self.settings.helper_name} "
                f"within {self.timeouts.connect:g}s{reason}"
            ) from None
        except BaseException:
            if conn is not None:
                await conn.aclose()
            raise

    def info(self) -> dict[str, object]:
        ep = self.endpoint
        return {
            "kind": self.name,
            # The forward shows "reconnecting" while new relay streams cannot be started.
            "state": "reconnecting" if self._failures else "connected",
            "reconnects": self.reconnects,
            "last_error": self._last_error,
            "docker_host": ep.host if ep else None,
            "docker_host_from": ep.source if ep else None,
            "tls": bool(ep and ep.tls),
            "helper": self.settings.helper_name,
            "helper_image": self.settings.helper_image,
            "helper_id": (self.helper_id or "")[:12] or None,
            "relay": self.mode,
            "relay_primed": self._primed,
            "pool": {"idle": len(self._idle), "busy": len(self._slots) - len(self._idle), "starting": self._starting},
            "connections": self.connections,
            "execs_started": self.execs_started,
        }


def _key(host: str, port: int) -> str:
    """The target as the relay names its FIFO: hex, so no ':' reaches socat's address syntax."""
    return f"{host}:{port}".encode().hex()


def _short(reason: str) -> str:
    """socat's "connect(5, AF=2 127.0.0.1:1, 16): Connection refused" -> "Connection refused"."""
    m = re.match(r"connect\([^)]*\): (.*)$", reason)
    return m.group(1) if m else reason
