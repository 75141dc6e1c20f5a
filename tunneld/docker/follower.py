"""``--auto``'s live half: follow the remote Docker's containers and hand the wanted forwards on.

It keeps a model of the running containers (id -> name, image, labels, published ports) and
drives it from the Engine's event stream: a ``start`` (or ``rename``) is one ``docker inspect`` of
that container, a ``die`` or ``destroy`` drops it, and the forwards are worked out again from the
model (tunneld/docker/discovery.py's rules) and applied at once; a burst of starts is inspected
concurrently and applied together. A full look (``docker ps``, one request with every container's
labels and ports) happens at start, whenever the event stream (re)connects, so nothing is lost
while it was down, and every ``auto.interval`` seconds as a safety net.

A container that vanishes keeps its forward for ``auto.linger`` seconds (a ``docker restart`` or a
dockerd restart should not unbind the port under a client's feet) unless a new container takes
the port; while the Docker host cannot be reached nothing changes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.abc

from tunneld.backoff import backoff
from tunneld.config import AutoSettings, DockerSettings, Timeouts
from tunneld.docker.api import DockerClient
from tunneld.docker.discovery import Conflict, Container, Found, container_of, is_kind_or_registry, select, selected
from tunneld.docker.host import resolve_endpoint
from tunneld.errors import TransportError

logger = logging.getLogger(__name__)

_EVENTS = 20  # what `status` shows under "recent events"
# Container events worth telling a person about (the rest, exec_* above all, are noise here).
_LIFECYCLE = {"start": "started", "die": "stopped", "destroy": "removed", "oom": "ran out of memory",
              "rename": "renamed"}
# Reconnect to the event stream at most this long after the Docker host answers again: the set is
# rebuilt by the full look that follows a reconnect.
_EVENTS_BACKOFF_CAP = 0.5
# Inspects in flight at once: a burst of starts shares a few connections to dockerd (each one more
# is a TLS handshake, and stays in the client's pool) instead of opening one per container.
INSPECTS_AT_ONCE = 8

Apply = Callable[[list[Found]], Awaitable[None]]


class Discovery:
    """Follows the remote Docker and hands the wanted forwards to ``apply`` whenever they change."""

    def __init__(self, docker: DockerSettings, auto: AutoSettings, timeouts: Timeouts, apply: Apply,
                 reserved: Callable[[], Mapping[int, str]] = dict) -> None:
        """:raises TransportError: when the Docker host settings are unusable (bad DOCKER_HOST, missing certs)."""
        self.endpoint = resolve_endpoint(docker)
        self.auto = auto
        self.timeouts = timeouts
        self._apply = apply
        self._reserved = reserved
        self._model: dict[str, Container] = {}  # container id -> what it publishes
        # container id -> (when an event last changed it in the model, monotonic; whether it runs)
        self._changed: dict[str, tuple[float, bool]] = {}
        self._events_seen: dict[str, int] = {}  # container id -> events so far (a late inspect loses)
        self._seen: dict[str, tuple[Found, float]] = {}  # forward name -> (what, monotonic time last wanted)
        self._next_expiry: float | None = None
        self.current: list[Found] = []
        self.conflicts: list[Conflict] = []
        self._reported: set[tuple[str, int]] = set()
        self.scanned = anyio.Event()  # set after the first successful look
        self.scans = 0
        self.last_scan: float | None = None
        self.last_error: str | None = None
        self.events: deque[dict[str, object]] = deque(maxlen=_EVENTS)
        self._dirty = anyio.Event()
        self._scan_due = True
        self._inspects = anyio.CapacityLimiter(INSPECTS_AT_ONCE)

    def status(self) -> dict[str, object]:
        auto = self.auto
        return {
            "enabled": True,
            "mode": auto.mode,
            "docker_host": self.endpoint.describe(),
            "interval": auto.interval,
            "scans": self.scans,
            "last_scan": self.last_scan,
            "last_error": self.last_error,
            "containers": list(auto.containers),
            "selectors": {"containers": list(auto.containers), "images": list(auto.images),
                          "labels": list(auto.labels), "projects": list(auto.projects), "exclude": list(auto.exclude)},
            "watching": len(self._model),
            "found": [f.as_dict() for f in self.current],
            "conflicts": [c.as_dict() for c in self.conflicts],
            "events": list(self.events),
        }

    async def run(self, *, task_status: anyio.abc.TaskStatus[Discovery] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the Docker host until cancelled; ``started`` after the first look, whether or not
        the Docker host answered."""
        async with DockerClient(self.endpoint, timeout=self.timeouts.connect) as client, \
                anyio.create_task_group() as tg:
            tg.start_soon(self._follow_events, client, tg)
            started = False
            next_scan = 0.0
            while True:
                if self._scan_due or time.monotonic() >= next_scan:
                    self._scan_due = False
                    next_scan = time.monotonic() + self.auto.interval
                    await self._scan(client)
                self._dirty = anyio.Event()  # taken before working out: a change from here on wakes us again
                if self.last_error is None or self.scanned.is_set():
                    await self._reconcile()
                if not started:
                    started = True
                    task_status.started(self)
                wake = min(next_scan, self._next_expiry or next_scan)
                with anyio.move_on_after(max(0.0, wake - time.monotonic())):
                    await self._dirty.wait()

    # ---------------------------------------------------------------- the event stream

    async def _follow_events(self, client: DockerClient, tg: anyio.abc.TaskGroup) -> None:
        """Apply container starts and stops as they happen; reconnect (quickly, with a full look
        after) when the stream ends, as it does when dockerd restarts."""
        since = int(time.time())
        failures = 0
        seen: deque[tuple[object, object, object]] = deque(maxlen=256)  # a reconnect replays from `since`
        while True:
            try:
                async with client.container_events(since=since, actions=tuple(_LIFECYCLE)) as stream:
                    if failures:
                        self._event("the Docker event stream is back")
                        self._request_scan()
                    failures = 0
                    async for event in stream:
                        key = (event.get("id"), event.get("Action"), event.get("timeNano"))
                        if key in seen:
                            continue
                        seen.append(key)
                        since = max(since, int(event.get("time") or 0))
                        self._on_event(event, client, tg)
                reason = "the Docker host closed it"
            except TransportError as e:
                reason = str(e)
            failures += 1
            if failures == 1:
                logger.warning("auto: lost the Docker event stream (%s); reconnecting", reason)
                self._event(f"lost the Docker event stream (is dockerd restarting?): {reason[:160]}")
            await anyio.sleep(backoff(failures, _EVENTS_BACKOFF_CAP))

    def _on_event(self, event: Mapping[str, Any], client: DockerClient, tg: anyio.abc.TaskGroup) -> None:
        action = str(event.get("Action") or event.get("status") or "")
        verb = _LIFECYCLE.get(action)
        cid = str(event.get("id") or "")
        attrs = (event.get("Actor") or {}).get("Attributes") or {}
        name = str(attrs.get("name") or "")
        if verb is None or not cid:
            return
        known = cid in self._model
        if not known and not self._wanted(name, attrs):
            return
        if verb == "stopped" and attrs.get("exitCode") is not None:
            verb += f" (exit code {attrs['exitCode']})"
        logger.info("auto: container %s %s", name, verb)
        self._event(f"container {name} {verb}")
        self._events_seen[cid] = self._events_seen.get(cid, 0) + 1
        if action in ("start", "rename"):
            tg.start_soon(self._look_at, client, cid, self._events_seen[cid])
        elif action in ("die", "destroy"):
            self._changed[cid] = (time.monotonic(), False)
            if self._model.pop(cid, None) is not None:
                self._dirty.set()
        if action == "destroy":
            self._events_seen.pop(cid, None)

    def _wanted(self, name: str, attrs: Mapping[str, Any]) -> bool:
        """Whether a container this event is about could be forwarded (its labels ride in the event)."""
        labels = {str(k): str(v) for k, v in attrs.items()}
        return self._wants(Container(name=name, image=str(attrs.get("image") or ""), labels=labels, ports={}))

    def _wants(self, c: Container) -> bool:
        """Whether ``c`` is one to follow: the selectors pass it, and (plain --auto) it is kind's or a registry."""
        return selected(c, self.auto) and (self.auto.mode == "all" or is_kind_or_registry(c.name, c.image, c.labels))

    async def _look_at(self, client: DockerClient, cid: str, seq: int) -> None:
        """Inspect one container an event named, and put what it publishes into the model."""
        try:
            async with self._inspects:
                running = await client.running_container(cid)
        except TransportError as e:
            logger.debug("auto: cannot inspect container %s (%s); a full look follows", cid[:12], e)
            self._request_scan()
            return
        if self._events_seen.get(cid, seq) != seq:
            return  # a later event (die, destroy) about it came in while we asked: that one stands
        container = None if running is None else container_of(running)
        if container is None or not self._wants(container):  # a rename can take it out of the selection
            self._model.pop(cid, None)
        else:
            self._model[cid] = container
        self._changed[cid] = (time.monotonic(), container is not None)
        self._dirty.set()

    def _request_scan(self) -> None:
        self._scan_due = True
        self._dirty.set()

    # ---------------------------------------------------------------- full looks

    async def _scan(self, client: DockerClient) -> None:
        """One full look at the Docker host (``docker ps``); the model becomes what it says, except
        for containers an event changed while it was asked."""
        asked = time.monotonic()
        try:
            running = await client.running_containers()
        except TransportError as e:
            if str(e) != self.last_error:
                logger.warning("auto: cannot list containers, keeping the %d forward(s) found before: %s",
                               len(self.current), e)
                self._event(f"cannot list containers: {e}")
            self.last_error = str(e)
            return
        if self.last_error is not None:
            logger.info("auto: the Docker host answers again")
            self._event("the Docker host answers again")
        self.last_error = None
        fresh = {c.id: c for c in map(container_of, running) if self._wants(c)}  # the model: followed ones only
        for cid, (at, runs) in list(self._changed.items()):
            if at < asked:
                del self._changed[cid]  # this answer is newer
            elif runs and cid in self._model:
                fresh[cid] = self._model[cid]  # started (and inspected) while we asked
            elif not runs:
                fresh.pop(cid, None)  # stopped while we asked
        self._model = fresh
        self.scans += 1
        self.last_scan = time.time()
        self._scan_due = False

    # ---------------------------------------------------------------- from the model to forwards

    async def _reconcile(self) -> None:
        """Work the wanted forwards out from the model; apply them when they changed."""
        holders = {f.spec.port: f.container for f in self.current}
        selection = select(list(self._model.values()), auto=self.auto, reserved=self._reserved(), holders=holders)
        self._report_conflicts(selection.conflicts)
        wanted = self._with_lingering(selection.found)
        if [f.spec for f in wanted] != [f.spec for f in self.current] or not self.scanned.is_set():
            self._log_changes(wanted)
            self.current = wanted
            await self._apply(wanted)
        self.scanned.set()

    def _with_lingering(self, found: list[Found]) -> list[Found]:
        now = time.monotonic()
        for f in found:
            self._seen[f.spec.name] = (f, now)
        names = {f.spec.name for f in found}
        ports = {f.spec.port for f in found}
        out = list(found)
        self._next_expiry = None
        for name, (f, at) in list(self._seen.items()):
            if name in names:
                continue
            if now - at >= self.auto.linger or f.spec.port in ports:
                del self._seen[name]  # gone for good, or its port now belongs to another container
                continue
            out.append(f)
            expiry = at + self.auto.linger
            self._next_expiry = expiry if self._next_expiry is None else min(self._next_expiry, expiry)
        return sorted(out, key=lambda f: f.spec.name)

    def _report_conflicts(self, conflicts: list[Conflict]) -> None:
        """Log each conflict once (status lists them while they last)."""
        self.conflicts = conflicts
        now = {(c.container, c.port) for c in conflicts}
        for c in conflicts:
            if (c.container, c.port) not in self._reported:
                logger.warning("auto: %s", c.text())
                self._event(c.text())
        self._reported = now

    def _event(self, text: str) -> None:
        self.events.append({"at": time.time(), "event": text})

    def _log_changes(self, wanted: list[Found]) -> None:
        old = {f.spec.name: f for f in self.current}
        new = {f.spec.name: f for f in wanted}
        for name, f in new.items():
            if name not in old:
                text = f"found {f.what} {f.container} publishing {f.spec.port}: forwarding it as {name}"
            elif old[name].spec != f.spec:
                text = f"{f.what} {f.container} moved to port {f.spec.port} (was {old[name].spec.port})"
            else:
                continue
            logger.info("auto: %s", text)
            self._event(text)
        for name, f in old.items():
            if name not in new:
                text = f"{f.what} {f.container} gone for {self.auto.linger:g}s: no longer forwarding port {f.spec.port}"
                logger.info("auto: %s", text)
                self._event(text)
