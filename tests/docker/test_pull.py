"""Image pulls by the lab's real dockerd from a real registry (the lab's, on the namespace's own
127.0.0.1:5000; images pushed there with skopeo from OCI layouts of random bytes): the progress records
the adapter hands out as the pull goes, the lines and the terminal bar they make, and a failure the
Engine reports in the middle of its answer."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from tests.docker.support import forget_image, push_to_lab_registry, with_wrong_diff_id
from tests.docker.test_progress import Screen
from tests.lab.lab import LabInfo
from tests.oci import Layout, build_layout
from tunneld.config import DockerSettings
from tunneld.docker.api import DockerClient
from tunneld.docker.host import resolve_endpoint
from tunneld.docker.images import ImageUnavailable, ensure_image
from tunneld.docker.models import PullProgress
from tunneld.docker.progress import PullPrinter, PullRenderer

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

SIZES = (3 << 20, 1 << 20, 64 << 10)


@pytest.fixture(params=[False, True], ids=["unix", "tls"])
async def client(lab: LabInfo, request: pytest.FixtureRequest) -> AsyncIterator[DockerClient]:
    if request.param:
        s = DockerSettings(host=lab.docker_host_tcp, tls_verify=True, cert_path=str(lab.client_cert_dir))
    else:
        s = DockerSettings(host=lab.docker_host_unix)
    async with DockerClient(resolve_endpoint(s, {}), timeout=10) as c:
        yield c


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return build_layout(tmp_path / "oci", SIZES)


@pytest.fixture
def pushed(lab: LabInfo, layout: Layout) -> Iterator[str]:
    ref = push_to_lab_registry(lab, layout, f"kcit/pull-{uuid.uuid4().hex[:8]}")
    try:
        yield ref
    finally:
        forget_image(ref)


def blob_size(layout: Layout, digest: str) -> int:
    return (layout.path / "blobs" / "sha256" / digest.split(":", 1)[1]).stat().st_size


async def test_a_pull_hands_out_every_step_layer_by_layer(client: DockerClient, layout: Layout, pushed: str) -> None:
    records: list[PullProgress] = []
    with anyio.fail_after(60):
        assert await client.image_id(pushed) is None
        image_id = await ensure_image(client, pushed, progress=records.append)
        assert image_id == await client.image_id(pushed)
    assert all(type(r) is PullProgress and r.image == pushed for r in records)
    repo = pushed.split("/", 1)[1].rsplit(":", 1)[0]
    assert records[0] == PullProgress(image=pushed, status=f"Pulling from {repo}")
    assert records[-1] == PullProgress(image=pushed, status=f"Status: Downloaded newer image for {pushed}")
    # dockerd names a layer by the first 12 hex digits of its digest, and counts its bytes against the blob's size.
    sizes = {d.split(":", 1)[1][:12]: blob_size(layout, d) for d in layout.layer_digests}
    assert {r.layer for r in records if r.layer} == set(sizes)
    for layer, size in sizes.items():
        steps = [r for r in records if r.layer == layer]
        assert steps[0].status == "Pulling fs layer" and steps[-1].status == "Pull complete"
        assert {"Downloading", "Extracting"} <= {r.status for r in steps}
        counting = ("Downloading", "Extracting")
        for status in counting:
            counted = [r.current for r in steps if r.status == status]
            assert counted == sorted(counted) and all(c is not None and 0 < c <= size for c in counted)
        assert {r.total for r in steps if r.status in counting} == {size}
        assert all(r.current is None and r.total is None for r in steps if r.status not in counting)

    # The same records, as a CI log shows them (a pull this fast: no progress line, one per layer) ...
    clock = iter(range(1000)).__next__  # a second per record: every step seems to take long
    log = PullRenderer(pushed, clock=lambda: float(clock()))
    lines = [line for r in records for line in log.feed(r)]
    assert lines[0] == f"pulling {pushed}"
    assert lines[-1] == f"pulled {pushed} in {len(records) - 1:.1f}s (3 layers, 4.1 MiB)"
    for layer, size in sizes.items():
        assert f"pulling {pushed}: layer {layer}: done ({size / (1 << 20):.1f} MiB)" in lines
    # ... at most a progress line per layer every 5 s: here one per 5 records of that layer's.
    assert len(lines) <= 2 + 3 + len(records) // 5
    # ... and on a terminal: one line rewritten, ended by the summary.
    bar = PullRenderer(pushed, tty=True, prefix="up: ", clock=lambda: float(clock()))
    screen = Screen()
    for r in records:
        for text in bar.feed(r):
            screen.write(text)
    assert screen.done == [f"up: pulled {pushed} in {len(records) - 1:.1f}s (3 layers, 4.1 MiB)"]
    assert screen.line == ""


async def test_an_image_already_there_is_not_pulled(lab: LabInfo, client: DockerClient) -> None:
    records: list[PullProgress] = []
    with anyio.fail_after(10):
        assert await ensure_image(client, lab.socat_image, progress=records.append)
    assert records == []


async def test_a_failure_in_the_middle_of_the_pull_is_reported_with_what_dockerd_said(
        lab: LabInfo, client: DockerClient, layout: Layout) -> None:
    ref = push_to_lab_registry(lab, with_wrong_diff_id(layout), f"kcit/pull-bad-{uuid.uuid4().hex[:8]}")
    said: list[str] = []
    written: list[str] = []
    printer = PullPrinter(said.append, write=written.append)
    try:
        with anyio.fail_after(60), pytest.raises(ImageUnavailable) as err:
            try:
                await ensure_image(client, ref, what="registry image", progress=printer)
            finally:
                printer.close()
    finally:
        forget_image(ref)
    assert str(err.value) == (f"registry image {ref} is not on the Docker host and pulling it failed: pulling image "
                              f"{ref}: the Docker host at {client.endpoint.host} reported: layers from manifest don't "
                              "match image configuration")
    # The bar was drawn while the layers came, and its line ended when the pull failed.
    assert said == [] and written[0] == f"\rpulling {ref}" and written[-1] == "\n"
    assert sum(text.endswith("\n") for text in written) == 1
