"""Pure parts of provisioning: the kind config, hosts.toml, the KEP-1755 data, parsing, the generated
daemon config, and the stand-in kind's own strictness (kubeconfig merging: tests/test_kubeconfig.py).
No lab needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]

from provision.cli import daemon_config
from provision.errors import PreflightError, ProvisionError
from provision.kind import check_containerd_config, hosts_paths, hosts_toml, kind_config, parse_version
from provision.registry import local_registry_hosting, normalize_image
from provision.remote import parse_listening
from provision.spec import ClusterSpec, ProvisionSpec, RegistrySpec, spec_from_json, spec_to_json
from tests.standins import kind as standin_kind
from tunneld.config import load_config
from tunneld.errors import ConfigError

pytestmark = pytest.mark.timeout(30)

REG = RegistrySpec(name="kind-registry", port=5555)


def test_kind_config_sets_the_remote_api_port_and_config_path_never_mirrors() -> None:
    text = kind_config(41234, workers=2)
    cfg = standin_kind.decode_config(text)  # as strict as kind: unknown fields would fail here
    assert cfg["networking"] == {"apiServerAddress": "127.0.0.1", "apiServerPort": 41234}
    assert [n["role"] for n in cfg["nodes"]] == ["control-plane", "worker", "worker"]
    (patch,) = cfg["containerdConfigPatches"]
    assert patch == '[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"'
    assert "mirrors" not in text
    check_containerd_config(standin_kind.containerd_config(cfg), "node")  # what a node ends up with passes


def test_hosts_toml_points_both_names_at_the_registry_over_the_kind_network() -> None:
    assert hosts_paths(REG) == ["/etc/containerd/certs.d/localhost:5555/hosts.toml",
                                "/etc/containerd/certs.d/kind-registry:5000/hosts.toml"]
    lines = [line for line in hosts_toml(REG).splitlines() if not line.startswith("#")]
    assert lines == ['server = "http://kind-registry:5000"']


def test_containerd_check_names_what_is_wrong() -> None:
    with pytest.raises(ProvisionError, match="does not set config_path"):
        check_containerd_config("version = 2\n", "n1")
    both = 'config_path = "/etc/containerd/certs.d"\n[plugins."io.containerd.grpc.v1.cri".registry.mirrors]\n'
    with pytest.raises(ProvisionError, match=r"registry\.mirrors"):
        check_containerd_config(both, "n1")


def test_local_registry_hosting_is_kep_1755() -> None:
    data = local_registry_hosting(REG)
    assert list(data) == ["localRegistryHosting.v1"]
    assert yaml.safe_load(data["localRegistryHosting.v1"]) == {
        "host": "localhost:5555", "hostFromContainerRuntime": "kind-registry:5000",
        "hostFromClusterNetwork": "kind-registry:5000", "help": "https://kind.sigs.k8s.io/docs/user/local-registry/",
    }


@pytest.mark.parametrize(("text", "version"), [
    ("kind v0.20.0 go1.20.4 linux/amd64", (0, 20, 0)),
    ("kind v0.27.0 go1.23.6 linux/arm64", (0, 27, 0)),
    ("kind v0.23.0-alpha+4c3f0b2 go1.22 linux/amd64", (0, 23, 0)),
])
def test_kind_version(text: str, version: tuple[int, int, int]) -> None:
    assert parse_version(text) == version


def test_kind_version_garbage() -> None:
    with pytest.raises(ProvisionError, match="cannot read a version"):
        parse_version("kind: command not understood")


def test_listening_ports_from_proc_net_tcp() -> None:
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:15B3 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1\n"
        "   1: 0100007F:D2F2 0100007F:15B3 01 00000000:00000000 00:00000000 00000000     0        0 2\n"
        "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 0 0 0 0 0\n"
    )
    assert parse_listening(text) == {5555, 8080}  # the ESTABLISHED one is not a listener


@pytest.mark.parametrize(("a", "b"), [("registry:2", "docker.io/library/registry:2"),
                                      ("library/registry:2", "registry:2"), ("alpine", "alpine:latest")])
def test_image_names_that_are_one_image(a: str, b: str) -> None:
    assert normalize_image(a) == normalize_image(b)


def test_spec_round_trips_through_json() -> None:
    spec = ProvisionSpec(registry=REG, cluster=ClusterSpec(name="ci", api_port=40000, workers=1))
    assert spec_from_json(spec_to_json(spec)) == spec
    with pytest.raises(ConfigError, match="not a provisioning spec"):
        spec_from_json('{"registry": {}}', source="x.json")


def test_generated_daemon_config_parses_back(tmp_path: Path) -> None:
    spec = ProvisionSpec(registry=REG, cluster=ClusterSpec(name="ci", api_port=40000))
    base = {"transport": {"via": "docker", "docker": {"pool_size": 2}}, "timeouts": {"ready": 30.0}}
    config, text = daemon_config(base, spec)
    path = tmp_path / "c.toml"
    path.write_text(text)
    loaded = load_config(path)
    assert loaded == config and loaded.fingerprint() == config.fingerprint()
    reg, api = loaded.forwards
    assert (reg.name, reg.port, reg.host_port, reg.probe, reg.probe_path) == ("registry", 5555, 5555, "http", "/v2/")
    assert (api.name, api.port, api.host_port, api.probe, api.bind) == ("kube-apiserver", 40000, 40000, "https",
                                                                       "localhost")
    assert loaded.transport.docker.pool_size == 2 and loaded.timeouts.ready == 30.0


def test_preflight_error_lists_every_problem() -> None:
    one = PreflightError(["port 5000 is taken"])
    assert str(one) == "pre-flight: port 5000 is taken (nothing was created)"
    two = PreflightError(["a", "b"])
    assert "2 problems" in str(two) and "\n  - a\n  - b" in str(two)


# The stand-in must refuse what the real thing refuses, or the tests that use it prove nothing.

def test_standin_kind_rejects_unknown_fields_like_kind() -> None:
    with pytest.raises(standin_kind.KindError, match=r'unknown field "networking\.apiServerPorts"'):
        standin_kind.decode_config("kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\n"
                                   "networking:\n  apiServerPorts: 1\n")


def test_standin_node_containerd_refuses_mirrors_with_config_path() -> None:
    cfg = standin_kind.decode_config(
        "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\ncontainerdConfigPatches:\n- |-\n"
        '  [plugins."io.containerd.grpc.v1.cri".registry]\n    config_path = "/etc/containerd/certs.d"\n'
        '- |-\n  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."localhost:5000"]\n'
        '    endpoint = ["http://kind-registry:5000"]\n')
    with pytest.raises(standin_kind.KindError, match="`mirrors` cannot be set when `config_path` is provided"):
        standin_kind.containerd_config(cfg)
