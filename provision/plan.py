"""Bringing the registry and a kind cluster up (pre-flight, then apply) and taking them down.

Straight-line, with one progress line per step a person can follow:

    pre-flight   Docker reachable, kind new enough, names and ports free (here and on the Docker host)
    registry     ensured, then answering on the Docker host's 127.0.0.1:PORT/v2/
    cluster      created (or reused) by kind, registry on the kind network, hosts.toml in every node,
                 containerd's config_path checked, kubeconfig read
                 and merged into the user's kubeconfig
    --- the caller starts the same-port forwards here ---
    configure    /readyz, kube-public, nodes Ready, the KEP-1755 ConfigMap

Nothing is created before every pre-flight check has passed; a helper container made only for the
checks is removed again when they fail.

One module, though near 400 lines: it is the order of the steps above, each step a few lines that
call registry.py, kind.py, kube.py and remote.py; what a step does lives in those modules, and the
plan stays readable from top to bottom as the sequence a person sees in the progress lines.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from provision import kind as kind_mod
from provision.errors import PreflightError, ProvisionError
from provision.kube import KubeApi
from provision.registry import (
    RegistryAction,
    clash,
    connect,
    ensure_registry,
    is_ours,
    local_registry_hosting,
    remove_registry,
    wait_answering,
)
from provision.remote import RemoteHost
from provision.spec import KIND_NETWORK, MIN_KIND_VERSION, ClusterSpec, ProvisionSpec
from provision.waits import poll_until
from tunneld import kubeconfig
from tunneld.config import ForwardSpec
from tunneld.docker.api import DockerClient
from tunneld.docker.host import resolve_endpoint
from tunneld.docker.images import ImageUnavailable, ensure_image
from tunneld.docker.progress import PullPrinter
from tunneld.engine.listener import bind_listeners
from tunneld.errors import BindError, TransportError
from tunneld.kubeconfig import KubeconfigError
from tunneld.labels import ROLE_LABEL, ROLE_REGISTRY

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
REGISTRY_FORWARD = "registry"
API_FORWARD = "kube-apiserver"
_PICK_ATTEMPTS = 64


@dataclass(frozen=True)
class Plan:
    """What pre-flight found: the spec with the API server port decided, and what already exists."""

    spec: ProvisionSpec
    registry_exists: bool
    cluster_exists: bool


@dataclass(frozen=True)
class Provisioned:
    """The result of ``Provisioner.up``."""

    spec: ProvisionSpec  # with the API server port decided
    registry: RegistryAction
    cluster: Literal["created", "reused"] | None = None
    nodes: tuple[str, ...] = ()
    kubeconfig: dict[str, Any] | None = field(default=None, repr=False)  # holds a client key: never log it


def forwards(spec: ProvisionSpec) -> list[ForwardSpec]:
    """The same-port forwards that make the registry and the API server reachable here."""
    port = spec.registry.port
    out = [ForwardSpec(name=REGISTRY_FORWARD, bind="localhost", port=port, host="127.0.0.1", host_port=port,
                       probe="http", probe_path="/v2/")]
    if spec.cluster is not None and spec.cluster.api_port:
        api = spec.cluster.api_port
        out.append(ForwardSpec(name=API_FORWARD, bind="localhost", port=api, host="127.0.0.1", host_port=api,
                               probe="https"))
    return out


def local_port_problem(port: int, what: str, ours: frozenset[int]) -> str | None:
    """Why ``port`` cannot be listened on here (localhost), or None; ports our own daemon holds are fine."""
    if port in ours:
        return None
    try:
        socks = bind_listeners("localhost", port)
    except BindError as e:
        return f"port {port} is taken on this machine, where the {what} forward must listen: {e}"
    for s in socks:
        s.close()
    return None


class Provisioner:
    """Provisions what a ``ProvisionSpec`` asks for on the Docker host it names."""

    def __init__(self, spec: ProvisionSpec, *, progress: Progress | None = None,
                 ours: frozenset[int] = frozenset(), pulls: PullPrinter | None = None) -> None:
        """``progress`` gets a line per step; image pulls are shown through ``pulls`` (default: their
        lines through ``progress``; on a terminal, a ``PullPrinter`` with ``write`` draws a bar)."""
        self.spec = spec
        self.say: Progress = progress or (lambda line: logger.info("%s", line))
        self.pulls = pulls or PullPrinter(self.say)
        self.ours = ours  # local ports a daemon of ours already listens on (re-running `up`)
        self.endpoint = resolve_endpoint(spec.docker)
        t = spec.timeouts
        cluster = spec.cluster
        self.kind = kind_mod.KindCli(cluster.kind_path if cluster else None, t, kind_mod.kind_env(self.endpoint))

    @asynccontextmanager
    async def _docker(self, step: str) -> AsyncIterator[tuple[DockerClient, RemoteHost]]:
        async with DockerClient(self.endpoint, timeout=self.spec.timeouts.docker) as client:
            try:
                version = await client.ping()
            except TransportError as e:
                raise TransportError(f"{step}: Docker is unreachable: {e}") from None
            self.say(f"Docker host {self.endpoint.describe()}: Engine {version.get('Version', '?')}")
            yield client, RemoteHost(client, self.spec.helper_image, self.spec.timeouts)

    # ---------------------------------------------------------------- up

    async def up(self, before_changes: Callable[[Plan], None] | None = None) -> Provisioned:
        """Pre-flight, then ensure the registry and (if asked) the cluster; return what was done.

        ``before_changes`` sees the plan after pre-flight and before anything is created; it may raise.

        :raises PreflightError: listing every problem found (nothing was created).
        :raises TransportError: when Docker is unreachable.
        :raises ProvisionError: when a step fails after pre-flight.
        """
        async with self._docker("pre-flight") as (client, remote):
            try:
                plan = await self.preflight(client, remote)
                if before_changes is not None:
                    before_changes(plan)
            except BaseException:
                if remote.created_helper:
                    with anyio.CancelScope(shield=True):
                        await remote.remove_helper()
                raise
            return await self._apply(client, remote, plan)

    async def preflight(self, client: DockerClient, remote: RemoteHost) -> Plan:
        """Check everything that can be checked without creating anything (but the helper)."""
        spec, reg, cluster = self.spec, self.spec.registry, self.spec.cluster
        problems: list[str] = []
        kind_ok = False
        if cluster is not None:
            try:
                version = await self.kind.version()
                kind_ok = version >= MIN_KIND_VERSION
                if not kind_ok:
                    problems.append(
                        f"kind {'.'.join(map(str, version))} ({self.kind.executable()}) is too old: kci-tunneld needs "
                        f"kind >= {'.'.join(map(str, MIN_KIND_VERSION))}; upgrade it or pass --kind PATH")
            except ProvisionError as e:
                problems.append(str(e))
        existing = await client.container_details(reg.name)
        registry_exists = existing is not None and is_ours(existing)
        if existing is not None and not registry_exists:
            problems.append(clash(existing))
        helper_clash = await remote.helper_clash()
        if helper_clash:
            problems.append(helper_clash)
        if p := local_port_problem(reg.port, "registry", self.ours):
            problems.append(p)
        if not helper_clash:
            await self._ensure_images(client, registry=not registry_exists)
            holder = await remote.port_holder(reg.port, ignore=reg.name if registry_exists else None)
            if holder:
                problems.append(f"port {reg.port} on the Docker host is taken by {holder}; the registry needs "
                                "it free there: choose another --registry-port")
        cluster_exists = False
        if cluster is not None and kind_ok:
            cluster_exists, cluster = await self._preflight_cluster(client, remote, cluster, problems,
                                                                    can_probe=not helper_clash)
            if cluster.api_port == reg.port:
                problems.append(f"the registry and the API server cannot both use port {reg.port}")
        if problems:
            raise PreflightError(problems)
        self.say(f"pre-flight ok: registry {reg.name} on port {reg.port}"
                 + (f", cluster {cluster.name} with its API server on port {cluster.api_port}" if cluster else ""))
        return Plan(spec=dataclasses.replace(spec, cluster=cluster), registry_exists=registry_exists,
                    cluster_exists=cluster_exists)

    async def _ensure_images(self, client: DockerClient, *, registry: bool) -> None:
        """Have (or pull) the images before anything is made: a host that cannot pull fails here."""
        wanted = [(self.spec.helper_image, "helper image", "--helper-image")]
        if registry:
            wanted.append((self.spec.registry.image, "registry image", "--registry-image"))
        problems = []
        for image, what, flag in wanted:
            if problem := await self._pull(client, image, what, flag):
                problems.append(problem)
        if problems:
            raise PreflightError(problems)

    async def _pull(self, client: DockerClient, image: str, what: str, flag: str) -> str | None:
        """Have ``image`` on the Docker host, its pull shown as it goes; why not, or None."""
        try:
            await ensure_image(client, image, deadline=self.spec.timeouts.pull, progress=self.pulls)
        except ImageUnavailable as e:
            return f"{e} (the {what}, see {flag})"
        finally:
            self.pulls.close()
        return None

    async def _preflight_cluster(self, client: DockerClient, remote: RemoteHost, cluster: ClusterSpec,
                                 problems: list[str], *, can_probe: bool) -> tuple[bool, ClusterSpec]:
        try:
            exists = cluster.name in await self.kind.clusters()
        except ProvisionError as e:
            problems.append(str(e))
            return False, cluster
        if exists:
            port = await kind_mod.api_port(client, cluster)
            if port is None:
                problems.append(f"kind cluster {cluster.name} exists but its control plane {cluster.control_plane} "
                                "publishes no API server port; delete it (kind delete cluster --name "
                                f"{cluster.name}) or choose another --cluster")
                return True, cluster
            if cluster.api_port and cluster.api_port != port:
                problems.append(f"kind cluster {cluster.name} exists with its API server on port {port}, not "
                                f"{cluster.api_port}; drop --api-port or choose another --cluster")
            if p := local_port_problem(port, "API server", self.ours):
                problems.append(p)
            return True, dataclasses.replace(cluster, api_port=port)
        squatter = await client.container_details(cluster.control_plane)
        if squatter is not None:
            problems.append(f"a container named {cluster.control_plane} exists but is not a node of a kind cluster "
                            f"{cluster.name}; kind would refuse to create the cluster. Remove it or choose another "
                            "--cluster")
        if not can_probe:
            return False, cluster
        if cluster.node_image:
            # kind would pull it silently for minutes; pulled here, it shows its progress (and a host that
            # cannot have it fails before anything is made). kind's default image is kind's to pull.
            if p := await self._pull(client, cluster.node_image, "node image", "--node-image"):
                problems.append(p)
        if cluster.api_port:
            if p := local_port_problem(cluster.api_port, "API server", self.ours):
                problems.append(p)
            if holder := await remote.port_holder(cluster.api_port):
                problems.append(f"port {cluster.api_port} on the Docker host is taken by {holder}; the API server "
                                "needs it free there: choose another --api-port (or leave it out to pick one)")
            return False, cluster
        return False, dataclasses.replace(cluster, api_port=await self._pick_api_port(client, remote))

    async def _pick_api_port(self, client: DockerClient, remote: RemoteHost) -> int:
        """A port free here and on the Docker host (kind alone would pick one free only here)."""
        taken = await remote.listening_ports() | {p.host_port for p in await client.published_ports()}
        taken.add(self.spec.registry.port)
        for _ in range(_PICK_ATTEMPTS):
            # Ask the kernel here for a free port, then check it there. Released before the daemon binds
            # it: a small window, unavoidable when both sides must use the same number.
            socks = bind_listeners("localhost", 0)
            port = int(socks[0].getsockname()[1])
            for s in socks:
                s.close()
            if port not in taken:
                return port
        raise PreflightError([f"found no port free both here and on the Docker host in {_PICK_ATTEMPTS} tries; "
                              "pass --api-port"])

    async def _apply(self, client: DockerClient, remote: RemoteHost, plan: Plan) -> Provisioned:
        spec, reg, t = plan.spec, plan.spec.registry, plan.spec.timeouts
        network = KIND_NETWORK if plan.cluster_exists else None
        action = await ensure_registry(client, reg, network=network, progress=self.say, deadline=t.pull,
                                       pulls=self.pulls)
        self.say(f"registry {reg.name}: {action} ({reg.image}, on the Docker host's 127.0.0.1:{reg.port})")
        took = await wait_answering(remote, reg, deadline=t.registry_ready, poll=t.poll)
        self.say(f"registry answering on the Docker host's 127.0.0.1:{reg.port}/v2/ ({took:.1f}s)")
        cluster = spec.cluster
        if cluster is None:
            return Provisioned(spec=spec, registry=action)
        assert cluster.api_port is not None
        path = cluster.kubeconfig or kubeconfig.default_path()
        if plan.cluster_exists:
            cluster_action: Literal["created", "reused"] = "reused"
            self.say(f"cluster {cluster.name}: exists, reused (API server on the Docker host's "
                     f"127.0.0.1:{cluster.api_port})")
        else:
            cluster_action = "created"
            self.say(f"cluster {cluster.name}: creating with kind (API server on the Docker host's "
                     f"127.0.0.1:{cluster.api_port})")
            await self.kind.create(cluster, kind_mod.kind_config(cluster.api_port, cluster.workers), path, self.say)
            await kind_mod.mark_owned(remote, cluster)
            self.say(f"cluster {cluster.name}: created")
        if await connect(client, reg.name, KIND_NETWORK):
            self.say(f"registry {reg.name} joined the {KIND_NETWORK} network")
        nodes = await kind_mod.wire_nodes(remote, cluster, reg, strict=cluster_action == "created", progress=self.say)
        self.say(f"hosts.toml for {reg.host} and {reg.in_network} written in {len(nodes)} node(s) "
                 f"({', '.join(nodes)}); containerd config_path checked")
        text = await self.kind.kubeconfig(cluster.name)
        try:
            config = kubeconfig.parse(text, "`kind get kubeconfig`")
            _point_at_forward(config, cluster)
            # Before the forwards start: the API server forward's https probe takes its credentials from here.
            kubeconfig.merge(path, config, cluster.context)
        except KubeconfigError as e:
            raise ProvisionError(str(e)) from None
        self.say(f"kubeconfig: context {cluster.context} (https://127.0.0.1:{cluster.api_port}) in {path}")
        return Provisioned(spec=spec, registry=action, cluster=cluster_action, nodes=tuple(nodes), kubeconfig=config)

    # ---------------------------------------------------------------- after the forwards are up

    async def configure_cluster(self, done: Provisioned) -> None:
        """Through the forwarded API server: readiness waits, then the KEP-1755 ConfigMap.

        :raises ProvisionError: naming the wait that ran out, or the request that failed.
        """
        cluster, reg, t = done.spec.cluster, done.spec.registry, done.spec.timeouts
        if cluster is None or done.kubeconfig is None:
            return
        async with KubeApi(done.kubeconfig, cluster.context, request_timeout=t.request) as api:
            last = [""]

            async def ready() -> bool:
                ok, last[0] = await api.readyz()
                return ok

            took = await poll_until(ready, deadline=t.api_ready, poll=t.poll)
            if took is None:
                raise ProvisionError(f"API server {api.server} not ready within {t.api_ready:g}s: {last[0]}")
            self.say(f"API server ready: {api.server}/readyz ({took:.1f}s)")

            async def namespace() -> bool:
                return await api.namespace_exists("kube-public")

            if await poll_until(namespace, deadline=t.api_ready, poll=t.poll) is None:
                raise ProvisionError(f"namespace kube-public did not appear within {t.api_ready:g}s")
            seen: list[list[tuple[str, bool]]] = [[]]

            async def nodes_ready() -> bool:
                seen[0] = await api.node_readiness()
                return bool(seen[0]) and all(ok for _, ok in seen[0])

            took = await poll_until(nodes_ready, deadline=t.nodes_ready, poll=t.poll)
            states = ", ".join(f"{n} {'Ready' if ok else 'NotReady'}" for n, ok in seen[0]) or "no nodes"
            if took is None:
                raise ProvisionError(f"nodes not Ready within {t.nodes_ready:g}s: {states}")
            self.say(f"nodes Ready: {len(seen[0])}/{len(seen[0])} ({states}, {took:.1f}s)")
            result = await api.apply_configmap("kube-public", "local-registry-hosting", local_registry_hosting(reg))
            self.say(f"ConfigMap kube-public/local-registry-hosting {result} (host {reg.host}, "
                     f"from the cluster {reg.in_network})")

    # ---------------------------------------------------------------- down

    async def down(self) -> None:
        """Remove what kci-tunneld made (cluster, registry, helper) and nothing else.

        :raises TransportError: when Docker is unreachable.
        :raises ProvisionError: when kind fails to delete a cluster we made.
        """
        spec, cluster = self.spec, self.spec.cluster
        async with self._docker("down") as (client, remote):
            if cluster is not None:
                await self._down_cluster(client, remote, cluster)
            self.say(await remove_registry(client, spec.registry))
            others = await client.list_containers({ROLE_LABEL: ROLE_REGISTRY})
            if not others and await remote.remove_helper():
                self.say("helper container removed")

    async def _down_cluster(self, client: DockerClient, remote: RemoteHost, cluster: ClusterSpec) -> None:
        if await client.container_details(cluster.control_plane) is None:
            self.say(f"cluster {cluster.name}: not there")
            return
        try:
            owned = await kind_mod.is_owned(remote, cluster)
        except TransportError as e:
            self.say(f"cluster {cluster.name}: left alone, cannot tell who created it ({e})")
            return
        if not owned:
            self.say(f"cluster {cluster.name}: left alone, not created by kci-tunneld "
                     f"(delete it with `kind delete cluster --name {cluster.name}`)")
            return
        path = cluster.kubeconfig or kubeconfig.default_path()
        await self.kind.delete(cluster.name, path)
        try:
            kubeconfig.remove(path, cluster.context)
        except KubeconfigError as e:
            raise ProvisionError(str(e)) from None
        self.say(f"cluster {cluster.name}: deleted; context {cluster.context} removed from {path}")


def _point_at_forward(config: dict[str, Any], cluster: ClusterSpec) -> None:
    """Make the context's server https://127.0.0.1:PORT: the same-port forward, whatever kind wrote."""
    want = f"https://127.0.0.1:{cluster.api_port}"
    ctx = next((c for c in config.get("contexts") or [] if c.get("name") == cluster.context), None)
    if ctx is None:
        raise ProvisionError(f"`kind get kubeconfig --name {cluster.name}` has no context {cluster.context}")
    name = (ctx.get("context") or {}).get("cluster")
    for c in config.get("clusters") or []:
        if c.get("name") == name and isinstance(c.get("cluster"), dict):
            if c["cluster"].get("server") != want:
                logger.info("kubeconfig: server %s -> %s (the forward)", c["cluster"].get("server"), want)
            c["cluster"]["server"] = want
            return
    raise ProvisionError(f"`kind get kubeconfig --name {cluster.name}` has no cluster {name!r}")
