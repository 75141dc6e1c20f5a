"""OCI image layouts of random bytes, and skopeo round trips through a forward, for registry tests.

``build_layout`` writes a small multi-layer image (each layer a tar holding one file of random
bytes, so nothing compresses and every run pushes new blobs); ``push``/``pull`` drive the real
skopeo against a plain-HTTP registry; ``manifest_digest``/``layer_digests`` read a layout back so a
test can assert that what came back is byte-for-byte what went out.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
SKOPEO_TIMEOUT = 300.0


@dataclass(frozen=True)
class Layout:
    """An OCI image layout on disk: ``oci:{path}:{tag}`` for skopeo."""

    path: Path
    tag: str
    manifest_digest: str
    layer_digests: tuple[str, ...]
    size: int  # bytes of layer blobs

    @property
    def ref(self) -> str:
        return f"oci:{self.path}:{self.tag}"


def _put_blob(root: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob = root / "blobs" / "sha256" / digest.split(":", 1)[1]
    blob.write_bytes(data)
    return digest, len(data)


def _layer(size: int, name: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    return out.getvalue()


def build_layout(path: Path, layer_sizes: tuple[int, ...] = (8 << 20, 6 << 20, 4 << 20), tag: str = "t") -> Layout:
    """Write an image with one layer per size (random content) to ``path``; default 18 MiB in 3 layers."""
    (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    layers: list[dict[str, str | int]] = []
    diff_ids: list[str] = []
    for i, size in enumerate(layer_sizes):
        data = _layer(size, f"layer{i}.bin")
        digest, length = _put_blob(path, data)
        layers.append({"mediaType": OCI_LAYER, "digest": digest, "size": length})
        diff_ids.append(digest)  # uncompressed: the diff id is the blob digest
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {},
    }, sort_keys=True).encode()
    config_digest, config_size = _put_blob(path, config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": layers,
    }, sort_keys=True).encode()
    manifest_digest, manifest_size = _put_blob(path, manifest)
    (path / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": manifest_size,
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }))
    return Layout(path=path, tag=tag, manifest_digest=manifest_digest,
                  layer_digests=tuple(diff_ids), size=sum(layer_sizes))


def read_layout(path: Path, tag: str = "t") -> Layout:
    """Read back the manifest and layer digests of ``tag`` in a layout (e.g. one skopeo wrote)."""
    index = json.loads((path / "index.json").read_text())
    entry = next(m for m in index["manifests"]
                 if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    digest = entry["digest"]
    manifest_bytes = (path / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()
    assert "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() == digest, "manifest blob does not match its digest"
    manifest = json.loads(manifest_bytes)
    layers = tuple(layer["digest"] for layer in manifest["layers"])
    for layer in layers:
        blob = (path / "blobs" / "sha256" / layer.split(":", 1)[1]).read_bytes()
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer, f"layer blob {layer} is corrupt"
    return Layout(path=path, tag=tag, manifest_digest=digest, layer_digests=layers,
                  size=sum(int(layer["size"]) for layer in manifest["layers"]))


def skopeo(*args: str, timeout: float = SKOPEO_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run skopeo; raise with its stderr on failure."""
    result = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def push(layout: Layout, registry: str, repo: str) -> str:
    """Push to a plain-HTTP registry at ``registry`` (host:port); return the registry's manifest digest."""
    dest = f"docker://{registry}/{repo}:{layout.tag}"
    skopeo("copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false", layout.ref, dest)
    raw = skopeo("inspect", "--raw", "--tls-verify=false", dest).stdout.encode()
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def pull(registry: str, repo: str, tag: str, dest: Path) -> Layout:
    """Pull ``repo:tag`` into a fresh layout at ``dest`` and read it back (blobs verified)."""
    skopeo("copy", "--quiet", "--preserve-digests", "--src-tls-verify=false",
           f"docker://{registry}/{repo}:{tag}", f"oci:{dest}:{tag}")
    return read_layout(dest, tag)


def roundtrip(layout: Layout, registry: str, repo: str, workdir: Path) -> None:
    """Push, then pull back into ``workdir``: the registry's manifest digest and every layer digest
    identical to what was pushed."""
    assert push(layout, registry, repo) == layout.manifest_digest
    back = pull(registry, repo, layout.tag, workdir / "back")
    assert back.manifest_digest == layout.manifest_digest
    assert back.layer_digests == layout.layer_digests
