"""kubeconfig files (tunneld/kubeconfig.py): the https probe's credentials read from them, kind's
entries merged in and taken out again, the default path, and that loading the module does not load
PyYAML. No lab needed."""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from tests.standins.apiserver import ApiCerts, ensure_certs, write_kubeconfig
from tunneld import kubeconfig
from tunneld.kubeconfig import KubeconfigError, credentials_for_port

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def certs() -> ApiCerts:
    return ensure_certs()


# ---------------------------------------------------------------- reading: the probe's credentials


def test_credentials_are_those_of_the_context_whose_server_has_the_port(certs: ApiCerts, tmp_path: Path) -> None:
    inline = write_kubeconfig(tmp_path / "inline", 46443, certs)
    creds = credentials_for_port(46443, [tmp_path / "missing", inline])
    assert creds is not None and creds.authenticates
    assert creds.ca == certs.ca.read_bytes() and creds.key == certs.client_key.read_bytes()
    assert creds.server_name == "127.0.0.1" and "context kind-standin" in creds.source
    assert credentials_for_port(46444, [inline]) is None
    assert "BEGIN" not in repr(creds)  # no key material in reprs (logs, tracebacks)


def test_credentials_from_file_references(certs: ApiCerts, tmp_path: Path) -> None:
    path = write_kubeconfig(tmp_path / "files", 6443, certs, inline=False)
    creds = credentials_for_port(6443, [path])
    assert creds is not None and creds.cert == certs.client_cert.read_bytes()


def test_unreadable_credentials_name_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "broken"
    path.write_text(
        "clusters:\n- name: c\n  cluster: {server: 'https://localhost:7443', certificate-authority-data: '!!'}\n"
        "contexts:\n- name: x\n  context: {cluster: c, user: u}\nusers:\n- name: u\n  user: {token: t}\n"
    )
    with pytest.raises(KubeconfigError, match="context x: certificate-authority-data is not valid base64"):
        credentials_for_port(7443, [path])


# ---------------------------------------------------------------- writing: provisioning's merge


def server_of(config: Mapping[str, Any], context: str) -> str:
    """The API server URL ``context`` points at (only tests ask)."""

    def entry(section: str, name: str) -> Mapping[str, Any]:
        found = [e for e in config.get(section) or [] if isinstance(e, dict) and e.get("name") == name]
        assert found, f"kubeconfig: no {section[:-1]} named {name!r}"
        return found[0]

    ctx = entry("contexts", context)
    cluster = entry("clusters", str((ctx.get("context") or {}).get("cluster")))
    return str((cluster.get("cluster") or {}).get("server"))


def _kind_kubeconfig(name: str, server: str) -> dict[str, object]:
    ctx = f"kind-{name}"
    return {"apiVersion": "v1", "kind": "Config", "clusters": [{"name": ctx, "cluster": {"server": server}}],
            "users": [{"name": ctx, "user": {"client-key-data": "S0VZ"}}],
            "contexts": [{"name": ctx, "context": {"cluster": ctx, "user": ctx}}], "current-context": ctx}


def test_kubeconfig_merge_keeps_other_entries_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "kube" / "config"
    kubeconfig.merge(str(path), _kind_kubeconfig("other", "https://10.0.0.1:6443"), "kind-other")
    kubeconfig.merge(str(path), _kind_kubeconfig("ci", "https://127.0.0.1:1111"), "kind-ci")
    kubeconfig.merge(str(path), _kind_kubeconfig("ci", "https://127.0.0.1:2222"), "kind-ci")  # replaced, not doubled
    data = yaml.safe_load(path.read_text())
    assert [c["name"] for c in data["contexts"]] == ["kind-other", "kind-ci"]
    assert data["current-context"] == "kind-ci"
    assert server_of(data, "kind-ci") == "https://127.0.0.1:2222"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds a client key
    assert kubeconfig.remove(str(path), "kind-ci")
    data = yaml.safe_load(path.read_text())
    assert [c["name"] for c in data["contexts"]] == ["kind-other"] and data["current-context"] == ""
    assert not kubeconfig.remove(str(path), "kind-ci")


def test_kubeconfig_that_is_not_one(tmp_path: Path) -> None:
    """Provisioning turns this error into a ProvisionError (provision/plan.py), for its exit code."""
    path = tmp_path / "config"
    path.write_text("- just\n- a list\n")
    with pytest.raises(KubeconfigError, match="not a kubeconfig"):
        kubeconfig.merge(str(path), _kind_kubeconfig("ci", "https://127.0.0.1:1"), "kind-ci")


def test_a_kubeconfig_that_is_not_yaml_is_named_without_quoting_it(tmp_path: Path) -> None:
    """A broken kubeconfig holds keys and tokens: the error says where, never what."""
    path = tmp_path / "config"
    path.write_text("users:\n- name: ci\n  user: {token: s3cr3t-t0ken\n")
    with pytest.raises(KubeconfigError) as caught:
        kubeconfig.merge(str(path), _kind_kubeconfig("ci", "https://127.0.0.1:1"), "kind-ci")
    assert f"{path}: not YAML (line " in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


def test_default_kubeconfig_path() -> None:
    assert kubeconfig.default_path({"KUBECONFIG": "/a:/b", "HOME": "/h"}) == "/a"
    assert kubeconfig.default_path({"HOME": "/h"}) == "/h/.kube/config"


def test_importing_the_module_does_not_load_pyyaml() -> None:
    """Every command imports it (through the probe); only those that read or write a kubeconfig need PyYAML."""
    code = "import sys, tunneld.kubeconfig; print('yaml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=True)
    assert out.stdout.strip() == "False"
