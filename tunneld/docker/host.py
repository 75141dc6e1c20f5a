"""Which Docker host, and how to reach it: chosen exactly as the docker CLI chooses it.

``resolve_endpoint``: explicit settings, then ``DOCKER_HOST`` (with ``DOCKER_TLS_VERIFY``/``DOCKER_TLS``
and ``DOCKER_CERT_PATH``), then ``DOCKER_CONTEXT``, then the current context in ``config.json``, then
the local socket. Pure apart from reading the docker config and TLS files; tunneld/docker/api.py
connects to what this returns.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tunneld.config import DockerSettings
from tunneld.errors import TransportError
from tunneld.tls import TlsMaterialError, client_context

DEFAULT_UNIX_SOCKET = "/var/run/docker.sock"
_DEFAULT_TCP_PORT = 2375
_DEFAULT_TLS_PORT = 2376


@dataclass(frozen=True)
class TlsSettings:
    """Client TLS material for a tcp:// Docker host: files (DOCKER_CERT_PATH) or a context's PEM bytes."""

    verify: bool
    cert_dir: str | None = None  # where the files came from, for messages
    ca: bytes | None = field(default=None, repr=False)
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Endpoint:
    """A Docker Engine address and how it was chosen."""

    host: str  # unix:///var/run/docker.sock, tcp://10.0.0.5:2376, ssh://user@host
    source: str  # "DOCKER_HOST", "context 'ci'", "settings", "default"
    tls: TlsSettings | None = None

    @property
    def scheme(self) -> str:
        return self.host.split("://", 1)[0]

    def describe(self) -> str:
        tls = "" if self.tls is None else (" (TLS)" if self.tls.verify else " (TLS, not verified)")
        return f"{self.host}{tls} from {self.source}"


def docker_config_dir(env: Mapping[str, str]) -> Path:
    """~/.docker, or $DOCKER_CONFIG, as the docker CLI uses it."""
    if env.get("DOCKER_CONFIG"):
        return Path(env["DOCKER_CONFIG"])
    return Path(env.get("HOME") or Path.home()) / ".docker"


def resolve_endpoint(settings: DockerSettings, env: Mapping[str, str] | None = None) -> Endpoint:
    """Pick the Docker host as the docker CLI would, with explicit ``settings`` first.

    Reads config files only; opens no socket.

    :raises TransportError: for a malformed DOCKER_HOST, a missing context or missing TLS files.
    """
    env = os.environ if env is None else env
    config_dir = docker_config_dir(env)
    if settings.host:
        return _default_context(settings.host, "settings (docker.host)", settings, env, config_dir)
    if settings.context and settings.context != "default":
        return _named_context(settings.context, "settings (docker.context)", config_dir)
    # The CLI lets DOCKER_HOST win over DOCKER_CONTEXT and the current context.
    if env.get("DOCKER_HOST"):
        return _default_context(env["DOCKER_HOST"], "DOCKER_HOST", settings, env, config_dir)
    if env.get("DOCKER_CONTEXT") and env["DOCKER_CONTEXT"] != "default":
        return _named_context(env["DOCKER_CONTEXT"], "DOCKER_CONTEXT", config_dir)
    current = None if settings.context or env.get("DOCKER_CONTEXT") else _current_context(config_dir)
    if current:
        return _named_context(current, f"currentContext in {config_dir / 'config.json'}", config_dir)
    return _default_context(f"unix://{DEFAULT_UNIX_SOCKET}", "default", settings, env, config_dir)


def _current_context(config_dir: Path) -> str | None:
    path = config_dir / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise TransportError(f"cannot read the docker CLI config {path}: {e}") from None
    name = data.get("currentContext") if isinstance(data, dict) else None
    return name if isinstance(name, str) and name and name != "default" else None


def _named_context(name: str, source: str, config_dir: Path) -> Endpoint:
    # "default" never reaches here: it is DOCKER_HOST or the local socket, as in the CLI.
    digest = hashlib.sha256(name.encode()).hexdigest()
    meta = config_dir / "contexts" / "meta" / digest / "meta.json"
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
        docker = data["Endpoints"]["docker"]
        host = str(docker["Host"])
    except FileNotFoundError:
        raise TransportError(f"docker context {name!r} (from {source}) does not exist: no {meta}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TransportError(f"docker context {name!r} (from {source}): cannot read {meta}: {e!r}") from None
    tls_dir = config_dir / "contexts" / "tls" / digest / "docker"
    files = {n: _read_optional(tls_dir / f"{n}.pem") for n in ("ca", "cert", "key")}
    tls = None
    if any(files.values()):
        tls = TlsSettings(verify=not docker.get("SkipTLSVerify", False), cert_dir=str(tls_dir), **files)
    _check_host(host, f"docker context {name!r}")
    return Endpoint(host=_normalize_host(host, tls is not None), source=f"context {name!r} ({source})", tls=tls)


def _default_context(host: str, source: str, settings: DockerSettings, env: Mapping[str, str],
                     config_dir: Path) -> Endpoint:
    _check_host(host, source)
    # Like the CLI: any non-empty DOCKER_TLS_VERIFY means verify; DOCKER_TLS alone means TLS unverified.
    verify = settings.tls_verify if settings.tls_verify is not None else bool(env.get("DOCKER_TLS_VERIFY"))
    use_tls = verify or bool(env.get("DOCKER_TLS"))
    tls = None
    if use_tls and host.startswith(("tcp://", "https://")):
        cert_dir = Path(settings.cert_path or env.get("DOCKER_CERT_PATH") or config_dir)
        ca = _read_optional(cert_dir / "ca.pem")
        if verify and ca is None:
            raise TransportError(
                f"TLS verification is on for {host} (DOCKER_TLS_VERIFY) but {cert_dir / 'ca.pem'} is missing; "
                "point DOCKER_CERT_PATH at the directory with ca.pem, cert.pem and key.pem"
            )
        cert, key = _read_optional(cert_dir / "cert.pem"), _read_optional(cert_dir / "key.pem")
        if (cert is None) != (key is None):
            raise TransportError(f"{cert_dir} has only one of cert.pem and key.pem; the client certificate needs both")
        tls = TlsSettings(verify=verify, cert_dir=str(cert_dir), ca=ca, cert=cert, key=key)
    return Endpoint(host=_normalize_host(host, tls is not None), source=source, tls=tls)


def _read_optional(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise TransportError(f"cannot read {path}: {e.strerror or e}") from None


def _check_host(host: str, source: str) -> None:
    scheme = host.split("://", 1)[0] if "://" in host else ""
    if scheme not in ("unix", "tcp", "http", "https", "ssh"):
        raise TransportError(
            f"{source}: unsupported Docker host {host!r}; expected unix:///path, tcp://host:port or ssh://user@host"
        )


def _normalize_host(host: str, tls: bool) -> str:
    """tcp://h -> tcp://h:2375 (2376 with TLS), as the CLI does; http(s):// become tcp://."""
    if not host.startswith(("tcp://", "http://", "https://")):
        return host
    parts = urlsplit(host)
    port = parts.port or (_DEFAULT_TLS_PORT if tls else _DEFAULT_TCP_PORT)
    hostname = parts.hostname or "localhost"
    if ":" in hostname:
        hostname = f"[{hostname}]"
    return f"tcp://{hostname}:{port}"


# ---------------------------------------------------------------- the client


def ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """The client TLS context the docker CLI would build: TLS >= 1.2, the CA, the client certificate.

    :raises TransportError: when ca.pem or the client certificate and key cannot be loaded.
    """
    # Verification is against ca.pem alone: without one, an empty CA is refused as "not a PEM certificate".
    ca = (tls.ca or b"") if tls.verify else None
    try:
        return client_context(verify=tls.verify, ca=ca, cert=tls.cert, key=tls.key)
    except TlsMaterialError as e:
        if e.part == "ca":
            raise TransportError(f"{tls.cert_dir}/ca.pem is not a PEM certificate: {e.reason}") from None
        raise TransportError(
            f"the client certificate in {tls.cert_dir} (cert.pem, key.pem) cannot be loaded: {e.reason}"
        ) from None
