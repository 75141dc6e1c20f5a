"""The one adapter around aiodocker/aiohttp: the connection to a Docker host and the few calls we make.

Which host, and with which TLS files, is tunneld/docker/host.py (``resolve_endpoint``, as the docker
CLI chooses). Every aiodocker, aiohttp and ssl exception is translated here into a
``TransportError`` that names the Docker host and says what to check; nothing foreign leaves this
module. ``ssh://`` hosts go through the SSH transport (``tunneld.ssh.client`` and
``tunneld.ssh.target`` hold asyncssh) and ``docker system dial-stdio`` (``tunneld.docker.over_ssh``).

Why one module of this size: it is the seam itself. Every call goes through ``_call`` (its deadline
and the translation of aiodocker's, aiohttp's and ssl's exceptions, which need the endpoint to say
what to check), and the exec and event streams reach into aiodocker's and aiohttp's internals (the
upgraded connection, ``_query``). Split, the foreign objects and the ``except`` clauses naming them
would spread over several modules; together, one grep shows everything the project knows about
aiodocker. What is built on it lives beside it: the records (models.py), the images (images.py),
the helper container (helper/), the exec relay (execs.py).
"""

from __future__ import annotations

import asyncio
import errno
import json
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiodocker
import aiohttp
import anyio

from tunneld.config import Timeouts, TransportSpec, parse_via
from tunneld.docker.host import Endpoint, ssl_context
from tunneld.docker.models import (
    ContainerDetails,
    ContainerInfo,
    ExecResult,
    PublishedPort,
    PullProgress,
    RunningContainer,
    details,
    pull_progress,
    running_from_inspect,
    running_from_list,
)
from tunneld.errors import ConfigError, TransportError
from tunneld.tls import ssl_reason


class DockerAPIError(TransportError):
    """The Docker Engine answered with an error status (404 no such container, 409 conflict, ...)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ExecStream:
    """One attached exec (stdin, stdout, stderr; no tty): frames already demultiplexed."""

    STDOUT = 1
    STDERR = 2

    def __init__(self, stream: Any, describe: str) -> None:
        self._stream = stream
        self._describe = describe
        self._transport = _upgraded_transport(stream)
        self._pending: list[bytes | memoryview] = []  # write_soon's, until the loop runs _flush

    async def read(self) -> tuple[int, bytes] | None:
        """The next frame as (ExecStream.STDOUT or STDERR, bytes), or None at the end of the stream.

        :raises TransportError: when the connection to the Docker host broke.
        """
        try:
            msg = await self._stream.read_out()
        except (aiohttp.ClientError, OSError, RuntimeError, asyncio.IncompleteReadError) as e:
            raise TransportError(f"lost the exec stream to {self._describe}: {_reason(e)}") from None
        if msg is None:
            return None
        return int(msg.stream), bytes(msg.data)

    async def pump(self, on_frame: Callable[[int, bytes | memoryview], None]) -> None:
        """Hand the stream's bytes to ``on_frame(STDOUT or STDERR, bytes or a view of them)`` as they
        arrive, until the stream ends; ``read()`` is not used again.

        Called from the connection's own ``data_received``: no queue and no task wake-up per frame
        (a round trip's share of the daemon's time, docs/performance.md). A frame of Docker's stream
        may arrive in pieces, and each piece is handed on as it comes: the consumer (the mux
        channel) frames its own stream. There is no backpressure: the consumer bounds what it is
        sent (credit per connection).

        :raises TransportError: when the connection to the Docker host broke.
        """
        stream = self._stream
        queue = stream._queue  # aiodocker's: what its parser has queued so far, taken first
        while len(queue):
            msg = await self.read()
            if msg is None:
                return
            on_frame(*msg)
        protocol = stream._resp.connection.protocol
        old = protocol._payload_parser  # aiodocker's _ExecParser: a frame it holds in part is ours too
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        parser = _PushedFrames(on_frame, ended)
        protocol.set_parser(parser, queue)
        if old is not None and old._buf:
            parser.feed_data(bytes(old._buf))
        if queue.is_eof() or protocol.transport is None:
            parser.feed_eof()
        if protocol._reading_paused:  # aiodocker's queue paused it while it held too much
            protocol.resume_reading()
        await ended
        error = protocol.exception()
        if error is not None and not isinstance(error, aiohttp.ServerDisconnectedError):
            raise TransportError(f"lost the exec stream to {self._describe}: {_reason(error)}")

    async def write(self, data: bytes) -> None:
        """Write to the process's stdin (waits while the Docker host's buffer is full).

        :raises TransportError: when the connection to the Docker host broke.
        """
        try:
            await self._stream.write_in(data)
        except (aiohttp.ClientError, OSError, RuntimeError, AssertionError) as e:
            raise TransportError(f"lost the exec stream to {self._describe}: {_reason(e)}") from None

    def write_soon(self, data: bytes | memoryview) -> None:
        """Queue bytes for stdin: everything queued in this turn of the event loop leaves in one write
        (one TLS record, one message through dockerd), from a loop callback rather than a task, which
        is what a small round trip saves. No backpressure: see ``buffered()`` and ``drain()``."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)  # a lost connection is the reader's to report

    def buffered(self) -> int:
        """Bytes written (or queued by ``write_soon``) that the Docker host has not taken yet."""
        size = sum(len(d) for d in self._pending)
        return size + (self._transport.get_write_buffer_size() if self._transport is not None else 0)

    async def drain(self) -> None:
        """Wait while the Docker host's buffer is full.

        :raises TransportError: when the connection to the Docker host broke.
        """
        await self.write(b"")

    async def aclose(self) -> None:
        """Drop the connection at once, whatever state the far side is in.

        A graceful close would wait for the Docker host to take every byte still buffered (and, over
        TLS, for its close_notify): a far side that stopped reading keeps the socket forever. Nothing
        sent after we decided to close matters: the relay ends when its stdin goes away either way.
        """
        try:
            await self._stream.close()
        except (aiohttp.ClientError, OSError, RuntimeError, AssertionError):
            pass  # already broken: nothing left to close cleanly
        finally:
            _abort(self._transport)


class _PushedFrames:
    """A payload parser for aiohttp's connection: Docker's multiplexed stream (8-byte headers: kind,
    0, 0, 0, length), each piece handed to ``on_frame`` as it arrives; ``ended`` is set at its end."""

    HEADER = 8

    def __init__(self, on_frame: Callable[[int, bytes | memoryview], None], ended: asyncio.Future[None]) -> None:
        self.on_frame = on_frame
        self.ended = ended
        self.head = b""  # a header not yet whole
        self.kind = 0
        self.left = 0  # bytes of the current frame still to come

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self.ended.done():
            return False, b""
        try:
            self._feed(data)
        except Exception as e:  # a bug in the consumer: end the pump with it, not aiohttp's connection
            self.ended.set_exception(e)
        return False, b""

    def _feed(self, data: bytes) -> None:
        at, end = 0, len(data)
        view = memoryview(data)
        while at < end:
            if self.left:
                take = min(self.left, end - at)
                # The read itself, or a view of it: never a copy (it is bytes: nothing writes to it).
                self.on_frame(self.kind, data if take == end else view[at:at + take])
                self.left -= take
                at += take
                continue
            need = self.HEADER - len(self.head)
            self.head += data[at:at + need]
            at += need
            if len(self.head) < self.HEADER:
                break
            self.kind, self.left = self.head[0], int.from_bytes(self.head[4:8], "big")
            self.head = b""

    def feed_eof(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def set_exception(self, exc: BaseException, exc_cause: BaseException | None = None) -> None:
        self.feed_eof()


class DockerClient:
    """The Docker Engine API calls kci-tunneld makes, each with a deadline and translated errors."""

    def __init__(self, endpoint: Endpoint, *, timeout: float) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._docker: aiodocker.Docker | None = None
        self._connector: aiohttp.BaseConnector | None = None
        self._stack: AsyncExitStack | None = None  # what ssh:// needs underneath: the connection, the bridge

    async def __aenter__(self) -> DockerClient:
        """Open the connector (for ssh://, also the SSH connection: host key checked, logged in).

        :raises TransportError: naming the Docker host and what to check.
        """
        stack = AsyncExitStack()
        try:
            self._docker, self._connector = await self._open(stack)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        docker, connector, stack = self._docker, self._connector, self._stack
        self._docker = self._connector = self._stack = None
        with anyio.CancelScope(shield=True):
            if docker is not None:
                await docker.close()
            if connector is not None:
                await connector.close()  # aiodocker leaves a caller's connector open
        if stack is not None:
            # Not under the shield: the task groups in there must exit from the scope they were entered
            # in; they finish under cancellation anyway (SshConnection.aclose shields its own close).
            await stack.aclose()

    async def _open(self, stack: AsyncExitStack) -> tuple[aiodocker.Docker, aiohttp.BaseConnector]:
        ep = self.endpoint
        connector: aiohttp.BaseConnector
        # limit=0: every exec stream holds its own connection for its whole life.
        if ep.scheme == "unix":
            connector = aiohttp.UnixConnector(path=ep.host[len("unix://"):], limit=0)
            url = "unix://localhost"
        elif ep.scheme == "tcp":
            hostport = ep.host[len("tcp://"):]
            if ep.tls is not None:
                connector = aiohttp.TCPConnector(ssl=ssl_context(ep.tls), limit=0)
                url = f"https://{hostport}"
            else:
                connector = aiohttp.TCPConnector(limit=0)
                url = f"http://{hostport}"
        elif ep.scheme == "ssh":
            connector = aiohttp.UnixConnector(path=await self._ssh_bridge(stack), limit=0)
            url = "unix://localhost"
        else:
            raise TransportError(f"Docker host {ep.host} ({ep.source}): unsupported scheme {ep.scheme!r}")
        # No aiohttp timeouts: every call runs under its own anyio deadline (_call).
        return aiodocker.Docker(url=url, connector=connector, timeout=aiohttp.ClientTimeout()), connector

    async def _ssh_bridge(self, stack: AsyncExitStack) -> str:
        """Reach an ssh:// Docker host as the docker CLI does: each HTTP connection is a
        ``docker system dial-stdio`` run on the server (so the server's own DOCKER_HOST counts), here
        all as channels of one SSH connection (~/.ssh/config applies, host key verified, reconnects).
        aiohttp only speaks to sockets, so they are served on a private unix socket; returns its path.
        """
        # Imported here: only ssh:// hosts pay for asyncssh. The SSH seam stays in tunneld/ssh/.
        from tunneld.docker.over_ssh import open_docker_socket_stream, serve_unix_bridge
        from tunneld.ssh.transport import SshTransport

        ep = self.endpoint
        where = f"the Docker host {ep.host} ({ep.source})"
        if urlsplit(ep.host).path not in ("", "/"):
            raise TransportError(f"{where}: an ssh:// Docker host takes no path; write ssh://[user@]host[:port]")
        try:
            spec = parse_via(ep.host, key=ep.source)
        except ConfigError as e:
            raise TransportError(str(e)) from None
        ssh = SshTransport(TransportSpec(kind="ssh", ssh=spec.ssh), Timeouts(connect=self.timeout))
        try:
            await stack.enter_async_context(ssh)
        except TransportError as e:
            raise TransportError(f"connecting to {where} over SSH: {e}") from None
        return await stack.enter_async_context(serve_unix_bridge(lambda: open_docker_socket_stream(ssh, None)))

    @property
    def docker(self) -> aiodocker.Docker:
        assert self._docker is not None, "DockerClient used outside its context"
        return self._docker

    @asynccontextmanager
    async def _call(self, what: str, deadline: float | None = None) -> AsyncIterator[None]:
        """Run one API call within ``deadline`` seconds (default: the connect timeout); translate its errors."""
        limit = self.timeout if deadline is None else deadline
        try:
            with anyio.fail_after(limit):
                yield
        except TimeoutError:
            raise TransportError(
                f"{what}: no answer from the Docker host at {self.endpoint.host} within {limit:g}s"
            ) from None
        except aiodocker.DockerError as e:
            raise self._translate(what, e) from None
        except (aiohttp.ClientError, ssl.SSLError, OSError) as e:
            raise self._connection_error(what, e) from None

    def _translate(self, what: str, e: aiodocker.DockerError) -> TransportError:
        if e.status == 900:  # aiodocker's "cannot connect": the aiohttp error is the context
            cause = e.__context__ or e.__cause__
            if isinstance(cause, BaseException):
                return self._connection_error(what, cause)
            return TransportError(f"{what}: cannot reach the Docker host at {self.endpoint.host}: {e.message}")
        message = str(e.message).strip()
        if e.status == 400 and "HTTPS server" in message:
            return DockerAPIError(
                f"{what}: the Docker host at {self.endpoint.host} expects TLS: set DOCKER_TLS_VERIFY=1 and "
                "DOCKER_CERT_PATH (ca.pem, cert.pem, key.pem)", e.status)
        return DockerAPIError(
            f"{what}: the Docker host at {self.endpoint.host} answered {e.status}: {message}", e.status
        )

    def _connection_error(self, what: str, e: BaseException) -> TransportError:
        host = self.endpoint.host
        ssl_error = _find(e, ssl.SSLError)
        if ssl_error is not None and self.endpoint.tls is not None:
            cert_dir = self.endpoint.tls.cert_dir or "the context's TLS directory"
            reason = ssl_reason(ssl_error)
            if isinstance(ssl_error, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(ssl_error):
                hint = (f"check DOCKER_CERT_PATH ({cert_dir}): its ca.pem must be the CA that signed "
                        "the daemon's certificate")
            else:
                hint = (f"check DOCKER_CERT_PATH ({cert_dir}): the daemon must trust the client certificate "
                        "cert.pem/key.pem found there")
            return TransportError(f"{what}: TLS handshake with the Docker host at {host} failed: {reason} — {hint}")
        os_error = _find(e, OSError)
        tls = self.endpoint.tls
        rejected = isinstance(e, aiohttp.ServerDisconnectedError) or (
            os_error is not None and os_error.errno in (errno.ECONNRESET, errno.EPIPE)
        )
        if tls is not None and rejected:
            # With TLS 1.3 a refused client certificate shows up after the handshake, as a reset.
            return TransportError(
                f"{what}: TLS handshake with the Docker host at {host} failed: the daemon closed the connection, "
                f"most likely rejecting the client certificate — check DOCKER_CERT_PATH ({tls.cert_dir}): "
                "cert.pem/key.pem must be signed by a CA the daemon trusts (--tlscacert)"
            )
        if os_error is not None and os_error.errno is not None:
            return TransportError(f"{what}: cannot reach the Docker host at {host}: {_errno_text(os_error)}")
        return TransportError(f"{what}: cannot reach the Docker host at {host}: {_reason(e)}")

    # ---------------------------------------------------------------- containers, images, exec streams

    async def ping(self) -> dict[str, Any]:
        """The engine's version document (proves the host is reachable and TLS works).

        :raises TransportError: naming the host and what to check.
        """
        async with self._call("connecting to Docker"):
            version: dict[str, Any] = await self.docker.version()
        return version

    async def _inspect(self, ref: str) -> dict[str, Any] | None:
        """The raw ``docker inspect`` document of ``ref``, or None when there is no such container."""
        try:
            async with self._call(f"inspecting container {ref}"):
                c = await self.docker.containers.get(ref)
                return dict(c._container)
        except DockerAPIError as e:
            if e.status == 404:
                return None
            raise

    async def inspect_container(self, name: str) -> ContainerInfo | None:
        """The container called ``name``, or None when there is none."""
        data = await self._inspect(name)
        if data is None:
            return None
        cfg = data.get("Config") or {}
        state = data.get("State") or {}
        return ContainerInfo(
            id=str(data.get("Id", "")), name=str(data.get("Name", name)).lstrip("/"),
            image=str(cfg.get("Image", "")), image_id=str(data.get("Image", "")),
            running=bool(state.get("Running")), state=str(state.get("Status", "")),
            labels=dict(cfg.get("Labels") or {}),
        )

    async def list_containers(self, labels: Mapping[str, str]) -> list[ContainerInfo]:
        """Every container (running or not) carrying all of ``labels``."""
        filters = json.dumps({"label": [f"{k}={v}" for k, v in labels.items()]})
        async with self._call("listing containers"):
            found = await self.docker.containers.list(all="true", filters=filters)
            rows = [dict(c._container) for c in found]
        return [
            ContainerInfo(
                id=str(r.get("Id", "")), name=str((r.get("Names") or [""])[0]).lstrip("/"),
                image=str(r.get("Image", "")), image_id=str(r.get("ImageID", "")),
                running=r.get("State") == "running", state=str(r.get("State", "")),
                labels=dict(r.get("Labels") or {}),
            )
            for r in rows
        ]

    async def image_id(self, image: str) -> str | None:
        """The local id (sha256:...) of ``image``, or None when the host does not have it."""
        try:
            async with self._call(f"inspecting image {image}"):
                data = await self.docker.images.inspect(image)
        except DockerAPIError as e:
            if e.status == 404:
                return None
            raise
        return str(data.get("Id", "")) or None

    async def pull_image(self, image: str, *, deadline: float,
                         progress: Callable[[PullProgress], None] | None = None) -> None:
        """Pull ``image`` onto the Docker host (as ``docker pull`` would), within ``deadline`` seconds,
        handing every step the Engine reports (layer by layer, bytes so far) to ``progress``.

        :raises DockerAPIError: when the Docker host refuses the pull or reports a failure during it.
        :raises TransportError: when the Docker host cannot be reached, or ``deadline`` passes.
        """
        what = f"pulling image {image}"
        params = {"fromImage": image}
        if "@" not in image and ":" not in image.rsplit("/", 1)[-1]:
            params["tag"] = "latest"  # without one the Engine pulls every tag of the repository
        # The answer is a JSON line per step for as long as the pull takes: no aiohttp timeout but the
        # connect's, the deadline is _call's. Read through _query (as the event stream is): aiodocker's
        # own streaming pull leaves the response open when cut short.
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_connect=self.timeout)
        async with self._call(what, deadline):
            query = self.docker._query("images/create", "POST", params=params, timeout=timeout)
            async with query as response, response:  # the response is released (closed if cut short)
                async for raw in response.content:
                    try:
                        line = json.loads(raw)
                    except ValueError:
                        continue
                    if not isinstance(line, dict):
                        continue
                    if "error" in line or "errorDetail" in line:
                        # The pull was accepted (HTTP 200); the Engine reports its failure in the stream.
                        detail = line.get("errorDetail")
                        message = (detail.get("message") if isinstance(detail, dict) else None) or line.get("error")
                        raise DockerAPIError(f"{what}: the Docker host at {self.endpoint.host} reported: "
                                             f"{str(message or 'an unnamed error').strip()}", 0)
                    if progress is not None:
                        progress(pull_progress(image, line))

    async def create_container(
        self, name: str, image: str, *, entrypoint: Sequence[str], cmd: Sequence[str],
        labels: Mapping[str, str], host_network: bool = True,
    ) -> str:
        """Create (not start) a container; returns its id.

        :raises DockerAPIError: 404 when the image is missing, 409 when the name is taken.
        """
        config: dict[str, Any] = {
            "Image": image, "Entrypoint": list(entrypoint), "Cmd": list(cmd), "Labels": dict(labels),
            "AttachStdin": False, "AttachStdout": False, "AttachStderr": False, "Tty": False,
            "HostConfig": {"NetworkMode": "host" if host_network else "default", "Init": False},
        }
        async with self._call(f"creating container {name} from {image}"):
            c = await self.docker.containers.create(config, name=name)
            return str(c.id)

    async def start_container(self, ref: str) -> None:
        async with self._call(f"starting container {ref}"):
            await self.docker.containers.container(ref).start()

    async def remove_container(self, ref: str) -> bool:
        """Remove (killing it first if running); False when it did not exist."""
        try:
            async with self._call(f"removing container {ref}"):
                await self.docker.containers.container(ref).delete(force=True)
        except DockerAPIError as e:
            if e.status == 404:
                return False
            raise
        return True

    @asynccontextmanager
    async def exec_stream(self, container: str, cmd: Sequence[str]) -> AsyncIterator[ExecStream]:
        """Run ``cmd`` in ``container`` with stdin, stdout and stderr attached (the upgraded connection).

        :raises DockerAPIError: 404 when the container is gone, 409 when it is not running.
        """
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_connect=self.timeout)
        async with self._call(f"starting an exec in container {container}"):
            exe = await self.docker.containers.container(container).exec(
                list(cmd), stdin=True, stdout=True, stderr=True, tty=False
            )
            stream = exe.start(detach=False, timeout=timeout)
            try:
                await stream.__aenter__()  # POST /exec/{id}/start, then the connection is upgraded
            except BaseException:
                _abort(_upgraded_transport(stream))  # cut short after the upgrade: the socket is ours
                raise
        wrapped = ExecStream(stream, f"{container} on {self.endpoint.host}")
        try:
            yield wrapped
        finally:
            with anyio.CancelScope(shield=True):
                await wrapped.aclose()

    # ---------------------------------------------------------------- details, bodies, networks, short execs
    # (provisioning's calls; --auto reads running_containers and running_container)

    async def container_details(self, ref: str) -> ContainerDetails | None:
        """What ``docker inspect`` says about ``ref`` (env, published ports, networks...), or None."""
        data = await self._inspect(ref)
        return None if data is None else details(data, ref)

    async def published_ports(self) -> list[PublishedPort]:
        """Every port a running container publishes on the Docker host (``docker ps`` PORTS)."""
        return [p for c in await self._listed() for p in c.ports]

    async def running_containers(self) -> list[RunningContainer]:
        """Every running container with its name, image, labels and published ports: one request
        (and an inspect of each container whose image tag has moved since it was created: the list
        shows such an image by its id, inspect by the name it was created from)."""
        out = []
        for running in await self._listed():
            if running.image.startswith("sha256:"):
                running = await self.running_container(running.id) or running
            out.append(running)
        return out

    async def _listed(self) -> list[RunningContainer]:
        """``docker ps``, as the list shows it (one request)."""
        async with self._call("listing containers"):
            found = await self.docker.containers.list(all="false")
            rows = [dict(c._container) for c in found]
        return [running_from_list(r) for r in rows]

    async def running_container(self, ref: str) -> RunningContainer | None:
        """``ref`` with the ports it publishes now, or None when it is gone or not running."""
        data = await self._inspect(ref)
        return None if data is None else running_from_inspect(data)

    async def create_container_json(self, name: str, body: Mapping[str, Any]) -> str:
        """Create (not start) a container from an Engine API ``ContainerCreate`` body; returns its id.

        :raises DockerAPIError: 404 when the image is missing, 409 when the name is taken.
        """
        async with self._call(f"creating container {name} from {body.get('Image')}"):
            c = await self.docker.containers.create(dict(body), name=name)
            return str(c.id)

    async def connect_network(self, network: str, container: str) -> None:
        """``docker network connect NETWORK CONTAINER``.

        :raises DockerAPIError: 404 when either is missing, 403 when already connected.
        """
        async with self._call(f"connecting container {container} to network {network}"):
            await (await self.docker.networks.get(network)).connect({"Container": container})

    async def exec_run(self, container: str, cmd: Sequence[str], *, deadline: float | None = None,
                       limit: int = 1 << 20) -> ExecResult:
        """Run ``cmd`` in ``container`` to completion (no stdin); its exit code and output (``limit`` bytes each).

        :raises DockerAPIError: 404 when the container is gone, 409 when it is not running.
        """
        out, err = bytearray(), bytearray()
        async with self._call(f"running {cmd[0]!r} in container {container}", deadline):
            exe = await self.docker.containers.container(container).exec(
                list(cmd), stdin=False, stdout=True, stderr=True, tty=False
            )
            async with exe.start(detach=False) as stream:
                while (msg := await stream.read_out()) is not None:
                    buf = out if msg.stream == ExecStream.STDOUT else err
                    buf.extend(bytes(msg.data)[: max(0, limit - len(buf))])
            info = await exe.inspect()
        code = info.get("ExitCode")
        return ExecResult(exit_code=-1 if code is None else int(code), stdout=bytes(out), stderr=bytes(err))

    # ---------------------------------------------------------------- the event stream (--auto follows it)

    @asynccontextmanager
    async def container_events(self, since: int | None = None, actions: Sequence[str] = ()
                               ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """Container events as ``docker events --filter type=container`` streams them (from ``since``,
        epoch seconds, when given; only ``actions``, such as start and die, when given): an async
        iterator of the Engine's JSON objects, ending when the Docker host closes the stream.

        :raises TransportError: when the stream cannot be opened, or (while iterating) breaks.
        """
        filters: dict[str, list[str]] = {"type": ["container"]}
        if actions:
            filters["event"] = list(actions)  # the docker transport's own exec_* events stay on the host
        params: dict[str, Any] = {"filters": json.dumps(filters)}
        if since is not None:
            params["since"] = str(since)
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_connect=self.timeout)
        query = self.docker._query("events", params=params, timeout=timeout)
        async with self._call("watching container events"):
            response = await query.__aenter__()

        async def events() -> AsyncIterator[dict[str, Any]]:
            try:
                async for line in response.content:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(event, dict):
                        yield event
            except (aiohttp.ClientError, OSError, RuntimeError, asyncio.IncompleteReadError) as e:
                raise TransportError(f"the event stream from the Docker host at {self.endpoint.host} broke: "
                                     f"{_reason(e)}") from None

        try:
            yield events()
        finally:
            with anyio.CancelScope(shield=True):
                response.close()  # aiodocker's _query leaves its response open on exit: ours to release
                await query.__aexit__(None, None, None)


class _Abortable(Protocol):
    def abort(self) -> None: ...

    def write(self, data: bytes | memoryview) -> None: ...

    def is_closing(self) -> bool: ...

    def get_write_buffer_size(self) -> int: ...


def _upgraded_transport(stream: Any) -> _Abortable | None:
    """The transport under an aiodocker exec stream once its connection is upgraded (else None).

    asyncio's and uvloop's transports share no base class, hence the duck typing.
    """
    resp = getattr(stream, "_resp", None)  # aiodocker keeps the upgraded response here
    transport = getattr(getattr(resp, "connection", None), "transport", None)
    return transport if callable(getattr(transport, "abort", None)) else None


def _abort(transport: _Abortable | None) -> None:
    if transport is not None:
        transport.abort()


def _find(e: BaseException, kind: type[BaseException]) -> Any:
    """The innermost exception of ``kind`` in e's chain (aiohttp wraps ssl and OS errors, and some of
    its wrappers are themselves ssl errors without the details)."""
    found: Any = None
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, kind):
            found = cur
        inner = getattr(cur, "certificate_error", None) or getattr(cur, "os_error", None)
        if isinstance(inner, BaseException) and id(inner) not in seen:
            cur = inner
            continue
        cur = cur.__cause__ or cur.__context__
    return found


def _errno_text(e: OSError) -> str:
    names = {errno.ECONNREFUSED: "connection refused", errno.ENOENT: "no such socket",
             errno.EACCES: "permission denied", errno.EHOSTUNREACH: "no route to host",
             errno.ENETUNREACH: "network unreachable", errno.ETIMEDOUT: "timed out",
             errno.ECONNRESET: "connection reset"}
    return names.get(e.errno or 0, e.strerror or str(e))


def _reason(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
