"""Fixtures for the daemon tests: a NOTIFY_SOCKET listener, as a path and as an abstract name."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.support import NotifyListener


@pytest.fixture(params=["path", "abstract"])
def notify(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifyListener]:
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        listener = NotifyListener(path, path)
    else:
        name = f"kci-tunneld-test-{os.getpid()}-{secrets.token_hex(4)}"
        listener = NotifyListener("\0" + name, "@" + name)  # systemd spells abstract names with '@'
    yield listener
    listener.close()
