"""Small process helpers the CLI commands share: is a daemon alive, its log's tail, the error to show."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tunneld.errors import TunneldError


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie child of ours counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def log_size(log_file: str | Path) -> int:
    """Where a log ends now (0 when it does not exist yet): a new daemon's lines start there."""
    try:
        return os.path.getsize(log_file)
    except OSError:
        return 0


def log_tail(log_file: str | None, lines: int = 15, *, start: int = 0) -> str:
    """The last lines of a daemon's log from byte ``start`` on (the log is appended to by every
    daemon that used it: an earlier daemon's lines would only mislead), indented, naming the file."""
    if not log_file:
        return ""
    try:
        with open(log_file, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace").splitlines()
    except OSError:
        return f"  (log {log_file} unreadable)"
    return "\n".join("  " + line for line in text[-lines:]) + f"\n  (log: {log_file})"


def first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """Unwrap a task group's errors to the one a person should see: the first TunneldError."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            inner = first_error(exc)
            if inner is not exc:
                return inner
        elif isinstance(exc, TunneldError):
            return exc
    return group
