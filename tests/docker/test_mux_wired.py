"""A forward over the mux (tunneld/docker/mux_wired.py): the client's socket wired to its mux stream,
opened early (the client's bytes leave with the open, before the relay answered), against the lab's
dockerd. The relay contract through a real forward and real sockets: a refused target is a clean EOF
and a counted error, a client that never reads stalls only itself, a reset either way is a reset on
the other side, half-close, and an exec lost before the relay answered is retried on another exec
with the bytes the client had sent.

Every test runs with one exec (``mux_execs=1``), so every connection shares it.
"""

from __future__ import annotations

import os
import re
import socket
import struct

import anyio
import pytest

from tests.docker.test_mux import _helper_sh, _one_exec, _send_until_blocked
from tests.docker.test_transport import TIMEOUTS, docker_transport, ns_server
from tests.helpers import echo_roundtrip, parallel_echoes, read_to_eof, running_forward
from tests.lab.lab import LabInfo
from tunneld.docker.mux import DOWN_WINDOW
from tunneld.docker.mux_wired import WiredMux
from tunneld.engine.forward import ForwardState

pytestmark = [pytest.mark.timeout(120)]

# Inside the lab namespace: read each connection to its end and say how one that sent bytes ended
# (the forward's probes connect and close without a byte).
REPORTING_SERVER = """
while True:
    c, _ = s.accept()
    got = 0
    try:
        while True:
            data = c.recv(65536)
            if not data:
                break
            got += len(data)
        end = "eof"
    except ConnectionResetError:
        end = "reset"
    if got:
        print(end, flush=True)
    c.close()
"""

# Inside the lab namespace: answer a connection that sends a byte with a few bytes, then reset it.
RESETTING_SERVER = """
import struct, time
while True:
    c, _ = s.accept()
    if c.recv(1):
        c.sendall(b"partial")
        time.sleep(0.3)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
"""


@pytest.mark.anyio
async def test_a_refused_target_is_a_clean_eof_and_a_counted_error(lab: LabInfo) -> None:
    with anyio.fail_after(60):
        async with docker_transport(_one_exec(lab)) as transport, \
                running_forward(transport, 1, timeouts=TIMEOUTS, wait_ready=False) as fwd:
            for _ in range(3):
                async with await anyio.connect_tcp("127.0.0.1", fwd.port) as client:
                    await client.send(b"GET / HTTP/1.0\r\n\r\n")  # leaves with the open, before the refusal
                    assert await read_to_eof(client) == b""  # a FIN, not a reset
            while fwd.stats.active:  # the last one is counted once its socket has closed here too
                await anyio.sleep(0.01)
            assert fwd.stats.errors >= 3
            assert fwd.last_error is not None
            assert re.search(r"127\.0\.0\.1:1 from helper container .*: Connection refused$", fwd.last_error)
            assert fwd.state != ForwardState.READY
            assert transport.info()["mux_execs"] == [0]  # nothing left on the exec


@pytest.mark.anyio
async def test_echoes_with_half_close_through_the_forward(lab: LabInfo) -> None:
    payload = os.urandom(4 << 20)
    with anyio.fail_after(60):
        async with docker_transport(_one_exec(lab)) as transport, \
                running_forward(transport, lab.echo_port, timeouts=TIMEOUTS) as fwd:
            assert await echo_roundtrip(fwd.port, payload) == payload
            await parallel_echoes(fwd.port, os.urandom(256 * 1024), count=16)
            assert fwd.stats.errors == 0
            assert fwd.stats.traffic.up >= len(payload) and fwd.stats.traffic.down >= len(payload)


@pytest.mark.anyio
async def test_a_client_that_never_reads_stalls_only_itself(lab: LabInfo) -> None:
    """Its window at the relay fills and our grants stop, so the relay stops reading its socket; the
    others' echoes go on; then it reads everything it was owed, byte-exact."""
    chunk = os.urandom(256 * 1024)
    with anyio.fail_after(90):
        async with docker_transport(_one_exec(lab)) as transport, \
                running_forward(transport, lab.echo_port, timeouts=TIMEOUTS) as fwd:
            async with await anyio.connect_tcp("127.0.0.1", fwd.port) as stuck:
                # Blocked for a second: everything between us and the echo server is full.
                sent = await _send_until_blocked(stuck, chunk, anyio.Event())
                assert sent > DOWN_WINDOW
                (stream,) = transport._channels[0].conns.values()
                assert isinstance(stream.sink, WiredMux)  # the wired path, not the generic pumps
                await parallel_echoes(fwd.port, os.urandom(512 * 1024), count=8)

                got = bytearray()

                async def drain() -> None:
                    got.extend(await read_to_eof(stuck))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(drain)
                    await stuck.send_eof()  # what did not leave yet stays unsent: shut down after it
            assert len(got) >= sent and len(got) % len(chunk) == 0
            assert all(got[i:i + len(chunk)] == chunk for i in range(0, len(got), len(chunk)))


@pytest.mark.anyio
async def test_a_client_reset_resets_the_target(lab: LabInfo) -> None:
    with anyio.fail_after(60):
        async with ns_server(lab, REPORTING_SERVER) as (port, lines), \
                docker_transport(_one_exec(lab)) as transport, \
                running_forward(transport, port, timeouts=TIMEOUTS, wait_ready=False) as fwd:
            client = socket.create_connection(("127.0.0.1", fwd.port), timeout=10)
            client.sendall(b"some bytes")
            await anyio.sleep(0.3)  # connected at the far side
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            assert await anext(lines) == "reset"
            assert transport.info()["mux_execs"] == [0]


@pytest.mark.anyio
async def test_a_far_side_reset_resets_the_client(lab: LabInfo) -> None:
    with anyio.fail_after(60):
        async with ns_server(lab, RESETTING_SERVER) as (port, _), \
                docker_transport(_one_exec(lab)) as transport, \
                running_forward(transport, port, timeouts=TIMEOUTS, wait_ready=False) as fwd:
            client = socket.create_connection(("127.0.0.1", fwd.port), timeout=10)
            client.sendall(b"?")
            got = b""
            with pytest.raises(ConnectionResetError):
                while True:
                    data = await anyio.to_thread.run_sync(client.recv, 65536)
                    assert data, "a clean EOF where the far side reset"
                    got += data
            client.close()
            assert got == b"partial"


@pytest.mark.anyio
async def test_an_exec_lost_before_the_relay_answered_is_retried_on_another(lab: LabInfo) -> None:
    """The relay is frozen, a client's request leaves with its open, then the relay is killed: the
    connection opens again on the next exec with the request, and the echo comes back whole."""
    s = _one_exec(lab)
    request = os.urandom(48 * 1024)
    with anyio.fail_after(60):
        async with docker_transport(s) as transport, \
                running_forward(transport, lab.echo_port, timeouts=TIMEOUTS) as fwd:
            await anyio.to_thread.run_sync(_helper_sh, s.helper_name, "kill -STOP $(pidof python3)")
            async with await anyio.connect_tcp("127.0.0.1", fwd.port) as client:
                await client.send(request)
                while not transport._channels or not transport._channels[0].conns:
                    await anyio.sleep(0.01)
                (stream,) = transport._channels[0].conns.values()
                assert not stream.seen  # sent, and not answered
                await anyio.to_thread.run_sync(_helper_sh, s.helper_name, "kill -9 $(pidof python3)")
                got = bytearray()
                while len(got) < len(request):
                    got += await client.receive()
                assert got == request
                await client.send_eof()
                assert await read_to_eof(client) == b""
            assert transport.info()["execs_started"] == 2
