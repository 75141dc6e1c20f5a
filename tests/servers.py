"""Real servers on loopback for tests, each in its own thread so they never share the loop under test."""

from __future__ import annotations

import socket
import threading
from types import TracebackType


class EchoServer:
    """Echoes every byte; on the client's EOF finishes writing, then shuts down its own write side."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.port: int = self.sock.getsockname()[1]
        self.host = host
        self.accepted = 0
        self.half_closes = 0
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    def __enter__(self) -> EchoServer:
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(262144):
                    conn.sendall(data)
                self.half_closes += 1
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def echo_through(port: int, payload: bytes, *, host: str = "127.0.0.1", timeout: float = 5.0) -> bytes:
    """A blocking client: send ``payload`` to ``host:port``, half-close, read until EOF; return what came back."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := s.recv(65536):
            got += chunk
    return bytes(got)


def free_port_holder(host: str = "127.0.0.1") -> socket.socket:
    """A listening socket holding a port, to provoke 'address already in use'."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.bind((host, 0))
    s.listen(1)
    return s


def free_local_port() -> int:
    """A port free on this machine's 127.0.0.1 and ::1 right now, for a lab container to publish.

    Pick-then-release, on purpose: --auto forwards on the SAME port number the remote host
    publishes, so a test must pick one that is free here too (Docker's own choice starts at 32768,
    the bottom of this machine's ephemeral range, and collides with other tests' listeners).
    """
    with socket.socket() as v4:
        v4.bind(("127.0.0.1", 0))
        port: int = v4.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET6) as v6:
                v6.bind(("::1", port))
        except OSError:
            return free_local_port()
    return port


def refusing_socket() -> socket.socket:
    """A socket bound on 127.0.0.1 but not listening: connects to its port are refused, and the
    port stays ours for the test (no pick-then-release race)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s
