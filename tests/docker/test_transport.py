"""The docker transport against the lab's real dockerd: the Docker host chosen as the docker CLI would,
skopeo round trips and 4 MiB echoes with half-close over the unix socket and over TCP+TLS (also with a
busybox-only helper image), the helper removed under a running forward, refusals with clear messages,
and the real CLI from start to ``stop --cleanup``.

Targets are addresses inside the lab namespace (the registry on its 127.0.0.1:5000, the echo service on
its 127.0.0.1:7007): reachable only through a helper container on the lab's dockerd.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest

from tests.cli.runner import Cli
from tests.docker.support import forget_image, push_lab_image, stop_container
from tests.helpers import echo_roundtrip, parallel_echoes, running_forward, stream_echo
from tests.lab.fixture import socat18_image
from tests.lab.lab import LabInfo, docker
from tests.oci import build_layout, roundtrip
from tunneld.config import DockerSettings, Timeouts, TransportSpec
from tunneld.docker.api import DockerClient
from tunneld.docker.execs import FIRST_LIMIT, RELAY_PYTHON, DockerStream
from tunneld.docker.host import resolve_endpoint
from tunneld.docker.transport import DockerTransport
from tunneld.errors import ExitCode, TransportError

pytestmark = [pytest.mark.timeout(180)]

TIMEOUTS = Timeouts(connect=10.0, probe=5.0, probe_interval=0.5, ready=30.0, drain=2.0)


def settings(lab: LabInfo, *, tls: bool, relay: str | None = None, **changes: object) -> DockerSettings:
    """Explicit settings for the lab (nothing from os.environ), with a helper name no other test uses;
    ``relay`` picks the helper image (and for "python", the pool of execs instead of the mux)."""
    if relay is not None:
        changes["helper_image"] = image(lab, relay)
        if relay == "python":
            changes["mux_execs"] = 0
    if tls:
        base = DockerSettings(host=lab.docker_host_tcp, tls_verify=True, cert_path=str(lab.client_cert_dir))
    else:
        base = DockerSettings(host=lab.docker_host_unix)
    base = dataclasses.replace(base, helper_name=f"kci-test-{uuid.uuid4().hex[:10]}", helper_images=(lab.socat_image,))
    if "helper_image" in changes:  # one image: the list of one
        changes["helper_images"] = (changes.pop("helper_image"),)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@asynccontextmanager
async def docker_transport(s: DockerSettings, timeouts: Timeouts = TIMEOUTS) -> AsyncIterator[DockerTransport]:
    """The transport; its helper container is removed afterwards whatever happened."""
    try:
        async with DockerTransport(TransportSpec(kind="docker", docker=s), timeouts) as transport:
            yield transport
    finally:
        with anyio.CancelScope(shield=True):
            await remove_helper(s)


async def remove_helper(s: DockerSettings) -> None:
    async with DockerClient(resolve_endpoint(s, {}), timeout=10) as client:
        await client.remove_container(s.helper_name)


async def helper_state(s: DockerSettings) -> str | None:
    async with DockerClient(resolve_endpoint(s, {}), timeout=10) as client:
        info = await client.inspect_container(s.helper_name)
    return None if info is None else info.state


tls_param = pytest.mark.parametrize("tls", [False, True], ids=["unix", "tls"])
# The relay the helper image gets: relay.sh with socat (alpine/socat, as socat 1.7 and as socat 1.8:
# their -d -d messages differ); with python3, helper/mux.py (many connections per exec, the default) or
# helper/relay.py (a pool of execs, one connection each: mux_execs = 0).
relay_param = pytest.mark.parametrize("relay", ["socat", "socat18", "python", "mux"])
pool_relay_param = pytest.mark.parametrize("relay", ["socat", "socat18", "python"])


def image(lab: LabInfo, relay: str) -> str:
    if relay == "socat18":
        return socat18_image(lab)
    return lab.python_image if relay in ("python", "mux") else lab.socat_image


def mode(relay: str) -> str:
    """The relay mode the transport reports for a relay of these tests."""
    return "socat" if relay.startswith("socat") else relay


# ---------------------------------------------------------------- choosing the Docker host (no lab)


def _context(config_dir: Path, name: str, host: str, *, tls_from: Path | None = None) -> None:
    digest = hashlib.sha256(name.encode()).hexdigest()
    meta = config_dir / "contexts" / "meta" / digest
    meta.mkdir(parents=True)
    (meta / "meta.json").write_text(json.dumps({"Name": name, "Endpoints": {"docker": {"Host": host}}}))
    if tls_from is not None:
        tls = config_dir / "contexts" / "tls" / digest / "docker"
        tls.mkdir(parents=True)
        for f in ("ca.pem", "cert.pem", "key.pem"):
            (tls / f).write_bytes((tls_from / f).read_bytes())


def _certs(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for f in ("ca.pem", "cert.pem", "key.pem"):
        (d / f).write_text(f"-- {f} --\n")
    return d


def test_host_precedence_is_the_docker_clis(tmp_path: Path) -> None:
    cfg = tmp_path / "docker"
    _context(cfg, "ci", "tcp://10.9.9.9", tls_from=_certs(tmp_path / "ctx-certs"))
    _context(cfg, "other", "unix:///run/other.sock")
    (cfg / "config.json").write_text(json.dumps({"currentContext": "ci"}))
    env = {"DOCKER_CONFIG": str(cfg)}
    # currentContext from config.json, with the context's TLS material and the CLI's default TLS port
    ep = resolve_endpoint(DockerSettings(), env)
    assert (ep.host, ep.tls is not None) == ("tcp://10.9.9.9:2376", True)
    assert "context 'ci'" in ep.source
    # DOCKER_CONTEXT beats the config file; DOCKER_HOST beats both
    assert resolve_endpoint(DockerSettings(), {**env, "DOCKER_CONTEXT": "other"}).host == "unix:///run/other.sock"
    ep = resolve_endpoint(DockerSettings(), {**env, "DOCKER_CONTEXT": "other", "DOCKER_HOST": "tcp://1.2.3.4"})
    assert (ep.host, ep.source, ep.tls) == ("tcp://1.2.3.4:2375", "DOCKER_HOST", None)
    # explicit settings beat the environment
    assert resolve_endpoint(DockerSettings(context="other"), {**env, "DOCKER_HOST": "tcp://1.2.3.4"}).host == \
        "unix:///run/other.sock"
    assert resolve_endpoint(DockerSettings(host="unix:///x.sock"), {**env, "DOCKER_CONTEXT": "ci"}).host == \
        "unix:///x.sock"
    # the context called "default" is DOCKER_HOST or the local socket, whatever config.json says
    assert resolve_endpoint(DockerSettings(), {**env, "DOCKER_CONTEXT": "default"}).host == "unix:///var/run/docker.sock"
    assert resolve_endpoint(DockerSettings(context="default"), {**env, "DOCKER_HOST": "unix:///h.sock"}).host == \
        "unix:///h.sock"
    # nothing configured: the local socket
    assert resolve_endpoint(DockerSettings(), {"DOCKER_CONFIG": str(tmp_path / "none")}).host == \
        "unix:///var/run/docker.sock"


def test_tls_from_environment_and_settings(tmp_path: Path) -> None:
    certs = _certs(tmp_path / "certs")
    env = {"DOCKER_HOST": "tcp://10.0.0.5:2376", "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(certs)}
    ep = resolve_endpoint(DockerSettings(), env)
    assert ep.tls is not None and ep.tls.verify and ep.tls.cert_dir == str(certs)
    assert "DOCKER_HOST" in ep.describe() and "(TLS)" in ep.describe() and "pem" not in ep.describe()
    # settings.tls_verify=False turns verification off; DOCKER_CERT_PATH defaults to the config dir
    assert resolve_endpoint(DockerSettings(tls_verify=False), env).tls is None
    home_env = {"DOCKER_HOST": "tcp://10.0.0.5", "DOCKER_TLS_VERIFY": "1", "DOCKER_CONFIG": str(certs)}
    assert resolve_endpoint(DockerSettings(), home_env).host == "tcp://10.0.0.5:2376"
    with pytest.raises(TransportError, match=r"ca\.pem is missing.*DOCKER_CERT_PATH"):
        resolve_endpoint(DockerSettings(cert_path=str(tmp_path / "empty")), env)


def test_unusable_hosts_are_named(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match=r"unsupported Docker host 'npipe:////./pipe/x'"):
        resolve_endpoint(DockerSettings(), {"DOCKER_HOST": "npipe:////./pipe/x"})
    with pytest.raises(TransportError, match=r"docker context 'gone' .*does not exist"):
        resolve_endpoint(DockerSettings(), {"DOCKER_CONTEXT": "gone", "DOCKER_CONFIG": str(tmp_path)})


@pytest.mark.anyio
async def test_unreachable_ssh_docker_host_is_named() -> None:
    # ssh:// works (tests/docker/test_over_ssh.py); here only that a refusal names the host.
    s = DockerSettings(host="ssh://user@127.0.0.1:1")
    with anyio.fail_after(15), pytest.raises(TransportError, match=r"ssh://user@127\.0\.0\.1:1.*connection refused"):
        async with DockerTransport(TransportSpec(kind="docker", docker=s), dataclasses.replace(TIMEOUTS, connect=1.0)):
            pass


@pytest.mark.anyio
async def test_unreachable_docker_host_names_the_address() -> None:
    s = DockerSettings(host="tcp://127.0.0.1:1")
    started = time.monotonic()
    with anyio.fail_after(10), pytest.raises(TransportError) as err:
        async with DockerTransport(TransportSpec(kind="docker", docker=s), dataclasses.replace(TIMEOUTS, connect=2)):
            pass
    assert "cannot reach the Docker host at tcp://127.0.0.1:1: connection refused" in str(err.value)
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------- refusals by the lab's dockerd


@pytest.mark.anyio
async def test_wrong_client_certificate_says_so(lab: LabInfo) -> None:
    s = settings(lab, tls=True, cert_path=str(lab.wrong_client_cert_dir))
    with anyio.fail_after(30), pytest.raises(TransportError) as err:
        async with DockerTransport(TransportSpec(kind="docker", docker=s), TIMEOUTS):
            pass
    msg = str(err.value)
    assert f"TLS handshake with the Docker host at {lab.docker_host_tcp} failed" in msg
    assert "client certificate" in msg and f"DOCKER_CERT_PATH ({lab.wrong_client_cert_dir})" in msg


@pytest.mark.anyio
async def test_untrusted_daemon_certificate_says_verify_failed(lab: LabInfo, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.pem").write_bytes((lab.cert_dir / "wrong-ca.pem").read_bytes())  # not the daemon's CA
    for f in ("cert.pem", "key.pem"):
        (certs / f).write_bytes((lab.client_cert_dir / f).read_bytes())
    s = settings(lab, tls=True, cert_path=str(certs))
    with anyio.fail_after(30), pytest.raises(TransportError) as err:
        async with DockerTransport(TransportSpec(kind="docker", docker=s), TIMEOUTS):
            pass
    msg = str(err.value)
    assert f"TLS handshake with the Docker host at {lab.docker_host_tcp} failed: certificate verify failed" in msg
    assert f"check DOCKER_CERT_PATH ({certs})" in msg


@pytest.mark.anyio
async def test_plain_http_to_the_tls_port_asks_for_tls(lab: LabInfo) -> None:
    s = settings(lab, tls=False, host=lab.docker_host_tcp)
    with anyio.fail_after(30), pytest.raises(TransportError, match="expects TLS: set DOCKER_TLS_VERIFY=1"):
        async with DockerTransport(TransportSpec(kind="docker", docker=s), TIMEOUTS):
            pass


@pytest.mark.anyio
async def test_missing_helper_image_is_named(lab: LabInfo) -> None:
    s = settings(lab, tls=False, helper_image="kcilab/no-such-image:1")
    with anyio.fail_after(60), \
            pytest.raises(TransportError, match=r"helper image kcilab/no-such-image:1 .*helper-image"):
        async with docker_transport(s):
            pass


@pytest.mark.anyio
async def test_a_helper_image_pulled_from_a_registry_shows_in_the_log(
        lab: LabInfo, caplog: pytest.LogCaptureFixture) -> None:
    # The lab's socat image plus a layer, under a name only the lab's registry has: the transport must pull it.
    ref = push_lab_image(lab, lab.socat_image, f"kcit/helper-{uuid.uuid4().hex[:8]}", new_layer=2 << 20)
    caplog.set_level(logging.INFO, logger="tunneld.docker.transport")
    try:
        with anyio.fail_after(60):
            async with docker_transport(settings(lab, tls=True, helper_image=ref)) as transport, \
                    running_forward(transport, lab.echo_port) as fwd:
                assert await echo_roundtrip(fwd.port, b"pulled helper") == b"pulled helper"
    finally:
        forget_image(ref)
    pulls = [r for r in caplog.records if r.name == "tunneld.docker.transport" and "docker: pull" in r.getMessage()]
    assert all(r.levelno == logging.INFO for r in pulls)
    messages = [r.getMessage() for r in pulls]
    # One layer to fetch (a pull this fast has no progress line), the socat image's already on the Docker host.
    assert messages[0] == f"docker: pulling {ref}" and len(messages) == 3, messages
    assert re.fullmatch(rf"docker: pulling {re.escape(ref)}: layer [0-9a-f]{{12}}: done \(2\.0 MiB\)", messages[1])
    assert re.fullmatch(rf"docker: pulled {re.escape(ref)} in \d+\.\ds \(1 layer, 2\.0 MiB, \d+ already there\)",
                        messages[2]), messages


@pytest.mark.anyio
async def test_an_error_inside_the_transport_block_comes_out_as_itself(lab: LabInfo) -> None:
    with anyio.fail_after(60), pytest.raises(LookupError, match=r"^the caller's own$"):
        async with docker_transport(settings(lab, tls=False)):
            raise LookupError("the caller's own")  # not wrapped in an ExceptionGroup by our task group


def test_the_python_relay_names_a_python3_too_old_for_it() -> None:
    # The real relay source, run the way relay.sh runs it, under a python3 that says it is 3.4.
    old_python = "import sys; sys.version_info = (3, 4, 10, 'final', 0); exec(compile(sys.argv.pop(1), 'r', 'exec'))"
    out = subprocess.run([sys.executable, "-S", "-c", old_python, RELAY_PYTHON, "10"], input=b"C 127.0.0.1 1 n k\n",
                         capture_output=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr.decode() == "the helper's python3 is 3.4; the python relay needs 3.5 or later\n"
    assert out.stdout == b""  # not "ready", and nothing on the data stream


# A python3 that runs the relay as relay.sh hands it over (-S -c SOURCE TIMEOUT) but says it is 3.4.
OLD_PYTHON3 = r"""#!/bin/sh
v='import sys; sys.version_info = (3, 4, 10); exec(compile(sys.argv.pop(1), "r", "exec"))'
exec /usr/bin/python3 -S -c "$v" "$3" "$4"
"""


@contextlib.contextmanager
def built_image(lab: LabInfo, context: Path, name: str, dockerfile: str, files: dict[str, str] | None = None
                ) -> Iterator[str]:
    """``docker build`` on the lab's dockerd from ``dockerfile`` and ``files`` written into ``context``
    (FROM a lab image: nothing is pulled); the new tag, removed afterwards."""
    context.mkdir()
    for file, text in (files or {}).items():
        (context / file).write_text(text)
    (context / "Dockerfile").write_text(dockerfile)
    tag = f"{name}:{uuid.uuid4().hex[:8]}"
    build = subprocess.run(["docker", "build", "-q", "-t", tag, str(context)], capture_output=True, text=True,
                           timeout=120, env={**os.environ, **lab.docker_env(False), "DOCKER_BUILDKIT": "0"})
    assert build.returncode == 0, build.stderr
    try:
        yield tag
    finally:
        docker("rmi", "-f", tag, check=False)


@pytest.fixture
def old_python3_image(lab: LabInfo, tmp_path: Path) -> Iterator[str]:
    """The lab's python image with that python3 first in PATH, built (offline) on the lab's dockerd."""
    with built_image(lab, tmp_path / "old-python3", "kcilab/test-old-python3",
                     f"FROM {lab.python_image}\nCOPY python3 /usr/local/bin/python3\n"
                     "RUN chmod 755 /usr/local/bin/python3\n", {"python3": OLD_PYTHON3}) as tag:
        yield tag


@pytest.mark.anyio
async def test_a_helper_whose_python3_is_too_old_gets_the_shell_relay(
        lab: LabInfo, old_python3_image: str, caplog: pytest.LogCaptureFixture) -> None:
    # The image is busybox (with nc) plus that python3: the script relays, and the log says why.
    s = settings(lab, tls=False, helper_image=old_python3_image)
    with anyio.fail_after(60):
        async with docker_transport(s) as transport, running_forward(transport, lab.echo_port) as fwd:
            assert transport.info()["relay"] == "nc"
            assert await echo_roundtrip(fwd.port, b"past an old python3") == b"past an old python3"
    assert (f"docker: helper image {old_python3_image}: the helper's python3 is 3.4; the python relay needs 3.5 "
            "or later; using the shell relay") in caplog.messages


# ---------------------------------------------------------------- streams through the helper


@relay_param
@tls_param
@pytest.mark.anyio
async def test_echo_4mib_with_half_close(lab: LabInfo, tls: bool, relay: str) -> None:
    """Over TLS the exec stream cannot half-close: the client's EOF travels in band and must still arrive."""
    data = os.urandom(4 * 1024 * 1024)
    s = settings(lab, tls=tls, relay=relay)
    with anyio.fail_after(90):
        async with docker_transport(s) as transport, running_forward(transport, lab.echo_port) as fwd:
            assert await echo_roundtrip(fwd.port, data) == data
            await parallel_echoes(fwd.port, data[: 256 * 1024])
            info = transport.info()
            assert (info["tls"], info["relay"], info["relay_primed"]) == (tls, mode(relay), mode(relay) == "socat")


@tls_param
@pytest.mark.anyio
async def test_echo_4mib_with_a_busybox_only_helper(lab: LabInfo, tls: bool) -> None:
    data = os.urandom(4 * 1024 * 1024)
    s = settings(lab, tls=tls, helper_image=lab.busybox_image)
    with anyio.fail_after(120):
        async with docker_transport(s) as transport, running_forward(transport, lab.echo_port) as fwd:
            assert transport.info()["relay"] == "nc"
            assert await echo_roundtrip(fwd.port, data) == data
            for i in range(3):
                assert await echo_roundtrip(fwd.port, b"small %d" % i) == b"small %d" % i
            assert await _echo(transport, lab, b"nc over IPv6", host=lab.echo_host6) == b"nc over IPv6"
            with pytest.raises(TransportError, match=r"127\.0\.0\.1:1 from helper container .*[Rr]efused"):
                await transport.connect("127.0.0.1", 1)


@relay_param
@pytest.mark.anyio
async def test_stream_contract_and_slot_reuse(lab: LabInfo, relay: str) -> None:
    """Bytes after our EOF still arrive; EndOfStream at the far side's EOF; a refused target is named;
    connections reuse the pooled execs instead of starting one each."""
    with anyio.fail_after(60):
        async with docker_transport(settings(lab, tls=False, pool_size=2, relay=relay)) as transport:
            for i in range(20):
                stream = await transport.connect("127.0.0.1", lab.echo_port)
                await stream.send(b"ping %d" % i)
                await stream.send_eof()
                got = b""
                with pytest.raises(anyio.EndOfStream):
                    while True:
                        got += await stream.receive()
                assert got == b"ping %d" % i
                await stream.aclose()
                with pytest.raises(anyio.ClosedResourceError):
                    await stream.receive()
            assert await _echo(transport, lab, b"over IPv6", host=lab.echo_host6) == b"over IPv6"
            refused = r"127\.0\.0\.1:1 from helper container kci-test-\w+: Connection refused$"
            with pytest.raises(TransportError, match=refused):
                await transport.connect("127.0.0.1", 1)
            # A probe-like open-and-close leaves the exec reusable too.
            for _ in range(5):
                await (await transport.connect("127.0.0.1", lab.echo_port)).aclose()
            assert await _echo(transport, lab, b"still fine") == b"still fine"
            info = transport.info()
            assert info["connections"] == 27
            assert isinstance(info["execs_started"], int) and info["execs_started"] <= 8, info


async def _echo(transport: DockerTransport, lab: LabInfo, data: bytes, host: str = "127.0.0.1",
                first: bytes = b"") -> bytes:
    return await stream_echo(await transport.connect(host, lab.echo_port, first), data)


@relay_param
@tls_param
@pytest.mark.anyio
async def test_first_bytes_ride_with_the_request(lab: LabInfo, tls: bool, relay: str) -> None:
    """A client's first bytes go out with the connection request (one Docker round trip less): small
    ones, ones beyond what may wait in the relay's FIFO, and ones for a target that refuses, after
    which the same exec serves the next connection."""
    with anyio.fail_after(60):
        async with docker_transport(settings(lab, tls=tls, pool_size=1, relay=relay)) as transport:
            assert await _echo(transport, lab, b"", first=b"hello") == b"hello"
            big = os.urandom(FIRST_LIMIT * 3 + 7)
            assert await _echo(transport, lab, b" and more", first=big) == big + b" and more"
            for _ in range(3):
                # The refusal itself, named as the forward logs it: target, helper, then the reason.
                with pytest.raises(TransportError, match=r"^could not connect to 127\.0\.0\.1:1 from "
                                                         r"helper container [^:]+: Connection refused$"):
                    await transport.connect("127.0.0.1", 1, os.urandom(FIRST_LIMIT))
                assert await _echo(transport, lab, b"", first=b"still") == b"still"
            # The same as without first bytes (pool top-ups, or the mux's execs; with socat, one more: the
            # first exec asked for the mux relay and found no python3); an exec lost per refusal would
            # make it 6 or more.
            execs = transport.info()["execs_started"]
            assert isinstance(execs, int) and execs <= 3 + (mode(relay) == "socat"), transport.info()


# Inside the lab namespace: say something, half-close, then report what the client sent after that.
HALF_CLOSING_SERVER = """
c, _ = s.accept()
c.sendall(b"greeting")
c.shutdown(socket.SHUT_WR)
got = b""
while data := c.recv(65536):
    got += data
print(got.decode(), flush=True)
"""


async def _lines(stream: anyio.abc.ByteReceiveStream) -> AsyncIterator[str]:
    buf = b""
    while True:
        while b"\n" not in buf:
            buf += await stream.receive()
        line, buf = buf.split(b"\n", 1)
        yield line.decode()


# What every ns_server runs first: ``s`` listens on the namespace's loopback, its port goes to stdout.
NS_LISTEN = """
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(8)
print(s.getsockname()[1], flush=True)
"""


@asynccontextmanager
async def ns_server(lab: LabInfo, source: str) -> AsyncIterator[tuple[int, AsyncIterator[str]]]:
    """A Python server inside the lab namespace: NS_LISTEN, then ``source`` (which serves ``s``); the
    port, and the rest of what it prints, line by line; killed afterwards unless it has exited."""
    argv = ["nsenter", f"--net={lab.netns_path}", sys.executable, "-c", NS_LISTEN + source]
    async with await anyio.open_process(argv, stdin=subprocess.DEVNULL) as server:
        assert server.stdout is not None
        lines = _lines(server.stdout)
        port = int(await anext(lines))
        try:
            yield port, lines
        finally:
            with contextlib.suppress(ProcessLookupError):
                server.kill()


@relay_param
@pytest.mark.anyio
async def test_far_side_half_closes_first(lab: LabInfo, relay: str) -> None:
    """The far side says its piece and half-closes; the client keeps sending, and all of it arrives."""
    with anyio.fail_after(60):
        async with ns_server(lab, HALF_CLOSING_SERVER) as (port, lines), \
                docker_transport(settings(lab, tls=True, relay=relay)) as transport:
            stream = await transport.connect("127.0.0.1", port)
            got = b""
            with pytest.raises(anyio.EndOfStream):
                while True:
                    got += await stream.receive()
            assert got == b"greeting"
            await stream.send(b"after your EOF")
            await stream.send_eof()
            await stream.aclose()
            assert await anext(lines) == "after your EOF"


# Inside the lab namespace: accept, say something, then reset the connection (SO_LINGER 0).
RESETTING_SERVER = """
import struct, time
c, _ = s.accept()
c.sendall(b"partial")
time.sleep(0.3)
c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
c.close()
"""


@relay_param  # not busybox nc: it exits 0 on a reset as on an EOF (docs/docker-transport.md)
@pytest.mark.anyio
async def test_a_far_side_reset_is_a_broken_stream_not_an_end(lab: LabInfo, relay: str) -> None:
    """A reset far side must not look like a clean EOF to the client (a cut-off reply taken for a whole
    one); the slot carries the next connection."""
    s = settings(lab, tls=True, pool_size=1, relay=relay)
    with anyio.fail_after(60):
        async with ns_server(lab, RESETTING_SERVER) as (port, _), docker_transport(s) as transport:
            stream = await transport.connect("127.0.0.1", port)
            got = b""
            with pytest.raises(anyio.BrokenResourceError, match="reset") as broken:
                while True:
                    got += await stream.receive()
            assert b"partial".startswith(got)
            if mode(relay) == "socat":  # socat's reason without the call that failed, as 1.7 and 1.8 word it
                assert str(broken.value) == "Connection reset by peer"
            await stream.aclose()
            assert await _echo(transport, lab, b"next") == b"next"


@pytest.fixture(params=["socat", "socat18"])
def fifoless_socat_image(lab: LabInfo, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A socat image (1.7 or 1.8) whose /tmp is a file: relay.sh can make no FIFO, so it starts socat
    per connection and says how socat exited itself ("X STATUS"), right when it does."""
    with built_image(lab, tmp_path / "fifoless", "kcilab/test-fifoless",
                     f"FROM {image(lab, request.param)}\nRUN rm -rf /tmp && touch /tmp\n") as tag:
        yield tag


@pytest.mark.anyio
async def test_socat_without_a_fifo_echoes_refuses_and_breaks_on_reset(lab: LabInfo, fifoless_socat_image: str) -> None:
    """The relay's other socat path (a process per connection): half-close, a refusal and a reset come
    out as with the primed one."""
    data = os.urandom(1024 * 1024)
    s = settings(lab, tls=True, pool_size=1, helper_image=fifoless_socat_image)
    with anyio.fail_after(60):
        async with ns_server(lab, RESETTING_SERVER) as (port, _), docker_transport(s) as transport:
            assert (transport.info()["relay"], transport.info()["relay_primed"]) == ("socat", False)
            assert await _echo(transport, lab, data) == data
            with pytest.raises(TransportError, match=r"127\.0\.0\.1:1 from helper container kci-test-\w+: "
                                                     r"Connection refused$"):
                await transport.connect("127.0.0.1", 1)
            stream = await transport.connect("127.0.0.1", port)
            with pytest.raises(anyio.BrokenResourceError) as broken:
                while True:
                    await stream.receive()
            assert str(broken.value) == "Connection reset by peer"
            await stream.aclose()
            assert await _echo(transport, lab, b"next") == b"next"


# Inside the lab namespace: accept, read to EOF, and never close (a far side that ignores our EOF).
HOLDING_SERVER = """
held = []
while True:
    c, _ = s.accept()
    while c.recv(65536):
        pass
    held.append(c)
"""


@pool_relay_param  # the mux's own: tests/docker/test_mux.py
@pytest.mark.anyio
async def test_client_leaving_a_far_side_that_never_closes_frees_the_slot(lab: LabInfo, relay: str) -> None:
    """After timeouts.drain the relay of that one connection is ended; the exec itself is kept."""
    s = settings(lab, tls=False, pool_size=1, relay=relay)
    with anyio.fail_after(60):
        async with ns_server(lab, HOLDING_SERVER) as (port, _), docker_transport(s) as transport:
            stream = await transport.connect("127.0.0.1", port)
            assert isinstance(stream, DockerStream)  # a pool's slot, not the mux
            slot = stream.slot
            await stream.send(b"hello")
            await stream.aclose()  # the far side sees our EOF, and keeps its side open
            started = time.monotonic()
            # Nothing in the daemon needs an event for "slot free again": poll.
            while slot.conn is not None:
                await anyio.sleep(0.05)
            took = time.monotonic() - started
            assert TIMEOUTS.drain <= took < 3 * TIMEOUTS.drain + 2, took
            assert slot.dead is None  # the exec carries on
            assert await _echo(transport, lab, b"next") == b"next"


@pytest.mark.parametrize("tls, relay", [(False, "socat"), (True, "socat"), (True, "socat18"), (True, "python"),
                                        (True, "mux")], ids=["unix", "tls", "tls-socat18", "tls-python", "tls-mux"])
@pytest.mark.anyio
async def test_skopeo_push_and_pull_digests_identical(lab: LabInfo, tmp_path: Path, tls: bool, relay: str) -> None:
    layout = build_layout(tmp_path / "src", layer_sizes=(16 << 20, 10 << 20, 8 << 20))
    assert layout.size >= 32 * 1024 * 1024
    with anyio.fail_after(240):
        async with docker_transport(settings(lab, tls=tls, relay=relay)) as transport, \
                running_forward(transport, lab.registry_port) as fwd:
            registry = f"127.0.0.1:{fwd.port}"
            repo = f"kci/docker-{'tls' if tls else 'unix'}-{os.getpid()}-{time.monotonic_ns()}"
            await anyio.to_thread.run_sync(roundtrip, layout, registry, repo, tmp_path)
            assert fwd.stats.traffic.up >= layout.size and fwd.stats.traffic.down >= layout.size


@pool_relay_param
@pytest.mark.anyio
async def test_closing_while_the_pool_tops_up_is_clean(lab: LabInfo, relay: str) -> None:
    """A transport closed while exec starts are in flight (the pool's top-up after a connection took a
    slot) lets them finish and aborts them, rather than cancelling them mid-request: over TLS under uvloop that
    made uvloop write on a closed socket ("Fatal error on SSL protocol" in the loop's exception
    handler, which anyio's test runner raises as the test's failure)."""
    s = settings(lab, tls=True, relay=relay)
    with anyio.fail_after(90):
        for _ in range(10):
            async with docker_transport(s) as transport:
                assert await _echo(transport, lab, b"one") == b"one"  # and the pool tops up behind it
                assert transport.info()["pool"]["starting"] > 0  # type: ignore[index]


@pytest.mark.anyio
async def test_helper_removed_while_running_next_connection_works(lab: LabInfo) -> None:
    s = settings(lab, tls=True)
    with anyio.fail_after(90):
        async with docker_transport(s) as transport, running_forward(transport, lab.echo_port) as fwd:
            assert await echo_roundtrip(fwd.port, b"before") == b"before"
            first = transport.helper_id
            await remove_helper(s)  # `docker rm -f` behind the daemon's back: every exec dies with it
            assert await echo_roundtrip(fwd.port, b"after") == b"after"
            assert transport.helper_id != first
            assert await helper_state(s) == "running"
            # and the pool refills: several at once still work
            await parallel_echoes(fwd.port, b"again ", count=6)


@pytest.mark.anyio
async def test_helper_reused_started_and_recreated(lab: LabInfo) -> None:
    s = settings(lab, tls=False)
    try:
        async with DockerTransport(TransportSpec(kind="docker", docker=s), TIMEOUTS) as transport:
            first = transport.helper_id
        async with DockerClient(resolve_endpoint(s, {}), timeout=10) as client:
            info = await client.inspect_container(s.helper_name)
            assert info is not None and info.running and info.labels["io.kci-tunneld.role"] == "helper"
            await stop_container(client, s.helper_name)  # stopped: started again
        async with DockerTransport(TransportSpec(kind="docker", docker=s), TIMEOUTS) as transport:
            assert transport.helper_id == first
            assert await _echo(transport, lab, b"restarted") == b"restarted"
        other = dataclasses.replace(s, helper_images=(lab.busybox_image,))  # another image: recreated
        async with DockerTransport(TransportSpec(kind="docker", docker=other), TIMEOUTS) as transport:
            assert transport.helper_id != first
            assert transport.info()["relay"] == "nc"
            await transport.cleanup()
        assert await helper_state(s) is None
    finally:
        await remove_helper(s)


@pytest.mark.anyio
async def test_a_foreign_container_with_the_helper_name_is_left_alone(lab: LabInfo) -> None:
    s = settings(lab, tls=False)
    async with DockerClient(resolve_endpoint(s, {}), timeout=10) as client:
        await client.create_container_json(s.helper_name, {"Image": lab.busybox_image, "Cmd": ["true"]})
        try:
            with anyio.fail_after(30), pytest.raises(TransportError, match="was not created by kci-tunneld"):
                async with DockerTransport(TransportSpec(kind="docker", docker=s), TIMEOUTS):
                    pass
            assert await client.inspect_container(s.helper_name) is not None
        finally:
            await client.remove_container(s.helper_name)


def _open_sockets() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
    return {link for link in out if link.startswith("socket:")}


@tls_param
@pytest.mark.anyio
async def test_closing_an_exec_whose_far_side_stopped_reading_frees_its_socket(lab: LabInfo, tls: bool) -> None:
    """A retired exec must not keep its connection: a graceful close would wait for a far side that
    never reads its stdin again (and, over TLS, for its close_notify), holding the socket for good."""
    s = settings(lab, tls=tls)
    async with DockerClient(resolve_endpoint(s, {}), timeout=10) as client:
        cid = await client.create_container(s.helper_name, lab.socat_image, entrypoint=["/bin/sh"],
                                            cmd=["-c", "sleep 3600"], labels={"io.kci-tunneld.test": "1"})
        try:
            await client.start_container(cid)
            async with client.exec_stream(cid, ["sleep", "3600"]) as stream:  # never reads its stdin
                sock = stream._transport.get_extra_info("socket")  # type: ignore[union-attr]
                ours = os.readlink(f"/proc/self/fd/{sock.fileno()}")
                with anyio.move_on_after(2) as stuffed:
                    while True:
                        await stream.write(b"x" * 65536)
                assert stuffed.cancelled_caught, "the far side took everything: its stdin was read after all"
            with anyio.fail_after(5):
                while ours in _open_sockets():
                    await anyio.sleep(0.05)
        finally:
            with anyio.CancelScope(shield=True):
                await client.remove_container(cid)


# ---------------------------------------------------------------- the real CLI


def test_cli_start_via_docker_status_and_stop_cleanup(lab: LabInfo, tmp_path: Path) -> None:
    helper = f"kci-test-{uuid.uuid4().hex[:10]}"
    config = tmp_path / "config.toml"
    config.write_text(f'[transport]\nvia = "docker"\n[transport.docker]\nhelper_name = "{helper}"\n'
                      f'helper_image = "{lab.socat_image}"\n')
    cli = Cli(tmp_path, env={**lab.docker_env(tls=True), "DOCKER_CONFIG": str(tmp_path / "docker-config")})
    result = cli.start_detached("--via", "docker", "--config", str(config),
                                "-L", f"127.0.0.1:0:127.0.0.1:{lab.registry_port}")
    try:
        assert result.returncode == 0, result.stderr + result.stdout
        status = cli.status()
        transport = status["transport"]
        assert transport["kind"] == "docker" and transport["docker_host"] == lab.docker_host_tcp
        assert transport["tls"] is True and transport["helper"] == helper
        assert "key.pem" not in json.dumps(status)  # no secrets or key paths in status
        assert status["forwards"][0]["state"] == "ready"
        assert anyio.run(helper_state, _cli_settings(lab, helper)) == "running"
        text = cli.run("status")
        assert "via docker (state connected, relay socat, reconnects 0)" in text.stdout, text.stdout
    finally:
        stop = cli.run("stop", "--cleanup")
        if stop.returncode != 0:
            cli.cleanup()
            anyio.run(remove_helper, _cli_settings(lab, helper))
    assert stop.returncode == 0, stop.stderr
    assert cli.run("status").returncode == ExitCode.NOT_RUNNING
    assert anyio.run(helper_state, _cli_settings(lab, helper)) is None


def test_cli_wrong_certificates_fail_start_with_the_reason(lab: LabInfo, tmp_path: Path) -> None:
    env = {**lab.docker_env(tls=True), "DOCKER_CERT_PATH": str(lab.wrong_client_cert_dir)}
    cli = Cli(tmp_path, env=env)
    result = cli.start_detached("--via", "docker", "-L", f"127.0.0.1:0:127.0.0.1:{lab.registry_port}")
    assert result.returncode == ExitCode.TRANSPORT, result.stderr
    assert "TLS handshake" in result.stderr and "DOCKER_CERT_PATH" in result.stderr
    assert cli.run("status").returncode == ExitCode.NOT_RUNNING


def _cli_settings(lab: LabInfo, helper: str) -> DockerSettings:
    return DockerSettings(host=lab.docker_host_unix, helper_name=helper)
