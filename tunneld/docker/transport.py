"""--via docker: reach host:port as a helper container on the Docker host sees it, over exec streams.

How it works (docs/docker-transport.md has the full story and the numbers):

- A helper container runs on the Docker host with host networking (``--net=host``), idle. It needs
  only a POSIX shell, ``sleep``, ``dd`` and either socat or busybox ``nc``.
- With python3 in the helper image (the default image has it), ``mux_execs`` long-lived execs of
  the multiplexed relay (helper/mux.py; tunneld/docker/mux.py speaks to it) carry every connection,
  each connection on the exec with the fewest; one that ends is replaced. The pool below is not used.
- Otherwise a *slot* is one long-lived ``docker exec`` of RELAY_SCRIPT with stdin/stdout/stderr attached. It
  carries one TCP connection at a time and many in its life, so the ~80 ms an exec costs is paid
  once per slot, not per connection. A pool keeps ``pool_size`` idle slots warm, grows under load
  and is refilled in the background when slots (or the whole helper) go away.
- With socat, each slot keeps a socat per target already started and blocked opening a FIFO, so a
  request costs no process start; it connects only when a request opens the FIFO.

The relay script and the objects that speak to one exec (framing, half-close over TLS, the end
marker) are in tunneld/docker/execs.py; how the helper container is made, reused and removed is
tunneld/docker/helper/. This module keeps the helper running (repairing it when it goes away), owns
the pool, the mux channels and ``connect()``.

Why one module of this size: the pool is one state machine. The idle slots, the waiting
``connect()`` calls, the starts in flight and the failure count are read and changed together by
``_top_up``, ``release``, ``_acquire``, ``_run_slot`` and ``connect``, all in one task group whose
closing waits for the starts; a helper repair is triggered from the same places. Split along those
methods, each part would reach into the others' state. The mux channels share the exec starts
(their limit and the wait for them at closing), the helper repair and the health with the pool,
which is why they are kept here too, and which is also what a split into a channel-keeping module
would have to take along.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from tunneld.backoff import backoff
from tunneld.config import Timeouts, TransportSpec, format_host
from tunneld.docker.api import DockerAPIError, DockerClient, ExecStream
from tunneld.docker.execs import (
    FIRST_LIMIT,
    PYTHON_TOO_OLD,
    RELAY_MODES,
    RELAY_PYTHON,
    RELAY_SCRIPT,
    DockerStream,
    Slot,
    relay_key,
    short_reason,
)
from tunneld.docker.helper import Helper, ensure_helper, remove_helper
from tunneld.docker.host import Endpoint, resolve_endpoint
from tunneld.docker.images import choose_image
from tunneld.docker.mux import RELAY_MUX, Channel, MuxStream
from tunneld.docker.progress import PullPrinter
from tunneld.errors import TransportError
from tunneld.labels import ROLE_HELPER
from tunneld.transports import TransportHealth, TransportState, send_first

logger = logging.getLogger(__name__)

MAX_SLOTS = 512  # one exec (and one Docker connection) each
IDLE_TTL = 60.0  # idle slots beyond pool_size are closed after this long
EXEC_STARTS_AT_ONCE = 4  # runc starts barely overlap on small hosts: more would only queue
# Refilling the pool after relay streams failed to start: 0.2 s doubling to 5 s, jittered.
REFILL_BACKOFF_START = 0.2
REFILL_BACKOFF_CAP = 5.0

_HOST_RE = re.compile(r"^[A-Za-z0-9._:%-]+$")


class _Waiter:
    def __init__(self) -> None:
        self.event = anyio.Event()
        self.slot: Slot | None = None


class DockerTransport:
    """Opens streams to host:port as seen from a helper container on the Docker host."""

    name = "docker"
    pipelines_first_bytes = True

    def __init__(self, spec: TransportSpec, timeouts: Timeouts) -> None:
        self.settings = spec.docker
        self.timeouts = timeouts
        self.endpoint: Endpoint | None = None
        self.client: DockerClient | None = None
        self.helper = Helper(self.settings.helper_name, self.settings.helper_image, ROLE_HELPER,
                             instead="choose another docker.helper_name")
        self.helper_id: str | None = None
        self.image_why = ""  # why self.helper.image was chosen from settings.helper_images
        self._tg: anyio.abc.TaskGroup | None = None
        self._helper_lock = anyio.Lock()
        self._exec_starts = anyio.Semaphore(EXEC_STARTS_AT_ONCE)
        self._idle: list[Slot] = []
        self._waiters: deque[_Waiter] = deque()
        self._slots: set[Slot] = set()
        self._starting = 0
        self._starts_over: anyio.Event | None = None  # set once no slot is starting (while closing)
        self._numbers = 0
        self._closing = False
        # "reconnecting" while relay streams cannot be started (the last start failed).
        self.health = TransportHealth(TransportState.CONNECTING)
        self._failures = 0
        self.reconnects = 0
        self.mode = "?"
        self._hint: tuple[str, int] | None = None
        self._primed = False
        self._relay_python = RELAY_PYTHON  # "" once the helper's python3 proved too old for it
        self._helper_suspect = False
        self.connections = 0
        self.execs_started = 0
        # With python3 in the helper: mux_execs channels (execs of helper/mux.py), each carrying many
        # connections at once, instead of the pool of slots.
        self._channels: list[Channel] = []
        self._channel_ready = anyio.Event()  # set while a channel is live
        self._channel_lost = anyio.Event()

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> DockerTransport:
        """Reach the Docker host, make sure the helper runs, start one slot to prove it works.

        :raises TransportError: naming the Docker host (or helper image) and what to check.
        """
        self.endpoint = resolve_endpoint(self.settings)
        client = DockerClient(self.endpoint, timeout=self.timeouts.connect)
        await client.__aenter__()
        try:
            self.client = client
            version = await client.ping()
            logger.info("docker: %s (engine %s, API %s)", self.endpoint.describe(),
                        version.get("Version", "?"), version.get("ApiVersion", "?"))
            await self._ensure_helper(None)
            tg = anyio.create_task_group()
            await tg.__aenter__()
            self._tg = tg
        except BaseException:
            await client.__aexit__(None, None, None)
            raise
        try:
            if self.settings.mux_execs and self._relay_python and await self._start_channel() is not None:
                self.mode = "mux"
            else:
                self.release(await self._start_slot())
        except BaseException as e:
            await self.__aexit__(type(e), e, e.__traceback__)
            raise
        if not self._failures:  # else a refill failed meanwhile: "reconnecting" until one works
            self.health.set(TransportState.CONNECTED)
        if self.mode == "mux":
            tg.start_soon(self._keep_channels)
            logger.info("docker: helper %s ready: image %s (%s), relay mux (%s), %d exec(s) carrying every connection",
                        self.settings.helper_name, self.helper.image, self.image_why, self.relay_why(),
                        self.settings.mux_execs)
            return self
        self._top_up()
        tg.start_soon(self._housekeeping)
        logger.info("docker: helper %s ready: image %s (%s), relay %s (%s), pool %d", self.settings.helper_name,
                    self.helper.image, self.image_why, self.mode, self.relay_why(), self.settings.pool_size)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing = True
        try:
            if self._tg is not None:
                await self._let_starts_finish()
                self._tg.cancel_scope.cancel()
                # Not the caller's exception: anyio would wrap it in an ExceptionGroup, and a failed
                # __aenter__ (say, a helper image that cannot run the relay) would not raise the
                # TransportError it promises. The group only runs our background tasks.
                await self._tg.__aexit__(None, None, None)
        finally:
            self._tg = None
            if self.client is not None:
                await self.client.__aexit__(None, None, None)
                self.client = None

    async def _let_starts_finish(self) -> None:
        """Wait (at most timeouts.connect) for the exec starts in flight instead of cancelling them.

        A start cancelled mid-request makes aiohttp close its connection gracefully while dockerd is
        already answering, and over TLS uvloop then fails a write on the closed socket ("Fatal error
        on SSL protocol", logged at every stop that met a pool top-up). A started exec is closed by
        aborting its connection, which is clean. Nothing new starts once ``_closing`` is set.
        """
        if self._starting:
            self._starts_over = anyio.Event()
            with anyio.move_on_after(self.timeouts.connect):
                await self._starts_over.wait()

    def _start_done(self) -> None:
        self._starting -= 1
        if not self._starting and self._starts_over is not None:
            self._starts_over.set()

    @property
    def helper_label(self) -> str:
        return f"helper container {self.settings.helper_name}"

    def spawn(self, func: Callable[..., Coroutine[Any, Any, None]], *args: object) -> None:
        """Run a helper task in the transport's task group (it ends with the transport)."""
        if self._tg is not None:
            self._tg.start_soon(func, *args)

    # ---------------------------------------------------------------- the helper container

    async def _ensure_helper(self, stale_id: str | None) -> str:
        """Reuse the helper if it runs our image, start it if stopped, (re)create it otherwise."""
        assert self.client is not None
        async with self._helper_lock:
            if self.helper_id is not None and self.helper_id != stale_id:
                return self.helper_id  # someone else already repaired it
            # The first image of the list the host has, so a host that has one never needs a registry;
            # else each is pulled in turn. A pull may take minutes: its progress goes to the log, a
            # line per layer every few seconds.
            images = self.settings.helper_images
            hint = ("load it there or set --helper-image" if len(images) == 1 else
                    "load one of them there (docker pull or docker load on the Docker host) or set --helper-image")
            choice = await choose_image(self.client, images, what="helper image", hint=hint,
                                        progress=PullPrinter(lambda line: logger.info("docker: %s", line)))
            if self.image_why and choice.image != self.helper.image:  # at start-up the "ready" line says it
                logger.info("docker: helper image is now %s (%s)", choice.image, choice.why)
            self.helper = dataclasses.replace(self.helper, image=choice.image)
            self.image_why = choice.why
            self.helper_id, _ = await ensure_helper(self.client, self.helper, image_id=choice.image_id)
            return self.helper_id

    async def cleanup(self) -> None:
        """Remove the helper container (``stop --cleanup``)."""
        self._closing = True
        for slot in list(self._slots):
            slot.kill("cleanup")
        for channel in list(self._channels):
            channel.kill("cleanup")
        if self.client is None:
            return
        if await remove_helper(self.client, self.helper):
            logger.info("docker: removed helper container %s", self.settings.helper_name)

    def relay_why(self) -> str:
        """Why the relay in use was chosen, for the log and ``status``."""
        if self.mode == "mux":
            return "python3 in the image; many connections per exec"
        if self.mode == "python":
            return "python3 in the image" + ("" if self.settings.mux_execs else "; mux_execs = 0")
        python = "its python3 is older than 3.5" if not self._relay_python else "no python3 in the image"
        if self.mode == "socat":
            return f"{python}; socat is"
        return f"{python}, no socat; nc is"

    # ---------------------------------------------------------------- the slot pool

    async def _start_slot(self) -> Slot:
        """Start one exec of the relay and wait until it reports ready.

        :raises TransportError: when the exec cannot be started or the relay does not come up.
        """
        assert self._tg is not None
        async with self._exec_starts:
            self._numbers += 1
            slot = Slot(self, self._numbers)
            self._tg.start_soon(self._run_slot, slot)
            with anyio.move_on_after(self.timeouts.connect):
                await slot.ready.wait()
            if not slot.ready.is_set():
                slot.kill(f"the relay in helper {self.settings.helper_name} did not start within "
                          f"{self.timeouts.connect:g}s {slot.startup_output()}".rstrip())
        if slot.dead is not None:
            if self._relay_python and PYTHON_TOO_OLD in slot.startup_output():
                # The script relays instead (socat or nc), for this helper from now on.
                logger.warning("docker: helper image %s: %s; using the shell relay",
                               self.helper.image, slot.startup_output())
                self._relay_python = ""
                return await self._start_slot()
            raise TransportError(slot.dead)
        self.mode, self._primed = slot.mode, slot.primed
        return slot

    async def _open_exec(self, cmd: list[str]) -> tuple[AbstractAsyncContextManager[ExecStream], ExecStream]:
        assert self.client is not None
        if self._closing:
            raise TransportError("the docker transport is shutting down")
        if self._helper_suspect:
            self._helper_suspect = False
            await self._ensure_helper(self.helper_id)
        helper = self.helper_id or self.settings.helper_name
        for attempt in (1, 2):
            cm = self.client.exec_stream(helper, cmd)
            try:
                return cm, await cm.__aenter__()
            except DockerAPIError as e:
                gone = e.status in (404, 409) or "is not running" in str(e)  # 500 while being removed
                if not gone or attempt == 2 or self._closing:
                    raise
                # The helper was removed or stopped under us: repair it, then try once more.
                logger.info("docker: helper container %s is gone or stopped; recreating it", self.settings.helper_name)
                helper = await self._ensure_helper(self.helper_id)
        raise AssertionError("unreachable")

    async def _run_slot(self, slot: Slot) -> None:
        # The last target reached: a new slot starts a socat for it ahead of its first request.
        hint = [self._hint[0], str(self._hint[1]), relay_key(*self._hint)] if self._hint else ["", "", ""]
        cmd = ["/bin/sh", "-c", RELAY_SCRIPT, "kci-tunneld-relay", str(math.ceil(self.timeouts.connect)), *hint,
               self._relay_python]
        cm = await self._open_relay(slot, cmd)
        if cm is None:
            return
        self._slots.add(slot)
        try:
            await self._serve_relay(slot, slot.writer)
        finally:
            self._slots.discard(slot)
            if slot in self._idle:
                self._idle.remove(slot)
            if slot.conn is not None:
                slot.conn.fail(f"the exec carrying this connection ended: {slot.dead}")
            with anyio.CancelScope(shield=True):
                await cm.__aexit__(None, None, None)
            logger.debug("[slot %d] closed: %s", slot.number, slot.dead)
            if not self._closing:
                self._top_up()

    async def _open_relay(self, relay: Slot | Channel,
                          cmd: list[str]) -> AbstractAsyncContextManager[ExecStream] | None:
        """Start the exec that runs ``relay``'s program (the exec's context, to leave once it ended),
        or None when it could not be started (``relay`` is killed, saying why)."""
        try:
            cm, relay.stream = await self._open_exec(cmd)
        except TransportError as e:
            relay.kill(str(e))
            return None
        self.execs_started += 1
        return cm

    async def _serve_relay(self, relay: Slot | Channel, beside: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Read ``relay``'s exec until it ends, with ``beside`` (its writer, or its heartbeat) running
        along; then ``relay`` is dead, saying why."""
        with relay.scope:
            async with anyio.create_task_group() as io:
                io.start_soon(beside)
                await relay.run()
                io.cancel_scope.cancel()
        if relay.mode not in RELAY_MODES and relay.dead is None:
            relay.kill(await self._why_no_relay(relay))
        relay.kill("the exec ended")

    async def _why_no_relay(self, slot: Slot | Channel) -> str:
        """The exec ended before the relay said it was ready: the helper went away, or its image lacks tools."""
        assert self.client is not None
        with anyio.CancelScope(shield=True):
            try:
                info = await self.client.inspect_container(self.settings.helper_name)
            except TransportError as e:
                return str(e)
        if info is None or not info.running:
            self._helper_suspect = True  # the next exec repairs it first
            return f"helper container {self.settings.helper_name} stopped or was removed"
        return (f"helper image {self.helper.image} cannot run the relay (it needs sh, sleep, and python3, "
                f"or dd and socat or nc): {slot.startup_output() or 'the exec ended without output'}")

    async def _fill_one(self) -> None:
        try:
            slot = await self._start_slot()
        except TransportError as e:
            self._start_done()
            self._failures += 1
            self.health.set(TransportState.RECONNECTING, str(e))
            if not self._closing:
                logger.warning("docker: could not start a relay stream: %s", e)
            await anyio.sleep(backoff(self._failures, REFILL_BACKOFF_CAP, REFILL_BACKOFF_START))
            self._top_up()
            return
        self._start_done()
        if self._failures:
            self.reconnects += 1  # relay streams start again after the Docker host was unreachable
            logger.info("docker: relay streams start again after %d failed attempt(s)", self._failures)
        self._failures = 0
        self.health.last_error = None  # a timed-out connect() must not blame an outage that is over
        self.health.set(TransportState.CONNECTED)
        self.release(slot)

    def _top_up(self) -> None:
        """Keep pool_size slots idle, plus one per waiting connect()."""
        if self._closing or self._tg is None:
            return
        want = self.settings.pool_size + len(self._waiters) - len(self._idle) - self._starting
        want = min(want, MAX_SLOTS - len(self._slots) - self._starting)
        for _ in range(max(0, want)):
            self._starting += 1
            self._tg.start_soon(self._fill_one)

    def release(self, slot: Slot) -> None:
        """A slot is free: hand it to the oldest waiter, or keep it idle."""
        if slot.dead is not None or self._closing:
            return
        slot.idle_since = time.monotonic()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.event.is_set():
                waiter.slot = slot
                waiter.event.set()
                return
        self._idle.append(slot)

    async def _acquire(self, key: str) -> Slot:
        """An idle slot, best one whose socat for ``key`` already waits; else wait for one."""
        self._idle = [s for s in self._idle if s.dead is None]
        if self._idle:
            # The most recently used that is ready for this target (the others may age out); a
            # slot that just finished a connection is still starting its next socat.
            ready = [s for s in self._idle if key in s.waiting]
            slot = ready[-1] if ready else self._idle[-1]
            self._idle.remove(slot)
            self._top_up()
            return slot
        waiter = _Waiter()
        self._waiters.append(waiter)
        self._top_up()
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.slot is not None:
                self.release(waiter.slot)
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        assert waiter.slot is not None
        return waiter.slot

    async def _housekeeping(self) -> None:
        while True:
            await anyio.sleep(IDLE_TTL / 4)
            now = time.monotonic()
            extra = len(self._idle) - self.settings.pool_size
            for slot in sorted(self._idle, key=lambda s: s.idle_since)[: max(0, extra)]:
                if now - slot.idle_since > IDLE_TTL:
                    self._idle.remove(slot)
                    slot.kill("idle")

    # ---------------------------------------------------------------- the mux channels

    async def _start_channel(self) -> Channel | None:
        """Start one exec of the multiplexed relay; None when the helper has no python3 for it (or one
        too old), so the pool of slots carries the connections instead.

        :raises TransportError: when the exec cannot be started or the relay does not come up.
        """
        assert self._tg is not None
        self._starting += 1
        try:
            async with self._exec_starts:
                self._numbers += 1
                channel = Channel(self, self._numbers)
                self._tg.start_soon(self._run_channel, channel)
                with anyio.move_on_after(self.timeouts.connect):
                    await channel.ready.wait()
                if not channel.ready.is_set():
                    channel.kill(f"the relay in helper {self.settings.helper_name} did not start within "
                                 f"{self.timeouts.connect:g}s {channel.startup_output()}".rstrip())
        finally:
            self._start_done()
        if channel.dead is not None:
            if PYTHON_TOO_OLD in channel.startup_output():
                logger.warning("docker: helper image %s: %s; using the shell relay",
                               self.helper.image, channel.startup_output())
                self._relay_python = ""
                return None
            raise TransportError(channel.dead)
        if channel.mode != "mux":  # relay.sh found no python3: the shell relay, one connection per exec
            channel.kill(f"no python3 in the helper (relay {channel.mode})")
            return None
        self._channels.append(channel)
        self._channel_ready.set()
        return channel

    async def _run_channel(self, channel: Channel) -> None:
        cmd = ["/bin/sh", "-c", RELAY_SCRIPT, "kci-tunneld-relay", str(math.ceil(self.timeouts.connect)), "", "", "",
               RELAY_MUX]
        cm = await self._open_relay(channel, cmd)
        if cm is None:
            return
        try:
            await self._serve_relay(channel, channel.heartbeat)
        finally:
            if channel.dead is None:  # cancelled with the transport: its connections end too
                channel.kill("the docker transport closed")
            if channel in self._channels:
                self._channels.remove(channel)
                self._channel_lost.set()
                if not self._channels:
                    self._channel_ready = anyio.Event()
            with anyio.CancelScope(shield=True):
                await cm.__aexit__(None, None, None)
            if channel.mode == "mux" and not self._closing:
                logger.info("docker: relay exec %d ended (%s); %d connection(s) on it failed", channel.number,
                            channel.dead, channel.opened)

    async def _keep_channels(self) -> None:
        """Keep mux_execs channels running: replace one that ended, backing off while starts fail."""
        while not self._closing:
            while len(self._channels) < self.settings.mux_execs and not self._closing:
                try:
                    if await self._start_channel() is None:
                        # The helper was remade from an image without a python3 for the mux (the list
                        # went on to the next image): the shell relay's pool carries connections now.
                        logger.warning("docker: helper image %s cannot run the mux relay; using the pool of "
                                       "relay execs", self.helper.image)
                        self.mode = "?"  # until the first slot says which relay
                        self._top_up()
                        self.spawn(self._housekeeping)
                        return
                except TransportError as e:
                    self._failures += 1
                    self.health.set(TransportState.RECONNECTING, str(e))
                    logger.warning("docker: could not start a relay exec: %s", e)
                    await anyio.sleep(backoff(self._failures, REFILL_BACKOFF_CAP, REFILL_BACKOFF_START))
                    continue
                if self._failures:
                    self.reconnects += 1
                    logger.info("docker: relay execs start again after %d failed attempt(s)", self._failures)
                self._failures = 0
                self.health.last_error = None
                self.health.set(TransportState.CONNECTED)
            self._channel_lost = anyio.Event()
            await self._channel_lost.wait()

    def _live_channel(self) -> Channel | None:
        """The live channel carrying the fewest connections, if any."""
        live = [c for c in self._channels if c.dead is None]
        return min(live, key=lambda c: (c.load, c.opened)) if live else None

    async def _pick_channel(self) -> Channel:
        """The live channel carrying the fewest connections (waits while none is live)."""
        while True:
            if (channel := self._live_channel()) is not None:
                return channel
            await self._channel_ready.wait()
            if self._channels:
                await anyio.sleep(0.01)  # the live ones just died: their tasks are removing them

    async def reopen(self, host: str, port: int, first: bytes) -> MuxStream:
        """Open host:port on the live channel carrying the fewest connections; returns at once (the
        relay's answer comes to the stream). ``first`` must fit in the relay's window (4 MiB; a
        forward's first bytes are at most 64 KiB), as nothing more is sent before its answer."""
        channel = await self._pick_channel()
        self.connections += 1
        return channel.open(host, port, first)

    async def _connect_mux(self, host: str, port: int, first: bytes, target: str, early: bool) -> MuxStream:
        if early:
            return await self.reopen(host, port, first)
        conn: MuxStream | None = None
        try:
            for _ in range(3):
                channel = await self._pick_channel()
                conn = channel.open(host, port, first)
                await conn.settled.wait()
                if conn.ok:
                    self.connections += 1
                    await send_first(conn, first[channel.up_window:], f"could not connect to {target}")
                    return conn
                if conn.failure is not None:
                    raise TransportError(f"could not connect to {target} from {self.helper_label}: {conn.failure}")
                # The exec died before the relay answered: try again on another.
            raise TransportError(f"could not connect to {target}: relay execs keep failing "
                                 f"({conn.broken if conn else None})")
        except BaseException:
            if conn is not None:
                await conn.aclose()
            raise

    # ---------------------------------------------------------------- connections

    async def connect(self, host: str, port: int, first: bytes = b"", *,
                      early: bool = False) -> DockerStream | MuxStream:
        """Open a stream to host:port as the helper container sees it, with ``first`` sent first;
        returns once the relay reached it, or with ``early`` on the mux at once (the stream's
        ``relay_socket`` then handles a refusal or an exec lost before the relay answered).

        :raises TransportError: naming the target and the reason (refused, unreachable, no relay).
        """
        target = f"{format_host(host)}:{port}"
        if not _HOST_RE.match(host) or not 0 < port < 65536:
            raise TransportError(f"could not connect to {target}: not a valid host name or address")
        if self._tg is None or self._closing:
            raise TransportError(f"could not connect to {target}: the docker transport is not running")
        if early and self.mode == "mux" and (channel := self._live_channel()) is not None:
            self.connections += 1
            return channel.open(host, port, first)  # nothing to wait for: no deadline to set up
        conn: DockerStream | None = None
        try:
            with anyio.fail_after(self.timeouts.connect):
                if self.mode == "mux":
                    return await self._connect_mux(host, port, first, target, early)
                for _ in range(3):
                    slot = await self._acquire(relay_key(host, port))
                    conn = slot.open(host, port, first[:FIRST_LIMIT])
                    await conn.settled.wait()
                    if conn.ok:
                        self.connections += 1
                        self._hint = (host, port)
                        await send_first(conn, first[FIRST_LIMIT:], f"could not connect to {target}")
                        return conn
                    await conn.aclose()
                    if conn.relay_status is None and not conn.errors:
                        continue  # the exec died before it saw the request: safe to retry elsewhere
                    reason = (short_reason(conn.errors[-1]) if conn.errors
                              else f"the relay exited with {conn.relay_status}")
                    raise TransportError(
                        f"could not connect to {target} from helper container {self.settings.helper_name}: {reason}"
                    )
                broken = conn.broken if conn else None
                raise TransportError(f"could not connect to {target}: relay streams keep failing ({broken})")
        except TimeoutError:
            reason = f": {self.health.last_error}" if self.health.last_error else ""
            raise TransportError(
                f"could not connect to {target} via helper container {self.settings.helper_name} "
                f"within {self.timeouts.connect:g}s{reason}"
            ) from None
        except BaseException:
            if conn is not None:
                await conn.aclose()
            raise

    def info(self) -> dict[str, object]:
        ep = self.endpoint
        return {
            "kind": self.name,
            # The forward shows "reconnecting" while new relay streams cannot be started.
            "state": str(self.health.state),
            "reconnects": self.reconnects,
            "last_error": self.health.last_error,
            "docker_host": ep.host if ep else None,
            "docker_host_from": ep.source if ep else None,
            "tls": bool(ep and ep.tls),
            "helper": self.settings.helper_name,
            "helper_image": self.helper.image,
            "helper_images": list(self.settings.helper_images),
            "helper_image_why": self.image_why or None,
            "relay_why": self.relay_why() if self.mode in RELAY_MODES else None,
            "helper_id": (self.helper_id or "")[:12] or None,
            "relay": self.mode,
            "relay_primed": self._primed,
            "pool": {"idle": len(self._idle), "busy": len(self._slots) - len(self._idle), "starting": self._starting},
            "mux_execs": [c.load for c in self._channels],  # connections on each live channel
            "connections": self.connections,
            "execs_started": self.execs_started,
        }

