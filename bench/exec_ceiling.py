"""How fast can bytes cross one ``docker exec`` stream at all? The ceiling of any exec-based forwarder.

Run from the repository root with the lab up (``python3 -m tests.lab up``), as root:

    python3 bench/exec_ceiling.py            # Docker over TCP+TLS and over the unix socket
    python3 bench/exec_ceiling.py --bursts   # also: 32 round trips at once over 32 warm execs

A throwaway container (the lab's socat image, sleeping) gets two execs per transport, driven by
kci-tunneld's own Docker client (tunneld/docker/api.py, aiodocker under uvloop), with no relay,
framing or target in the way:

- up: 1 GiB written to the stdin of ``cat >/dev/null`` (timed until the write side is done);
- down: 1 GiB read from the stdout of ``dd if=/dev/zero bs=256k`` (timed to the end of the stream).

It also times the docker CLI doing the same down-transfer (``docker exec ... dd ... | cat``), the
tool the socat jujitsu runs per connection. ``--bursts`` adds the latency floor of a burst: 32
execs already started (``cat``, or ``socat STDIO TCP:`` to an echo server already connected), then
30 times 64 bytes written to all 32 at once, timed until each echo is back: what any relay that
starts nothing per connection could at best get from the exec path. ``--streams N`` adds the same
transfers split over 1 to N execs at once (would striping one connection over several execs reach
2x the jujitsu?) with the CPU each process group spent per GiB: our client, dockerd, containerd and
the shims with the exec's process. Nothing here gates anything: it explains where the Docker
transport's throughput stops (docs/docker-transport.md, "What bounds them").
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.docker_cpu import pids_named  # noqa: E402
from bench.procstat import cpu_seconds  # noqa: E402
from bench.proxies import targets  # noqa: E402
from tests.lab.lab import docker, info  # noqa: E402
from tunneld.config import DockerSettings  # noqa: E402
from tunneld.docker.api import DockerClient, ExecStream  # noqa: E402
from tunneld.docker.host import resolve_endpoint  # noqa: E402

BLOCK = 256 * 1024


async def transfer(client: DockerClient, container: str, blocks: int, up: bool) -> tuple[int, float]:
    """``blocks`` of BLOCK bytes into ``cat >/dev/null`` (up) or out of ``dd if=/dev/zero`` (down) through
    one exec: (bytes moved, seconds from the exec being ready to the end of the transfer)."""
    if up:
        async with client.exec_stream(container, ["sh", "-c", "cat >/dev/null"]) as stream:
            block = bytes(BLOCK)
            t0 = time.perf_counter()
            for _ in range(blocks):
                await stream.write(block)
            return blocks * BLOCK, time.perf_counter() - t0
    async with client.exec_stream(container, ["dd", "if=/dev/zero", f"bs={BLOCK}", f"count={blocks}"]) as stream:
        got = 0
        t0 = time.perf_counter()
        while (frame := await stream.read()) is not None:
            if frame[0] == stream.STDOUT:
                got += len(frame[1])
        return got, time.perf_counter() - t0


async def exec_rates(settings: DockerSettings, container: str, total: int) -> tuple[float, float]:
    """(up, down) in MB/s through one exec stream each."""
    async with DockerClient(resolve_endpoint(settings, {}), timeout=10) as client:
        rates = [moved / took / 1e6 for moved, took in
                 [await transfer(client, container, total // BLOCK, up) for up in (True, False)]]
    return rates[0], rates[1]


async def striped(settings: DockerSettings, container: str, total: int, streams: int, up: bool) -> None:
    """``total`` bytes up (or down) split over ``streams`` execs running at once."""
    async with DockerClient(resolve_endpoint(settings, {}), timeout=10) as client, anyio.create_task_group() as tg:
        for _ in range(streams):
            tg.start_soon(transfer, client, container, total // streams // BLOCK, up)


def striping_table(settings: DockerSettings, container: str, total: int, most: int) -> None:
    """MB/s and CPU seconds per GiB by process group, for 1..``most`` execs at once, each way."""
    print("\n| TCP+TLS | execs at once | MB/s | CPU s/GiB: our client | dockerd | containerd "
          "| shims + exec | all |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for up in (True, False):
        for streams in sorted({1, 2, most}):
            groups = {"dockerd": pids_named("dockerd"), "containerd": pids_named("containerd"),
                      "shims": pids_named("containerd-shim")}
            before = {k: cpu_seconds(v) for k, v in groups.items()}
            own = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            anyio.run(striped, settings, container, total, streams, up, backend_options={"use_uvloop": True})
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_SELF)
            gib = total / 2**30
            cpu = {"client": (after.ru_utime + after.ru_stime - own.ru_utime - own.ru_stime) / gib}
            cpu.update({k: (cpu_seconds(v) - before[k]) / gib for k, v in groups.items()})
            print(f"| {'up' if up else 'down'} | {streams} | {total / wall / 1e6:.0f} | "
                  + " | ".join(f"{v:.2f}" for v in cpu.values()) + f" | {sum(cpu.values()):.2f} |", flush=True)


async def burst_floor(settings: DockerSettings, container: str, cmd: str, clients: int = 32,
                      rounds: int = 30) -> tuple[float, float]:
    """(p50, p99) in ms of a 64-byte round trip on each of ``clients`` warm execs at once."""
    samples: list[float] = []

    async def one(stream: ExecStream) -> None:
        t0 = time.perf_counter()
        await stream.write(b"x" * 64)
        got = 0
        while got < 64:
            frame = await stream.read()
            if frame is None:
                raise RuntimeError(f"the exec {cmd!r} ended")
            if frame[0] == stream.STDOUT:
                got += len(frame[1])
        samples.append((time.perf_counter() - t0) * 1000)

    async with DockerClient(resolve_endpoint(settings, {}), timeout=10) as client, AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(client.exec_stream(container, ["sh", "-c", cmd]))
                   for _ in range(clients)]
        for _ in range(rounds):
            async with anyio.create_task_group() as tg:
                for stream in streams:
                    tg.start_soon(one, stream)
            await anyio.sleep(0.05)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


def cli_down(env: dict[str, str], container: str, total: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(f"docker exec {container} dd if=/dev/zero bs={BLOCK} count={total // BLOCK} 2>/dev/null "
                   "| cat >/dev/null", shell=True, check=True, env={**os.environ, **env})
    return total / (time.perf_counter() - t0) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="bytes per transfer, in MiB (default 1024)")
    parser.add_argument("--bursts", action="store_true", help="also the latency floor of bursts of 32 (see above)")
    parser.add_argument("--streams", type=int, default=0, metavar="N",
                        help="also each transfer split over 1, 2 and N execs at once, with CPU per GiB (TLS)")
    args = parser.parse_args()
    lab = info()
    total = args.mib * 1024 * 1024
    name = f"kci-bench-ceiling-{uuid.uuid4().hex[:6]}"
    docker("run", "-d", "--name", name, "--net=host", "--entrypoint", "/bin/sh", lab.socat_image, "-c", "sleep 3600")
    try:
        print("| Docker API | exec stdin (up) MB/s | exec stdout (down) MB/s | docker CLI stdout MB/s |")
        print("|---|---:|---:|---:|")
        for label, tls in (("TCP+TLS", True), ("unix socket", False)):
            if tls:
                s = DockerSettings(host=lab.docker_host_tcp, tls_verify=True, cert_path=str(lab.client_cert_dir))
            else:
                s = DockerSettings(host=lab.docker_host_unix)
            up, down = anyio.run(exec_rates, s, name, total, backend_options={"use_uvloop": True})
            cli = cli_down(lab.docker_env(tls=tls), name, total)
            print(f"| {label} | {up:.0f} | {down:.0f} | {cli:.0f} |", flush=True)
        if args.streams:
            s = DockerSettings(host=lab.docker_host_tcp, tls_verify=True, cert_path=str(lab.client_cert_dir))
            striping_table(s, name, total, args.streams)
        if args.bursts:
            s = DockerSettings(host=lab.docker_host_tcp, tls_verify=True, cert_path=str(lab.client_cert_dir))
            with tempfile.TemporaryDirectory(prefix="kci-bench-ceiling-") as work, targets(Path(work), lab.netns) as t:
                print("\n| 32 warm execs over TCP+TLS, 64-byte round trips at once | p50 ms | p99 ms |")
                print("|---|---:|---:|")
                for cmd in ("cat", f"socat STDIO TCP:127.0.0.1:{t.echo}"):
                    p50, p99 = anyio.run(burst_floor, s, name, cmd, backend_options={"use_uvloop": True})
                    print(f"| `{cmd.replace(str(t.echo), 'ECHO')}` | {p50:.2f} | {p99:.2f} |", flush=True)
    finally:
        docker("rm", "-f", name, check=False)
    print(f"\n{args.mib} MiB per transfer; load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
