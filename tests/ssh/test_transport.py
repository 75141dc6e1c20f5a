"""The SSH transport against the lab's real sshd: registry round trips with skopeo, a 4 MiB echo with
half-close, sshd killed and restarted, host key and key refusals, ~/.ssh/config aliases, the CLI.

Targets are addresses inside the lab namespace (the registry on its 127.0.0.1:5000, the echo
service on its 127.0.0.1:7007): reachable only through the SSH server.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from tests.cli.runner import Cli
from tests.helpers import echo_roundtrip, parallel_echoes, running_forward, stream_echo
from tests.lab.lab import LabInfo, start_sshd, stop_sshd
from tests.oci import build_layout, roundtrip
from tunneld.config import SshSettings, Timeouts, TransportSpec
from tunneld.docker.over_ssh import open_docker_socket_stream, serve_unix_bridge
from tunneld.engine.relay import RelayBroken, Traffic, relay
from tunneld.errors import ExitCode, TransportError
from tunneld.sockets import RawSocketStream
from tunneld.ssh.client import open_connection
from tunneld.ssh.transport import SshTransport

pytestmark = [pytest.mark.timeout(120)]

TIMEOUTS = Timeouts(connect=5.0, probe=3.0, probe_interval=0.2, ready=20.0, drain=2.0, reconnect_wait=10.0)
RECONNECT_BOUND = 10.0  # docs/ssh-transport.md: new connections work again within 10 s of sshd's restart


@pytest.fixture(autouse=True)
def _no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whatever agent the developer runs must not decide which key authenticates here.
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


def settings(lab: LabInfo, **changes: object) -> SshSettings:
    """Explicit settings for the lab (no ssh config at all): host, user, key, known_hosts."""
    base = SshSettings(host=lab.ssh_host, user=lab.ssh_user, port=lab.ssh_port, identity_files=(str(lab.ssh_key),),
                       known_hosts=str(lab.ssh_known_hosts), config_file=os.devnull)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def spec(s: SshSettings) -> TransportSpec:
    return TransportSpec(kind="ssh", ssh=s)


@asynccontextmanager
async def ssh_transport(s: SshSettings, timeouts: Timeouts = TIMEOUTS) -> AsyncIterator[SshTransport]:
    async with SshTransport(spec(s), timeouts) as transport:
        yield transport


def alias_config(path: Path, lab: LabInfo, alias: str, *, known_hosts: Path | None = None) -> Path:
    path.write_text(
        f"Host {alias}\n"
        f"    HostName {lab.ssh_host}\n"
        f"    Port {lab.ssh_port}\n"
        f"    User {lab.ssh_user}\n"
        f"    IdentityFile {lab.ssh_key}\n"
        f"    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {known_hosts or lab.ssh_known_hosts}\n"
        "    GlobalKnownHostsFile /dev/null\n"
    )
    return path


def other_key(tmp_path: Path, name: str) -> Path:
    key = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True,
                   timeout=30)
    return key


# ---------------------------------------------------------------- without the lab


@pytest.mark.anyio
async def test_missing_identity_file_is_a_definitive_error(tmp_path: Path) -> None:
    s = SshSettings(host="127.0.0.1", identity_files=(str(tmp_path / "nope"),), config_file=os.devnull)
    with anyio.fail_after(10), pytest.raises(TransportError, match=r"identity file .*nope does not exist"):
        async with ssh_transport(s):
            pass


@pytest.mark.anyio
async def test_missing_config_file_is_named(tmp_path: Path) -> None:
    s = SshSettings(host="somealias", config_file=str(tmp_path / "ssh_config"))
    with anyio.fail_after(10), pytest.raises(TransportError, match=r"ssh config file .*ssh_config does not exist"):
        async with ssh_transport(s):
            pass


# ---------------------------------------------------------------- streams through the lab's sshd


@pytest.mark.anyio
async def test_echo_4mib_with_half_close(lab: LabInfo) -> None:
    data = os.urandom(4 * 1024 * 1024)
    with anyio.fail_after(60):
        async with ssh_transport(settings(lab)) as transport, \
                running_forward(transport, lab.echo_port, timeouts=TIMEOUTS) as fwd:
            assert await echo_roundtrip(fwd.port, data) == data
            # Several at once share the one SSH connection, each on its own channel.
            await parallel_echoes(fwd.port, data[: 256 * 1024])
            assert transport.info()["reconnects"] == 0


@pytest.mark.anyio
async def test_channel_stream_contract(lab: LabInfo) -> None:
    """Bytes after our EOF still arrive; EndOfStream at the far side's EOF; a refused target is named."""
    with anyio.fail_after(30):
        async with ssh_transport(settings(lab)) as transport:
            stream = await transport.connect("127.0.0.1", lab.echo_port)
            await stream.send(b"ping")
            await stream.send_eof()
            got = b""
            with pytest.raises(anyio.EndOfStream):
                while True:
                    got += await stream.receive()
            assert got == b"ping"
            await stream.aclose()
            with pytest.raises(anyio.ClosedResourceError):
                await stream.receive()
            with pytest.raises(TransportError, match=r"127\.0\.0\.1:1 via ssh .*[Rr]efused"):
                await transport.connect("127.0.0.1", 1)


@pytest.mark.anyio
async def test_bytes_the_server_sends_first_reach_the_client(lab: LabInfo) -> None:
    """sshd itself speaks first: its banner arrives on the channel before the relay starts."""
    with anyio.fail_after(30):
        async with ssh_transport(settings(lab)) as transport:
            upstream = await transport.connect(lab.ssh_host, lab.ssh_port)
            await anyio.sleep(0.3)  # let the banner land in the stream's buffer: the early-bytes hand-over
            ours, theirs = socket.socketpair()
            traffic = Traffic()
            async with anyio.create_task_group() as tg:
                tg.start_soon(relay, RawSocketStream(ours), upstream, traffic)
                peer = RawSocketStream(theirs)
                banner = await peer.receive()
                assert banner.startswith(b"SSH-2.0-OpenSSH"), banner
                await peer.send(b"SSH-2.0-kci-test\r\n")
                await peer.send_eof()
                rest = b""
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    while True:
                        rest += await peer.receive()  # sshd hangs up on the bogus client
                await peer.aclose()
            assert traffic.down >= len(banner)


@pytest.mark.anyio
async def test_client_reset_aborts_the_channel_only(lab: LabInfo) -> None:
    with anyio.fail_after(30):
        async with ssh_transport(settings(lab)) as transport:
            upstream = await transport.connect("127.0.0.1", lab.echo_port)
            ours, theirs = socket.socketpair()

            async def client() -> None:
                theirs.sendall(b"x" * 1000)
                await anyio.sleep(0.1)
                theirs.close()  # gone before either direction finished

            async with anyio.create_task_group() as tg:
                tg.start_soon(client)
                with pytest.raises(RelayBroken):
                    await relay(RawSocketStream(ours), upstream, Traffic())
            # The one SSH connection is unharmed: the next client gets through.
            assert await _echo_once(transport, lab, b"still fine") == b"still fine"
            assert transport.info()["reconnects"] == 0


async def _echo_once(transport: SshTransport, lab: LabInfo, data: bytes) -> bytes:
    return await stream_echo(await transport.connect("127.0.0.1", lab.echo_port), data)


@pytest.mark.anyio
async def test_skopeo_push_and_pull_digests_identical(lab: LabInfo, tmp_path: Path) -> None:
    layout = build_layout(tmp_path / "src")  # 18 MiB in 3 layers of random bytes
    assert layout.size >= 16 * 1024 * 1024
    with anyio.fail_after(240):
        async with ssh_transport(settings(lab)) as transport, \
                running_forward(transport, lab.registry_port, timeouts=TIMEOUTS) as fwd:
            registry = f"127.0.0.1:{fwd.port}"
            repo = f"kci/ssh-{os.getpid()}-{time.monotonic_ns()}"
            await anyio.to_thread.run_sync(roundtrip, layout, registry, repo, tmp_path)
            assert fwd.stats.traffic.up >= layout.size and fwd.stats.traffic.down >= layout.size


@pytest.mark.anyio
async def test_new_connections_work_again_after_sshd_restart(lab: LabInfo, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tunneld")
    timeouts = dataclasses.replace(TIMEOUTS, reconnect_wait=1.0)
    with anyio.fail_after(90):
        async with ssh_transport(settings(lab), timeouts) as transport, \
                running_forward(transport, lab.echo_port, timeouts=timeouts) as fwd:
            assert await echo_roundtrip(fwd.port, b"before") == b"before"
            try:
                await anyio.to_thread.run_sync(stop_sshd)  # listener and every session: like a crash
                # The transport has no event for "noticed the loss" (nothing in the daemon needs one): poll.
                with anyio.fail_after(10):
                    while transport.info()["state"] == "connected":
                        await anyio.sleep(0.02)
                # While it is down, a client waits reconnect_wait, then is closed cleanly (EOF, no data).
                started = time.monotonic()
                assert await echo_roundtrip(fwd.port, b"while down") == b""
                assert 0.9 <= time.monotonic() - started < 8
                assert "did not come back within 1s" in (fwd.last_error or "")
            finally:
                await anyio.to_thread.run_sync(start_sshd)
            restarted = time.monotonic()
            while True:
                if await echo_roundtrip(fwd.port, b"after") == b"after":
                    break
                assert time.monotonic() - restarted < RECONNECT_BOUND, transport.info()
                await anyio.sleep(0.1)
            took = time.monotonic() - restarted
            assert took < RECONNECT_BOUND
            info = transport.info()
            assert info["state"] == "connected" and info["reconnects"] == 1
    assert any("connection to" in r.getMessage() and "lost" in r.getMessage() for r in caplog.records)
    assert any("reconnected" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- refusals


@pytest.mark.anyio
async def test_wrong_key_is_refused_with_the_keys_tried(lab: LabInfo, tmp_path: Path) -> None:
    key = other_key(tmp_path, "id_wrong")
    with anyio.fail_after(30), pytest.raises(TransportError) as err:
        async with ssh_transport(settings(lab, identity_files=(str(key),))):
            pass
    msg = str(err.value)
    assert f"authentication failed for root@{lab.ssh_host}:{lab.ssh_port}" in msg
    assert str(key) in msg and "authorized_keys" in msg


@pytest.mark.anyio
async def test_unknown_host_key_is_refused_with_what_to_do(lab: LabInfo, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with anyio.fail_after(30), pytest.raises(TransportError) as err:
        async with ssh_transport(settings(lab, known_hosts=str(empty))):
            pass
    msg = str(err.value)
    assert "host key" in msg and "not in known_hosts" in msg and "SHA256:" in msg
    assert f"ssh-keyscan -p {lab.ssh_port} {lab.ssh_host} >> {empty}" in msg


@pytest.mark.anyio
async def test_changed_host_key_is_refused_as_a_mismatch(lab: LabInfo, tmp_path: Path) -> None:
    impostor = other_key(tmp_path, "impostor")
    known = tmp_path / "known_hosts"
    known.write_text(f"{lab.ssh_host} {' '.join(impostor.with_suffix('.pub').read_text().split()[:2])}\n")
    with anyio.fail_after(30), pytest.raises(TransportError) as err:
        async with ssh_transport(settings(lab, known_hosts=str(known))):
            pass
    msg = str(err.value)
    assert "host key" in msg and "does NOT match" in msg and "ssh-keygen -R" in msg


@pytest.mark.anyio
async def test_opting_out_of_host_key_checks_connects_and_warns(
    lab: LabInfo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with anyio.fail_after(30):
        async with ssh_transport(settings(lab, known_hosts=str(empty), check_host_key=False)) as transport:
            assert transport.info()["host_key_checked"] is False
            stream = await transport.connect("127.0.0.1", lab.echo_port)
            await stream.aclose()
    assert any(r.levelno == logging.WARNING and "host key checking is OFF" in r.getMessage() for r in caplog.records)


@pytest.mark.anyio
async def test_refused_port_fails_start_up_after_retrying(lab: LabInfo) -> None:
    timeouts = dataclasses.replace(TIMEOUTS, connect=1.5)
    started = time.monotonic()
    with anyio.fail_after(30), pytest.raises(TransportError, match="connection refused"):
        async with ssh_transport(settings(lab, port=2), timeouts):
            pass
    # Transient: retried for about timeouts.connect (1.5 s), not given up at once, not retried forever.
    assert 1.0 <= time.monotonic() - started < 10


# ---------------------------------------------------------------- ssh config aliases


@pytest.mark.anyio
async def test_alias_from_config_file(lab: LabInfo, tmp_path: Path) -> None:
    config = alias_config(tmp_path / "ssh_config", lab, "remote-docker")
    s = SshSettings(host="remote-docker", config_file=str(config))
    with anyio.fail_after(30):
        async with ssh_transport(s) as transport, \
                running_forward(transport, lab.echo_port, timeouts=TIMEOUTS) as fwd:
            assert await echo_roundtrip(fwd.port, b"by name") == b"by name"
            info = transport.info()
            assert info["server"] == f"root@{lab.ssh_host}:{lab.ssh_port} (remote-docker)"
            assert info["state"] == "connected" and info["kind"] == "ssh"
            assert "id_ed25519" not in repr(info)  # no key material or paths in status


@pytest.mark.anyio
async def test_alias_whose_known_hosts_lacks_the_key_is_refused(lab: LabInfo, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    config = alias_config(tmp_path / "ssh_config", lab, "remote-docker", known_hosts=empty)
    with anyio.fail_after(30), pytest.raises(TransportError, match=rf"host key .* not in known_hosts .*{empty}"):
        async with ssh_transport(SshSettings(host="remote-docker", config_file=str(config))):
            pass


# ---------------------------------------------------------------- the Docker API over SSH


async def _ping(stream: anyio.abc.ByteStream) -> bytes:
    await stream.send(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
    reply = b""
    try:
        while True:
            reply += await stream.receive()
    except anyio.EndOfStream:
        pass
    await stream.aclose()
    return reply


@pytest.mark.anyio
async def test_docker_api_over_ssh(lab: LabInfo) -> None:
    with anyio.fail_after(60):
        conn = await open_connection(settings(lab), TIMEOUTS)
        try:
            # the socket directly (direct-streamlocal), and `docker system dial-stdio` as the docker CLI does
            for path in (str(lab.docker_sock), None):
                reply = await _ping(await open_docker_socket_stream(conn, path))
                assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(b"OK"), (path, reply)
        finally:
            await conn.aclose()
        # What the docker adapter hooks: a local unix socket, relayed to the remote API per connection.
        async with ssh_transport(settings(lab)) as transport, \
                serve_unix_bridge(lambda: open_docker_socket_stream(transport, str(lab.docker_sock))) as path:
            assert oct(os.stat(os.path.dirname(path)).st_mode & 0o777) == "0o700"
            for _ in range(3):
                reply = await _ping(await anyio.connect_unix(path))
                assert reply.startswith(b"HTTP/1.0 200"), reply
        assert not await anyio.Path(path).exists()


# ---------------------------------------------------------------- the real CLI


def _home(tmp_path: Path, lab: LabInfo, *, known_hosts: Path | None = None) -> Path:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    alias_config(home / ".ssh" / "config", lab, lab.ssh_alias, known_hosts=known_hosts)
    return home


def test_cli_start_via_alias_then_status_and_stop(lab: LabInfo, tmp_path: Path) -> None:
    cli = Cli(tmp_path, env={"HOME": str(_home(tmp_path, lab))})
    result = cli.start_detached("--via", f"ssh://{lab.ssh_alias}", "-L", f"127.0.0.1:0:127.0.0.1:{lab.registry_port}")
    try:
        assert result.returncode == 0, result.stderr + result.stdout
        assert "ready" in result.stdout
        status = cli.status()
        transport = status["transport"]
        assert transport["kind"] == "ssh" and transport["state"] == "connected"
        assert transport["server"] == f"root@{lab.ssh_host}:{lab.ssh_port} ({lab.ssh_alias})"
        port = status["forwards"][0]["port"]
        curl = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/v2/"],
                              capture_output=True, text=True, timeout=30)
        assert curl.stdout == "200", curl.stderr
    finally:
        stop = cli.run("stop")
    assert stop.returncode == 0, stop.stderr


def test_cli_refuses_an_alias_whose_known_hosts_lacks_the_key(lab: LabInfo, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    cli = Cli(tmp_path, env={"HOME": str(_home(tmp_path, lab, known_hosts=empty))})
    result = cli.start_detached("--via", f"ssh://{lab.ssh_alias}", "-L", f"127.0.0.1:0:127.0.0.1:{lab.registry_port}")
    assert result.returncode == ExitCode.TRANSPORT, result.stderr
    assert "host key" in result.stderr and "ssh-keyscan" in result.stderr
    assert cli.run("status").returncode == ExitCode.NOT_RUNNING  # nothing left running
