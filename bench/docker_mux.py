"""The multiplexed relay against the pool of execs, the socat jujitsu and the limits, side by side in one run.

Run from the repository root with the lab up (``python3 -m tests.lab up``), as root:

    python3 bench/docker_mux.py                  # Docker over TCP+TLS, mux over 1, 2 and 4 execs
    python3 bench/docker_mux.py --mux 2 --rounds 3

Rows, all started at once and taking turns metric by metric (who goes first alternates), so background
load hits them alike:

- **jujitsu**: ``socat TCP-LISTEN:P,fork EXEC:'docker exec -i HELPER socat STDIO TCP:localhost:T'``;
- **pool**: kci-tunneld with the lab's python3 image and ``mux_execs = 0``: helper/relay.py, one
  connection at a time per exec, a pool of execs;
- **mux N**: kci-tunneld with the same image and ``mux_execs = N``: helper/mux.py, every connection
  over N execs.

Measured (the goals of the issue that asked for the mux, each a ratio within the run):

- set-up: connect() to the first echoed byte of a 64-byte request on a fresh connection, 1 client
  (sequential) and bursts of 32 at once; goal: p50 at least 100x lower than the jujitsu's, both;
- HTTP: 64 clients, each connection one ``GET /v2/`` with ``Connection: close`` to the lab's
  registry, for a few seconds (``python3 -m bench.load http``), through each forwarder and run
  inside the lab namespace itself (the limit); goal: at least 0.8x the limit's requests/s, no error;
- RTT: 64-byte round trips on one open connection (``python3 -m bench.load rtt``); goal: p50 at most
  the jujitsu's;
- throughput: iperf3, 1 stream, each direction, against one bare exec stream moving bytes into
  ``cat`` and out of ``dd`` through kci-tunneld's own Docker client (bench/exec_ceiling.py);
  goal: at least 0.85x the bare exec, each direction;
- skopeo: push then pull of a 48 MiB, 3-layer image of random bytes through each kci-tunneld row,
  against the same run inside the lab namespace (the limit); goal: at most 2x the limit's time. The
  jujitsu is left out of this one: an exec per connection takes minutes (bench/docker_vs_jujitsu.py
  times it).

Rates: the best round; latencies: the median of every sample. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.docker_vs_jujitsu import (  # noqa: E402
    SETTLE,
    bursts,
    environment,
    iperf,
    jujitsu,
    sequential,
    skopeo_roundtrip,
    tunneld,
)
from bench.exec_ceiling import exec_rates  # noqa: E402
from bench.proxies import targets  # noqa: E402
from tests.lab.lab import LabInfo, docker  # noqa: E402
from tests.lab.lab import info as lab_info  # noqa: E402
from tests.oci import build_layout  # noqa: E402
from tunneld.config import DockerSettings  # noqa: E402


@dataclass
class Row:
    name: str
    ports: dict[str, int] = field(default_factory=dict)
    setup1: list[float] = field(default_factory=list)
    burst: list[float] = field(default_factory=list)
    http: float = 0.0
    http_p50: float = 0.0
    http_errors: int = 0
    rtt: list[float] = field(default_factory=list)
    up: float = 0.0
    down: float = 0.0
    skopeo: float = float("inf")
    failures: list[str] = field(default_factory=list)


def load(kind: str, port: int, *extra: str, netns: str | Path | None = None) -> dict[str, float]:
    """One ``python3 -m bench.load`` run (inside ``netns`` when given): its JSON line."""
    prefix = ["nsenter", f"--net={netns}"] if netns else []
    out = subprocess.run([*prefix, sys.executable, "-m", "bench.load", kind, "--port", str(port), *extra],
                         capture_output=True, check=True, cwd=ROOT, timeout=300)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def http(row: Row, port: int, seconds: float, netns: str | Path | None = None) -> None:
    got = load("http", port, "--concurrency", "64", "--seconds", f"{seconds:g}", netns=netns)
    row.http_errors += int(got["errors"])
    if got["per_second"] > row.http:
        row.http, row.http_p50 = got["per_second"], got["p50_ms"]


def ceiling(lab: LabInfo, total: int) -> tuple[float, float]:
    """(up, down) MB/s of one bare exec stream over TCP+TLS, in a container of its own."""
    name = f"kci-bench-ceiling-{uuid.uuid4().hex[:6]}"
    docker("run", "-d", "--name", name, "--net=host", "--entrypoint", "/bin/sh", lab.socat_image, "-c", "sleep 3600")
    try:
        s = DockerSettings(host=lab.docker_host_tcp, tls_verify=True, cert_path=str(lab.client_cert_dir))
        return anyio.run(exec_rates, s, name, total, backend_options={"use_uvloop": True})
    finally:
        docker("rm", "-f", name, check=False)


def measure(rows: list[Row], limit: Row, bare: Row, lab: LabInfo, args: argparse.Namespace) -> None:
    for r in range(args.rounds):
        def each(what: str, fn: Callable[[Row], None], extra: tuple[Row, ...] = (), r: int = r) -> None:
            order = [*rows, *extra]
            for row in order[::-1] if r % 2 else order:
                print(f"# round {r + 1}/{args.rounds}, {row.name}: {what}", file=sys.stderr, flush=True)
                try:
                    fn(row)
                except (RuntimeError, OSError, subprocess.SubprocessError, KeyError) as e:
                    row.failures.append(f"round {r + 1}, {what}: {e}")
                    print(f"#   failed: {e}", file=sys.stderr, flush=True)

        def setup1(row: Row) -> None:
            time.sleep(SETTLE)
            row.setup1.extend(sequential(row.ports["echo"], max(1, args.setup_count // args.rounds)))

        def burst(row: Row) -> None:
            time.sleep(SETTLE)
            row.burst.extend(x for b in bursts(row.ports["echo"], 32, max(1, args.bursts // args.rounds)) for x in b)

        def http_row(row: Row) -> None:
            time.sleep(SETTLE)
            if row is limit:
                http(row, lab.registry_port, args.seconds, netns=lab.netns_path)
            else:
                http(row, row.ports["registry"], args.seconds)

        def rtt(row: Row) -> None:
            time.sleep(SETTLE)
            got = load("rtt", row.ports["echo"], "--count", str(args.rtt_count), "--warmup", "200")
            row.rtt.append(got["p50_us"])

        def up(row: Row) -> None:
            if row is bare:
                u, d = ceiling(lab, args.ceiling_mib << 20)
                row.up, row.down = max(row.up, u), max(row.down, d)
            else:
                row.up = max(row.up, iperf(row.ports["iperf"], args.seconds))

        def down(row: Row) -> None:
            row.down = max(row.down, iperf(row.ports["iperf"], args.seconds, reverse=True))

        def skopeo(row: Row) -> None:
            if row is limit:
                took = skopeo_roundtrip(args.layout, lab.registry_addr, ["nsenter", f"--net={lab.netns_path}"],
                                        args.workdir)
            else:
                took = skopeo_roundtrip(args.layout, f"127.0.0.1:{row.ports['registry']}", [], args.workdir)
            row.skopeo = min(row.skopeo, took)

        wanted = args.metrics.split(",")
        if "setup" in wanted:
            each("set-up, 1 client", setup1)
            each("set-up, bursts of 32", burst)
        if "http" in wanted:
            each("HTTP, 64 clients", http_row, (limit,))
        if "rtt" in wanted:
            each("RTT", rtt)
        if "throughput" in wanted:
            each("throughput up (and the bare exec both ways)", up, (bare,))
            each("throughput down", down)
        if "skopeo" in wanted:
            kts = [row for row in rows if row is not rows[0]]  # not the jujitsu: see the docstring
            order = [*kts, limit]
            for row in order[::-1] if r % 2 else order:
                print(f"# round {r + 1}/{args.rounds}, {row.name}: skopeo push+pull", file=sys.stderr, flush=True)
                try:
                    skopeo(row)
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    row.failures.append(f"round {r + 1}, skopeo: {e}")


def table(rows: list[Row], limit: Row, bare: Row, args_mib: int = 48) -> str:
    jj = rows[0]
    def med(samples: list[float]) -> float:
        return statistics.median(samples) if samples else float("nan")
    head = "| Docker over TCP+TLS | " + " | ".join(r.name for r in rows) + " | goal |"
    lines = [head, "|---|" + "---:|" * (len(rows) + 1)]

    def add(label: str, cell: Callable[[Row], str], goal: str) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(r) for r in rows) + f" | {goal} |")

    s1, b32 = med(jj.setup1), med(jj.burst)
    add("set-up p50, 1 client (ms)", lambda r: f"{med(r.setup1) * 1000:.2f}" + (
        "" if r is jj else f" ({s1 / med(r.setup1):.0f}x)"), ">= 100x the jujitsu")
    add("set-up p50, bursts of 32 (ms)", lambda r: f"{med(r.burst) * 1000:.1f}" + (
        "" if r is jj else f" ({b32 / med(r.burst):.0f}x)"), ">= 100x the jujitsu")
    add("HTTP GET, 64 clients, one per connection (req/s)", lambda r: f"{r.http:.0f} ({r.http / (limit.http or 1):.2f}x"
        f"{'' if not r.http_errors else f', {r.http_errors} failed'})",
        f">= 0.8x the {limit.http:.0f}/s inside the namespace, none failed")
    add("HTTP p50 (ms)", lambda r: f"{r.http_p50:.0f}", f"{limit.http_p50:.0f} inside the namespace")
    add("RTT p50 on an open connection (µs)", lambda r: f"{med(r.rtt):.0f}" + (
        "" if r is jj else f" ({med(r.rtt) / med(jj.rtt):.2f}x)"), "<= the jujitsu's")
    add("throughput 1 stream up (MB/s)", lambda r: f"{r.up:.0f} ({r.up / (bare.up or 1):.2f}x)",
        f">= 0.85x the bare exec's {bare.up:.0f}")
    add("throughput 1 stream down (MB/s)", lambda r: f"{r.down:.0f} ({r.down / (bare.down or 1):.2f}x)",
        f">= 0.85x the bare exec's {bare.down:.0f}")
    if limit.skopeo < float("inf"):
        add(f"skopeo push+pull {args_mib} MiB (s)", lambda r: "not run" if r is jj else (
            f"{r.skopeo:.2f} ({r.skopeo / limit.skopeo:.2f}x)"), f"<= 2x the {limit.skopeo:.2f} s inside the namespace")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--mux", default="1,2,4", help="mux rows by number of execs (default 1,2,4)")
    p.add_argument("--no-pool", action="store_true", help="leave out the pool row")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--setup-count", type=int, default=100, help="sequential set-ups per row, all rounds")
    p.add_argument("--bursts", type=int, default=4, help="bursts of 32 per row, all rounds")
    p.add_argument("--rtt-count", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=4.0, help="per HTTP and throughput run")
    p.add_argument("--ceiling-mib", type=int, default=512, help="bytes per bare-exec transfer")
    p.add_argument("--metrics", default="setup,http,rtt,throughput,skopeo", help="which (default all)")
    p.add_argument("--skopeo-mib", type=int, default=48, help="image size for the skopeo round trip")
    args = p.parse_args(argv)
    lab = lab_info()
    before = environment()
    with tempfile.TemporaryDirectory(prefix="kci-bench-mux-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        t = stack.enter_context(targets(work, netns=lab.netns))
        wanted = {"echo": t.echo, "iperf": t.iperf, "registry": lab.registry_port}
        (work / "jj").mkdir()
        rows = [Row("socat jujitsu", stack.enter_context(jujitsu(lab, wanted, work / "jj"))[0])]
        kinds = ([("pool (python relay, an exec per connection)", 0)] if not args.no_pool else []) + \
            [(f"mux, {n} exec{'s' if n > 1 else ''}", n) for n in map(int, args.mux.split(","))]
        for label, n in kinds:
            d = work / f"k{n}"
            d.mkdir()
            ports, _ = stack.enter_context(tunneld(lab, wanted, d, "tls", lab.python_image, f"mux_execs = {n}\n"))
            rows.append(Row(label, ports))
        limit, bare = Row("inside the namespace"), Row("bare exec")
        size = args.skopeo_mib << 20
        args.workdir = work
        args.layout = build_layout(work / "image", layer_sizes=(size // 2, size // 3, size - size // 2 - size // 3))
        measure(rows, limit, bare, lab, args)
    print(table(rows, limit, bare, args.skopeo_mib))
    print()
    for row in rows:
        for f in row.failures:
            print(f"- {row.name} failed once: {f[:300]}")
    print(f"Measured with `python3 bench/docker_mux.py {' '.join(sys.argv[1:])}`, Docker over "
          f"TCP+TLS. Before: {before}. After: {environment()}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
