"""`kci-tunneld up`, `kci-tunneld down` (and the hidden `serve` the detached daemon runs): provision
the registry (and a kind cluster) on the remote Docker host, forward them on the same port numbers
here, wait until they really work.

``up`` runs pre-flight, provisions (provision.plan), writes the daemon's config next to the control
socket (``<control>.up.toml``, plus ``<control>.provision.json`` for the reconciler), starts the
daemon with the reconciler, waits until every forward is ready, then finishes the cluster through
the forwarded API server (readiness waits, the KEP-1755 ConfigMap). ``down`` stops that daemon and
removes what kci-tunneld made. tunneld/cli/main.py adds these subcommands to ``kci-tunneld``
(``add_subcommands``); each sets ``args.run`` to its handler.

The Docker and Kubernetes clients (aiodocker, kubernetes-asyncio) are imported inside the handlers:
every other ``kci-tunneld`` command builds this parser and must not pay for them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from provision.spec import (
    DEFAULT_CLUSTER_NAME,
    DEFAULT_RECONCILE_INTERVAL,
    DEFAULT_REGISTRY_IMAGE,
    DEFAULT_REGISTRY_NAME,
    DEFAULT_REGISTRY_PORT,
    ClusterSpec,
    ProvisionSpec,
    RegistrySpec,
    spec_from_json,
    spec_to_json,
)
from tunneld import loop
from tunneld.config import Config, ForwardSpec, load_config, parse_config, read_toml
from tunneld.daemon import launch, options
from tunneld.daemon.control import check_control_dir, check_control_path, default_control_path, probe_existing
from tunneld.errors import AlreadyRunningError, ConfigError, ExitCode, TunneldError
from tunneld.logs import setup_logging

if TYPE_CHECKING:
    from provision.plan import Plan, Provisioned, Provisioner
    from tunneld.daemon.lifecycle import Daemon

UP_EXAMPLES = """\
examples:
  # a registry on the remote Docker host, on localhost:5555 here; no cluster
  kci-tunneld up --no-cluster --registry-port 5555 --detach

  # a kind cluster "ci" wired to a registry on localhost:5001; kubectl works from here
  kci-tunneld up --cluster ci --registry-port 5001 --detach && kubectl get nodes

  # take it all down again (same selection)
  kci-tunneld down --cluster ci --registry-port 5001"""

def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 1..65535, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 16:
        raise argparse.ArgumentTypeError(f"expected 0..16, got {text}")
    return value


def _selection(p: argparse.ArgumentParser) -> None:
    """The flags `up` and `down` share: which registry and which cluster."""
    p.add_argument("--cluster", metavar="NAME", help=f"kind cluster name (default {DEFAULT_CLUSTER_NAME})")
    p.add_argument("--no-cluster", action="store_true", help="only the registry, no kind cluster")
    p.add_argument("--registry-name", metavar="NAME", default=DEFAULT_REGISTRY_NAME,
                   help=f"registry container name (default {DEFAULT_REGISTRY_NAME})")
    p.add_argument("--registry-port", type=_port, metavar="PORT", default=DEFAULT_REGISTRY_PORT,
                   help=f"registry port, on the Docker host's 127.0.0.1 and here (default {DEFAULT_REGISTRY_PORT})")
    p.add_argument("--kind", metavar="PATH", help="the kind executable (default: kind on PATH)")
    p.add_argument("--kubeconfig", metavar="FILE",
                   help="kubeconfig to merge the context into (default: first of $KUBECONFIG, else ~/.kube/config)")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="a daemon config whose [transport] and [timeouts] to use (its [[forwards]] are ignored)")


def _reconcile_interval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reconcile-interval", type=options.seconds, default=DEFAULT_RECONCILE_INTERVAL, metavar="SECONDS",
                   help=f"how often the daemon re-checks the registry (default {DEFAULT_RECONCILE_INTERVAL:g})")


def add_subcommands(sub: Any) -> None:
    """Add ``up``, ``down`` (and the hidden ``serve`` the detached daemon runs) to kci-tunneld's
    subparsers; each sets ``run`` to its handler (``run(args) -> exit code``)."""
    formatter = options.Formatter
    common = [options.control(), options.logging()]
    up = sub.add_parser(
        "up", parents=[*common, options.launch(via_default="docker")],
        help="provision the registry (and a kind cluster) remotely, forward, wait",
        description="Ensure a registry (and a kind cluster wired to it) on the remote Docker host, forward them "
                    "on the same port numbers here, and wait until they answer.",
        epilog=UP_EXAMPLES, formatter_class=formatter)
    _selection(up)
    up.add_argument("--registry-image", metavar="IMAGE", default=DEFAULT_REGISTRY_IMAGE,
                    help=f"image of the registry container, if one is created (default {DEFAULT_REGISTRY_IMAGE})")
    up.add_argument("--api-port", type=_port, metavar="PORT",
                    help="API server port on both sides (default: one free on both, picked for you)")
    up.add_argument("--node-image", metavar="IMAGE", help="kind node image (default: kind's own)")
    up.add_argument("--workers", type=_count, default=0, metavar="N", help="kind worker nodes (default 0)")
    _reconcile_interval(up)
    up.set_defaults(run=run_up)
    down = sub.add_parser(
        "down", parents=common, help="stop the daemon `up` started and remove what kci-tunneld provisioned",
        description="Stop the daemon on the control socket, delete the kind cluster and the registry if "
                    "kci-tunneld created them (containers it did not create are left alone).",
        epilog="examples:\n  kci-tunneld down --no-cluster --registry-port 5555", formatter_class=formatter)
    _selection(down)
    down.set_defaults(run=run_down)
    serve = sub.add_parser("serve", parents=[*common, options.log_file()])  # no help=: kept out of the listing
    serve.add_argument("--config", type=Path, required=True)
    serve.add_argument("--provision", type=Path, required=True)
    _reconcile_interval(serve)
    serve.set_defaults(run=run_serve)


# ---------------------------------------------------------------- the model from the flags


def _base(args: argparse.Namespace) -> dict[str, Any]:
    """The raw TOML of --config without its forwards, with --via applied (docker by default)."""
    data = read_toml(args.config) if args.config else {}
    data.pop("forwards", None)
    transport = dict(data.get("transport") or {})
    if getattr(args, "via", None):
        transport["via"] = args.via
    transport.setdefault("via", "docker")  # `up` provisions on a Docker host: reach it through Docker
    data["transport"] = transport
    return data


def _spec(args: argparse.Namespace, base: Config) -> ProvisionSpec:
    cluster = None
    if not args.no_cluster:
        cluster = ClusterSpec(
            name=args.cluster or DEFAULT_CLUSTER_NAME, kind_path=args.kind,
            node_image=getattr(args, "node_image", None), api_port=getattr(args, "api_port", None),
            kubeconfig=os.path.abspath(args.kubeconfig) if args.kubeconfig else None,
            workers=getattr(args, "workers", 0))
    elif args.cluster:
        raise ConfigError("--cluster and --no-cluster contradict each other")
    docker = base.transport.docker
    return ProvisionSpec(
        registry=RegistrySpec(name=args.registry_name, port=args.registry_port,
                              image=getattr(args, "registry_image", DEFAULT_REGISTRY_IMAGE)),
        cluster=cluster, docker=docker, helper_image=(getattr(args, "helper_image", None) or [docker.helper_image])[0])


def daemon_config(base: Mapping[str, Any], spec: ProvisionSpec) -> tuple[Config, str]:
    """The daemon's config (model and TOML text): the base transport and timeouts, our same-port forwards."""
    from provision.plan import forwards

    data = {**base, "forwards": [_forward_table(f) for f in forwards(spec)]}
    return parse_config(data), "# written by `kci-tunneld up`; `kci-tunneld down` removes it\n" + to_toml(data)


def _forward_table(f: ForwardSpec) -> dict[str, Any]:
    return {"name": f.name, "bind": f.bind, "port": f.port, "host": f.host, "host_port": f.host_port,
            "probe": f.probe, "probe_path": f.probe_path}


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """TOML for the shapes a daemon config has: scalars, lists of scalars, tables, arrays of tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items()
             if not isinstance(v, Mapping) and not (isinstance(v, list) and v and isinstance(v[0], Mapping))]
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in data.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += f"\n[{name}]\n" + to_toml(v, f"{name}.")
        elif isinstance(v, list) and v and isinstance(v[0], Mapping):
            for item in v:
                out += f"\n[[{name}]]\n" + to_toml(item, f"{name}.")
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {v!r} to TOML")


def generated_paths(control: Path) -> tuple[Path, Path]:
    """Where `up` writes the daemon's config and the provisioning spec: next to the control socket."""
    return control.with_suffix(".up.toml"), control.with_suffix(".provision.json")


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- up


def _say(line: str) -> None:
    print(f"up: {line}", file=sys.stderr, flush=True)


def _write_stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def _listen_ports(status: Mapping[str, Any]) -> frozenset[int]:
    ports = set()
    for f in status.get("forwards") or []:
        for addr in f.get("listen") or []:
            tail = str(addr).rsplit(":", 1)[-1]
            if tail.isdigit():
                ports.add(int(tail))
    return frozenset(ports)


def run_up(args: argparse.Namespace) -> int:
    """``kci-tunneld up``: pre-flight, provision, start (or reuse) the daemon, wait, finish the cluster.

    :raises TunneldError: (PreflightError, ProvisionError, TransportError...) for the CLI to map.
    """
    from provision.plan import Provisioner
    from tunneld.docker.progress import PullPrinter

    control: Path = args.control or default_control_path()
    check_control_path(control)  # bad input fails before anything is provisioned or started
    raw = _base(args)
    base = parse_config({**raw, "forwards": []})
    spec = _spec(args, base)
    existing = loop.run(functools.partial(probe_existing, control))
    if existing is None:
        check_control_dir(control.parent)  # where the daemon would put its socket
    # On a terminal an image pull is one line rewritten in place; in a CI log, a line per layer and step.
    pulls = PullPrinter(_say, write=_write_stderr, prefix="up: ") if sys.stderr.isatty() else None
    provisioner = Provisioner(spec, progress=_say, ours=_listen_ports(existing) if existing else frozenset(),
                              pulls=pulls)
    decided: dict[str, Any] = {}

    def before_changes(plan: Plan) -> None:
        config, text = daemon_config(raw, plan.spec)
        if existing is not None and existing.get("fingerprint") != config.fingerprint():
            raise AlreadyRunningError(
                f"a daemon (pid {existing.get('pid')}) with other forwards already runs on {control}; run "
                "`kci-tunneld down` with its selection first, or give this one its own --control PATH")
        decided.update(config=config, text=text)

    if not args.detach:
        setup_logging(args.log_level, args.log_format, args.log_file)
    done = loop.run(functools.partial(provisioner.up, before_changes))
    config: Config = decided["config"]
    config_path, spec_path = generated_paths(control)
    _write_private(config_path, decided["text"])
    _write_private(spec_path, spec_to_json(done.spec))
    ready_timeout = args.ready_timeout if args.ready_timeout is not None else config.timeouts.ready
    if not args.detach:
        return _foreground(args, control, config_path, done, provisioner, ready_timeout)
    started: launch.Started | None = None
    if existing is None:
        log_file: Path = args.log_file or control.with_suffix(".log")
        started = launch.spawn(daemon_argv(control, config_path, spec_path, log_file, args), log_file,
                               env=_daemon_env(done.spec))
        _say(f"daemon started (pid {started.pid}); log: {log_file}")
    else:
        _say(f"daemon already running with these forwards (pid {existing.get('pid')})")
        if getattr(args, "log_given", None):
            _say(options.kept_log_settings(args.log_given, "`kci-tunneld stop`, then `up` again (what is provisioned "
                                                           "stays)"))
    reply = loop.run(functools.partial(
        launch.wait_ready, control, ready_timeout, started=started,
        log_file=existing.get("log_file") if existing else None, stop_hint=DOWN_HINT, progress=_say))
    loop.run(functools.partial(provisioner.configure_cluster, done))
    _print_ready(reply, done)
    return int(ExitCode.OK)


DOWN_HINT = "remove it all with `kci-tunneld down`"


def daemon_argv(control: Path, config_path: Path, spec_path: Path, log_file: Path,
                args: argparse.Namespace) -> list[str]:
    """How the detached daemon is started: ``kci-tunneld serve ...`` (forwards + reconciler)."""
    return ["serve", "--config", str(config_path), "--provision", str(spec_path), "--control", str(control),
            "--log-file", str(log_file), "--log-level", args.log_level, "--log-format", args.log_format,
            "--reconcile-interval", str(args.reconcile_interval)]


def _daemon_env(spec: ProvisionSpec) -> dict[str, str]:
    env = dict(os.environ)
    if spec.cluster is not None and spec.cluster.kubeconfig:
        # The API server forward's https probe finds its credentials through $KUBECONFIG.
        env["KUBECONFIG"] = os.pathsep.join(p for p in (spec.cluster.kubeconfig, env.get("KUBECONFIG")) if p)
    return env


def _print_ready(reply: Mapping[str, Any], done: Provisioned) -> None:
    from tunneld import kubeconfig

    reg, cluster = done.spec.registry, done.spec.cluster
    print(launch.ready_headline(reply))
    print(f"  registry: {reg.host} -> {reg.name} ({done.registry}); push to {reg.host}/IMAGE")
    if cluster is not None:
        print(f"  pods pull {reg.host}/IMAGE (or {reg.in_network}/IMAGE) from it")
        path = cluster.kubeconfig or kubeconfig.default_path()
        print(f"  cluster: {cluster.name} ({done.cluster}), API server https://127.0.0.1:{cluster.api_port}, "
              f"context {cluster.context} in {path}")


def _foreground(args: argparse.Namespace, control: Path, config_path: Path, done: Provisioned,
                provisioner: Provisioner, ready_timeout: float) -> int:
    async def after_ready(daemon: Daemon) -> None:
        await daemon.wait_ready(ready_timeout)
        await provisioner.configure_cluster(done)
        _print_ready(daemon.status(), done)

    return _run_daemon(config_path, done.spec, control, args.log_file, args.reconcile_interval, after_ready)


def _run_daemon(config_path: Path, spec: ProvisionSpec, control: Path, log_file: Path | None, interval: float,
                after_ready: Callable[[Daemon], Any] | None = None) -> int:
    """The daemon for config_path plus the reconciler for spec, until the daemon stops."""
    from provision.reconcile import run_reconciler
    from tunneld.daemon.lifecycle import Daemon
    from tunneld.daemon.notify import Notifier
    from tunneld.daemon.processes import first_error

    daemon = Daemon(lambda: load_config(config_path), control_path=control, notifier=Notifier(),
                    log_file=str(log_file) if log_file else None)
    failed: list[BaseException] = []

    async def guarded() -> None:
        assert after_ready is not None
        try:
            await after_ready(daemon)
        except TunneldError as e:
            failed.append(e)
            daemon.request_stop()

    async def main() -> int:
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(run_reconciler, spec, interval=interval))
            if after_ready is not None:
                tg.start_soon(guarded)
            code = await daemon.run()
            tg.cancel_scope.cancel()
        return int(code)

    try:
        code = loop.run(main)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    if failed:
        raise failed[0]
    return code


def run_serve(args: argparse.Namespace) -> int:
    """The detached daemon `up` starts: forwards from --config, the reconciler from --provision."""
    setup_logging(args.log_level, args.log_format, args.log_file)
    spec_path: Path = args.provision
    try:
        spec = spec_from_json(spec_path.read_text(encoding="utf-8"), source=str(spec_path))
    except OSError as e:
        raise ConfigError(f"{spec_path}: cannot read: {e.strerror or e}") from None
    control: Path = args.control or default_control_path()
    return _run_daemon(args.config, spec, control, args.log_file, args.reconcile_interval)


# ---------------------------------------------------------------- down


def run_down(args: argparse.Namespace) -> int:
    """``kci-tunneld down``: stop the daemon on the control socket, remove what kci-tunneld made.

    :raises TunneldError: for the CLI to map.
    """
    from provision.plan import Provisioner

    control: Path = args.control or default_control_path()
    raw = _base(args)
    spec = _spec(args, parse_config({**raw, "forwards": []}))
    existing = loop.run(functools.partial(probe_existing, control))
    if existing is not None:
        pid = loop.run(functools.partial(launch.stop, control))
        print(f"down: daemon stopped (pid {pid})", file=sys.stderr)
    loop.run(Provisioner(spec, progress=lambda line: print(f"down: {line}", file=sys.stderr, flush=True)).down)
    for path in generated_paths(control):
        path.unlink(missing_ok=True)
    return int(ExitCode.OK)
