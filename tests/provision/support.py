"""Helpers for the provisioning tests: lab Docker settings, unique names, the CLI as a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from provision.spec import ClusterSpec, ProvisionSpec, ProvisionTimeouts, RegistrySpec
from tests.lab.lab import LabInfo, docker
from tunneld.config import DockerSettings

REPO = Path(__file__).resolve().parents[2]
FAST = ProvisionTimeouts(docker=15.0, kind=60.0, kind_create=120.0, pull=60.0, registry_ready=20.0, api_ready=30.0,
                         nodes_ready=30.0, request=5.0, poll=0.2)


def unique(prefix: str) -> str:
    """A container-name-safe name no other test (or engineer) on the lab uses."""
    return f"kcit-{prefix}-{uuid.uuid4().hex[:6]}"


def free_port() -> int:
    """A port free here right now (the kernel's pick); tests check the remote side through pre-flight."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings(lab: LabInfo, *, tls: bool = True) -> DockerSettings:
    """Explicit Docker settings for the lab (no environment involved)."""
    if tls:
        return DockerSettings(host=lab.docker_host_tcp, tls_verify=True, cert_path=str(lab.client_cert_dir))
    return DockerSettings(host=lab.docker_host_unix)


def spec(lab: LabInfo, name: str, port: int, *, cluster: ClusterSpec | None = None, tls: bool = True) -> ProvisionSpec:
    return ProvisionSpec(registry=RegistrySpec(name=name, port=port), cluster=cluster, docker=settings(lab, tls=tls),
                         timeouts=FAST)


def inspect(lab: LabInfo, name: str, fmt: str = "{{.Id}}") -> str | None:
    """`docker inspect -f FMT NAME` on the lab, or None when there is no such container."""
    r = docker("inspect", "-f", fmt, name, check=False)
    return r.stdout.strip() if r.returncode == 0 else None


@contextmanager
def removed_after(*names: str) -> Iterator[None]:
    """Remove these containers (the test's own, uniquely named) however the test ends."""
    try:
        yield
    finally:
        for name in names:
            docker("rm", "-f", name, check=False)


def run_cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`kci-tunneld ARGS` through its real entry point (`python -m tunneld`, the console script's module)."""
    return subprocess.run([sys.executable, "-m", "tunneld", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO, stdin=subprocess.DEVNULL)


def cli_env(lab: LabInfo, *, tls: bool = True, **extra: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_") and k != "NOTIFY_SOCKET"}
    env.update(lab.docker_env(tls))
    env.update(extra)
    return env
