"""The relay for helper images that have python3: one process per slot, no process per connection.

Not imported by kci-tunneld: relay.sh hands its exec over to it, as ``python3 -S -c SOURCE
CONNECT_TIMEOUT``, when the helper image has ``python3`` (``python:3-alpine``, for instance). One
connection at a time over one exec, many in its life, like relay.sh, but where relay.sh starts a
socat (or nc) for every connection, 2-3 ms of CPU each on small hosts, this connects and copies in
the one process the exec already runs, and says less:

- stdin, as for relay.sh: ``C HOST PORT NONCE KEY``, then ``LEN`` + LEN bytes, ``0`` (the
  client's EOF: shut down the write side once the bytes before it are sent), ``K`` (abort the
  connection); anything else ends the exec. No ``F`` and no ``Q``: see stdout.
- stderr: ``R python`` once, when ready (then only a traceback, if this program breaks).
- stdout: frames, 1 byte of kind + 4 bytes of length (big-endian) + the payload: ``d`` the far
  side's bytes, ``e`` event lines: ``C`` (connected), a reason (what failed), ``E`` (the far side is
  at EOF), ``X STATUS`` (the connection is closed: 0, or why not), ``D`` (next request please).
  Bytes and events travel in one ordered stream, so the far side's EOF needs no end marker and no
  round trip, and the connection ends by itself once both sides are done: the far side at EOF (or
  failed) and the client's ``0`` (or ``K``) seen, with every byte before it sent.

Plain ``poll``, blocking stdout: the daemon always drains stdout, and a slow client must hold the far
side back anyway. It runs under the helper's python3, not ours: Python 3.5 or later (no f-strings,
no walrus, no ``from __future__ import annotations``; annotations that name generics are strings;
.ci/run checks this with vermin), standard library only; run as a script, so importing it does nothing.
"""

import os
import select
import socket
import struct
import sys

MYPY = False
if MYPY:  # for the type checker only: at run time, importing typing would slow every slot's start
    from typing import Optional

BLOCK = 256 * 1024
UP_HIGH_WATER = 1024 * 1024  # upstream bytes held for a slow target before stdin is left unread
ABORT = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def emit(kind: bytes, payload: bytes) -> None:
    head = struct.pack(">cI", kind, len(payload))
    done = os.writev(1, [head, payload])  # no copy of the payload; whole unless a signal cut it short
    if done < len(head) + len(payload):
        write_all(1, (head + payload)[done:])


def say(*lines: str) -> None:
    emit(b"e", "".join(line + "\n" for line in lines).encode())


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sock = None  # type: Optional[socket.socket]
        self.up = bytearray()  # bytes for the target, not yet sent
        self.up_eof = False  # "0" seen: shut the write side down once self.up is sent
        self.up_done = False  # ... and done (or the connection is gone)
        self.down_done = False  # the far side is at EOF, or failed
        self.connected = False
        self.said_eof = False  # "E"
        self.status = None  # type: Optional[int]  # set once "X" is said

    def connect(self, timeout: float) -> None:
        try:
            # A bytes host: a str one goes through the IDNA codec, whose first use costs 12 ms of
            # imports (unicodedata); the daemon only sends plain names and addresses.
            self.sock = socket.create_connection((self.host.encode(), self.port), timeout=timeout)  # type: ignore[arg-type]
        except socket.timeout:
            self.close(1, ("Connection timed out",))
            return
        except OSError as e:
            self.close(1, (e.strerror or str(e),))  # the daemon names the target
            return
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connected = True
        say("C")

    def close(self, status: int, before: "tuple[str, ...]" = (), abort: bool = False,
              after: "tuple[str, ...]" = ()) -> None:
        """Close the socket and say why (``before``), "X STATUS", "E" if not said yet and ``after``,
        in one frame: every write is a message through the shim, dockerd and the API."""
        if self.sock is not None:
            if abort:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORT)
            self.sock.close()
            self.sock = None
        self.up = bytearray()
        self.down_done = True
        lines = list(before)
        if self.status is None:  # before "E": the daemon takes the end for a clean one at "E"
            self.status = status
            lines.append("X %d" % status)
        if self.connected and not self.said_eof:
            self.said_eof = True
            lines.append("E")
        lines += after
        if lines:
            say(*lines)

    def end_upstream(self) -> None:
        """After "0", once the bytes before it are out: shut the write side down."""
        if self.up_eof and not self.up and not self.up_done:
            self.up_done = True
            if self.sock is not None:
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def send_some(self) -> None:
        assert self.sock is not None
        try:
            sent = self.sock.send(self.up[:BLOCK])
        except BlockingIOError:
            return
        except OSError as e:
            self.close(1, ("write: %s" % (e.strerror or e),), abort=True)
            self.up_done = self.up_eof  # what the client still sends until its "0" is dropped
            return
        del self.up[:sent]
        self.end_upstream()

    def receive_some(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(BLOCK)
        except BlockingIOError:
            return
        except OSError as e:
            self.close(1, ("read: %s" % (e.strerror or e),), abort=True)
            self.up_done = self.up_eof
            return
        if data:
            emit(b"d", data)
        else:
            self.down_done = True
            if not self.up_done:  # else the end says it, with "X" and "D" in the same frame
                self.said_eof = True
                say("E")

    def over(self) -> bool:
        return self.down_done and self.up_done


class Input:
    """stdin, parsed into requests, frames and control words."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = 0  # bytes of the current data frame still to come

    def fill(self) -> None:
        data = os.read(0, BLOCK)
        if not data:
            sys.exit(0)  # the daemon closed the exec: nothing more to do
        self.buf += data

    def line(self) -> "Optional[bytes]":
        """The next control line, or None when it has not arrived yet."""
        at = self.buf.find(b"\n")
        if at < 0:
            if len(self.buf) > 512:
                sys.exit(2)  # not our protocol
            return None
        line = bytes(self.buf[:at])
        del self.buf[:at + 1]
        return line

    def request(self) -> Connection:
        while True:
            line = self.line()
            if line == b"K":
                continue  # for a connection that ended as the daemon gave up on it: nothing to abort
            if line is not None:
                words = line.decode().split()
                if len(words) != 5 or words[0] != "C":
                    sys.exit(2)
                return Connection(words[1], int(words[2]))
            self.fill()

    def serve(self, conn: Connection) -> None:
        """Feed conn with what has arrived."""
        while self.buf and not conn.over():
            if self.need:
                take = bytes(self.buf[:self.need])
                del self.buf[:len(take)]
                self.need -= len(take)
                if conn.sock is not None and not conn.up_eof:
                    conn.up += take
                continue
            line = self.line()
            if line is None:
                break
            if line[:1] in b"123456789":
                self.need = int(line)
            elif line == b"0":
                conn.up_eof = True
                if conn.sock is None:
                    conn.up_done = True
                conn.end_upstream()
            elif line == b"K":
                conn.close(137, abort=True)
                conn.up_done = True
            else:
                sys.exit(2)


def relay(conn: Connection, stdin: Input) -> None:
    poll = select.poll()
    while True:
        stdin.serve(conn)
        if conn.over():
            break
        # While a slow target holds too many upstream bytes, stdin is left unread, but a hang-up
        # (the daemon dropped this exec) still ends us.
        poll.register(0, select.POLLIN if len(conn.up) < UP_HIGH_WATER else 0)
        sock = conn.sock
        wanted = (0 if conn.down_done else select.POLLIN) | (select.POLLOUT if conn.up else 0)
        if not wanted:
            sock = None  # a socket closed both ways would report POLLHUP on every poll: a busy loop
        if sock is not None:
            poll.register(sock, wanted)
        events = dict(poll.poll())
        if sock is not None:
            poll.unregister(sock)
            ready = events.get(sock.fileno(), 0)
            if ready & (select.POLLOUT | select.POLLERR | select.POLLHUP) and conn.up:
                conn.send_some()
            if ready & (select.POLLIN | select.POLLERR | select.POLLHUP) and conn.sock is not None \
                    and not conn.down_done:
                conn.receive_some()
        if events.get(0, 0) & select.POLLIN:
            stdin.fill()
        elif events.get(0, 0):
            sys.exit(0)  # hung up without a byte to read: the daemon closed the exec
    conn.close(0, after=("D",))


def main() -> None:
    if sys.version_info < (3, 5):  # PEP 475: system calls retried on EINTR, which this relies on
        sys.stderr.write("the helper's python3 is %d.%d; the python relay needs 3.5 or later\n" % sys.version_info[:2])
        sys.exit(1)
    timeout = float(sys.argv[1])
    stdin = Input()
    try:  # the resolver's first use (nsswitch, /etc/hosts) now, not in the first connection's set-up
        socket.getaddrinfo(b"localhost", 0, 0, socket.SOCK_STREAM)
    except OSError:
        pass
    os.write(2, b"R python\n")
    while True:
        conn = stdin.request()
        conn.connect(timeout)
        relay(conn, stdin)


if __name__ == "__main__":
    main()
