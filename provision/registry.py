"""The image registry container on the remote Docker host: ensure, wait until it answers, remove.

Shaped like the one kind's local-registry guide and ctlptl make (``registry:2`` published on the
remote's 127.0.0.1:PORT, ``--restart=always``, deletes enabled, ctlptl's role label, hostname = name,
joined to the ``kind`` network), so ctlptl and Tilt recognise it, plus our own ownership label.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Literal

from provision.errors import ProvisionError
from provision.remote import RemoteHost, describe
from provision.spec import LOCAL_REGISTRY_HELP, REGISTRY_CONTAINER_PORT, RegistrySpec
from provision.waits import poll_until
from tunneld.docker.api import DockerAPIError, DockerClient
from tunneld.docker.images import ImageUnavailable, ensure_image
from tunneld.docker.models import ContainerDetails
from tunneld.docker.progress import PullPrinter
from tunneld.labels import CTLPTL_REGISTRY, CTLPTL_ROLE_LABEL, REGISTRY_PORT_LABEL, ROLE_LABEL, ROLE_REGISTRY

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
RegistryAction = Literal["reused", "started", "created", "recreated"]

DELETE_ENABLED = "REGISTRY_STORAGE_DELETE_ENABLED=true"
_PORT_KEY = f"{REGISTRY_CONTAINER_PORT}/tcp"


def registry_body(spec: RegistrySpec) -> dict[str, Any]:
    """The Engine API ContainerCreate body for the registry."""
    return {
        "Image": spec.image,
        "Hostname": spec.name,
        "Env": [DELETE_ENABLED],
        "Labels": {ROLE_LABEL: ROLE_REGISTRY, CTLPTL_ROLE_LABEL: CTLPTL_REGISTRY, REGISTRY_PORT_LABEL: str(spec.port)},
        "ExposedPorts": {_PORT_KEY: {}},
        "HostConfig": {
            # 127.0.0.1 explicitly: never exposed beyond the remote host itself.
            "PortBindings": {_PORT_KEY: [{"HostIp": "127.0.0.1", "HostPort": str(spec.port)}]},
            "RestartPolicy": {"Name": "always"},
        },
    }


def normalize_image(ref: str) -> str:
    """``registry:2``, ``library/registry:2`` and ``docker.io/library/registry:2`` name one image."""
    for prefix in ("docker.io/", "index.docker.io/", "registry-1.docker.io/"):
        if ref.startswith(prefix):
            ref = ref[len(prefix):]
    if ref.startswith("library/") and ref.count("/") == 1:
        ref = ref[len("library/"):]
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last and "@" not in last:
        ref += ":latest"
    return ref


def is_ours(d: ContainerDetails) -> bool:
    return d.labels.get(ROLE_LABEL) == ROLE_REGISTRY


def clash(d: ContainerDetails) -> str:
    ctlptl = " It looks like a ctlptl registry." if d.labels.get(CTLPTL_ROLE_LABEL) == CTLPTL_REGISTRY else ""
    return (f"a container named {d.name} exists on the Docker host and was not created by kci-tunneld "
            f"(no {ROLE_LABEL}={ROLE_REGISTRY} label): {describe(d)}.{ctlptl} Remove it (docker rm -f {d.name}) "
            "or pick another name with --registry-name")


def mismatch(d: ContainerDetails, spec: RegistrySpec) -> str | None:
    """Why our existing registry container differs from ``spec`` (so it must be recreated), or None."""
    reasons = []
    if normalize_image(d.image) != normalize_image(spec.image):
        reasons.append(f"image {d.image}, want {spec.image}")
    want = ((_PORT_KEY, "127.0.0.1", spec.port),)
    if d.port_bindings != want:
        have = ", ".join(f"{ip}:{port}->{key}" for key, ip, port in d.port_bindings) or "nothing"
        reasons.append(f"publishes {have}, want 127.0.0.1:{spec.port}->{_PORT_KEY}")
    if DELETE_ENABLED not in d.env:
        reasons.append("deletes not enabled")
    if d.restart_policy != "always":
        reasons.append(f"restart policy {d.restart_policy or 'no'}, want always")
    return "; ".join(reasons) or None


async def ensure_registry(client: DockerClient, spec: RegistrySpec, *, network: str | None,
                          progress: Progress, deadline: float, pulls: PullPrinter | None = None) -> RegistryAction:
    """Make the registry container exist, match ``spec``, run, and (if given) be on ``network``.

    A pull of its image is shown through ``pulls`` (default: lines through ``progress``).

    :raises ProvisionError: when another container holds the name, or Docker refuses.
    """
    d = await client.container_details(spec.name)
    action: RegistryAction = "reused"
    if d is not None and not is_ours(d):
        raise ProvisionError(clash(d))
    if d is not None and d.state in ("removing", "dead"):
        await _wait_removed(client, d)
        d = None
    if d is not None and (why := mismatch(d, spec)) is not None:
        progress(f"registry {spec.name}: {why}: recreating it (its images are lost)")
        await client.remove_container(d.id)
        d, action = None, "recreated"
    if d is None:
        pulls = pulls or PullPrinter(progress)
        try:
            await ensure_image(client, spec.image, deadline=deadline, progress=pulls)
        except ImageUnavailable as e:
            raise ProvisionError(str(e)) from None
        finally:
            pulls.close()
        await client.create_container_json(spec.name, registry_body(spec))
        action = "created" if action == "reused" else action
    if d is None or not d.running:
        try:
            await client.start_container(spec.name)
        except DockerAPIError as e:
            if d is None:
                # A container we cannot start (the port went away meanwhile) must not linger.
                await client.remove_container(spec.name)
            raise ProvisionError(f"starting registry {spec.name} on 127.0.0.1:{spec.port} failed: {e}") from None
        action = "started" if action == "reused" else action
    if network is not None:
        await connect(client, spec.name, network)
    return action


async def _wait_removed(client: DockerClient, d: ContainerDetails) -> None:
    """A `docker rm` is under way (or left a dead container): let it finish, or finish it, before creating."""
    if d.state == "dead":
        await client.remove_container(d.id)
        return

    async def gone() -> bool:
        return await client.container_details(d.id) is None

    if await poll_until(gone, deadline=client.timeout, poll=0.1) is None:
        raise ProvisionError(f"registry {d.name} is still being removed after {client.timeout:g}s")


async def connect(client: DockerClient, container: str, network: str) -> bool:
    """Join ``container`` to ``network`` unless it is already there; True if it was joined now."""
    d = await client.container_details(container)
    if d is None or network in d.networks:
        return False
    try:
        await client.connect_network(network, container)
    except DockerAPIError as e:
        if e.status == 403 and "already exists" in str(e):
            return False  # joined by someone else between the check and the call
        raise
    return True


async def wait_answering(remote: RemoteHost, spec: RegistrySpec, *, deadline: float, poll: float) -> float:
    """Wait until GET /v2/ on the remote's 127.0.0.1:PORT answers 200; return how long it took.

    :raises ProvisionError: after ``deadline`` seconds, with the last status seen.
    """
    seen: list[int | None] = [None]

    async def answers() -> bool:
        seen[0] = await remote.http_status(spec.port, "/v2/")
        return seen[0] == 200

    took = await poll_until(answers, deadline=deadline, poll=poll)
    if took is not None:
        return took
    last = f"it answered HTTP {seen[0]}" if seen[0] else "nothing answered"
    raise ProvisionError(f"registry {spec.name} did not answer on the Docker host's 127.0.0.1:{spec.port}/v2/ "
                         f"within {deadline:g}s ({last}); see `docker logs {spec.name}`")


async def remove_registry(client: DockerClient, spec: RegistrySpec) -> str:
    """Remove the registry if kci-tunneld made it; say what happened."""
    d = await client.container_details(spec.name)
    if d is None:
        return f"registry {spec.name}: not there"
    if not is_ours(d):
        return f"registry {spec.name}: left alone, not created by kci-tunneld ({describe(d)})"
    await client.remove_container(d.id)
    return f"registry {spec.name}: removed"


def local_registry_hosting(spec: RegistrySpec) -> dict[str, str]:
    """The data of KEP-1755's ``local-registry-hosting`` ConfigMap (kube-public) for this registry."""
    doc = "\n".join(f"{key}: {json.dumps(value)}" for key, value in (
        ("host", spec.host),  # pushes from this machine (and the remote host): the same-port forward
        ("hostFromContainerRuntime", spec.in_network),  # containerd in the nodes, via hosts.toml
        ("hostFromClusterNetwork", spec.in_network),  # pods on the kind network
        ("help", LOCAL_REGISTRY_HELP),
    ))
    return {"localRegistryHosting.v1": doc + "\n"}
