"""The Docker Engine API over SSH: a stream to the daemon's socket on the server (or to
``docker system dial-stdio`` run there), and a private local unix socket that relays each client
to a fresh such stream, for clients that only speak to sockets (aiohttp, aiodocker).

No asyncssh here: the connection and its channels are tunneld/ssh/'s (this module only asks an
SSH connection, or the SSH transport that keeps one up, for a socket or a command's stdio).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import anyio
import anyio.abc

from tunneld.engine.relay import RelayBroken, Traffic, relay
from tunneld.errors import TransportError
from tunneld.sockets import RawSocketStream
from tunneld.ssh.client import ChannelStream

logger = logging.getLogger(__name__)

DEFAULT_DOCKER_SOCKET = "/var/run/docker.sock"
# What the docker CLI runs on the far side for DOCKER_HOST=ssh://...; it honours the remote's own
# DOCKER_HOST, so it finds a daemon that does not listen on the default socket.
DOCKER_DIAL_STDIO = "docker system dial-stdio"


class SshOpener(Protocol):
    """What opens streams on an SSH server: an ``SshConnection``, or the ``SshTransport`` that keeps one up."""

    async def open_unix(self, path: str) -> ChannelStream: ...

    async def open_exec(self, command: str) -> ChannelStream: ...


async def open_docker_socket_stream(conn: SshOpener, path: str | None = DEFAULT_DOCKER_SOCKET) -> ChannelStream:
    """A stream to the Docker Engine API on the SSH server: the unix socket at ``path``
    (direct-streamlocal, as ``ssh -L`` to a socket), or with ``path=None`` the output of
    ``docker system dial-stdio`` run there (what the docker CLI does for DOCKER_HOST=ssh://).

    :raises TransportError: naming the socket or command and the reason.
    """
    if path is None:
        return await conn.open_exec(DOCKER_DIAL_STDIO)
    return await conn.open_unix(path)


@contextlib.asynccontextmanager
async def serve_unix_bridge(
    open_stream: Callable[[], Awaitable[anyio.abc.ByteStream]], *, name: str = "docker"
) -> AsyncIterator[str]:
    """Listen on a private local unix socket; relay each client to a fresh ``open_stream()``.

    Yields the socket path, for clients that only speak to sockets (aiohttp's UnixConnector,
    ``aiodocker.Docker(url="unix://" + path)``). The directory is mode 0700 and removed on exit;
    relays still running then are cancelled.
    """
    directory = tempfile.mkdtemp(prefix=f"kci-tunneld-{name}-")  # mode 0700: only this user gets in
    path = os.path.join(directory, f"{name}.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(128)
        listener.setblocking(False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_accept_bridge_clients, listener, open_stream, name, tg)
            try:
                yield path
            finally:
                tg.cancel_scope.cancel()
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


async def _accept_bridge_clients(listener: socket.socket, open_stream: Callable[[], Awaitable[anyio.abc.ByteStream]],
                                 name: str, tg: anyio.abc.TaskGroup) -> None:
    while True:
        await anyio.wait_readable(listener)
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            continue
        tg.start_soon(_bridge_one, RawSocketStream(sock), open_stream, name)


async def _bridge_one(client: RawSocketStream, open_stream: Callable[[], Awaitable[anyio.abc.ByteStream]],
                      name: str) -> None:
    try:
        upstream = await open_stream()
    except TransportError as e:
        logger.warning("[%s bridge] closing client: %s", name, e)
        await client.aclose()
        return
    except BaseException:
        await client.aclose()
        raise
    try:
        await relay(client, upstream, Traffic())
    except RelayBroken as e:
        logger.debug("[%s bridge] connection broken: %s", name, e)


__all__ = [
    "DEFAULT_DOCKER_SOCKET",
    "open_docker_socket_stream",
    "serve_unix_bridge",
]
