"""The cipher order offered when the ssh config names none, and that a ``Ciphers`` line still wins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.lab.lab import LabInfo
from tests.ssh.test_transport import TIMEOUTS, settings
from tunneld.ssh.client import open_connection
from tunneld.ssh.target import default_ciphers, make_plan

pytestmark = [pytest.mark.timeout(60)]

X86 = "processor\t: 0\nflags\t\t: fpu vme sse2 ssse3 aes avx avx2\n"
X86_NO_AES = "processor\t: 0\nflags\t\t: fpu vme sse2 ssse3 avx\n"
ARM64 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n"


def test_aes_gcm_first_only_where_the_cpu_has_aes_instructions() -> None:
    assert default_ciphers(X86)[0] == "aes128-gcm@openssh.com"
    assert default_ciphers(ARM64)[0] == "aes128-gcm@openssh.com"
    assert default_ciphers(X86_NO_AES)[0] == "chacha20-poly1305@openssh.com"
    assert default_ciphers("")[0] == "chacha20-poly1305@openssh.com"
    # The same set either way: only the order changes, and the server still picks from it.
    assert sorted(default_ciphers(X86)) == sorted(default_ciphers(X86_NO_AES))


def test_the_ssh_configs_ciphers_win(lab: LabInfo, tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(f"Host {lab.ssh_host}\n    Ciphers aes256-ctr\n")
    plan = make_plan(settings(lab, config_file=str(config)), TIMEOUTS)
    assert "encryption_algs" not in plan.kwargs  # asyncssh applies the config's Ciphers itself
    assert make_plan(settings(lab), TIMEOUTS).kwargs["encryption_algs"] == list(default_ciphers())


@pytest.mark.anyio
async def test_the_server_picks_from_the_offer(lab: LabInfo) -> None:
    conn = await open_connection(settings(lab, config_file=os.devnull), TIMEOUTS)
    try:
        assert conn.describe()["cipher"] == default_ciphers()[0]  # OpenSSH takes the client's first it supports
    finally:
        await conn.aclose()
