"""The helper: an idle container on the Docker host's own network, and the programs run in it.

An exec in a container with the host's network (``--net=host``) sees the Docker host's 127.0.0.1.
The docker transport carries connections through one (role ``helper``) with long-lived execs of
relay.sh, or relay.py when the image has a python3 of 3.5 or later (tunneld/docker/execs.py speaks
to both); provisioning reads the host's listening sockets and asks its loopback over HTTP through
another (role ``provision-helper``, short execs). Both containers are made here, the same way:
labelled with their role, idling in a shell that ``docker stop`` ends at once. A container holding
the name without our label is someone else's and is never touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tunneld.docker.api import DockerAPIError, DockerClient
from tunneld.docker.models import ContainerInfo
from tunneld.errors import TransportError
from tunneld.labels import ROLE_LABEL

logger = logging.getLogger(__name__)

# The main process: idle forever, but let `docker stop` end it at once (a shell as PID 1 takes no
# signal it does not trap, so without the trap a stop would wait out its grace period).
IDLE_ENTRYPOINT = ("/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 86400 & wait $!; done")


class HelperClash(TransportError):
    """A container holds the helper's name but kci-tunneld did not make it (it is left alone)."""


@dataclass(frozen=True)
class Helper:
    """One helper container: its name, its image, the role it is labelled with, and what else a
    person whose own container holds the name can do (after "remove it or")."""

    name: str
    image: str
    role: str  # the value of ROLE_LABEL
    instead: str  # "choose another docker.helper_name"

    def is_ours(self, info: ContainerInfo) -> bool:
        return info.labels.get(ROLE_LABEL) == self.role

    def clash(self, client: DockerClient) -> str:
        """The message for someone else's container under the helper's name."""
        return (f"a container named {self.name} exists on the Docker host at {client.endpoint.host} and was not "
                f"created by kci-tunneld (no {ROLE_LABEL}={self.role} label); remove it or {self.instead}")


async def find_clash(client: DockerClient, helper: Helper) -> str | None:
    """Why the helper's name cannot be ours (someone else's container holds it), or None.

    :raises TransportError: when the Docker host cannot be asked.
    """
    info = await client.inspect_container(helper.name)
    return None if info is None or helper.is_ours(info) else helper.clash(client)


async def ensure_helper(client: DockerClient, helper: Helper, *, image_id: str | None = None) -> tuple[str, bool]:
    """Make the helper run: reuse it, start it when stopped, create it when missing. Returns its
    container id and whether it was created now. Given ``image_id``, a helper running another image
    is recreated.

    :raises HelperClash: when someone else's container holds the name.
    :raises TransportError: when Docker refuses (404: the image is missing) or cannot be reached.
    """
    info = await client.inspect_container(helper.name)
    if info is not None and not helper.is_ours(info):
        raise HelperClash(helper.clash(client))
    if info is not None and image_id is not None and info.image_id != image_id:
        logger.info("docker: helper %s runs another image than %s; recreating it", helper.name, helper.image)
        await client.remove_container(info.id)
        info = None
    created = False
    if info is None:
        cid, created = await _create(client, helper)
    else:
        cid = info.id
    if info is None or not info.running:
        await client.start_container(cid)
    return cid, created


async def _create(client: DockerClient, helper: Helper) -> tuple[str, bool]:
    try:
        cid = await client.create_container(helper.name, helper.image, entrypoint=IDLE_ENTRYPOINT[:1],
                                            cmd=IDLE_ENTRYPOINT[1:], labels={ROLE_LABEL: helper.role})
    except DockerAPIError as e:
        if e.status != 409:
            raise
    else:
        logger.info("docker: created helper container %s (%s) on %s", helper.name, helper.image,
                    client.endpoint.host)
        return cid, True
    # Another daemon (or `up`) created it between our inspect and create: use theirs.
    info = await client.inspect_container(helper.name)
    if info is None:
        raise TransportError(f"helper container {helper.name} vanished while being created; try again")
    if not helper.is_ours(info):
        raise HelperClash(helper.clash(client))
    return info.id, False


async def remove_helper(client: DockerClient, helper: Helper) -> bool:
    """Remove the helper if it is ours; True when something was removed.

    :raises TransportError: when the Docker host cannot be asked.
    """
    info = await client.inspect_container(helper.name)
    if info is None or not helper.is_ours(info):
        return False
    return await client.remove_container(info.id)
