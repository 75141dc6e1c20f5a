"""What only the Docker tests need, built on the adapter's public calls and records, and images in the
lab's registry for the lab's dockerd to pull."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio

from tests.lab.lab import LabInfo, docker, ns_exec
from tests.oci import Layout, _put_blob
from tunneld.docker.api import DockerClient
from tunneld.docker.discovery import Container, container_of
from tunneld.docker.models import running_from_inspect


def from_inspect(doc: Mapping[str, Any]) -> Container | None:
    """A ``GET /containers/{id}/json`` document as a Container (through the adapter's own reading of
    it), or None when it is not running."""
    running = running_from_inspect(doc)
    return None if running is None else container_of(running)


async def stop_container(client: DockerClient, ref: str, *, deadline: float = 10.0) -> None:
    """Stop a running helper as ``docker stop`` begins to: SIGTERM to its main process (the idle
    entrypoint traps it and exits), then wait until the container no longer runs."""
    with anyio.fail_after(deadline):
        await client.exec_run(ref, ["kill", "-TERM", "1"], deadline=deadline)
        while (info := await client.inspect_container(ref)) is not None and info.running:
            await anyio.sleep(0.05)


# ---------------------------------------------------------------- images in the lab's registry
# The registry is published on the lab namespace's own 127.0.0.1:5000, so skopeo runs in there; the
# lab's dockerd reaches it there too, and pulls from it over plain HTTP as from any registry on a
# loopback address (dockerd's default insecure registries include 127.0.0.0/8).


def push_to_lab_registry(lab: LabInfo, layout: Layout, repo: str) -> str:
    """Push an OCI layout, digests kept (dockerd names each layer by its digest's first 12 hex digits);
    return the reference the lab's dockerd pulls it by."""
    ref = f"{lab.registry_addr}/{repo}:{layout.tag}"
    ns_exec(["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false", layout.ref,
             f"docker://{ref}"], timeout=120, check=True)
    return ref


def push_lab_image(lab: LabInfo, image: str, repo: str, *, new_layer: int = 0) -> str:
    """Push one of the lab's own images (runnable, unlike a layout of random bytes) to its registry under
    ``repo``, with a layer of ``new_layer`` random bytes on top when asked, then drop that name from
    dockerd, so that using it means pulling it (the new layer; ``image``'s own are "Already exists");
    return the reference."""
    ref = f"{lab.registry_addr}/{repo}:t"
    if new_layer:
        maker = f"{repo.replace('/', '-')}-maker"
        docker("run", "--name", maker, "--entrypoint", "/bin/sh", image, "-c",
               f"head -c {new_layer} /dev/urandom > /random.bin")
        try:
            docker("commit", maker, ref)
        finally:
            docker("rm", "-f", maker)
    else:
        docker("tag", image, ref)
    try:
        docker("push", ref, timeout=120)
    finally:
        docker("rmi", ref)
    return ref


def forget_image(ref: str) -> None:
    """Remove a pushed image from dockerd and from the registry (its blobs wait for the registry's GC)."""
    docker("rmi", "-f", ref, check=False)
    ns_exec(["skopeo", "delete", "--tls-verify=false", f"docker://{ref}"], timeout=60)


def with_wrong_diff_id(layout: Layout) -> Layout:
    """The same layout, but its config names a first layer that is not there: dockerd downloads and
    extracts every layer, then refuses the image in the middle of its answer ("layers from manifest
    don't match image configuration")."""
    root = layout.path
    index = json.loads((root / "index.json").read_text())
    entry = index["manifests"][0]

    def blob(digest: str) -> Path:
        return root / "blobs" / "sha256" / digest.split(":", 1)[1]

    manifest = json.loads(blob(entry["digest"]).read_bytes())
    config = json.loads(blob(manifest["config"]["digest"]).read_bytes())
    config["rootfs"]["diff_ids"][0] = "sha256:" + "0" * 64
    digest, size = _put_blob(root, json.dumps(config, sort_keys=True).encode())
    manifest["config"].update(digest=digest, size=size)
    digest, size = _put_blob(root, json.dumps(manifest, sort_keys=True).encode())
    entry.update(digest=digest, size=size)
    (root / "index.json").write_text(json.dumps(index))
    return Layout(path=root, tag=layout.tag, manifest_digest=digest, layer_digests=layout.layer_digests,
                  size=layout.size)
