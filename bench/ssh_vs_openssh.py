"""OpenSSH ``ssh -N -L`` against kci-tunneld ``--via ssh``, side by side: same lab sshd, same cipher.

Run from the repository root with the lab up (``python3 -m tests.lab up``), as root:

    python3 bench/ssh_vs_openssh.py                  # both ciphers, 5 s per throughput run
    python3 bench/ssh_vs_openssh.py --seconds 10 --ciphers aes128-gcm@openssh.com

For each cipher it starts one forwarder at a time, each to the same two targets inside the lab
namespace (an iperf3 server this script starts on the namespace's 127.0.0.1, and the lab's echo
service), and measures through it:

- throughput, 1 stream up (client -> far side), 1 stream down (iperf3 -R), 8 streams up;
- 64-byte round trip p50/p99 on one connection (ping-pong through the echo service);
- channel set-up p50/p99: connect -> first echoed byte, a fresh connection (= SSH channel) each;
- new connections per second with 1 and 32 concurrent clients (connect, one 64-byte round trip,
  close: ``python3 -m bench.load conns``, as ``python3 -m bench`` measures it);
- CPU of the forwarding process (``ssh`` or the daemon) during each throughput run.

kci-tunneld runs as the real daemon (``python -m tunneld start --detach``), on uvloop unless
``--loop asyncio``. It prints a markdown table and writes it to bench/results/ssh.md. A benchmark,
not a test: nothing here gates CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.proxies import tunneld_argv  # noqa: E402
from tests.lab.lab import info as lab_info  # noqa: E402

CIPHERS = ("chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com")
# Issue 17's goals, against OpenSSH with the same cipher: throughput and new connections per second at
# least this share of OpenSSH's, RTT p50 at most this multiple of it.
GOAL_THROUGHPUT = 0.8
GOAL_CONNS = 0.8
GOAL_RTT = 1.3
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    """One run's figures (or the per-field median of several runs)."""

    mbps_up: float = 0.0
    mbps_down: float = 0.0
    mbps_up8: float = 0.0
    cpu_up: float = 0.0  # % of one core during the 1-stream-up run
    cpu_down: float = 0.0
    rtt_p50_us: float = 0.0
    rtt_p99_us: float = 0.0
    setup_p50_us: float = 0.0
    setup_p99_us: float = 0.0
    conns_1: float = 0.0  # new connections per second, 1 client
    conns_32: float = 0.0
    # CPU of the forwarding process per unit of work: steadier than rates on a loaded machine.
    cpu_rtt_us: float = 0.0  # per 64-byte round trip
    cpu_conn_us: float = 0.0  # per new connection (the 32-client run)

    @staticmethod
    def median(runs: list[Result]) -> Result:
        return Result(**{f.name: statistics.median(getattr(r, f.name) for r in runs) for f in fields(Result)})


# ---------------------------------------------------------------- processes and ports


def free_port() -> int:
    """A port free right now (the OpenSSH side needs a number up front; a benchmark can live with the race)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the forwarder exited with code {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def iperf_server(netns: Path, port: int) -> Iterator[None]:
    proc = subprocess.Popen(["nsenter", f"--net={netns}", "iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.3)
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"iperf3 server in {netns} exited: {err.strip()}")
        yield
    finally:
        stop(proc)


def cipher_config(base: Path, cipher: str, alias: str, out: Path) -> Path:
    """The lab's ssh config with ``Ciphers`` pinned for the alias (ssh and asyncssh take the first value)."""
    text = base.read_text()
    pattern = re.compile(rf"^(Host\s+[^\n]*\b{re.escape(alias)}\b[^\n]*)$", re.M)
    if not pattern.search(text):
        raise RuntimeError(f"no `Host {alias}` in {base}")
    out.write_text(pattern.sub(rf"\1\n    Ciphers {cipher}", text, count=1))
    return out


@contextmanager
def openssh_forward(config: Path, alias: str, iperf_port: int, echo_port: int) -> Iterator[tuple[int, int, int]]:
    p_iperf, p_echo = free_port(), free_port()
    proc = subprocess.Popen(
        ["ssh", "-F", str(config), "-N", "-o", "ExitOnForwardFailure=yes",
         "-L", f"127.0.0.1:{p_iperf}:127.0.0.1:{iperf_port}", "-L", f"127.0.0.1:{p_echo}:127.0.0.1:{echo_port}", alias],
        stdin=subprocess.DEVNULL,
    )
    try:
        # Both -L listeners come up together; probing the echo one keeps stray connections off iperf3,
        # whose server takes any connection for a test client.
        wait_listening(p_echo, proc)
        yield p_iperf, p_echo, proc.pid
    finally:
        stop(proc)


@contextmanager
def tunneld_forward(config: Path, alias: str, iperf_port: int, echo_port: int, workdir: Path,
                    loop: str, cipher: str) -> Iterator[tuple[int, int, int]]:
    toml = workdir / "tunneld.toml"
    toml.write_text(f"""\
[transport]
via = "ssh://{alias}"
[transport.ssh]
config_file = "{config}"
[[forwards]]
name = "iperf"
bind = "127.0.0.1"
host = "127.0.0.1"
host_port = {iperf_port}
[[forwards]]
name = "echo"
bind = "127.0.0.1"
host = "127.0.0.1"
host_port = {echo_port}
""")
    control = workdir / "c.sock"
    env = {**os.environ, "KCI_TUNNELD_LOOP": loop, "PYTHONPATH": str(ROOT)}
    cli = tunneld_argv()
    subprocess.run([*cli, "start", "--detach", "--config", str(toml), "--control", str(control),
                    "--log-level", "warning"], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, timeout=60)
    try:
        status = json.loads(subprocess.run([*cli, "status", "--json", "--control", str(control)], check=True,
                                           env=env, cwd=ROOT, capture_output=True, timeout=30).stdout)
        ports = {f["name"]: f["port"] for f in status["forwards"]}
        if status["transport"].get("cipher") != cipher:  # a fair comparison needs the same cipher
            raise RuntimeError(f"the daemon negotiated {status['transport'].get('cipher')}, not {cipher}")
        yield ports["iperf"], ports["echo"], int(status["pid"])
    finally:
        subprocess.run([*cli, "stop", "--control", str(control)], env=env, cwd=ROOT, timeout=60,
                       stdout=subprocess.DEVNULL)


# ---------------------------------------------------------------- measurements


def iperf(port: int, seconds: float, *, streams: int = 1, reverse: bool = False, pid: int) -> tuple[float, float]:
    """(MB/s received, CPU % of ``pid``) for one iperf3 run through the forward on ``port``."""
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", f"{seconds:g}", "-J", "-P", str(streams)]
    if reverse:
        argv.append("-R")
    error = ""
    for _ in range(10):
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        out = subprocess.run(argv, capture_output=True, timeout=seconds + 30)
        cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100
        data = json.loads(out.stdout or b"{}")
        if "error" not in data and not out.returncode:
            return data["end"]["sum_received"]["bits_per_second"] / 8 / 1e6, cpu
        # The iperf3 server needs a moment between tests ("busy"); say so and try again.
        error = data.get("error") or out.stderr.decode().strip()
        print(f"#   iperf3: {error}; retrying", file=sys.stderr)
        time.sleep(1)
    raise RuntimeError(f"iperf3 failed: {error}")


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise RuntimeError("echo closed early")
        buf += chunk
    return bytes(buf)


def pct(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1] if len(samples) > 1 else samples[0]


def rtt(port: int, count: int) -> tuple[float, float]:
    """64-byte ping-pong on one connection; (p50, p99) in microseconds."""
    msg = os.urandom(64)
    samples = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(50):  # warm-up
            s.sendall(msg)
            recv_exactly(s, 64)
        for _ in range(count):
            t0 = time.perf_counter_ns()
            s.sendall(msg)
            recv_exactly(s, 64)
            samples.append((time.perf_counter_ns() - t0) / 1000)
    return pct(samples, 50), pct(samples, 99)


def setup(port: int, count: int) -> tuple[float, float]:
    """connect -> first echoed byte on a fresh connection each time; (p50, p99) in microseconds."""
    samples = []
    for _ in range(count):
        t0 = time.perf_counter_ns()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(b"x")
            recv_exactly(s, 1)
            samples.append((time.perf_counter_ns() - t0) / 1000)
    return pct(samples, 50), pct(samples, 99)


def conns(port: int, concurrency: int, seconds: float) -> float:
    """New connections per second through the forward: ``concurrency`` clients, each connecting, doing one
    64-byte round trip and closing, for ``seconds`` (bench/load.py, its own process)."""
    out = subprocess.run([sys.executable, "-m", "bench.load", "conns", "--port", str(port), "--concurrency",
                          str(concurrency), "--seconds", f"{seconds:g}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"bench.load conns failed: {out.stderr.strip()[-400:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    if data["errors"]:
        print(f"#   conns at {concurrency}: {int(data['errors'])} failed", file=sys.stderr)
    time.sleep(0.5)  # let the closes settle before the next run
    return float(data["per_second"])


def measure(ports: tuple[int, int, int], args: argparse.Namespace) -> Result:
    p_iperf, p_echo, pid = ports
    r = Result()
    r.mbps_up, r.cpu_up = iperf(p_iperf, args.seconds, pid=pid)
    r.mbps_down, r.cpu_down = iperf(p_iperf, args.seconds, reverse=True, pid=pid)
    r.mbps_up8, _ = iperf(p_iperf, args.seconds, streams=8, pid=pid)
    cpu0 = cpu_seconds(pid)
    r.rtt_p50_us, r.rtt_p99_us = rtt(p_echo, args.rtt_count)
    r.cpu_rtt_us = (cpu_seconds(pid) - cpu0) / (args.rtt_count + 50) * 1e6  # 50 warm-up round trips
    r.setup_p50_us, r.setup_p99_us = setup(p_echo, args.setup_count)
    r.conns_1 = conns(p_echo, 1, args.conn_seconds)
    cpu0 = cpu_seconds(pid)
    r.conns_32 = conns(p_echo, 32, args.conn_seconds)
    r.cpu_conn_us = (cpu_seconds(pid) - cpu0) / max(1.0, r.conns_32 * args.conn_seconds) * 1e6
    return r


# ---------------------------------------------------------------- report


def table(results: dict[str, tuple[Result, Result]]) -> str:
    rows: list[tuple[str, Callable[[Result], float], str, bool]] = [
        ("1 stream up, MB/s", lambda r: r.mbps_up, "{:.0f}", True),
        ("1 stream down, MB/s", lambda r: r.mbps_down, "{:.0f}", True),
        ("8 streams up, MB/s", lambda r: r.mbps_up8, "{:.0f}", True),
        ("CPU, 1 stream up, %", lambda r: r.cpu_up, "{:.0f}", False),
        ("CPU, 1 stream down, %", lambda r: r.cpu_down, "{:.0f}", False),
        ("CPU per MB up, ms", lambda r: r.cpu_up * 10 / r.mbps_up if r.mbps_up else 0.0, "{:.2f}", False),
        ("CPU per MB down, ms", lambda r: r.cpu_down * 10 / r.mbps_down if r.mbps_down else 0.0, "{:.2f}", False),
        ("64 B RTT p50, us", lambda r: r.rtt_p50_us, "{:.0f}", False),
        ("64 B RTT p99, us", lambda r: r.rtt_p99_us, "{:.0f}", False),
        ("channel set-up p50, us", lambda r: r.setup_p50_us, "{:.0f}", False),
        ("channel set-up p99, us", lambda r: r.setup_p99_us, "{:.0f}", False),
        ("new connections/s, 1 client", lambda r: r.conns_1, "{:.0f}", True),
        ("new connections/s, 32 clients", lambda r: r.conns_32, "{:.0f}", True),
        ("CPU per round trip, us", lambda r: r.cpu_rtt_us, "{:.0f}", False),
        ("CPU per new connection, us", lambda r: r.cpu_conn_us, "{:.0f}", False),
    ]
    head = "| metric |" + "".join(f" OpenSSH {c.split('@')[0]} | tunneld | ratio |" for c in results)
    sep = "|---|" + "---:|---:|---:|" * len(results)
    lines = [head, sep]
    for name, get, fmt, _ in rows:
        cells = []
        for ours_vs in results.values():
            o, t = get(ours_vs[0]), get(ours_vs[1])
            ratio = f"{t / o:.2f}x" if o else "-"
            cells += [fmt.format(o), fmt.format(t), ratio]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(results: dict[str, tuple[Result, Result]]) -> list[str]:
    out = []
    for cipher, (o, t) in results.items():
        at_least = (("1 stream up", o.mbps_up, t.mbps_up, GOAL_THROUGHPUT),
                    ("1 stream down", o.mbps_down, t.mbps_down, GOAL_THROUGHPUT),
                    ("new connections/s, 1 client", o.conns_1, t.conns_1, GOAL_CONNS),
                    ("new connections/s, 32 clients", o.conns_32, t.conns_32, GOAL_CONNS))
        for label, a, b, goal in at_least:
            ratio = b / a if a else 0.0
            out.append(f"- {cipher} {label}: {ratio:.2f}x OpenSSH (goal >= {goal}x): "
                       f"{'met' if ratio >= goal else 'NOT met'}")
        ratio = t.rtt_p50_us / o.rtt_p50_us if o.rtt_p50_us else 0.0
        out.append(f"- {cipher} 64 B RTT p50: {ratio:.2f}x OpenSSH (goal <= {GOAL_RTT}x): "
                   f"{'met' if ratio <= GOAL_RTT else 'NOT met'}")
    return out


def environment(loop: str) -> str:
    import asyncssh  # the daemon's own dependency; only its version is reported here

    ssh_v = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    return (f"{platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, asyncssh "
            f"{asyncssh.__version__}, loop {loop}; client {ssh_v}; sshd: the lab's (same for both)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ciphers", nargs="+", default=list(CIPHERS))
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput run (default 5)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per forwarder, alternating; medians reported")
    parser.add_argument("--rtt-count", type=int, default=2000)
    parser.add_argument("--setup-count", type=int, default=200)
    parser.add_argument("--conn-seconds", type=float, default=3.0, help="per connections-per-second run")
    parser.add_argument("--iperf-port", type=int, default=5299, help="iperf3 server port inside the namespace")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="the daemon's event loop")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ssh.md")
    args = parser.parse_args(argv)
    lab = lab_info()
    for tool in ("ssh", "iperf3", "nsenter"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    loop_env = "auto" if args.loop == "uvloop" else "asyncio"
    results: dict[str, tuple[Result, Result]] = {}
    load_before = f"{os.getloadavg()[0]:.2f}"
    with tempfile.TemporaryDirectory(prefix="kci-bench-ssh-") as tmp, iperf_server(lab.netns_path, args.iperf_port):
        work = Path(tmp)
        for cipher in args.ciphers:
            cfg = cipher_config(lab.ssh_config, cipher, lab.ssh_alias, work / f"ssh_config.{cipher}")
            theirs_runs, ours_runs = [], []
            # Alternate the two so a burst of load elsewhere on the machine hits both alike.
            for i in range(args.repeat):
                print(f"# {cipher} run {i + 1}/{args.repeat}: OpenSSH ssh -N -L ...", file=sys.stderr)
                with openssh_forward(cfg, lab.ssh_alias, args.iperf_port, lab.echo_port) as ports:
                    theirs_runs.append(measure(ports, args))
                print(f"# {cipher} run {i + 1}/{args.repeat}: kci-tunneld --via ssh://{lab.ssh_alias} ...",
                      file=sys.stderr)
                with tunneld_forward(cfg, lab.ssh_alias, args.iperf_port, lab.echo_port, work, loop_env,
                                     cipher) as ports:
                    ours_runs.append(measure(ports, args))
            results[cipher] = (Result.median(theirs_runs), Result.median(ours_runs))
    command = "python3 bench/ssh_vs_openssh.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = "\n".join([
        "# SSH transport: kci-tunneld vs OpenSSH `ssh -N -L`",
        "",
        f"`{command.strip()}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        environment(args.loop),
        "",
        table(results),
        "",
        "Goals (issue 17's, against OpenSSH with the same cipher):",
        *goals(results),
        "",
        f"Medians of {args.repeat} alternating runs per forwarder. Load average before/after: {load_before} / "
        f"{os.getloadavg()[0]:.2f} (other work on this machine makes wall-clock figures noisy; CPU per MB "
        "is the steadier comparison). "
        f"Throughput: iperf3, {args.seconds:g} s per run, received bytes; CPU: the forwarding process "
        "(ssh client, or the daemon) in % of one core; per round trip and per new connection (the 32-client "
        "run): its CPU time divided by the count. RTT: 64-byte ping-pong through the lab echo service, "
        f"{args.rtt_count} round trips on one connection. Set-up: connect -> first echoed byte, "
        f"{args.setup_count} fresh connections (one SSH channel each). New connections/s: 1 or 32 clients "
        f"each connecting, doing one 64-byte round trip and closing, for {args.conn_seconds:g} s.",
        "",
    ])
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"(written to {args.out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
