"""`kci-tunneld up` / `down` as a new user runs them (provisioning's acceptance check), against the lab's TLS
DOCKER_HOST: a registry on the remote, forwarded on 127.0.0.1:5555, that skopeo pushes to; `up` again
reuses it; removed, the daemon recreates it; `down` removes it. Plus the CLI's pre-flight exit codes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.lab import LabInfo, docker
from tests.oci import build_layout, roundtrip
from tests.provision.support import REPO, cli_env, free_port, inspect, removed_after, run_cli, unique
from tunneld.daemon.processes import pid_alive
from tunneld.errors import ExitCode

pytestmark = pytest.mark.timeout(180)

PORT = 5555  # the issue's own example
NAME = "kind-registry"  # the default name
RECREATE_BOUND = 15.0


def http_status(port: int, path: str = "/v2/") -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return int(r.status)
    except OSError:
        return None


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a listener binds: TIME_WAIT is no owner
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Path]:
    """A private control socket; whatever daemon ends up on it is stopped at the end (by its pid)."""
    path = tmp_path / "control.sock"
    yield path
    pid_file = tmp_path / "daemon.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        if pid_alive(pid):
            os.kill(pid, signal.SIGTERM)


def remember_daemon(control: Path, env: dict[str, str]) -> int:
    from tests.cli.runner import Cli

    status = Cli(control.parent, env).status()
    (control.parent / "daemon.pid").write_text(str(status["pid"]))
    return int(status["pid"])


def test_up_no_cluster_push_reuse_recreate_down(lab: LabInfo, control: Path, tmp_path: Path) -> None:
    existing = inspect(lab, NAME, '{{index .Config.Labels "io.kci-tunneld.role"}}')
    if existing is not None and existing != "registry":
        pytest.skip(f"a container named {NAME} that kci-tunneld did not make exists on the lab")
    env = cli_env(lab, tls=True)
    args = ["--no-cluster", "--registry-port", str(PORT), "--control", str(control)]
    with removed_after(NAME) if existing is None else removed_after():
        started = time.monotonic()
        up = run_cli("up", *args, "--detach", "--reconcile-interval", "0.5", "--ready-timeout", "30", env=env)
        took = time.monotonic() - started
        assert up.returncode == 0, up.stderr
        assert "kci-tunneld: ready" in up.stdout and f"registry: localhost:{PORT} -> {NAME}" in up.stdout
        assert "from DOCKER_HOST" in up.stderr and "(TLS)" in up.stderr
        assert f"registry answering on the Docker host's 127.0.0.1:{PORT}/v2/" in up.stderr
        pid = remember_daemon(control, env)
        first = inspect(lab, NAME)
        print(f"up --no-cluster --detach: {took:.2f}s")

        layout = build_layout(tmp_path / "img", layer_sizes=(2 << 20, 1 << 20, 512 << 10))
        roundtrip(layout, f"localhost:{PORT}", "up/app", tmp_path)

        again = run_cli("up", *args, "--detach", env=env)
        assert again.returncode == 0, again.stderr
        assert f"registry {NAME}: reused" in again.stderr and "daemon already running" in again.stderr
        assert inspect(lab, NAME) == first and remember_daemon(control, env) == pid

        docker("rm", "-f", NAME)  # behind everyone's back
        removed_at = time.monotonic()
        while not (inspect(lab, NAME) not in (None, first) and http_status(PORT) == 200):
            assert time.monotonic() - removed_at < RECREATE_BOUND, "the daemon did not recreate the registry"
            time.sleep(0.1)
        print(f"recreated and answering through the forward {time.monotonic() - removed_at:.2f}s after docker rm")
        log = control.with_suffix(".log")
        while "registry kind-registry created and answering again" not in log.read_text():
            assert time.monotonic() - removed_at < RECREATE_BOUND, log.read_text()
            time.sleep(0.1)

        down = run_cli("down", *args, env=env)
        assert down.returncode == 0, down.stderr
        assert f"daemon stopped (pid {pid})" in down.stderr and f"registry {NAME}: removed" in down.stderr
        assert inspect(lab, NAME) is None and not pid_alive(pid) and port_free(PORT)
        assert not control.with_suffix(".up.toml").exists() and not control.with_suffix(".provision.json").exists()


def test_up_over_ssh_from_a_base_config(lab: LabInfo, control: Path, tmp_path: Path) -> None:
    """--config supplies the transport (here SSH with the lab's key); up's forwards are added to it."""
    name, port = unique("ssh"), free_port()
    base = tmp_path / "base.toml"
    base.write_text(f'[transport]\nvia = "ssh://{lab.ssh_user}@{lab.ssh_host}:{lab.ssh_port}"\n'
                    f'[transport.ssh]\nidentity_files = ["{lab.ssh_key}"]\nknown_hosts = "{lab.ssh_known_hosts}"\n'
                    f'config_file = "/dev/null"\n[timeouts]\nprobe_interval = 1.0\n')
    env = cli_env(lab, tls=False, SSH_AUTH_SOCK="")
    args = ["--no-cluster", "--registry-name", name, "--registry-port", str(port), "--control", str(control),
            "--config", str(base)]
    with removed_after(name):
        up = run_cli("up", *args, "--detach", env=env)
        assert up.returncode == 0, up.stderr
        remember_daemon(control, env)
        assert 'via = "ssh://' in control.with_suffix(".up.toml").read_text()
        assert http_status(port) == 200
        down = run_cli("down", *args, env=env)
        assert down.returncode == 0, down.stderr and inspect(lab, name) is None


def test_up_preflight_failures_have_their_own_exit_codes(lab: LabInfo, control: Path, tmp_path: Path) -> None:
    env = cli_env(lab, tls=True)
    name = unique("pf")
    taken = run_cli("up", "--no-cluster", "--registry-name", name, "--registry-port", str(lab.registry_port),
                    "--control", str(control), "--detach", env=env)
    assert taken.returncode == ExitCode.PROVISION, taken.stderr
    assert f"port {lab.registry_port} on the Docker host is taken by container {lab.registry_container}" in \
        taken.stderr and "nothing was created" in taken.stderr
    assert inspect(lab, name) is None and not control.exists()

    nodocker = run_cli("up", "--no-cluster", "--registry-port", str(free_port()), "--control", str(control),
                       env={**env, "DOCKER_HOST": f"unix://{tmp_path}/none.sock"})
    assert nodocker.returncode == ExitCode.TRANSPORT and "Docker is unreachable" in nodocker.stderr

    nokind = run_cli("up", "--cluster", name, "--registry-name", name, "--registry-port", str(free_port()),
                     "--control", str(control), env={**env, "PATH": str(tmp_path)})
    assert nokind.returncode == ExitCode.PROVISION and "kind not found on PATH" in nokind.stderr
    assert inspect(lab, name) is None

    down_nothing = run_cli("down", "--no-cluster", "--registry-name", name, "--control", str(control), env=env)
    assert down_nothing.returncode == 0 and f"registry {name}: not there" in down_nothing.stderr
    assert json.loads(json.dumps({"ok": True}))  # nothing else to check: down of nothing is a no-op


def test_up_in_the_foreground_serves_until_sigterm(lab: LabInfo, control: Path) -> None:
    name, port = unique("fg"), free_port()
    env = cli_env(lab, tls=True)
    args = ["--no-cluster", "--registry-name", name, "--registry-port", str(port), "--control", str(control)]
    with removed_after(name):
        proc = subprocess.Popen([sys.executable, "-m", "tunneld", "up", *args], env=env, cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while http_status(port) != 200:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=5)
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        assert "kci-tunneld: ready" in out and f"registry {name}: created" in err
        assert inspect(lab, name) is not None  # stopping the daemon keeps what was provisioned; `down` removes it
        assert run_cli("down", *args, env=env).returncode == 0 and inspect(lab, name) is None
