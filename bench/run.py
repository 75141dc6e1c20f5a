"""The benchmark suite: ``python3 -m bench`` from the repository root (see bench/README.md).

Starts the targets (iperf3, an echo server) and every proxy at once, then measures round by round,
interleaving the proxies so that background load on a shared machine hits them all alike; prints
a markdown table and the direct path's goals; writes docs/performance.md's "Machine & command"
and "Direct path" sections and docs/perf-direct.png. A benchmark, not a test: nothing gates CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bench import lab_rows, metrics, proxies, report
from bench.metrics import Result, Settings
from bench.proxies import ProxyUnavailable, Running, Targets

DOCS = proxies.ROOT / "docs" / "performance.md"
PLOT = proxies.ROOT / "docs" / "perf-direct.png"
GOAL_IDLE = 10_000
# File descriptors a proxy process needs besides two per relayed connection: listeners, control
# socket, log, event loop internals, spare splice pipes (tunneld.engine.relay.splice.PIPES_KEPT pairs).
FD_RESERVE = 64

LOCAL_ROWS = {
    "none": ("no proxy", proxies.no_proxy),
    "socat": ("socat", proxies.socat),
    "direct": (report.DIRECT, lambda t, d: proxies.tunneld(t, d, label=report.DIRECT)),
    "direct-protocol": ("kci-tunneld --via direct, Protocol relay", lambda t, d: proxies.tunneld(
        t, d, label="kci-tunneld --via direct, Protocol relay", env={"KCI_TUNNELD_RELAY": "protocol"})),
    "openssh": ("OpenSSH ssh -L", proxies.openssh),
}
ALL_ROWS = [*LOCAL_ROWS, *lab_rows.ROWS]
METRICS = ["throughput", "rtt", "conns", "idle"]


def raise_nofile() -> int:
    """Lift the soft open-file limit to the hard one (children inherit it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_idle_percent(seconds: float = 2.0) -> float:
    """How idle the machine is right now (all CPUs), from /proc/stat: other people's load shows here."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return 100.0 * (idle1 - idle0) / max(1, total1 - total0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ALL_ROWS),
                   help=f"comma-separated, from {','.join(ALL_ROWS)} (default: all; lab rows skip when no lab)")
    p.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated, from {','.join(METRICS)}")
    p.add_argument("--rounds", type=int, default=2, help="rounds of each metric but idle; best kept (default 2)")
    p.add_argument("--seconds", type=float, default=4.0, help="per iperf3 run (default 4)")
    p.add_argument("--rtt-count", type=int, default=20000, help="64-byte round trips per RTT run")
    p.add_argument("--conn-seconds", type=float, default=3.0, help="per connections-per-second run")
    p.add_argument("--idle", type=int, default=GOAL_IDLE, help="idle connections to hold (default 10,000)")
    p.add_argument("--quick", action="store_true", help="1 round, short runs, 2,000 idle: a smoke run (~1 min)")
    p.add_argument("--lab", choices=["auto", "up", "skip"], default="auto",
                   help="lab rows: use the lab if it runs (auto), bring it up first (up), or skip")
    p.add_argument("--ssh-cipher", choices=lab_rows.SSH_CIPHERS, default=lab_rows.SSH_CIPHERS[0],
                   help="the cipher both SSH lab rows pin (default: OpenSSH's own default, chacha20-poly1305)")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the raw results here")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.rtt_count, args.conn_seconds = 1, 2.0, 5000, 1.5
        args.idle = min(args.idle, 2000)
    return args


@contextlib.contextmanager
def started(rows: Sequence[str], t: Targets, workdir: Path, skipped: dict[str, str]) -> Iterator[list[Running]]:
    """Start every local proxy in ``rows``; those that cannot start here are skipped with the reason."""
    with contextlib.ExitStack() as stack:
        running = []
        for key in rows:
            name, factory = LOCAL_ROWS[key]
            try:
                running.append(stack.enter_context(factory(t, workdir)))
            except ProxyUnavailable as e:
                skipped[name] = str(e)
        yield running


def measure_all(running: Sequence[Running], results: dict[str, Result], args: argparse.Namespace,
                s: Settings, workdir: Path) -> None:
    """Metric by metric, round by round, proxy by proxy."""
    wanted = args.metrics.split(",")
    steps: list[tuple[str, Callable[[Running, Result, Settings], None]]] = [
        ("throughput", metrics.throughput), ("rtt", metrics.latency), ("conns", metrics.connections)]
    for metric, fn in steps:
        if metric not in wanted:
            continue
        for rnd in range(args.rounds):
            for r in running:
                say(f"{metric} round {rnd + 1}/{args.rounds}: {r.name}")
                try:
                    fn(r, results[r.name], s)
                except (RuntimeError, OSError, ValueError) as e:
                    results[r.name].note += f" {metric} failed: {e}"
    if "idle" in wanted:
        for r in running:
            say(f"idle: {s.idle:,} connections through {r.name}")
            try:
                metrics.idle(r, results[r.name], s, workdir)
            except (RuntimeError, OSError, ValueError) as e:
                results[r.name].note += f" idle failed: {e}"


def say(msg: str) -> None:
    print(f"# {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ALL_ROWS]
    if unknown:
        print(f"bench: unknown row(s) {', '.join(unknown)}; choose from {', '.join(ALL_ROWS)}", file=sys.stderr)
        return 2
    if not shutil.which("iperf3"):
        print("bench: iperf3 is not installed (apt-get install iperf3)", file=sys.stderr)
        return 2
    limit = raise_nofile()
    idle = min(args.idle, (limit - FD_RESERVE) // 2)
    s = Settings(seconds=args.seconds, rtt_count=args.rtt_count, conn_seconds=args.conn_seconds, idle=idle,
                 repeat=args.rounds)
    load_before = os.getloadavg()
    idle_pct = cpu_idle_percent()
    t0 = time.monotonic()
    skipped: dict[str, str] = {}
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="kci-bench-") as tmp:
        workdir = Path(tmp)
        local = [r for r in rows if r in LOCAL_ROWS]
        with proxies.targets(workdir) as t, started(local, t, workdir, skipped) as running:
            for r in running:
                results[r.name] = Result(r.name, note=r.note)
            measure_all(running, results, args, s, workdir)
        lab = [r for r in rows if r in lab_rows.ROWS]
        if lab:
            # Idle connections are the direct path's metric; the lab forwarders keep their default limits.
            lab_args = argparse.Namespace(**{**vars(args), "metrics": args.metrics.replace("idle", "")})
            try:
                for name, reason in lab_rows.run(lab, args.lab, workdir, results,
                                                 lambda running: measure_all(running, results, lab_args, s, workdir),
                                                 ssh_cipher=args.ssh_cipher):
                    skipped[name] = reason
            except Exception as e:  # a lab half up must not cost the local rows already measured
                for key in lab:
                    if lab_rows.ROWS[key] not in results:
                        skipped[lab_rows.ROWS[key]] = f"{type(e).__name__}: {e}"
    load_after = os.getloadavg()
    elapsed = time.monotonic() - t0
    ordered = [results[n] for n in _order(results)]
    gs = report.goals(ordered, GOAL_IDLE)
    command = "python3 -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    notes = _notes(s, args, limit, idle, load_before, load_after, elapsed, skipped, idle_pct)
    print(report.table(ordered))
    print()
    if gs:
        print(report.goals_markdown(gs))
        print()
    print("\n".join(notes))
    if args.json:
        args.json.write_text(json.dumps({"results": [r.as_dict() for r in ordered], "notes": notes}, indent=2))
    if not args.no_write:
        why_not = report.plot(ordered, PLOT)
        if why_not:
            notes.append(f"- {why_not}")
        _write_docs(ordered, gs, notes, command.strip(), plotted=why_not is None)
        written = [DOCS] if why_not else [DOCS, PLOT]
        print(f"(written: {', '.join(str(p.relative_to(proxies.ROOT)) for p in written)})", file=sys.stderr)
    return 0


def _order(results: dict[str, Result]) -> list[str]:
    first = ["no proxy", "socat", report.DIRECT]
    return [n for n in first if n in results] + [n for n in results if n not in first]


def _notes(s: Settings, args: argparse.Namespace, limit: int, idle: int, before: tuple[float, ...],
           after: tuple[float, ...], elapsed: float, skipped: dict[str, str], idle_pct: float) -> list[str]:
    wanted = args.metrics.split(",")
    notes = [
        f"- Load average (1/5/15 min) before: {before[0]:.2f}/{before[1]:.2f}/{before[2]:.2f}, after: "
        f"{after[0]:.2f}/{after[1]:.2f}/{after[2]:.2f}; CPU idle just before the run: {idle_pct:.0f}%; "
        f"run took {elapsed:.0f} s.",
        f"- Best of {s.repeat} interleaved round(s) per figure. Throughput: iperf3 uploads of {s.seconds:g} s "
        f"(GB = 10^9 bytes). RTT: {s.rtt_count:,} sequential 64-byte round trips on one connection. "
        f"conn/s: connect, one 64-byte round trip, close, for {s.conn_seconds:g} s. CPU: user+system seconds "
        "of the proxy's processes (reaped children included) during the 1-stream run, per GiB received; "
        "for lab rows only the local forwarder (the far side's sshd or dockerd is not counted).",
    ]
    if "idle" in wanted:
        notes.append(
            f"- Idle: {idle:,} connections held through each local proxy (one round trip each first); RSS = sum "
            "of VmRSS, PSS = sum of Pss over the proxy's processes (socat forks one per connection: its RSS sum "
            "counts shared pages once per process, PSS does not).")
    if "idle" in wanted and idle < args.idle:
        notes.append(
            f"- The open-file limit here is {limit:,} (hard; raising it needs CAP_SYS_RESOURCE) and a single-process "
            f"proxy needs 2 per connection, so {idle:,} idle connections were held, not {args.idle:,}; the goal "
            "line scales the measured per-connection RSS to 10,000.")
    for name, reason in skipped.items():
        notes.append(f"- {name}: skipped: {reason}")
    return notes


def _write_docs(results: Sequence[Result], gs: Sequence[report.Goal], notes: Sequence[str], command: str,
                *, plotted: bool) -> None:
    doc = DOCS.read_text()
    machine = "\n".join([
        f"- Machine: {report.machine()}",
        f"- Tools: {report.tool_versions()}",
        f"- Measured: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "- Command, from the repository root (as root for the bench's own sshd): "
        f"`{command}`",
    ])
    body = "\n\n".join([
        report.table(results),
        report.goals_markdown(gs),
        "\n".join(notes),
        "![kci-tunneld --via direct against socat, OpenSSH and no proxy](perf-direct.png)" if plotted else "",
    ])
    doc = report.replace_section(doc, "machine", machine)
    doc = report.replace_section(doc, "direct", body)
    DOCS.write_text(doc)
