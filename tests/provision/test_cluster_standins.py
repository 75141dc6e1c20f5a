"""The cluster path of `kci-tunneld up`/`down`, end to end on the lab, against STAND-INS for kind and
for the Kubernetes API server (tests/standins: no node image and no API server can run here).

Real: the lab's dockerd (over TLS), the node containers and the kind network, the registry, the
docker exec calls that write hosts.toml, the daemon and its forwards, kubernetes-asyncio, kubectl.
Stand-in: what `kind` does (recorded in calls.jsonl) and what the API server answers (recorded in
StandinApiServer.requests). Each test checks exactly what was asked of them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from provision.kind import CONTAINERD_PATCH, hosts_toml
from provision.registry import local_registry_hosting
from provision.spec import RegistrySpec
from tests.cli.runner import Cli
from tests.lab.lab import LabInfo, docker
from tests.provision.support import cli_env, free_port, inspect, run_cli, unique
from tests.standins import kind as standin_kind
from tests.standins.apiserver import StandinApiServer

pytestmark = pytest.mark.timeout(240)


@dataclass
class Setup:
    api: StandinApiServer
    cluster: str
    registry: RegistrySpec
    state: Path
    kubeconfig: Path
    control: Path
    env: dict[str, str]

    def selection(self) -> list[str]:
        return ["--cluster", self.cluster, "--registry-name", self.registry.name, "--registry-port",
                str(self.registry.port), "--kubeconfig", str(self.kubeconfig), "--control", str(self.control)]

    def calls(self, command: str) -> list[dict[str, Any]]:
        return [c for c in standin_kind.calls(self.state) if " ".join(c["argv"][:2]).startswith(command)]


@pytest.fixture
def setup(lab: LabInfo, tmp_path: Path) -> Iterator[Setup]:
    cluster = unique("kc")
    nodes = (f"{cluster}-control-plane", f"{cluster}-worker")
    # The readiness the API server reports comes late, so the waits must really wait.
    with StandinApiServer(lab.host_ip, nodes=nodes, readyz_failures=3, namespace_missing=2, nodes_not_ready=2) as api:
        state = tmp_path / "kind-state"
        api.write_kind_state(state, node_image=lab.socat_image)
        standin_kind.install(tmp_path / "bin")
        env = cli_env(lab, tls=True, KCI_STANDIN_KIND_DIR=str(state), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
        s = Setup(api, cluster, RegistrySpec(name=f"{cluster}-registry", port=free_port()), state,
                  tmp_path / "kube" / "config", tmp_path / "control.sock", env)
        try:
            yield s
        finally:
            pid_file = tmp_path / "daemon.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGTERM)
                except ProcessLookupError:
                    pass
            for name in (*nodes, s.registry.name):
                docker("rm", "-f", name, check=False)


def exec_in(node: str, *cmd: str) -> str:
    return docker("exec", node, *cmd).stdout


def kubectl(kubeconfig: Path, *args: str) -> str:
    r = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), *args], capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_up_creates_a_wired_cluster_then_reuses_it_and_down_deletes_it(lab: LabInfo, setup: Setup) -> None:
    reg = setup.registry
    up = run_cli("up", *setup.selection(), "--workers", "1", "--detach", "--ready-timeout", "60", env=setup.env)
    assert up.returncode == 0, up.stderr
    (setup.control.parent / "daemon.pid").write_text(str(Cli(setup.control.parent, setup.env).status()["pid"]))
    api_port = int(re.search(r"API server https://127\.0\.0\.1:(\d+)", up.stdout)[1])  # type: ignore[index]

    # What kind was asked: version first (pre-flight), then the config we mean, with the remote-free port.
    argvs = [c["argv"] for c in standin_kind.calls(setup.state)]
    assert argvs[0] == ["version"] and ["get", "clusters"] in argvs
    (create,) = setup.calls("create cluster")
    assert create["argv"][:4] == ["create", "cluster", "--name", setup.cluster]
    assert create["kubeconfig_flag"] == str(setup.kubeconfig)
    assert create["config"] == {
        "kind": "Cluster", "apiVersion": "kind.x-k8s.io/v1alpha4",
        "networking": {"apiServerAddress": "127.0.0.1", "apiServerPort": api_port},
        "nodes": [{"role": "control-plane"}, {"role": "worker"}],
        "containerdConfigPatches": [CONTAINERD_PATCH],
    }
    assert "mirrors" not in str(create["config_text"])
    assert create["env"]["DOCKER_HOST"] == lab.docker_host_tcp
    assert inspect(lab, f"{setup.cluster}-control-plane",
                   '{{json .HostConfig.PortBindings}}') == json.dumps({"6443/tcp": [{"HostIp": "127.0.0.1",
                                                                                    "HostPort": str(api_port)}]},
                                                                      separators=(",", ":"))

    # Every node: both hosts.toml files, containerd's config_path, and the registry reachable by the
    # name hosts.toml uses, over the kind network.
    for node in create["nodes"]:
        for host in (reg.host, reg.in_network):
            assert exec_in(node, "cat", f"/etc/containerd/certs.d/{host}/hosts.toml") == hosts_toml(reg)
        assert 'config_path = "/etc/containerd/certs.d"' in exec_in(node, "cat", "/etc/containerd/config.toml")
        head = exec_in(node, "sh", "-c", f"printf 'GET /v2/ HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {reg.name} 5000")
        assert head.startswith(("HTTP/1.0 200", "HTTP/1.1 200")), head
    assert "kind" in inspect(lab, reg.name, "{{json .NetworkSettings.Networks}}")  # type: ignore[operator]

    # The API server: the ConfigMap, exactly, and only after every readiness wait was satisfied.
    reqs = setup.api.requests
    post = next(i for i, r in enumerate(reqs) if r.method == "POST")
    assert reqs[post].path == "/api/v1/namespaces/kube-public/configmaps"
    assert reqs[post].body == {
        "apiVersion": "v1", "kind": "ConfigMap", "data": local_registry_hosting(reg),
        "metadata": {"name": "local-registry-hosting", "namespace": "kube-public",
                     "labels": {"app.kubernetes.io/managed-by": "kci-tunneld"}},
    }
    before = reqs[:post]
    assert [r.status for r in before if r.path == "/readyz"][:3] == [500, 500, 500]
    assert [r.status for r in before if r.path == "/readyz"][-1] == 200
    assert [r.status for r in before if r.path == "/api/v1/namespaces/kube-public"] == [404, 404, 200]
    assert len([r for r in before if r.path == "/api/v1/nodes"]) == 3  # NotReady twice, then Ready
    assert all(r.client == "kubernetes-admin" for r in reqs)  # kind's admin credentials, via the kubeconfig
    for line in ("registry answering on the Docker host's", "API server ready: https://127.0.0.1:",
                 "nodes Ready: 2/2", "ConfigMap kube-public/local-registry-hosting created"):
        assert line in up.stderr, up.stderr

    # The kubeconfig works from here, through the forward: real kubectl.
    kc = yaml.safe_load(setup.kubeconfig.read_text())
    assert kc["current-context"] == f"kind-{setup.cluster}"
    assert kubectl(setup.kubeconfig, "get", "--raw", "/readyz") == "ok"
    cm = json.loads(kubectl(setup.kubeconfig, "get", "--raw",
                            "/api/v1/namespaces/kube-public/configmaps/local-registry-hosting"))
    assert cm["data"] == local_registry_hosting(reg)

    again = run_cli("up", *setup.selection(), "--workers", "1", "--detach", env=setup.env)
    assert again.returncode == 0, again.stderr
    assert f"cluster {setup.cluster}: exists, reused" in again.stderr
    assert "local-registry-hosting unchanged" in again.stderr and len(setup.calls("create cluster")) == 1

    down = run_cli("down", *setup.selection(), env=setup.env)
    assert down.returncode == 0, down.stderr
    assert f"cluster {setup.cluster}: deleted" in down.stderr and f"registry {reg.name}: removed" in down.stderr
    (delete,) = setup.calls("delete cluster")
    assert delete["deleted"] == sorted(create["nodes"])
    assert inspect(lab, reg.name) is None
    assert f"kind-{setup.cluster}" not in setup.kubeconfig.read_text()


def test_a_cluster_kci_tunneld_did_not_create_is_wired_but_never_deleted(lab: LabInfo, setup: Setup,
                                                                         tmp_path: Path) -> None:
    # Someone made this cluster with plain `kind create cluster` (no containerd patch).
    config = tmp_path / "plain.yaml"
    config.write_text(f"kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnetworking:\n"
                      f"  apiServerPort: {free_port()}\n")
    made = subprocess.run([str(tmp_path / "bin" / "kind"), "create", "cluster", "--name", setup.cluster,
                           "--config", str(config)], env=setup.env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    setup.api.nodes = (f"{setup.cluster}-control-plane",)
    up = run_cli("up", *setup.selection(), "--detach", env=setup.env)
    assert up.returncode == 0, up.stderr
    (setup.control.parent / "daemon.pid").write_text(str(Cli(setup.control.parent, setup.env).status()["pid"]))
    assert f"cluster {setup.cluster}: exists, reused" in up.stderr
    assert "does not set config_path" in up.stderr  # said plainly, not hidden; the cluster is left as it is
    assert len(setup.calls("create cluster")) == 1  # only the one we made by hand

    down = run_cli("down", *setup.selection(), env=setup.env)
    assert down.returncode == 0, down.stderr
    assert f"cluster {setup.cluster}: left alone, not created by kci-tunneld" in down.stderr
    assert inspect(lab, f"{setup.cluster}-control-plane") is not None and not setup.calls("delete cluster")
    assert f"registry {setup.registry.name}: removed" in down.stderr


def test_preflight_refuses_a_taken_api_port_and_a_squatted_node_name(lab: LabInfo, setup: Setup) -> None:
    taken = run_cli("up", *setup.selection(), "--api-port", str(lab.registry_port), env=setup.env)
    assert taken.returncode == 9, taken.stderr
    assert f"port {lab.registry_port} on the Docker host is taken by container {lab.registry_container}" in \
        taken.stderr
    squatter = f"{setup.cluster}-control-plane"
    docker("run", "-d", "--name", squatter, "--entrypoint", "/bin/sh", lab.socat_image, "-c", "sleep 300")
    refused = run_cli("up", *setup.selection(), env=setup.env)
    assert refused.returncode == 9 and f"a container named {squatter} exists" in refused.stderr
    assert not setup.calls("create cluster") and inspect(lab, setup.registry.name) is None
