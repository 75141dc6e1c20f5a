"""socat 1.8 for the lab: the next Debian release's packages, downloaded and unpacked, never installed.

The public `alpine/socat:latest` ships socat 1.8, and the docker transport's shell relay reads socat's
`-d -d` messages, which changed between 1.7 (this machine's) and 1.8. So `up` fetches the next
release's socat and every library it links, with that release's own libc and loader (its socat
needs glibc 2.38; this machine has 2.36), and `images.socat18_spec` puts them in an image of their
own, where they are the root filesystem.

How: apt with a private configuration (its own sources list, lists and package cache under
SOCAT18_DIR; this machine's apt state is not touched), the mirror this machine already uses for
Debian, `apt-get download`, `dpkg-deb -x`, then the unpacked loader's `--list` must resolve every
library inside the unpacked tree and the unpacked socat must say 1.8. The result stays in
SOCAT18_DIR and is reused; a failed download is reported by `up` and recorded for the tests to
quote, and `up` carries on without that image. It is not tried again for RETRY_AFTER (a machine that
cannot reach the mirror would otherwise wait out apt's timeouts on every `up`), unless
KCI_LAB_RETRY_DOWNLOADS=1 asks for it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from .commands import run
from .layout import DOWNLOAD_TIMEOUT, INFO, SOCAT18_DIR, LabError

SUITE = "trixie"
# socat's Depends (libc6, libssl3t64, libwrap0) and what libssl links (libzstd1, zlib1g); the check
# after unpacking names any library still missing.
PACKAGES = ("socat", "libc6", "libssl3t64", "libwrap0", "libzstd1", "zlib1g")
VERSION_PREFIX = "1.8."

ROOT = SOCAT18_DIR / "root"  # the packages unpacked
DONE = SOCAT18_DIR / "done.json"  # the recipe and the version it gave; ROOT is complete when it matches
FAILED = SOCAT18_DIR / "failed"  # why the last attempt failed
RETRY_AFTER = 3600.0  # seconds after a failed download before `up` tries again
RETRY_ENV = "KCI_LAB_RETRY_DOWNLOADS"
_APT = SOCAT18_DIR / "apt"
_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


def _recipe() -> dict[str, object]:
    return {"suite": SUITE, "packages": list(PACKAGES)}


def version() -> str | None:
    """The unpacked socat's version if the cached tree is complete and from the current recipe."""
    try:
        done = json.loads(DONE.read_text())
    except (OSError, ValueError):
        return None
    if done.get("recipe") != _recipe() or not (ROOT / "usr/bin/socat").is_file():
        return None
    v = done.get("version")
    return v if isinstance(v, str) else None


def failure() -> str | None:
    """Why the last download failed, if it did."""
    try:
        return FAILED.read_text().strip() or None
    except OSError:
        return None


def _failed_age() -> float | None:
    """Seconds since the last failed download was recorded, if one was."""
    try:
        return max(0.0, time.time() - FAILED.stat().st_mtime)
    except OSError:
        return None


def _codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise LabError("/etc/os-release names no VERSION_CODENAME")


def _mirror() -> str:
    """The URI this machine's apt fetches its own Debian release's main component from."""
    codename = _codename()
    fmt = "$(REPO_URI) $(RELEASE) $(COMPONENT) $(TARGET_OF)"
    out = run(["apt-get", "indextargets", "--format", fmt], timeout=60).stdout.decode()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[1:] == [codename, "main", "deb"]:
            return parts[0]
    raise LabError(f"this machine's apt sources have no '{codename} main' to take the Debian mirror from")


def _apt(*args: str, cwd: Path | None = None) -> None:
    """apt-get with a configuration of its own: nothing of this machine's apt state is read or written.

    :raises LabError: quoting apt's own complaint.
    """
    options = {
        "Dir::Etc::sourcelist": _APT / "sources.list",
        "Dir::Etc::sourceparts": _APT / "sources.list.d",
        "Dir::Etc::preferences": _APT / "preferences",
        "Dir::Etc::preferencesparts": _APT / "preferences.d",
        "Dir::State": _APT / "state",
        "Dir::State::status": _APT / "status",
        "Dir::Cache": _APT / "cache",
        "APT::Sandbox::User": "root",  # the download lands in a root-only directory
        "Acquire::Retries": "2",
        "Acquire::http::Timeout": "30",
    }
    argv = ["apt-get", "-q"]
    for key, value in options.items():
        argv += ["-o", f"{key}={value}"]
    proc = run([*argv, *args], timeout=DOWNLOAD_TIMEOUT, cwd=cwd, check=False)
    if proc.returncode != 0:
        said = [line for line in proc.stderr.decode(errors="replace").splitlines() if line.startswith(("E:", "W:"))]
        raise LabError(f"apt-get {args[0]} failed (exit {proc.returncode}): {' '.join(said) or 'no reason given'}")


def _download(dest: Path) -> None:
    shutil.rmtree(_APT, ignore_errors=True)
    for d in ("sources.list.d", "preferences.d", "state/lists/partial", "cache/archives/partial"):
        (_APT / d).mkdir(parents=True)
    (_APT / "status").write_text("")
    signed = f" [signed-by={_KEYRING}]" if _KEYRING.exists() else ""
    (_APT / "sources.list").write_text(f"deb{signed} {_mirror()} {SUITE} main\n")
    _apt("update")
    dest.mkdir(parents=True)
    _apt("download", *PACKAGES, cwd=dest)  # it downloads to the working directory


def _loader(root: Path) -> Path:
    found = sorted(root.glob("usr/lib/*/ld-linux*.so.*")) or sorted(root.glob("lib*/ld-linux*.so.*"))
    if not found:
        raise LabError(f"no dynamic loader among the unpacked packages in {root}")
    return found[0]


def _loader_argv(root: Path) -> list[str]:
    loader = _loader(root)
    return [str(loader), "--library-path", str(loader.parent), "--argv0", "socat"]


def runtime_files(root: Path = ROOT) -> dict[str, Path]:
    """socat and what the unpacked loader resolves for it (itself at the path socat asks for), keyed
    by path in the image.

    :raises LabError: if a library is missing or would come from outside ``root``.
    """
    socat = root / "usr/bin/socat"
    out = run([*_loader_argv(root)[:3], "--list", str(socat)], timeout=30, check=False)
    text = out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")
    files = {"usr/bin/socat": socat}
    for line in text.splitlines():
        # "libc.so.6 => /ROOT/usr/lib/x86_64-linux-gnu/libc.so.6 (0x...)", and for the loader
        # "/lib64/ld-linux-x86-64.so.2 => /ROOT/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 (0x...)"
        m = re.match(r"\s*(\S+) => (.*?)(?: \(0x[0-9a-f]+\))?$", line)
        if m is None:
            continue
        name, path = m.groups()
        resolved = Path(path)
        if path == "not found" or not resolved.is_relative_to(root):
            raise LabError(f"socat 1.8 needs {name}, which the packages {', '.join(PACKAGES)} do not provide"
                           f" ({path}); add its package to PACKAGES in {__name__}")
        dest = name.lstrip("/") if name.startswith("/") else str(resolved.relative_to(root))
        files[dest] = resolved
    if out.returncode != 0 or len(files) < 3:
        raise LabError(f"the unpacked loader cannot list socat 1.8's libraries: {text.strip()}")
    return files


def _unpack(debs: Path, root: Path) -> str:
    for deb in sorted(debs.glob("*.deb")):
        run(["dpkg-deb", "-x", str(deb), str(root)], timeout=120)
    runtime_files(root)
    out = run([*_loader_argv(root), str(root / "usr/bin/socat"), "-V"], timeout=30)
    m = re.search(r"socat version (\S+)", out.stdout.decode(errors="replace"))
    if m is None or not m.group(1).startswith(VERSION_PREFIX):
        raise LabError(f"{SUITE}'s socat is {m.group(1) if m else 'of no version'}, not {VERSION_PREFIX}x")
    return m.group(1)


def ensure() -> str:
    """`up` step: socat 1.8 unpacked under SOCAT18_DIR (downloaded once). Never raises: without the
    download the lab runs on, says so, and the tests that need socat 1.8 quote the reason."""
    have = version()
    if have is not None:
        FAILED.unlink(missing_ok=True)
        return f"socat {have} cached in {ROOT}"
    why, age = failure(), _failed_age()
    if why is not None and age is not None and age < RETRY_AFTER and os.environ.get(RETRY_ENV) != "1":
        return (f"NOT AVAILABLE: the download failed {age / 60:.0f} min ago ({why}); tried again "
                f"{RETRY_AFTER / 60:.0f} min after a failure, or now with {RETRY_ENV}=1; "
                f"{INFO.socat18_image} is not built")
    SOCAT18_DIR.mkdir(parents=True, exist_ok=True)
    work = SOCAT18_DIR / "new"
    shutil.rmtree(work, ignore_errors=True)
    try:
        _download(work / "debs")
        got = _unpack(work / "debs", work / "root")
    except LabError as exc:
        FAILED.write_text(f"{exc}\n")
        return (f"NOT AVAILABLE: could not get socat 1.8 from Debian {SUITE}: {exc}; "
                f"{INFO.socat18_image} is not built and the socat 1.8 tests fail in CI (skip elsewhere)")
    finally:
        shutil.rmtree(_APT, ignore_errors=True)
    DONE.unlink(missing_ok=True)
    shutil.rmtree(ROOT, ignore_errors=True)
    os.replace(work / "root", ROOT)
    shutil.rmtree(work, ignore_errors=True)
    DONE.write_text(json.dumps({"recipe": _recipe(), "version": got}) + "\n")
    FAILED.unlink(missing_ok=True)
    return f"socat {got} downloaded from Debian {SUITE} to {ROOT}"
