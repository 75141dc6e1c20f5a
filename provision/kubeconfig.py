"""kubeconfig files: parse kind's, merge a context into the user's, take it out again (PyYAML stays here).

The merge replaces only the cluster, user and context entries with our names (as ``kind export
kubeconfig`` does), keeps everything else, writes atomically with mode 0600 (the file holds a client
key), and makes our context the current one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]  # PyYAML ships no stubs

from provision.errors import ProvisionError
from tunneld.kubeconfig import kubeconfig_paths

_SECTIONS = ("clusters", "users", "contexts")


def default_path(env: Mapping[str, str] | None = None) -> str:
    """Where kubectl writes: the first file it reads ($KUBECONFIG's first entry, else ~/.kube/config)."""
    return str(kubeconfig_paths(env)[0])


def parse(text: str, source: str) -> dict[str, Any]:
    """:raises ProvisionError: when ``text`` is not a kubeconfig."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ProvisionError(f"{source}: not YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict) or not all(isinstance(data.get(s) or [], list) for s in _SECTIONS):
        raise ProvisionError(f"{source}: not a kubeconfig (expected a mapping with clusters, users, contexts lists)")
    return data


def server_of(config: Mapping[str, Any], context: str) -> str:
    """The API server URL ``context`` points at.

    :raises ProvisionError: when the context or its cluster is missing.
    """
    ctx = _entry(config, "contexts", context)
    cluster = _entry(config, "clusters", str((ctx.get("context") or {}).get("cluster")))
    return str((cluster.get("cluster") or {}).get("server"))


def _entry(config: Mapping[str, Any], section: str, name: str) -> dict[str, Any]:
    for item in config.get(section) or []:
        if isinstance(item, dict) and item.get("name") == name:
            return item
    raise ProvisionError(f"kubeconfig: no {section[:-1]} named {name!r}")


def _read(path: Path) -> dict[str, Any]:
    try:
        return parse(path.read_text(encoding="utf-8"), str(path))
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ProvisionError(f"cannot read kubeconfig {path}: {e.strerror or e}") from None


def _write(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(dict(data), f, default_flow_style=False, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def merge(path: str, new: Mapping[str, Any], context: str) -> None:
    """Put ``new``'s entries into the kubeconfig at ``path`` (replacing same-named ones); select ``context``.

    :raises ProvisionError: when the existing file is unreadable or not a kubeconfig.
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
    try:
        _write(target, data)
    except OSError as e:
        raise ProvisionError(f"cannot write kubeconfig {target}: {e.strerror or e}") from None


def remove(path: str, name: str) -> bool:
    """Take the cluster, user and context called ``name`` out of the kubeconfig; True if any was there."""
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
        try:
            _write(target, data)
        except OSError as e:
            raise ProvisionError(f"cannot write kubeconfig {target}: {e.strerror or e}") from None
    return found
