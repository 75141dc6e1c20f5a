"""``--auto``: find what the remote Docker publishes that is worth forwarding, and keep it current.

- kind API servers: containers labelled ``io.x-k8s.kind.cluster``; per cluster the
  ``external-load-balancer`` (multi-control-plane clusters) if there is one, else the
  ``control-plane``; its ``6443/tcp`` binding. Forward ``kind-<cluster>``, probed over HTTPS.
- registries: ctlptl's ``dev.tilt.ctlptl.role=registry`` label, or a ``registry:*`` image; the
  ``5000/tcp`` binding. Forward named after the container, probed with ``GET /v2/``.

Each is forwarded on the SAME local port number the remote host publishes, so ``localhost:PORT``
means the same thing here as there (kind's kubeconfig ``https://127.0.0.1:PORT`` works unchanged),
to the address the binding listens on as seen from the remote host.

``select`` is pure (containers in, forwards out); ``Discovery`` polls the Docker host every
``auto.interval`` seconds (``docker ps`` for published ports, then ``docker inspect`` of the few
containers publishing 6443/tcp or 5000/tcp for their labels and image). A container that vanishes
keeps its forward for ``auto.linger`` seconds (a ``docker restart`` or a dockerd restart should not
unbind the port under a client's feet); while the Docker host cannot be reached nothing changes.

One module for both halves, on purpose: the rules (which label, which port, which binding wins)
and the poller that feeds them are one feature that changes together, the poller's event filter
(``_relevant``) applies the same rules to event attributes, and the pure half alone is ~130 lines
with no other user. The labels themselves are spelled in tunneld/labels.py.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

from tunneld.backoff import backoff
from tunneld.config import AutoSettings, DockerSettings, ForwardSpec, Timeouts
from tunneld.docker.api import DockerClient
from tunneld.docker.host import resolve_endpoint
from tunneld.docker.models import PublishedPort
from tunneld.errors import TransportError
from tunneld.labels import (
    CTLPTL_REGISTRY,
    CTLPTL_ROLE_LABEL,
    KIND_CLUSTER_LABEL,
    KIND_CONTROL_PLANE,
    KIND_LOAD_BALANCER,
    KIND_ROLE_LABEL,
)

logger = logging.getLogger(__name__)

API_SERVER_PORT = "6443/tcp"
REGISTRY_PORT = "5000/tcp"

_WILDCARDS = {"", "0.0.0.0", "::"}
_EVENTS = 20  # what `status` shows under "recent events"
# Container events worth telling a person about (the rest, exec_* above all, are noise here).
_LIFECYCLE = {"start": "started", "die": "stopped", "destroy": "removed", "oom": "ran out of memory"}
_EVENTS_BACKOFF_CAP = 5.0


@dataclass(frozen=True)
class Container:
    """A running container as discovery needs it."""

    name: str
    image: str
    labels: Mapping[str, str]
    ports: Mapping[str, tuple[tuple[str, int], ...]]  # "6443/tcp" -> ((HostIp, HostPort), ...)


@dataclass(frozen=True)
class Found:
    """One forward discovery wants, and why."""

    spec: ForwardSpec
    container: str
    what: str  # "kind API server" or "registry"

    def as_dict(self) -> dict[str, object]:
        return {"forward": self.spec.name, "container": self.container, "what": self.what,
                "port": self.spec.port, "target": self.spec.target}


def select(containers: Sequence[Container], *, bind: str = "localhost", reserved: Collection[int] = (),
           patterns: Sequence[str] = ()) -> list[Found]:
    """What to forward from these running containers.

    Only containers whose name matches one of ``patterns`` (shell-style) count, when any are given.
    Ports in ``reserved`` (the config's own forwards) and ports already chosen are skipped.
    """
    if patterns:
        containers = [c for c in containers if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    candidates = _kind_api_servers(containers, bind) + _registries(containers, bind)
    out: list[Found] = []
    taken = set(reserved)
    names: set[str] = set()
    for found in candidates:
        if found.spec.port in taken or found.spec.name in names:
            logger.debug("auto: %s (%s) skipped: port %d or its name is taken", found.spec.name, found.container,
                         found.spec.port)
            continue
        taken.add(found.spec.port)
        names.add(found.spec.name)
        out.append(found)
    return out


def binding(container: Container, container_port: str) -> tuple[str, int] | None:
    """(address to dial on the remote host, published port) for ``container_port``, or None.

    HostIp may be 127.0.0.1, ::1, 0.0.0.0, :: or empty (= every address): a wildcard is dialled on
    127.0.0.1. A loopback binding wins over a wildcard (same port either way in practice), IPv4 over
    IPv6; a specific other address of the remote host is dialled there.
    """
    best: tuple[int, str, int] | None = None
    for ip, port in container.ports.get(container_port, ()):
        if ip in _WILDCARDS:
            rank, target = (1 if ip != "::" else 2), "127.0.0.1"
        elif ip == "127.0.0.1":
            rank, target = 0, ip
        elif ip == "::1":
            rank, target = 3, ip
        else:
            rank, target = 4, ip
        if best is None or rank < best[0]:
            best = (rank, target, port)
    return (best[1], best[2]) if best else None


def _kind_api_servers(containers: Sequence[Container], bind: str) -> list[Found]:
    clusters: dict[str, list[Container]] = {}
    for c in containers:
        cluster = c.labels.get(KIND_CLUSTER_LABEL)
        if cluster:
            clusters.setdefault(cluster, []).append(c)
    out = []
    for cluster, nodes in sorted(clusters.items()):
        by_role = {role: sorted((n for n in nodes if n.labels.get(KIND_ROLE_LABEL) == role), key=lambda n: n.name)
                   for role in (KIND_LOAD_BALANCER, KIND_CONTROL_PLANE)}
        for node in by_role[KIND_LOAD_BALANCER] or by_role[KIND_CONTROL_PLANE]:
            found = binding(node, API_SERVER_PORT)
            if found is None:
                continue
            host, port = found
            spec = ForwardSpec(name=f"kind-{cluster}", bind=bind, port=port, host=host, host_port=port,
                               probe="https", probe_path="/readyz")
            out.append(Found(spec, node.name, "kind API server"))
            break
    return out


def is_registry_image(image: str) -> bool:
    """registry:2, registry, docker.io/library/registry:2.8 ...: the distribution registry image."""
    name = image.split("@", 1)[0]
    repo = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
    return repo in ("registry", "library/registry", "docker.io/library/registry", "index.docker.io/library/registry")


def _registries(containers: Sequence[Container], bind: str) -> list[Found]:
    out = []
    for c in sorted(containers, key=lambda c: c.name):
        if not (c.labels.get(CTLPTL_ROLE_LABEL) == CTLPTL_REGISTRY or is_registry_image(c.image)):
            continue
        found = binding(c, REGISTRY_PORT)
        if found is None:
            continue
        host, port = found
        spec = ForwardSpec(name=c.name, bind=bind, port=port, host=host, host_port=port, probe="http",
                           probe_path="/v2/")
        out.append(Found(spec, c.name, "registry"))
    return out


async def list_candidates(client: DockerClient) -> list[Container]:
    """Running containers publishing 6443/tcp or 5000/tcp, with their labels and image.

    :raises TransportError: when the Docker host cannot be asked.
    """
    ports: dict[str, list[PublishedPort]] = {}
    for p in await client.published_ports():
        ports.setdefault(p.container, []).append(p)
    out = []
    for name, published in sorted(ports.items()):
        if not any(p.proto == "tcp" and p.container_port in (6443, 5000) for p in published):
            continue
        details = await client.container_details(name)
        if details is None or not details.running:
            continue  # gone between the two calls
        grouped: dict[str, list[tuple[str, int]]] = {}
        for p in published:
            grouped.setdefault(f"{p.container_port}/{p.proto}", []).append((p.host_ip, p.host_port))
        out.append(Container(name=name, image=details.image, labels=details.labels,
                             ports={k: tuple(v) for k, v in grouped.items()}))
    return out


Apply = Callable[[list[Found]], Awaitable[None]]


class Discovery:
    """Polls the remote Docker and hands the wanted forwards to ``apply`` whenever they change."""

    def __init__(self, docker: DockerSettings, auto: AutoSettings, timeouts: Timeouts, apply: Apply,
                 reserved: Callable[[], Collection[int]] = frozenset) -> None:
        """:raises TransportError: when the Docker host settings are unusable (bad DOCKER_HOST, missing certs)."""
        self.endpoint = resolve_endpoint(docker)
        self.auto = auto
        self.timeouts = timeouts
        self._apply = apply
        self._reserved = reserved
        self._seen: dict[str, tuple[Found, float]] = {}  # name -> (what, monotonic time last seen)
        self.current: list[Found] = []
        self.scanned = anyio.Event()  # set after the first successful look
        self.scans = 0
        self.last_scan: float | None = None
        self.last_error: str | None = None
        self.events: deque[dict[str, object]] = deque(maxlen=_EVENTS)
        self._rescan = anyio.Event()

    def status(self) -> dict[str, object]:
        return {
            "enabled": True,
            "docker_host": self.endpoint.describe(),
            "interval": self.auto.interval,
            "scans": self.scans,
            "last_scan": self.last_scan,
            "last_error": self.last_error,
            "containers": list(self.auto.containers),
            "found": [f.as_dict() for f in self.current],
            "events": list(self.events),
        }

    async def run(self, *, task_status: anyio.abc.TaskStatus[Discovery] = anyio.TASK_STATUS_IGNORED) -> None:
        """Poll forever, and look again at once when a container starts or stops; ``started`` after the
        first attempt, whether or not the Docker host answered."""
        async with DockerClient(self.endpoint, timeout=self.timeouts.connect) as client, \
                anyio.create_task_group() as tg:
            tg.start_soon(self._follow_events, client)
            started = False
            while True:
                await self.scan(client)
                if not started:
                    started = True
                    task_status.started(self)
                with anyio.move_on_after(self.auto.interval):
                    await self._rescan.wait()
                self._rescan = anyio.Event()

    async def _follow_events(self, client: DockerClient) -> None:
        """Record container starts and stops for `status` (a `docker restart` between two polls shows
        too) and trigger a look; reconnect with backoff when the stream ends (dockerd restarted)."""
        since = int(time.time())
        failures = 0
        seen: deque[tuple[object, object, object]] = deque(maxlen=256)  # a reconnect replays from `since`
        while True:
            try:
                async with client.container_events(since=since) as stream:
                    if failures:
                        self._event("the Docker event stream is back")
                        self._rescan.set()
                    failures = 0
                    async for event in stream:
                        key = (event.get("id"), event.get("Action"), event.get("timeNano"))
                        if key in seen:
                            continue
                        seen.append(key)
                        since = max(since, int(event.get("time") or 0))
                        self._on_event(event)
                reason = "the Docker host closed it"
            except TransportError as e:
                reason = str(e)
            failures += 1
            if failures == 1:
                logger.warning("auto: lost the Docker event stream (%s); reconnecting", reason)
                self._event(f"lost the Docker event stream (is dockerd restarting?): {reason[:160]}")
            await anyio.sleep(backoff(failures, _EVENTS_BACKOFF_CAP))

    def _on_event(self, event: Mapping[str, Any]) -> None:
        verb = _LIFECYCLE.get(str(event.get("Action") or event.get("status") or ""))
        attrs = (event.get("Actor") or {}).get("Attributes") or {}
        name = str(attrs.get("name") or "")
        if verb is None or not self._relevant(name, attrs):
            return
        if verb == "stopped" and attrs.get("exitCode") is not None:
            verb += f" (exit code {attrs['exitCode']})"
        logger.info("auto: container %s %s", name, verb)
        self._event(f"container {name} {verb}")
        self._rescan.set()

    def _relevant(self, name: str, attrs: Mapping[str, Any]) -> bool:
        """A container --auto forwards, or would: kind-labelled, a registry, one it found before."""
        if self.auto.containers and not any(fnmatch.fnmatchcase(name, p) for p in self.auto.containers):
            return False
        return (any(f.container == name for f in self.current) or bool(attrs.get(KIND_CLUSTER_LABEL))
                or attrs.get(CTLPTL_ROLE_LABEL) == CTLPTL_REGISTRY or is_registry_image(str(attrs.get("image") or "")))

    async def scan(self, client: DockerClient) -> None:
        """One look at the Docker host; apply what changed."""
        try:
            containers = await list_candidates(client)
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
        self.scans += 1
        self.last_scan = time.time()
        found = select(containers, bind=self.auto.bind, reserved=self._reserved(), patterns=self.auto.containers)
        wanted = self._with_lingering(found)
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
        for name, (f, at) in list(self._seen.items()):
            if name in names:
                continue
            if now - at >= self.auto.linger or f.spec.port in ports:
                del self._seen[name]  # gone for good, or its port now belongs to another container
                continue
            out.append(f)
        return sorted(out, key=lambda f: f.spec.name)

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
