"""What to provision (a frozen model), the names we use, and every provisioning default (the labels are
in tunneld/labels.py).

The model is serialised to JSON next to the daemon's config by ``kci-tunneld up`` so that the
daemon's reconciler provisions exactly what ``up`` did (with the API server port already chosen).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from tunneld.config import DEFAULT_HELPER_IMAGE, DockerSettings
from tunneld.errors import ConfigError

DEFAULT_REGISTRY_NAME = "kind-registry"  # kind's local-registry guide and ctlptl's kind examples use it
DEFAULT_REGISTRY_PORT = 5000
DEFAULT_REGISTRY_IMAGE = "registry:2"
DEFAULT_CLUSTER_NAME = "kind"  # kind's own default
REGISTRY_CONTAINER_PORT = 5000  # what registry:2 listens on inside its container
API_SERVER_CONTAINER_PORT = 6443
PROVISION_HELPER_NAME = "kci-tunneld-provision"
KIND_NETWORK = "kind"
MIN_KIND_VERSION = (0, 20, 0)
LOCAL_REGISTRY_HELP = "https://kind.sigs.k8s.io/docs/user/local-registry/"
DEFAULT_RECONCILE_INTERVAL = 5.0

# Written into the control-plane node of a cluster kci-tunneld created: `down` deletes only those.
OWNER_MARKER = "/etc/kci-tunneld/created-by"


@dataclass(frozen=True)
class ProvisionTimeouts:
    """Deadlines (seconds) for every provisioning wait."""

    docker: float = 30.0  # one Docker Engine API call
    kind: float = 120.0  # `kind version`, `get`, `delete`
    kind_create: float = 600.0  # `kind create cluster` (pulls the node image on a cold host)
    pull: float = 600.0  # pulling the registry or helper image onto the Docker host
    registry_ready: float = 60.0
    api_ready: float = 300.0  # /readyz, then the kube-public namespace
    nodes_ready: float = 300.0
    request: float = 10.0  # one Kubernetes API request
    poll: float = 1.0  # between two checks while waiting


@dataclass(frozen=True)
class RegistrySpec:
    name: str = DEFAULT_REGISTRY_NAME
    port: int = DEFAULT_REGISTRY_PORT  # on the remote's 127.0.0.1 and, forwarded, on this machine
    image: str = DEFAULT_REGISTRY_IMAGE

    @property
    def host(self) -> str:
        """How clients on this machine (and the remote host) name it: KEP-1755 ``host``."""
        return f"localhost:{self.port}"

    @property
    def in_network(self) -> str:
        """How containers on the kind network reach it: KEP-1755 ``hostFromClusterNetwork``."""
        return f"{self.name}:{REGISTRY_CONTAINER_PORT}"


@dataclass(frozen=True)
class ClusterSpec:
    name: str = DEFAULT_CLUSTER_NAME
    kind_path: str | None = None  # None: `kind` on PATH
    node_image: str | None = None  # None: kind's default for its version
    api_port: int | None = None  # None: pick one free on both sides
    kubeconfig: str | None = None  # None: $KUBECONFIG's first file, else ~/.kube/config
    workers: int = 0

    @property
    def context(self) -> str:
        return f"kind-{self.name}"

    @property
    def control_plane(self) -> str:
        return f"{self.name}-control-plane"


@dataclass(frozen=True)
class ProvisionSpec:
    """The whole provisioning request: a registry, optionally a kind cluster wired to it."""

    registry: RegistrySpec = field(default_factory=RegistrySpec)
    cluster: ClusterSpec | None = None
    docker: DockerSettings = field(default_factory=DockerSettings)
    helper_image: str = DEFAULT_HELPER_IMAGE
    timeouts: ProvisionTimeouts = field(default_factory=ProvisionTimeouts)


def spec_to_json(spec: ProvisionSpec) -> str:
    return json.dumps(dataclasses.asdict(spec), indent=2, sort_keys=True)


def spec_from_json(text: str, *, source: str = "provision spec") -> ProvisionSpec:
    """The inverse of ``spec_to_json``.

    :raises ConfigError: naming the file and the bad part.
    """
    try:
        data = json.loads(text)
        cluster = data.get("cluster")
        return ProvisionSpec(
            registry=_build(RegistrySpec, data["registry"]),
            cluster=None if cluster is None else _build(ClusterSpec, cluster),
            docker=_docker(data["docker"]),
            helper_image=str(data["helper_image"]),
            timeouts=_build(ProvisionTimeouts, data["timeouts"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{source}: not a provisioning spec written by `kci-tunneld up`: {e!r}") from None


def _docker(data: dict[str, Any]) -> DockerSettings:
    """DockerSettings from JSON: its list of helper images is a tuple again; a spec written before
    there was a list has the one ``helper_image``."""
    data = dict(data)
    if "helper_image" in data:
        data["helper_images"] = [data.pop("helper_image")]
    if "helper_images" in data:
        data["helper_images"] = tuple(data["helper_images"])
    built: DockerSettings = _build(DockerSettings, data)
    return built


def _build(cls: Any, data: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise KeyError(f"unknown keys {sorted(unknown)} for {cls.__name__}")
    return cls(**data)
