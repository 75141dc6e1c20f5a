"""Root filesystems for the lab's images, streamed as tar archives to `docker import`.

No registry can be reached from this machine, so the images the tests need are built
from Debian binaries that are already installed: the real distribution registry
(`docker-registry`), socat with every library it links, and busybox-static; and one from
packages of the next Debian release, unpacked, never installed (socat 1.8: socat18.py).

An image is identified by a digest of its recipe (stored as a label). The image store
survives `down`, so without the digest a changed recipe would silently keep the old image.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from . import socat18

BUSYBOX = Path("/bin/busybox")
SOCAT = Path("/usr/bin/socat")
REGISTRY = Path("/usr/bin/docker-registry")
# Debian's python3 (not whatever runs the tests): its stdlib sits at a fixed path to copy.
PYTHON = Path("/usr/bin/python3.11")
PYTHON_LIB = Path("/usr/lib/python3.11")
# Not needed to run a script, and most of the size.
_PYTHON_SKIP = {"test", "site-packages", "dist-packages", "idlelib", "tkinter", "turtledemo", "ensurepip",
                "lib2to3", "pydoc_data", "__pycache__"}
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# User-level applets worth having in a relay container; intersected with what the
# installed busybox really provides.
_APPLETS = (
    "[ ash awk base64 cat chmod cmp cp cut date dd echo env false grep head hexdump hostname "
    "id kill ln ls md5sum mkdir mv nc netstat nslookup od pidof printf ps rm sed seq sh "
    "sha256sum sleep sort stat tail tee test timeout touch tr true uname wc wget which xxd yes"
).split()

REGISTRY_CONFIG = """\
version: 0.1
log:
  fields:
    service: registry
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: /var/lib/registry
  delete:
    enabled: true
http:
  addr: :5000
  # Without a drain timeout the registry ignores SIGTERM (it is PID 1 in its container),
  # and every dockerd stop would wait out the 10 s kill timeout.
  draintimeout: 1s
  headers:
    X-Content-Type-Options: [nosniff]
"""

# Enough of /etc for libc name lookups (socat TCP:localhost:P) and for `id`/`ps`.
_ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/nsswitch.conf": "hosts: files dns\n",
}


@dataclass(frozen=True)
class ImageSpec:
    """What goes into one imported image."""

    name: str
    files: dict[str, Path]  # path in image -> source on this machine (dereferenced)
    symlinks: dict[str, str] = field(default_factory=dict)  # path in image -> link target
    texts: dict[str, str] = field(default_factory=dict)  # path in image -> content
    dirs: tuple[str, ...] = ("tmp", "root")
    changes: tuple[str, ...] = ()  # Dockerfile instructions for `docker import -c`

    def digest(self) -> str:
        """Stable digest of the recipe, including the size and mtime of each source file."""
        h = hashlib.sha256()
        for dest, src in sorted(self.files.items()):
            st = src.stat()
            h.update(f"F {dest} {src} {st.st_size} {st.st_mtime_ns}\n".encode())
        for dest, target in sorted(self.symlinks.items()):
            h.update(f"L {dest} {target}\n".encode())
        for dest, text in sorted(self.texts.items()):
            h.update(f"T {dest} {text}\n".encode())
        h.update(json.dumps([self.dirs, self.changes]).encode())
        return h.hexdigest()[:16]

    def import_changes(self) -> list[str]:
        """`-c` arguments for docker import, with the recipe label last."""
        return [*self.changes, f"LABEL kcilab.recipe={self.digest()}"]


def shared_libs(binary: Path) -> dict[str, Path]:
    """Every library `ldd` lists for `binary` (including the loader), keyed by path in image.

    :raises RuntimeError: if ldd fails or the binary is static.
    """
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ldd {binary} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    libs: dict[str, Path] = {}
    for line in proc.stdout.splitlines():
        # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs[m.group(1).lstrip("/")] = Path(m.group(1))
    return libs


def is_static(binary: Path) -> bool:
    """True if `binary` needs no dynamic loader (ldd says "not a dynamic executable")."""
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30)
    return proc.returncode != 0 and "not a dynamic executable" in proc.stdout + proc.stderr


def _busybox_links() -> dict[str, str]:
    have = set(
        subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, timeout=30, check=True).stdout.split()
    )
    return {f"bin/{applet}": "busybox" for applet in _APPLETS if applet in have}


def registry_spec() -> ImageSpec:
    """`registry:2`: the distribution registry (v2.8) serving plain HTTP on :5000."""
    return ImageSpec(
        name="registry:2",
        files={"usr/bin/docker-registry": REGISTRY, **shared_libs(REGISTRY)},
        texts={"etc/docker/registry/config.yml": REGISTRY_CONFIG},
        dirs=("tmp", "var/lib/registry"),
        changes=(
            f"ENV {PATH_ENV}",
            "EXPOSE 5000",
            'ENTRYPOINT ["/usr/bin/docker-registry","serve","/etc/docker/registry/config.yml"]',
        ),
    )


def socat_spec() -> ImageSpec:
    """`alpine/socat:latest` stand-in: socat as ENTRYPOINT, busybox for sh/nc/sleep."""
    return ImageSpec(
        name="alpine/socat:latest",
        files={"usr/bin/socat": SOCAT, "bin/busybox": BUSYBOX, **shared_libs(SOCAT)},
        symlinks=_busybox_links(),
        texts=dict(_ETC),
        changes=(f"ENV {PATH_ENV}", 'ENTRYPOINT ["socat"]'),
    )


def socat18_spec() -> ImageSpec:
    """`kcilab/socat18:latest`: alpine/socat's socat 1.8 (from the next Debian release, with that
    release's libc and loader, unpacked by tests/lab/socat18.py), socat as ENTRYPOINT, busybox for sh."""
    return ImageSpec(
        name="kcilab/socat18:latest",
        files={"bin/busybox": BUSYBOX, **socat18.runtime_files()},
        symlinks=_busybox_links(),
        texts=dict(_ETC),
        changes=(f"ENV {PATH_ENV}", 'ENTRYPOINT ["socat"]'),
    )


# busybox `nc` (Debian busybox-static 1.35, the small nc.c; usage "nc [-iN] [-wN] [-l]
# [-p PORT] [-f FILE|IPADDR PORT] [-e PROG]"), measured in this lab with
# `docker exec -i`/`docker run -i --network host` against the half-closing echo service:
# - `nc HOST PORT` relays stdin -> socket and socket -> stdout; 127.0.0.1, ::1 and names
#   from /etc/hosts (localhost) work; 4 MiB round-trips byte-exact.
# - stdin EOF: nc does shutdown(SHUT_WR) on the socket (the server sees EOF) and keeps
#   reading; it does NOT exit on stdin EOF alone. It exits 0 when the socket reaches EOF.
#   So client -> server half-close works through nc.
# - socket EOF first (server half-closes or closes): nc exits 0 at once, closing the whole
#   socket, even if stdin is still open; stdin arriving later is never sent. So a server's
#   half-close turns into a full close: server -> client half-close does NOT work through nc.
# - connection refused: "nc: can't connect to remote host (127.0.0.1): Connection refused"
#   on stderr, exit 1, nothing on stdout.
# - no -q/-N/-d options; -w is only a connect timeout.
def busybox_spec() -> ImageSpec:
    """`kcilab/busybox:latest`: busybox-static only, so `nc` is there and socat is not."""
    return ImageSpec(
        name="kcilab/busybox:latest",
        files={"bin/busybox": BUSYBOX},
        symlinks=_busybox_links(),
        texts=dict(_ETC),
        changes=(f"ENV {PATH_ENV}", 'CMD ["sh"]'),
    )


def _python_stdlib() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(PYTHON_LIB.rglob("*")):
        rel = path.relative_to(PYTHON_LIB)
        if path.is_file() and not _PYTHON_SKIP.intersection(rel.parts) and not rel.parts[0].startswith("config-"):
            files[f"usr/lib/python3.11/{rel}"] = path
    return files


def python_spec() -> ImageSpec:
    """`kcilab/python:latest`, a `python:3-alpine` stand-in: busybox for sh and sleep, and python3
    (Debian's, with its libraries and standard library). The docker transport's fast relay runs
    on it (tunneld/docker/helper/relay.py)."""
    return ImageSpec(
        name="kcilab/python:latest",
        files={"bin/busybox": BUSYBOX, "usr/bin/python3.11": PYTHON, **shared_libs(PYTHON), **_python_stdlib()},
        symlinks={**_busybox_links(), "usr/bin/python3": "python3.11"},
        texts=dict(_ETC),
        changes=(f"ENV {PATH_ENV}", 'CMD ["python3"]'),
    )


def write_rootfs(spec: ImageSpec, out: IO[bytes]) -> None:
    """Stream the image's root filesystem as an uncompressed tar to `out`, all owned by root."""

    def info(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.size = kind, mode, size
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        return ti

    with tarfile.open(fileobj=out, mode="w|") as tar:
        parents: set[str] = set()
        entries = [*spec.files, *spec.symlinks, *spec.texts, *(d + "/x" for d in spec.dirs)]
        for entry in entries:
            parts = entry.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                parents.add("/".join(parts[:i]))
        for d in sorted(parents):
            mode = 0o1777 if d == "tmp" else 0o700 if d == "root" else 0o755
            tar.addfile(info(d, tarfile.DIRTYPE, mode))
        for dest, src in sorted(spec.files.items()):
            # Dereference: ldd names symlinks (libc.so.6 -> libc-2.36.so on some systems).
            real = src.resolve()
            with real.open("rb") as f:
                tar.addfile(info(dest, tarfile.REGTYPE, real.stat().st_mode & 0o7777, real.stat().st_size), f)
        for dest, target in sorted(spec.symlinks.items()):
            ti = info(dest, tarfile.SYMTYPE, 0o777)
            ti.linkname = target
            tar.addfile(ti)
        for dest, text in sorted(spec.texts.items()):
            data = text.encode()
            tar.addfile(info(dest, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
