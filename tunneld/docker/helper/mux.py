"""The multiplexed relay: many TCP connections at once over one exec, each with its own flow control.

Not imported by kci-tunneld: relay.sh hands its exec over to it, as ``python3 -S -c SOURCE
CONNECT_TIMEOUT``, when the helper image has ``python3``; tunneld/docker/mux.py speaks to it. One
process, one ``epoll`` loop, no process and no exec per connection.

Frames, both ways: 1 byte of kind, 4 bytes of connection id, 4 bytes of length (big-endian), then
the payload. Ids are chosen by the daemon and never reused within an exec.

- stdin (the daemon): ``O`` open (payload ``HOST PORT WINDOW``: WINDOW is how many bytes of the
  far side's we may send before a ``W``), ``D`` the client's bytes, ``E`` the client's EOF (shut the
  write side down once the bytes before it are sent), ``K`` abort (the client is gone: reset, forget),
  ``W`` more room downstream (payload: 4-byte count), ``P`` ping (answered with the same payload).
- stdout (to the daemon): ``C`` connected, ``F`` could not connect (payload: why; the id is
  forgotten), ``D`` the far side's bytes, ``E`` the far side's EOF, ``X`` broken (a read or write
  failed, payload: why; reset, forgotten), ``W`` room for more of the client's bytes (4-byte count),
  ``P`` pong.
- stderr: ``R mux 1 UP_WINDOW`` once, when ready (then only a traceback, if this program breaks).

Flow control is per connection, so one slow or never-reading client stalls only itself: we read a
socket only while its downstream credit lasts, and the daemon sends a connection's bytes only while
its upstream credit (UP_WINDOW at first, then our ``W``s as they reach the target) lasts; so reading
stdin never waits on a socket and the daemon's reader never waits on a client. A connection is
forgotten once both directions are done (or on F, X, K). The frames written in one turn of the loop
leave in one write: every write is a message through the shim, dockerd and the API.

Runs under the helper's python3, not ours: Python 3.5 or later (no f-strings, no walrus, no
``from __future__ import annotations``; .ci/run checks this with vermin), standard library only.
"""

import collections
import errno
import os
import select
import socket
import struct
import sys
import time

MYPY = False
if MYPY:  # for the type checker only: importing typing at run time would slow the start
    from typing import Any, Dict, List, Optional  # noqa: F401 (used in type comments)

HEADER = struct.Struct(">cII")
COUNT = struct.Struct(">I")
BLOCK = 256 * 1024
UP_WINDOW = 4 * 1024 * 1024  # the client's bytes we hold per connection for a slow target
# Credit goes back in quarters of the window: the daemon always has the rest, and a round trip's few
# bytes cost no frame of their own.
CREDIT_STEP = UP_WINDOW // 4
LOOKUPS = 8  # name lookups running at once (threads); more wait their turn
ABORT = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
IN, OUT, ERR = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR | select.EPOLLHUP


class Relay:
    """The exec's state: its connections, the frames to write, the epoll set."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.conns = {}  # type: Dict[int, Conn]
        # What each turn of the loop looks at besides its events, so that its cost does not grow with
        # the connections open: those still connecting (they have a deadline), and those that sent
        # CREDIT_STEP or more of the client's bytes since their last W.
        self.connecting = {}  # type: Dict[int, Conn]
        self.owed = {}  # type: Dict[int, Conn]
        self.by_fd = {}  # type: Dict[int, Conn]
        self.out = []  # type: List[bytes]
        self.inbuf = bytearray()  # a header, or a control frame, not yet whole
        self.need = 9  # its size: a header's, or a header's and its payload's
        self.data_left = 0  # bytes of the current data frame still to come
        self.data_conn = None  # type: Optional[Conn]
        # epoll, not poll: a turn of the loop costs what is ready, not what is open (with 1000 idle
        # connections on the exec, poll() and a scan of them all added 370 us to every round trip).
        self.poll = select.epoll()
        self.poll.register(0, IN)
        # Names are resolved in threads (a DNS lookup may take seconds; this exec's other connections
        # must not wait on it): each puts its answer here and writes a byte to wake the loop.
        self.resolved = collections.deque()  # type: collections.deque[Any]
        self.lookups = {}  # type: Dict[Any, List[Conn]]  # (host, port): the connections waiting for it
        self.lookups_waiting = collections.deque()  # type: collections.deque[Any]  # beyond LOOKUPS
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.poll.register(self.wake_r, IN)

    def emit(self, kind: bytes, cid: int, payload: bytes = b"") -> None:
        self.out.append(HEADER.pack(kind, cid, len(payload)))
        if payload:
            self.out.append(payload)

    def flush(self) -> None:
        out, self.out = self.out, []
        while out:
            batch, out = out[:512], out[512:]  # IOV_MAX is 1024
            done = os.writev(1, batch)
            total = sum(len(b) for b in batch)
            if done < total:
                rest = b"".join(batch)[done:]
                while rest:
                    rest = rest[os.write(1, rest):]

    def read_stdin(self) -> None:
        data = os.read(0, BLOCK)
        if not data:
            sys.exit(0)  # the daemon closed the exec
        # A data frame's bytes go to its connection as views of what was read (bytes: nothing else
        # writes to it), piece by piece as they come, never copied; only a header, or a control frame
        # cut by the end of a read, is kept until the rest arrives.
        view = memoryview(data)
        at, end = 0, len(data)
        while at < end:
            if self.data_left:
                take = min(self.data_left, end - at)
                self.data_left -= take
                if self.data_conn is not None:
                    self.data_conn.take(view[at:at + take])
                at += take
                continue
            # A header, or a control frame's header and payload.
            take = min(self.need - len(self.inbuf), end - at)
            self.inbuf += view[at:at + take]
            at += take
            if len(self.inbuf) < self.need:
                return
            kind, cid, size = HEADER.unpack_from(self.inbuf)
            if kind == b"D":
                del self.inbuf[:]
                self.data_left = size
                self.data_conn = self.conns.get(cid)  # None: over here already, its bytes go nowhere
            elif self.need == 9 and size:
                self.need += size  # its payload is still to come
            else:
                payload = bytes(self.inbuf[9:])
                del self.inbuf[:]
                self.need = 9
                self.frame(kind, cid, payload)

    def resolve_later(self, conn: "Conn", host: bytes, port: int) -> None:
        """Look host:port up in a thread; connections asking for a name already being looked up
        share that lookup, and at most LOOKUPS run at once (the rest wait their turn)."""
        key = (host, port)
        if key in self.lookups:
            self.lookups[key].append(conn)
            return
        self.lookups[key] = [conn]
        if len(self.lookups) - len(self.lookups_waiting) > LOOKUPS:
            self.lookups_waiting.append(key)
        else:
            self.start_lookup(key)

    def start_lookup(self, key: "Any") -> None:
        import threading  # only when a name is asked for: its import costs the relay's start

        def run() -> None:
            self.resolved.append((key, resolve(*key)))
            try:
                os.write(self.wake_w, b"r")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already: the loop will come

        thread = threading.Thread(target=run)
        thread.daemon = True
        thread.start()

    def take_resolved(self) -> None:
        try:
            os.read(self.wake_r, 4096)
        except BlockingIOError:
            pass
        while self.resolved:
            key, answer = self.resolved.popleft()
            for conn in self.lookups.pop(key, []):
                if self.conns.get(conn.cid) is conn and not conn.closed:  # not timed out or reset meanwhile
                    conn.resolved(*answer)
            if self.lookups_waiting:
                self.start_lookup(self.lookups_waiting.popleft())

    def frame(self, kind: bytes, cid: int, payload: bytes) -> None:
        if kind == b"P":
            self.emit(b"P", cid, payload)
            return
        if kind == b"O":
            host, port, window = payload.split()
            conn = Conn(self, cid, int(window))
            self.conns[cid] = self.connecting[cid] = conn
            conn.start(host, int(port))
            return
        known = self.conns.get(cid)
        if known is None:
            if kind not in b"EKW":
                sys.exit(2)  # not our protocol
            return  # for a connection already over: nothing to do
        conn = known
        if kind == b"E":
            conn.up_eof = True
        elif kind == b"W":
            conn.credit += COUNT.unpack(payload)[0]
        elif kind == b"K":
            conn.close(abort=True)
        else:
            sys.exit(2)
        conn.update()

    def forget(self, conn: "Conn") -> None:
        self.conns.pop(conn.cid, None)
        self.connecting.pop(conn.cid, None)
        self.owed.pop(conn.cid, None)

    def loop(self) -> None:
        while True:
            timeout = -1.0
            if self.connecting:
                now = time.monotonic()
                timeout = max(0.0, min(conn.deadline for conn in self.connecting.values()) - now + 0.001)
            # Each event goes to the socket that had the fd when poll() answered: while they are
            # handled, a connection may close and a new one (or its next address) get the same fd,
            # and a stale POLLOUT would make a socket still connecting look connected.
            events = [(self.by_fd.get(fd), fd, ready) for fd, ready in self.poll.poll(timeout)]
            for owner, fd, ready in events:
                if fd == 0:
                    if ready & IN:
                        self.read_stdin()
                    elif ready:
                        sys.exit(0)  # hung up without a byte to read: the daemon closed the exec
                elif fd == self.wake_r:
                    self.take_resolved()
                elif owner is not None and owner.sock is not None and owner.sock.fileno() == fd:
                    owner.ready(ready)
            if self.connecting:
                now = time.monotonic()
                for conn in [c for c in self.connecting.values() if now >= c.deadline]:
                    conn.failed("Connection timed out")
            if self.owed:
                for conn in self.owed.values():
                    self.emit(b"W", conn.cid, COUNT.pack(conn.sent))
                    conn.sent = 0
                self.owed.clear()
            self.flush()


def literal(host: bytes) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (nothing to look up)."""
    text = host.decode("latin-1")
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return True
        except (OSError, ValueError):
            pass
    return False


def connected(sock: socket.socket) -> bool:
    """Whether a connect still in progress has in fact completed (to this host's own addresses, the
    kernel completes it inside ``connect``)."""
    try:
        sock.getpeername()
        return True
    except OSError:
        return False


def resolve(host: bytes, port: int) -> "Any":
    """``getaddrinfo``'s addresses for host:port, and why there are none (or None)."""
    try:
        # A bytes host: a str one goes through the IDNA codec, whose first use costs 12 ms of imports.
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM), None
    except OSError as e:
        return [], e.strerror or str(e)


class Conn:
    """One connection: its socket, the client's bytes not yet sent, the credit downstream."""

    def __init__(self, relay: Relay, cid: int, window: int) -> None:
        self.relay, self.cid = relay, cid
        self.sock = None  # type: Optional[socket.socket]
        # The client's bytes not yet sent, frame by frame: sending from the front of one buffer would
        # move the rest of it at every send.
        self.up = collections.deque()  # type: collections.deque[memoryview]
        self.up_eof = False  # "E" seen: shut the write side down once self.up is sent
        self.up_done = False
        self.down_done = False
        self.credit = window
        self.sent = 0  # bytes sent to the target since the last "W"
        self.connected = False
        self.deadline = time.monotonic() + relay.timeout  # while connecting (in relay.connecting)
        self.last_error = "Connection refused"
        self.mask = -1
        self.addrs = []  # type: List[Any]
        self.closed = False  # failed, broken or closed: it takes no more bytes

    def take(self, data: memoryview) -> None:
        """Some of the client's bytes (all or part of a data frame)."""
        if self.closed:
            return  # broken or closed on the way: the rest of its frame goes nowhere
        if self.connected and not self.up and self.sock is not None:
            # A round trip's request leaves now, not after one more poll; most leave whole.
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as e:
                self.broken("write: %s" % (e.strerror or e))
                return
            self.count_sent(sent)
            if sent == len(data):
                return
            data = data[sent:]
        self.up.append(data)
        self.update()

    def count_sent(self, size: int) -> None:
        self.sent += size
        if self.sent >= CREDIT_STEP:
            self.relay.owed[self.cid] = self

    def start(self, host: bytes, port: int) -> None:
        """Resolve and start connecting: an address (what the daemon sends, nearly always) or
        ``localhost`` at once, any other name in a thread, as it may need DNS."""
        if host == b"localhost" or literal(host):
            self.resolved(*resolve(host, port))
        else:
            self.relay.resolve_later(self, host, port)

    def resolved(self, addrs: "List[Any]", error: "Optional[str]") -> None:
        self.addrs = list(addrs)  # its own: connections sharing a lookup each try every address
        if error is not None:
            self.last_error = error
        self.next_address()

    def next_address(self) -> None:
        """Start connecting to the next address (non-blocking), or report the last failure."""
        self.forget_socket()
        while self.addrs:
            family, kind, proto, _, addr = self.addrs.pop(0)
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            err = sock.connect_ex(addr)
            if err in (0, errno.EINPROGRESS):
                self.sock = sock
                self.relay.by_fd[sock.fileno()] = self
                if err == 0 or connected(sock):
                    self.ready(OUT)  # a target on this host is there at once: no poll for it
                else:
                    self.update()
                return
            sock.close()
            self.last_error = os.strerror(err)
        self.failed(self.last_error)

    def failed(self, reason: str) -> None:
        self.closed = True
        self.forget_socket()
        self.relay.forget(self)
        self.relay.emit(b"F", self.cid, reason.encode())

    def forget_socket(self) -> None:
        if self.sock is not None:
            fd = self.sock.fileno()
            if self.mask > 0:
                self.relay.poll.unregister(fd)
            del self.relay.by_fd[fd]
            self.sock.close()
            self.sock = None
            self.mask = -1

    def update(self) -> None:
        """Poll for what this connection can do now; forget it once both directions are done."""
        if self.sock is None:
            return
        if self.connected:
            if self.up_eof and not self.up and not self.up_done:
                self.up_done = True
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            if self.up_done and self.down_done:
                self.close()
                return
            mask = (IN if self.credit > 0 and not self.down_done else 0) | (OUT if self.up else 0)
        else:
            mask = OUT
        if mask != self.mask:
            # A socket closed both ways reports POLLHUP on every poll: unregistered, not a busy loop.
            fd = self.sock.fileno()
            if mask:
                if self.mask > 0:
                    self.relay.poll.modify(fd, mask)
                else:
                    self.relay.poll.register(fd, mask)
            elif self.mask > 0:
                self.relay.poll.unregister(fd)
            self.mask = mask

    def ready(self, events: int) -> None:
        assert self.sock is not None
        if not self.connected:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.last_error = os.strerror(err)
                self.next_address()
                return
            self.connected = True
            self.relay.connecting.pop(self.cid, None)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.relay.emit(b"C", self.cid)
            events = OUT  # the client's first bytes leave now (the socket is writable: it just connected)
        if events & (OUT | ERR) and self.up:
            try:
                sent = self.sock.send(self.up[0])
            except BlockingIOError:
                sent = 0
            except OSError as e:
                self.broken("write: %s" % (e.strerror or e))
                return
            if sent == len(self.up[0]):
                self.up.popleft()
            else:
                self.up[0] = self.up[0][sent:]
            self.count_sent(sent)
        if events & (IN | ERR) and self.sock is not None and self.credit > 0 and not self.down_done:
            try:
                data = self.sock.recv(min(self.credit, BLOCK))
            except BlockingIOError:
                data = None
            except OSError as e:
                self.broken("read: %s" % (e.strerror or e))
                return
            if data:
                self.credit -= len(data)
                self.relay.emit(b"D", self.cid, data)
            elif data is not None:
                self.down_done = True
                self.relay.emit(b"E", self.cid)
        self.update()

    def broken(self, reason: str) -> None:
        self.close(abort=True)
        self.relay.emit(b"X", self.cid, reason.encode())

    def close(self, abort: bool = False) -> None:
        self.closed = True
        if self.sock is not None and abort:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORT)
            except OSError:
                pass
        self.forget_socket()
        self.relay.forget(self)
        self.sent = 0  # nobody will read the credit back: drop it


def main() -> None:
    if sys.version_info < (3, 5):  # PEP 475: system calls retried on EINTR, which this relies on
        sys.stderr.write("the helper's python3 is %d.%d; the python relay needs 3.5 or later\n" % sys.version_info[:2])
        sys.exit(1)
    relay = Relay(float(sys.argv[1]))
    try:  # the resolver's first use (nsswitch, /etc/hosts) now, not in the first connection's set-up
        socket.getaddrinfo(b"localhost", 0, 0, socket.SOCK_STREAM)
    except OSError:
        pass
    os.write(2, b"R mux 1 %d\n" % UP_WINDOW)
    relay.loop()


if __name__ == "__main__":
    main()
