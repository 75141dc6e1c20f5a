"""Images on the Docker host: have one there, pulling it when it is missing (``docker pull``).

How a pull's progress is shown is the caller's choice: ``progress`` gets the Engine's records as
they come (``tunneld.docker.progress.PullPrinter`` turns them into lines or a terminal bar).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

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
