"""The things being compared: targets (iperf3, echo) and the proxies in front of them.

Each proxy is a context manager that starts it, waits until it relays, yields a ``Running`` (its
local ports and the pids whose CPU and memory count as the proxy's), and stops only the processes
it started, by pid. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Targets:
    """Where the proxies forward to: an iperf3 server and an echo server (as the far side sees them)."""

    iperf: int
    echo: int
    host: str = HOST


@dataclass
class Running:
    """A started proxy: connect to ``ports[target]`` to reach that target through it."""

    name: str
    ports: dict[str, int]
    pids: list[int] = field(default_factory=list)
    note: str = ""


class ProxyUnavailable(Exception):
    """This row cannot run here (a tool or the lab is missing); the message says why."""


def free_port() -> int:
    """A port that was free a moment ago, for tools that cannot bind port 0 and report it (iperf3,
    socat, ssh). The bench retries on the rare collision; the tests never do this."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, *, timeout: float = START_TIMEOUT, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts on 127.0.0.1:port.

    :raises ProxyUnavailable: if ``proc`` exits first or the deadline passes.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ProxyUnavailable(f"{proc.args!r} exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise ProxyUnavailable(f"nothing listens on {HOST}:{port} after {timeout:g}s")


def wait_echo(port: int, *, timeout: float = START_TIMEOUT, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until a round trip through 127.0.0.1:port comes back (a proxy that accepts may not relay yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ProxyUnavailable(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=2) as s:
                s.sendall(b"ping")
                if s.recv(4) == b"ping":
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise ProxyUnavailable(f"no echo through {HOST}:{port} after {timeout:g}s")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Stop a process this bench started: ``sig``, then SIGKILL after STOP_TIMEOUT."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


def _spawn(argv: Sequence[str], *, log: Path | None = None, env: dict[str, str] | None = None,
           stdout: int | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # handed to the child
    try:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=stdout or out, stderr=out,
                                env=env, start_new_session=True)
    finally:
        if log:
            out.close()  # type: ignore[union-attr]


# ---------------------------------------------------------------- targets


def free_port_in(netns: str) -> int:
    """free_port(), inside a network namespace."""
    out = subprocess.run(["nsenter", f"--net=/var/run/netns/{netns}", sys.executable, "-c",
                          "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"],
                         capture_output=True, text=True, check=True, timeout=30)
    return int(out.stdout)


@contextlib.contextmanager
def targets(workdir: Path, netns: str | None = None) -> Iterator[Targets]:
    """An iperf3 server and an echo server on 127.0.0.1 (inside ``netns`` when given)."""
    prefix = ["nsenter", f"--net=/var/run/netns/{netns}"] if netns else []
    echo = subprocess.Popen([*prefix, sys.executable, "-m", "bench.load", "echo"], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
    iperf: subprocess.Popen[bytes] | None = None
    try:
        assert echo.stdout is not None
        echo_port = int(json.loads(echo.stdout.readline())["port"])
        for _ in range(5):
            port = free_port_in(netns) if netns else free_port()
            iperf = _spawn([*prefix, "iperf3", "-s", "-B", HOST, "-p", str(port)], log=workdir / "iperf3.log")
            time.sleep(0.3)  # iperf3 exits at once when the port is taken
            if iperf.poll() is None and (netns or _accepts(port)):
                break
            stop(iperf)
            iperf = None
        if iperf is None:
            raise ProxyUnavailable(f"iperf3 -s would not start; see {workdir / 'iperf3.log'}")
        yield Targets(iperf=port, echo=echo_port)
    finally:
        if iperf is not None:
            stop(iperf)
        stop(echo)


def _accepts(port: int) -> bool:
    try:
        wait_port(port, timeout=5)
    except ProxyUnavailable:
        return False
    return True


# ---------------------------------------------------------------- proxies


@contextlib.contextmanager
def no_proxy(t: Targets, workdir: Path) -> Iterator[Running]:
    """The limit: clients straight to the targets."""
    yield Running("no proxy", {"iperf": t.iperf, "echo": t.echo})


@contextlib.contextmanager
def socat(t: Targets, workdir: Path) -> Iterator[Running]:
    """``socat TCP-LISTEN:P,reuseaddr,fork TCP:127.0.0.1:Q``, one per target, as people write it."""
    if not shutil.which("socat"):
        raise ProxyUnavailable("socat is not installed (apt-get install socat)")
    procs: list[subprocess.Popen[bytes]] = []
    ports: dict[str, int] = {}
    try:
        for name, target in (("iperf", t.iperf), ("echo", t.echo)):
            port = free_port()
            p = _spawn(["socat", f"TCP-LISTEN:{port},bind={HOST},reuseaddr,fork,backlog=4096",
                        f"TCP:{t.host}:{target}"], log=workdir / "socat.log")
            procs.append(p)
            wait_port(port, proc=p)
            ports[name] = port
        wait_echo(ports["echo"])
        yield Running("socat", ports, [p.pid for p in procs])
    finally:
        for p in procs:
            stop(p)


def tunneld_argv() -> list[str]:
    """The real CLI entry point, run from this checkout (cwd=ROOT): an installed ``kci-tunneld``
    script may belong to another clone, or to one that is gone."""
    return [sys.executable, "-m", "tunneld"]


@contextlib.contextmanager
def tunneld(t: Targets, workdir: Path, *, via: str = "direct", label: str | None = None,
            max_connections: int = 20000, env: dict[str, str] | None = None,
            extra_config: str = "") -> Iterator[Running]:
    """``kci-tunneld start --detach --via VIA --config FILE --control DIR/ctl``, then ``stop``."""
    d = Path(tempfile.mkdtemp(prefix="tunneld-", dir=workdir))
    config = d / "bench.toml"
    # A file, not -L: 10,000 idle connections need max_connections above the default 1024.
    config.write_text(extra_config + "".join(
        f'[[forwards]]\nname = "{name}"\nbind = "{HOST}"\nport = 0\nhost = "{t.host}"\n'
        f"host_port = {port}\nmax_connections = {max_connections}\n\n"
        for name, port in (("iperf", t.iperf), ("echo", t.echo))
    ))
    control = d / "ctl"
    run_env = {**os.environ, **(env or {})}
    base = tunneld_argv()
    started = subprocess.run([*base, "start", "--detach", "--via", via, "--config", str(config),
                              "--control", str(control), "--ready-timeout", str(START_TIMEOUT)],
                             cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=START_TIMEOUT + 10)
    if started.returncode != 0:
        raise ProxyUnavailable(f"kci-tunneld start --via {via} failed ({started.returncode}): "
                               f"{(started.stderr or started.stdout).strip()[-400:]}")
    try:
        status = json.loads(subprocess.run([*base, "status", "--json", "--control", str(control)], cwd=ROOT,
                                           env=run_env, capture_output=True, text=True, check=True,
                                           timeout=30).stdout)
        ports = {f["name"]: int(f["port"]) for f in status["forwards"]}
        wait_echo(ports["echo"])
        yield Running(label or f"kci-tunneld --via {via}", ports, [int(status["pid"])])
    finally:
        subprocess.run([*base, "stop", "--control", str(control)], cwd=ROOT, env=run_env,
                       capture_output=True, timeout=STOP_TIMEOUT + 30)


@contextlib.contextmanager
def openssh(t: Targets, workdir: Path) -> Iterator[Running]:
    """``ssh -N -L`` through an sshd started for the bench on 127.0.0.1 (own keys and config)."""
    for tool in ("ssh", "ssh-keygen"):
        if not shutil.which(tool):
            raise ProxyUnavailable(f"{tool} is not installed (apt-get install openssh-client)")
    if not Path("/usr/sbin/sshd").exists():
        raise ProxyUnavailable("/usr/sbin/sshd is missing (apt-get install openssh-server)")
    d = Path(tempfile.mkdtemp(prefix="sshd-", dir=workdir))
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True,
                       capture_output=True, timeout=30)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    sshd: subprocess.Popen[bytes] | None = None
    ssh: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(5):
            port = free_port()
            (d / "sshd_config").write_text(
                f"ListenAddress {HOST}:{port}\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
                f"PidFile {d / 'sshd.pid'}\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nAllowTcpForwarding yes\n"
                "StrictModes no\nMaxStartups 100\nLogLevel ERROR\n"
            )
            sshd = _spawn(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")], log=d / "sshd.log")
            try:
                wait_port(port, timeout=10, proc=sshd)
                break
            except ProxyUnavailable:
                stop(sshd)
                sshd = None
        if sshd is None:
            raise ProxyUnavailable(f"the bench's sshd would not start; see {d / 'sshd.log'}")
        host_pub = (d / "host_key.pub").read_text().split()
        (d / "known_hosts").write_text(f"[{HOST}]:{port} {host_pub[0]} {host_pub[1]}\n")
        ports = {"iperf": free_port(), "echo": free_port()}
        user = os.environ.get("USER") or "root"
        ssh = _spawn(["ssh", "-N", "-F", "/dev/null", "-i", str(d / "client_key"), "-p", str(port),
                      "-o", f"UserKnownHostsFile={d / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
                      "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
                      "-L", f"{HOST}:{ports['iperf']}:{t.host}:{t.iperf}",
                      "-L", f"{HOST}:{ports['echo']}:{t.host}:{t.echo}", f"{user}@{HOST}"], log=d / "ssh.log")
        wait_echo(ports["echo"], proc=ssh)
        yield Running("OpenSSH ssh -L", ports, [ssh.pid, sshd.pid], note="ssh client + sshd, default cipher")
    finally:
        if ssh is not None:
            stop(ssh)
        if sshd is not None:
            stop(sshd)
