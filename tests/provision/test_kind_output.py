"""`kind create cluster`'s output as `up` passes it on: line by line, and, while kind says nothing
(pulling its node image: one line, then minutes of silence), that it still works and on what.

kind here is a shell script printing what real kind prints on a pipe (` • STEP  ...` when a step
starts, ` ✓ STEP` when it ends) with a pause where the pull would be: a real process, real pipes."""

from __future__ import annotations

import os
import re
from pathlib import Path

import anyio
import pytest

from provision.kind import KindCli
from provision.spec import ClusterSpec
from tests.provision.support import FAST

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

ENSURING = "• Ensuring node image (kindest/node:v1.29.2) 🖼  ..."


def script(tmp_path: Path, body: str) -> str:
    exe = tmp_path / "kind"
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(0o755)
    return str(exe)


async def create(exe: str, tmp_path: Path, quiet: float) -> list[str]:
    lines: list[str] = []
    with anyio.fail_after(20):
        await KindCli(exe, FAST, dict(os.environ), quiet=quiet).create(
            ClusterSpec(name="kc"), "kind: Cluster\n", str(tmp_path / "kubeconfig"), lines.append)
    return lines


async def test_a_silent_kind_is_said_to_still_work(tmp_path: Path) -> None:
    exe = script(tmp_path, f"""echo 'Creating cluster "kc" ...' >&2
echo ' {ENSURING}' >&2
sleep 1.5
echo ' ✓ Ensuring node image (kindest/node:v1.29.2) 🖼' >&2""")
    lines = await create(exe, tmp_path, quiet=0.4)
    assert lines[:2] == ['kind: Creating cluster "kc" ...', f"kind: {ENSURING}"]
    assert lines[-1] == "kind: ✓ Ensuring node image (kindest/node:v1.29.2) 🖼"
    busy = lines[2:-1]
    # 1.5 s of silence, a reminder every 0.4 s of it: 3 (fewer only on a machine too busy to keep time).
    assert 1 <= len(busy) <= 3, lines
    for line in busy:
        assert re.fullmatch(rf"kind: still working, \d+s so far; last: {re.escape(ENSURING)}", line), line


async def test_a_kind_that_keeps_talking_gets_no_reminder(tmp_path: Path) -> None:
    steps = "\n".join(f"echo ' ✓ step {i}' >&2; sleep 0.1" for i in range(12))
    lines = await create(script(tmp_path, steps), tmp_path, quiet=1.0)
    assert lines == [f"kind: ✓ step {i}" for i in range(12)]
