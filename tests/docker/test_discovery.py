"""--auto: what is chosen from `docker inspect` documents, and following real containers in the lab.

The kind API server in the lab is a STAND-IN (tests/standins/apiserver.py): a container with kind's
labels and publishing, relaying to the stand-in API server (TLS requiring client certificates,
/readyz); no Kubernetes behind it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli.runner import Cli
from tests.docker.support import from_inspect
from tests.lab.lab import LabInfo, docker
from tests.servers import free_local_port
from tests.standins import apiserver
from tests.standins.apiserver import StandinApiServer
from tunneld.config import AutoSettings, parse_config
from tunneld.docker.discovery import Container, binding, is_registry_image, select
from tunneld.errors import ConfigError

AUTO_REGISTRY = "kcilab-auto-registry"


def inspect_doc(name: str, *, image: str = "registry:2", labels: dict[str, str] | None = None,
                ports: dict[str, list[dict[str, str]] | None] | None = None, running: bool = True) -> dict[str, Any]:
    """The parts of a `GET /containers/{id}/json` document discovery reads, spelled as the Engine does."""
    return {"Id": "0123456789abcdef", "Name": f"/{name}", "State": {"Running": running},
            "Config": {"Image": image, "Labels": labels or {}}, "NetworkSettings": {"Ports": ports or {}}}


def kind_node(cluster: str, role: str, ports: dict[str, list[dict[str, str]] | None] | None = None) -> dict[str, Any]:
    return inspect_doc(f"{cluster}-{role}", image="kindest/node:v1.31.0",
                       labels={"io.x-k8s.kind.cluster": cluster, "io.x-k8s.kind.role": role}, ports=ports)


def containers(*docs: dict[str, Any]) -> list[Container]:
    return [c for c in (from_inspect(d) for d in docs) if c is not None]


# ---------------------------------------------------------------- choosing (pure)


def test_kind_control_plane_is_forwarded_on_the_port_it_publishes() -> None:
    found = select(containers(
        kind_node("dev", "control-plane", {"6443/tcp": [{"HostIp": "127.0.0.1", "HostPort": "41234"}]}),
        kind_node("dev", "worker"),
    )).found
    assert len(found) == 1
    spec = found[0].spec
    assert (spec.name, spec.bind, spec.port, spec.host, spec.host_port) == ("kind-dev", "localhost", 41234,
                                                                            "127.0.0.1", 41234)
    assert (spec.probe, spec.probe_path, found[0].container) == ("https", "/readyz", "dev-control-plane")


def test_external_load_balancer_wins_over_control_planes() -> None:
    found = select(containers(
        kind_node("ha", "control-plane", {"6443/tcp": None}),
        kind_node("ha", "external-load-balancer", {"6443/tcp": [{"HostIp": "127.0.0.1", "HostPort": "40001"}]}),
    )).found
    assert [(f.spec.name, f.spec.port, f.container) for f in found] == [("kind-ha", 40001, "ha-external-load-balancer")]


@pytest.mark.parametrize(("bindings", "expected"), [
    ([{"HostIp": "127.0.0.1", "HostPort": "40000"}], ("127.0.0.1", 40000)),
    ([{"HostIp": "::1", "HostPort": "40000"}], ("::1", 40000)),
    ([{"HostIp": "0.0.0.0", "HostPort": "40000"}, {"HostIp": "::", "HostPort": "40000"}], ("127.0.0.1", 40000)),
    ([{"HostIp": "", "HostPort": "40000"}], ("127.0.0.1", 40000)),
    # [::] alone is IPv6 only where Docker's proxy listens (seen on the lab: 127.0.0.1 refused, ::1 served).
    ([{"HostIp": "::", "HostPort": "40000"}], ("::1", 40000)),
    ([{"HostIp": "::1", "HostPort": "40001"}, {"HostIp": "127.0.0.1", "HostPort": "40000"}], ("127.0.0.1", 40000)),
    ([{"HostIp": "192.0.2.10", "HostPort": "40000"}], ("192.0.2.10", 40000)),
    ([{"HostIp": "127.0.0.1", "HostPort": ""}], None),
    ([{"HostIp": "127.0.0.1", "HostPort": "not-a-port"}], None),
    ([{"HostIp": "127.0.0.1", "HostPort": "0"}], None),
    (None, None),
])
def test_binding_reads_hostip_and_the_string_hostport(bindings: list[dict[str, str]] | None,
                                                       expected: tuple[str, int] | None) -> None:
    c = from_inspect(inspect_doc("x", ports={"6443/tcp": bindings}))
    assert c is not None and binding(c, "6443/tcp") == expected


def test_registries_by_image_or_ctlptl_label_publishing_5000() -> None:
    found = select(containers(
        inspect_doc("kind-registry", image="registry:2",
                    ports={"5000/tcp": [{"HostIp": "127.0.0.1", "HostPort": "5001"}]}),
        inspect_doc("ctlptl-registry", image="ghcr.io/acme/mirror:1",
                    labels={"dev.tilt.ctlptl.role": "registry"},
                    ports={"5000/tcp": [{"HostIp": "0.0.0.0", "HostPort": "5002"}]}),
        inspect_doc("not-published", image="registry:2", ports={"5000/tcp": None}),
        inspect_doc("other-port", image="registry:2", ports={"8080/tcp": [{"HostIp": "", "HostPort": "8080"}]}),
        inspect_doc("lookalike", image="myregistry:1", ports={"5000/tcp": [{"HostIp": "", "HostPort": "5003"}]}),
        inspect_doc("stopped", image="registry:2", ports={"5000/tcp": [{"HostIp": "", "HostPort": "5004"}]},
                    running=False),
    )).found
    got = {(f.spec.name, f.spec.port, f.spec.host, f.spec.probe, f.spec.probe_path) for f in found}
    assert got == {("kind-registry", 5001, "127.0.0.1", "http", "/v2/"),
                   ("ctlptl-registry", 5002, "127.0.0.1", "http", "/v2/")}


@pytest.mark.parametrize(("image", "is_registry"), [
    ("registry:2", True), ("registry", True), ("docker.io/library/registry:2.8", True),
    ("registry:2@sha256:" + "0" * 64, True), ("library/registry:latest", True),
    ("myregistry:2", False), ("ghcr.io/x/registry:2", False), ("registry.example.com/app:1", False),
])
def test_registry_images(image: str, is_registry: bool) -> None:
    assert is_registry_image(image) is is_registry


def test_config_ports_and_repeated_ports_are_skipped_and_patterns_filter() -> None:
    docs = containers(
        inspect_doc("a-reg", ports={"5000/tcp": [{"HostIp": "127.0.0.1", "HostPort": "5005"}]}),
        inspect_doc("b-reg", ports={"5000/tcp": [{"HostIp": "::1", "HostPort": "5005"}]}),
        inspect_doc("c-reg", ports={"5000/tcp": [{"HostIp": "127.0.0.1", "HostPort": "5006"}]}),
    )
    chosen = select(docs)
    assert [f.spec.name for f in chosen.found] == ["a-reg", "c-reg"]  # b-reg wants 5005 too: reported
    assert [(c.container, c.port, c.holder) for c in chosen.conflicts] == [("b-reg", 5005, "container a-reg")]
    mine = select(docs, reserved={5005: "mine"})  # a port of the config's own forward "mine"
    assert [f.spec.name for f in mine.found] == ["c-reg"]
    conflicts = mine.conflicts
    assert conflicts[0].text() == ("port 5005 of container a-reg is not forwarded: "
                                                "it is already the config's forward mine's")
    patterns = AutoSettings(containers=("b-*", "c-*"))
    assert [f.spec.name for f in select(docs, auto=patterns).found] == ["b-reg", "c-reg"]
    assert [f.spec.bind for f in select(docs, bind="127.0.0.1").found] == ["127.0.0.1", "127.0.0.1"]
    # The container forwarded on a port now keeps it against a newcomer that sorts first.
    assert [f.container for f in select(docs, holders={5005: "b-reg"}).found] == ["b-reg", "c-reg"]


def test_auto_and_metrics_config_keys() -> None:
    config = parse_config({"auto": {"enabled": True, "interval": 1, "linger": 5, "containers": ["kind-*"]},
                           "metrics": {"port": 9464}})
    assert config.auto == AutoSettings(enabled=True, interval=1.0, linger=5.0, containers=("kind-*",))
    assert (config.metrics.port, config.metrics.bind) == (9464, "127.0.0.1")
    with pytest.raises(ConfigError, match=r"^auto\.interval: expected a number of seconds > 0, got 'x'"):
        parse_config({"auto": {"interval": "x"}})
    with pytest.raises(ConfigError, match=r"^auto\.bind: '0\.0\.0\.0' is not a loopback address"):
        parse_config({"auto": {"enabled": True, "bind": "0.0.0.0"}})
    with pytest.raises(ConfigError, match=r"^metrics\.port: expected an integer 0\.\.65535"):
        parse_config({"metrics": {"port": 70000}})
    with pytest.raises(ConfigError, match=r"^auto\.extra: unknown key"):
        parse_config({"auto": {"extra": 1}})


def test_cli_needs_a_forward_or_auto(tmp_path: Path) -> None:
    result = Cli(tmp_path).run("start", timeout=30)
    assert result.returncode == 3 and "nothing to forward: give -L [BIND:]PORT:HOST:HOSTPORT, --auto" in result.stderr


# ---------------------------------------------------------------- following real containers (lab)


def lab_registry(name: str = AUTO_REGISTRY, host_ip: str = "127.0.0.1") -> int:
    """A registry container of our own (port 5000 belongs to the lab's), published on a port free here."""
    docker("rm", "-f", name, check=False)
    port = free_local_port()
    docker("run", "-d", "--name", name, "--restart", "always", "-p", f"{host_ip}:{port}:5000", "registry:2")
    return apiserver.published_port(name, "5000/tcp")


def auto_config(path: Path, *, patterns: list[str], extra: str = "") -> Path:
    quoted = ", ".join(json.dumps(p) for p in patterns)
    path.write_text(
        f"[transport]\nvia = \"docker\"\n\n[timeouts]\nprobe_interval = 0.5\nprobe = 3\nconnect = 5\n\n"
        f"[auto]\nenabled = true\ninterval = 0.5\nlinger = 2\ncontainers = [{quoted}]\n{extra}"
    )
    return path


def wait_for(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout:g}s")


def forwards(cli: Cli) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in cli.status()["forwards"]}


def curl(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", *extra, url],
                          capture_output=True, text=True, timeout=15)


@pytest.fixture
def cli(tmp_path: Path, lab: LabInfo) -> Iterator[Cli]:
    c = Cli(tmp_path, env={**lab.docker_env(tls=True), "KUBECONFIG": str(tmp_path / "kubeconfig")})
    yield c
    c.run("stop", timeout=30)
    c.cleanup()


@pytest.fixture(scope="module")
def api(lab: LabInfo) -> Iterator[StandinApiServer]:
    """The stand-in API server where the lab's containers reach it."""
    with StandinApiServer(lab.host_ip) as server:
        yield server


@pytest.mark.timeout(120)
def test_auto_follows_registries_that_appear_move_and_go(cli: Cli, tmp_path: Path) -> None:
    name = AUTO_REGISTRY + "-follow"
    docker("rm", "-f", name, check=False)
    try:
        result = cli.start_detached("--config", str(auto_config(tmp_path / "c.toml", patterns=[name])))
        assert result.returncode == 0, result.stderr
        assert "--auto found nothing to forward yet" in result.stdout
        assert cli.status()["auto"]["scans"] >= 1 and forwards(cli) == {}

        port = lab_registry(name)  # appears
        fwd = wait_for("forward appears and is ready", lambda: (f := forwards(cli).get(name)) and
                       f["state"] == "ready" and f, 15)
        assert fwd["port"] == port and fwd["target"] == f"127.0.0.1:{port}" and fwd["source"] == "auto"
        assert sorted(fwd["listen"]) == sorted([f"127.0.0.1:{port}", f"[::1]:{port}"])
        assert curl(f"http://localhost:{port}/v2/").stdout == "200"

        docker("rm", "-f", name)  # goes: kept for `linger`, then unbound
        wait_for("forward removed after linger", lambda: name not in forwards(cli), 15)
        assert curl(f"http://127.0.0.1:{port}/v2/").stdout == "000"  # nothing listens here any more

        new_port = lab_registry(name, host_ip="0.0.0.0")  # comes back, on another port and every address
        assert new_port != port
        fwd = wait_for("forward on the new port", lambda: (f := forwards(cli).get(name)) and
                       f["port"] == new_port and f["state"] == "ready" and f, 15)
        assert curl(f"http://localhost:{new_port}/v2/").stdout == "200"
        status = cli.run("status")
        assert f"{name} (auto)" in status.stdout and "ready" in status.stdout
    finally:
        docker("rm", "-f", name, check=False)


@pytest.mark.timeout(120)
def test_kind_standin_is_forwarded_on_its_port_and_kubeconfig_works_unchanged(
        cli: Cli, tmp_path: Path, api: StandinApiServer) -> None:
    name = "kcilab-kind-auto-control-plane"
    try:
        port = apiserver.run_control_plane(api, name=name, cluster="auto")
        kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubeconfig", port, api.certs, cluster="auto")
        result = cli.start_detached("--config", str(auto_config(tmp_path / "c.toml", patterns=[name])))
        assert result.returncode == 0, result.stderr
        assert f"kind-auto: 127.0.0.1:{port}, [::1]:{port} -> 127.0.0.1:{port} (found: {name})" in result.stdout
        fwd = forwards(cli)["kind-auto"]
        assert fwd["probe"] == "https" and fwd["last_probe"]["ok"]
        assert "GET /readyz HTTP 200" in fwd["last_probe"]["detail"] and str(kubeconfig) in fwd["last_probe"]["detail"]
        # kind's kubeconfig (server https://127.0.0.1:PORT) works as written.
        kubectl = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), "get", "--raw", "/readyz"],
                                 capture_output=True, text=True, timeout=30)
        assert (kubectl.returncode, kubectl.stdout.strip()) == (0, "ok"), kubectl.stderr
    finally:
        apiserver.remove(name)


@pytest.mark.timeout(60)
def test_a_discovered_port_taken_here_is_failed_and_retried(cli: Cli, tmp_path: Path) -> None:
    name = AUTO_REGISTRY + "-busy"
    try:
        port = lab_registry(name)
        holder = socket.socket()
        holder.bind(("127.0.0.1", port))
        holder.listen(1)
        try:
            assert cli.start_detached("--config", str(auto_config(tmp_path / "c.toml", patterns=[name])),
                                      "--ready-timeout", "3").returncode == 4  # not ready: the port is taken
            fwd = forwards(cli)[name]
            assert fwd["state"] == "failed" and "address already in use" in fwd["last_error"]
        finally:
            holder.close()
        wait_for("bound once the port is free", lambda: forwards(cli)[name]["state"] == "ready", 15)
    finally:
        docker("rm", "-f", name, check=False)


@pytest.mark.timeout(90)
def test_reload_keeps_discovered_forwards_and_their_connections(cli: Cli, tmp_path: Path, lab: LabInfo) -> None:
    name = AUTO_REGISTRY + "-reload"
    config = tmp_path / "c.toml"
    static = ('[[forwards]]\nname = "static"\nbind = "127.0.0.1"\nport = 0\nhost = "127.0.0.1"\n'
              "host_port = {port}\n")
    try:
        port = lab_registry(name)
        auto_config(config, patterns=[name], extra=static.format(port=lab.echo_port))
        assert cli.start_detached("--config", str(config)).returncode == 0
        assert set(forwards(cli)) == {name, "static"}
        with socket.create_connection(("127.0.0.1", port), timeout=10) as held:  # open across the reload
            held.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while not first.endswith(b"{}"):  # /v2/ answers 200 with the body {}
                first += held.recv(65536)
            assert first.startswith(b"HTTP/1.1 200")
            auto_config(config, patterns=[name], extra=static.replace('name = "static"', 'name = "renamed"')
                        .format(port=lab.echo_port))
            assert cli.run("reload").returncode == 0
            fwds = forwards(cli)
            assert set(fwds) == {name, "renamed"} and fwds[name]["port"] == port
            assert fwds[name]["active"] == 1  # the discovered forward was not restarted
            held.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert b"HTTP/1.1 200" in held.recv(65536)
    finally:
        docker("rm", "-f", name, check=False)
