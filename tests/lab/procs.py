"""Process bookkeeping for the lab: pid files, identity checks, stopping by pid.

The lab must stop only what it started. A pid file alone is not proof: after a killed
run the pid may have been reused by an unrelated process, so every pid read here is
checked against a *marker* (a lab path that appears on the process's command line)
before it is trusted or signalled. Processes are never looked up by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path


def cmdline(pid: int) -> bytes:
    """Return the raw NUL-separated command line of `pid`, or b"" if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def is_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie.

    Daemons started from a long-lived process (the pytest session) are its children:
    when one dies it stays a zombie until reaped, so reap it here if it is ours and
    count zombies as dead.
    """
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # Field 3 is the state; the command name in field 2 may contain spaces/parens.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def read_pidfile(pidfile: Path, marker: str) -> int | None:
    """Return the pid in `pidfile` if that process is alive and is ours (marker on its cmdline)."""
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid <= 1 or not is_alive(pid) or marker.encode() not in cmdline(pid):
        return None
    return pid


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until every pid has exited; return those still alive at the deadline."""
    pending = list(pids)
    deadline = time.monotonic() + timeout
    while pending:
        pending = [p for p in pending if is_alive(p)]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return pending


def terminate(pids: Iterable[int], timeout: float) -> None:
    """SIGTERM `pids`, give them `timeout` seconds, then SIGKILL the rest."""
    pids = [p for p in pids if p > 1]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    left = wait_gone(pids, timeout)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_gone(left, 5.0)


def stop_pidfile(pidfile: Path, marker: str, timeout: float) -> int | None:
    """Stop the process named by `pidfile` (if it is ours) and remove the file; return its pid."""
    pid = read_pidfile(pidfile, marker)
    if pid is not None:
        terminate([pid], timeout)
    pidfile.unlink(missing_ok=True)
    return pid


def netns_inode(netns_path: Path) -> int | None:
    """Inode of the network namespace bound at `netns_path`, or None if there is none."""
    try:
        return os.stat(netns_path).st_ino
    except OSError:
        return None


def pids_in_netns(inode: int) -> list[int]:
    """Every process whose network namespace is the one with `inode`."""
    want = f"net:[{inode}]"
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry.name}/ns/net") == want:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def descendants(roots: Iterable[int]) -> list[int]:
    """All descendants of `roots` (not the roots), deepest first.

    Container processes live in their own network namespace but are children of a
    containerd shim that lives in the lab's, so ancestry is how they are found.
    """
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[-1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    order: list[int] = []
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            order.append(child)
            stack.append(child)
    return order[::-1]
