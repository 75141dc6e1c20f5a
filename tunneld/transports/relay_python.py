"""The relay for helper images that have python3: one process per slot, no process per connection.

Not imported by kci-tunneld: relay.sh runs it as ``python3 -S -c SOURCE CONNECT_TIMEOUT`` in the
helper container when the image has ``python3`` (``python:3-alpine``, for instance). It speaks
exactly the protocol of relay.sh (see the comments there), one connection at a time over one exec:

- stdin: ``C HOST PORT NONCE KEY``, then ``LEN`` + LEN bytes, ``0`` (upstream EOF), ``F`` (print
  NONCE on stdout), ``Q`` (connection over), ``K`` (abort it); anything else ends the exec.
- stderr: ``R python`` (ready), ``C`` (connected), ``E`` (the far side is at EOF), a reason
  line on failure, ``X STATUS`` (this connection's relay is over), ``D`` (next request please).

Where relay.sh starts a socat (or nc) for every connection, 2-3 ms of CPU each on small hosts, this
connects and copies in the one process the exec already runs. Plain ``select``, blocking stdout:
the daemon always drains stdout, and a slow client must hold the far side back anyway.

It runs under the helper's python3, not ours: Python 3.7 or later (no f-strings, no walrus, type
comments), standard library only; run as a script, so importing it does nothing.
"""

from __future__ import annotations

import os
import select
import socket
import sys

MYPY = False
if MYPY:  # for the type checker only: at run time, importing typing would slow every slot's start
    from typing import Optional

BLOCK = 256 * 1024
UP_HIGH_WATER = 1024 * 1024  # upstream bytes held for a slow target before stdin is left unread


class Connection:
    def __init__(self, host: str, port: int, nonce: bytes) -> None:
        self.host, self.port = host, port
        self.target = ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)
        self.nonce = nonce
        self.sock = None  # type: Optional[socket.socket]
        self.up = bytearray()  # bytes for the target, not yet sent
        self.shut_when_sent = False  # "0" seen: shut down the write side once self.up is sent
        self.quit_when_sent = False  # "Q" seen
        self.down_eof = False
        self.exit_status = None  # type: Optional[int]  # set once "X" is said

    def connect(self, timeout: float) -> None:
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except socket.timeout:
            self.fail("Connection timed out")
            return
        except OSError as e:
            self.fail(e.strerror or str(e))  # the daemon names the target
            return
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        say("C")

    def fail(self, reason: str, status: int = 1) -> None:
        self.close(status, before=reason)

    def close(self, status: int, abort: bool = False, before: str = "", after: str = "") -> None:
        """End the connection and say "X STATUS" once, with the lines before and after it in the
        same write: every write to stderr is a message through the shim, dockerd and the API."""
        if self.sock is not None:
            if abort:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.sock.close()
            self.sock = None
        self.up = bytearray()
        self.down_eof = True
        lines = [before] if before else []
        if self.exit_status is None:
            self.exit_status = status
            lines.append("X %d" % status)
        if after:
            lines.append(after)
        if lines:
            say("\n".join(lines))

    def send_some(self) -> None:
        assert self.sock is not None
        try:
            sent = self.sock.send(self.up[:BLOCK])
        except BlockingIOError:
            return
        except OSError as e:
            self.fail("write to %s: %s" % (self.target, e.strerror or e))
            return
        del self.up[:sent]
        self.after_sent()

    def after_sent(self) -> None:
        if self.up or self.sock is None:
            return
        if self.shut_when_sent:
            self.shut_when_sent = False
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def receive_some(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(BLOCK)
        except BlockingIOError:
            return
        except OSError as e:
            self.fail("read from %s: %s" % (self.target, e.strerror or e))
            return
        if data:
            write_all(1, data)
        else:
            self.down_eof = True
            say("E")


def say(line: str) -> None:
    write_all(2, line.encode() + b"\n")


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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

    def line(self) -> Optional[bytes]:
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
            if line is not None:
                words = line.decode().split()
                if len(words) != 5 or words[0] != "C":
                    sys.exit(2)
                return Connection(words[1], int(words[2]), words[3].encode())
            self.fill()

    def serve(self, conn: Connection) -> bool:
        """Feed conn from what has arrived; True once "Q" is seen and the upstream bytes are out."""
        while self.buf:
            if self.need:
                take = bytes(self.buf[:self.need])
                del self.buf[:len(take)]
                self.need -= len(take)
                if conn.sock is not None:
                    conn.up += take
                continue
            line = self.line()
            if line is None:
                break
            if line[:1] in b"123456789":
                self.need = int(line)
            elif line == b"0":
                conn.shut_when_sent = True
                conn.after_sent()
            elif line == b"F":
                write_all(1, conn.nonce)
            elif line == b"Q":
                conn.quit_when_sent = True
            elif line == b"K":
                conn.close(137, abort=True)
            else:
                sys.exit(2)
        return conn.quit_when_sent and (not conn.up or conn.sock is None)


def relay(conn: Connection, stdin: Input) -> None:
    poll = select.poll()
    while not stdin.serve(conn):
        # While a slow target holds too many upstream bytes, stdin is left unread, but a hang-up
        # (the daemon dropped this exec) still ends us.
        poll.register(0, select.POLLIN if len(conn.up) < UP_HIGH_WATER else 0)
        sock = conn.sock
        wanted = (0 if conn.down_eof else select.POLLIN) | (select.POLLOUT if conn.up else 0)
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
                    and not conn.down_eof:
                conn.receive_some()
        if events.get(0, 0) & select.POLLIN:
            stdin.fill()
        elif events.get(0, 0):
            sys.exit(0)  # hung up without a byte to read: the daemon closed the exec
    conn.close(0, after="D")


def main() -> None:
    timeout = float(sys.argv[1])
    stdin = Input()
    say("R python")
    while True:
        conn = stdin.request()
        conn.connect(timeout)
        relay(conn, stdin)


if __name__ == "__main__":
    main()
