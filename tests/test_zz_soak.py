"""A bounded soak (about 60 s): 200 concurrent clients cycling through two forwards, one over the
docker transport (TLS) and one over SSH, both to the lab's echo service, while faults are injected:
the helper container removed (t=10 s), sshd killed and restarted (t=25 s), the veth down for 3 s
(t=40 s). Every connection checks its echo byte for byte: a connection a fault cuts may fail, but
no byte may come back wrong, and none may silently go missing behind a clean EOF. At the end both
daemons are ready again and their open file descriptors are back to the count they started with.

The clients run on one event loop (anyio.run) in this process rather than as an anyio-marked test
on both loops: the system under test is the daemons, real processes on their own loop, and a second
60 s round on uvloop would only double the time.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio
import pytest

from tests.lab import lab as labmod
from tests.lab.lab import LabError, LabInfo, docker
from tests.lab_daemons import (
    TIMEOUTS,
    Daemon,
    assert_no_leaks,
    docker_transport_toml,
    echo_ok,
    settled,
    ssh_transport_toml,
    start_daemon,
    wait_until,
)

pytestmark = [pytest.mark.timeout(420), pytest.mark.lab]

SOAK_HELPER = "kcilab-soak-helper"
CLIENTS = 200
DURATION = 60.0
MAX_PAYLOAD = 64 * 1024
CONNECTION_DEADLINE = 30.0

# The docker pool grows by ~12 exec/s under a burst: let clients wait for a relay stream that long.
SOAK_TIMEOUTS = TIMEOUTS.replace("connect = 5", "connect = 20")


@pytest.fixture(scope="module")
def soak_daemons(lab: LabInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Daemon]]:
    tmp = tmp_path_factory.mktemp("soak")
    docker("rm", "-f", SOAK_HELPER, check=False)
    echo = (f'[[forwards]]\nname = "echo"\nbind = "127.0.0.1"\nport = 0\nhost = "127.0.0.1"\n'
            f"host_port = {lab.echo_port}\n")
    out: dict[str, Daemon] = {}
    try:
        out["docker"] = start_daemon(tmp, "docker", docker_transport_toml(SOAK_HELPER), lab.docker_env(tls=True),
                                     echo, SOAK_TIMEOUTS)
        out["ssh"] = start_daemon(tmp, "ssh", ssh_transport_toml(lab), {}, echo, SOAK_TIMEOUTS)
        yield out
    finally:
        for d in out.values():
            d.cli.run("stop", "--cleanup", timeout=60)
            d.cli.cleanup()
        docker("rm", "-f", SOAK_HELPER, check=False)


@dataclass
class Tally:
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (forward, outcome) -> count
    bytes_checked: int = 0
    details: list[str] = field(default_factory=list)

    started: float = field(default_factory=time.monotonic)

    def add(self, forward: str, outcome: str, detail: str | None = None) -> None:
        self.outcomes[(forward, outcome)] += 1
        if detail and len(self.details) < 20:
            self.details.append(f"t={time.monotonic() - self.started:.1f}s {forward}: {detail}")

    def count(self, outcome: str, forward: str | None = None) -> int:
        return sum(n for (f, o), n in self.outcomes.items() if o == outcome and forward in (None, f))


async def one_connection(port: int, payload: bytes) -> tuple[bytes, BaseException | None]:
    """Send payload, half-close, read to EOF; return what came back and the error that ended it, if any."""
    got = bytearray()
    try:
        with anyio.fail_after(CONNECTION_DEADLINE):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:

                async def reader() -> None:
                    while True:
                        try:
                            got.extend(await stream.receive(65536))
                        except anyio.EndOfStream:
                            return

                async with anyio.create_task_group() as tg:
                    tg.start_soon(reader)
                    await stream.send(payload)
                    await stream.send_eof()
    except (OSError, anyio.BrokenResourceError, TimeoutError) as e:
        return bytes(got), e
    except BaseExceptionGroup as group:  # the reader's or the sender's failure, from the task group
        return bytes(got), group.exceptions[0]
    return bytes(got), None


async def client(n: int, ports: dict[str, int], deadline: float, tally: Tally) -> None:
    names = sorted(ports)
    rng = random.Random(n)
    i = 0
    while time.monotonic() < deadline:
        name = names[(n + i) % len(names)]  # cycle: each client alternates between the forwards
        i += 1
        payload = rng.randbytes(rng.randint(1, MAX_PAYLOAD))
        got, error = await one_connection(ports[name], payload)
        tally.bytes_checked += len(got)
        if got != payload[: len(got)]:
            tally.add(name, "corrupt", f"{len(got)} of {len(payload)} bytes, differing")
        elif error is None and len(got) == len(payload):
            tally.add(name, "ok")
        elif error is None and not got:
            tally.add(name, "refused")  # the transport could not connect: a clean EOF, nothing sent back
        elif error is None:
            tally.add(name, "truncated", f"clean EOF after {len(got)} of {len(payload)} bytes")
        else:
            tally.add(name, "broken", f"{type(error).__name__} after {len(got)} of {len(payload)} bytes")


def inject_faults(lab: LabInfo, started: float, log: list[str], stop: threading.Event) -> None:
    def at(t: float) -> bool:
        return not stop.wait(max(0.0, started + t - time.monotonic()))

    if at(10):
        # dockerd refuses now and then ("container PID is zombie and can not be killed") while the
        # shim reaps the helper's exec'd processes: retry, as a person would.
        for attempt in range(5):
            try:
                docker("rm", "-f", SOAK_HELPER)
                break
            except LabError:
                if attempt == 4:
                    raise
                time.sleep(1)
        log.append(f"{time.monotonic() - started:.1f}s helper removed")
    if at(25):
        labmod.stop_sshd(sessions=True)
        log.append(f"{time.monotonic() - started:.1f}s sshd killed")
        time.sleep(2)
        labmod.start_sshd()
        log.append(f"{time.monotonic() - started:.1f}s sshd started")
    if at(40):
        subprocess.run(["ip", "link", "set", lab.host_veth, "down"], check=True, timeout=10)
        log.append(f"{time.monotonic() - started:.1f}s veth down")
        try:
            time.sleep(3)
        finally:
            subprocess.run(["ip", "link", "set", lab.host_veth, "up"], check=True, timeout=10)
        log.append(f"{time.monotonic() - started:.1f}s veth up")


def test_soak_200_clients_two_forwards_with_faults(soak_daemons: dict[str, Daemon], lab: LabInfo) -> None:
    before = {label: settled(d) for label, d in soak_daemons.items()}
    ports = {label: d.port("echo") for label, d in soak_daemons.items()}
    tally = Tally()
    faults: list[str] = []
    stop = threading.Event()

    async def main() -> None:
        started = tally.started = time.monotonic()
        injector = threading.Thread(target=inject_faults, args=(lab, started, faults, stop), daemon=True)
        injector.start()
        try:
            async with anyio.create_task_group() as tg:
                for n in range(CLIENTS):
                    tg.start_soon(client, n, ports, started + DURATION, tally)
        finally:
            stop.set()
            await anyio.to_thread.run_sync(injector.join, 30)

    started = time.monotonic()
    anyio.run(main)
    elapsed = time.monotonic() - started
    summary = {f"{f}/{o}": n for (f, o), n in sorted(tally.outcomes.items())}
    print(f"\nSOAK {elapsed:.1f}s, {CLIENTS} clients: {summary}; {tally.bytes_checked / 2**20:.1f} MiB echoed and "
          f"checked; faults: {faults}; examples: {tally.details[:8]}", flush=True)
    assert len(faults) == 5, faults
    assert tally.count("corrupt") == 0, tally.details
    assert tally.count("truncated") == 0, tally.details
    for label in ports:
        assert tally.count("ok", label) > 500, summary  # both forwards carried real load throughout

    for label, d in soak_daemons.items():
        wait_until(f"{label} serves after the soak", lambda d=d: echo_ok(d.port("echo")), 30)
        assert_no_leaks(d, before[label])
        status = d.status()
        fwd = status["forwards"][0]
        print(f"SOAK {label}: total {fwd['total']}, errors {fwd['errors']}, reconnects {fwd['reconnects']}, "
              f"up {fwd['bytes_up']}, down {fwd['bytes_down']}, transport {status['transport'].get('reconnects')}",
              flush=True)
        assert fwd["active"] == 0
