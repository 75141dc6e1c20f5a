"""Images on the Docker host: have one there, pulling it when it is missing (``docker pull``), or
choose the first of a list the host has (pulling in turn only when it has none).

How a pull's progress is shown is the caller's choice: ``progress`` gets the Engine's records as
they come (``tunneld.docker.progress.PullPrinter`` turns them into lines or a terminal bar).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tunneld.docker.api import DockerClient
from tunneld.docker.models import PullProgress
from tunneld.errors import TransportError

logger = logging.getLogger(__name__)

PULL_TIMEOUT = 600.0  # a cold pull of a large image over a slow link; provisioning has its own setting


class ImageUnavailable(TransportError):
    """The Docker host does not have an image and could not pull it."""


async def ensure_image(client: DockerClient, image: str, *, deadline: float = PULL_TIMEOUT,
                       what: str = "image", hint: str = "",
                       progress: Callable[[PullProgress], None] | None = None) -> str:
    """The local id (sha256:...) of ``image`` on the Docker host, pulled first when missing.

    ``what`` names the image in messages ("helper image"); ``hint``, when given, ends them with what
    a person can do ("load it there or set --helper-image"); ``progress`` sees every step of a pull.

    :raises ImageUnavailable: when it is missing and the pull failed (Docker refused, or no answer
        within ``deadline`` seconds), or the pull left it missing.
    :raises TransportError: when the Docker host cannot be asked.
    """
    image_id = await client.image_id(image)
    if image_id is not None:
        return image_id
    then = f"; {hint}" if hint else ""
    # At debug: what a person follows of the pull is ``progress``'s to show.
    logger.debug("docker: %s %s is not on the Docker host: pulling it", what, image)
    try:
        await client.pull_image(image, deadline=deadline, progress=progress)
    except TransportError as e:
        raise ImageUnavailable(f"{what} {image} is not on the Docker host and pulling it failed: {e}{then}") from None
    image_id = await client.image_id(image)
    if image_id is None:
        raise ImageUnavailable(f"{what} {image} is still missing on the Docker host after a pull{then}")
    return image_id


@dataclass(frozen=True)
class ImageChoice:
    """The image chosen from a list, its local id, and why it was the one."""

    image: str
    image_id: str
    why: str  # "already on the Docker host; alpine/socat was not"


async def choose_image(client: DockerClient, images: Sequence[str], *, deadline: float = PULL_TIMEOUT,
                       what: str = "image", hint: str = "",
                       progress: Callable[[PullProgress], None] | None = None) -> ImageChoice:
    """The first of ``images`` the Docker host already has (nothing is pulled then), else the first
    that pulls, trying each in turn. Arguments as for ``ensure_image``.

    :raises ImageUnavailable: when the host has none of them and none pulled; the message names
        each image and why it failed.
    :raises TransportError: when the Docker host cannot be asked.
    """
    if not images:
        raise ValueError("no images to choose from")
    for n, image in enumerate(images):
        image_id = await client.image_id(image)
        if image_id is not None:
            return ImageChoice(image, image_id, "already on the Docker host" + _not_there(images[:n]))
    then = f"; {hint}" if hint else ""
    failed: list[str] = []
    for image in images:
        logger.debug("docker: %s %s is not on the Docker host: pulling it", what, image)
        try:
            await client.pull_image(image, deadline=deadline, progress=progress)
            image_id = await client.image_id(image)
        except TransportError as e:
            failed.append(f"{image}: {e}")
            continue
        if image_id is None:
            failed.append(f"{image}: still missing after a pull")
            continue
        why = "pulled: " + ("it was not" if len(images) == 1 else "none of the list was") + " on the Docker host"
        return ImageChoice(image, image_id, why + "".join(f"; {f}" for f in failed))
    if len(images) == 1:
        raise ImageUnavailable(f"{what} {images[0]} is not on the Docker host and pulling it failed: "
                               f"{failed[0].partition(': ')[2]}{then}")
    tried = "; ".join(f"({n}) {f}" for n, f in enumerate(failed, 1))
    raise ImageUnavailable(f"none of the {what}s is on the Docker host at {client.endpoint.host}, and none could "
                           f"be pulled; tried in order: {tried}{then}")


def _not_there(images: Sequence[str]) -> str:
    if not images:
        return ""
    return f"; {', '.join(images)} {'was' if len(images) == 1 else 'were'} not"
