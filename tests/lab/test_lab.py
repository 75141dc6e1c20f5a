"""The lab is what the project's tests assume it is; checked with real clients.

Run: `python3 -m pytest -p tests.lab.fixture tests/lab -q` (as root).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab import lab as labmod
from tests.lab import socat18
from tests.lab.fixture import socat18_image
from tests.lab.lab import LabInfo

# The first test also pays for bringing the lab up from scratch (session fixture set-up
# counts against it), so the budget is that plus a generous margin; each client call
# below has its own, much shorter deadline.
pytestmark = pytest.mark.timeout(60)

CALL_TIMEOUT = 20.0


def run(argv: list[str], input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a client on the host (CI) side with a deadline."""
    return subprocess.run(argv, input=input, capture_output=True, timeout=CALL_TIMEOUT)


def curl_tls(lab: LabInfo, cert_dir: Path | None) -> subprocess.CompletedProcess[bytes]:
    argv = ["curl", "-sS", "-m", "10", "--cacert", str(lab.ca_cert)]
    if cert_dir is not None:
        argv += ["--cert", str(cert_dir / "cert.pem"), "--key", str(cert_dir / "key.pem")]
    return run([*argv, f"https://{lab.ns_ip}:{lab.docker_tcp_port}/_ping"])


def ssh(lab: LabInfo, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return run(["ssh", "-F", str(lab.ssh_config), *args], input=input)


# ---------------------------------------------------------------- topology and the gap


def test_dockerd_runs_inside_the_namespace(lab: LabInfo) -> None:
    pid = int(lab.dockerd_pidfile.read_text())
    lab_ns = f"net:[{os.stat(lab.netns_path).st_ino}]"
    assert os.readlink(f"/proc/{pid}/ns/net") == lab_ns
    assert os.readlink("/proc/self/ns/net") != lab_ns


def test_registry_answers_inside_the_namespace(lab: LabInfo) -> None:
    proc = labmod.ns_exec(
        ["curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", f"http://{lab.registry_addr}/v2/"],
        timeout=CALL_TIMEOUT,
    )
    assert (proc.returncode, proc.stdout) == (0, b"200"), proc.stderr


def test_registry_is_not_published_on_the_namespace_address(lab: LabInfo) -> None:
    proc = run(["curl", "-sS", "-m", "5", f"http://{lab.ns_ip}:{lab.registry_port}/v2/"])
    assert proc.returncode == 7, (proc.stdout, proc.stderr)  # 7: could not connect


def test_registry_is_not_on_the_host_side_loopback(lab: LabInfo) -> None:
    # The gap kci-tunneld bridges. Another test's tunnel may legitimately listen on the
    # host's 127.0.0.1:5000 while this runs, so only a refused connection is conclusive.
    proc = run(["curl", "-sS", "-m", "5", f"http://{lab.registry_addr}/v2/"])
    if proc.returncode != 7:
        pytest.skip(
            f"something else answers on the host's {lab.registry_addr} "
            f"(curl exit {proc.returncode}); the gap cannot be shown now"
        )


# ---------------------------------------------------------------- Docker API


def test_docker_ping_over_the_unix_socket(lab: LabInfo) -> None:
    proc = run(["curl", "-sS", "-m", "10", "--unix-socket", str(lab.docker_sock), "http://docker/_ping"])
    assert (proc.returncode, proc.stdout) == (0, b"OK"), proc.stderr


def test_docker_ping_over_tcp_with_client_certs(lab: LabInfo) -> None:
    proc = curl_tls(lab, lab.client_cert_dir)
    assert (proc.returncode, proc.stdout) == (0, b"OK"), proc.stderr


@pytest.mark.parametrize("which", ["wrong-client", "no-client-cert"])
def test_docker_tcp_refuses_other_clients(lab: LabInfo, which: str) -> None:
    # wrong-client/ trusts the lab CA, so the failure can only be dockerd refusing the
    # certificate (curl reports 35, 55 or 56 depending on when the TLS 1.3 alert lands).
    proc = curl_tls(lab, lab.wrong_client_cert_dir if which == "wrong-client" else None)
    assert proc.returncode != 0
    assert proc.stdout != b"OK"


def test_docker_cli_over_tls(lab: LabInfo) -> None:
    proc = labmod.docker("version", "--format", "{{.Server.APIVersion}}", tls=True, timeout=CALL_TIMEOUT)
    assert tuple(map(int, proc.stdout.strip().split("."))) >= (1, 41)


def test_env_exports_point_at_the_lab(lab: LabInfo) -> None:
    assert f"export DOCKER_HOST={lab.docker_host_unix}" in labmod.env_exports()
    tls = labmod.env_exports(tls=True).splitlines()
    assert f"export DOCKER_HOST={lab.docker_host_tcp}" in tls
    assert "export DOCKER_TLS_VERIFY=1" in tls
    assert f"export DOCKER_CERT_PATH={lab.client_cert_dir}" in tls


# ---------------------------------------------------------------- images


def test_images_exist(lab: LabInfo) -> None:
    names = (lab.registry_image, lab.socat_image, lab.busybox_image, lab.python_image)
    proc = labmod.docker("image", "inspect", "--format", "{{json .Config.Entrypoint}}", *names, timeout=CALL_TIMEOUT)
    entrypoints = [json.loads(line) for line in proc.stdout.splitlines()]
    assert entrypoints == [
        ["/usr/bin/docker-registry", "serve", "/etc/docker/registry/config.yml"],
        ["socat"],
        None,
        None,
    ]


def _socat_version(image: str) -> str:
    out = labmod.docker("run", "--rm", image, "-V", timeout=CALL_TIMEOUT).stdout
    versions = [line.split()[2] for line in out.splitlines() if line.startswith("socat version ")]
    assert len(versions) == 1, out
    return versions[0]


def test_the_two_socat_images_are_socat_1_7_and_1_8(lab: LabInfo) -> None:
    # The shell relay is tested on both: an image that silently carried the other socat would hide the
    # difference between their messages.
    assert _socat_version(lab.socat_image).startswith("1.7."), lab.socat_image
    assert _socat_version(socat18_image(lab)).startswith("1.8."), lab.socat18_image


def test_a_failed_socat18_download_waits_before_it_is_tried_again(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`up` on a machine that cannot reach the mirror must not wait out apt's timeouts every time: after a
    failed download, the next `up`s within RETRY_AFTER report the recorded reason without trying, unless
    KCI_LAB_RETRY_DOWNLOADS=1; after RETRY_AFTER they try again. (The download itself is the stand-in
    here; the real one is what `up` ran for this session.)"""
    for name in ("ROOT", "DONE", "FAILED", "_APT"):
        monkeypatch.setattr(socat18, name, tmp_path / getattr(socat18, name).relative_to(socat18.SOCAT18_DIR))
    monkeypatch.setattr(socat18, "SOCAT18_DIR", tmp_path)
    tries: list[Path] = []

    def unreachable(dest: Path) -> None:
        tries.append(dest)
        raise labmod.LabError("apt-get update failed (exit 100): E: the mirror cannot be reached")

    monkeypatch.setattr(socat18, "_download", unreachable)
    monkeypatch.delenv(socat18.RETRY_ENV, raising=False)
    first = socat18.ensure()
    assert len(tries) == 1 and "NOT AVAILABLE" in first and "cannot be reached" in first
    again = socat18.ensure()
    assert len(tries) == 1, "tried again at once"
    assert "failed 0 min ago" in again and "cannot be reached" in again and socat18.RETRY_ENV in again
    monkeypatch.setenv(socat18.RETRY_ENV, "1")
    socat18.ensure()
    assert len(tries) == 2
    monkeypatch.delenv(socat18.RETRY_ENV)
    old = time.time() - socat18.RETRY_AFTER - 60
    os.utime(socat18.FAILED, (old, old))
    socat18.ensure()
    assert len(tries) == 3


def test_busybox_image_has_nc_and_no_socat(lab: LabInfo) -> None:
    proc = labmod.docker(
        "run", "--rm", lab.busybox_image, "sh", "-c", "which nc; which socat || echo no-socat", timeout=CALL_TIMEOUT
    )
    assert proc.stdout.split() == ["/bin/nc", "no-socat"]


def test_python_image_runs_a_script_with_sockets(lab: LabInfo) -> None:
    proc = labmod.docker(
        "run", "--rm", lab.python_image, "python3", "-S", "-c",
        "import select, socket, sys; print(sys.version_info[0])", timeout=CALL_TIMEOUT,
    )
    assert proc.stdout.split() == ["3"]


# ---------------------------------------------------------------- echo service

# Runs inside the namespace. Sends in a thread while reading, as a relay would (a
# 4 MiB echo does not fit in socket buffers), and checks the half-close contract:
# no EOF before ours, then every byte back, then EOF.
_HALF_CLOSE_CLIENT = r"""
import json, socket, sys, threading
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payload = bytes(range(256)) * (size // 256)
s = socket.create_connection((host, port), timeout=10)
s.sendall(b"ping")
first = s.recv(4)
s.settimeout(0.3)
try:
    early = s.recv(1)
    early_eof = early == b""
except TimeoutError:
    early_eof = False
s.settimeout(10)
def send():
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
t = threading.Thread(target=send)
t.start()
got = bytearray()
while chunk := s.recv(65536):
    got += chunk
t.join()
print(json.dumps({"first": first.decode(), "early_eof": early_eof,
                  "echoed": len(got), "same": bytes(got) == payload}))
"""


@pytest.mark.parametrize("host_attr", ["echo_host", "echo_host6"])
def test_echo_service_echoes_with_half_close(lab: LabInfo, host_attr: str) -> None:
    size = 4 * 1024 * 1024
    proc = labmod.ns_exec(
        [sys.executable, "-c", _HALF_CLOSE_CLIENT, getattr(lab, host_attr), str(lab.echo_port), str(size)],
        timeout=CALL_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"first": "ping", "early_eof": False, "echoed": size, "same": True}


def test_echo_service_is_only_inside_the_namespace(lab: LabInfo) -> None:
    proc = run(["curl", "-sS", "-m", "5", f"telnet://{lab.ns_ip}:{lab.echo_port}"])
    assert proc.returncode == 7, (proc.stdout, proc.stderr)


@pytest.mark.parametrize(
    "image,argv",
    [
        ("busybox", ["nc", "127.0.0.1", "7007"]),
        ("socat", ["STDIO", "TCP:localhost:7007"]),
        ("socat18", ["STDIO", "TCP:localhost:7007"]),
    ],
)
def test_containers_relay_stdio_to_the_echo_service(lab: LabInfo, image: str, argv: list[str]) -> None:
    # --network host puts the container on the namespace's loopback: what a relay
    # container on the remote host sees. Both relays exit after stdin EOF (nc shuts
    # down its write side, the echo service half-closes, nc sees EOF and exits).
    payload = "".join(f"line {i}\n" for i in range(5000))
    name = {"busybox": lab.busybox_image, "socat": lab.socat_image}.get(image) or socat18_image(lab)
    proc = labmod.docker("run", "--rm", "-i", "--network", "host", name, *argv, input=payload, timeout=CALL_TIMEOUT)
    assert proc.stdout == payload


# ---------------------------------------------------------------- sshd


def test_ssh_accepts_the_lab_key(lab: LabInfo) -> None:
    proc = ssh(lab, lab.ssh_alias, "true")
    assert proc.returncode == 0, proc.stderr


def test_ssh_sessions_run_on_the_remote_host(lab: LabInfo) -> None:
    # A shell on the "remote host" sees its loopback (the registry) and its dockerd.
    proc = ssh(lab, lab.ssh_alias, f"curl -sS -m 5 http://{lab.registry_addr}/v2/ && docker version -f ok")
    assert (proc.returncode, proc.stdout) == (0, b"{}ok\n"), proc.stderr


def test_ssh_forwards_tcp_to_the_namespace_loopback(lab: LabInfo) -> None:
    payload = b"through ssh -W\n" * 1000
    proc = ssh(lab, "-W", f"{lab.echo_host}:{lab.echo_port}", lab.ssh_alias, input=payload)
    assert (proc.returncode, proc.stdout) == (0, payload), proc.stderr


def test_ssh_refuses_an_unknown_key(lab: LabInfo, tmp_path: Path) -> None:
    key = tmp_path / "stranger"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)]).check_returncode()
    # Not via the lab ssh_config: IdentityFile entries add up, so the lab key would be tried.
    proc = run(
        [
            "ssh",
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={lab.ssh_known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-i",
            str(key),
            "-p",
            str(lab.ssh_port),
            f"{lab.ssh_user}@{lab.ssh_host}",
            "true",
        ]
    )
    assert proc.returncode == 255
    assert b"Permission denied" in proc.stderr
