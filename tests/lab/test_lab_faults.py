"""The lab's fault helpers work and leave the lab as it was.

Disruptive, hence a module of their own: restarting dockerd stops every container in the
lab (restart=always brings only the registry back), so run this module alone or last if
other tests keep session-scoped containers in the lab. The sshd test keeps established
SSH sessions (sessions=False) for the same reason.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.lab import lab as labmod
from tests.lab.lab import LabInfo

pytestmark = pytest.mark.timeout(60)

CALL_TIMEOUT = 20.0


def ssh_true(lab: LabInfo) -> subprocess.CompletedProcess[bytes]:
    argv = ["ssh", "-F", str(lab.ssh_config), lab.ssh_alias, "true"]
    return subprocess.run(argv, capture_output=True, timeout=CALL_TIMEOUT)


def test_stop_and_start_sshd(lab: LabInfo) -> None:
    labmod.stop_sshd(sessions=False)
    try:
        refused = ssh_true(lab)
        assert refused.returncode == 255
        assert b"Connection refused" in refused.stderr
    finally:
        labmod.start_sshd()
    assert ssh_true(lab).returncode == 0


def test_restart_dockerd_brings_the_registry_back(lab: LabInfo) -> None:
    before = int(lab.dockerd_pidfile.read_text())
    after = labmod.restart_dockerd()  # returns once the registry answers again
    assert after != before
    assert labmod.ping_unix()
    assert labmod.ping_tls()
    url = f"http://{lab.registry_addr}/v2/"
    proc = labmod.ns_exec(["curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", url])
    assert (proc.returncode, proc.stdout) == (0, b"200"), proc.stderr
