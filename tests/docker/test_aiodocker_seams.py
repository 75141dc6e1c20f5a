"""aiodocker's private parts that tunneld/docker/api.py relies on, pinned against the lab's real dockerd.

aiodocker is 0.x: a minor release may rename or change any of these without notice, and pyproject.toml
bounds it to the series tested here. Each test names the attribute and what the adapter uses it for, so
that a new release that breaks one fails here, loudly, rather than as a hung or leaking exec stream in
a forward. docs/docker-transport.md ("aiodocker's private parts we rely on") lists the same seams.

The path the adapter takes is exercised for real (the adapter's own calls, and the same aiodocker calls
it makes), over the unix socket and, for the exec stream, over TCP+TLS too.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiodocker
import aiodocker.stream
import aiohttp
import anyio
import pytest

from tests.lab.lab import LabInfo, docker
from tunneld.config import DockerSettings
from tunneld.docker.api import DockerAPIError, DockerClient
from tunneld.docker.host import resolve_endpoint
from tunneld.errors import TransportError

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]

LABEL = "kci-test.seams"
tls_param = pytest.mark.parametrize("tls", [False, True], ids=["unix", "tls"])


def seam(attr: str, use: str) -> str:
    """The failure message: which private part changed and what the adapter needs it for."""
    return (f"aiodocker {aiodocker.__version__}: {attr} no longer behaves as tunneld/docker/api.py needs: "
            f"the adapter uses it {use}. Adapt the adapter before widening aiodocker's bound in pyproject.toml.")


@pytest.fixture(scope="module")
def container(lab: LabInfo) -> Iterator[str]:
    """A running busybox container (labelled, one published port on the lab's 127.0.0.1) to exec into."""
    name = f"kci-test-seams-{uuid.uuid4().hex[:8]}"
    docker("run", "-d", "--init", "--name", name, "--label", f"{LABEL}={name}", "-p", "127.0.0.1::8080",
           lab.busybox_image, "sleep", "600")
    try:
        yield name
    finally:
        docker("rm", "-f", name, check=False)


@asynccontextmanager
async def client_for(lab: LabInfo, *, tls: bool = False) -> AsyncIterator[DockerClient]:
    if tls:
        s = DockerSettings(host=lab.docker_host_tcp, tls_verify=True, cert_path=str(lab.client_cert_dir))
    else:
        s = DockerSettings(host=lab.docker_host_unix)
    async with DockerClient(resolve_endpoint(s, {}), timeout=10) as client:
        yield client


def open_sockets() -> set[str]:
    """This process's open sockets, as /proc names them (``socket:[inode]``)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed between listdir and readlink
        if target.startswith("socket:"):
            found.add(target)
    return found


def socket_name(transport: Any) -> str:
    """The /proc name of the socket under an asyncio or uvloop transport (plain or TLS)."""
    sock = transport.get_extra_info("socket")
    assert sock is not None, f"{type(transport).__name__} gives no socket"
    return f"socket:[{os.fstat(sock.fileno()).st_ino}]"


async def wait_closed(name: str, *, deadline: float, what: str) -> None:
    with anyio.move_on_after(deadline):
        while name in open_sockets():
            await anyio.sleep(0.02)
    assert name not in open_sockets(), f"{what}: the socket is still open {deadline:g}s later"


# ---------------------------------------------------------------- DockerContainer._container


async def test_container_objects_carry_the_engine_document_in__container(lab: LabInfo, container: str) -> None:
    """inspect_container, container_details, list_containers, published_ports, running_containers and
    running_container read the Engine's whole
    inspect or list document from ``DockerContainer._container``: aiodocker has no public accessor for it
    (``container[key]`` reads one key; ``show()`` costs another request)."""
    use = "to read the Engine's inspect/list document (inspect_container, container_details, list_containers, " \
          "published_ports)"
    host_port = int(docker("port", container, "8080/tcp").stdout.split()[0].rsplit(":", 1)[1])
    with anyio.fail_after(30):
        async with client_for(lab) as client:
            got = await client.docker.containers.get(container)
            assert hasattr(got, "_container"), seam("DockerContainer._container", use)
            doc = got._container
            assert isinstance(doc, dict), seam("DockerContainer._container (a dict)", use)
            assert doc.get("Id") == got.id and doc.get("Name") == f"/{container}", \
                seam("DockerContainer._container (the inspect document after containers.get)", use)
            assert doc["State"]["Running"] is True and doc["Config"]["Labels"].get(LABEL) == container, \
                seam("DockerContainer._container (State, Config.Labels)", use)

            listed = await client.docker.containers.list(all="true",
                                                         filters=json.dumps({"label": [f"{LABEL}={container}"]}))
            assert len(listed) == 1 and hasattr(listed[0], "_container"), seam("DockerContainer._container", use)
            row = listed[0]._container
            assert isinstance(row, dict) and row.get("Names") == [f"/{container}"] and row.get("State") == "running", \
                seam("DockerContainer._container (the list row after containers.list: Names, State)", use)
            assert {"IP": "127.0.0.1", "PrivatePort": 8080, "PublicPort": host_port, "Type": "tcp"} in row["Ports"], \
                seam("DockerContainer._container (the list row's Ports)", use)

            # The adapter's calls built on it.
            info = await client.inspect_container(container)
            assert info is not None and info.running and info.labels.get(LABEL) == container
            assert await client.container_details(container) is not None
            [found] = await client.list_containers({LABEL: container})
            assert (found.name, found.id, found.running) == (container, got.id, True)
            mine = [p for p in await client.published_ports() if p.container == container]
            assert [(p.host_ip, p.host_port, p.container_port, p.proto) for p in mine] == \
                [("127.0.0.1", host_port, 8080, "tcp")]
            # --auto's: the list row's Image and Labels, and the inspect document's NetworkSettings.Ports.
            [listed_here] = [c for c in await client.running_containers() if c.name == container]
            inspected = await client.running_container(container)
            assert inspected is not None
            for c in (listed_here, inspected):
                assert (c.id, c.labels.get(LABEL), [(p.host_ip, p.host_port, p.container_port) for p in c.ports]) == \
                    (got.id, container, [("127.0.0.1", host_port, 8080)])
                assert c.image == doc["Config"]["Image"]


# ---------------------------------------------------------------- Stream.__aenter__ and Stream._resp


@tls_param
async def test_an_exec_stream_is_upgraded_by___aenter___and_keeps_its_response_in__resp(
        lab: LabInfo, container: str, tls: bool) -> None:
    """exec_stream calls ``Stream.__aenter__`` itself, inside ``_call``, so that the POST and the upgrade
    happen under its deadline and error translation (the stream is lazy otherwise: the first read or write
    would send the POST, outside both); it then finds the upgraded connection through ``Stream._resp``."""
    use_enter = "(called by hand in exec_stream) to send POST /exec/{id}/start and upgrade the connection " \
                "before the first read or write, under _call's deadline and error translation"
    use_resp = "to find the upgraded connection's transport, which ExecStream.aclose aborts"
    with anyio.fail_after(30):
        async with client_for(lab, tls=tls) as client:
            exe = await client.docker.containers.container(container).exec(
                ["cat"], stdin=True, stdout=True, stderr=True, tty=False)
            stream = exe.start(detach=False, timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10))
            assert isinstance(stream, aiodocker.stream.Stream), seam("Execs.start(detach=False) -> Stream", use_enter)
            assert hasattr(stream, "_resp") and stream._resp is None, \
                seam("Stream._resp (None until the stream is entered: nothing sent yet)", use_resp)
            transport = None
            try:
                assert await stream.__aenter__() is stream, seam("Stream.__aenter__", use_enter)
                resp = stream._resp
                assert isinstance(resp, aiohttp.ClientResponse) and resp.status == 101, \
                    seam("Stream._resp (the 101 Switching Protocols response once entered)", use_resp)
                assert resp.connection is not None, seam("Stream._resp.connection (held while open)", use_resp)
                transport = resp.connection.transport
                assert callable(getattr(transport, "abort", None)), \
                    seam("Stream._resp.connection.transport (abortable while the stream is open)", use_resp)
                await stream.write_in(b"ping")
                assert await stream.read_out() == (1, b"ping"), seam("Stream.__aenter__ (a usable stream)", use_enter)
            finally:
                await stream.close()
                if transport is not None:
                    transport.abort()  # as ExecStream.aclose does

            # The adapter's path: upgraded (and its transport found) before anything is read or written.
            async with client.exec_stream(container, ["cat"]) as wrapped:
                inner = wrapped._stream
                assert isinstance(inner._resp, aiohttp.ClientResponse) and inner._resp.status == 101, \
                    seam("Stream.__aenter__ / Stream._resp", use_enter)
                assert wrapped._transport is not None and wrapped._transport is inner._resp.connection.transport, \
                    seam("Stream._resp.connection.transport", use_resp)
                await wrapped.write(b"pong")
                assert await wrapped.read() == (wrapped.STDOUT, b"pong")


@tls_param
async def test_the_transport_found_through__resp_drops_a_stalled_exec_stream_at_once(
        lab: LabInfo, container: str, tls: bool) -> None:
    """Why the adapter digs the transport out of ``Stream._resp``: aiodocker's own close is graceful, and
    a far side that stopped reading keeps a gracefully closed socket (and its buffer) forever. Here the
    process never reads its stdin (``sleep``), stdin is written until the buffers are full, and the
    socket must be gone at once after the adapter closes the stream."""
    use = "to abort the upgraded connection in ExecStream.aclose (a graceful close waits on a stalled peer)"
    chunk = b"\0" * (256 << 10)
    with anyio.fail_after(60):
        async with client_for(lab, tls=tls) as client:
            async with client.exec_stream(container, ["sleep", "600"]) as wrapped:
                transport = wrapped._stream._resp.connection.transport
                assert wrapped._transport is transport, seam("Stream._resp.connection.transport", use)
                name = socket_name(transport)
                assert name in open_sockets()
                sent = 0
                while True:  # until a write waits for room: the far side's buffers are full
                    with anyio.move_on_after(0.5) as blocked:
                        await wrapped.write(chunk)
                    sent += len(chunk)
                    if blocked.cancelled_caught:
                        break
                    assert sent < 512 << 20, "stdin of a process that never reads took 512 MiB without blocking"
                assert transport.get_write_buffer_size() > 0  # what a graceful close would wait to send
            await wait_closed(name, deadline=5, what=seam("Stream._resp.connection.transport.abort()", use))


@tls_param
async def test_pump_takes_over_the_parser_of_the_upgraded_connection(lab: LabInfo, container: str, tls: bool) -> None:
    """``ExecStream.pump`` (the mux channel's reader) drains aiodocker's queue (``Stream._queue``), then
    puts its own parser on aiohttp's connection protocol (``set_parser``), taking over the part of a
    frame aiodocker's ``_ExecParser`` holds (``_buf``) and resuming reads aiodocker's queue paused
    (``_reading_paused``); at the end it reads the protocol's ``exception()``. Frames queued before the
    switch, split across reads and after it all arrive, in order, and the pump returns at the exec's end."""
    use = "in ExecStream.pump, to take each frame from the connection's data_received"
    with anyio.fail_after(30):
        async with client_for(lab, tls=tls) as client:
            script = "echo early; head -c 300000; echo late >&2"
            async with client.exec_stream(container, ["sh", "-c", script]) as wrapped:
                inner = wrapped._stream
                assert isinstance(inner._queue, aiodocker.stream.FlowControlDataQueue), \
                    seam("Stream._queue (aiodocker's queue of parsed frames)", use)
                protocol = inner._resp.connection.protocol
                assert isinstance(protocol._payload_parser, aiodocker.stream._ExecParser), \
                    seam("ResponseHandler._payload_parser (aiodocker's _ExecParser once upgraded)", use)
                assert isinstance(protocol._payload_parser._buf, bytearray), seam("_ExecParser._buf", use)
                assert isinstance(protocol._reading_paused, bool), seam("ResponseHandler._reading_paused", use)
                assert "payload" in inspect.signature(protocol.set_parser).parameters, \
                    seam("ResponseHandler.set_parser(parser, payload)", use)
                while not len(inner._queue):  # "early" queued by aiodocker before the switch
                    await anyio.sleep(0.01)
                got: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
                payload = os.urandom(300000)

                async def send() -> None:
                    await wrapped.write(payload)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(send)
                    await wrapped.pump(lambda kind, data: got[kind].extend(data))
                assert bytes(got[1]) == b"early\n" + payload, seam("the frames through pump", use)
                assert bytes(got[2]) == b"late\n", seam("the frames through pump", use)


# ---------------------------------------------------------------- Docker._query


def test__query_takes_what_the_adapter_passes() -> None:
    """pull_image and container_events call ``Docker._query(path, method, params=..., timeout=...)``."""
    use = "for the streaming answers of POST /images/create (pull_image) and GET /events (container_events)"
    assert hasattr(aiodocker.Docker, "_query"), seam("Docker._query", use)
    params = inspect.signature(aiodocker.Docker._query).parameters
    assert list(params)[1:3] == ["path", "method"] and {"params", "timeout"} <= set(params), \
        seam(f"Docker._query's signature {list(params)}", use)


async def test__query_streams_an_answer_line_by_line_and_the_response_closes_it(lab: LabInfo, container: str) -> None:
    """``_query`` yields aiohttp's ClientResponse itself, read through ``.content`` as the Engine writes it.
    Leaving ``async with query as response, response`` (as pull_image does) before the answer ends must
    close its connection: an events stream never ends by itself."""
    use = "for streaming answers read line by line, closed by the nested `async with response`"
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)
    params = {"filters": json.dumps({"type": ["container"], "container": [container]})}
    with anyio.fail_after(30):
        async with client_for(lab) as client:
            query = client.docker._query("events", params=params, timeout=timeout)
            async with query as response, response:
                assert isinstance(response, aiohttp.ClientResponse) and response.status == 200, \
                    seam("Docker._query (yields the aiohttp.ClientResponse)", use)
                assert response.connection is not None, seam("Docker._query (the response still streaming)", use)
                name = socket_name(response.connection.transport)
                await client.exec_run(container, ["true"])  # exec_create, exec_start, exec_die
                event = json.loads(await response.content.readline())
                assert event.get("Type") == "container" and str(event.get("Action", "")).startswith("exec_"), \
                    seam("Docker._query (the answer as the Engine streams it)", use)
            assert response.closed, seam("Docker._query (its response closed by `async with response`)", use)
            await wait_closed(name, deadline=5, what=seam("Docker._query", use))


async def test_a_pull_through__query_reports_the_engines_refusal(lab: LabInfo) -> None:
    """POST with params through ``_query``; a 4xx comes back as aiodocker's DockerError (translated)."""
    missing = f"{lab.registry_addr}/kcit/seams-missing-{uuid.uuid4().hex[:8]}:t"
    with anyio.fail_after(40):
        async with client_for(lab) as client:
            with pytest.raises(DockerAPIError) as caught:
                await client.pull_image(missing, deadline=30)
    assert caught.value.status == 404, seam("Docker._query (POST images/create, errors as DockerError)",
                                            f"in pull_image; got {caught.value}")


async def test_leaving_container_events_closes_the_stream(lab: LabInfo) -> None:
    """After ``container_events`` exits, its stream is closed: the iterator ends (or reports the closed
    stream) at once instead of waiting for the next event on a connection still open."""
    with anyio.fail_after(30):
        async with client_for(lab) as client:
            async with client.container_events() as events:
                pass
            ended = False
            with anyio.move_on_after(2):
                try:
                    await events.__anext__()
                except (StopAsyncIteration, TransportError):
                    ended = True
            assert ended, seam("Docker._query (leaving its context releases the response)",
                               "in container_events, which relies on query.__aexit__ to close the events stream")


# ---------------------------------------------------------------- DockerError status 900


async def test_a_connection_failure_is_docker_error_900_with_the_aiohttp_error_as_its_context(tmp_path: Path) -> None:
    """``_translate`` takes status 900 as aiodocker's "cannot connect" and finds the aiohttp (and OS) error
    in ``__context__``: that is how "no such socket", "connection refused", TLS failures get named."""
    use = "to name why the Docker host cannot be reached (_translate reads e.__context__ when status is 900)"
    path = tmp_path / "no-docker.sock"
    with anyio.fail_after(20):
        async with aiodocker.Docker(url=f"unix://{path}") as raw:
            with pytest.raises(aiodocker.DockerError) as caught:
                await raw.version()
        assert caught.value.status == 900, seam("DockerError.status 900 for a connection failure", use)
        cause = caught.value.__context__
        assert isinstance(cause, aiohttp.ClientConnectionError), \
            seam("DockerError(900).__context__ (the aiohttp error)", use)
        assert isinstance(cause, aiohttp.ClientConnectorError) and cause.os_error.errno == errno.ENOENT

        ep = resolve_endpoint(DockerSettings(host=f"unix://{path}"), {})
        async with DockerClient(ep, timeout=10) as client:
            with pytest.raises(TransportError, match="no such socket"):
                await client.ping()
