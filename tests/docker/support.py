"""What only the Docker tests need, built on the adapter's public calls and records."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio

from tunneld.docker.api import DockerClient
from tunneld.docker.discovery import Container


def from_inspect(doc: Mapping[str, Any]) -> Container | None:
    """A ``GET /containers/{id}/json`` document as a Container, or None when it is not running.

    HostPort is a string there (unparseable or "0" bindings are left out); HostIp may be empty.
    """
    state = doc.get("State")
    if isinstance(state, Mapping) and not state.get("Running", True):
        return None
    ports: dict[str, tuple[tuple[str, int], ...]] = {}
    for key, binds in ((doc.get("NetworkSettings") or {}).get("Ports") or {}).items():
        out = []
        for b in binds or []:
            try:
                port = int(str(b.get("HostPort") or "0"))
            except ValueError:
                continue
            if 0 < port < 65536:
                out.append((str(b.get("HostIp") or ""), port))
        ports[str(key)] = tuple(out)
    cfg = doc.get("Config") or {}
    return Container(name=str(doc.get("Name") or str(doc.get("Id", "?"))[:12]).lstrip("/"),
                     image=str(cfg.get("Image") or ""), labels=dict(cfg.get("Labels") or {}), ports=ports)


async def stop_container(client: DockerClient, ref: str, *, deadline: float = 10.0) -> None:
    """Stop a running helper as ``docker stop`` begins to: SIGTERM to its main process (the idle
    entrypoint traps it and exits), then wait until the container no longer runs."""
    with anyio.fail_after(deadline):
        await client.exec_run(ref, ["kill", "-TERM", "1"], deadline=deadline)
        while (info := await client.inspect_container(ref)) is not None and info.running:
            await anyio.sleep(0.05)
