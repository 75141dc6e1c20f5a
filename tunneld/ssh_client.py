"""The one adapter around asyncssh: settings -> options (with ~/.ssh/config), connections, channels
as anyio byte streams, and asyncssh's exceptions translated into messages a person can act on.

Nothing outside this module imports asyncssh or holds its objects. What it offers:

- ``open_connection(settings, timeouts) -> SshConnection``: resolve the settings through the ssh
  config (HostName, User, Port, IdentityFile, UserKnownHostsFile, Ciphers, ProxyJump...), verify
  the host key against known_hosts, authenticate with key files and ssh-agent;
- ``SshConnection.open_tcp/open_unix/open_exec``: one channel each, as a ``ChannelStream``;
- ``open_docker_socket_stream`` and ``serve_unix_bridge``: the Docker API over SSH.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import asyncssh

from tunneld.config import SshSettings, Timeouts, format_host
from tunneld.errors import TransportError
from tunneld.relay import RelayBroken, Traffic, relay
from tunneld.streams import RawSocketStream

logger = logging.getLogger(__name__)

DEFAULT_DOCKER_SOCKET = "/var/run/docker.sock"
# What the docker CLI runs on the far side for DOCKER_HOST=ssh://...; it honours the remote's own
# DOCKER_HOST, so it finds a daemon that does not listen on the default socket.
DOCKER_DIAL_STDIO = "docker system dial-stdio"

# Flow control per channel (bench/ssh_vs_openssh.py measured these against asyncssh's defaults of a
# 2 MiB window and 32 KiB packets). The window is what the server may send before we acknowledge;
# reads pause once RECV_HIGH_WATER bytes wait for the relay, which stops window updates, so a slow
# client throttles the far side instead of growing memory.
CHANNEL_WINDOW = 8 * 1024 * 1024
CHANNEL_MAX_PKTSIZE = 128 * 1024
RECV_HIGH_WATER = 2 * 1024 * 1024
RECV_LOW_WATER = 512 * 1024
SEND_HIGH_WATER = 1024 * 1024
SEND_LOW_WATER = 256 * 1024
_STDERR_KEEP = 4096

# Known-hosts files OpenSSH reads when neither the settings nor the ssh config name any.
_DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2", "/etc/ssh/ssh_known_hosts")
_DEFAULT_KEY_NAMES = ("id_ed25519", "id_ecdsa", "id_rsa", "id_ed25519_sk", "id_ecdsa_sk", "id_dsa")
# Cipher preference when the ssh config names none. asyncssh (like OpenSSH) puts chacha20-poly1305
# first, but its chacha20 shim costs about twice the CPU per byte of AES-GCM here, which OpenSSL runs
# on AES-NI (bench/ssh_vs_openssh.py: ~2.5 vs ~1.4 ms of CPU per MB sent).
_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
            "aes256-ctr", "aes192-ctr", "aes128-ctr")


class SshError(TransportError):
    """The SSH connection could not be made; ``definitive`` errors will not heal by retrying."""

    def __init__(self, message: str, *, definitive: bool) -> None:
        super().__init__(message)
        self.definitive = definitive


@dataclass(frozen=True)
class SshTarget:
    """Where the settings lead once the ssh config applied: for messages and status (no secrets)."""

    alias: str  # what the user wrote after ssh://
    host: str  # HostName
    port: int
    user: str
    identities: tuple[str, ...]  # key files offered, in order
    agent: bool  # an ssh-agent is offered too
    known_hosts: tuple[str, ...] | None  # files the host key is checked against; None: not checked

    def __str__(self) -> str:
        where = f"{self.user}@{format_host(self.host)}:{self.port}"
        return where if self.alias == self.host else f"{where} ({self.alias})"


@dataclass(frozen=True)
class _Plan:
    target: SshTarget
    kwargs: dict[str, Any]


def _expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path))


def _plan(settings: SshSettings, timeouts: Timeouts) -> _Plan:
    """Turn settings into asyncssh keyword arguments; blocking (reads the config and key files).

    :raises SshError: for a missing config file or an unusable key file (definitive).
    """
    kwargs: dict[str, Any] = {
        "host": settings.host,
        # asyncssh bounds TCP connect + key exchange + authentication together by connect_timeout.
        "connect_timeout": timeouts.connect,
        "login_timeout": timeouts.connect,
        "keepalive_interval": settings.keepalive_interval,
        "keepalive_count_max": settings.keepalive_count_max,
        # Never hand the agent or an X display to the far side: we only open channels.
        "agent_forwarding": False,
        "x11_forwarding": False,
        "request_pty": False,
    }
    if settings.config_file:
        config_file = _expand(settings.config_file)
        if not os.access(config_file, os.R_OK):
            raise SshError(f"ssh config file {config_file} does not exist or is not readable "
                           "(transport.ssh.config_file)", definitive=True)
        kwargs["config"] = [config_file]
    else:
        # As ssh does; spelled out because asyncssh only defaults to it inside connect().
        default = os.path.expanduser("~/.ssh/config")
        kwargs["config"] = [default] if os.access(default, os.R_OK) else []
    if settings.user:
        kwargs["username"] = settings.user
    if settings.port:
        kwargs["port"] = settings.port
    if settings.identity_files:
        keys = [_expand(f) for f in settings.identity_files]
        for key in keys:
            if not os.access(key, os.R_OK):
                raise SshError(f"identity file {key} does not exist or is not readable (-i / identity_files)",
                               definitive=True)
        kwargs["client_keys"] = keys
    try:
        options = asyncssh.SSHClientConnectionOptions(**kwargs)
    except asyncssh.KeyImportError as e:
        raise SshError(f"cannot use an identity file for {settings.host}: {e}; an encrypted key must be loaded "
                       "into ssh-agent (ssh-add) instead", definitive=True) from None
    except (OSError, ValueError) as e:
        raise SshError(f"cannot read the ssh configuration for {settings.host}: {e}", definitive=True) from None
    config = options.config
    if not config.get("Ciphers"):
        kwargs["encryption_algs"] = list(_CIPHERS)
    if settings.identity_files:
        identities = tuple(kwargs["client_keys"])
    else:
        configured = [_expand(str(p)) for p in _as_list(config.get("IdentityFile"))]
        defaults = [str(Path("~/.ssh", n).expanduser()) for n in _DEFAULT_KEY_NAMES]
        identities = tuple(p for p in (configured or defaults) if os.path.exists(p))
    known: tuple[str, ...] | None = None
    if settings.check_host_key:
        known = _known_hosts_files(settings, config)
        kwargs["known_hosts"] = _load_known_hosts(known)
    else:
        kwargs["known_hosts"] = None
    target = SshTarget(
        alias=settings.host, host=options.host, port=options.port, user=options.username,
        identities=identities, agent=bool(options.agent_path), known_hosts=known,
    )
    return _Plan(target=target, kwargs=kwargs)


def _as_list(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]  # type: ignore[attr-defined]


def _known_hosts_files(settings: SshSettings, config: Any) -> tuple[str, ...]:
    """The files that decide trust, as OpenSSH would pick them (settings > ssh config > defaults)."""
    if settings.known_hosts:
        return (_expand(settings.known_hosts),)
    user = config.get("UserKnownHostsFile")
    glob = config.get("GlobalKnownHostsFile")
    if user is None and glob is None:
        return tuple(_expand(p) for p in _DEFAULT_KNOWN_HOSTS)
    return tuple(_expand(p) for p in _as_list(user) + _as_list(glob))


def _load_known_hosts(files: tuple[str, ...]) -> Any:
    """Read the files that exist into one trust list (none at all means nothing is trusted).

    Passing asyncssh the parsed object rather than paths keeps it from falling back to
    ~/.ssh/known_hosts when the configured file is missing.
    """
    text = []
    for f in files:
        try:
            text.append(Path(f).read_text(encoding="utf-8", errors="replace"))
        except FileNotFoundError:
            continue
        except OSError as e:
            raise SshError(f"cannot read known_hosts file {f}: {e.strerror or e}", definitive=True) from None
    try:
        return asyncssh.import_known_hosts("\n".join(text))
    except ValueError as e:
        raise SshError(f"cannot parse known_hosts ({', '.join(files)}): {e}", definitive=True) from None


class _Client(asyncssh.SSHClient):
    """Remembers the host key a server offered (for the refusal message) and why the connection ended."""

    def __init__(self) -> None:
        self.offered_key: str | None = None
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        # Only called for a key that known_hosts does not trust: record it, then refuse.
        self.offered_key = f"{key.get_algorithm()} {key.get_fingerprint()}"
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


async def open_connection(settings: SshSettings, timeouts: Timeouts) -> SshConnection:
    """Connect, verify the host key and authenticate, as ``ssh`` would with the same config.

    :raises SshError: naming the server and the reason; ``definitive`` for host key, authentication,
        name resolution and configuration errors.
    """
    plan = await anyio.to_thread.run_sync(_plan, settings, timeouts)
    target = plan.target
    clients: list[_Client] = []

    def client_factory() -> _Client:
        clients.append(_Client())
        return clients[-1]

    try:
        # asyncssh bounds the whole handshake by connect_timeout; the outer deadline is a backstop.
        with anyio.fail_after(timeouts.connect + 5):
            conn = await asyncssh.connect(**plan.kwargs, client_factory=client_factory)
    except asyncssh.HostKeyNotVerifiable:
        raise _host_key_error(target, clients[-1].offered_key if clients else None) from None
    except asyncssh.PermissionDenied:
        raise _auth_error(target) from None
    except asyncssh.KeyExchangeFailed as e:
        raise SshError(f"ssh to {target}: no common algorithm with the server ({e.reason}); check Ciphers / "
                       "KexAlgorithms in the ssh config", definitive=True) from None
    except TimeoutError:  # asyncio.TimeoutError is the same class on 3.11
        raise SshError(f"ssh to {target}: no SSH answer within {timeouts.connect:g}s (timeouts.connect)",
                       definitive=False) from None
    except socket.gaierror as e:
        raise SshError(f"ssh to {target}: cannot resolve {target.host}: {e.strerror or e}",
                       definitive=e.errno != socket.EAI_AGAIN) from None
    except ConnectionRefusedError:
        raise SshError(f"ssh to {target}: connection refused (is sshd running and listening on port "
                       f"{target.port}?)", definitive=False) from None
    except OSError as e:
        raise SshError(f"ssh to {target}: {e.strerror or e}", definitive=False) from None
    except asyncssh.DisconnectError as e:
        raise SshError(f"ssh to {target}: the server closed the connection: {e.reason}", definitive=False) from None
    except (asyncssh.Error, ValueError) as e:
        raise SshError(f"ssh to {target}: {e}", definitive=True) from None
    return SshConnection(conn, clients[-1], target, open_timeout=timeouts.connect)


def _host_key_error(target: SshTarget, offered: str | None) -> SshError:
    files = target.known_hosts or ()
    existing = [f for f in files if os.path.exists(f)]
    key = f" ({offered})" if offered else ""
    where = format_host(target.host) if target.port == 22 else f"[{target.host}]:{target.port}"
    add_to = existing[0] if existing else (files[0] if files else "~/.ssh/known_hosts")
    changed = _has_other_key(target, existing)
    if changed:
        what = (f"the host key of {target}{key} does NOT match the one known_hosts ({', '.join(existing)}) has "
                f"for {where}: the server was reinstalled, or someone is intercepting the connection. Refusing "
                f"to connect. If you know the server changed, remove the old entry with `ssh-keygen -R '{where}' "
                f"-f {add_to}` and add the new one after checking its fingerprint")
    else:
        checked = ", ".join(files) if files else "no known_hosts file"
        what = (f"the host key of {target}{key} is not in known_hosts (checked: {checked}). Refusing to "
                f"connect. Check the fingerprint out of band, then add it with `ssh-keyscan -p {target.port} "
                f"{target.host} >> {add_to}`, or point known_hosts (transport.ssh.known_hosts, or "
                "UserKnownHostsFile in the ssh config) at a file that has it")
    return SshError(what, definitive=True)


def _has_other_key(target: SshTarget, files: list[str]) -> bool:
    if not files:
        return False
    try:
        port = None if target.port == 22 else target.port
        trusted = asyncssh.match_known_hosts(files, target.host, target.host, port)[0]
    except (OSError, ValueError):
        return False
    return bool(trusted)


def _auth_error(target: SshTarget) -> SshError:
    tried = list(target.identities)
    if target.agent:
        tried.append("the keys in ssh-agent (SSH_AUTH_SOCK)")
    offered = ", ".join(tried) if tried else "no keys at all (no -i, no IdentityFile, no ~/.ssh/id_*, no ssh-agent)"
    return SshError(
        f"authentication failed for {target.user}@{format_host(target.host)}:{target.port}: tried {offered}. "
        f"Add the matching public key to ~{target.user}/.ssh/authorized_keys on the server, or pass the right "
        "key with -i FILE (transport.ssh.identity_files) or an IdentityFile in the ssh config",
        definitive=True,
    )


class SshConnection:
    """One authenticated SSH connection; every stream is a channel on it."""

    def __init__(self, conn: asyncssh.SSHClientConnection, client: _Client, target: SshTarget, *,
                 open_timeout: float) -> None:
        self._conn = conn
        self._client = client
        self.target = target
        self.open_timeout = open_timeout  # how long a channel open may take (timeouts.connect)

    @property
    def closed(self) -> bool:
        return self._client.closed.done()

    async def wait_closed(self) -> str:
        """Wait until the connection ends; return why, for the log."""
        exc = await asyncio.shield(self._client.closed)
        if exc is None:
            return "the server closed the connection"
        if isinstance(exc, asyncssh.DisconnectError):
            return exc.reason
        return str(exc) or type(exc).__name__

    def describe(self) -> dict[str, object]:
        """Negotiated facts for ``status`` (no secrets)."""
        return {
            "server_version": self._conn.get_extra_info("server_version"),
            "cipher": _decode(self._conn.get_extra_info("send_cipher")),
        }

    async def aclose(self) -> None:
        """Close the connection and every channel on it."""
        self._conn.close()
        with anyio.move_on_after(2, shield=True):
            await self._conn.wait_closed()

    async def open_tcp(self, host: str, port: int) -> ChannelStream:
        """Open a direct-tcpip channel to host:port as the server sees it.

        Returns once the server's own TCP connection is established (sshd confirms the channel only then).

        :raises TransportError: naming the target and the reason, e.g. connection refused.
        """
        what = f"{format_host(host)}:{port}"
        return await self._open(
            what,
            lambda: self._conn.create_connection(_PipeSession, host, port, window=CHANNEL_WINDOW,
                                                 max_pktsize=CHANNEL_MAX_PKTSIZE),
        )

    async def open_unix(self, path: str) -> ChannelStream:
        """Open a channel to a unix socket on the server (direct-streamlocal, AllowStreamLocalForwarding).

        :raises TransportError: naming the path and the reason.
        """
        return await self._open(
            f"unix:{path}",
            lambda: self._conn.create_unix_connection(_PipeSession, path, window=CHANNEL_WINDOW,
                                                      max_pktsize=CHANNEL_MAX_PKTSIZE),
        )

    async def open_exec(self, command: str) -> ChannelStream:
        """Run a command on the server; its stdin/stdout are the stream (stderr is kept for errors).

        :raises TransportError: naming the command and the reason.
        """
        return await self._open(
            f"`{command}`",
            lambda: self._conn.create_session(_PipeSession, command, encoding=None, request_pty=False,
                                              window=CHANNEL_WINDOW, max_pktsize=CHANNEL_MAX_PKTSIZE),
        )

    async def _open(self, what: str, create: Callable[[], Awaitable[tuple[Any, Any]]]) -> ChannelStream:
        prefix = f"could not connect to {what} via ssh {self.target}"
        timeout = self.open_timeout
        try:
            with anyio.fail_after(timeout):
                chan, session = await create()
        except TimeoutError:
            raise TransportError(f"{prefix}: no answer within {timeout:g}s") from None
        except asyncssh.ChannelOpenError as e:
            hint = ""
            if e.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED:
                hint = (" (the server forbids forwarding: AllowTcpForwarding / AllowStreamLocalForwarding in "
                        "sshd_config)")
            raise TransportError(f"{prefix}: {e.reason}{hint}") from None
        except (OSError, asyncssh.Error) as e:
            raise TransportError(f"{prefix}: the SSH connection is gone ({e})") from None
        assert isinstance(session, _PipeSession)
        return ChannelStream(chan, session, what)


def _decode(value: object) -> object:
    return value.decode() if isinstance(value, bytes) else value


class _PipeSession(asyncssh.SSHTCPSession[bytes], asyncssh.SSHUNIXSession[bytes], asyncssh.SSHClientSession[bytes]):
    """The channel's callbacks: buffer what arrives, track flow control, wake the one waiting task.

    Works for TCP, unix-socket and exec channels alike (their callbacks have the same shape).
    """

    def __init__(self) -> None:
        self.chan: Any = None
        self.buffer: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.read_paused = False
        self.write_paused = False
        self.eof = False
        self.lost = False
        self.error: Exception | None = None
        self.stderr = b""
        self.received_any = False
        # One task may wait to receive while another waits for send window: each has its own slot.
        self.read_waiter: asyncio.Future[None] | None = None
        self.write_waiter: asyncio.Future[None] | None = None

    def connection_made(self, chan: Any) -> None:
        self.chan = chan
        chan.set_write_buffer_limits(high=SEND_HIGH_WATER, low=SEND_LOW_WATER)

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if datatype:  # an exec session's stderr: keep the start of it for the error message
            self.stderr = (self.stderr + data)[:_STDERR_KEEP]
            return
        self.buffer.append(data)
        self.buffered += len(data)
        self.received_any = True
        if self.buffered >= RECV_HIGH_WATER and not self.read_paused:
            self.read_paused = True
            self.chan.pause_reading()
        _wake(self.read_waiter)

    def eof_received(self) -> bool:
        self.eof = True
        _wake(self.read_waiter)
        return True  # keep our sending side open: half-close

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        _wake(self.write_waiter)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.error = exc
        self.wake_all()

    def wake_all(self) -> None:
        _wake(self.read_waiter)
        _wake(self.write_waiter)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class ChannelStream(anyio.abc.ByteStream):
    """An SSH channel as an anyio byte stream: EndOfStream at EOF, send_eof() half-closes.

    Backpressure both ways: send() waits while the peer's window and our send buffer are full;
    reads pause (no window updates) while RECV_HIGH_WATER bytes wait to be received.
    """

    def __init__(self, chan: Any, session: _PipeSession, what: str) -> None:
        self._chan = chan
        self._s = session
        self._what = what
        self._closed = False
        self._eof_sent = False
        self._loop = asyncio.get_running_loop()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        s = self._s
        while not s.buffer:
            if self._closed:
                raise anyio.ClosedResourceError
            if s.eof or s.lost:
                if s.error is not None:
                    raise anyio.BrokenResourceError(f"{self._what}: {s.error}")
                if s.stderr and not s.received_any:  # an exec that failed before it said anything
                    raise anyio.BrokenResourceError(f"{self._what} failed: {s.stderr.decode(errors='replace').strip()}")
                raise anyio.EndOfStream
            s.read_waiter = self._loop.create_future()
            try:
                await s.read_waiter
            finally:
                s.read_waiter = None
        # Hand over everything buffered up to max_bytes in one piece: one wake-up and one write
        # downstream per batch of SSH packets rather than per packet.
        parts: list[bytes] = []
        size = 0
        while s.buffer and size < max_bytes:
            chunk = s.buffer[0]
            if size + len(chunk) > max_bytes:
                if parts:
                    break
                s.buffer[0] = chunk[max_bytes:]
                chunk = chunk[:max_bytes]
            else:
                s.buffer.popleft()
            parts.append(chunk)
            size += len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        s.buffered -= len(data)
        if s.read_paused and s.buffered <= RECV_LOW_WATER:
            s.read_paused = False
            self._chan.resume_reading()
        return data

    async def send(self, item: bytes) -> None:
        s = self._s
        if self._closed or self._eof_sent:
            raise anyio.ClosedResourceError
        if s.lost:
            raise anyio.BrokenResourceError(f"{self._what}: {s.error or 'channel closed'}")
        try:
            self._chan.write(item)
        except OSError as e:
            raise anyio.BrokenResourceError(f"{self._what}: {e}") from e
        while s.write_paused and not s.lost and not self._closed:
            s.write_waiter = self._loop.create_future()
            try:
                await s.write_waiter
            finally:
                s.write_waiter = None
        if s.lost and s.error is not None:
            raise anyio.BrokenResourceError(f"{self._what}: {s.error}")

    async def send_eof(self) -> None:
        if self._eof_sent or self._closed or self._s.lost:
            return
        self._eof_sent = True
        with contextlib.suppress(OSError):
            self._chan.write_eof()  # queued behind unsent data: the peer sees every byte, then EOF

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._chan.close()  # flushes what is queued, then CLOSE; unread data is dropped
            self._s.wake_all()

    @property
    def stderr(self) -> str:
        """What an exec channel wrote to stderr so far (truncated)."""
        return self._s.stderr.decode(errors="replace")


async def open_docker_socket_stream(conn: SshConnection, path: str | None = DEFAULT_DOCKER_SOCKET) -> ChannelStream:
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
    "ChannelStream",
    "SshConnection",
    "SshError",
    "SshTarget",
    "open_connection",
    "open_docker_socket_stream",
    "serve_unix_bridge",
]
