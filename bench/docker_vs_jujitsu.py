"""The socat jujitsu against kci-tunneld ``--via docker``, side by side on the lab, in one run.

Run from the repository root with the lab up (``python3 -m tests.lab up``), as root:

    python3 bench/docker_vs_jujitsu.py                 # Docker over TCP+TLS (the CircleCI shape)
    python3 bench/docker_vs_jujitsu.py --docker unix   # over the lab's unix socket instead

Both forwarders reach the same targets inside the lab namespace: an echo server and an iperf3 server
(started here on the namespace's 127.0.0.1) and the lab's registry (its 127.0.0.1:5000).

- **jujitsu**: a helper container running the socat image with ``--net=host``, sleeping, and here
  ``socat TCP-LISTEN:P,reuseaddr,fork EXEC:'docker exec -i HELPER socat STDIO TCP:localhost:TARGET'``
  with DOCKER_HOST (and DOCKER_TLS_VERIFY, DOCKER_CERT_PATH) pointing at the lab;
- **kci-tunneld**: the real daemon, ``python -m tunneld start --detach --via docker``, same env, once
  with the socat image as its helper (relay.sh: a socat per connection) and once with the lab's
  python3 image (since the mux relay: helper/mux.py, every connection over two execs; before,
  helper/relay.py, an exec per connection); ``--helpers`` picks. bench/docker_mux.py sets the mux
  against the pool of execs and the issue's limits.

Measured through each, interleaved metric by metric so background load hits both alike:

- set-up latency: connect() -> first echoed byte of a 64-byte request, a fresh connection each;
  1 client (sequential) and bursts of 32 clients connecting at once (the first burst, when
  kci-tunneld's pool still grows, is reported apart from the following ones); each forwarder's
  latency block starts after a second of quiet, so it is not measured while dockerd still tears
  down the other forwarder's execs;
- the clients' own floor: the same set-up measurements straight to the same echo server program
  on this host's loopback, no forwarder, in the same turns (part of every row's latency);
- connections per second: 32 clients in a closed loop (connect, 64-byte round trip, close);
- one-stream throughput: iperf3, 1 stream, client -> far side (up) and far side -> client (down);
- skopeo push + pull wall time of a 48 MiB, 3-layer image of random bytes, and the same straight
  from inside the namespace (``nsenter --net=...``): the limit.

It prints a markdown table and writes it to bench/results/docker.md. A benchmark, not a test:
nothing here gates anything. ``jujitsu_forward`` and ``tunneld_forward`` are also the lab rows of
``python3 -m bench`` (bench/lab_rows.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.proxies import free_port, stop, targets, tunneld_argv, wait_port  # noqa: E402
from tests.lab.lab import LabInfo  # noqa: E402
from tests.lab.lab import info as lab_info  # noqa: E402
from tests.oci import build_layout  # noqa: E402

MSG = b"x" * 64
SETTLE = 1.0  # seconds of quiet before a latency block: the previous block's teardown is over
SKOPEO_TIMEOUT = 900


# ---------------------------------------------------------------- the two forwarders


def docker_env(lab: LabInfo, mode: str) -> dict[str, str]:
    """The environment both forwarders get: the lab's Docker host, nothing else from ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env.update(lab.docker_env(tls=mode == "tls"))
    env["DOCKER_CONFIG"] = tempfile.mkdtemp(prefix="kci-bench-docker-")  # no stray contexts
    return env


@contextmanager
def jujitsu(lab: LabInfo, targets_: Mapping[str, int], workdir: Path, mode: str = "tls"
            ) -> Iterator[tuple[dict[str, int], list[int]]]:
    """The socat jujitsu: one local ``socat ... fork EXEC:'docker exec -i ...'`` per target."""
    env = docker_env(lab, mode)
    helper = f"kci-bench-portforward-{uuid.uuid4().hex[:6]}"
    subprocess.run(["docker", "run", "-d", "--name", helper, "--net=host", "--entrypoint", "sh", lab.socat_image,
                    "-c", "exec sleep 2147483647"], check=True, env=env, stdout=subprocess.DEVNULL, timeout=60)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = {}
        for name, target in targets_.items():
            port = free_port()
            log = open(workdir / f"jujitsu-{name}.log", "ab")
            procs.append(subprocess.Popen(
                ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                 # the quotes are socat's: its address syntax would split the command at its colons
                 f"EXEC:'docker exec -i {helper} socat STDIO TCP:localhost:{target}'"],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True))
            log.close()
            wait_port(port, proc=procs[-1])
            ports[name] = port
        yield ports, [p.pid for p in procs]
    finally:
        for p in procs:
            stop(p)
        subprocess.run(["docker", "rm", "-f", helper], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(env["DOCKER_CONFIG"], ignore_errors=True)


@contextmanager
def tunneld(lab: LabInfo, targets_: Mapping[str, int], workdir: Path, mode: str = "tls",
            image: str | None = None, docker_extra: str = "") -> Iterator[tuple[dict[str, int], list[int]]]:
    """kci-tunneld --via docker as a detached daemon (the real CLI), stopped with --cleanup;
    ``docker_extra``: more lines of its [transport.docker] table."""
    env = docker_env(lab, mode)
    env["PYTHONPATH"] = str(ROOT)
    toml = workdir / "tunneld.toml"
    forwards = "".join(f'[[forwards]]\nname = "{n}"\nbind = "127.0.0.1"\nhost = "127.0.0.1"\nhost_port = {p}\n'
                       for n, p in targets_.items())
    toml.write_text(f'[transport]\nvia = "docker"\n[transport.docker]\nhelper_name = "kci-bench-helper-'
                    f'{uuid.uuid4().hex[:6]}"\nhelper_image = "{image or lab.socat_image}"\n{docker_extra}{forwards}')
    control = workdir / "c.sock"
    cli = tunneld_argv()
    subprocess.run([*cli, "start", "--detach", "--config", str(toml), "--control", str(control),
                    "--log-level", "warning", "--log-file", str(workdir / "tunneld.log")],
                   check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, timeout=120)
    try:
        status = json.loads(subprocess.run([*cli, "status", "--json", "--control", str(control)], check=True,
                                           env=env, cwd=ROOT, capture_output=True, timeout=30).stdout)
        yield {f["name"]: int(f["port"]) for f in status["forwards"]}, [int(status["pid"])]
    finally:
        subprocess.run([*cli, "stop", "--cleanup", "--control", str(control)], env=env, cwd=ROOT, timeout=120,
                       stdout=subprocess.DEVNULL)
        shutil.rmtree(env["DOCKER_CONFIG"], ignore_errors=True)


@contextmanager
def jujitsu_forward(lab: Any, iperf_port: int, echo_port: int, workdir: Path) -> Iterator[tuple[int, int, list[int]]]:
    """The hook bench/lab_rows.py borrows: (local iperf port, local echo port, pids)."""
    with jujitsu(lab, {"iperf": iperf_port, "echo": echo_port}, workdir) as (ports, pids):
        yield ports["iperf"], ports["echo"], pids


@contextmanager
def tunneld_forward(lab: Any, iperf_port: int, echo_port: int, workdir: Path) -> Iterator[tuple[int, int, list[int]]]:
    """The hook bench/lab_rows.py borrows: (local iperf port, local echo port, pids)."""
    with tunneld(lab, {"iperf": iperf_port, "echo": echo_port}, workdir) as (ports, pids):
        yield ports["iperf"], ports["echo"], pids


# ---------------------------------------------------------------- measurements


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q / 100))]


def one_setup(port: int) -> float:
    """Seconds from connect() to the first echoed byte of a 64-byte request on a fresh connection."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(MSG)
        if not s.recv(len(MSG)):
            raise ConnectionError("closed before echoing")
        took = time.perf_counter() - t0
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    return took


def sequential(port: int, count: int) -> list[float]:
    """``count`` set-ups through one forwarder, one after the other (after a warm-up one)."""
    one_setup(port)
    return [one_setup(port) for _ in range(count)]


def bursts(port: int, clients: int, rounds: int) -> list[list[float]]:
    """``rounds`` bursts of ``clients`` connections started at once; the latencies of each burst."""
    out = []
    for _ in range(rounds):
        barrier = threading.Barrier(clients)
        samples: list[float] = []
        errors: list[BaseException] = []

        def client(barrier: threading.Barrier = barrier, samples: list[float] = samples,
                   errors: list[BaseException] = errors) -> None:
            barrier.wait()
            try:
                samples.append(one_setup(port))
            except OSError as e:
                errors.append(e)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        if errors:
            raise RuntimeError(f"{len(errors)} of {clients} connections failed: {errors[0]}")
        out.append(samples)
        time.sleep(0.2)
    return out


def conns_per_second(port: int, clients: int, seconds: float) -> float:
    out = subprocess.run([sys.executable, "-m", "bench.load", "conns", "--port", str(port), "--concurrency",
                          str(clients), "--seconds", f"{seconds:g}", "--timeout", "60"],
                         capture_output=True, check=True, cwd=ROOT, timeout=seconds + 120)
    data = json.loads(out.stdout)
    if data["errors"]:
        print(f"#   conns: {data['errors']} errors", file=sys.stderr)
    return float(data["per_second"])


def iperf(port: int, seconds: float, *, reverse: bool = False) -> float:
    """MB/s received by one iperf3 stream through the forward."""
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", f"{seconds:g}", "-J"] + (["-R"] if reverse else [])
    error = ""
    for _ in range(10):
        out = subprocess.run(argv, capture_output=True, timeout=seconds + 60)
        data = json.loads(out.stdout or b"{}")
        if "error" not in data and not out.returncode:
            return float(data["end"]["sum_received"]["bits_per_second"]) / 8 / 1e6
        error = data.get("error") or out.stderr.decode().strip()
        print(f"#   iperf3: {error}; retrying", file=sys.stderr)
        time.sleep(1)
    raise RuntimeError(f"iperf3 failed: {error}")


def skopeo_roundtrip(layout: Any, registry: str, prefix: list[str], workdir: Path) -> float:
    """Wall seconds of ``skopeo copy`` push, then pull, of ``layout`` through ``registry``."""
    repo = f"kci-bench/{uuid.uuid4().hex[:10]}"
    dest = workdir / f"pull-{uuid.uuid4().hex[:6]}"
    t0 = time.perf_counter()
    for args in (["--dest-tls-verify=false", layout.ref, f"docker://{registry}/{repo}:{layout.tag}"],
                 ["--src-tls-verify=false", f"docker://{registry}/{repo}:{layout.tag}", f"oci:{dest}:{layout.tag}"]):
        out = subprocess.run([*prefix, "skopeo", "copy", "--quiet", "--preserve-digests", *args],
                             capture_output=True, text=True, timeout=SKOPEO_TIMEOUT, stdin=subprocess.DEVNULL)
        if out.returncode:
            raise RuntimeError(f"skopeo copy {' '.join(args)} failed: {out.stderr.strip()}")
    took = time.perf_counter() - t0
    shutil.rmtree(dest, ignore_errors=True)
    return took


@dataclass
class Row:
    name: str
    setup1: list[float] = field(default_factory=list)
    burst_cold: list[float] = field(default_factory=list)
    burst_warm: list[float] = field(default_factory=list)
    conns1: float = 0.0
    conns32: float = 0.0
    up: float = 0.0
    down: float = 0.0
    skopeo: float = float("inf")
    failures: list[str] = field(default_factory=list)


def measure(rows: dict[str, tuple[Row, dict[str, int]]], args: argparse.Namespace, layout: Any,
            workdir: Path, floor: tuple[Row, dict[str, int]]) -> None:
    """Every metric, round by round, the rows taking turns: background load hits both alike.
    Latency samples pool over the rounds; rates and times keep each row's best round. ``floor`` (the
    clients straight to an echo server here, no forwarder) takes its turn in the latency blocks."""
    for r in range(args.rounds):
        def each(what: str, fn: Any, r: int = r, with_floor: bool = False) -> None:
            order = list(rows.values()) + ([floor] if with_floor else [])
            for row, ports in order[::-1] if r % 2 else order:  # who goes first alternates too
                print(f"# round {r + 1}/{args.rounds}, {row.name}: {what}", file=sys.stderr, flush=True)
                try:
                    fn(row, ports)
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    # One failed run (the jujitsu drops connections under load) costs that round only.
                    row.failures.append(f"round {r + 1}, {what}: {e}")
                    print(f"#   failed: {e}", file=sys.stderr, flush=True)

        def setup1(row: Row, p: dict[str, int]) -> None:
            # In blocks, not sample by sample: the jujitsu's `docker exec` returns before dockerd and
            # runc have torn its exec down (tens of ms of CPU), and an alternating sample of the
            # other forwarder was measured on a host still busy with that.
            time.sleep(SETTLE)
            row.setup1.extend(sequential(p["echo"], max(1, args.setup_count // args.rounds)))

        each("set-up latency, 1 client", setup1, with_floor=True)

        def burst(row: Row, p: dict[str, int], r: int = r) -> None:
            time.sleep(SETTLE)
            got = bursts(p["echo"], 32, max(1, args.bursts // args.rounds) + (1 if r == 0 else 0))
            if r == 0:
                row.burst_cold, got = got[0], got[1:]
            row.burst_warm.extend(x for b in got for x in b)

        each("set-up latency, bursts of 32", burst, with_floor=True)
        each("conn/s, 1 client", lambda row, p: setattr(row, "conns1", max(
            row.conns1, conns_per_second(p["echo"], 1, args.seconds))))
        each("conn/s, 32 clients", lambda row, p: setattr(row, "conns32", max(
            row.conns32, conns_per_second(p["echo"], 32, args.seconds))))
        each("throughput up", lambda row, p: setattr(row, "up", max(row.up, iperf(p["iperf"], args.seconds))))
        each("throughput down", lambda row, p: setattr(row, "down", max(
            row.down, iperf(p["iperf"], args.seconds, reverse=True))))
        each("skopeo push+pull", lambda row, p: setattr(row, "skopeo", min(
            row.skopeo, skopeo_roundtrip(layout, f"127.0.0.1:{p['registry']}", [], workdir))))


# ---------------------------------------------------------------- report


def ms(x: float) -> str:
    return f"{x * 1000:.1f}" if x < 1 else f"{x * 1000:.0f}"


def table(jj: Row, kts: list[Row], limit: float, mode: str, layout_mib: float) -> str:
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.1f}x" if b else "-"

    lines = [
        f"| Docker over {'TCP+TLS' if mode == 'tls' else 'the unix socket'} | socat jujitsu | "
        + " | ".join(f"{kt.name} | better by" for kt in kts) + " |",
        "|---|---:|" + "---:|---:|" * len(kts),
    ]

    def add(label: str, value: Any, fmt: Any, lower_is_better: bool = True) -> None:
        a = value(jj)
        cells = [f"{fmt(value(kt))} | {ratio(a, value(kt)) if lower_is_better else ratio(value(kt), a)}" for kt in kts]
        lines.append(f"| {label} | {fmt(a)} | " + " | ".join(cells) + " |")

    count = lambda x: f"{x:.0f}"  # noqa: E731
    add("set-up p50, 1 client (ms)", lambda r: statistics.median(r.setup1), ms)
    add("set-up p99, 1 client (ms)", lambda r: pct(r.setup1, 99), ms)
    add("set-up p50, bursts of 32 (ms)", lambda r: statistics.median(r.burst_warm), ms)
    add("set-up p99, bursts of 32 (ms)", lambda r: pct(r.burst_warm, 99), ms)
    add("set-up p50, first burst of 32 (ms)", lambda r: statistics.median(r.burst_cold), ms)
    add("connections/s, 1 client", lambda r: r.conns1, count, lower_is_better=False)
    add("connections/s, 32 clients", lambda r: r.conns32, count, lower_is_better=False)
    add("throughput 1 stream up (MB/s)", lambda r: r.up, count, lower_is_better=False)
    add("throughput 1 stream down (MB/s)", lambda r: r.down, count, lower_is_better=False)
    add(f"skopeo push+pull {layout_mib:.0f} MiB (s)", lambda r: r.skopeo, lambda x: f"{x:.1f}")
    lines.append(f"| skopeo push+pull inside the namespace, the limit (s) | {limit:.1f} | "
                 + " | ".join(f"{limit:.1f} | {ratio(kt.skopeo, limit)} of it" for kt in kts) + " |")
    return "\n".join(lines)


def goals(jj: Row, kt: Row, limit: float) -> list[str]:
    checks = [
        ("set-up p50 at 1 client >= 20x lower", statistics.median(jj.setup1) / statistics.median(kt.setup1), 20),
        ("set-up p50 at 32 >= 100x lower", statistics.median(jj.burst_warm) / statistics.median(kt.burst_warm), 100),
        ("one-stream throughput >= 2x (up)", kt.up / jj.up, 2),
        ("one-stream throughput >= 2x (down)", kt.down / jj.down, 2),
    ]
    out = [f"- {kt.name}: {'met' if got >= want else 'NOT met'}: {what} (measured {got:.1f}x)"
           for what, got, want in checks]
    within = kt.skopeo / limit
    out.append(f"- {kt.name}: {'met' if within <= 1.5 else 'NOT met'}: skopeo push+pull within 1.5x of the "
               f"in-namespace limit (measured {within:.2f}x)")
    return out


def environment() -> str:
    load = os.getloadavg()
    return (f"{platform.node()}: {os.cpu_count()} CPUs, Linux {platform.release()}, Python "
            f"{platform.python_version()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--docker", choices=("tls", "unix"), default="tls", help="how both reach dockerd (default tls)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; rows take turns within each (default 3)")
    p.add_argument("--setup-count", type=int, default=150, help="sequential set-ups per forwarder, all rounds")
    p.add_argument("--bursts", type=int, default=6, help="warm bursts of 32 per forwarder, all rounds (plus "
                   "one first burst, reported apart)")
    p.add_argument("--seconds", type=float, default=5.0, help="per throughput and conn/s run")
    p.add_argument("--skopeo-mib", type=int, default=48, help="image size for the skopeo round trip")
    p.add_argument("--helpers", default="socat,python",
                   help="kci-tunneld rows, by helper image: socat (the lab's alpine/socat, relay.sh), python (the "
                   "lab's python3 image, helper/relay.py); default both")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/results/docker.md alone")
    args = p.parse_args(argv)
    lab = lab_info()
    images = {"socat": ("alpine/socat", lab.socat_image), "python": ("python3", lab.python_image)}  # label, image
    helpers = [h for h in args.helpers.split(",") if h]
    if not helpers or set(helpers) - set(images):
        p.error(f"--helpers: a comma-separated list of {', '.join(images)}")
    if not (Path(lab.netns_path).exists() and Path(lab.docker_sock).exists()):
        print("the lab is not up: run `python3 -m tests.lab up` first", file=sys.stderr)
        return 2
    before = environment()
    with tempfile.TemporaryDirectory(prefix="kci-bench-docker-") as tmp:
        workdir = Path(tmp)
        third = args.skopeo_mib << 20
        layout = build_layout(workdir / "image", layer_sizes=(third // 2, third // 3, third - third // 2 - third // 3))
        print("# skopeo straight from inside the namespace (the limit), best of --rounds", file=sys.stderr,
              flush=True)
        limit = min(skopeo_roundtrip(layout, lab.registry_addr, ["nsenter", f"--net={lab.netns_path}"], workdir)
                    for _ in range(args.rounds))
        (workdir / "floor").mkdir()
        with targets(workdir, netns=lab.netns) as t, targets(workdir / "floor") as here:
            wanted = {"echo": t.echo, "iperf": t.iperf, "registry": lab.registry_port}
            with ExitStack() as stack:
                (workdir / "jj").mkdir()
                jj_ports, _ = stack.enter_context(jujitsu(lab, wanted, workdir / "jj", args.docker))
                jj = Row("socat jujitsu")
                rows = {"jj": (jj, jj_ports)}
                kts = []
                for h in helpers:
                    (workdir / h).mkdir()
                    label, image = images[h]
                    ports, _ = stack.enter_context(tunneld(lab, wanted, workdir / h, args.docker, image))
                    kts.append(Row(f"kci-tunneld, {label} helper"))
                    rows[h] = (kts[-1], ports)
                floor = Row("no forwarder (the clients' floor)")
                measure(rows, args, layout, workdir, (floor, {"echo": here.echo}))
    report = "\n".join([
        table(jj, kts, limit, args.docker, args.skopeo_mib), "",
        *[line for kt in kts for line in goals(jj, kt, limit)], "",
        *[f"- {row.name} failed once: {f[:300]}" for row in (jj, *kts) for f in row.failures],
        f"The clients' own floor, the same clients straight to the same echo server program on this host's "
        f"loopback (no forwarder, no namespace), in the same turns: set-up p50 {ms(statistics.median(floor.setup1))} "
        f"ms at 1 client, {ms(statistics.median(floor.burst_warm))} ms in bursts of 32: part of every row's "
        "figure above.",
        f"Measured with `python3 bench/docker_vs_jujitsu.py{' --docker unix' if args.docker == 'unix' else ''}`: "
        f"{args.rounds} rounds, the forwarders taking turns within each; set-up = connect() to the first "
        f"echoed byte of a 64-byte request ({args.setup_count} sequential, in one block per forwarder and round "
        f"after {SETTLE:g} s of quiet; bursts: 32 clients connecting at once, also after {SETTLE:g} s of quiet, "
        "the very first burst reported apart, then "
        f"{max(1, args.bursts // args.rounds) * args.rounds} more); conn/s = 32 (or 1) clients in a closed loop "
        f"for {args.seconds:g} s; throughput = iperf3, 1 stream, {args.seconds:g} s, to an iperf3 server in the lab "
        f"namespace; skopeo = push then pull of a {args.skopeo_mib} MiB 3-layer image of random bytes to the lab "
        "registry through each forward. Rates and times: best round; latencies: all samples.",
        f"Before: {before}.", f"After: {environment()}.",
    ])
    print(report)
    if not args.no_write:
        out = ROOT / "bench" / "results" / "docker.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("# socat jujitsu vs kci-tunneld --via docker\n\n" + report + "\n")
        print(f"# written to {out.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
