"""The SSH transport: every forward over one SSH connection, one direct-tcpip channel per client.

The daemon owns the listeners, so they survive the connection: when keepalives go unanswered or
the server goes away, a supervisor reconnects in the background (capped exponential backoff with
jitter) while clients that arrive meanwhile wait up to ``timeouts.reconnect_wait``.

Start-up: ``__aenter__`` fails fast with a TransportError (exit code 6) on a definitive error: the
host key is refused, authentication fails, the name does not resolve, the config or a key file is
unusable. Transient errors (connection refused, timeout, reset) are retried with backoff for up to
``timeouts.connect`` so a server that is just starting is waited for, then also fail start-up: a
daemon that never connected has nothing to offer, and ``start --detach`` should say why at once.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType

import anyio
import anyio.abc

from tunneld.backoff import backoff
from tunneld.config import Timeouts, TransportSpec, format_host
from tunneld.errors import TransportError
from tunneld.ssh.channel import EarlyTcp
from tunneld.ssh.client import ChannelStream, SshConnection, SshError, open_connection
from tunneld.transports import TransportHealth, TransportState, send_first

logger = logging.getLogger(__name__)

# First retry after a loss comes quickly (a restarted sshd is usually back within a second);
# later ones back off up to settings.reconnect_max_delay.
_BACKOFF_START = 0.25
# Start-up retries back off to at most this (and settings.reconnect_max_delay): timeouts.connect is short.
_FIRST_CONNECTION_CAP = 2.0


class SshTransport:
    """One resilient SSH connection; ``connect`` opens a channel on it per client."""

    name = "ssh"
    pipelines_first_bytes = False  # a channel takes data only once the server confirmed it

    def __init__(self, spec: TransportSpec, timeouts: Timeouts) -> None:
        self.settings = spec.ssh
        self.timeouts = timeouts
        self._conn: SshConnection | None = None
        self._up = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self.health = TransportHealth(TransportState.CONNECTING)
        self.reconnects = 0
        self.connected_since: float | None = None
        self.channels_opened = 0

    async def __aenter__(self) -> SshTransport:
        conn = await self._first_connection()
        self._attach(conn)
        facts = conn.describe()
        logger.info("ssh: connected to %s (%s%s)", conn.target, facts.get("cipher"),
                    ", small packets through libsodium" if "libsodium" in facts else "")
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._supervise)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
                await self._tg.__aexit__(None, None, None)
        finally:
            self.health.set(TransportState.CLOSED)
            if self._conn is not None:
                await self._conn.aclose()
                self._conn = None

    async def connect(self, host: str, port: int, first: bytes = b"", *,
                      early: bool = False) -> ChannelStream | EarlyTcp:
        """Open a channel to host:port as the SSH server sees it, then send ``first``.

        With ``early``, return at once (once the connection is up) a stream the relay opens when it
        wires the client (tunneld/ssh/channel.py): the open is sent as the client is accepted, and its
        refusal comes from ``relay()`` as a TransportError.

        :raises TransportError: naming the target and the reason (refused, or the SSH connection is
            down and did not come back within timeouts.reconnect_wait).
        """
        what = f"{format_host(host)}:{port}"
        conn = await self._connection(what)
        if early and not first and conn.fast is not None:
            return EarlyTcp(conn, host, port, self._count_channel)
        try:
            stream = await conn.open_tcp(host, port)
        except TransportError:
            if not conn.closed:
                raise  # the far side refused: nothing to wait for
            # The link died under this open: wait for the reconnect like any client arriving now.
            stream = await (await self._connection(what)).open_tcp(host, port)
        self.channels_opened += 1
        await send_first(stream, first, f"{what} closed the channel at once")
        return stream

    def _count_channel(self) -> None:
        self.channels_opened += 1

    async def open_unix(self, path: str) -> ChannelStream:
        """A stream to the unix socket ``path`` on the server (direct-streamlocal, as ``ssh -L`` to a
        socket); waits through a reconnect like ``connect``.

        :raises TransportError: naming the socket and the reason.
        """
        return await (await self._connection(path)).open_unix(path)

    async def open_exec(self, command: str) -> ChannelStream:
        """The stdin and stdout of ``command`` run on the server, as one stream; waits through a
        reconnect like ``connect``.

        :raises TransportError: naming the command and the reason.
        """
        return await (await self._connection(command)).open_exec(command)

    def info(self) -> dict[str, object]:
        conn = self._conn
        out: dict[str, object] = {
            "kind": self.name,
            "server": str(conn.target) if conn else self.settings.host,
            "state": str(self.health.state),
            "reconnects": self.reconnects,
            "last_error": self.health.last_error,
            "connected_since": self.connected_since,
            "channels_opened": self.channels_opened,
            "host_key_checked": self.settings.check_host_key,
        }
        if conn is not None and self.health.state == TransportState.CONNECTED:
            out.update(conn.describe())
        return out

    async def cleanup(self) -> None:
        return None  # channels leave nothing behind on the server

    async def _connection(self, what: str) -> SshConnection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        self._mark_down()  # the supervisor may not have run since the loss
        with anyio.move_on_after(self.timeouts.reconnect_wait):
            await self._up.wait()
        conn = self._conn
        if conn is None or conn.closed:
            raise TransportError(
                f"could not connect to {what}: the SSH connection to {self.settings.host} is down and did not "
                f"come back within {self.timeouts.reconnect_wait:g}s (timeouts.reconnect_wait); last error: "
                f"{self.health.last_error or 'none yet'}"
            )
        return conn

    def _mark_down(self) -> None:
        if self._up.is_set():
            self._up = anyio.Event()

    def _attach(self, conn: SshConnection) -> None:
        if not self.settings.check_host_key:
            logger.warning(
                "ssh: host key checking is OFF (check_host_key = false): connected to %s without verifying "
                "it; anyone who can intercept the connection can read and change everything forwarded",
                conn.target)
        self._conn = conn
        self.connected_since = time.time()
        self._up.set()
        self.health.set(TransportState.CONNECTED)

    async def _first_connection(self) -> SshConnection:
        """Connect at start-up; retry transient errors for up to timeouts.connect."""
        deadline = time.monotonic() + self.timeouts.connect
        cap = min(_FIRST_CONNECTION_CAP, self.settings.reconnect_max_delay)
        failures = 0
        while True:
            try:
                return await open_connection(self.settings, self.timeouts)
            except SshError as e:
                self.health.set(TransportState.CONNECTING, str(e))
                failures += 1
                remaining = deadline - time.monotonic()
                if e.definitive or remaining <= 0:
                    raise
                # The last try comes at the deadline.
                delay = min(backoff(failures, cap, _BACKOFF_START), remaining)
                logger.info("ssh: %s; retrying in %.2fs", e, delay)
                await anyio.sleep(delay)

    async def _supervise(self) -> None:
        """Wait for the connection to end, then reconnect with backoff; forever."""
        while True:
            assert self._conn is not None
            reason = await self._conn.wait_closed()
            self._mark_down()
            self.connected_since = None
            self.health.set(TransportState.RECONNECTING, f"connection lost: {reason}")
            logger.warning("ssh: connection to %s lost (%s); reconnecting", self._conn.target, reason)
            await self._conn.aclose()
            self._attach(await self._reconnect())
            self.reconnects += 1
            assert self._conn is not None
            logger.info("ssh: reconnected to %s (reconnect #%d)", self._conn.target, self.reconnects)

    async def _reconnect(self) -> SshConnection:
        attempt = 0
        while True:
            attempt += 1
            await anyio.sleep(backoff(attempt, self.settings.reconnect_max_delay, _BACKOFF_START))
            try:
                return await open_connection(self.settings, self.timeouts)
            except SshError as e:
                self.health.set(TransportState.RECONNECTING, str(e))
                # A refused host key or login while reconnecting is worth a louder line: it will
                # not heal by itself, but known_hosts or the key may be fixed while we keep trying.
                level = logging.ERROR if e.definitive else logging.WARNING
                logger.log(level, "ssh: reconnect attempt %d failed: %s", attempt, e)
