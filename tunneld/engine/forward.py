"""A forward: listeners, one relay task per connection, a probe loop, and the counters status shows.

States (docs/health.md): ``starting`` until the first probe through the transport succeeds (for up
to ``timeouts.ready``), then ``ready``; a failed probe makes it ``degraded``, or ``reconnecting``
while the transport's health says it is reconnecting; ``failed`` when its port cannot be bound
(retried) or the transport gave up (``TransportState.FAILED``).
Probes repeat every ``timeouts.probe_interval`` while ready, and after a failure sooner, backing off
exponentially (with jitter) up to that interval; a change of the transport's health, or a client
whose connection contradicts the state, brings the next probe forward. Clients are served in every
state: the probe only reports, it never gates a connection.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc

from tunneld.backoff import backoff
from tunneld.config import ForwardSpec, Timeouts, format_host
from tunneld.engine.listener import Acceptor, bind_listeners
from tunneld.engine.probe import ProbeResult, probe
from tunneld.engine.relay import RelayBroken, Traffic, relay, relay_path
from tunneld.errors import BindError, TransportError
from tunneld.logs import ContextLog
from tunneld.sockets import RawSocketStream
from tunneld.transports import Transport, TransportState

logger = logging.getLogger(__name__)

_conn_ids = itertools.count(1)

# After a failed probe the next comes after 0.25 s, then 0.5, 1, 2... up to the probe interval (at
# most _BACKOFF_CAP), jittered (tunneld/backoff.py), so `wait` returns soon after the far side
# appears without hammering it.
_BACKOFF_START = 0.25
_BACKOFF_CAP = 5.0
# A client's connect that contradicts the state, or a change of the transport's health, triggers a
# probe, but not sooner than this after the last one ended (a flapping transport must not spin it).
MIN_PROBE_GAP = 0.5
# State changes kept for `status` ("what happened"): the last few are enough to explain an outage.
HISTORY = 20
# How long a refused client may keep sending before we close on it.
_REFUSE_LINGER = 1.0


class ForwardState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    DEGRADED = "degraded"
    RECONNECTING = "reconnecting"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass
class ForwardStats:
    active: int = 0
    total: int = 0
    errors: int = 0
    traffic: Traffic = field(default_factory=Traffic)
    reconnects: int = 0  # times the forward came back to ready after losing it


class Forward:
    """Listen on spec.bind:spec.port and relay each client to spec.host:spec.host_port via a transport."""

    def __init__(
        self,
        spec: ForwardSpec,
        transport: Transport,
        timeouts: Timeouts,
        on_change: Callable[[Forward], None] | None = None,
        *,
        retry_bind: float | None = None,
        listeners: list[socket.socket] | None = None,
    ) -> None:
        """``retry_bind``: when set, a port that cannot be bound makes the forward ``failed`` (not an
        error) and binding is retried this often (seconds); discovered forwards use it.
        ``listeners``: sockets already bound and listening for this forward (a reload hands over the
        previous forward's, so the port never closes); the forward owns them from now on."""
        self.spec = spec
        self._on_change = on_change
        self.transport = transport
        self.timeouts = timeouts
        self.stats = ForwardStats()
        self.state = ForwardState.STARTING
        self.last_probe: ProbeResult | None = None
        self.last_error: str | None = None
        self.last_ok: float | None = None  # wall-clock time of the last successful probe
        self.state_since = time.time()
        self.history: deque[dict[str, object]] = deque(maxlen=HISTORY)
        self.sockets: list[socket.socket] = list(listeners or [])
        self._bound: list[tuple[str, int]] = []  # kept after the listeners close: status reads it while draining
        self.log = ContextLog(logger, forward=spec.name)
        self._capacity = anyio.Semaphore(spec.max_connections)
        self._accept_scope: anyio.CancelScope | None = None
        self._acceptors: list[Acceptor] = []
        self._drained = anyio.Event()
        self._connections: set[asyncio.Task[None]] = set()
        self._grace = timeouts.drain
        self._retry_bind = retry_bind
        self._bind_scope: anyio.CancelScope | None = None
        self._stopped = False
        self._kick = anyio.Event()
        self._started_at = time.monotonic()
        self._ever_ready = False
        self._relay_path = relay_path()  # KCI_TUNNELD_RELAY, read once

    @property
    def addresses(self) -> list[str]:
        """The bound listen addresses, with the real port when the config asked for 0."""
        return [f"{format_host(host)}:{port}" for host, port in self._bound]

    @property
    def port(self) -> int:
        return self._bound[0][1] if self._bound else self.spec.port

    async def run(self, *, task_status: anyio.abc.TaskStatus[Forward] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind, report started, serve until stop() (then drain) or cancellation.

        :raises BindError: when a listener cannot be bound (before ``started``), unless ``retry_bind``.
        """
        if not await self._bind(task_status):
            self._set_state(ForwardState.STOPPED)
            return
        self._bound = [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in self.sockets]
        self.log.info("listening on %s -> %s via %s", ", ".join(self.addresses), self.spec.target, self.transport.name)
        try:
            async with anyio.create_task_group() as accepting:
                self._accept_scope = accepting.cancel_scope
                for sock in self.sockets:
                    accepting.start_soon(self._accept_loop, sock)
                accepting.start_soon(self._probe_loop)
                accepting.start_soon(self._watch_transport)
                if self.state != ForwardState.FAILED:
                    task_status.started(self)
                else:
                    self._started_at = time.monotonic()  # bound at last: the start-up grace begins
                    self._set_state(ForwardState.STARTING)
            self._close_listeners()
            self._set_state(ForwardState.STOPPING)
            if self.stats.active:
                self.log.info("draining %d connection(s) for up to %gs", self.stats.active, self._grace)
                with anyio.move_on_after(self._grace):
                    await self._drained.wait()
                if self.stats.active:
                    self.log.warning("grace period over: closing %d connection(s)", self.stats.active)
        finally:
            self._close_listeners()
            await self._end_connections()
            self._set_state(ForwardState.STOPPED)

    def _spawn_connection(self, client: socket.socket, peer: object) -> None:
        # One asyncio task per connection, owned by this forward: _end_connections() cancels and
        # awaits whatever is left, so none outlives it. Not an anyio task group: its start_soon
        # costs ~28 us against create_task's ~5 us (uvloop, this machine), a tenth of what a
        # connection costs through a direct forward (bench/: conn/s, 1 client).
        task = asyncio.get_running_loop().create_task(self._serve(client, peer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _end_connections(self) -> None:
        """Cancel the connections still open and wait until each has closed its sockets."""
        with anyio.CancelScope(shield=True):
            while pending := [task for task in self._connections if not task.done()]:
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending)

    async def _bind(self, task_status: anyio.abc.TaskStatus[Forward]) -> bool:
        """Bind the listeners; with ``retry_bind``, report ``failed`` and retry until bound or stopped.

        :raises BindError: without ``retry_bind``.
        """
        if self.sockets:
            return True  # handed over, already listening
        if self._retry_bind is None:
            self.sockets = bind_listeners(self.spec.bind, self.spec.port)
            return True
        with anyio.CancelScope() as self._bind_scope:
            if self._stopped:
                return False
            while True:
                try:
                    self.sockets = bind_listeners(self.spec.bind, self.spec.port)
                    return True
                except BindError as e:
                    if self.state != ForwardState.FAILED:
                        self.log.warning("%s; retrying every %gs", e, self._retry_bind)
                        self.last_error = str(e)
                        self._set_state(ForwardState.FAILED)
                        task_status.started(self)
                await anyio.sleep(self._retry_bind)
        return False

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting now; open connections get ``grace`` seconds to finish."""
        self._stopped = True
        if grace is not None:
            self._grace = grace
        if self._bind_scope is not None:
            self._bind_scope.cancel()
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        self._close_listeners()

    def snapshot(self) -> dict[str, object]:
        """The forward as ``status --json`` shows it."""
        return {
            "name": self.spec.name,
            "listen": self.addresses or [self.spec.listen],
            "port": self.port,
            "target": self.spec.target,
            "state": str(self.state),
            "active": self.stats.active,
            "total": self.stats.total,
            "bytes_up": self.stats.traffic.up,
            "bytes_down": self.stats.traffic.down,
            "errors": self.stats.errors,
            "reconnects": self.stats.reconnects,
            "max_connections": self.spec.max_connections,
            "probe": self.spec.probe,
            "state_since": self.state_since,
            "last_ok": self.last_ok,
            "last_probe": self.last_probe.as_dict() if self.last_probe else None,
            "last_error": self.last_error,
            "history": list(self.history),
        }

    def _set_state(self, state: ForwardState) -> None:
        if state != self.state:
            self.log.info("state %s -> %s", self.state, state)
            now = time.time()
            unhealthy = state in (ForwardState.DEGRADED, ForwardState.RECONNECTING, ForwardState.FAILED)
            self.history.append({"at": now, "from": str(self.state), "to": str(state),
                                 "after": round(now - self.state_since, 3),
                                 "reason": self.last_error if unhealthy else None})
            self.state = state
            self.state_since = now
            if self._on_change is not None:
                self._on_change(self)

    def _close_listeners(self) -> None:
        for acceptor in self._acceptors:
            acceptor.unhook()  # the loop must not poll a closed fd
        for s in self.sockets:
            if s.fileno() != -1:
                s.close()

    async def _accept_loop(self, sock: socket.socket) -> None:
        acceptor = Acceptor(sock, self._capacity, self._spawn_connection, self.log)
        self._acceptors.append(acceptor)
        try:
            await acceptor.run()
        finally:
            self._acceptors.remove(acceptor)

    async def _serve(self, client_sock: socket.socket, peer: object) -> None:
        cid = next(_conn_ids)
        log = ContextLog(logger, forward=self.spec.name, conn=cid)
        self.stats.active += 1
        self.stats.total += 1
        client = RawSocketStream(client_sock)
        log.debug("accepted from %s", peer)
        try:
            try:
                first = _already_sent(client_sock) if self.transport.pipelines_first_bytes else b""
            except OSError as e:
                log.debug("client gone before its upstream was opened: %s", e)
                await client.aclose()
                return
            self.stats.traffic.up += len(first)
            try:
                upstream = await self.transport.connect(self.spec.host, self.spec.host_port, first, early=True)
            except TransportError as e:
                self._unreachable(e, log)
                await _refuse(client)
                return
            except BaseException:
                await client.aclose()  # cancelled while connecting
                raise
            if self.state != ForwardState.READY:
                self._kick.set()  # reachable again, it seems: let a probe confirm it now
            try:
                await relay(client, upstream, self.stats.traffic, self._relay_path)
            except TransportError as e:  # opened early, then refused: the relay closed the client cleanly
                self._unreachable(e, log)
            except RelayBroken as e:
                if e.by_client:  # the client reset or vanished: its business, not the forward's
                    log.debug("client broke off mid-stream: %s", e)
                else:
                    self.stats.errors += 1
                    self.last_error = f"a connection to {self.spec.target} broke mid-stream: {e}"
                    log.debug("connection to the far side broken: %s", e)
            else:
                log.debug("closed")
        except Exception:
            # A bug in one connection must not take down the others: log it loudly and go on.
            self.stats.errors += 1
            log.exception("unexpected error; closing this connection")
        finally:
            self.stats.active -= 1
            self._capacity.release()
            if self.stats.active == 0:
                self._drained.set()
                self._drained = anyio.Event()

    def _unreachable(self, e: TransportError, log: ContextLog) -> None:
        """A client's connection could not reach the far side: count it, say why, and probe now."""
        self.stats.errors += 1
        self.last_error = str(e)
        log.warning("closing client: %s", e)
        if self.state == ForwardState.READY:
            self._kick.set()  # probe now, so the state says what clients see

    async def _probe_loop(self) -> None:
        failures = 0
        while True:
            result = await probe(self.transport, self.spec, deadline=self.timeouts.probe, local_port=self.port)
            self.last_probe = result
            if result.ok:
                failures = 0
                self.last_ok = result.at
                if self._ever_ready and self.state != ForwardState.READY:
                    self.stats.reconnects += 1
                    self.log.info("probe ok again after %.1fs (%s)", time.time() - self.state_since, result.detail)
                self._ever_ready = True
                self._set_state(ForwardState.READY)
            else:
                failures += 1
                self.last_error = result.error
                if failures == 1:
                    # The first of a run at once: a forward whose target refuses must not stay silent until
                    # it turns degraded (`start --detach` waits the whole ready timeout). Not every one: the
                    # retries come every few seconds, and the state changes say the rest.
                    self.log.warning("probe failed: %s; retrying (repeats are logged at debug level)", result.error)
                else:
                    self.log.debug("probe failed again (%d in a row): %s", failures, result.error)
                self._set_state(self._unhealthy_state())
            ready = self.state == ForwardState.READY
            interval = self.timeouts.probe_interval
            await self._pause(interval if ready else backoff(failures, min(interval, _BACKOFF_CAP), _BACKOFF_START))

    async def _watch_transport(self) -> None:
        """Bring the next probe forward whenever the transport's health changes (it reads the new state)."""
        while True:
            await self.transport.health.changed()
            self._kick.set()

    def _unhealthy_state(self) -> ForwardState:
        transport = self.transport.health.state
        if transport == TransportState.FAILED:
            return ForwardState.FAILED
        if transport == TransportState.RECONNECTING:
            return ForwardState.RECONNECTING
        if not self._ever_ready and time.monotonic() - self._started_at < self.timeouts.ready:
            return ForwardState.STARTING
        return ForwardState.DEGRADED

    async def _pause(self, delay: float) -> None:
        """Sleep ``delay``, ending early (but not before ``MIN_PROBE_GAP``) on a kick: a client's or a
        change of the transport's health, also one that came while the last probe ran."""
        started = time.monotonic()
        with anyio.move_on_after(delay):
            await self._kick.wait()
            self._kick = anyio.Event()
            await anyio.sleep(max(0.0, MIN_PROBE_GAP - (time.monotonic() - started)))


# What a client sent before its upstream exists, handed to a transport that can send it along with
# the connection request (most clients speak first: an HTTP request, a TLS ClientHello).
FIRST_BYTES = 64 * 1024


def _already_sent(sock: socket.socket) -> bytes:
    """The bytes waiting on a new client socket, without waiting (b"" when none, or at its EOF,
    which the relay then reads again).

    :raises OSError: when the client is gone already (reset).
    """
    try:
        return sock.recv(FIRST_BYTES)
    except (BlockingIOError, InterruptedError):
        return b""


async def _refuse(client: RawSocketStream) -> None:
    """Close a client cleanly (FIN, not RST) when the far side cannot be reached."""
    await client.send_eof()
    with anyio.move_on_after(_REFUSE_LINGER):
        try:
            while await client.receive():
                pass
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
    await client.aclose()
