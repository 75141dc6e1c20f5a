"""A TCP proxy in front of the lab's sshd, for tests that need the server's bytes held back or damaged.

``go`` holds the server-to-client direction while it is not set (set by default); ``corrupt_next``
flips one bit in the next server write of more than 100 bytes: its last byte, which ends a packet
(its tag) whenever sshd's write arrives whole. ``known_hosts`` writes the lab's host key for the
address the proxy listens on, so host-key checking stays on.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import anyio
import anyio.abc

from tests.lab.lab import LabInfo


class SshdProxy:
    """Run ``serve`` with ``TaskGroup.start``; connect to 127.0.0.1:``port``."""

    def __init__(self, lab: LabInfo) -> None:
        self.lab = lab
        self.go = anyio.Event()
        self.go.set()
        self.corrupt_next = False
        self.port = 0

    async def serve(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started()
        async with listener:
            await listener.serve(self._one)

    async def _one(self, client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp(self.lab.ssh_host, self.lab.ssh_port) as upstream, \
                anyio.create_task_group() as tg:
            tg.start_soon(self._pipe, client, upstream, False)
            await self._pipe(upstream, client, True)
            tg.cancel_scope.cancel()

    async def _pipe(self, src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, from_server: bool) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            while True:
                data = await src.receive()
                if from_server:
                    await self.go.wait()
                    if self.corrupt_next and len(data) > 100:
                        self.corrupt_next = False
                        data = data[:-1] + bytes([data[-1] ^ 0x10])
                await dst.send(data)

    def known_hosts(self, tmp_path: Path) -> str:
        """A known_hosts file with the lab's host key for the proxy's address."""
        key = Path(self.lab.ssh_known_hosts).read_text().split(None, 1)[1]
        path = tmp_path / "known_hosts"
        path.write_text(f"[127.0.0.1]:{self.port} {key}")
        return str(path)
