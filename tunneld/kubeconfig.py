"""kubeconfig files, read and written here only (the one adapter around PyYAML).

Reading, for the API-server probe: a kind cluster's kubeconfig names its API server
``https://127.0.0.1:PORT``; since kci-tunneld forwards it on that same PORT, the probe of the
forward listening on PORT uses the credentials of the context whose cluster has that server: CA,
client certificate and key (files or base64 ``-data``) or a bearer token. Nothing here logs or
returns a secret in a message.

Writing, for provisioning: ``merge`` puts kind's cluster, user and context into the user's
kubeconfig, replacing only the entries with those names (as ``kind export kubeconfig`` does),
keeping everything else, writing atomically with mode 0600 (the file holds a client key), and
making that context the current one; ``remove`` takes them out again.

PyYAML is imported on first use (``_yaml``): ``kci-tunneld status`` and the other commands that
never touch a kubeconfig do not pay for loading it.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tunneld.errors import ConfigError

# Server hosts that mean "this machine", as kind writes them (and as people edit them).
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
# The named lists a kubeconfig holds; merge and remove work on entries of these.
_SECTIONS = ("clusters", "users", "contexts")


class KubeconfigError(ConfigError):
    """A kubeconfig exists but cannot be used (read, parsed or written); the message names the file and the key."""


@dataclass(frozen=True)
class ApiCredentials:
    """What the probe needs to talk to one API server like kubectl would."""

    source: str  # "kubeconfig /root/.kube/config, context kind-x": for messages, no secrets
    server_name: str  # the name the server certificate must carry
    ca: bytes | None = field(default=None, repr=False)  # PEM; None: the system trust store
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    insecure: bool = False

    @property
    def authenticates(self) -> bool:
        return self.token is not None or (self.cert is not None and self.key is not None)


def kubeconfig_paths(env: Mapping[str, str] | None = None) -> list[Path]:
    """$KUBECONFIG (a PATH-like list), else ~/.kube/config, as kubectl reads them."""
    env = os.environ if env is None else env
    if env.get("KUBECONFIG"):
        return [Path(p).expanduser() for p in env["KUBECONFIG"].split(os.pathsep) if p]
    return [Path(env.get("HOME") or Path.home()) / ".kube" / "config"]


def default_path(env: Mapping[str, str] | None = None) -> str:
    """Where kubectl writes: the first file it reads ($KUBECONFIG's first entry, else ~/.kube/config)."""
    return str(kubeconfig_paths(env)[0])


def _yaml() -> Any:
    """PyYAML, imported on first use: most commands never read a kubeconfig."""
    import yaml  # type: ignore[import-untyped]  # PyYAML ships no stubs

    return yaml


# ---------------------------------------------------------------- reading, for the probe

# path -> ((mtime_ns, size), parsed document): probes run every few seconds; parse on change only.
_cache: dict[Path, tuple[tuple[int, int], Any]] = {}


def _load(path: Path) -> Any:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise KubeconfigError(f"kubeconfig {path}: {e.strerror or e}") from None
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _cache.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    yaml = _yaml()
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise KubeconfigError(f"kubeconfig {path}: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise KubeconfigError(f"kubeconfig {path}: not valid YAML ({type(e).__name__})") from None
    _cache[path] = (stamp, doc)
    return doc


def credentials_for_port(port: int, paths: Sequence[Path] | None = None) -> ApiCredentials | None:
    """The credentials of the first context (the current one first) whose cluster's server is
    ``https://<this machine>:port``, or None when no kubeconfig names such a server.

    :raises KubeconfigError: when a matching entry is malformed or its files cannot be read.
    """
    for path in kubeconfig_paths() if paths is None else paths:
        doc = _load(path)
        if not isinstance(doc, dict):
            continue
        found = _match(doc, path, port)
        if found is not None:
            return found
    return None


def _named(doc: Mapping[str, Any], section: str, inner: str) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for item in doc.get(section) or []:
        if isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get(inner), dict):
            out[item["name"]] = item[inner]
    return out


def _match(doc: Mapping[str, Any], path: Path, port: int) -> ApiCredentials | None:
    clusters = _named(doc, "clusters", "cluster")
    users = _named(doc, "users", "user")
    contexts = _named(doc, "contexts", "context")
    current = doc.get("current-context")
    order = sorted(contexts, key=lambda name: name != current)  # the current context wins a tie
    for name in order:
        ctx = contexts[name]
        cluster = clusters.get(str(ctx.get("cluster")))
        if cluster is None:
            continue
        server = urlsplit(str(cluster.get("server") or ""))
        try:
            server_port = server.port
        except ValueError:
            continue
        if server.scheme != "https" or server.hostname not in _LOCAL_HOSTS or server_port != port:
            continue
        where = f"kubeconfig {path}, context {name}"
        user = users.get(str(ctx.get("user")), {})
        base = path.parent
        return ApiCredentials(
            source=where,
            server_name=str(cluster.get("tls-server-name") or server.hostname),
            ca=_blob(cluster, "certificate-authority", base, where),
            cert=_blob(user, "client-certificate", base, where),
            key=_blob(user, "client-key", base, where),
            token=_token(user, base, where),
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
        )
    return None


def _blob(section: Mapping[str, Any], key: str, base: Path, where: str) -> bytes | None:
    """``key-data`` (base64) or ``key`` (a file, relative to the kubeconfig's directory)."""
    data = section.get(f"{key}-data")
    if data:
        try:
            return base64.b64decode(str(data), validate=True)
        except (binascii.Error, ValueError):
            raise KubeconfigError(f"{where}: {key}-data is not valid base64") from None
    file = section.get(key)
    if file:
        target = base / Path(str(file)).expanduser()
        try:
            return target.read_bytes()
        except OSError as e:
            raise KubeconfigError(f"{where}: {key} {target}: {e.strerror or e}") from None
    return None


def _token(user: Mapping[str, Any], base: Path, where: str) -> str | None:
    if user.get("token"):
        return str(user["token"])
    file = user.get("tokenFile")
    if file:
        target = base / Path(str(file)).expanduser()
        try:
            return target.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise KubeconfigError(f"{where}: tokenFile {target}: {e.strerror or e}") from None
    return None


# ---------------------------------------------------------------- writing, for provisioning


def parse(text: str, source: str) -> dict[str, Any]:
    """The kubeconfig in ``text`` (``source`` names it in messages), checked to have the named lists.

    :raises KubeconfigError: when ``text`` is not a kubeconfig.
    """
    yaml = _yaml()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        # Only where: PyYAML's own message quotes the offending line, which may hold a key or token.
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise KubeconfigError(f"{source}: not YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict) or not all(isinstance(data.get(s) or [], list) for s in _SECTIONS):
        raise KubeconfigError(f"{source}: not a kubeconfig (expected a mapping with clusters, users, contexts lists)")
    return data


def merge(path: str, new: Mapping[str, Any], context: str) -> None:
    """Put ``new``'s entries into the kubeconfig at ``path`` (replacing same-named ones); select ``context``.

    :raises KubeconfigError: when the existing file is unreadable or not a kubeconfig, or cannot be written.
    """
    target = Path(path)
    data = _read(target)
    data.setdefault("apiVersion", "v1")
    data.setdefault("kind", "Config")
    data.setdefault("preferences", {})
    for section in _SECTIONS:
        incoming = [e for e in new.get(section) or [] if isinstance(e, dict)]
        names = {e.get("name") for e in incoming}
        kept = [e for e in data.get(section) or [] if not (isinstance(e, dict) and e.get("name") in names)]
        data[section] = kept + incoming
    data["current-context"] = context
    _write(target, data)


def remove(path: str, name: str) -> bool:
    """Take the cluster, user and context called ``name`` out of the kubeconfig; True if any was there.

    :raises KubeconfigError: when the existing file is unreadable or not a kubeconfig, or cannot be written.
    """
    target = Path(path)
    data = _read(target)
    if not data:
        return False
    found = False
    for section in _SECTIONS:
        entries = data.get(section) or []
        kept = [e for e in entries if not (isinstance(e, dict) and e.get("name") == name)]
        found = found or len(kept) != len(entries)
        data[section] = kept
    if data.get("current-context") == name:
        data["current-context"] = ""
    if found:
        _write(target, data)
    return found


def _read(path: Path) -> dict[str, Any]:
    try:
        return parse(path.read_text(encoding="utf-8"), str(path))
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise KubeconfigError(f"cannot read kubeconfig {path}: {e.strerror or e}") from None


def _write(path: Path, data: Mapping[str, Any]) -> None:
    yaml = _yaml()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                yaml.safe_dump(dict(data), f, default_flow_style=False, sort_keys=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise KubeconfigError(f"cannot write kubeconfig {path}: {e.strerror or e}") from None
    # A probe in this process reads the new file, not a cached parse that its (mtime, size) might still match.
    _cache.pop(path, None)
