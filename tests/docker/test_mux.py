"""The multiplexed relay (helper/mux.py, tunneld/docker/mux.py) against the lab's dockerd: many
connections over one exec, and isolation between them. A connection whose client never reads, whose
far side never reads, or that is reset, must not slow or break the others on its exec (byte-exact
echoes on them go on); a killed relay, a frozen one and a killed helper container are recovered.

Every test runs with one exec (``mux_execs=1``), so every connection shares it. The echo tests of
tests/docker/test_transport.py run on the mux too (``relay="mux"``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import pytest

from tests.docker.test_transport import RESETTING_SERVER, TIMEOUTS, docker_transport, ns_server, settings
from tests.helpers import stream_echo
from tests.lab.lab import LabInfo, docker
from tunneld.config import DockerSettings, Timeouts
from tunneld.docker.mux import DOWN_WINDOW, MuxStream
from tunneld.docker.transport import DockerTransport
from tunneld.errors import TransportError
from tunneld.labels import ROLE_HELPER, ROLE_LABEL

pytestmark = [pytest.mark.timeout(120)]

# Inside the lab namespace: accept connections and never read from them (a stalled target).
NEVER_READING_SERVER = """
held = []
while True:
    c, _ = s.accept()
    held.append(c)
"""


async def _connect(transport: DockerTransport, port: int) -> MuxStream:
    stream = await transport.connect("127.0.0.1", port)
    assert isinstance(stream, MuxStream)
    return stream


async def _echoes_go_on(transport: DockerTransport, lab: LabInfo, *, count: int = 8, size: int = 512 * 1024) -> None:
    """``count`` byte-exact echoes at once on the transport's one exec, each with its own payload."""
    payloads = [os.urandom(size) for _ in range(count)]
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        results[i] = await stream_echo(await _connect(transport, lab.echo_port), payloads[i])

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, i)
    assert all(results[i] == payloads[i] for i in range(count))


async def _send_until_blocked(stream: anyio.abc.ByteStream, chunk: bytes, blocked: anyio.Event) -> int:
    """Send until a send has waited for a while (for credit, or for room anywhere on the way); the
    bytes sent whole (the rest never leaves)."""
    sent = 0
    while True:
        with anyio.move_on_after(1.0):
            await stream.send(chunk)
            sent += len(chunk)
            continue
        blocked.set()
        return sent


def _one_exec(lab: LabInfo) -> DockerSettings:
    return settings(lab, tls=True, relay="mux", mux_execs=1)


@pytest.mark.anyio
async def test_many_connections_share_one_exec(lab: LabInfo) -> None:
    with anyio.fail_after(60):
        async with docker_transport(_one_exec(lab)) as transport:
            await _echoes_go_on(transport, lab, count=32, size=64 * 1024)
            info = transport.info()
            assert info["relay"] == "mux" and info["execs_started"] == 1, info
            assert info["mux_execs"] == [0]  # every connection is over, and forgotten


@pytest.mark.anyio
async def test_a_client_that_never_reads_does_not_stall_the_others(lab: LabInfo) -> None:
    """The echo server answers a client that never reads: its window fills, and then only its own
    connection waits (the relay stops reading its socket, the echo server stops reading ours)."""
    with anyio.fail_after(90):
        async with docker_transport(_one_exec(lab)) as transport:
            stuck = await _connect(transport, lab.echo_port)
            chunk = os.urandom(256 * 1024)
            blocked = anyio.Event()
            sent: list[int] = []

            async def flood() -> None:
                sent.append(await _send_until_blocked(stuck, chunk, blocked))

            async with anyio.create_task_group() as tg:
                tg.start_soon(flood)
                await blocked.wait()
                assert sent and sent[0] > DOWN_WINDOW  # its window is full, and the echo server's buffers
                await _echoes_go_on(transport, lab)
            # It was only waiting: read what it was owed, byte-exact.
            await stuck.send_eof()
            got = bytearray()
            with pytest.raises(anyio.EndOfStream):
                while True:
                    got += await stuck.receive()
            # The send that waited was cancelled with part of its chunk gone (credit comes back in
            # whatever amounts the relay wrote): that part is echoed too.
            assert sent[0] <= len(got) < sent[0] + len(chunk)
            assert all(got[i:i + len(chunk)] == chunk[:len(got) - i] for i in range(0, len(got), len(chunk)))
            await stuck.aclose()


@pytest.mark.anyio
async def test_a_target_that_never_reads_does_not_stall_the_others(lab: LabInfo) -> None:
    """A target that never reads takes the relay's window for that connection, then our send waits;
    after the client leaves, that connection is reset (timeouts.drain) and the exec carries on."""
    with anyio.fail_after(90):
        async with ns_server(lab, NEVER_READING_SERVER) as (port, _), \
                docker_transport(_one_exec(lab)) as transport:
            stuck = await _connect(transport, port)
            blocked = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_send_until_blocked, stuck, os.urandom(256 * 1024), blocked)
                await blocked.wait()
                await _echoes_go_on(transport, lab)
            channel = stuck.channel
            await stuck.aclose()
            while not stuck.forgotten:  # reset after timeouts.drain ("K")
                await anyio.sleep(0.05)
            assert channel.dead is None and transport.info()["mux_execs"] == [0]
            await _echoes_go_on(transport, lab, count=2)


@pytest.mark.anyio
async def test_a_connection_reset_breaks_only_itself(lab: LabInfo) -> None:
    with anyio.fail_after(60):
        async with ns_server(lab, RESETTING_SERVER) as (port, _), \
                docker_transport(_one_exec(lab)) as transport:
            reset = await _connect(transport, port)
            others = [await _connect(transport, lab.echo_port) for _ in range(4)]
            await others[0].send(b"before the reset")
            with pytest.raises(anyio.BrokenResourceError, match="reset"):
                while True:
                    await reset.receive()
            payload = os.urandom(256 * 1024)
            assert await stream_echo(others[0], payload) == b"before the reset" + payload
            for other in others[1:]:
                assert await stream_echo(other, payload) == payload
            await _echoes_go_on(transport, lab)


@pytest.mark.anyio
async def test_refused_and_unreachable_targets_are_per_connection(lab: LabInfo) -> None:
    with anyio.fail_after(60):
        async with docker_transport(_one_exec(lab)) as transport:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_echoes_go_on, transport, lab)
                refused = r"127\.0\.0\.1:1 from helper container .*: Connection refused$"
                for _ in range(5):
                    with pytest.raises(TransportError, match=refused):
                        await transport.connect("127.0.0.1", 1)
            assert transport.info()["execs_started"] == 1


async def _recovers(transport: DockerTransport, lab: LabInfo, fault: Callable[[], Awaitable[None]]) -> None:
    """Connections open on the exec when ``fault`` strikes break (none hangs); new ones work."""
    open_ones = [await _connect(transport, lab.echo_port) for _ in range(3)]
    await open_ones[0].send(b"x")
    await fault()
    for stream in open_ones:
        with pytest.raises(anyio.BrokenResourceError):
            while True:
                await stream.receive()
        await stream.aclose()
    await _echoes_go_on(transport, lab)


def _helper_sh(name: str, script: str) -> None:
    docker("exec", name, "sh", "-c", script)


@pytest.mark.anyio
async def test_a_killed_relay_is_replaced(lab: LabInfo) -> None:
    s = _one_exec(lab)
    with anyio.fail_after(60):
        async with docker_transport(s) as transport:
            async def kill_relay() -> None:
                await anyio.to_thread.run_sync(_helper_sh, s.helper_name, "kill -9 $(pidof python3)")
            await _recovers(transport, lab, kill_relay)
            assert transport.info()["execs_started"] == 2


@pytest.mark.anyio
async def test_a_frozen_relay_is_found_by_the_heartbeat(lab: LabInfo) -> None:
    """SIGSTOP: the exec stays open, nothing answers; the pings go unanswered and the exec is replaced."""
    s = _one_exec(lab)
    fast = Timeouts(connect=2.0, probe=2.0, probe_interval=0.5, ready=30.0, drain=2.0)
    with anyio.fail_after(60):
        async with docker_transport(s, fast) as transport:
            async def freeze_relay() -> None:
                await anyio.to_thread.run_sync(_helper_sh, s.helper_name, "kill -STOP $(pidof python3)")
            await _recovers(transport, lab, freeze_relay)
            assert transport.info()["execs_started"] == 2


@pytest.mark.anyio
async def test_a_killed_helper_container_is_recovered(lab: LabInfo) -> None:
    s = _one_exec(lab)
    with anyio.fail_after(60):
        async with docker_transport(s, TIMEOUTS) as transport:
            async def kill_helper() -> None:
                await anyio.to_thread.run_sync(lambda: docker("kill", s.helper_name))
            await _recovers(transport, lab, kill_helper)


# Inside the lab namespace: a DNS server that takes every query and never answers.
SILENT_DNS = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
print("ready", flush=True)
while True:
    s.recvfrom(512)
"""


@pytest.mark.anyio
async def test_a_slow_name_lookup_does_not_stall_the_others(lab: LabInfo, tmp_path: Path) -> None:
    """The helper's resolver asks a DNS server that never answers (3 s per lookup): connections to a
    name wait for it on their own (sharing one lookup), while byte-exact echoes on the same exec go
    on; names from the helper's /etc/hosts still connect (looked up off the relay's loop too), more
    of them at once than the relay runs lookups at once, each of them by several connections."""
    s = _one_exec(lab)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:3 attempts:1\n")
    argv = ["nsenter", f"--net={lab.netns_path}", sys.executable, "-c", SILENT_DNS]
    async with await anyio.open_process(argv, stdin=subprocess.DEVNULL) as dns:
        assert dns.stdout is not None
        assert (await dns.stdout.receive()).startswith(b"ready")
        try:
            # The helper, made here with that resolver (the transport takes a helper of its role as it is).
            names = [f"echo{i}.kci-test" for i in range(12)]  # more than the relay's LOOKUPS at once
            hosts = [arg for name in names for arg in ("--add-host", f"{name}:127.0.0.1")]
            docker("run", "-d", "--name", s.helper_name, "--net=host", "--label", f"{ROLE_LABEL}={ROLE_HELPER}",
                   "-v", f"{resolv}:/etc/resolv.conf:ro", *hosts, "--entrypoint", "sleep", lab.python_image, "600")
            with anyio.fail_after(60):
                async with docker_transport(s) as transport:
                    await _echoes_go_on(transport, lab, count=2)  # the exec is up
                    failed: list[float] = []

                    async def slow() -> None:
                        started = time.monotonic()
                        with pytest.raises(TransportError, match=r"slow\.kci-test:80 from helper container"):
                            await transport.connect("slow.kci-test", 80)
                        failed.append(time.monotonic() - started)

                    async with anyio.create_task_group() as tg:
                        for _ in range(3):
                            tg.start_soon(slow)
                        await anyio.sleep(0.2)  # its lookup has started
                        started = time.monotonic()
                        await _echoes_go_on(transport, lab)
                        took = time.monotonic() - started
                        assert not failed, "the lookup ended before the others' echoes: not a slow one"
                        assert took < 2.5, f"the echoes waited {took:.1f}s on another connection's lookup"
                    assert len(failed) == 3 and min(failed) >= 2.5  # they really waited for the silent DNS server

                    async def by_name(name: str, n: int) -> None:
                        payload = f"{name} #{n}".encode()
                        assert await stream_echo(await transport.connect(name, lab.echo_port), payload) == payload

                    async with anyio.create_task_group() as tg:
                        for name in names:
                            for n in range(3):
                                tg.start_soon(by_name, name, n)
        finally:
            dns.kill()
