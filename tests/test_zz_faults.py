"""Faults on the lab, each recovered from WITHOUT restarting the daemon, leaving nothing behind.

Three daemons run for the whole module, each a real `kci-tunneld start --detach` process:
- ``tls``: --via docker over tcp://10.213.77.2:2376 (TLS) - forwards ``registry`` and ``echo``;
- ``unix``: --via docker over the unix socket (not through the veth) - forwards ``echo``;
- ``ssh``: --via ssh to 10.213.77.2 - forwards ``registry`` and ``echo``.
Each fault asserts a recovery-time bound (measured from the end of the fault to a client being
served again), that a forward the fault does not touch served every request meanwhile, and that
afterwards the daemons' file descriptors, asyncio tasks and active connections are back where they
started. Measured times are printed (run with -s to see them; docs/health.md has a table).

Named test_zz_* so it runs after every other module: restarting the lab's dockerd stops every
container in the lab, and killing sshd ends every SSH session (tests/lab/test_lab_faults.py has
the same caveat).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.lab import lab as labmod
from tests.lab.lab import LabInfo, docker
from tests.lab_daemons import (
    Bystander,
    Daemon,
    StateWatch,
    assert_no_leaks,
    docker_transport_toml,
    echo_ok,
    forward_toml,
    registry_ok,
    report,
    settled,
    ssh_transport_toml,
    start_daemon,
    wait_until,
)
from tests.servers import free_local_port

pytestmark = [pytest.mark.timeout(240), pytest.mark.lab]

FAULTS_REGISTRY = "kcilab-faults-registry"
TLS_HELPER = "kcilab-faults-helper"
UNIX_HELPER = "kcilab-faults-helper-unix"

# Recovery bounds (seconds from the end of the fault until a client is served again).
DOCKERD_RESTART_BOUND = 10.0  # counted from dockerd answering again (its own restart took 3-13 s here)
REGISTRY_RESTART_BOUND = 5.0
HELPER_REMOVED_BOUND = 10.0
RELAY_KILLED_BOUND = 5.0
LINK_DOWN_BOUND = 15.0
SSHD_KILLED_BOUND = 10.0


@pytest.fixture(scope="module")
def daemons(lab: LabInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Daemon]]:
    tmp = tmp_path_factory.mktemp("faults")
    docker("rm", "-f", FAULTS_REGISTRY, TLS_HELPER, UNIX_HELPER, check=False)
    remote_port = free_local_port()
    docker("run", "-d", "--name", FAULTS_REGISTRY, "--restart", "always", "-p", f"127.0.0.1:{remote_port}:5000",
           lab.registry_image)
    registry = forward_toml("registry", remote_port, "http", "/v2/")
    echo = forward_toml("echo", lab.echo_port)
    out: dict[str, Daemon] = {}
    try:
        out["tls"] = start_daemon(tmp, "tls", docker_transport_toml(TLS_HELPER), lab.docker_env(tls=True),
                                  registry + echo)
        out["unix"] = start_daemon(tmp, "unix", docker_transport_toml(UNIX_HELPER), lab.docker_env(tls=False), echo)
        out["ssh"] = start_daemon(tmp, "ssh", ssh_transport_toml(lab), {}, registry + echo)
        yield out
    finally:
        for d in out.values():
            d.cli.run("stop", "--cleanup", timeout=60)
            d.cli.cleanup()
        docker("rm", "-f", FAULTS_REGISTRY, TLS_HELPER, UNIX_HELPER, check=False)


# ---------------------------------------------------------------- faults


def test_registry_container_killed_then_restarted(daemons: dict[str, Daemon]) -> None:
    tls = daemons["tls"]
    before = settled(tls)
    port = tls.port("registry")
    assert registry_ok(port)
    with Bystander(tls.port("echo")) as bystander, StateWatch(tls, "registry") as watch:
        # -t 0: SIGKILL at once, and as a stop, so restart=always does not bring it back by itself.
        docker("stop", "-t", "0", FAULTS_REGISTRY)
        wait_until("registry forward degraded", lambda: tls.forward("registry")["state"] == "degraded", 10)
        assert not registry_ok(port)
        started = time.monotonic()
        docker("start", FAULTS_REGISTRY)
        serving = wait_until("registry served again", lambda: registry_ok(port), REGISTRY_RESTART_BOUND)
        ready = wait_until("registry forward ready", lambda: tls.forward("registry")["state"] == "ready", 10)
        total = time.monotonic() - started
    report("registry killed+restarted", serving_after_start=serving, ready_after_start=total)
    assert "degraded" in watch.seen and watch.seen[-1] == "ready", watch.seen
    assert ready is not None and total < REGISTRY_RESTART_BOUND + 1
    assert bystander.failed == 0 and bystander.ok > 5
    fwd = tls.forward("registry")
    assert fwd["reconnects"] >= 1 and "127.0.0.1" in (fwd["last_error"] or "")
    assert_no_leaks(tls, before)


def test_helper_container_removed(daemons: dict[str, Daemon]) -> None:
    tls, ssh = daemons["tls"], daemons["ssh"]
    before = settled(tls)
    port = tls.port("echo")
    with Bystander(ssh.port("echo")) as bystander:
        started = time.monotonic()
        docker("rm", "-f", TLS_HELPER)
        serving = wait_until("echo served again through a new helper", lambda: echo_ok(port), HELPER_REMOVED_BOUND)
        wait_until("tls forwards ready", lambda: tls.status()["state"] == "ready", 15)
    report("helper removed", serving_after_removal=serving, ready_after_removal=time.monotonic() - started)
    assert docker("inspect", "-f", "{{.State.Running}}", TLS_HELPER).stdout.strip() == "true"  # re-created
    assert bystander.failed == 0 and bystander.ok > 3
    assert registry_ok(tls.port("registry"))
    assert_no_leaks(tls, before)


def test_relay_killed_in_the_helper(daemons: dict[str, Daemon]) -> None:
    """The default helper runs the mux relay: every connection of the docker forwards is on its few
    execs. Killing the relay processes ends them; new execs replace them, the helper stays."""
    tls, ssh = daemons["tls"], daemons["ssh"]
    assert tls.status()["transport"]["relay"] == "mux"
    before = settled(tls)
    port = tls.port("echo")
    helper_id = docker("inspect", "-f", "{{.Id}}", TLS_HELPER).stdout.strip()
    with Bystander(ssh.port("echo")) as bystander:
        started = time.monotonic()
        docker("exec", TLS_HELPER, "sh", "-c", "kill -9 $(pidof python3)")
        serving = wait_until("echo served again through new relay execs", lambda: echo_ok(port), RELAY_KILLED_BOUND)
        wait_until("tls forwards ready", lambda: tls.status()["state"] == "ready", 15)
    report("mux relay killed", serving_after_kill=serving, ready_after_kill=time.monotonic() - started)
    assert docker("inspect", "-f", "{{.Id}}", TLS_HELPER).stdout.strip() == helper_id  # not recreated
    assert bystander.failed == 0 and bystander.ok > 3
    assert registry_ok(tls.port("registry"))
    assert_no_leaks(tls, before)


def test_sshd_killed(daemons: dict[str, Daemon], lab: LabInfo) -> None:
    tls, ssh = daemons["tls"], daemons["ssh"]
    before = settled(ssh)
    reconnects = ssh.status()["transport"]["reconnects"]
    port = ssh.port("echo")
    with Bystander(tls.port("echo")) as bystander, StateWatch(ssh, "echo") as watch:
        labmod.stop_sshd(sessions=True)  # sshd and every session: the connection is gone
        try:
            wait_until("ssh forward reconnecting", lambda: ssh.forward("echo")["state"] == "reconnecting", 15)
            assert ssh.status()["transport"]["state"] == "reconnecting"
        finally:
            labmod.start_sshd()
        started = time.monotonic()
        serving = wait_until("echo over ssh served again", lambda: echo_ok(port), SSHD_KILLED_BOUND)
        wait_until("ssh forwards ready", lambda: ssh.status()["state"] == "ready", 15)
    report("sshd killed", serving_after_sshd_start=serving, ready_after_sshd_start=time.monotonic() - started)
    assert "reconnecting" in watch.seen and watch.seen[-1] == "ready", watch.seen
    assert ssh.status()["transport"]["reconnects"] == reconnects + 1
    assert bystander.failed == 0 and bystander.ok > 5
    assert_no_leaks(ssh, before)


def test_veth_link_down_for_5s(daemons: dict[str, Daemon], lab: LabInfo) -> None:
    tls, ssh, unix = daemons["tls"], daemons["ssh"], daemons["unix"]
    before = {d.label: settled(d) for d in (tls, ssh, unix)}
    with Bystander(unix.port("echo"), rounds=21) as bystander:  # the unix socket does not cross the veth
        subprocess.run(["ip", "link", "set", lab.host_veth, "down"], check=True, timeout=10)
        try:
            time.sleep(5)
        finally:
            subprocess.run(["ip", "link", "set", lab.host_veth, "up"], check=True, timeout=10)
        started = time.monotonic()
        via_tls = wait_until("echo via docker TLS", lambda: echo_ok(tls.port("echo")), LINK_DOWN_BOUND)
        via_ssh = wait_until("echo via ssh", lambda: echo_ok(ssh.port("echo")), LINK_DOWN_BOUND)
        for d in (tls, ssh):
            wait_until(f"{d.label} ready", lambda d=d: d.status()["state"] == "ready", LINK_DOWN_BOUND)
    report("veth down 5s", docker_tls_serving_after_up=via_tls, ssh_serving_after_up=via_tls + via_ssh,
           all_ready_after_up=time.monotonic() - started)
    assert bystander.failed == 0 and bystander.ok > 20
    for d in (tls, ssh, unix):
        assert_no_leaks(d, before[d.label])


def test_remote_dockerd_restarted(daemons: dict[str, Daemon]) -> None:
    tls, ssh = daemons["tls"], daemons["ssh"]
    before = settled(tls)
    reconnects = tls.status()["transport"]["reconnects"]
    with Bystander(ssh.port("echo"), rounds=11) as bystander, StateWatch(tls, "echo") as watch:
        started = time.monotonic()
        labmod.restart_dockerd()  # stops every container; returns once dockerd and the lab's registry answer
        back = time.monotonic()
        echo = wait_until("echo via docker", lambda: echo_ok(tls.port("echo")), DOCKERD_RESTART_BOUND)
        registry = wait_until("registry via docker", lambda: registry_ok(tls.port("registry")),
                              DOCKERD_RESTART_BOUND) + echo
        wait_until("tls forwards ready", lambda: tls.status()["state"] == "ready", DOCKERD_RESTART_BOUND)
        ready = time.monotonic() - back
    report("dockerd restarted", restart_took=back - started, echo_serving_after_back=echo,
           registry_serving_after_back=registry, all_ready_after_back=ready)
    assert ready < DOCKERD_RESTART_BOUND
    # The daemon noticed the outage: a probe saw the forward unready, or (when the outage fell between
    # two probes) the transport counted a reconnect of its relay streams.
    noticed = any(s != "ready" for s in watch.seen) or tls.status()["transport"]["reconnects"] > reconnects
    assert watch.seen[-1] == "ready" and noticed, (watch.seen, tls.status()["transport"])
    assert bystander.failed == 0 and bystander.ok > 10
    assert_no_leaks(tls, before)
