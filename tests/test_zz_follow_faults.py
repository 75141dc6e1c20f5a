"""Follow mode (``--auto=all``) under faults, on the lab: a container that dies mid-connection, a port
a new container takes over, dockerd restarting, and 200 containers coming and going, after which
no listener, file descriptor or task is left behind.

One daemon (``start --detach --auto=all`` over the lab's Docker via TCP+TLS) runs for the module,
selecting only this module's containers by a label. Named test_zz_* so it runs after every other
module: restarting the lab's dockerd stops every container in the lab.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli.runner import Cli
from tests.docker.test_follow import LABEL, follow_config, published, ready_forward, run_web, served
from tests.lab import lab as labmod
from tests.lab.lab import LabInfo, docker
from tests.lab_daemons import wait_until
from tunneld.docker.follower import INSPECTS_AT_ONCE

pytestmark = [pytest.mark.timeout(300), pytest.mark.lab]

CHURN = 200  # containers started and removed in the leak test
CHURN_AT_ONCE = 10


@pytest.fixture(scope="module")
def label() -> Iterator[str]:
    value = uuid.uuid4().hex[:10]
    yield value
    remove_labelled(value)


def remove_labelled(value: str) -> None:
    ids = docker("ps", "-aq", "--filter", f"label={LABEL}={value}").stdout.split()
    if ids:
        docker("rm", "-f", *ids, check=False)


@pytest.fixture(scope="module")
def daemon(lab: LabInfo, label: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    tmp = tmp_path_factory.mktemp("follow-faults")
    cli = Cli(tmp, env=lab.docker_env(tls=True))
    result = cli.start_detached("--config", str(follow_config(tmp / "c.toml", label, linger=1)))
    assert result.returncode == 0, result.stderr
    try:
        yield cli
    finally:
        cli.run("stop", timeout=60)
        cli.cleanup()


def forwards(cli: Cli) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in cli.status()["forwards"]}


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (from /proc: its sockets' inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_a_container_that_dies_mid_connection_ends_it_and_nothing_else(daemon: Cli, label: str) -> None:
    name, bystander = f"kcilab-ff-{label}-dies", f"kcilab-ff-{label}-stays"
    run_web(name, label, "127.0.0.1::8000")
    run_web(bystander, label, "127.0.0.1::8000")
    port, other = published(name)["8000/tcp"][0], published(bystander)["8000/tcp"][0]
    ready_forward(daemon, f"{name}:{port}")
    ready_forward(daemon, f"{bystander}:{other}")
    wait_until("both serve", lambda: served(port) == name and served(other) == bystander, 10)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as held:
        held.sendall(b"GET /id HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive: the connection stays open
        answer = b""
        while not answer.endswith(f"{name}\n".encode()):  # the whole answer, body included
            answer += held.recv(65536)
        assert answer.startswith(b"HTTP/1.0 200") or answer.startswith(b"HTTP/1.1 200"), answer
        killed = time.monotonic()
        docker("kill", name)
        held.settimeout(15)
        try:
            ended = held.recv(65536)
        except ConnectionResetError:
            ended = b""
        assert ended == b"", ended  # EOF or a reset, not a hang
        print(f"\nRECOVERY container killed mid-connection: the client's connection ended after "
              f"{time.monotonic() - killed:.2f}s")
    assert served(other) == bystander
    wait_until("the dead container's forward removed after the linger",
               lambda: f"{name}:{port}" not in forwards(daemon), 15)
    assert forwards(daemon)[f"{bystander}:{other}"]["state"] == "ready"
    docker("rm", "-f", name, bystander)


def test_a_port_reused_by_a_new_container_serves_the_new_one(daemon: Cli, label: str) -> None:
    first, second = f"kcilab-ff-{label}-a", f"kcilab-ff-{label}-b"
    run_web(first, label, "127.0.0.1::8000")
    port = published(first)["8000/tcp"][0]
    ready_forward(daemon, f"{first}:{port}")
    wait_until("the first answers", lambda: served(port) == first, 10)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as held:  # open across the change
        docker("rm", "-f", first)
        run_web(second, label, f"127.0.0.1:{port}:8000")
        fwd = ready_forward(daemon, f"{second}:{port}")
        assert fwd["container"] == second
        wait_until("the new container answers on the same port", lambda: served(port) == second, 10)
        held.settimeout(10)
        try:
            assert held.recv(1) == b""  # the old container's connection was ended, not carried over
        except ConnectionResetError:
            pass
    assert f"{first}:{port}" not in forwards(daemon)
    docker("rm", "-f", second)


def test_dockerd_restarting(daemon: Cli, label: str) -> None:
    fixed, random_port = f"kcilab-ff-{label}-fixed", f"kcilab-ff-{label}-random"
    run_web(fixed, label, "127.0.0.1::8000", restart=True)
    fixed_port = published(fixed)["8000/tcp"][0]
    docker("rm", "-f", fixed)
    run_web(fixed, label, f"127.0.0.1:{fixed_port}:8000", restart=True)
    run_web(random_port, label, "127.0.0.1::8000", restart=True)
    ready_forward(daemon, f"{fixed}:{fixed_port}")
    with labmod.locked():
        labmod.stop_dockerd()
        labmod.start_dockerd()
        answered = time.monotonic()
    labmod.registry_ready()

    def back() -> bool:
        want = {f"{c}:{p}" for c in (fixed, random_port) for p in published(c).get("8000/tcp", [])}
        have = {n for n, f in forwards(daemon).items() if f["state"] == "ready"}
        return len(want) == 2 and want <= have

    wait_until("every container's forward back and ready", back, 30, step=0.05)
    took = time.monotonic() - answered
    print(f"\nRECOVERY dockerd restarted: the followed set was back {took:.2f}s after dockerd answered "
          "(its containers restart in that time too)")
    status = daemon.status()
    assert any("event stream is back" in e["event"] for e in status["auto"]["events"])
    wait_until("served after the restart", lambda: served(fixed_port) == fixed, 15)
    docker("rm", "-f", fixed, random_port)


# The docker transport's exec pool grows under a burst of probes and shrinks back to its size a minute
# after (tunneld/docker/transport.py IDLE_TTL): its slots' tasks and fds are not the follower's.
POOL_TASKS = {"tunneld.docker.execs.Slot.writer", "tunneld.docker.transport.DockerTransport._run_slot",
              "tunneld.docker.execs.Slot._abort_later"}


def tasks_by_name(cli: Cli) -> dict[str, int]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(cli.control))
        s.sendall(json.dumps({"cmd": "tasks"}).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    tasks: dict[str, int] = json.loads(reply)["tasks"]
    return tasks


def pool_slots(cli: Cli) -> int:
    pool = cli.status()["transport"]["pool"]
    return int(pool["idle"]) + int(pool["busy"]) + int(pool["starting"])


def test_200_containers_come_and_go_and_nothing_is_left_behind(daemon: Cli, label: str) -> None:
    pid = int(daemon.status()["pid"])

    def one(i: int) -> None:
        name = f"kcilab-ff-{label}-churn{i}"
        run_web(name, label, "127.0.0.1::8000")
        docker("rm", "-f", name)

    # A warm-up round first: the Docker client keeps the connections a burst of inspects needed
    # (a bounded pool, reused: the second and later rounds add none), so count from after it.
    with concurrent.futures.ThreadPoolExecutor(CHURN_AT_ONCE) as pool:
        list(pool.map(one, range(-CHURN_AT_ONCE * 2, 0)))
    wait_until("no forwards from earlier tests or the warm-up", lambda: not forwards(daemon), 30)
    time.sleep(1)  # let the earlier connections close
    fds, slots = open_fds(pid), pool_slots(daemon)
    tasks = {k: v for k, v in tasks_by_name(daemon).items() if k not in POOL_TASKS}
    listening = listening_ports(pid)
    seen: set[str] = set()

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(CHURN_AT_ONCE) as pool:
        futures = [pool.submit(one, i) for i in range(CHURN)]
        while not all(f.done() for f in futures):
            seen.update(forwards(daemon))
            time.sleep(0.2)
        for f in futures:
            f.result()
    churn = time.monotonic() - started
    wait_until("every churned forward removed", lambda: not forwards(daemon), 30)
    assert len(seen) > CHURN // 4  # they were followed, not missed
    assert listening_ports(pid) == listening

    def settled() -> bool:
        now = {k: v for k, v in tasks_by_name(daemon).items() if k not in POOL_TASKS}
        grown = {k: v for k, v in now.items() if v > tasks.get(k, 0)}
        # One fd per exec slot; beside those, the follower's Docker client may keep up to INSPECTS_AT_ONCE
        # connections a burst of inspects used (bounded by its limiter, not by how many containers came).
        return not grown and open_fds(pid) - pool_slots(daemon) <= fds - slots + INSPECTS_AT_ONCE

    try:
        wait_until("tasks and file descriptors back where they were (beside the exec pool's)", settled, 30)
    except AssertionError as e:
        now = tasks_by_name(daemon)
        held = sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
        raise AssertionError(f"{e}: tasks {tasks} -> {now}; fds {fds} -> {open_fds(pid)} ({held}); "
                             f"exec slots {slots} -> {pool_slots(daemon)}") from None
    after = daemon.status()
    print(f"\nCHURN {CHURN} containers in {churn:.1f}s, {len(seen)} forwards seen while they ran; "
          f"fds {fds} -> {open_fds(pid)}, exec slots {slots} -> {pool_slots(daemon)}")
    assert not after["auto"]["conflicts"] and after["auto"]["watching"] == 0
    remove_labelled(label)
