"""Running things for the lab: one-shot commands, commands inside the namespace, daemons.

Every call has a deadline, and every failure becomes a `LabError` that quotes the command.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .layout import CLI_TIMEOUT, INFO, LOCK_FILE, NETNS_PATH, RUN_DIR, LabError

# Daemons must find runc, containerd, docker-proxy and iptables even when started from a
# minimal environment (CI), so the sbin directories are always on PATH.
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def env(**extra: str) -> dict[str, str]:
    """This process's environment, without DOCKER_* (a caller's DOCKER_HOST must not leak in)."""
    result = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_") or k == "DOCKER_CONFIG"}
    result["PATH"] = f"{os.environ.get('PATH', '')}:{_SBIN_PATH}".lstrip(":")
    result.update(extra)
    return result


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = CLI_TIMEOUT,
    input: bytes | None = None,
    environ: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` to completion and capture its output.

    :raises LabError: if it is missing, times out, or (with `check`) exits non-zero.
    """
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout, env=environ or env(),
                              cwd=cwd)
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} not found: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip() or proc.stdout.decode(errors="replace").strip()
        raise LabError(f"{' '.join(argv)} failed (exit {proc.returncode}): {err}")
    return proc


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run iproute2's `ip`."""
    return run(["ip", *args], check=check, timeout=30)


def ns_argv(argv: Sequence[str]) -> list[str]:
    """`argv` prefixed so that it runs inside the lab namespace (for Popen and friends).

    nsenter, not `ip netns exec`: the latter remounts /sys, and dockerd then dies with
    "Devices cgroup isn't mounted". With only --net, nsenter execs: the pid is the command's.
    """
    return ["nsenter", f"--net={NETNS_PATH}", *argv]


def ns_exec(
    argv: Sequence[str], *, input: bytes | None = None, timeout: float = 30.0, check: bool = False
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` inside the lab namespace and capture its output.

    :raises LabError: on timeout, or on a non-zero exit if `check`.
    """
    return run(ns_argv(argv), input=input, timeout=timeout, check=check)


def docker(
    *args: str, tls: bool = False, input: str | None = None, timeout: float = CLI_TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the docker CLI against the lab daemon (unix socket, or TCP+TLS if `tls`).

    :raises LabError: on timeout, or on a non-zero exit if `check`.
    """
    proc = run(
        ["docker", *args],
        input=None if input is None else input.encode(),
        timeout=timeout,
        check=check,
        environ=env(**INFO.docker_env(tls)),
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    )


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a daemon inside the namespace, detached from us (own session, no stdin, log file)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as f:
        f.write(f"=== kcilab: starting {argv[0]} at {time.strftime('%F %T')} ===\n".encode())
        return subprocess.Popen(
            ns_argv(argv),
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env(),
            cwd="/",
        )


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, indented for an error message."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return "\n    ".join([f"last lines of {path}:", *text])


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Poll `check` until true; fail early if `proc` exits, and quote `log` on failure.

    :raises LabError: at the deadline or when `proc` exits.
    """
    deadline = time.monotonic() + timeout
    while not check():
        tail = f"\n    {log_tail(log)}" if log else ""
        if proc is not None and proc.poll() is not None:
            raise LabError(f"{what}: process exited with {proc.returncode}{tail}")
        if time.monotonic() >= deadline:
            raise LabError(f"{what}: not ready after {timeout:.0f} s{tail}")
        time.sleep(0.1)


def write_if_changed(path: Path, text: str, mode: int = 0o644) -> bool:
    """Write `text` atomically unless the file already holds it; True if it was written."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Hold the lab lock: up/down from the CLI and from pytest (maybe several) must not interleave."""
    RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    with LOCK_FILE.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
