"""Rows that need the lab (``python3 -m tests.lab up``): ``--via ssh``, the socat jujitsu, ``--via docker``.

The targets run inside the lab's namespace, on its 127.0.0.1, where only a transport reaches them.
How each forwarder is started belongs to the modules that benchmark those transports in depth
(bench/ssh_vs_openssh.py, bench/docker_vs_jujitsu.py); this module only borrows their
context managers, so a row here is exactly what those reports measure. A row whose module or
hook is missing, or a lab that is not up, is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.metrics import Result
from bench.proxies import ProxyUnavailable, Running, Targets, targets

ROWS = {
    "openssh-lab": "OpenSSH ssh -L, lab sshd",
    "ssh": "kci-tunneld --via ssh",
    "jujitsu": "socat jujitsu (docker exec per connection)",
    "docker": "kci-tunneld --via docker",
}
# The SSH rows: OpenSSH and kci-tunneld through the lab's own sshd, with the same cipher pinned and the
# same targets, so their ratio compares the forwarders and nothing else (the `openssh` row of
# bench/run.py runs its own sshd on loopback, with targets outside the namespace).
_SSH_ROWS = ("openssh-lab", "ssh")
# The ciphers the SSH rows can pin: OpenSSH's default first (the default here), then the one kci-tunneld
# offers first on a CPU with AES instructions (docs/ssh-transport.md, "Ciphers").
SSH_CIPHERS = ("chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
# (module, context manager) each row borrows: called as cm(lab, targets, workdir) -> (iperf, echo, pids).
_HOOKS = {
    "openssh-lab": ("bench.ssh_vs_openssh", "openssh_forward"),
    "ssh": ("bench.ssh_vs_openssh", "tunneld_forward"),
    "jujitsu": ("bench.docker_vs_jujitsu", "jujitsu_forward"),
    "docker": ("bench.docker_vs_jujitsu", "tunneld_forward"),
}


def _lab(mode: str) -> Any:
    """The lab's LabInfo.

    :raises ProxyUnavailable: when it is not up (and ``mode`` does not ask to bring it up).
    """
    if mode == "skip":
        raise ProxyUnavailable("--lab skip")
    if os.geteuid() != 0:
        raise ProxyUnavailable("the lab needs root")
    try:
        from tests.lab import lab
    except ImportError as e:
        raise ProxyUnavailable(f"tests.lab is not importable: {e}") from None
    if mode == "up":
        try:
            return lab.up()
        except Exception as e:  # LabError and whatever a half-built lab raises: this row just skips
            raise ProxyUnavailable(f"the lab would not come up: {e}") from None
    info = lab.info()
    if not (Path(info.netns_path).exists() and Path(info.docker_sock).exists() and Path(info.ssh_config).exists()):
        raise ProxyUnavailable("the lab is not up: run `python3 -m tests.lab up` first, or pass --lab up")
    return info


@contextlib.contextmanager
def _row(key: str, lab: Any, t: Targets, workdir: Path, cipher: str) -> Iterator[Running]:
    module_name, hook = _HOOKS[key]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ProxyUnavailable(f"{module_name} is not available: {e}") from None
    cm = getattr(module, hook, None)
    if cm is None:
        raise ProxyUnavailable(f"{module_name} has no {hook}() to start this forwarder")
    d = workdir / key
    d.mkdir(exist_ok=True)
    try:
        ctx = _ssh_forward(module, cm, lab, t, d, cipher) if key in _SSH_ROWS else cm(lab, t.iperf, t.echo, d)
    except TypeError as e:  # their signature moved on: say so rather than guess
        raise ProxyUnavailable(f"{module_name}.{hook}() does not take the arguments this suite passes: {e}") from None
    try:
        with ctx as (p_iperf, p_echo, pids):
            yield Running(ROWS[key], {"iperf": int(p_iperf), "echo": int(p_echo)},
                          list(pids) if isinstance(pids, (list, tuple)) else [int(pids)],
                          note=f"cipher {cipher.split('@')[0]}" if key in _SSH_ROWS else "")
    except ProxyUnavailable:
        raise
    except Exception as e:  # their start-up failed: report it in the table, keep the run going
        raise ProxyUnavailable(f"{module_name}.{hook}: {type(e).__name__}: {e}") from None


def _ssh_forward(module: Any, cm: Callable[..., Any], lab: Any, t: Targets, d: Path, cipher: str) -> Any:
    """bench/ssh_vs_openssh.py's tunneld_forward(config, alias, iperf_port, echo_port, workdir, loop, relay,
    cipher) or openssh_forward(config, alias, iperf_port, echo_port): the daemon on uvloop, its default relay,
    ``cipher`` pinned; OpenSSH with the same config."""
    params = inspect.signature(cm).parameters
    if "workdir" not in params:  # openssh_forward: the same pinned config, nothing else to choose
        cipher_cfg = module.cipher_config(Path(lab.ssh_config), cipher, lab.ssh_alias, d / "ssh_config")
        return cm(cipher_cfg, lab.ssh_alias, t.iperf, t.echo)
    config = Path(lab.ssh_config)
    extra: dict[str, str] = {}
    if "cipher" in params:
        config = module.cipher_config(config, cipher, lab.ssh_alias, d / "ssh_config")
        extra["cipher"] = cipher
    if "loop" in params:
        extra["loop"] = "auto"
    if "relay" in params:
        extra["relay"] = ""
    return cm(config, lab.ssh_alias, t.iperf, t.echo, d, **extra)


def run(rows: Sequence[str], mode: str, workdir: Path, results: dict[str, Result],
        measure: Callable[[list[Running]], None], *, ssh_cipher: str = SSH_CIPHERS[0]) -> list[tuple[str, str]]:
    """Measure the lab rows (the SSH ones with ``ssh_cipher`` on both sides); return (row, reason) for each
    one skipped."""
    try:
        lab = _lab(mode)
    except ProxyUnavailable as e:
        return [(ROWS[k], str(e)) for k in rows]
    skipped: list[tuple[str, str]] = []
    if str(Path(__file__).resolve().parent.parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    with targets(workdir, netns=lab.netns) as t, contextlib.ExitStack() as stack:
        running = []
        for key in rows:
            try:
                running.append(stack.enter_context(_row(key, lab, t, workdir, ssh_cipher)))
            except ProxyUnavailable as e:
                skipped.append((ROWS[key], str(e)))
        for r in running:
            results[r.name] = Result(r.name, note=r.note)
        if running:
            measure(running)
    return skipped
