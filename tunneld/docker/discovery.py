"""``--auto``'s rules: which of the remote Docker's published ports to forward, and where to.

- kind API servers: containers labelled ``io.x-k8s.kind.cluster``; per cluster the
  ``external-load-balancer`` (multi-control-plane clusters) if there is one, else the
  ``control-plane``; its ``6443/tcp`` binding. Forward ``kind-<cluster>``, probed over HTTPS.
- registries: ctlptl's ``dev.tilt.ctlptl.role=registry`` label, or a ``registry:*`` image; the
  ``5000/tcp`` binding. Forward named after the container, probed with ``GET /v2/``.
- follow mode (``--auto=all``) adds every other TCP port any container publishes, as
  ``<container>:<port>``, probed by connecting.

Each is forwarded on the SAME local port number the remote host publishes, so ``localhost:PORT``
means the same thing here as there (kind's kubeconfig ``https://127.0.0.1:PORT`` works unchanged,
and so does a Testcontainers ``getMappedPort``), to the address the binding listens on as seen
from the remote host. A port two containers want goes to the one that has it already (else the
first by name); the other is reported as a conflict, never dropped silently.

Pure: containers in, forwards out. tunneld/docker/follower.py keeps the containers current.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tunneld.config import AutoSettings, ForwardSpec
from tunneld.docker.models import RunningContainer
from tunneld.labels import (
    COMPOSE_PROJECT_LABEL,
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


@dataclass(frozen=True)
class Container:
    """A running container as discovery needs it."""

    name: str
    image: str
    labels: Mapping[str, str]
    ports: Mapping[str, tuple[tuple[str, int], ...]]  # "6443/tcp" -> ((HostIp, HostPort), ...)
    id: str = ""


def container_of(running: RunningContainer) -> Container:
    """The Docker adapter's record, with its bindings grouped by container port."""
    ports: dict[str, list[tuple[str, int]]] = {}
    for p in running.ports:
        ports.setdefault(f"{p.container_port}/{p.proto}", []).append((p.host_ip, p.host_port))
    return Container(name=running.name, image=running.image, labels=running.labels,
                     ports={k: tuple(v) for k, v in ports.items()}, id=running.id)


@dataclass(frozen=True)
class Found:
    """One forward discovery wants, and why."""

    spec: ForwardSpec
    container: str
    what: str  # "kind API server", "registry" or "container"

    def as_dict(self) -> dict[str, object]:
        return {"forward": self.spec.name, "container": self.container, "what": self.what,
                "port": self.spec.port, "target": self.spec.target}


@dataclass(frozen=True)
class Conflict:
    """A published port not forwarded, because the port here is already another forward's."""

    container: str
    port: int
    holder: str  # "container web" or "the config's forward registry"

    def text(self) -> str:
        return f"port {self.port} of container {self.container} is not forwarded: it is already {self.holder}'s"

    def as_dict(self) -> dict[str, object]:
        return {"container": self.container, "port": self.port, "holder": self.holder}


@dataclass
class Selection:
    found: list[Found] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)


def selected(c: Container, auto: AutoSettings) -> bool:
    """True when ``c`` passes ``auto``'s selectors: each kind given (any of its patterns; every
    label) and no ``exclude`` pattern on its name or image."""
    def any_glob(value: str, patterns: Iterable[str]) -> bool:
        return any(fnmatch.fnmatchcase(value, p) for p in patterns)

    if auto.containers and not any_glob(c.name, auto.containers):
        return False
    if auto.images and not any_glob(c.image, auto.images):
        return False
    if auto.projects and c.labels.get(COMPOSE_PROJECT_LABEL) not in auto.projects:
        return False
    for label in auto.labels:
        key, eq, value = label.partition("=")
        if key not in c.labels or (eq and c.labels[key] != value):
            return False
    return not (any_glob(c.name, auto.exclude) or any_glob(c.image, auto.exclude))


_EVERY = AutoSettings()


def held_ports(forwards: Iterable[ForwardSpec]) -> dict[int, str]:
    """Port -> name of the config's own forwards that listen on a fixed port: never taken by --auto."""
    return {f.port: f.name for f in forwards if f.port}


def select(containers: Sequence[Container], *, auto: AutoSettings = _EVERY, bind: str | None = None,
           reserved: Mapping[int, str] | None = None, holders: Mapping[int, str] | None = None) -> Selection:
    """What to forward from these running containers.

    ``reserved``: port -> name of the config's own forwards (``held_ports``). ``holders``: port ->
    container forwarded on it now, which keeps the port when another container wants it too.
    """
    bind = bind or auto.bind
    pool = [c for c in containers if selected(c, auto)]
    keep = holders or {}
    # The container holding a port now goes first: a newcomer on the same port does not take it over.
    pool.sort(key=lambda c: (c.name not in keep.values(), c.name))
    candidates = _kind_api_servers(pool, bind) + _registries(pool, bind)
    if auto.mode == "all":
        candidates += _published(pool, bind)
    out = Selection()
    taken = {port: f"the config's forward {name}" for port, name in (reserved or {}).items()}
    names: set[str] = set()
    for found in candidates:
        port = found.spec.port
        if port in taken:
            if taken[port] != f"container {found.container}":  # its own other role (a registry's 5000)
                out.conflicts.append(Conflict(found.container, port, taken[port]))
            continue
        if found.spec.name in names:
            logger.debug("auto: %s (%s) skipped: its name is taken", found.spec.name, found.container)
            continue
        taken[port] = f"container {found.container}"
        names.add(found.spec.name)
        out.found.append(found)
    out.found.sort(key=lambda f: f.spec.name)
    return out


def binding(container: Container, container_port: str) -> tuple[str, int] | None:
    """(address to dial on the remote host, published port) for ``container_port``, or None.

    HostIp may be 127.0.0.1, ::1, 0.0.0.0, :: or empty (= every address): 0.0.0.0 and empty are
    dialled on 127.0.0.1, :: on ::1. A loopback binding wins over a wildcard (same port either way in
    practice), IPv4 over IPv6; a specific other address of the remote host is dialled there.
    """
    best: tuple[int, str, int] | None = None
    for ip, port in container.ports.get(container_port, ()):
        rank, target = _rank(ip)
        if best is None or rank < best[0]:
            best = (rank, target, port)
    return (best[1], best[2]) if best else None


def _rank(ip: str) -> tuple[int, str]:
    if ip == "::":
        # Docker's proxy listens on [::] alone, IPv6 only (Go's tcp6), when the port it chose for ::
        # differs from 0.0.0.0's (`-p 8000` can give two): 127.0.0.1 would be refused there.
        return 2, "::1"
    if ip in _WILDCARDS:
        return 1, "127.0.0.1"
    if ip == "127.0.0.1":
        return 0, ip
    if ip == "::1":
        return 3, ip
    return 4, ip


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


def is_kind_or_registry(name: str, image: str, labels: Mapping[str, str]) -> bool:
    """A container plain ``--auto`` forwards or would: kind-labelled, or a registry."""
    return (bool(labels.get(KIND_CLUSTER_LABEL)) or labels.get(CTLPTL_ROLE_LABEL) == CTLPTL_REGISTRY
            or is_registry_image(image))


def _registries(containers: Sequence[Container], bind: str) -> list[Found]:
    out = []
    for c in containers:
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


def _published(containers: Sequence[Container], bind: str) -> list[Found]:
    """Every TCP port each container publishes, one forward per host port (``-p 8080:80`` is bound
    on 0.0.0.0 and :: alike: one forward, dialled on 127.0.0.1)."""
    out = []
    for c in containers:
        by_port: dict[int, tuple[int, str]] = {}
        for key, bindings in c.ports.items():
            if not key.endswith("/tcp"):
                continue
            for ip, port in bindings:
                rank, target = _rank(ip)
                if port not in by_port or rank < by_port[port][0]:
                    by_port[port] = (rank, target)
        for port, (_, host) in sorted(by_port.items()):
            spec = ForwardSpec(name=f"{c.name}:{port}", bind=bind, port=port, host=host, host_port=port)
            out.append(Found(spec, c.name, "container"))
    return out
