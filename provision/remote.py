"""The remote Docker host as provisioning sees it: who holds a port there, files inside containers.

Ports published on the remote's 127.0.0.1 are invisible from here, so one small helper container
with the host's network (``kci-tunneld-provision``, the same image as the docker transport's helper,
made the same way: tunneld/docker/helper/) reads the host's listening sockets from /proc/net/tcp{,6}
and talks HTTP to its loopback.
"""

from __future__ import annotations

import shlex

from provision.errors import ProvisionError
from provision.spec import PROVISION_HELPER_NAME, ProvisionTimeouts
from tunneld.docker.api import DockerClient
from tunneld.docker.helper import Helper, HelperClash, ensure_helper, find_clash, remove_helper
from tunneld.docker.models import ContainerDetails
from tunneld.labels import ROLE_PROVISION_HELPER

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def parse_listening(text: str) -> set[int]:
    """Ports in LISTEN state in /proc/net/tcp or tcp6 text (any local address)."""
    ports: set[int] = set()
    for line in text.splitlines():
        cols = line.split()
        if len(cols) > 3 and cols[3] == _LISTEN and ":" in cols[1]:
            try:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
            except ValueError:
                continue
    return ports


class RemoteHost:
    """Questions about the Docker host that need its own network view, answered through the helper."""

    def __init__(self, client: DockerClient, helper_image: str, timeouts: ProvisionTimeouts) -> None:
        self.client = client
        self.helper = Helper(PROVISION_HELPER_NAME, helper_image, ROLE_PROVISION_HELPER, instead="rename it")
        self.timeouts = timeouts
        self.created_helper = False

    async def helper_clash(self) -> str | None:
        """Why the helper's name cannot be ours, or None."""
        return await find_clash(self.client, self.helper)

    async def ensure_helper(self) -> None:
        """Create or start the helper unless it runs (whatever image it runs: pre-flight pulled ours).

        :raises ProvisionError: when the name is taken by someone else's container.
        """
        try:
            _, created = await ensure_helper(self.client, self.helper)
        except HelperClash as e:
            raise ProvisionError(str(e)) from None
        self.created_helper = self.created_helper or created

    async def remove_helper(self) -> bool:
        """Remove the helper if it is ours; True if something was removed."""
        return await remove_helper(self.client, self.helper)

    async def listening_ports(self) -> set[int]:
        """TCP ports something listens on in the Docker host's network namespace."""
        await self.ensure_helper()
        r = await self.client.exec_run(PROVISION_HELPER_NAME, ["cat", "/proc/net/tcp", "/proc/net/tcp6"],
                                       deadline=self.timeouts.docker)
        return parse_listening(r.stdout.decode(errors="replace"))

    async def port_holder(self, port: int, *, ignore: str | None = None) -> str | None:
        """Who holds ``port`` on the Docker host ("container X", "a process"), or None when it is free.

        A port container ``ignore`` publishes counts as free (it is the one we mean to reuse).
        """
        for p in await self.client.published_ports():
            if p.host_port == port and p.proto == "tcp":
                if ignore is not None and p.container == ignore:
                    return None
                return f"container {p.container} (publishes {p.host_ip or '0.0.0.0'}:{port}->{p.container_port})"
        if port in await self.listening_ports():
            return "a process on the Docker host (not a container's published port)"
        return None

    async def http_status(self, port: int, path: str) -> int | None:
        """The status code of GET http://127.0.0.1:PORT/PATH as the Docker host sees it, or None."""
        await self.ensure_helper()
        request = f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n"
        script = f"printf %s {shlex.quote(request)} | nc -w 3 127.0.0.1 {port} | head -c 64"
        r = await self.client.exec_run(PROVISION_HELPER_NAME, ["sh", "-c", script], deadline=self.timeouts.docker)
        head = r.stdout.decode(errors="replace").split()
        if len(head) >= 2 and head[0].startswith("HTTP/1.") and head[1].isdigit():
            return int(head[1])
        return None

    async def write_file(self, container: str, path: str, content: str) -> None:
        """Write ``content`` to ``path`` inside a running container (its directory created).

        The content travels as an argument, not on stdin: an exec over TLS cannot half-close.

        :raises ProvisionError: naming the container and the file.
        """
        script = 'mkdir -p "$(dirname "$1")" && printf %s "$2" > "$1.tmp" && mv "$1.tmp" "$1"'
        r = await self.client.exec_run(container, ["sh", "-c", script, "sh", path, content],
                                       deadline=self.timeouts.docker)
        if r.exit_code != 0:
            raise ProvisionError(f"writing {path} in container {container} failed (exit {r.exit_code}): "
                                 f"{r.stderr.decode(errors='replace').strip()}")

    async def read_file(self, container: str, path: str) -> str | None:
        """The text of ``path`` inside a running container, or None when it does not exist."""
        r = await self.client.exec_run(container, ["cat", path], deadline=self.timeouts.docker)
        return r.stdout.decode(errors="replace") if r.exit_code == 0 else None


def describe(d: ContainerDetails) -> str:
    labels = ", ".join(f"{k}={v}" for k, v in sorted(d.labels.items())) or "no labels"
    return f"{d.name} ({d.image}, {d.state}, {labels})"
