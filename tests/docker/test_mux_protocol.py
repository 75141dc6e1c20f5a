"""helper/mux.py on its own, run here as relay.sh runs it (``python3 -S -c SOURCE TIMEOUT``) and spoken
to frame by frame over its stdin and stdout: its credit rules, half-close, refusals and resets,
against real sockets on this host's loopback. No Docker: the lab tests are tests/docker/test_mux.py."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tunneld.docker.mux import COUNT, HEADER, RELAY_MUX

pytestmark = [pytest.mark.timeout(30)]


class Relay:
    """The relay process and a blocking frame reader (every read bounded by the test's timeout)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self.stdin, self.stdout = proc.stdin, proc.stdout
        self.ready_line = proc.stderr.readline().decode()

    def send(self, kind: bytes, cid: int, payload: bytes = b"") -> None:
        self.stdin.write(HEADER.pack(kind, cid, len(payload)) + payload)
        self.stdin.flush()

    def frame(self) -> tuple[bytes, int, bytes]:
        head = self._exactly(HEADER.size)
        kind, cid, size = HEADER.unpack(head)
        return kind, cid, self._exactly(size)

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.stdout.read(n - len(data))
            if not chunk:
                raise EOFError(f"the relay ended ({self.proc.wait()})")
            data += chunk
        return data

    def until(self, kind: bytes, cid: int) -> tuple[bytes, list[tuple[bytes, int, bytes]]]:
        """Frames up to the first ``kind`` for ``cid``: its payload, and the frames before it."""
        seen: list[tuple[bytes, int, bytes]] = []
        while True:
            f = self.frame()
            if f[0] == kind and f[1] == cid:
                return f[2], seen
            seen.append(f)


@contextmanager
def relay() -> Iterator[Relay]:
    proc = subprocess.Popen([sys.executable, "-S", "-c", RELAY_MUX, "5"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield Relay(proc)
    finally:
        proc.kill()
        proc.wait(10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):  # stdin: unflushed bytes to a dead process
                pipe.close()  # type: ignore[union-attr]


@contextmanager
def server(serve: object) -> Iterator[int]:
    """A one-connection server thread on this host's loopback running ``serve(conn)``; its port."""
    s = socket.create_server(("127.0.0.1", 0))
    s.settimeout(20)

    def run() -> None:
        with s:
            conn, _ = s.accept()
            with conn:
                serve(conn)  # type: ignore[operator]

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield s.getsockname()[1]
    t.join(20)


def data_of(frames: list[tuple[bytes, int, bytes]], cid: int) -> bytes:
    return b"".join(p for k, c, p in frames if k == b"D" and c == cid)


def test_ready_line_names_the_protocol_and_the_window() -> None:
    with relay() as r:
        words = r.ready_line.split()
        assert words[:3] == ["R", "mux", "1"] and int(words[3]) > 0


def test_echo_with_half_close_both_ways() -> None:
    def echo(conn: socket.socket) -> None:
        got = b""
        while data := conn.recv(65536):
            got += data
        conn.sendall(got)  # after our EOF: the reply still flows back
        conn.shutdown(socket.SHUT_WR)

    with server(echo) as port, relay() as r:
        r.send(b"O", 1, b"127.0.0.1 %d 1048576" % port)
        r.send(b"D", 1, b"early bytes, sent before the relay has connected")
        r.until(b"C", 1)
        r.send(b"D", 1, b" and after")
        r.send(b"E", 1)
        _, before = r.until(b"E", 1)
        assert data_of(before, 1) == b"early bytes, sent before the relay has connected and after"


def test_frames_cut_anywhere_by_the_reads_arrive_whole() -> None:
    """Docker hands the relay its stdin in pieces of any size: every frame here is written cut at
    each byte in turn (a header, a control frame's payload, a data frame's bytes), and the target
    still gets every byte once, in order, with the EOF after them."""
    got: list[bytes] = []

    def collect(conn: socket.socket) -> None:
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        got.append(data)

    pieces = [bytes([i % 251]) * (i * 37 % 700 + 1) for i in range(40)]
    with server(collect) as port, relay() as r:
        stream = HEADER.pack(b"O", 1, len(b"127.0.0.1 %d 1048576" % port)) + b"127.0.0.1 %d 1048576" % port
        stream += b"".join(HEADER.pack(b"D", 1, len(p)) + p for p in pieces)
        stream += HEADER.pack(b"P", 9, 4) + b"ping" + HEADER.pack(b"E", 1, 0)
        at, step = 0, 1
        while at < len(stream):  # cuts of 1, 2, ... 13 bytes, then again
            r.stdin.write(stream[at:at + step])
            r.stdin.flush()
            at += step
            step = step % 13 + 1
        pong, _ = r.until(b"P", 9)
        assert pong == b"ping"
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:  # the target's EOF: every byte went
            time.sleep(0.01)
    assert got == [b"".join(pieces)]


def test_the_far_side_gets_no_more_than_the_credit() -> None:
    blob = bytes(range(256)) * 4096 * 3  # 3 MiB the far side sends at once
    done = threading.Event()

    def flood(conn: socket.socket) -> None:
        conn.sendall(blob)
        done.wait(20)

    with server(flood) as port, relay() as r:
        r.send(b"O", 7, b"127.0.0.1 %d 65536" % port)
        got = b""
        while len(got) < 65536:
            kind, cid, payload = r.frame()
            assert cid == 7 and kind in b"CD", (kind, payload)
            got += payload
        r.send(b"P", 0, b"after the window")  # answered in order: nothing more came before it
        payload, before = r.until(b"P", 0)
        assert payload == b"after the window" and data_of(before, 7) == b""
        assert got == blob[:65536]
        r.send(b"W", 7, COUNT.pack(100_000))
        while len(got) < 165_536:
            kind, cid, payload = r.frame()
            assert kind == b"D" and cid == 7
            got += payload
        r.send(b"P", 0)
        _, before = r.until(b"P", 0)
        assert got + data_of(before, 7) == blob[:165_536]
        done.set()


def test_a_refused_connection_is_reported_and_the_others_go_on() -> None:
    refusing = socket.create_server(("127.0.0.1", 0))
    port = refusing.getsockname()[1]
    refusing.close()

    def greet(conn: socket.socket) -> None:
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass

    with server(greet) as good, relay() as r:
        r.send(b"O", 1, b"127.0.0.1 %d 65536" % port)
        r.send(b"O", 2, b"127.0.0.1 %d 65536" % good)
        reason, _ = r.until(b"F", 1)
        assert reason == b"Connection refused"
        r.send(b"D", 1, b"for a connection that is over: ignored")
        _, before = r.until(b"E", 2)
        assert data_of(before, 2) == b"hello"
        r.send(b"E", 2)


def test_a_reset_breaks_only_its_connection_and_k_resets() -> None:
    def reset(conn: socket.socket) -> None:
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    seen_reset = threading.Event()

    def held(conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
        except ConnectionResetError:
            seen_reset.set()

    with server(reset) as p1, server(held) as p2, relay() as r:
        r.send(b"O", 1, b"127.0.0.1 %d 65536" % p1)
        r.send(b"O", 2, b"127.0.0.1 %d 65536" % p2)
        r.send(b"D", 1, b"x")
        reason, _ = r.until(b"X", 1)
        assert b"reset" in reason
        r.send(b"K", 2)  # the client left and the far side never closed: reset it
        assert seen_reset.wait(10)
        r.send(b"P", 0, b"still here")
        assert r.until(b"P", 0)[0] == b"still here"


def test_the_relay_ends_when_its_stdin_closes() -> None:
    with relay() as r:
        r.stdin.close()
        assert r.proc.wait(10) == 0


def test_many_short_connections_at_once_each_get_their_own_bytes() -> None:
    """Connections opened, answered, closed and reset while others open: the fds of closed sockets are
    reused at once, and no event of an old socket may reach a new one (it made a socket still
    connecting look connected: a spurious "X")."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    listener.settimeout(20)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    def answer(conn: socket.socket) -> None:
        with conn:
            data = conn.recv(64)
            conn.sendall(b"re:" + data)  # and close: the far side ends first, like an HTTP/1.0 server

    threading.Thread(target=serve, daemon=True).start()
    total = 600
    try:
        with relay() as r:
            replies: dict[int, bytes] = {}
            ended: set[int] = set()
            opened = 0
            while len(ended) < total:
                while opened < total and opened - len(ended) < 64:  # 64 at a time, like the HTTP benchmark
                    opened += 1
                    r.send(b"O", opened, b"127.0.0.1 %d 65536" % port)
                    r.send(b"D", opened, b"%d" % opened)
                kind, cid, payload = r.frame()
                assert kind in b"CDEW", (kind, cid, payload)
                if kind == b"D":
                    replies[cid] = replies.get(cid, b"") + payload
                elif kind == b"E":
                    ended.add(cid)
                    r.send(b"E" if cid % 3 else b"K", cid)  # the client's EOF, or a reset
            assert all(replies[cid] == b"re:%d" % cid for cid in range(1, total + 1))
    finally:
        stop.set()
        listener.close()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_turn_of_the_loop_costs_what_is_ready_not_what_is_open() -> None:
    """Idle connections cost a turn of the loop nothing: pings (one turn each) take about the same CPU
    with 800 connections open as with none. A relay that looked at every connection on every turn (poll()
    over all their fds, a scan for deadlines and credit) took about 5x as much with 800 open, and every
    round trip through the exec paid for it (1000 idle: 786 against 418 µs, docs/docker-transport.md)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    held: list[socket.socket] = []
    pings = 3000

    def keep() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=keep, daemon=True).start()
    try:
        with relay() as r:
            def cpu_for_pings() -> float:
                before = _cpu_seconds(r.proc.pid)
                for i in range(pings):
                    r.send(b"P", i, b"x")
                    assert r.frame() == (b"P", i, b"x")
                return _cpu_seconds(r.proc.pid) - before

            idle = cpu_for_pings()
            for cid in range(1, 801):
                r.send(b"O", cid, b"127.0.0.1 %d 65536" % listener.getsockname()[1])
                assert r.until(b"C", cid)[1] == []
            busy = cpu_for_pings()
            assert busy < 2 * idle + 0.05, (busy, idle)
    finally:
        listener.close()
        for s in held:
            s.close()
