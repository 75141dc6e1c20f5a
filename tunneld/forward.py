"""A forward: listeners, one relay task per connection, a probe loop, and the counters status shows."""

from __future__ import annotations

import enum
import itertools
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc

from tunneld.config import ForwardSpec, Timeouts, format_host
from tunneld.errors import TransportError
from tunneld.listener import bind_listeners
from tunneld.probe import ProbeResult, probe
from tunneld.relay import RelayBroken, Traffic, relay
from tunneld.streams import RawSocketStream
from tunneld.transports import Transport

logger = logging.getLogger(__name__)

_conn_ids = itertools.count(1)

# While not ready, probe this often (seconds) so `wait` returns soon after the far side appears.
_UNREADY_PROBE_INTERVAL = 0.5
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


class _Log(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: object, kwargs: object) -> tuple[str, object]:  # type: ignore[override]
        return f"[{self.extra['ctx']}] {msg}", kwargs  # type: ignore[index]


class Forward:
    """Listen on spec.bind:spec.port and relay each client to spec.host:spec.host_port via a transport."""

    def __init__(
        self,
        spec: ForwardSpec,
        transport: Transport,
        timeouts: Timeouts,
        on_change: Callable[[Forward], None] | None = None,
    ) -> None:
        self.spec = spec
        self._on_change = on_change
        self.transport = transport
        self.timeouts = timeouts
        self.stats = ForwardStats()
        self.state = ForwardState.STARTING
        self.last_probe: ProbeResult | None = None
        self.last_error: str | None = None
        self.sockets: list[socket.socket] = []
        self._bound: list[tuple[str, int]] = []  # kept after the listeners close: status reads it while draining
        self.log = _Log(logger, {"ctx": f"forward={spec.name}"})
        self._slots = anyio.Semaphore(spec.max_connections)
        self._accept_scope: anyio.CancelScope | None = None
        self._drained = anyio.Event()
        self._changed = anyio.Event()
        self._grace = timeouts.drain

    @property
    def addresses(self) -> list[str]:
        """The bound listen addresses, with the real port when the config asked for 0."""
        return [f"{format_host(host)}:{port}" for host, port in self._bound]

    @property
    def port(self) -> int:
        return self._bound[0][1] if self._bound else self.spec.port

    async def run(self, *, task_status: anyio.abc.TaskStatus[Forward] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind, report started, serve until stop() (then drain) or cancellation.

        :raises BindError: when a listener cannot be bound (before ``started``).
        """
        self.sockets = bind_listeners(self.spec.bind, self.spec.port)
        self._bound = [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in self.sockets]
        self.log.info("listening on %s -> %s via %s", ", ".join(self.addresses), self.spec.target, self.transport.name)
        try:
            async with anyio.create_task_group() as conns:
                async with anyio.create_task_group() as accepting:
                    self._accept_scope = accepting.cancel_scope
                    for sock in self.sockets:
                        accepting.start_soon(self._accept_loop, sock, conns)
                    accepting.start_soon(self._probe_loop)
                    task_status.started(self)
                self._close_listeners()
                self._set_state(ForwardState.STOPPING)
                if self.stats.active:
                    self.log.info("draining %d connection(s) for up to %gs", self.stats.active, self._grace)
                    with anyio.move_on_after(self._grace):
                        await self._drained.wait()
                    if self.stats.active:
                        self.log.warning("grace period over: closing %d connection(s)", self.stats.active)
                conns.cancel_scope.cancel()
        finally:
            self._close_listeners()
            self._set_state(ForwardState.STOPPED)

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting now; open connections get ``grace`` seconds to finish."""
        if grace is not None:
            self._grace = grace
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        self._close_listeners()

    async def wait_changed(self) -> ForwardState:
        """Wait for the next state change and return the new state."""
        await self._changed.wait()
        return self.state

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
            "max_connections": self.spec.max_connections,
            "last_probe": self.last_probe.as_dict() if self.last_probe else None,
            "last_error": self.last_error,
        }

    def _set_state(self, state: ForwardState) -> None:
        if state != self.state:
            self.log.info("state %s -> %s", self.state, state)
            self.state = state
            self._changed.set()
            self._changed = anyio.Event()
            if self._on_change is not None:
                self._on_change(self)

    def _close_listeners(self) -> None:
        for s in self.sockets:
            if s.fileno() != -1:
                s.close()

    async def _accept_loop(self, sock: socket.socket, conns: anyio.abc.TaskGroup) -> None:
        while True:
            await self._slots.acquire()  # at the limit, new clients wait in the kernel's backlog
            try:
                await anyio.wait_readable(sock)
                client, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                self._slots.release()
                continue
            except OSError as e:
                self._slots.release()
                if sock.fileno() == -1:
                    return
                self.log.warning("accept failed: %s; retrying", e.strerror or e)  # EMFILE and kin
                await anyio.sleep(0.1)
                continue
            except BaseException:
                self._slots.release()
                raise
            conns.start_soon(self._serve, client, peer)

    async def _serve(self, client_sock: socket.socket, peer: object) -> None:
        cid = next(_conn_ids)
        log = _Log(logger, {"ctx": f"forward={self.spec.name} conn={cid}"})
        self.stats.active += 1
        self.stats.total += 1
        client = RawSocketStream(client_sock)
        log.debug("accepted from %s", peer)
        try:
            try:
                upstream = await self.transport.connect(self.spec.host, self.spec.host_port)
            except TransportError as e:
                self.stats.errors += 1
                self.last_error = str(e)
                log.warning("closing client: %s", e)
                await _refuse(client)
                return
            except BaseException:
                await client.aclose()  # cancelled while connecting
                raise
            try:
                await relay(client, upstream, self.stats.traffic)
            except RelayBroken as e:
                self.stats.errors += 1
                log.debug("connection broken: %s", e)
            else:
                log.debug("closed")
        except Exception:
            # A bug in one connection must not take down the others: log it loudly and go on.
            self.stats.errors += 1
            log.exception("unexpected error; closing this connection")
        finally:
            self.stats.active -= 1
            self._slots.release()
            if self.stats.active == 0:
                self._drained.set()
                self._drained = anyio.Event()

    async def _probe_loop(self) -> None:
        while True:
            result = await probe(self.transport, self.spec, timeout=self.timeouts.probe)
            self.last_probe = result
            if result.ok:
                self._set_state(ForwardState.READY)
            else:
                self.last_error = result.error
                if self.state == ForwardState.READY:
                    self.log.warning("probe failed: %s", result.error)
                self._set_state(ForwardState.DEGRADED if self.state != ForwardState.STARTING else ForwardState.STARTING)
            ready = self.state == ForwardState.READY
            await anyio.sleep(self.timeouts.probe_interval if ready else _UNREADY_PROBE_INTERVAL)


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
