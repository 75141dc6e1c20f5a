"""The library API (tunneld.api) on real sockets: open, use, watch, close; errors come out plain."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import anyio
import anyio.abc
import pytest

import tunneld
from tests.helpers import FAST, echo_roundtrip
from tests.servers import EchoServer, free_port_holder, refusing_socket
from tunneld import BindError, ConfigError, ForwardHandle, ForwardSpec, ForwardState, NotReadyError, Timeouts

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

MiB = 1024 * 1024


def assert_port_free(port: int) -> None:
    """Nothing listens on 127.0.0.1:port any more: connecting is refused and a new listener binds."""
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as any server would: TIME_WAIT is no holder
        s.bind(("127.0.0.1", port))
        s.listen(1)


def echo_spec(server: EchoServer) -> str:
    return f"127.0.0.1:0:127.0.0.1:{server.port}"


def relisten(port: int) -> EchoServer:
    """An echo server on a port a closed one of ours just used (the 'target came back' case)."""
    server = EchoServer()
    server.sock.close()
    server.sock = socket.socket()
    server.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.sock.bind(("127.0.0.1", port))
    server.sock.listen(16)
    server.port = port
    return server


async def test_open_forward_echoes_1mib_with_half_close_then_frees_port(echo_server: EchoServer) -> None:
    with anyio.fail_after(30):
        async with tunneld.open_forward(f"127.0.0.1:0:127.0.0.1:{echo_server.port}", timeouts=FAST) as fwd:
            assert isinstance(fwd, ForwardHandle)
            await fwd.wait_ready(10)
            assert fwd.ready and fwd.snapshot()["state"] == "ready"
            assert fwd.port != 0 and fwd.host == "127.0.0.1"
            assert fwd.address == f"127.0.0.1:{fwd.port}" and fwd.addresses == [fwd.address]
            assert fwd.target == f"127.0.0.1:{echo_server.port}"
            data = os.urandom(MiB)
            assert await echo_roundtrip(fwd.port, data) == data
            assert fwd.snapshot()["bytes_up"] == MiB
            port = fwd.port
        assert fwd.state == ForwardState.STOPPED
    assert_port_free(port)
    assert echo_server.half_closes >= 1  # the client's EOF reached the target as EOF


@pytest.mark.parametrize("runner", ["asyncio.run", "uvloop.run"])
def test_an_app_on_plain_asyncio_gets_its_connections_served(echo_server: EchoServer, runner: str) -> None:
    """Apps embed us under asyncio.run or uvloop.run, not only anyio.run: the accept callback runs
    outside any task and must still start each connection's task (it used to fail there with
    anyio's "not currently running on any asynchronous event loop" whenever sniffio was installed,
    and every client hung)."""
    import asyncio

    import sniffio  # the test extras install it: the failure needed it, as most real apps have it
    import uvloop

    async def app() -> bytes:
        assert sniffio.current_async_library_cvar.get() is None  # not set up by anyio.run
        async with tunneld.open_forward(f"127.0.0.1:0:127.0.0.1:{echo_server.port}", timeouts=FAST) as fwd:
            await fwd.wait_ready(10)
            reader, writer = await asyncio.open_connection("127.0.0.1", fwd.port)
            writer.write(b"from a plain asyncio app")
            writer.write_eof()
            got = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return got

    run = asyncio.run if runner == "asyncio.run" else uvloop.run
    assert run(app()) == b"from a plain asyncio app"


async def test_states_follow_the_target_down_and_back(echo_server: EchoServer) -> None:
    timeouts = Timeouts(connect=1.0, probe=1.0, probe_interval=0.2, ready=10.0, drain=1.0)
    send, receive = anyio.create_memory_object_stream[ForwardState](100)
    seen: list[ForwardState] = []

    async def watch(fwd: ForwardHandle) -> None:
        async with send:
            async for state in fwd.states():
                await send.send(state)

    async def next_state() -> ForwardState:
        state = await receive.receive()
        seen.append(state)
        return state

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            async with tunneld.open_forward(f"127.0.0.1:0:127.0.0.1:{echo_server.port}", timeouts=timeouts) as fwd:
                tg.start_soon(watch, fwd)
                while await next_state() != ForwardState.READY:
                    pass
                echo_server.sock.close()  # the far side goes away: the next probe is refused
                assert await next_state() == ForwardState.DEGRADED
                assert fwd.last_error is not None and str(echo_server.port) in fwd.last_error
                with relisten(echo_server.port):
                    assert await next_state() == ForwardState.READY
                    assert await echo_roundtrip(fwd.port, b"back") == b"back"
            # The watcher ends by itself once the forward has stopped: nothing to cancel.
        with receive:
            async for state in receive:
                seen.append(state)
    assert seen[-1] == ForwardState.STOPPED
    assert ForwardState.STOPPING in seen or seen[-2] == ForwardState.READY  # stopping may be coalesced


async def test_open_forwards_from_toml_with_changes(echo_server: EchoServer, tmp_path: Path) -> None:
    path = tmp_path / "forwards.toml"
    path.write_text(
        "[timeouts]\nprobe_interval = 0.2\nconnect = 2\ndrain = 1\n"
        f'[[forwards]]\nname = "a"\nbind = "localhost"\nport = 0\nhost = "127.0.0.1"\nhost_port = {echo_server.port}\n'
        f'[[forwards]]\nname = "b"\nbind = "127.0.0.1"\nhost = "127.0.0.1"\nhost_port = {echo_server.port}\n'
    )
    history: dict[str, list[ForwardState]] = {"a": [], "b": []}

    async def watch(fset: tunneld.ForwardSet) -> None:
        async for handle, state in fset.changes():
            history[handle.name].append(state)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            async with tunneld.open_forwards(path) as fset:
                tg.start_soon(watch, fset)
                assert len(fset) == 2 and [h.name for h in fset] == ["a", "b"]
                await fset.wait_ready(10)
                assert fset.all_ready and fset.transport_info() == {"kind": "direct"}
                a, b = fset["a"], fset["b"]
                assert a.host == "127.0.0.1" and a.port != b.port
                if socket.has_ipv6 and len(a.addresses) == 2:
                    assert a.addresses == [f"127.0.0.1:{a.port}", f"[::1]:{a.port}"]
                    assert await echo_roundtrip(a.port, b"six", host="::1") == b"six"
                for h in fset:
                    assert await echo_roundtrip(h.port, h.name.encode()) == h.name.encode()
                ports = [h.port for h in fset]
    for name, states in history.items():
        assert ForwardState.READY in states and states[-1] == ForwardState.STOPPED, (name, states)
    for port in ports:
        assert_port_free(port)


async def test_graceful_exit_lets_a_connection_in_flight_finish(echo_server: EchoServer) -> None:
    """Leaving the block normally: no new connections, the open one completes, then it returns
    as soon as that connection is done (well before the grace period)."""
    payload = os.urandom(256 * 1024)
    got = bytearray()

    async def late_client(fwd: ForwardHandle, stream: anyio.abc.SocketStream) -> None:
        async for state in fwd.states():
            if state in (ForwardState.STOPPING, ForwardState.STOPPED):
                break
        with pytest.raises(OSError):
            await anyio.connect_tcp("127.0.0.1", fwd.port)  # the listener is closed already
        async with stream:
            await stream.send(payload)
            await stream.send_eof()
            while True:
                try:
                    got.extend(await stream.receive())
                except anyio.EndOfStream:
                    return

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            async with tunneld.open_forward(echo_spec(echo_server), timeouts=FAST, grace=10) as fwd:
                await fwd.wait_ready(10)
                stream = await anyio.connect_tcp("127.0.0.1", fwd.port)
                await stream.send(b"x")
                assert await stream.receive() == b"x"  # accepted and relaying
                tg.start_soon(late_client, fwd, stream)
                leaving = time.monotonic()
            drained_in = time.monotonic() - leaving
    assert bytes(got) == payload
    assert drained_in < 5, f"exit waited {drained_in:.1f}s although the connection had finished"


async def test_body_exception_comes_out_as_itself_and_closes_at_once(echo_server: EchoServer) -> None:
    class Boom(Exception):
        pass

    with anyio.fail_after(30):
        with pytest.raises(Boom) as info:
            async with tunneld.open_forward(echo_spec(echo_server), timeouts=FAST, grace=10) as fwd:
                await fwd.wait_ready(10)
                stream = await anyio.connect_tcp("127.0.0.1", fwd.port)
                await stream.send(b"x")
                assert await stream.receive() == b"x"
                leaving = time.monotonic()
                raise Boom("from the body")
        assert time.monotonic() - leaving < 3, "an exception must not wait out the grace period"
        assert type(info.value) is Boom
        # The in-flight connection was closed, not left hanging.
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await stream.receive()
        await stream.aclose()
    assert_port_free(fwd.port)


async def test_cancelled_with_the_callers_task_group(echo_server: EchoServer) -> None:
    async def serve(*, task_status: anyio.abc.TaskStatus[ForwardHandle]) -> None:
        async with tunneld.open_forward(f"127.0.0.1:0:127.0.0.1:{echo_server.port}", timeouts=FAST) as fwd:
            await fwd.wait_ready(10)
            task_status.started(fwd)
            await anyio.sleep_forever()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            fwd = await tg.start(serve)
            assert await echo_roundtrip(fwd.port, b"hi") == b"hi"
            tg.cancel_scope.cancel()
    assert fwd.state == ForwardState.STOPPED
    assert_port_free(fwd.port)


async def test_bind_error_comes_out_plain_and_nothing_keeps_running(echo_server: EchoServer) -> None:
    holder = free_port_holder()
    taken = holder.getsockname()[1]
    config = tunneld.build_config(
        [ForwardSpec(name="ok", bind="127.0.0.1", port=0, host="127.0.0.1", host_port=echo_server.port),
         f"127.0.0.1:{taken}:127.0.0.1:{echo_server.port}"],
        timeouts=FAST,
    )
    try:
        with anyio.fail_after(10), pytest.raises(BindError, match=f"127.0.0.1:{taken}.*already in use"):
            async with tunneld.open_forwards(config):
                pytest.fail("the block must not run")
    finally:
        holder.close()


async def test_wait_ready_says_why_it_is_not_ready() -> None:
    target = refusing_socket()
    port = target.getsockname()[1]
    try:
        with anyio.fail_after(15):
            async with tunneld.open_forward(f"127.0.0.1:0:127.0.0.1:{port}", timeouts=FAST) as fwd:
                started = time.monotonic()
                with pytest.raises(NotReadyError) as info:
                    await fwd.wait_ready(1.0)
                assert 0.9 < time.monotonic() - started < 3
                assert fwd.state == ForwardState.STARTING
        message = str(info.value)
        assert f"could not connect to 127.0.0.1:{port}" in message and "starting" in message, message
    finally:
        target.close()


def test_bad_input_is_a_config_error_before_anything_opens() -> None:
    with pytest.raises(ConfigError, match="expected \\[BIND:\\]PORT:HOST:HOSTPORT"):
        tunneld.open_forward("5000")
    with pytest.raises(ConfigError, match="--via"):
        tunneld.open_forward("0:127.0.0.1:5000", via="telnet")
    with pytest.raises(ConfigError, match="not a loopback address"):
        tunneld.open_forward("0.0.0.0:0:127.0.0.1:5000")
    config = tunneld.build_config(["0:127.0.0.1:5000"], via="ssh://ci@example.internal:2222")
    assert config.transport.kind == "ssh" and config.transport.ssh.port == 2222
