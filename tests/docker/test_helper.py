"""The helper container and images on the lab's real dockerd: one implementation for the docker
transport's helper and provisioning's, so both are made alike, reused, left alone when someone
else's container holds the name, and removed only when ours; a missing image names itself."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import anyio
import pytest

from tests.docker.support import stop_container
from tests.lab.lab import LabInfo, docker
from tunneld.config import DockerSettings
from tunneld.docker.api import DockerClient
from tunneld.docker.helper import IDLE_ENTRYPOINT, Helper, HelperClash, ensure_helper, find_clash, remove_helper
from tunneld.docker.host import resolve_endpoint
from tunneld.docker.images import ImageUnavailable, ensure_image
from tunneld.labels import ROLE_HELPER, ROLE_LABEL, ROLE_PROVISION_HELPER

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]


@pytest.fixture
async def client(lab: LabInfo) -> AsyncIterator[DockerClient]:
    async with DockerClient(resolve_endpoint(DockerSettings(host=lab.docker_host_unix), {}), timeout=10) as c:
        yield c


def helper(lab: LabInfo, role: str = ROLE_HELPER) -> Helper:
    return Helper(f"kci-test-{uuid.uuid4().hex[:10]}", lab.socat_image, role, instead="choose another name")


@pytest.mark.parametrize("role", [ROLE_HELPER, ROLE_PROVISION_HELPER])
async def test_helper_is_created_reused_started_and_removed(lab: LabInfo, client: DockerClient, role: str) -> None:
    h = helper(lab, role)
    try:
        with anyio.fail_after(60):
            cid, created = await ensure_helper(client, h)
            assert created
            info = await client.inspect_container(h.name)
            assert info is not None and info.running and info.labels[ROLE_LABEL] == role
            (doc,) = json.loads(docker("inspect", h.name).stdout)
            assert [*doc["Config"]["Entrypoint"], *doc["Config"]["Cmd"]] == list(IDLE_ENTRYPOINT)
            assert doc["HostConfig"]["NetworkMode"] == "host"
            assert await ensure_helper(client, h) == (cid, False)  # running: reused
            await stop_container(client, h.name)  # the idle entrypoint ends on SIGTERM
            assert await ensure_helper(client, h) == (cid, False)  # stopped: started again
            info = await client.inspect_container(h.name)
            assert info is not None and info.running
            assert await remove_helper(client, h) and await client.inspect_container(h.name) is None
            assert not await remove_helper(client, h)  # nothing there: fine
    finally:
        await client.remove_container(h.name)


async def test_another_image_is_recreated_only_when_asked(lab: LabInfo, client: DockerClient) -> None:
    h = helper(lab)
    try:
        with anyio.fail_after(60):
            cid, _ = await ensure_helper(client, h)
            other = Helper(h.name, lab.busybox_image, h.role, h.instead)
            assert await ensure_helper(client, other) == (cid, False)  # no image given: kept as it is
            busybox = await ensure_image(client, lab.busybox_image)
            new, created = await ensure_helper(client, other, image_id=busybox)
            assert created and new != cid
            info = await client.inspect_container(h.name)
            assert info is not None and info.image_id == busybox
    finally:
        await client.remove_container(h.name)


async def test_someone_elses_container_under_the_name_is_left_alone(lab: LabInfo, client: DockerClient) -> None:
    h = helper(lab, ROLE_PROVISION_HELPER)
    await client.create_container_json(h.name, {"Image": lab.busybox_image, "Cmd": ["true"]})
    try:
        with anyio.fail_after(30):
            expected = (f"a container named {h.name} exists on the Docker host at {client.endpoint.host} and was "
                        f"not created by kci-tunneld (no {ROLE_LABEL}={ROLE_PROVISION_HELPER} label); remove it or "
                        "choose another name")
            assert await find_clash(client, h) == expected
            with pytest.raises(HelperClash) as err:
                await ensure_helper(client, h)
            assert str(err.value) == expected
            assert not await remove_helper(client, h)
            info = await client.inspect_container(h.name)
            assert info is not None and info.image == lab.busybox_image and ROLE_LABEL not in info.labels
    finally:
        await client.remove_container(h.name)


async def test_an_image_the_host_cannot_have_names_itself_and_the_way_out(client: DockerClient) -> None:
    with anyio.fail_after(60), pytest.raises(ImageUnavailable) as err:
        await ensure_image(client, "kcit-no-such/helper:1", deadline=30, what="helper image",
                           hint="load it there or set --helper-image")
    text = str(err.value)
    assert text.startswith("helper image kcit-no-such/helper:1 is not on the Docker host and pulling it failed: ")
    assert text.endswith("; load it there or set --helper-image")


async def test_an_image_the_host_has_is_not_pulled(lab: LabInfo, client: DockerClient) -> None:
    with anyio.fail_after(10):
        assert await ensure_image(client, lab.socat_image) == await client.image_id(lab.socat_image)
