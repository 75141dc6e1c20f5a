"""pytest plugin: the session-scoped `lab` fixture (use with `-p tests.lab.fixture`).

The lab is left up after the session: set-up is idempotent and quick to re-check, and a
person debugging a failure wants to poke at the same dockerd/sshd the tests used.
KCI_LAB_TEARDOWN=1 takes it down at the end instead.

If the lab cannot come up (not root, a tool missing, ...) the tests that need it are
skipped with the reason, except in CI (CI=true) or with KCI_REQUIRE_LAB=1, where a
missing lab is a failure: CI must never go green by skipping the real tests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

from tests.lab import socat18
from tests.lab.lab import LabError, LabInfo, down, up
from tests.lab.probes import engine_json

logger = logging.getLogger(__name__)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def lab_required() -> bool:
    """True when a lab that cannot come up must fail the run rather than skip."""
    return _flag("CI") or _flag("KCI_REQUIRE_LAB")


@pytest.fixture(scope="session")
def lab() -> Iterator[LabInfo]:
    """The remote-Docker lab, brought up once per session; see tests/lab/lab.py."""
    try:
        info = up(progress=logger.info)
    except LabError as exc:
        if lab_required():
            pytest.fail(f"the kcilab lab could not come up: {exc}", pytrace=False)
        pytest.skip(f"kcilab lab not available: {exc}")
    yield info
    if _flag("KCI_LAB_TEARDOWN"):
        down(progress=logger.info)


def socat18_image(lab: LabInfo) -> str:
    """The lab's socat 1.8 image; without it the calling test fails in CI and skips elsewhere, quoting
    why `up` could not build it."""
    if engine_json(f"/images/{lab.socat18_image}/json") is not None:
        return lab.socat18_image
    why = socat18.failure() or "the lab's `up` did not build it"
    message = f"{lab.socat18_image} is not in the lab (socat 1.8 from Debian {socat18.SUITE}): {why}"
    if lab_required():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
