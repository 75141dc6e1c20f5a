"""Real `kci-tunneld` daemons on the lab for the fault and soak tests, and the clients that check them.

Recovery times are measured from the outside, as a CI step would see them: by clients connecting
through the forwards. Leaks are measured on the daemon process: /proc/PID/fd, and the task count
and per-forward active connections that `status` reports.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from tests.cli.runner import Cli
from tests.lab.lab import LabInfo
from tests.servers import echo_through
from tunneld.engine.forward import HISTORY

LEAK_SETTLE = 90.0  # the docker transport trims idle relay streams beyond its pool size after 60-75 s

TIMEOUTS = """[timeouts]
probe_interval = 0.5
probe = 3
connect = 5
reconnect_wait = 5
drain = 2
"""


def forward_toml(name: str, host_port: int, probe: str = "tcp", path: str = "/") -> str:
    return (f'[[forwards]]\nname = "{name}"\nbind = "127.0.0.1"\nport = 0\nhost = "127.0.0.1"\n'
            f'host_port = {host_port}\nprobe = "{probe}"\nprobe_path = "{path}"\n')


@dataclass
class Daemon:
    label: str
    cli: Cli

    @property
    def pid(self) -> int:
        return self.cli.started[-1]

    def status(self) -> dict[str, Any]:
        return self.cli.status()

    def forward(self, name: str) -> dict[str, Any]:
        return next(f for f in self.status()["forwards"] if f["name"] == name)

    def port(self, name: str) -> int:
        return int(self.forward(name)["port"])

    def sockets(self) -> str:
        """The daemon's TCP and unix sockets grouped by state and peer, for a leak report."""
        out = subprocess.run(["ss", "-Htanpx"], capture_output=True, text=True, check=False).stdout
        mine: Counter[str] = Counter()
        for line in out.splitlines():
            if f"pid={self.pid}," in line:
                parts = line.split()
                mine[f"{parts[0]} {parts[1]} -> {parts[-2]}"] += 1
        return ", ".join(f"{n} x {what}" for what, n in mine.most_common(8)) or "none"

    def fds(self) -> list[str]:
        fd_dir = Path(f"/proc/{self.pid}/fd")
        out = []
        for fd in fd_dir.iterdir():
            try:
                out.append(os.readlink(fd))
            except OSError:
                pass  # closed while we looked
        return sorted(out)


def start_daemon(tmp: Path, label: str, transport: str, env: dict[str, str], forwards: str,
                 timeouts: str = TIMEOUTS) -> Daemon:
    config = tmp / f"{label}.toml"
    config.write_text(f"{transport}\n{timeouts}\n{forwards}")
    cli = Cli(tmp / label, env=env)
    (tmp / label).mkdir()
    result = cli.start_detached("--config", str(config), "--ready-timeout", "60", timeout=90)
    assert result.returncode == 0, f"{label}: {result.stderr}"
    return Daemon(label, cli)


def ssh_transport_toml(lab: LabInfo) -> str:
    """--via ssh to the lab with explicit key and known_hosts, keepalives every second, quick reconnects."""
    return (f'[transport]\nvia = "ssh://{lab.ssh_user}@{lab.ssh_host}:{lab.ssh_port}"\n[transport.ssh]\n'
            f'identity_files = ["{lab.ssh_key}"]\nknown_hosts = "{lab.ssh_known_hosts}"\n'
            f'config_file = "{os.devnull}"\nkeepalive_interval = 1\nkeepalive_count_max = 3\n'
            f"reconnect_max_delay = 2\n")


def docker_transport_toml(helper: str) -> str:
    return f'[transport]\nvia = "docker"\n[transport.docker]\nhelper_name = "{helper}"\n'


def echo_ok(port: int, size: int = 4096) -> bool:
    payload = os.urandom(size)
    try:
        return echo_through(port, payload) == payload
    except OSError:
        return False


def registry_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def wait_until(what: str, check: Callable[[], bool], timeout: float, step: float = 0.1) -> float:
    """Poll ``check`` until true; return the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(step)
    return time.monotonic() - started


@dataclass
class Bystander:
    """Round trips through a forward the fault must not touch, every 100 ms, in a thread.

    It makes at least ``rounds`` round trips: ``with`` waits for them at its end, so a fault that
    heals fast does not leave too few to judge by.
    """

    port: int
    rounds: int = 10
    ok: int = 0
    failed: int = 0

    def __enter__(self) -> Self:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            wait_until(f"{self.rounds} bystander round trips", lambda: self.ok + self.failed >= self.rounds, 30)
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        while not self._stop.is_set():
            if echo_ok(self.port, 1024):
                self.ok += 1
            else:
                self.failed += 1
            self._stop.wait(0.1)


@dataclass
class StateWatch:
    """The states a daemon's forward went through between ``with`` and its end.

    Read from the forward's own transition history (``status --json``), not by polling: a poll
    through the CLI takes a few hundred ms under load and can miss a short ``degraded``.
    """

    daemon: Daemon
    name: str
    seen: list[str] = field(default_factory=list)

    def __enter__(self) -> Self:
        fwd = self.daemon.forward(self.name)
        self._start = time.time()
        self.seen = [fwd["state"]]
        return self

    def __exit__(self, *exc: object) -> None:
        fwd = self.daemon.forward(self.name)
        moves = [h for h in fwd["history"] if h["at"] >= self._start]
        assert len(moves) < HISTORY, f"{self.name}: more transitions than the history keeps: {moves}"
        self.seen += [h["to"] for h in moves]


@dataclass(frozen=True)
class Baseline:
    fds: int
    tasks: int


def settled(daemon: Daemon, timeout: float = 60) -> Baseline:
    """Wait until every forward is ready with no client connected; then the fd and task counts."""

    def quiet() -> bool:
        s = daemon.status()
        return s["state"] == "ready" and all(f["active"] == 0 for f in s["forwards"])

    wait_until(f"{daemon.label} ready and idle", quiet, timeout, step=0.2)
    return Baseline(fds=len(daemon.fds()), tasks=int(daemon.status()["tasks"]))


def assert_no_leaks(daemon: Daemon, before: Baseline) -> None:
    """Every forward idle and ready, fds and tasks back to their count before the fault."""
    deadline = time.monotonic() + LEAK_SETTLE
    while True:
        status = daemon.status()
        now = Baseline(fds=len(daemon.fds()), tasks=int(status["tasks"]))
        idle = all(f["active"] == 0 and f["state"] == "ready" for f in status["forwards"])
        if idle and now.fds <= before.fds and now.tasks <= before.tasks:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{daemon.label}: after the fault {now}, before {before}; forwards "
                                 f"{[(f['name'], f['state'], f['active']) for f in status['forwards']]}; "
                                 f"sockets {daemon.sockets()}; fds {daemon.fds()}")
        time.sleep(0.5)


def report(fault: str, **times: float) -> None:
    print(f"\nRECOVERY {fault}: " + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()), flush=True)
