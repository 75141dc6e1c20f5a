"""The Docker API over SSH (``DOCKER_HOST=ssh://...``) against the lab's real sshd and dockerd.

As for the docker CLI, every HTTP connection is a ``docker system dial-stdio`` run on the server (the
lab's sshd sets DOCKER_HOST for sessions, so it finds the lab's dockerd); the SSH settings come from
the URL plus ~/.ssh/config, so each test points HOME at a directory whose .ssh/config is a copy of
the lab's (alias ``kcilab``, absolute IdentityFile and UserKnownHostsFile). Helper containers get
names no other test uses and are removed over the lab's unix socket afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from tests.cli.runner import Cli
from tests.helpers import echo_roundtrip, parallel_echoes, running_forward
from tests.lab.lab import LabInfo
from tunneld.config import DockerSettings, Timeouts, TransportSpec
from tunneld.docker.api import DockerClient
from tunneld.docker.host import resolve_endpoint
from tunneld.docker.transport import DockerTransport
from tunneld.errors import ExitCode, TransportError

pytestmark = [pytest.mark.timeout(120)]

TIMEOUTS = Timeouts(connect=10.0, probe=5.0, probe_interval=0.5, ready=30.0, drain=2.0)
_DOCKER_VARS = ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_TLS", "DOCKER_CERT_PATH")


def make_home(tmp_path: Path, lab: LabInfo, *, known_hosts: Path | None = None) -> Path:
    """A HOME whose ~/.ssh/config is the lab's, optionally with another UserKnownHostsFile."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    config = lab.ssh_config.read_text()
    if known_hosts is not None:
        config = re.sub(r"(?m)^(\s*UserKnownHostsFile\s+).*$", lambda m: f"{m[1]}{known_hosts}", config)
        assert str(known_hosts) in config
    (home / ".ssh" / "config").write_text(config)
    return home


@pytest.fixture
def ssh_home(tmp_path: Path, lab: LabInfo, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME (and so ~/.ssh/config and ~/.docker) for this process, no DOCKER_* from the outside."""
    home = make_home(tmp_path, lab)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    for var in _DOCKER_VARS:
        monkeypatch.delenv(var, raising=False)
    return home


def bridge_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("kci-tunneld-docker-*")}


async def remove_helper(lab: LabInfo, name: str) -> None:
    async with DockerClient(resolve_endpoint(DockerSettings(host=lab.docker_host_unix), {}), timeout=10) as client:
        await client.remove_container(name)


@asynccontextmanager
async def docker_transport(lab: LabInfo, s: DockerSettings) -> AsyncIterator[DockerTransport]:
    try:
        async with DockerTransport(TransportSpec(kind="docker", docker=s), TIMEOUTS) as transport:
            yield transport
    finally:
        with anyio.CancelScope(shield=True):
            await remove_helper(lab, s.helper_name)


def _context(home: Path, name: str, host: str) -> None:
    config_dir = home / ".docker"
    meta = config_dir / "contexts" / "meta" / hashlib.sha256(name.encode()).hexdigest()
    meta.mkdir(parents=True)
    (meta / "meta.json").write_text(json.dumps({"Name": name, "Endpoints": {"docker": {"Host": host}}}))
    (config_dir / "config.json").write_text(json.dumps({"currentContext": name}))


@pytest.mark.parametrize("source", ["DOCKER_HOST", "settings", "context"])
@pytest.mark.anyio
async def test_ping_over_ssh(lab: LabInfo, ssh_home: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    settings = DockerSettings()
    if source == "DOCKER_HOST":
        monkeypatch.setenv("DOCKER_HOST", f"ssh://{lab.ssh_alias}")
    elif source == "settings":
        settings = DockerSettings(host=f"ssh://{lab.ssh_alias}")
    else:
        _context(ssh_home, "remote", f"ssh://{lab.ssh_alias}")
    endpoint = resolve_endpoint(settings)
    assert endpoint.host == f"ssh://{lab.ssh_alias}" and endpoint.scheme == "ssh"
    before = bridge_dirs()
    with anyio.fail_after(30):
        async with DockerClient(endpoint, timeout=10) as client:
            assert len(bridge_dirs() - before) == 1  # the private socket directory exists while open
            version = await client.ping()
            assert version.get("ApiVersion")
            # several HTTP connections at once: one dial-stdio channel each on the one SSH connection
            async with anyio.create_task_group() as tg:
                for _ in range(6):
                    tg.start_soon(client.ping)
    assert bridge_dirs() - before == set()  # and is removed on exit


@pytest.mark.anyio
async def test_forward_echo_1mib_with_half_close(lab: LabInfo, ssh_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"ssh://{lab.ssh_alias}")
    s = dataclasses.replace(DockerSettings(), helper_name=f"kci-test-ssh-{uuid.uuid4().hex[:10]}",
                            helper_images=(lab.socat_image,))
    data = bytes(range(256)) * 4096  # 1 MiB
    with anyio.fail_after(90):
        async with docker_transport(lab, s) as transport, running_forward(transport, lab.echo_port) as fwd:
            info = transport.info()
            assert info["docker_host"] == f"ssh://{lab.ssh_alias}"
            assert await echo_roundtrip(fwd.port, data) == data
            await parallel_echoes(fwd.port, data[: 128 * 1024])  # more clients than idle slots: new execs over SSH


def test_cli_start_via_docker_over_ssh_and_stop_cleanup(lab: LabInfo, tmp_path: Path) -> None:
    home = make_home(tmp_path, lab)
    helper = f"kci-test-ssh-{uuid.uuid4().hex[:10]}"
    config = tmp_path / "config.toml"
    config.write_text(f'[transport.docker]\nhelper_name = "{helper}"\nhelper_image = "{lab.socat_image}"\n')
    cli = Cli(tmp_path, env={"DOCKER_HOST": f"ssh://{lab.ssh_alias}", "HOME": str(home)})
    for var in (*_DOCKER_VARS[1:], "DOCKER_CONFIG"):
        cli.env.pop(var, None)
    started = time.monotonic()
    result = cli.start_detached("--via", "docker", "--config", str(config),
                                "-L", f"127.0.0.1:0:127.0.0.1:{lab.registry_port}")
    start_took = time.monotonic() - started
    try:
        assert result.returncode == 0, result.stderr + result.stdout
        status = cli.status()
        assert status["transport"]["kind"] == "docker"
        assert status["transport"]["docker_host"] == f"ssh://{lab.ssh_alias}"
        assert status["forwards"][0]["state"] == "ready"
        port = status["forwards"][0]["port"]
        curl = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/v2/"],
                              capture_output=True, text=True, timeout=30)
        assert curl.stdout == "200", curl.stderr
    finally:
        stop = cli.run("stop", "--cleanup")
        if stop.returncode != 0:
            cli.cleanup()
            anyio.run(remove_helper, lab, helper)
    assert stop.returncode == 0, stop.stderr
    assert cli.run("status").returncode == ExitCode.NOT_RUNNING
    assert start_took < 30, start_took

    async def helper_gone() -> bool:
        async with DockerClient(resolve_endpoint(DockerSettings(host=lab.docker_host_unix), {}), timeout=10) as c:
            return await c.inspect_container(helper) is None

    assert anyio.run(helper_gone)


@pytest.mark.anyio
async def test_unknown_host_key_is_refused(lab: LabInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    monkeypatch.setenv("HOME", str(make_home(tmp_path, lab, known_hosts=empty)))
    for var in _DOCKER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DOCKER_HOST", f"ssh://{lab.ssh_alias}")
    s = DockerSettings(helper_name=f"kci-test-ssh-{uuid.uuid4().hex[:10]}", helper_images=(lab.socat_image,))
    started = time.monotonic()
    with anyio.fail_after(20), pytest.raises(TransportError) as refused:
        async with DockerClient(resolve_endpoint(s), timeout=10):
            pass
    message = str(refused.value)
    assert "host key" in message and "not in known_hosts" in message, message
    assert f"ssh://{lab.ssh_alias}" in message and "DOCKER_HOST" in message and str(empty) in message, message
    assert time.monotonic() - started < 5  # definitive: not retried
    # The transport says the same and leaves nothing behind.
    with anyio.fail_after(20), pytest.raises(TransportError, match="host key"):
        async with DockerTransport(TransportSpec(kind="docker", docker=s), TIMEOUTS):
            pass


@pytest.mark.anyio
async def test_unreachable_ssh_docker_host_names_it() -> None:
    s = DockerSettings(host="ssh://nobody@127.0.0.1:1")
    with anyio.fail_after(15), pytest.raises(TransportError, match=r"ssh://nobody@127\.0\.0\.1:1.*connection refused"):
        async with DockerClient(resolve_endpoint(s, {}), timeout=1.0):
            pass
    with pytest.raises(TransportError, match="takes no path"):
        async with DockerClient(resolve_endpoint(DockerSettings(host="ssh://host/x"), {}), timeout=1.0):
            pass
