"""kind clusters through the `kind` CLI, and the registry wiring inside their nodes.

kind runs here (the CI side) and drives the remote Docker host through the docker CLI, as it would
locally. Two things it gets wrong with a remote host are fixed by the config we hand it: it would
pick an API server port free on THIS machine (we pick one free on both) and would publish it on the
remote's 127.0.0.1 anyway (so we set it explicitly). Registry hosts are configured the current way:
containerd's ``config_path`` plus one hosts.toml per registry name, written into every node; never
the legacy ``registry.mirrors`` block, with which containerd refuses to start when config_path is set.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence

import anyio
import anyio.abc

from provision.errors import ProvisionError
from provision.remote import RemoteHost
from provision.spec import (
    API_SERVER_CONTAINER_PORT,
    MIN_KIND_VERSION,
    OWNER_MARKER,
    ClusterSpec,
    ProvisionTimeouts,
    RegistrySpec,
)
from tunneld.docker.api import DockerClient
from tunneld.docker.host import Endpoint
from tunneld.docker.models import ContainerInfo
from tunneld.labels import KIND_CLUSTER_LABEL, KIND_CONTROL_PLANE, KIND_ROLE_LABEL

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

# kind says "Ensuring node image" once, then nothing while it pulls (minutes on a cold host).
QUIET_NOTICE = 30.0
CERTS_DIR = "/etc/containerd/certs.d"
CONTAINERD_PATCH = f'[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "{CERTS_DIR}"'
_CONFIG_PATH_RE = re.compile(r'^\s*config_path\s*=\s*["\']' + re.escape(CERTS_DIR) + r'["\']\s*$', re.MULTILINE)
_MIRRORS_RE = re.compile(r"registry\.mirrors", re.MULTILINE)
_VERSION_RE = re.compile(r"\bv?(\d+)\.(\d+)\.(\d+)")


def kind_config(api_port: int, workers: int = 0) -> str:
    """The kind Cluster config: API server on the remote's 127.0.0.1:api_port, containerd's config_path."""
    nodes = "\n".join(["- role: control-plane"] + ["- role: worker"] * workers)
    patch = "\n".join("  " + line for line in CONTAINERD_PATCH.splitlines())
    return (
        "# written by kci-tunneld: the API server is published on the Docker host's 127.0.0.1:"
        f"{api_port} and\n# forwarded to the same port here; containerd reads registry hosts from {CERTS_DIR}\n"
        "kind: Cluster\n"
        "apiVersion: kind.x-k8s.io/v1alpha4\n"
        "networking:\n"
        '  apiServerAddress: "127.0.0.1"\n'
        f"  apiServerPort: {api_port}\n"
        f"nodes:\n{nodes}\n"
        "containerdConfigPatches:\n"
        f"- |-\n{patch}\n"
    )


def hosts_toml(registry: RegistrySpec) -> str:
    """containerd's hosts.toml sending pulls to the registry over the kind network (plain HTTP)."""
    return (
        f"# written by kci-tunneld: pulls go to registry container {registry.name} over the kind network\n"
        f'server = "http://{registry.in_network}"\n'
    )


def hosts_paths(registry: RegistrySpec) -> list[str]:
    """One hosts.toml per name pods may use: localhost:PORT (as on this machine) and NAME:5000."""
    return [f"{CERTS_DIR}/{registry.host}/hosts.toml", f"{CERTS_DIR}/{registry.in_network}/hosts.toml"]


def parse_version(text: str) -> tuple[int, int, int]:
    """``kind v0.20.0 go1.20.4 linux/amd64`` -> (0, 20, 0).

    :raises ProvisionError: when there is no version in ``text``.
    """
    m = _VERSION_RE.search(text)
    if not m:
        raise ProvisionError(f"cannot read a version from `kind version` output: {text.strip()[:200]!r}")
    return int(m[1]), int(m[2]), int(m[3])


def check_containerd_config(text: str, node: str) -> None:
    """Assert the node's containerd config has our config_path and no legacy mirrors.

    :raises ProvisionError: saying which and where.
    """
    if _MIRRORS_RE.search(text):
        raise ProvisionError(f"node {node}: /etc/containerd/config.toml has a registry.mirrors block; with "
                             "config_path set containerd refuses to load it. Remove that patch from the kind config")
    if not _CONFIG_PATH_RE.search(text):
        raise ProvisionError(f'node {node}: /etc/containerd/config.toml does not set config_path = "{CERTS_DIR}", '
                             "so the hosts.toml files are ignored and pulls from the registry will fail")


def kind_env(endpoint: Endpoint) -> dict[str, str]:
    """The environment for `kind`: ours, plus DOCKER_HOST & co. when the Docker host came from settings.

    kind drives Docker through the docker CLI, which reads DOCKER_HOST, contexts and config.json just
    as resolve_endpoint does, so only explicitly configured hosts need passing on.
    """
    env = dict(os.environ)
    if endpoint.source.startswith("settings"):
        env["DOCKER_HOST"] = endpoint.host
        env.pop("DOCKER_CONTEXT", None)
        env.pop("DOCKER_TLS_VERIFY", None)
        env.pop("DOCKER_TLS", None)
        if endpoint.tls is not None:
            # The docker CLI: any non-empty DOCKER_TLS_VERIFY verifies; DOCKER_TLS alone is TLS unverified.
            env["DOCKER_TLS_VERIFY" if endpoint.tls.verify else "DOCKER_TLS"] = "1"
            if endpoint.tls.cert_dir:
                env["DOCKER_CERT_PATH"] = endpoint.tls.cert_dir
    return env


class KindCli:
    """The `kind` executable: found on PATH or configured, each call with a deadline."""

    def __init__(self, path: str | None, timeouts: ProvisionTimeouts, env: Mapping[str, str], *,
                 quiet: float = QUIET_NOTICE) -> None:
        """``quiet``: after this many seconds without a line from `kind create cluster`, say it still works."""
        self.configured = path
        self.timeouts = timeouts
        self.env = dict(env)
        self.quiet = quiet

    def executable(self) -> str:
        """:raises ProvisionError: when kind is not installed (or the configured path is not executable)."""
        if self.configured:
            if os.access(self.configured, os.X_OK) and not os.path.isdir(self.configured):
                return self.configured
            raise ProvisionError(f"kind not found at {self.configured} (--kind): not an executable file")
        found = shutil.which("kind", path=self.env.get("PATH"))
        if found is None:
            raise ProvisionError(
                "kind not found on PATH: install kind >= {} (https://kind.sigs.k8s.io/docs/user/quick-start/"
                "#installation), pass --kind PATH, or use --no-cluster".format(".".join(map(str, MIN_KIND_VERSION))))
        return found

    async def _run(self, args: Sequence[str], *, deadline: float, what: str) -> str:
        exe = self.executable()
        try:
            with anyio.fail_after(deadline):
                result = await anyio.run_process([exe, *args], check=False, env=self.env,
                                                 stdin=subprocess.DEVNULL)
        except TimeoutError:
            raise ProvisionError(f"`kind {' '.join(args)}` did not finish within {deadline:g}s") from None
        except OSError as e:
            raise ProvisionError(f"cannot run {exe}: {e.strerror or e}") from None
        if result.returncode != 0:
            err = result.stderr.decode(errors="replace").strip() or result.stdout.decode(errors="replace").strip()
            raise ProvisionError(f"{what} failed: `kind {' '.join(args)}` exited {result.returncode}: {err[-2000:]}")
        return result.stdout.decode(errors="replace")

    async def version(self) -> tuple[int, int, int]:
        return parse_version(await self._run(["version"], deadline=self.timeouts.kind, what="kind version"))

    async def clusters(self) -> list[str]:
        out = await self._run(["get", "clusters"], deadline=self.timeouts.kind, what="listing kind clusters")
        return [line.strip() for line in out.splitlines() if line.strip()]

    async def kubeconfig(self, name: str) -> str:
        return await self._run(["get", "kubeconfig", "--name", name], deadline=self.timeouts.kind,
                               what=f"reading the kubeconfig of kind cluster {name}")

    async def delete(self, name: str, kubeconfig: str) -> None:
        await self._run(["delete", "cluster", "--name", name, "--kubeconfig", kubeconfig],
                        deadline=self.timeouts.kind, what=f"deleting kind cluster {name}")

    async def create(self, spec: ClusterSpec, config: str, kubeconfig: str, progress: Progress) -> None:
        """`kind create cluster`, its output passed on line by line as progress (and, while it says
        nothing for ``quiet`` seconds, that it still works).

        :raises ProvisionError: when kind fails or overruns its deadline (it is killed then).
        """
        exe = self.executable()
        with tempfile.TemporaryDirectory(prefix="kci-tunneld-kind-") as tmp:
            path = anyio.Path(tmp, "kind-config.yaml")
            await path.write_text(config)
            args = ["create", "cluster", "--name", spec.name, "--config", str(path), "--kubeconfig", kubeconfig]
            if spec.node_image:
                args += ["--image", spec.node_image]
            out = _Output(progress)
            try:
                with anyio.fail_after(self.timeouts.kind_create):
                    async with await anyio.open_process([exe, *args], env=self.env, stdin=subprocess.DEVNULL) as proc:
                        assert proc.stderr is not None and proc.stdout is not None
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(out.still_busy, self.quiet)
                            async with anyio.create_task_group() as readers:
                                readers.start_soon(out.pass_lines, proc.stdout)
                                readers.start_soon(out.pass_lines, proc.stderr)
                            tg.cancel_scope.cancel()
                        code = await proc.wait()
            except TimeoutError:
                raise ProvisionError(f"`kind create cluster --name {spec.name}` did not finish within "
                                     f"{self.timeouts.kind_create:g}s (killed)") from None
            if code != 0:
                raise ProvisionError(f"`kind create cluster --name {spec.name}` exited {code}: "
                                     + " | ".join(out.tail[-5:]))


class _Output:
    """What `kind create cluster` prints, passed on line by line; when it falls silent (pulling its node
    image: minutes, in one line), a reminder every so often that it still works and on what."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tail: list[str] = []
        self.started = self.heard = time.monotonic()

    def _say(self, line: str) -> None:
        self.tail.append(line)
        self.heard = time.monotonic()
        self.progress(f"kind: {line}")

    async def pass_lines(self, stream: anyio.abc.ByteReceiveStream) -> None:
        buf = b""
        async for chunk in stream:
            buf += chunk
            *lines, buf = re.split(rb"[\r\n]", buf)
            for raw in lines:
                if line := raw.decode(errors="replace").strip():
                    self._say(line)
        if line := buf.decode(errors="replace").strip():
            self._say(line)

    async def still_busy(self, every: float) -> None:
        said = self.started
        while True:
            await anyio.sleep(max(0.0, max(self.heard, said) + every - time.monotonic()))
            now = time.monotonic()
            if now - max(self.heard, said) >= every:
                said = now
                last = f"; last: {self.tail[-1]}" if self.tail else ""
                self.progress(f"kind: still working, {now - self.started:.0f}s so far{last}")


async def nodes(client: DockerClient, cluster: str) -> list[ContainerInfo]:
    """The cluster's node containers, as kind labels them (control plane first)."""
    found = await client.list_containers({KIND_CLUSTER_LABEL: cluster})
    return sorted(found, key=lambda n: (n.labels.get(KIND_ROLE_LABEL) != KIND_CONTROL_PLANE, n.name))


async def api_port(client: DockerClient, cluster: ClusterSpec) -> int | None:
    """The remote port the cluster's API server is published on, or None when there is no control plane."""
    d = await client.container_details(cluster.control_plane)
    if d is None:
        return None
    for key, _ip, port in d.port_bindings:
        if key == f"{API_SERVER_CONTAINER_PORT}/tcp" and port:
            return port
    return None


async def wire_nodes(remote: RemoteHost, cluster: ClusterSpec, registry: RegistrySpec, *, strict: bool,
                     progress: Progress) -> list[str]:
    """Write the registry's hosts.toml into every node and check containerd reads them; return the nodes.

    With ``strict`` (a cluster we just created), a containerd config without config_path is an error;
    otherwise (someone else's cluster) it is reported and left as it is.

    :raises ProvisionError: when a node is not running or a check fails.
    """
    found = await nodes(remote.client, cluster.name)
    if not found:
        raise ProvisionError(f"kind cluster {cluster.name} has no node containers on the Docker host")
    names = []
    for node in found:
        if not node.running:
            raise ProvisionError(f"node {node.name} of kind cluster {cluster.name} is {node.state}, not running; "
                                 f"start it (docker start {node.name}) or recreate the cluster")
        for path in hosts_paths(registry):
            await remote.write_file(node.name, path, hosts_toml(registry))
        text = await remote.read_file(node.name, "/etc/containerd/config.toml") or ""
        try:
            check_containerd_config(text, node.name)
        except ProvisionError as e:
            if strict:
                raise
            progress(f"warning: {e}")
        names.append(node.name)
    return names


async def mark_owned(remote: RemoteHost, cluster: ClusterSpec) -> None:
    await remote.write_file(cluster.control_plane, OWNER_MARKER, "kci-tunneld\n")


async def is_owned(remote: RemoteHost, cluster: ClusterSpec) -> bool:
    """True when kci-tunneld created the cluster (its marker is in the control-plane node)."""
    return await remote.read_file(cluster.control_plane, OWNER_MARKER) is not None
