"""Where and how to connect over SSH, and why a connection was refused: the settings resolved
through ~/.ssh/config into asyncssh options (``make_plan``), known_hosts loading, and the errors
that explain a refused host key or a failed authentication in terms a person can act on.

Nothing here opens a connection or a channel: that is tunneld/ssh/client.py. Only tunneld/ssh/
imports asyncssh.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from tunneld.config import SshSettings, Timeouts, format_host
from tunneld.errors import TransportError

# Known-hosts files OpenSSH reads when neither the settings nor the ssh config name any.
_DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2", "/etc/ssh/ssh_known_hosts")
_DEFAULT_KEY_NAMES = ("id_ed25519", "id_ecdsa", "id_rsa", "id_ed25519_sk", "id_ecdsa_sk", "id_dsa")
# Cipher preference when the ssh config names none (the server still picks from it). asyncssh (like
# OpenSSH) puts chacha20-poly1305 first, but through asyncssh it costs far more than AES-GCM where
# OpenSSL runs AES on the CPU's AES instructions: two OpenSSL cipher contexts per packet (2.5-9 us
# each here), against ~1 us for a small AES-GCM packet; per byte ~1.4x the CPU (docs/performance.md,
# "## SSH"). Without AES instructions, AES is the slow one and OpenSSH's order stands.
_CIPHERS_AES_FIRST = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                      "aes256-ctr", "aes192-ctr", "aes128-ctr")
_CIPHERS_CHACHA_FIRST = ("chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                         "aes256-ctr", "aes192-ctr", "aes128-ctr")


class SshError(TransportError):
    """The SSH connection could not be made; ``definitive`` errors will not heal by retrying."""

    def __init__(self, message: str, *, definitive: bool) -> None:
        super().__init__(message)
        self.definitive = definitive


@dataclass(frozen=True)
class SshTarget:
    """Where the settings lead once the ssh config applied: for messages and status (no secrets)."""

    alias: str  # what the user wrote after ssh://
    host: str  # HostName
    port: int
    user: str
    identities: tuple[str, ...]  # key files offered, in order
    agent: bool  # an ssh-agent is offered too
    known_hosts: tuple[str, ...] | None  # files the host key is checked against; None: not checked

    def __str__(self) -> str:
        where = f"{self.user}@{format_host(self.host)}:{self.port}"
        return where if self.alias == self.host else f"{where} ({self.alias})"


@dataclass(frozen=True)
class Plan:
    target: SshTarget
    kwargs: dict[str, Any]


def _expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path))


def make_plan(settings: SshSettings, timeouts: Timeouts) -> Plan:
    """Turn settings into asyncssh keyword arguments; blocking (reads the config and key files).

    :raises SshError: for a missing config file or an unusable key file (definitive).
    """
    kwargs: dict[str, Any] = {
        "host": settings.host,
        # asyncssh bounds TCP connect + key exchange + authentication together by connect_timeout.
        "connect_timeout": timeouts.connect,
        "login_timeout": timeouts.connect,
        "keepalive_interval": settings.keepalive_interval,
        "keepalive_count_max": settings.keepalive_count_max,
        # Never hand the agent or an X display to the far side: we only open channels.
        "agent_forwarding": False,
        "x11_forwarding": False,
        "request_pty": False,
    }
    if settings.config_file:
        config_file = _expand(settings.config_file)
        if not os.access(config_file, os.R_OK):
            raise SshError(f"ssh config file {config_file} does not exist or is not readable "
                           "(transport.ssh.config_file)", definitive=True)
        kwargs["config"] = [config_file]
    else:
        # As ssh does; spelled out because asyncssh only defaults to it inside connect().
        default = os.path.expanduser("~/.ssh/config")
        kwargs["config"] = [default] if os.access(default, os.R_OK) else []
    if settings.user:
        kwargs["username"] = settings.user
    if settings.port:
        kwargs["port"] = settings.port
    if settings.identity_files:
        keys = [_expand(f) for f in settings.identity_files]
        for key in keys:
            if not os.access(key, os.R_OK):
                raise SshError(f"identity file {key} does not exist or is not readable (-i / identity_files)",
                               definitive=True)
        kwargs["client_keys"] = keys
    try:
        options = asyncssh.SSHClientConnectionOptions(**kwargs)
    except asyncssh.KeyImportError as e:
        raise SshError(f"cannot use an identity file for {settings.host}: {e}; an encrypted key must be loaded "
                       "into ssh-agent (ssh-add) instead", definitive=True) from None
    except (OSError, ValueError) as e:
        raise SshError(f"cannot read the ssh configuration for {settings.host}: {e}", definitive=True) from None
    config = options.config
    if not config.get("Ciphers"):
        kwargs["encryption_algs"] = list(default_ciphers())
    if settings.identity_files:
        identities = tuple(kwargs["client_keys"])
    else:
        configured = [_expand(str(p)) for p in _as_list(config.get("IdentityFile"))]
        defaults = [str(Path("~/.ssh", n).expanduser()) for n in _DEFAULT_KEY_NAMES]
        identities = tuple(p for p in (configured or defaults) if os.path.exists(p))
    known: tuple[str, ...] | None = None
    if settings.check_host_key:
        known = _known_hosts_files(settings, config)
        kwargs["known_hosts"] = _load_known_hosts(known)
    else:
        kwargs["known_hosts"] = None
    target = SshTarget(
        alias=settings.host, host=options.host, port=options.port, user=options.username,
        identities=identities, agent=bool(options.agent_path), known_hosts=known,
    )
    return Plan(target=target, kwargs=kwargs)


def default_ciphers(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The cipher order offered when the ssh config has no ``Ciphers``: AES-GCM first where the CPU
    has AES instructions (the ``aes`` flag in /proc/cpuinfo, x86 and arm64 alike), else chacha20 first."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features") and "aes" in value.split():
            return _CIPHERS_AES_FIRST
    return _CIPHERS_CHACHA_FIRST


def _as_list(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]  # type: ignore[attr-defined]


def _known_hosts_files(settings: SshSettings, config: Any) -> tuple[str, ...]:
    """The files that decide trust, as OpenSSH would pick them (settings > ssh config > defaults)."""
    if settings.known_hosts:
        return (_expand(settings.known_hosts),)
    user = config.get("UserKnownHostsFile")
    glob = config.get("GlobalKnownHostsFile")
    if user is None and glob is None:
        return tuple(_expand(p) for p in _DEFAULT_KNOWN_HOSTS)
    return tuple(_expand(p) for p in _as_list(user) + _as_list(glob))


def _load_known_hosts(files: tuple[str, ...]) -> Any:
    """Read the files that exist into one trust list (none at all means nothing is trusted).

    Passing asyncssh the parsed object rather than paths keeps it from falling back to
    ~/.ssh/known_hosts when the configured file is missing.
    """
    text = []
    for f in files:
        try:
            text.append(Path(f).read_text(encoding="utf-8", errors="replace"))
        except FileNotFoundError:
            continue
        except OSError as e:
            raise SshError(f"cannot read known_hosts file {f}: {e.strerror or e}", definitive=True) from None
    try:
        return asyncssh.import_known_hosts("\n".join(text))
    except ValueError as e:
        raise SshError(f"cannot parse known_hosts ({', '.join(files)}): {e}", definitive=True) from None


def host_key_error(target: SshTarget, offered: str | None) -> SshError:
    files = target.known_hosts or ()
    existing = [f for f in files if os.path.exists(f)]
    key = f" ({offered})" if offered else ""
    where = format_host(target.host) if target.port == 22 else f"[{target.host}]:{target.port}"
    add_to = existing[0] if existing else (files[0] if files else "~/.ssh/known_hosts")
    changed = _has_other_key(target, existing)
    if changed:
        what = (f"the host key of {target}{key} does NOT match the one known_hosts ({', '.join(existing)}) has "
                f"for {where}: the server was reinstalled, or someone is intercepting the connection. Refusing "
                f"to connect. If you know the server changed, remove the old entry with `ssh-keygen -R '{where}' "
                f"-f {add_to}` and add the new one after checking its fingerprint")
    else:
        checked = ", ".join(files) if files else "no known_hosts file"
        what = (f"the host key of {target}{key} is not in known_hosts (checked: {checked}). Refusing to "
                f"connect. Check the fingerprint out of band, then add it with `ssh-keyscan -p {target.port} "
                f"{target.host} >> {add_to}`, or point known_hosts (transport.ssh.known_hosts, or "
                "UserKnownHostsFile in the ssh config) at a file that has it")
    return SshError(what, definitive=True)


def _has_other_key(target: SshTarget, files: list[str]) -> bool:
    if not files:
        return False
    try:
        port = None if target.port == 22 else target.port
        trusted = asyncssh.match_known_hosts(files, target.host, target.host, port)[0]
    except (OSError, ValueError):
        return False
    return bool(trusted)


def auth_error(target: SshTarget) -> SshError:
    tried = list(target.identities)
    if target.agent:
        tried.append("the keys in ssh-agent (SSH_AUTH_SOCK)")
    offered = ", ".join(tried) if tried else "no keys at all (no -i, no IdentityFile, no ~/.ssh/id_*, no ssh-agent)"
    return SshError(
        f"authentication failed for {target.user}@{format_host(target.host)}:{target.port}: tried {offered}. "
        f"Add the matching public key to ~{target.user}/.ssh/authorized_keys on the server, or pass the right "
        "key with -i FILE (transport.ssh.identity_files) or an IdentityFile in the ssh config",
        definitive=True,
    )


__all__ = [
    "Plan",
    "SshError",
    "SshTarget",
    "auth_error",
    "default_ciphers",
    "host_key_error",
    "make_plan",
]
