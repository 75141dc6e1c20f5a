"""Follow mode (``--auto=all``): every port the lab's remote Docker publishes, forwarded here on the
same number as containers come and go; its selectors and conflicts; the library's view of it; and
Testcontainers (the real client, from PyPI) working against the remote Docker through it.

Each lab test selects its own containers by a label with a value of its own, so containers that
other tests run on the same dockerd are never forwarded here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import tunneld
from tests.cli.runner import Cli
from tests.docker.support import from_inspect
from tests.docker.test_aiodocker_seams import client_for
from tests.docker.test_discovery import forwards, inspect_doc, wait_for
from tests.docker.test_over_ssh import make_home
from tests.lab.lab import LabInfo, docker
from tunneld.config import AutoSettings, parse_config
from tunneld.docker.discovery import Container, select, selected
from tunneld.errors import ConfigError

LABEL = "kcilab.follow"

# ---------------------------------------------------------------- choosing (pure)


def one(doc: dict[str, Any]) -> Container:
    c = from_inspect(doc)
    assert c is not None
    return c


def web(name: str, ports: dict[str, list[dict[str, str]] | None], **kw: Any) -> Container:
    return one(inspect_doc(name, image=kw.pop("image", "nginx:1.27"), ports=ports, **kw))


ALL = AutoSettings(enabled=True, mode="all")


def test_follow_mode_forwards_every_published_tcp_port_once_per_host_port() -> None:
    c = web("shop-web-1", {
        "80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}, {"HostIp": "::", "HostPort": "8080"}],
        "443/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8443"}],
        "9000/tcp": [{"HostIp": "192.0.2.7", "HostPort": "9000"}],
        "53/udp": [{"HostIp": "0.0.0.0", "HostPort": "5353"}],  # TCP only
        "81/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8081"}, {"HostIp": "::1", "HostPort": "8082"}],
        "8000/tcp": None,  # exposed, not published
    })
    found = select([c], auto=ALL).found
    got = [(f.spec.name, f.spec.port, f.spec.host, f.spec.host_port, f.spec.probe, f.container) for f in found]
    assert got == [
        ("shop-web-1:8080", 8080, "127.0.0.1", 8080, "tcp", "shop-web-1"),
        ("shop-web-1:8081", 8081, "127.0.0.1", 8081, "tcp", "shop-web-1"),
        ("shop-web-1:8082", 8082, "::1", 8082, "tcp", "shop-web-1"),
        ("shop-web-1:8443", 8443, "127.0.0.1", 8443, "tcp", "shop-web-1"),
        ("shop-web-1:9000", 9000, "192.0.2.7", 9000, "tcp", "shop-web-1"),
    ]
    assert select([c]).found == []  # plain --auto: kind API servers and registries only


def test_follow_mode_keeps_the_kind_and_registry_rules_and_their_probes() -> None:
    registry = one(inspect_doc("reg", image="registry:2", ports={
        "5000/tcp": [{"HostIp": "127.0.0.1", "HostPort": "5001"}],
        "5001/tcp": [{"HostIp": "127.0.0.1", "HostPort": "5002"}],  # its debug port: a plain forward
    }))
    found = {f.spec.name: f for f in select([registry], auto=ALL).found}
    assert set(found) == {"reg", "reg:5002"}  # 5001 once, as the registry; no conflict with itself
    assert (found["reg"].spec.probe, found["reg"].spec.probe_path, found["reg"].what) == ("http", "/v2/", "registry")
    assert select([registry], auto=ALL).conflicts == []


def test_a_port_two_containers_publish_goes_to_one_and_the_other_is_reported() -> None:
    a = web("a", {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "7000"}]})
    b = web("b", {"80/tcp": [{"HostIp": "192.0.2.7", "HostPort": "7000"}]})
    selection = select([b, a], auto=ALL)
    assert [f.spec.name for f in selection.found] == ["a:7000"]
    assert [c.text() for c in selection.conflicts] == [
        "port 7000 of container b is not forwarded: it is already container a's"]
    # The holder keeps it: b, forwarded first, is not displaced by a.
    again = select([a, b], auto=ALL, holders={7000: "b"})
    assert [f.spec.name for f in again.found] == ["b:7000"] and again.conflicts[0].container == "a"
    # A port of the config's own forwards is never taken, and that is reported too.
    mine = select([a], auto=ALL, reserved={7000: "db"})
    assert mine.found == [] and mine.conflicts[0].holder == "the config's forward db"


@pytest.mark.parametrize(("auto", "chosen"), [
    (AutoSettings(), {"shop-web-1", "shop-db-1", "tc-redis", "other"}),
    (AutoSettings(containers=("shop-*",)), {"shop-web-1", "shop-db-1"}),
    (AutoSettings(images=("postgres:*", "redis:*")), {"shop-db-1", "tc-redis"}),
    (AutoSettings(projects=("shop",)), {"shop-web-1", "shop-db-1"}),
    (AutoSettings(labels=("org.testcontainers",)), {"tc-redis"}),
    (AutoSettings(labels=("tier=db",)), {"shop-db-1"}),
    (AutoSettings(labels=("tier",)), {"shop-web-1", "shop-db-1"}),
    (AutoSettings(projects=("shop",), exclude=("postgres:*",)), {"shop-web-1"}),
    (AutoSettings(exclude=("*-1",)), {"tc-redis", "other"}),
    (AutoSettings(projects=("shop",), images=("redis:*",)), set()),  # every kind given must match
])
def test_selectors(auto: AutoSettings, chosen: set[str]) -> None:
    pool = [
        web("shop-web-1", {}, labels={"com.docker.compose.project": "shop", "tier": "web"}),
        web("shop-db-1", {}, image="postgres:16", labels={"com.docker.compose.project": "shop", "tier": "db"}),
        web("tc-redis", {}, image="redis:7", labels={"org.testcontainers": "true"}),
        web("other", {}, image="busybox"),
    ]
    assert {c.name for c in pool if selected(c, auto)} == chosen


def test_follow_config_keys_and_their_errors() -> None:
    config = parse_config({"transport": {"via": "docker"}, "auto": {
        "enabled": True, "mode": "all", "images": ["redis:*"], "labels": ["tier=db", "ci"],
        "projects": ["shop"], "exclude": ["*-debug"]}})
    assert config.auto == AutoSettings(enabled=True, mode="all", images=("redis:*",), labels=("tier=db", "ci"),
                                       projects=("shop",), exclude=("*-debug",))
    with pytest.raises(ConfigError, match=r"^auto\.mode: expected one of kind, all, got 'every'"):
        parse_config({"auto": {"mode": "every"}})
    with pytest.raises(ConfigError, match=r"^auto\.labels: '=x' has no key; write KEY or KEY=VALUE"):
        parse_config({"auto": {"labels": ["=x"]}})
    with pytest.raises(ConfigError, match=r"^auto\.exclude: expected a list of strings"):
        parse_config({"auto": {"exclude": "x"}})


@pytest.mark.parametrize(("args", "message"), [
    (["--auto=every"], "argument --auto: invalid choice: 'every' (choose from 'kind', 'all')"),
    (["--via", "docker", "--auto=all", "--auto-label", "=v"], "--auto-label: expected KEY or KEY=VALUE, got '=v'"),
    (["--via", "docker", "--auto=all", "--auto-image", ""], "--auto-image: expected a name pattern, got ''"),
    (["--via", "docker", "--auto-project", "shop"], "--auto-*: selectors narrow --auto; add --auto (or --auto=all)"),
])
def test_follow_flags_are_checked_before_anything_starts(tmp_path: Path, args: list[str], message: str) -> None:
    result = Cli(tmp_path).run("start", *args, timeout=30)
    assert result.returncode in (2, 3) and message in result.stderr, result.stderr
    assert not (tmp_path / "control.sock").exists()


# ---------------------------------------------------------------- following real containers (lab)

def run_web(name: str, label: str, *ports: str, body: str | None = None, restart: bool = False) -> str:
    """A lab container serving HTTP on 8000 (``body`` at /id), publishing ``ports`` (docker run -p)."""
    docker("rm", "-f", name, check=False)
    script = f"mkdir -p /srv && echo {body or name} > /srv/id && cd /srv && exec python3 -m http.server 8000"
    publish = [a for p in ports for a in ("-p", p)]
    extra = ["--restart", "always"] if restart else []
    return docker("run", "-d", "--name", name, "-l", f"{LABEL}={label}", *extra, *publish,
                  "kcilab/python:latest", "sh", "-c", script).stdout.strip()


def published(name: str) -> dict[str, list[int]]:
    ports = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Ports}}", name).stdout) or {}
    return {k: sorted({int(b["HostPort"]) for b in v or []}) for k, v in ports.items()}


def served(port: int, host: str = "127.0.0.1") -> str:
    """What the lab container behind localhost:port says at /id ("" when nothing answers)."""
    result = subprocess.run(["curl", "-sS", "-m", "5", f"http://{host}:{port}/id"],
                            capture_output=True, text=True, timeout=15)
    return result.stdout.strip() if result.returncode == 0 else ""


def follow_config(path: Path, label: str, *, linger: float = 2, extra: str = "") -> Path:
    path.write_text(
        f'[transport]\nvia = "docker"\n\n[timeouts]\nprobe_interval = 0.5\nprobe = 3\nconnect = 5\n\n'
        f'[auto]\nenabled = true\nmode = "all"\ninterval = 2\nlinger = {linger}\nlabels = ["{LABEL}={label}"]\n{extra}'
    )
    return path


@pytest.fixture
def cli(tmp_path: Path, lab: LabInfo) -> Iterator[Cli]:
    c = Cli(tmp_path, env=lab.docker_env(tls=True))
    yield c
    c.run("stop", timeout=30)
    c.cleanup()


@pytest.fixture
def label() -> Iterator[str]:
    """A label value of this test's own; its containers are removed at the end."""
    value = uuid.uuid4().hex[:10]
    yield value
    ids = docker("ps", "-aq", "--filter", f"label={LABEL}={value}").stdout.split()
    if ids:
        docker("rm", "-f", *ids, check=False)


def ready_forward(cli: Cli, name: str, timeout: float = 15) -> dict[str, Any]:
    try:
        found: dict[str, Any] = wait_for(f"forward {name} ready", lambda: (f := forwards(cli).get(name))
                                         and f["state"] == "ready" and f, timeout)
    except AssertionError as e:
        status = cli.status()
        log = Path(status["log_file"]).read_text()[-3000:]
        raise AssertionError(f"{e}\nforwards: {forwards(cli)}\nauto: {status['auto']}\nlog:\n{log}") from None
    return found


@pytest.mark.timeout(60)
@pytest.mark.anyio
async def test_a_container_whose_image_tag_moved_is_listed_by_its_image_name(lab: LabInfo, label: str) -> None:
    """``docker ps`` shows such a container's image by id; the follower still reads the name (registry:2
    after a newer registry:2 was pulled must still be a registry)."""
    tag = f"kcilab/follow-moved:{label}"
    name = f"kcilab-follow-{label}-moved"
    await anyio.to_thread.run_sync(lambda: docker("tag", lab.python_image, tag))
    try:
        await anyio.to_thread.run_sync(lambda: docker("run", "-d", "--name", name, "-l", f"{LABEL}={label}", tag,
                                                      "sleep", "600"))
        await anyio.to_thread.run_sync(lambda: docker("tag", lab.busybox_image, tag))  # the tag moves on
        listed = docker("ps", "--filter", f"name={name}", "--format", "{{.Image}}").stdout.strip()
        assert listed != tag  # what the list says (an id)
        async with client_for(lab) as client:
            [mine] = [c for c in await client.running_containers() if c.name == name]
        assert mine.image == tag
    finally:
        await anyio.to_thread.run_sync(lambda: docker("rm", "-f", name, check=False))
        await anyio.to_thread.run_sync(lambda: docker("rmi", tag, check=False))


@pytest.mark.timeout(120)
def test_every_published_port_is_forwarded_on_its_number_and_follows_the_container(
        cli: Cli, tmp_path: Path, label: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[auto]\nlinger = 2\n")  # the rest from the command line
    result = cli.start_detached("--config", str(config), "--auto=all", "--auto-label", f"{LABEL}={label}",
                                "--via", "docker")
    assert result.returncode == 0, result.stderr
    assert forwards(cli) == {}

    name = f"kcilab-follow-{label}"
    run_web(name, label, "127.0.0.1::8000", "8000")  # a random port on loopback, and one on every address
    # `-p 8000` binds 0.0.0.0 and ::, on one port or (when Docker picked two) each on its own; [::]
    # alone is IPv6 only there, so it is dialled on ::1.
    bindings = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Ports}}", name).stdout)["8000/tcp"]
    targets: dict[int, str] = {}
    for b in sorted(bindings, key=lambda b: b["HostIp"] == "::"):
        targets.setdefault(int(b["HostPort"]), "[::1]" if b["HostIp"] == "::" else "127.0.0.1")
    ports = sorted(targets)
    assert len(ports) in (2, 3)
    for port in ports:
        fwd = ready_forward(cli, f"{name}:{port}")
        assert (fwd["port"], fwd["target"], fwd["source"], fwd["container"]) == (
            port, f"{targets[port]}:{port}", "auto", name)
        assert sorted(fwd["listen"]) == sorted([f"127.0.0.1:{port}", f"[::1]:{port}"])
        # The forward is ready once the remote port accepts; the server inside takes a moment more.
        assert wait_for("served through the forward", lambda p=port: served(p) == name, 10)
        assert served(port, "[::1]") == name
    status = cli.status()
    assert status["auto"]["mode"] == "all" and status["auto"]["selectors"]["labels"] == [f"{LABEL}={label}"]
    assert "auto (follow mode: every published port)" in cli.run("status").stdout

    docker("rm", "-f", name)  # gone: kept for the linger (2 s), then unbound
    wait_for("forwards removed after the linger", lambda: not forwards(cli), 15)
    for port in ports:
        assert served(port) == ""


@pytest.mark.timeout(120)
def test_follow_mode_over_ssh_with_an_ssh_docker_host(tmp_path: Path, lab: LabInfo, label: str) -> None:
    """DOCKER_HOST=ssh:// for the events and inspects, the SSH transport for the bytes."""
    cli = Cli(tmp_path, env={"DOCKER_HOST": f"ssh://{lab.ssh_alias}", "HOME": str(make_home(tmp_path, lab))})
    for var in ("DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_TLS", "DOCKER_CERT_PATH", "DOCKER_CONFIG"):
        cli.env.pop(var, None)
    try:
        config = follow_config(tmp_path / "c.toml", label).read_text().replace('via = "docker"',
                                                                               f'via = "ssh://{lab.ssh_alias}"')
        (tmp_path / "c.toml").write_text(config)
        result = cli.start_detached("--config", str(tmp_path / "c.toml"))
        assert result.returncode == 0, result.stderr
        status = cli.status()
        assert status["transport"]["kind"] == "ssh" and status["auto"]["docker_host"].startswith("ssh://")
        name = f"kcilab-follow-{label}"
        run_web(name, label, "127.0.0.1::8000")
        port = published(name)["8000/tcp"][0]
        assert ready_forward(cli, f"{name}:{port}")["target"] == f"127.0.0.1:{port}"
        assert wait_for("served over ssh", lambda: served(port) == name, 10)
    finally:
        cli.run("stop", timeout=30)
        cli.cleanup()


@pytest.mark.timeout(120)
def test_a_port_reused_by_a_new_container_reaches_the_new_one_at_once(cli: Cli, tmp_path: Path, label: str) -> None:
    # A long linger: the old container's forward must give way because the port moved, not because it expired.
    assert cli.start_detached("--config", str(follow_config(tmp_path / "c.toml", label, linger=60))).returncode == 0
    first, second = f"kcilab-follow-{label}-a", f"kcilab-follow-{label}-b"
    run_web(first, label, "127.0.0.1::8000")
    port = published(first)["8000/tcp"][0]
    ready_forward(cli, f"{first}:{port}")
    assert wait_for("the first container answers", lambda: served(port) == first, 10)
    docker("rm", "-f", first)
    run_web(second, label, f"127.0.0.1:{port}:8000")
    fwd = ready_forward(cli, f"{second}:{port}")
    assert fwd["container"] == second and f"{first}:{port}" not in forwards(cli)
    assert wait_for("the new container answers on the same port", lambda: served(port) == second, 10)


@pytest.mark.timeout(120)
def test_a_port_taken_here_is_reported_with_its_container_and_the_others_go_on(
        cli: Cli, tmp_path: Path, label: str) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    taken = holder.getsockname()[1]
    try:
        name = f"kcilab-follow-{label}"
        run_web(name, label, f"127.0.0.1:{taken}:8000", "127.0.0.1::8000")
        other = next(p for p in published(name)["8000/tcp"] if p != taken)
        result = cli.start_detached("--config", str(follow_config(tmp_path / "c.toml", label)), "--ready-timeout", "5")
        assert result.returncode == 4 and f"{name}:{taken}" in result.stderr  # not ready, and says which
        fwd = forwards(cli)[f"{name}:{taken}"]
        assert fwd["state"] == "failed" and "address already in use" in fwd["last_error"]
        assert fwd["container"] == name
        assert ready_forward(cli, f"{name}:{other}"), forwards(cli)  # the others go on
        assert wait_for("served on the other port", lambda: served(other) == name, 10)
        log = Path(cli.status()["log_file"]).read_text()
        assert f"[forward={name}:{taken}]" in log and "address already in use" in log
    finally:
        holder.close()
    ready_forward(cli, f"{name}:{taken}")  # bound once the port is free
    assert served(taken) == name


@pytest.mark.timeout(120)
@pytest.mark.anyio
async def test_the_library_reports_forwards_as_they_appear_and_go(lab: LabInfo, label: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in lab.docker_env(tls=True).items():
        monkeypatch.setenv(key, value)
    auto = tunneld.AutoSettings(enabled=True, mode="all", linger=0.5, labels=(f"{LABEL}={label}",))
    config = tunneld.build_config(via="docker", auto=auto)
    name = f"kcilab-follow-{label}"
    with anyio.fail_after(90):
        async with tunneld.open_forwards(config) as fset:
            assert len(fset) == 0
            events = fset.follow()
            await anyio.to_thread.run_sync(run_web, name, label, "127.0.0.1::8000")
            port = (await anyio.to_thread.run_sync(published, name))["8000/tcp"][0]
            added = await events.__anext__()
            assert (added.kind, added.name, added.port, added.container) == ("added", f"{name}:{port}", port, name)
            assert added.handle is not None and fset[added.name] is added.handle
            await added.handle.wait_ready(30)
            with anyio.fail_after(10):
                while await anyio.to_thread.run_sync(served, port) != name:
                    await anyio.sleep(0.1)
            await anyio.to_thread.run_sync(lambda: docker("rm", "-f", name))
            removed = await events.__anext__()
            assert (removed.kind, removed.name, removed.handle) == ("removed", f"{name}:{port}", None)
            assert len(fset) == 0
            # A second reader starts from the beginning.
            assert [e.kind async for e in _first(fset.follow(), 2)] == ["added", "removed"]


async def _first(events: Any, n: int) -> Any:
    for _ in range(n):
        yield await events.__anext__()


# ---------------------------------------------------------------- Testcontainers, the real client

# Run in its own process: testcontainers reads its settings from the environment when imported.
TESTCONTAINERS_SCRIPT = textwrap.dedent("""
    import sys, urllib.request
    from testcontainers.core.container import DockerContainer

    with (DockerContainer("kcilab/python:latest")
          .with_command(["sh", "-c", "mkdir -p /srv && echo tc > /srv/id && cd /srv && python3 -m http.server 8000"])
          .with_kwargs(labels={"LABEL_KEY": sys.argv[1]})
          .with_exposed_ports(8000)) as web:
        url = "http://{}:{}/id".format(web.get_container_host_ip(), web.get_exposed_port(8000))
        print("url", url, flush=True)
        last = None
        for _ in range(100):  # the server inside needs a moment, as with any container
            try:
                print("body", urllib.request.urlopen(url, timeout=2).read().decode().strip(), flush=True)
                break
            except OSError as e:
                last = e
                import time; time.sleep(0.1)
        else:
            print("failed", last, flush=True)
            sys.exit(1)
""").replace("LABEL_KEY", LABEL)


def run_testcontainers(lab: LabInfo, label: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "tc_test.py"
    script.write_text(TESTCONTAINERS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "TESTCONTAINERS_"))}
    for bundle in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):  # requests (under docker-py) would verify
        env.pop(bundle, None)  # dockerd's certificate against it instead of DOCKER_CERT_PATH's ca.pem
    env.update(lab.docker_env(tls=True))
    # Inside a container (as CI jobs and this machine are) testcontainers-python dials the bridge
    # gateway unless told the Docker host's address is the one to use; the override makes that here.
    env.update(TESTCONTAINERS_HOST_OVERRIDE="localhost", TESTCONTAINERS_CONNECTION_MODE="docker_host",
               TESTCONTAINERS_RYUK_DISABLED="true")
    return subprocess.run([sys.executable, str(script), label], capture_output=True, text=True, env=env,
                          timeout=90)


@pytest.mark.timeout(180)
def test_testcontainers_works_on_the_remote_docker_in_follow_mode_and_not_without(
        cli: Cli, tmp_path: Path, lab: LabInfo, label: str) -> None:
    without = run_testcontainers(lab, label, tmp_path)
    assert without.returncode == 1 and "url http://localhost:" in without.stdout
    assert "failed" in without.stdout and "Connection refused" in without.stdout, without.stdout + without.stderr

    assert cli.start_detached("--config", str(follow_config(tmp_path / "c.toml", label))).returncode == 0
    started = time.monotonic()
    with_daemon = run_testcontainers(lab, label, tmp_path)
    assert with_daemon.returncode == 0, with_daemon.stdout + with_daemon.stderr
    assert "body tc" in with_daemon.stdout
    print(f"testcontainers run through follow mode: {time.monotonic() - started:.1f}s")
