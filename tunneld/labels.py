"""Container labels, spelled once: our own (what kci-tunneld made), kind's and ctlptl's (what we find).

kci-tunneld writes ``ROLE_LABEL`` on every container it creates and only ever changes or removes
containers carrying it with the value it expects; a container of the same name without it is
someone else's, and is left alone. kind's and ctlptl's labels are read (``--auto``, provisioning)
and, on the registry, written so that ctlptl and Tilt recognise it.
"""

from __future__ import annotations

ROLE_LABEL = "io.kci-tunneld.role"
ROLE_HELPER = "helper"  # the docker transport's helper container
ROLE_PROVISION_HELPER = "provision-helper"  # provisioning's view of the Docker host's own network
ROLE_REGISTRY = "registry"  # the registry `kci-tunneld up` made
REGISTRY_PORT_LABEL = "io.kci-tunneld.registry-port"  # informational: the registry's port on the host

# ctlptl finds registries by this label (with CTLPTL_REGISTRY) and reads the host port from the
# published 5000/tcp.
CTLPTL_ROLE_LABEL = "dev.tilt.ctlptl.role"
CTLPTL_REGISTRY = "registry"

# kind's own node labels: the cluster's name, and the node's role in it.
KIND_CLUSTER_LABEL = "io.x-k8s.kind.cluster"
KIND_ROLE_LABEL = "io.x-k8s.kind.role"
KIND_CONTROL_PLANE = "control-plane"
KIND_LOAD_BALANCER = "external-load-balancer"

# docker compose's project label: follow mode (--auto=all) selects by it.
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"
