"""Listening sockets (one per address family, bound before a forward reports ready) and accepting from them."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

import anyio

from tunneld.config import format_host, is_loopback
from tunneld.errors import BindError

logger = logging.getLogger(__name__)

BACKLOG = 1024


def bind_listeners(bind: str, port: int) -> list[socket.socket]:
    """Bind and listen on every address ``bind`` stands for, all on the same port.

    ``localhost`` means both 127.0.0.1 and ::1: clients resolve it to either, and a forward that
    listens only on one fails for the other. With port 0 the first socket picks the port and the
    rest follow it.

    :raises BindError: naming the address and what to do.
    """
    addresses = ["127.0.0.1", "::1"] if bind == "localhost" else _resolve(bind, port)
    for attempt in range(8):
        socks: list[socket.socket] = []
        chosen = port
        try:
            for i, host in enumerate(addresses):
                optional = bind == "localhost" and i > 0  # a host without IPv6 still gets 127.0.0.1
                sock = _bind_one(host, chosen, optional=optional)
                if sock is None:
                    continue
                socks.append(sock)
                chosen = sock.getsockname()[1]
        except BindError as e:
            for s in socks:
                s.close()
            # Port 0 on two families: the port the first picked may be taken on the second.
            in_use = getattr(e.__cause__, "errno", None) == errno.EADDRINUSE
            if port == 0 and socks and in_use and attempt < 7:
                continue
            raise
        return socks
    raise AssertionError("unreachable")


def _resolve(bind: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(bind or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BindError(f"cannot listen on {format_host(bind)}:{port}: cannot resolve {bind!r}: {e.strerror}") from None
    seen: list[str] = []
    for _, _, _, _, addr in infos:
        if addr[0] not in seen:
            seen.append(str(addr[0]))
    return seen


def _bind_one(host: str, port: int, *, optional: bool) -> socket.socket | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        if optional:
            logger.debug("no %s socket for %s (%s); listening without it", family.name, host, e)
            return None
        raise BindError(f"cannot listen on {format_host(host)}:{port}: {e.strerror}") from e
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        if optional and e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            logger.debug("cannot bind %s (%s); listening without it", host, e.strerror)
            return None
        raise BindError(f"cannot listen on {format_host(host)}:{port}: {_advice(e, port)}") from e
    if not is_loopback(host):
        logger.warning("listening on non-loopback address %s:%d: anyone who can reach it reaches the far side",
                       format_host(host), sock.getsockname()[1])
    return sock


def _advice(e: OSError, port: int) -> str:
    if e.errno == errno.EADDRINUSE:
        return (f"address already in use; another process listens there (see `ss -ltnp 'sport = :{port}'`) "
                "or pick another port")
    if e.errno == errno.EACCES:
        return "permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE"
    if e.errno == errno.EADDRNOTAVAIL:
        return "no such local address on this machine"
    return e.strerror or str(e)


class Acceptor:
    """Accepts from a reader callback that stays registered with the loop (a wait per connection
    cost two epoll_ctl calls and a loop round trip: docs/performance.md); every pending client is
    accepted in one go and handed to ``serve``. At the connection limit (``capacity``), or after an
    accept error (EMFILE and kin), the callback unhooks itself; new clients wait in the kernel's
    backlog until a connection ends, or 0.1 s has passed.

    ``serve`` runs in that callback, outside any task: it must not start anyio tasks (anyio finds
    its event loop there only when the app started with anyio.run, not asyncio.run or uvloop.run).
    """

    def __init__(self, sock: socket.socket, capacity: anyio.Semaphore,
                 serve: Callable[[socket.socket, object], None], log: logging.LoggerAdapter[Any]) -> None:
        self.sock = sock
        self.capacity = capacity  # the forward's connection limit: one taken per client, given back when it ends
        self.serve = serve
        self.log = log
        self.loop = asyncio.get_running_loop()
        self.hooked = False
        self.paused = anyio.Event()  # set when the callback unhooked itself
        self.failed = False

    async def run(self) -> None:
        """Accept until the socket is closed (or this task is cancelled)."""
        try:
            self.hook()
            while self.sock.fileno() != -1:
                await self.paused.wait()
                self.paused = anyio.Event()
                if self.failed:
                    self.failed = False
                    await anyio.sleep(0.1)
                async with self.capacity:
                    pass  # room for one more (at once, unless at the limit)
                self.hook()
        finally:
            self.unhook()

    def hook(self) -> None:
        if not self.hooked and self.sock.fileno() != -1:
            self.loop.add_reader(self.sock, self._acceptable)
            self.hooked = True

    def unhook(self) -> None:
        if self.hooked:
            self.hooked = False
            if self.sock.fileno() != -1:
                self.loop.remove_reader(self.sock)

    def _pause(self) -> None:
        self.unhook()
        self.paused.set()

    def _acceptable(self) -> None:
        capacity = self.capacity
        while True:
            try:
                capacity.acquire_nowait()
            except anyio.WouldBlock:
                self._pause()
                return
            try:
                client, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                capacity.release()
                return
            except OSError as e:
                capacity.release()
                if self.sock.fileno() != -1:
                    self.log.warning("accept failed: %s; retrying", e.strerror or e)
                    self.failed = True
                    self._pause()
                return
            self.serve(client, peer)
