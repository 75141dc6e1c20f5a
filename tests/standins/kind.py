"""A STAND-IN for the `kind` CLI, for tests only: real kind cannot run here (no node image can be pulled).

What it does, with the real docker CLI against whatever Docker host DOCKER_HOST & co. name (as kind
does), so provisioning code drives it exactly as it would drive kind:

- ``kind version``: ``kind v0.23.0-standin go1.22.0 linux/amd64`` (the version comes from the state
  file, so a test can make it too old);
- ``kind get clusters``: the values of the ``io.x-k8s.kind.cluster`` label on the host's containers;
- ``kind create cluster --name X --config FILE [--kubeconfig P] [--image I] [--wait D]``: decodes
  the config strictly as kind does (unknown fields are errors), then starts one container per
  node on the ``kind`` network, named and labelled as kind names and labels its nodes, running the
  lab's alpine/socat image instead of a node image. The control plane publishes
  ``apiServerAddress:apiServerPort -> 6443`` (a port picked HERE when the config has none: kind's
  behaviour, wrong with a remote Docker host) and relays 6443 to the stand-in API server
  (tests/standins/apiserver.py). Each node's /etc/containerd/config.toml is a base config with the
  config's containerdConfigPatches appended; like containerd, creation fails when that config both
  sets ``config_path`` and has a ``registry.mirrors`` block;
- ``kind get kubeconfig --name X``: a kubeconfig for https://127.0.0.1:PORT (the published port)
  with the stand-in API server's CA and client certificate;
- ``kind delete cluster --name X [--kubeconfig P]``: removes the node containers.

It never writes kubeconfig files (real kind does on create and delete); provisioning merges its own.
Every call is appended to ``calls.jsonl`` in $KCI_STANDIN_KIND_DIR: argv, the Docker/kubeconfig
environment, and for create the config text as given, decoded, and the node containers made.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

STATE_ENV = "KCI_STANDIN_KIND_DIR"
STATE_FILE = "standin.json"
CALLS_FILE = "calls.jsonl"
CLUSTER_LABEL = "io.x-k8s.kind.cluster"
ROLE_LABEL = "io.x-k8s.kind.role"
STANDIN_LABEL = "io.kci-tunneld.standin"
NETWORK = "kind"

_TOP = {"kind", "apiVersion", "name", "networking", "nodes", "containerdConfigPatches",
        "containerdConfigPatchesJSON6902", "featureGates", "runtimeConfig", "kubeadmConfigPatches",
        "kubeadmConfigPatchesJSON6902"}
_NETWORKING = {"ipFamily", "apiServerAddress", "apiServerPort", "podSubnet", "serviceSubnet", "disableDefaultCNI",
               "kubeProxyMode", "dnsSearch"}
_NODE = {"role", "image", "extraMounts", "extraPortMappings", "labels", "kubeadmConfigPatches",
         "kubeadmConfigPatchesJSON6902"}
BASE_CONTAINERD = """# stand-in for the containerd config a kind node image generates; the kind config's
# containerdConfigPatches follow, appended (real kind merges them as TOML)
version = 2
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
"""
_IDLE = "trap 'exit 0' TERM INT; while :; do sleep 86400 & wait $!; done"


class KindError(Exception):
    pass


def _state_dir() -> Path:
    d = os.environ.get(STATE_ENV)
    if not d:
        raise KindError(f"stand-in kind: {STATE_ENV} is not set (tests/standins/kind.py needs its state dir)")
    return Path(d)


def _state() -> dict[str, Any]:
    path = _state_dir() / STATE_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return data


def _record(entry: dict[str, Any]) -> None:
    keys = ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH", "DOCKER_CONTEXT", "KUBECONFIG")
    entry = {**entry, "env": {k: os.environ[k] for k in keys if k in os.environ}}
    with open(_state_dir() / CALLS_FILE, "a") as f:
        f.write(json.dumps(entry) + "\n")


def docker(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise KindError(f"docker {' '.join(args[:3])}...: {proc.stderr.strip()}")
    return proc.stdout


def clusters() -> list[str]:
    out = docker("ps", "-a", "--filter", f"label={CLUSTER_LABEL}", "--format", f'{{{{.Label "{CLUSTER_LABEL}"}}}}')
    return sorted({line.strip() for line in out.splitlines() if line.strip()})


def node_names(name: str) -> list[str]:
    out = docker("ps", "-a", "--filter", f"label={CLUSTER_LABEL}={name}", "--format", "{{.Names}}")
    return sorted(line.strip() for line in out.splitlines() if line.strip())


def decode_config(text: str) -> dict[str, Any]:
    """Decode a kind Cluster config as strictly as kind does (unknown fields are errors)."""
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise KindError(f"unable to decode config: {e}") from None
    if not isinstance(cfg, dict):
        raise KindError("unable to decode config: not a mapping")
    if cfg.get("kind") != "Cluster" or cfg.get("apiVersion") != "kind.x-k8s.io/v1alpha4":
        raise KindError(f"unknown apiVersion/kind: {cfg.get('apiVersion')}/{cfg.get('kind')}")
    for where, allowed, value in [("", _TOP, cfg), ("networking.", _NETWORKING, cfg.get("networking") or {})] + [
        (f"nodes[{i}].", _NODE, n) for i, n in enumerate(cfg.get("nodes") or [])
    ]:
        unknown = set(value) - allowed
        if unknown:
            raise KindError(f'unable to decode config: json: unknown field "{where}{sorted(unknown)[0]}"')
    patches = cfg.get("containerdConfigPatches") or []
    if not isinstance(patches, list) or not all(isinstance(p, str) for p in patches):
        raise KindError("containerdConfigPatches: expected a list of strings")
    return cfg


def containerd_config(cfg: dict[str, Any]) -> str:
    text = BASE_CONTAINERD + "".join("\n" + p + "\n" for p in cfg.get("containerdConfigPatches") or [])
    if "config_path" in text and "registry.mirrors" in text:
        # What containerd itself says when both are set: the node's containerd would not start.
        raise KindError("failed to start containerd in the node: invalid plugin config: `mirrors` cannot be set "
                        "when `config_path` is provided")
    return text


def _local_free_port() -> int:
    # Exactly what kind does without apiServerPort: a port free on the machine running kind.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create(name: str, config_path: str | None, image: str | None, kubeconfig: str | None) -> dict[str, Any]:
    state = _state()
    if name in clusters():
        raise KindError(f'node(s) already exist for a cluster with the name "{name}"')
    text = Path(config_path).read_text() if config_path else "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\n"
    cfg = decode_config(text)
    net = cfg.get("networking") or {}
    address = str(net.get("apiServerAddress") or "127.0.0.1")
    port = int(net.get("apiServerPort") or _local_free_port())
    containerd = containerd_config(cfg)
    upstream = state.get("apiserver")
    if not upstream:
        raise KindError(f"stand-in kind: no stand-in API server address in {STATE_FILE}")
    node_image = str(state.get("node_image") or "alpine/socat:latest")
    if not docker("network", "ls", "--filter", f"name=^{NETWORK}$", "--format", "{{.Name}}").strip():
        docker("network", "create", NETWORK)
    roles = [str(n.get("role", "control-plane")) for n in cfg.get("nodes") or [{"role": "control-plane"}]]
    made: list[str] = []
    print(f'Creating cluster "{name}" ...', file=sys.stderr, flush=True)
    print(f" ✓ Ensuring node image ({image or 'kindest/node (stand-in: ' + node_image + ')'})", file=sys.stderr)
    counts: dict[str, int] = {}
    try:
        for role in roles:
            counts[role] = counts.get(role, 0) + 1
            suffix = role if counts[role] == 1 else f"{role}{counts[role]}"
            node = f"{name}-{suffix}"
            args = ["run", "-d", "--name", node, "--hostname", node, "--network", NETWORK,
                    "--label", f"{CLUSTER_LABEL}={name}", "--label", f"{ROLE_LABEL}={role}",
                    "--label", f"{STANDIN_LABEL}=kind", "--restart", "on-failure:1", "--entrypoint", "/bin/sh"]
            if role == "control-plane":
                args += ["-p", f"{address}:{port}:6443"]
                main = f"exec socat TCP-LISTEN:6443,fork,reuseaddr TCP:{upstream}"
            else:
                main = _IDLE
            script = f'mkdir -p /etc/containerd /kind && printf %s "$1" > /etc/containerd/config.toml && {main}'
            docker(*args, node_image, "-c", script, "sh", containerd)
            made.append(node)
        print(" ✓ Preparing nodes 📦", file=sys.stderr)
        print(" ✓ Starting control-plane 🕹️", file=sys.stderr)
    except KindError:
        for node in made:  # kind deletes what it made when creation fails
            docker("rm", "-f", node, check=False)
        raise
    print(f'Set kubectl context to "kind-{name}"', file=sys.stderr)
    return {"config_text": text, "config": cfg, "nodes": made, "api_server": f"{address}:{port}",
            "image_requested": image, "kubeconfig_flag": kubeconfig}


def kubeconfig(name: str) -> str:
    state = _state()
    cp = f"{name}-control-plane"
    if cp not in node_names(name):
        raise KindError(f"could not locate any control plane nodes for cluster named '{name}'. "
                        "Use the --name option to select a different cluster")
    mapping = docker("port", cp, "6443/tcp").split()[0]  # 127.0.0.1:PORT
    port = int(mapping.rsplit(":", 1)[1])
    ctx = f"kind-{name}"

    def b64(key: str) -> str:
        return base64.b64encode(str(state[key]).encode()).decode()

    doc = {
        "apiVersion": "v1", "kind": "Config", "preferences": {}, "current-context": ctx,
        "clusters": [{"name": ctx, "cluster": {"server": f"https://127.0.0.1:{port}",
                                                "certificate-authority-data": b64("ca_pem")}}],
        "contexts": [{"name": ctx, "context": {"cluster": ctx, "user": ctx}}],
        "users": [{"name": ctx, "user": {"client-certificate-data": b64("client_cert_pem"),
                                         "client-key-data": b64("client_key_pem")}}],
    }
    return str(yaml.safe_dump(doc, sort_keys=True))


def _flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    entry: dict[str, Any] = {"argv": args}
    try:
        name = _flag(args, "--name") or "kind"
        if args[:1] == ["version"]:
            print(f"kind v{_state().get('version', '0.23.0')}-standin go1.22.0 linux/amd64")
        elif args[:2] == ["get", "clusters"]:
            found = clusters()
            if found:
                print("\n".join(found))
            else:
                print("No kind clusters found.", file=sys.stderr)
        elif args[:2] == ["get", "kubeconfig"]:
            sys.stdout.write(kubeconfig(name))
        elif args[:2] == ["create", "cluster"]:
            entry.update(create(name, _flag(args, "--config"), _flag(args, "--image"), _flag(args, "--kubeconfig")))
        elif args[:2] == ["delete", "cluster"]:
            nodes = node_names(name)
            print(f'Deleting cluster "{name}" ...', file=sys.stderr)
            if nodes:
                docker("rm", "-f", "-v", *nodes)
            entry["deleted"] = nodes
        else:
            raise KindError(f"stand-in kind: unsupported command {' '.join(args)!r}")
    except KindError as e:
        entry["error"] = str(e)
        _record(entry)
        print(f"ERROR: failed to {' '.join(args[:2])}: {e}", file=sys.stderr)
        return 1
    entry["ok"] = True
    _record(entry)
    return 0


def install(bin_dir: Path) -> Path:
    """Write an executable ``kind`` into ``bin_dir`` that runs this stand-in with this interpreter."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "kind"
    repo = Path(__file__).resolve().parents[2]
    exe.write_text(f"#!{sys.executable}\n# STAND-IN for kind: see tests/standins/kind.py\nimport sys\n"
                   f"sys.path.insert(0, {str(repo)!r})\nfrom tests.standins.kind import main\nsys.exit(main())\n")
    exe.chmod(0o755)
    return exe


def calls(state_dir: Path) -> list[dict[str, Any]]:
    """Every recorded call, oldest first."""
    path = state_dir / CALLS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    sys.exit(main())
