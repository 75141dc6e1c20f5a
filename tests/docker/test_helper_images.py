"""A list of helper images against the lab's real dockerd: the first the Docker host already has is
used without a registry, else each is pulled in turn; status and the log name the image and the relay
and why; when none can be had, the error names every image tried.

"Absent" images are names in the lab's registry that do not exist there (a pull is refused at once);
each test has its own helper container (``settings`` gives it a name of its own) and removes it.
"""

from __future__ import annotations

import logging
import time
import uuid

import anyio
import pytest

from tests.docker.support import forget_image, push_lab_image
from tests.docker.test_transport import docker_transport, settings
from tests.helpers import echo_roundtrip, running_forward
from tests.lab.lab import LabInfo, docker
from tunneld.cli.status import _status_header
from tunneld.config import DEFAULT_HELPER_IMAGES
from tunneld.errors import TransportError

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


def absent(lab: LabInfo) -> str:
    """A name the lab's registry does not have: not on the Docker host, and its pull is refused."""
    return f"{lab.registry_addr}/kci/absent-{uuid.uuid4().hex[:8]}:1"


def pulls(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in caplog.messages if m.startswith(("docker: pull", "docker: pulling"))]


async def test_an_image_already_on_the_host_is_used_without_a_registry(
        lab: LabInfo, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tunneld.docker")
    first = absent(lab)
    s = settings(lab, tls=False, helper_images=(first, lab.python_image))
    with anyio.fail_after(60):
        async with docker_transport(s) as transport, running_forward(transport, lab.echo_port) as fwd:
            assert await echo_roundtrip(fwd.port, b"no registry needed") == b"no registry needed"
            info = transport.info()
    assert pulls(caplog) == []  # the absent first image was never pulled
    why = f"already on the Docker host; {first} was not"
    assert (info["helper_image"], info["helper_image_why"]) == (lab.python_image, why)
    assert info["helper_images"] == [first, lab.python_image]
    relay_why = "python3 in the image; many connections per exec"
    assert (info["relay"], info["relay_why"]) == ("mux", relay_why)
    assert (f"docker: helper {s.helper_name} ready: image {lab.python_image} ({why}), relay mux "
            f"({relay_why}), {s.mux_execs} exec(s) carrying every connection") in caplog.messages
    header = _status_header({"pid": 1, "state": "running", "transport": info}, time.time())
    assert f"helper image {lab.python_image} ({why}), relay mux ({relay_why})" in header


async def test_the_default_list_runs_the_mux_relay_without_a_registry(
        lab: LabInfo, caplog: pytest.LogCaptureFixture) -> None:
    # The lab's python stand-in carries the default list's first name (tests/lab/dockerd.py tags it).
    caplog.set_level(logging.INFO, logger="tunneld.docker")
    assert DEFAULT_HELPER_IMAGES[0] == lab.python_default_image
    s = settings(lab, tls=True, helper_images=DEFAULT_HELPER_IMAGES)
    with anyio.fail_after(60):
        async with docker_transport(s) as transport, running_forward(transport, lab.echo_port) as fwd:
            assert await echo_roundtrip(fwd.port, b"the default") == b"the default"
            info = transport.info()
    assert pulls(caplog) == []
    assert (info["helper_image"], info["helper_image_why"], info["relay"]) == \
        (DEFAULT_HELPER_IMAGES[0], "already on the Docker host", "mux")


async def test_the_shell_relay_is_named_with_its_reason(lab: LabInfo) -> None:
    s = settings(lab, tls=False, helper_images=(lab.socat_image, lab.python_image))
    with anyio.fail_after(60):
        async with docker_transport(s) as transport:
            info = transport.info()
    assert (info["helper_image"], info["helper_image_why"]) == (lab.socat_image, "already on the Docker host")
    assert (info["relay"], info["relay_why"]) == ("socat", "no python3 in the image; socat is")


async def test_no_usable_helper_image_names_each_image_tried(lab: LabInfo) -> None:
    images = (absent(lab), absent(lab))
    s = settings(lab, tls=False, helper_images=images)
    with anyio.fail_after(60), pytest.raises(TransportError) as e:
        async with docker_transport(s):
            pass
    message = str(e.value)
    assert message.startswith("none of the helper images is on the Docker host at unix://"), message
    for n, image in enumerate(images, 1):
        assert f"({n}) {image}: pulling image {image}: the Docker host at unix://" in message, message
        assert f"answered 404: manifest for {image} not found" in message, message
    assert message.endswith("load one of them there (docker pull or docker load on the Docker host) "
                            "or set --helper-image"), message


async def test_the_first_image_that_pulls_is_used_when_the_host_has_none(
        lab: LabInfo, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tunneld.docker")
    first = absent(lab)
    ref = push_lab_image(lab, lab.socat_image, f"kcit/helper-list-{uuid.uuid4().hex[:8]}")
    try:
        s = settings(lab, tls=False, helper_images=(first, ref))
        with anyio.fail_after(60):
            async with docker_transport(s) as transport, running_forward(transport, lab.echo_port) as fwd:
                assert await echo_roundtrip(fwd.port, b"pulled second") == b"pulled second"
                info = transport.info()
    finally:
        forget_image(ref)
    assert info["helper_image"] == ref
    assert info["helper_image_why"].startswith(f"pulled: none of the list was on the Docker host; {first}: ")
    assert any(m.startswith(f"docker: pulled {ref}") for m in pulls(caplog)), pulls(caplog)


async def test_a_helper_remade_without_python3_falls_back_to_the_shell_relay(
        lab: LabInfo, caplog: pytest.LogCaptureFixture) -> None:
    """The mux runs in the first image of the list; the helper container is removed and that image
    is gone from the host (and cannot be pulled): the helper is remade from the next image, which has
    no python3, and the connections go over the shell relay's pool of execs from then on."""
    caplog.set_level(logging.INFO, logger="tunneld.docker")
    gone = f"{lab.registry_addr}/kcit/python-gone-{uuid.uuid4().hex[:8]}:1"  # a tag here only: no pull
    docker("tag", lab.python_image, gone)
    s = settings(lab, tls=False, helper_images=(gone, lab.socat_image))
    try:
        with anyio.fail_after(90):
            async with docker_transport(s) as transport, running_forward(transport, lab.echo_port) as fwd:
                assert await echo_roundtrip(fwd.port, b"over the mux") == b"over the mux"
                assert (transport.info()["helper_image"], transport.info()["relay"]) == (gone, "mux")
                await anyio.to_thread.run_sync(lambda: docker("rm", "-f", s.helper_name))
                await anyio.to_thread.run_sync(lambda: docker("rmi", gone))
                while True:  # connections fail while the helper is remade, then work again
                    with anyio.move_on_after(5):
                        if await echo_roundtrip(fwd.port, b"over the shell relay") == b"over the shell relay":
                            break
                    await anyio.sleep(0.1)
                info = transport.info()
    finally:
        docker("rmi", gone, check=False)
    assert (info["helper_image"], info["relay"]) == (lab.socat_image, "socat")
    assert f"docker: helper image {lab.socat_image} cannot run the mux relay; using the pool of relay execs" \
        in caplog.messages
