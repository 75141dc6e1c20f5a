"""What a proxy costs, read from /proc: CPU seconds and memory of a process and its descendants.

A proxy may be one process (kci-tunneld, ssh) or a tree (socat forks one child per connection,
sshd one per session), so every reading covers the whole tree. Children that exited and were
reaped have their CPU folded into the parent's cutime/cstime, which keeps before/after deltas
right even when connection processes come and go during a run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _stat_fields(pid: int) -> list[str]:
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()  # [0] = state, [1] = ppid, [11] = utime ...


def _trees(roots: Iterable[int]) -> Iterator[int]:
    """Every process in the trees under ``roots``, once."""
    seen: set[int] = set()
    for root in roots:
        for pid in descendants(root):
            if pid not in seen:
                seen.add(pid)
                yield pid


def cpu_seconds(roots: Iterable[int]) -> float:
    """User + system CPU of the trees under ``roots``, reaped children included."""
    total = 0
    for pid in _trees(roots):
        try:
            f = _stat_fields(pid)
        except OSError:
            continue
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])  # utime stime cutime cstime
    return total / _TICK


def memory_mib(roots: Iterable[int]) -> tuple[float, float, int]:
    """(VmRSS sum, Pss sum, process count) over the trees under ``roots``, in MiB.

    For one process RSS is the honest figure; for a tree of forks the RSS sum counts shared pages
    once per process, so PSS (each shared page divided among its users) is given beside it.
    """
    rss = pss = 0
    count = 0
    for pid in _trees(roots):
        try:
            rss += _kib(Path(f"/proc/{pid}/status").read_text(), "VmRSS:")
            pss += _kib(Path(f"/proc/{pid}/smaps_rollup").read_text(), "Pss:")
        except OSError:
            continue
        count += 1
    return rss / 1024, pss / 1024, count


def _kib(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0
