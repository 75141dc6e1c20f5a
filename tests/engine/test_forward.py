"""Listeners and forwards on real sockets: both families for localhost, bind errors, limits, counters."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket

import anyio
import pytest

from tests.helpers import FAST, StateWatch, echo_roundtrip, running_forward
from tests.servers import EchoServer, free_port_holder, refusing_socket
from tests.standins.transports import PipeliningTransport
from tunneld.config import ForwardSpec, TransportSpec
from tunneld.engine.forward import Forward, ForwardState
from tunneld.engine.listener import bind_listeners
from tunneld.errors import BindError
from tunneld.transports.direct import DirectTransport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no ::1")
async def test_localhost_listens_on_both_families(echo_server: EchoServer) -> None:
    async with running_forward(DirectTransport(TransportSpec(), FAST), echo_server.port, bind="localhost") as fwd:
        assert sorted(fwd.addresses) == sorted([f"127.0.0.1:{fwd.port}", f"[::1]:{fwd.port}"])
        for host in ("127.0.0.1", "::1"):
            assert await echo_roundtrip(fwd.port, b"hello " + host.encode(), host=host) == b"hello " + host.encode()


def test_port_zero_picks_one_port_for_both_families() -> None:
    socks = bind_listeners("localhost", 0)
    try:
        ports = {s.getsockname()[1] for s in socks}
        assert len(ports) == 1 and ports != {0}
    finally:
        for s in socks:
            s.close()


def test_port_in_use_names_the_address() -> None:
    holder = free_port_holder()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(BindError) as e:
            bind_listeners("127.0.0.1", port)
        assert f"cannot listen on 127.0.0.1:{port}: address already in use" in str(e.value)
    finally:
        holder.close()


def test_unresolvable_bind_is_a_bind_error() -> None:
    with pytest.raises(BindError, match=r"cannot resolve 'no-such-host\.invalid'"):
        bind_listeners("no-such-host.invalid", 0)


async def test_connection_limit_queues_extra_clients(echo_server: EchoServer) -> None:
    async with running_forward(DirectTransport(TransportSpec(), FAST), echo_server.port, max_connections=2) as fwd:
        first = await anyio.connect_tcp("127.0.0.1", fwd.port)
        second = await anyio.connect_tcp("127.0.0.1", fwd.port)
        for s in (first, second):
            await s.send(b"x")
            assert await s.receive() == b"x"
        # The third is accepted by the kernel but not served while two are open.
        third = await anyio.connect_tcp("127.0.0.1", fwd.port)
        await third.send(b"y")
        with anyio.move_on_after(0.5) as waited:
            await third.receive()
        assert waited.cancel_called, "a third connection was served beyond max_connections=2"
        assert fwd.stats.active == 2
        await first.aclose()
        with anyio.fail_after(5):
            assert await third.receive() == b"y"
        for s in (second, third):
            await s.aclose()


async def test_first_bytes_go_with_the_connection_request_exactly_once(echo_server: EchoServer) -> None:
    """A transport that pipelines gets what the client sent before its upstream existed, and the
    relay neither repeats nor drops those bytes. A client held in the backlog at the connection
    limit has surely sent its request before it is accepted."""
    transport = PipeliningTransport(TransportSpec(), FAST)
    async with running_forward(transport, echo_server.port, max_connections=1) as fwd:
        holder = await anyio.connect_tcp("127.0.0.1", fwd.port)
        await holder.send(b"x")
        assert await holder.receive() == b"x"
        waiting = await anyio.connect_tcp("127.0.0.1", fwd.port)
        request = b"GET /v2/ HTTP/1.1\r\n\r\n" + os.urandom(100_000)  # more than one read takes
        await waiting.send(request)
        await holder.aclose()
        got = b""
        with anyio.fail_after(5):
            while len(got) < len(request):
                got += await waiting.receive()
        assert got == request
        assert transport.firsts[-1] and request.startswith(transport.firsts[-1])
        await waiting.aclose()
        with anyio.fail_after(5):
            while fwd.stats.active:
                await anyio.sleep(0.01)
        assert fwd.stats.traffic.up == 1 + len(request)


async def test_counters_follow_traffic(echo_server: EchoServer) -> None:
    async with running_forward(DirectTransport(TransportSpec(), FAST), echo_server.port) as fwd:
        for size in (10, 100_000):
            await echo_roundtrip(fwd.port, os.urandom(size))
        with anyio.fail_after(5):
            while fwd.stats.active:
                await anyio.sleep(0.01)
        snap = fwd.snapshot()
        assert snap["total"] == 2 and snap["active"] == 0 and snap["errors"] == 0
        assert snap["bytes_up"] == snap["bytes_down"] == 100_010
        assert snap["state"] == "ready" and snap["port"] == fwd.port
        assert snap["last_probe"] is not None and snap["last_probe"]["ok"] is True  # type: ignore[index]


def probe_logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "tunneld.engine.forward" and "probe " in r.getMessage()]


async def until_logged(caplog: pytest.LogCaptureFixture, count: int) -> list[logging.LogRecord]:
    """Wait (at most 10 s) until the forward has logged ``count`` probe lines; return them."""
    with anyio.fail_after(10):
        while len(found := probe_logs(caplog)) < count:
            await anyio.sleep(0.02)
    return found


async def test_the_first_failed_probe_of_a_run_is_logged_at_once_the_repeats_at_debug(
        caplog: pytest.LogCaptureFixture) -> None:
    """A target that refuses from the start says so in the log at the first probe, not when the forward
    turns degraded after timeouts.ready (`start --detach` would wait all of it in silence)."""
    caplog.set_level(logging.DEBUG, logger="tunneld.engine.forward")
    target = refusing_socket()
    port = int(target.getsockname()[1])
    refused = (f"[forward=t] probe failed: could not connect to 127.0.0.1:{port}: Connection refused; retrying "
               "(repeats are logged at debug level)")
    spec = ForwardSpec(name="t", bind="127.0.0.1", port=0, host="127.0.0.1", host_port=port)
    watch = StateWatch()
    timeouts = dataclasses.replace(FAST, ready=60.0)  # starting, all along the first run of failures
    try:
        async with anyio.create_task_group() as tg:
            fwd: Forward = await tg.start(Forward(spec, DirectTransport(TransportSpec(), FAST), timeouts,
                                                  on_change=watch).run)
            first, *repeats = await until_logged(caplog, 4)
            assert (first.levelno, first.getMessage()) == (logging.WARNING, refused)
            assert [(r.levelno, r.getMessage()) for r in repeats] == [
                (logging.DEBUG, f"[forward=t] probe failed again ({n} in a row): could not connect to "
                                f"127.0.0.1:{port}: Connection refused") for n in (2, 3, 4)]
            assert fwd.state == ForwardState.STARTING

            target.listen(64)  # the far side comes up ...
            await watch.until(fwd, ForwardState.READY)
            target.close()  # ... and goes away: a new run of failures, its first at warning again
            await watch.until(fwd, ForwardState.DEGRADED)
            logged = len(probe_logs(caplog))
            again = await until_logged(caplog, logged + 1)
            warnings = [r.getMessage() for r in again if r.levelno >= logging.WARNING]
            assert warnings == [refused, refused]

            back = socket.socket()  # the far side back on its port: "probe ok again"
            back.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            back.bind(("127.0.0.1", port))
            back.listen(64)
            target = back
            await watch.until(fwd, ForwardState.READY)
            assert any(r.levelno == logging.INFO and r.getMessage().startswith("[forward=t] probe ok again after ")
                       for r in probe_logs(caplog))
            fwd.stop()
    finally:
        target.close()
