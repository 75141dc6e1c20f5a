"""The SSH connection and its channels, over asyncssh: connect (``open_connection``), open
channels, and carry them as anyio byte streams, with asyncssh's exceptions translated into
messages a person can act on.

Nothing outside tunneld/ssh/ imports asyncssh or holds its objects (here, target.py, and the packet
path beside them: wire.py, ciphers.py, channel.py, wired.py).
What it offers:

- ``open_connection(settings, timeouts) -> SshConnection``: resolve the settings through the ssh
  config (HostName, User, Port, IdentityFile, UserKnownHostsFile, Ciphers, ProxyJump...), verify
  the host key against known_hosts, authenticate with key files and ssh-agent;
- ``SshConnection.open_tcp/open_unix/open_exec``: one channel each, as a ``ChannelStream``.

Not here: how the settings become asyncssh options and what a refusal says (tunneld/ssh/target.py,
``SshError`` is re-exported from here), and the Docker API over SSH (tunneld/docker/over_ssh.py).

One module, though over 300 lines, because it is the adapter: the channel stream, the session that
feeds it and the exception translation all hold asyncssh objects, and keeping them together is what
keeps asyncssh out of every other module.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import asyncssh

from tunneld.config import SshSettings, Timeouts, format_host
from tunneld.engine.relay.common import Traffic
from tunneld.errors import TransportError
from tunneld.ssh import sodium
from tunneld.ssh.target import SshError, SshTarget, auth_error, host_key_error, make_plan
from tunneld.ssh.wire import FastConnection, adopt, write_in_pieces
from tunneld.ssh.wired import Wired

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


class _Client(asyncssh.SSHClient):
    """Remembers the host key a server offered (for the refusal message) and why the connection ended."""

    def __init__(self) -> None:
        self.offered_key: str | None = None
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.fast: FastConnection | None = None

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        # Before the version exchange: every packet after the key exchange takes the cheaper path.
        self.fast = adopt(conn)

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
    plan = await anyio.to_thread.run_sync(make_plan, settings, timeouts)
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
        raise host_key_error(target, clients[-1].offered_key if clients else None) from None
    except asyncssh.PermissionDenied:
        raise auth_error(target) from None
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


class SshConnection:
    """One authenticated SSH connection; every stream is a channel on it."""

    def __init__(self, conn: asyncssh.SSHClientConnection, client: _Client, target: SshTarget, *,
                 open_timeout: float) -> None:
        self._conn = conn
        self._client = client
        self.target = target
        self.open_timeout = open_timeout  # how long a channel open may take (timeouts.connect)
        # Channel writes go out as one system call however many packets they make, sealed by the send
        # lane where it applies (tunneld/ssh/wire.py).
        self._write: Callable[[Any, bytes], None] = (
            client.fast.write_channel if client.fast is not None else write_in_pieces)

    @property
    def closed(self) -> bool:
        return self._client.closed.done()

    @property
    def fast(self) -> FastConnection | None:
        """The connection as tunneld/ssh/wire.py made it, or None if asyncssh built something else."""
        return self._client.fast

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
        facts: dict[str, object] = {
            "server_version": self._conn.get_extra_info("server_version"),
            "cipher": _decode(self._conn.get_extra_info("send_cipher")),
        }
        fast = self._client.fast
        if fast is not None and fast.small_packets_by_libsodium():
            facts["libsodium"] = f"chacha20's packets up to {sodium.SMALL // 1024} KiB"  # absent: nothing said
        return facts

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
            wirable=False,
        )

    async def _open(self, what: str, create: Callable[[], Awaitable[tuple[Any, Any]]], *,
                    wirable: bool = True) -> ChannelStream:
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
        return ChannelStream(chan, session, what, self._write, wirable=wirable)


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
        # Once the channel is wired to a client socket (tunneld/ssh/wired.py), every callback goes there.
        self.sink: Wired | None = None

    def connection_made(self, chan: Any) -> None:
        self.chan = chan
        chan.set_write_buffer_limits(high=SEND_HIGH_WATER, low=SEND_LOW_WATER)

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if datatype:  # an exec session's stderr: keep the start of it for the error message
            self.stderr = (self.stderr + data)[:_STDERR_KEEP]
            return
        if self.sink is not None:
            self.sink.channel_data(data)
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
        if self.sink is not None:
            self.sink.channel_eof()
        _wake(self.read_waiter)
        return True  # keep our sending side open: half-close

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.sink is not None:
            self.sink.channel_pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.sink is not None:
            self.sink.channel_resume_writing()
        _wake(self.write_waiter)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.error = exc
        if self.sink is not None:
            self.sink.channel_lost(exc)
        self.wake_all()

    def hand_over(self, sink: Wired) -> None:
        """Route every callback to ``sink`` from now on, after what arrived before (bytes, EOF, close)."""
        self.sink = sink
        while self.buffer:
            sink.channel_data(self.buffer.popleft())
        self.buffered = 0
        if self.read_paused:
            self.read_paused = False
            if not sink.client_paused:
                self.chan.resume_reading()
        if self.write_paused:
            sink.channel_pause_writing()
        if self.lost:
            sink.channel_lost(self.error)
        elif self.eof:
            sink.channel_eof()

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

    def __init__(self, chan: Any, session: _PipeSession, what: str,
                 write: Callable[[Any, bytes], None] = write_in_pieces, *,
                 wirable: bool = False) -> None:
        self._chan = chan
        self._write = write
        self._s = session
        self._what = what
        self._closed = False
        self._eof_sent = False
        self._loop = asyncio.get_running_loop()
        # The relay's fast path (tunneld/engine/relay/__init__.py): a TCP or unix-socket channel wires
        # itself to the client's socket. Not an exec channel: its stderr decides how its stream ends.
        self.relay_socket: Callable[[socket.socket, Traffic], Awaitable[None]] | None = (
            self._relay_socket if wirable else None)

    async def _relay_socket(self, client: socket.socket, traffic: Traffic) -> None:
        """Relay between ``client`` and this channel with callbacks only (tunneld/ssh/wired.py); the
        stream is used up by it.

        :raises RelayBroken: when either side failed; both are closed by then.
        """
        self._closed = True
        wired = Wired(self._chan, self._write, traffic, self._what)
        await wired.wire(client)
        self._s.hand_over(wired)
        await wired.wait()

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
            self._write(self._chan, item)
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


__all__ = [
    "ChannelStream",
    "SshConnection",
    "SshError",
    "open_connection",
]
