"""What the Docker adapter (tunneld/docker/api.py) hands out: plain records, no aiodocker objects.

``DockerClient`` builds them from the Engine's JSON; provisioning, discovery and the docker transport
read them. Nothing here talks to a Docker host.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ContainerInfo:
    """What we need to know about a container."""

    id: str
    name: str
    image: str  # as configured (alpine/socat)
    image_id: str  # sha256:...
    running: bool
    state: str
    labels: dict[str, str]


@dataclass(frozen=True)
class PublishedPort:
    """One ``HOST_IP:HOST_PORT->CONTAINER_PORT/PROTO`` of a running container."""

    container: str
    host_ip: str
    host_port: int
    container_port: int
    proto: str


@dataclass(frozen=True)
class RunningContainer:
    """A running container and the ports it publishes (``docker ps``, or ``docker inspect`` of one)."""

    id: str
    name: str
    image: str  # as configured (registry:2)
    labels: Mapping[str, str]
    ports: tuple[PublishedPort, ...]


@dataclass(frozen=True)
class ContainerDetails:
    """The parts of ``docker inspect`` provisioning compares and reports."""

    id: str
    name: str
    image: str  # as configured (registry:2)
    running: bool
    state: str
    labels: dict[str, str]
    env: tuple[str, ...]
    port_bindings: tuple[tuple[str, str, int], ...]  # ("5000/tcp", "127.0.0.1", 5555), from HostConfig
    restart_policy: str
    networks: tuple[str, ...]


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class PullProgress:
    """One step of an image pull, as the Engine reports it (a line of ``POST /images/create``)."""

    image: str  # the reference being pulled (registry:2)
    status: str  # "Pulling fs layer", "Downloading", "Extracting", "Pull complete", "Status: ...", ...
    layer: str = ""  # the layer's short id; "" when the step is about the whole image
    current: int | None = None  # bytes so far (Downloading, Extracting), with total
    total: int | None = None


def details(data: Mapping[str, Any], ref: str) -> ContainerDetails:
    cfg = data.get("Config") or {}
    host = data.get("HostConfig") or {}
    state = data.get("State") or {}
    bindings = tuple(
        (str(port), str(b.get("HostIp") or ""), int(b.get("HostPort") or 0))
        for port, binds in sorted((host.get("PortBindings") or {}).items()) for b in (binds or [])
    )
    return ContainerDetails(
        id=str(data.get("Id", "")), name=str(data.get("Name", ref)).lstrip("/"), image=str(cfg.get("Image", "")),
        running=bool(state.get("Running")), state=str(state.get("Status", "")),
        labels=dict(cfg.get("Labels") or {}), env=tuple(cfg.get("Env") or ()), port_bindings=bindings,
        restart_policy=str((host.get("RestartPolicy") or {}).get("Name") or ""),
        networks=tuple(sorted(((data.get("NetworkSettings") or {}).get("Networks") or {}).keys())),
    )


def running_from_list(row: Mapping[str, Any]) -> RunningContainer:
    """One row of ``GET /containers/json`` (running containers only)."""
    name = str((row.get("Names") or [""])[0]).lstrip("/")
    ports = tuple(
        PublishedPort(container=name, host_ip=str(p.get("IP") or ""), host_port=int(p["PublicPort"]),
                      container_port=int(p.get("PrivatePort") or 0), proto=str(p.get("Type") or "tcp"))
        for p in (row.get("Ports") or []) if p.get("PublicPort")
    )
    return RunningContainer(id=str(row.get("Id", "")), name=name, image=str(row.get("Image", "")),
                            labels=dict(row.get("Labels") or {}), ports=ports)


def running_from_inspect(data: Mapping[str, Any]) -> RunningContainer | None:
    """A ``docker inspect`` document as a RunningContainer, or None when the container is not running.

    The ports are the ones in effect (``NetworkSettings.Ports``): a ``-P`` or ``-p 0`` binding shows
    the number Docker chose there, while ``HostConfig.PortBindings`` still says 0.
    """
    if not (data.get("State") or {}).get("Running"):
        return None
    cfg = data.get("Config") or {}
    name = str(data.get("Name") or str(data.get("Id", "?"))[:12]).lstrip("/")
    ports = []
    for key, binds in sorted(((data.get("NetworkSettings") or {}).get("Ports") or {}).items()):
        number, _, proto = str(key).partition("/")
        for b in binds or ():  # HostPort is a string; HostIp may be empty (every address)
            if str(b.get("HostPort") or "").isdigit() and 0 < int(b["HostPort"]) < 65536:
                ports.append(PublishedPort(container=name, host_ip=str(b.get("HostIp") or ""),
                                           host_port=int(b["HostPort"]), container_port=int(number or 0),
                                           proto=proto or "tcp"))
    return RunningContainer(id=str(data.get("Id", "")), name=name, image=str(cfg.get("Image", "")),
                            labels=dict(cfg.get("Labels") or {}), ports=tuple(ports))


def pull_progress(image: str, line: Mapping[str, Any]) -> PullProgress:
    """One JSON line of the Engine's pull stream as a record."""
    status = str(line.get("status") or "")
    detail = line.get("progressDetail")
    current, total = (detail.get("current"), detail.get("total")) if isinstance(detail, Mapping) else (None, None)
    # "Pulling from library/registry" carries the tag as its id, not a layer.
    layer = "" if status.startswith("Pulling from") else str(line.get("id") or "")
    return PullProgress(
        image=image, status=status, layer=layer,
        current=int(current) if isinstance(current, int) else None,
        total=int(total) if isinstance(total, int) and total > 0 else None,
    )
