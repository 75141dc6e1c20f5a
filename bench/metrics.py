"""The measurements, each run against one started proxy; every one is bounded in time."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import procstat
from bench.proxies import ROOT, Running

GIB = 1 << 30


@dataclass
class Settings:
    """How long and how hard each measurement runs."""

    seconds: float = 4.0  # per throughput run
    rtt_count: int = 20000
    conn_seconds: float = 3.0
    idle: int = 10000
    repeat: int = 2  # rounds of every metric but idle; the best figure of each is kept


@dataclass
class Result:
    """One row of the table; None where a metric was not measured (or could not be)."""

    name: str
    gbps_1: float | None = None  # GB/s (10^9 bytes), one stream
    gbps_8: float | None = None
    rtt_p50_us: float | None = None
    rtt_p99_us: float | None = None
    conns_1: float | None = None  # new connections per second
    conns_32: float | None = None
    cpu_s_per_gib: float | None = None
    idle_open: int | None = None
    idle_base_mib: float | None = None  # the proxy's RSS before the idle connections
    idle_rss_mib: float | None = None
    idle_pss_mib: float | None = None
    idle_procs: int | None = None
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _load(kind: str, *args: str, timeout: float) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "bench.load", kind, *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"bench.load {kind} failed: {out.stderr.strip()[-400:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def iperf(port: int, seconds: float, streams: int) -> tuple[float, int]:
    """(GB/s, bytes received) for an iperf3 upload of ``seconds`` through 127.0.0.1:port."""
    error = ""
    for _ in range(5):
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-P", str(streams),
                              "-J"], capture_output=True, text=True, timeout=seconds + 30)
        data = json.loads(out.stdout or "{}")
        if out.returncode == 0 and "error" not in data:
            recv = data["end"]["sum_received"]
            return recv["bytes"] / recv["seconds"] / 1e9, int(recv["bytes"])
        # iperf3's server is briefly "busy" after a test; try again a moment later.
        error = data.get("error") or out.stderr.strip()
        time.sleep(1)
    raise RuntimeError(f"iperf3 through port {port}: {error}")


def _best(old: float | None, new: float, higher: bool) -> float:
    if old is None:
        return new
    return max(old, new) if higher else min(old, new)


# Each function below runs once and keeps the best figure seen so far in ``res``: the runner
# interleaves the proxies round by round, and other load on the machine only ever makes a run worse.


def throughput(r: Running, res: Result, s: Settings) -> None:
    """One stream (with the proxy's CPU per GiB), then 8 streams."""
    cpu0 = procstat.cpu_seconds(r.pids)
    gbps, moved = iperf(r.ports["iperf"], s.seconds, 1)
    cpu1 = procstat.cpu_seconds(r.pids)
    res.gbps_1 = _best(res.gbps_1, gbps, True)
    if r.pids:
        res.cpu_s_per_gib = _best(res.cpu_s_per_gib, (cpu1 - cpu0) / (moved / GIB), False)
    res.gbps_8 = _best(res.gbps_8, iperf(r.ports["iperf"], s.seconds, 8)[0], True)


def latency(r: Running, res: Result, s: Settings) -> None:
    out = _load("rtt", "--port", str(r.ports["echo"]), "--count", str(s.rtt_count), timeout=120)
    res.rtt_p50_us = _best(res.rtt_p50_us, out["p50_us"], False)
    res.rtt_p99_us = _best(res.rtt_p99_us, out["p99_us"], False)


def connections(r: Running, res: Result, s: Settings) -> None:
    for c in (1, 32):
        out = _load("conns", "--port", str(r.ports["echo"]), "--concurrency", str(c),
                    "--seconds", str(s.conn_seconds), timeout=s.conn_seconds + 60)
        if out["errors"]:
            res.note = (res.note + "; " if res.note else "") + f"{int(out['errors'])} failed connects at {c}"
        if c == 1:
            res.conns_1 = _best(res.conns_1, out["per_second"], True)
        else:
            res.conns_32 = _best(res.conns_32, out["per_second"], True)
        time.sleep(0.5)  # let the proxy's closes settle between runs


def idle(r: Running, res: Result, s: Settings, workdir: Path) -> None:
    """Hold ``s.idle`` connections open through the proxy and read its memory."""
    if r.pids:
        res.idle_base_mib = procstat.memory_mib(r.pids)[0]
    holder = subprocess.Popen([sys.executable, "-m", "bench.load", "idle", "--port", str(r.ports["echo"]),
                               "--count", str(s.idle), "--hold", "300"], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        line = holder.stdout.readline()
        if not line:
            raise RuntimeError("the idle holder died before reporting")
        report = json.loads(line)
        time.sleep(1)  # let the proxy settle (lazy allocations, freed transients)
        res.idle_open = int(report["open"])
        if r.pids:
            res.idle_rss_mib, res.idle_pss_mib, res.idle_procs = procstat.memory_mib(r.pids)
        holder.stdin.close()
        holder.wait(60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    time.sleep(2)  # closing 10,000 connections takes the proxy a moment
