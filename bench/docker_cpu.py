"""Where the CPU goes when connections and bytes cross the Docker API: per process group, on the lab.

Run from the repository root with the lab up (``python3 -m tests.lab up``), as root:

    python3 bench/docker_cpu.py                 # kci-tunneld --via docker, Docker over TCP+TLS
    python3 bench/docker_cpu.py --jujitsu       # the socat jujitsu instead, same measurements
    python3 bench/docker_cpu.py --python        # kci-tunneld with the lab's python3 helper image

Two measurements through one forwarder (the same ones bench/docker_vs_jujitsu.py times):

- bursts of 32 clients connecting at once to an echo target: CPU milliseconds per connection of
  the forwarder (kci-tunneld, or the jujitsu's local socat and docker CLI processes), dockerd,
  containerd, the containerd shims with everything in the helper container (relay script, socat,
  dd), and the benchmark's own clients;
- one iperf3 stream each way: each group's CPU as a percentage of one core over the run (200% is
  both cores of a 2-core machine: the transfer is CPU-bound when the groups add up to about that).

It answers "could a different design on our side make this faster?": what dockerd and the shim
spend is the Docker path's own cost, the same for any design that carries bytes on exec streams.
A benchmark, not a test: it prints and gates nothing.
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.docker_vs_jujitsu import bursts, iperf, jujitsu, pct, tunneld  # noqa: E402
from bench.procstat import cpu_seconds  # noqa: E402
from bench.proxies import targets  # noqa: E402
from tests.lab.lab import info as lab_info  # noqa: E402


def pids_named(name: str) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,comm"], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid, comm in (line.split(None, 1) for line in out.splitlines()[1:]) if comm.strip() == name]


def groups(forwarder: list[int]) -> dict[str, list[int]]:
    return {"forwarder": forwarder, "dockerd": pids_named("dockerd"), "containerd": pids_named("containerd"),
            "shims+helper": pids_named("containerd-shim"), "iperf3": pids_named("iperf3")}


def cpu(of: dict[str, list[int]]) -> dict[str, float]:
    return {k: cpu_seconds(v) for k, v in of.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--jujitsu", action="store_true", help="measure the socat jujitsu instead of kci-tunneld")
    p.add_argument("--python", action="store_true", help="kci-tunneld with the lab's python3 helper image "
                   "(helper/relay.py) instead of the socat one")
    p.add_argument("--bursts", type=int, default=10, help="bursts of 32 to measure (default 10)")
    p.add_argument("--seconds", type=float, default=5.0, help="per iperf3 run (default 5)")
    args = p.parse_args(argv)
    lab = lab_info()
    if args.jujitsu:
        label, forwarder = "socat jujitsu", jujitsu
    else:
        label = f"kci-tunneld --via docker, {'python3' if args.python else 'socat'} helper"
        image = lab.python_image if args.python else lab.socat_image
        forwarder = functools.partial(tunneld, image=image)
    with tempfile.TemporaryDirectory() as work, targets(Path(work), lab.netns) as t, \
            forwarder(lab, {"echo": t.echo, "iperf": t.iperf}, Path(work)) as (ports, pids):
        bursts(ports["echo"], 32, 3)  # warm: kci-tunneld's pool grows to the burst
        time.sleep(1)
        of = groups(pids)
        before, client_before = cpu(of), time.process_time()
        samples = [x for burst in bursts(ports["echo"], 32, args.bursts) for x in burst]
        after, client = cpu(of), time.process_time() - client_before
        n = len(samples)
        print(f"{label}, bursts of 32 (set-up p50 {pct(samples, 50) * 1000:.1f} ms): CPU ms per connection")
        for k in of:
            if k != "iperf3":
                print(f"  {k:14} {(after[k] - before[k]) / n * 1000:6.2f}")
        print(f"  {'bench clients':14} {client / n * 1000:6.2f}")
        for reverse in (False, True):
            of = groups(pids)
            before, started = cpu(of), time.monotonic()
            rate = iperf(ports["iperf"], args.seconds, reverse=reverse)
            after, wall = cpu(of), time.monotonic() - started
            shares = ", ".join(f"{k} {100 * (after[k] - before[k]) / wall:.0f}%" for k in of)
            print(f"{label}, 1 stream {'down' if reverse else 'up'}: {rate:.0f} MB/s; CPU of one core: {shares}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
