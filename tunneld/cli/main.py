"""kci-tunneld's command line: a thin shell that parses, loads config, sets up logging, calls the
library and maps its errors onto named exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from provision import cli as provision_cli
from tunneld import loop
from tunneld.cli.status import format_status
from tunneld.config import Config, load_config, merge_cli
from tunneld.daemon import launch, options
from tunneld.daemon.control import default_control_path, probe_existing, request
from tunneld.errors import AlreadyRunningError, ConfigError, ExitCode, NotReadyError, TunneldError, error_for
from tunneld.version import __version__

logger = logging.getLogger("tunneld")

DESCRIPTION = """\
Forward ports that a remote Docker host publishes on its own 127.0.0.1 (a registry, a kind API
server) into this machine, over the Docker API, SSH or plain TCP: one supervised daemon instead of
socat and a `docker exec` per connection."""

START_EXAMPLES = """\
examples:
  # a registry on the remote Docker host's 127.0.0.1:5000, here on localhost:5000
  kci-tunneld start --detach --via docker -L 5000:127.0.0.1:5000

  # plain TCP, a free local port picked for you (status shows it)
  kci-tunneld start --detach -L 127.0.0.1:0:10.0.0.5:6443

  # over SSH, using a host alias from ~/.ssh/config
  kci-tunneld start --detach --via ssh://remote-docker -L 5000:127.0.0.1:5000

  # everything from a file; -L adds to its [[forwards]]
  kci-tunneld start --config /etc/kci-tunneld/config.toml

  # whatever kind API servers and registries the remote Docker publishes, each on its own port
  # number here too (so kind's kubeconfig https://127.0.0.1:PORT works), kept current
  kci-tunneld start --detach --via docker --auto --metrics-port 9464

--detach returns 0 only once every forward listens AND a probe through the transport reached its
target; the daemon keeps running in the background and logs to the file it prints."""

EXIT_CODES = "exit codes:\n" + "\n".join(f"  {c.value:<4}{c.name.lower().replace('_', ' ')}" for c in ExitCode)


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="kci-tunneld", description=DESCRIPTION, epilog=EXIT_CODES, formatter_class=formatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    control = options.control()
    start = sub.add_parser(
        "start", parents=[control, options.logging(), options.launch(via_default="direct")],
        help="run the forwarding daemon",
        description="Run the daemon: listen here, reach HOST:HOSTPORT on the far side.",
        epilog=START_EXAMPLES + "\n\n" + EXIT_CODES, formatter_class=formatter,
    )
    start.add_argument("-L", dest="forwards", action="append", default=[], metavar="[BIND:]PORT:HOST:HOSTPORT",
                       help="forward BIND:PORT here to HOST:HOSTPORT as the far side sees it (BIND defaults to "
                            "localhost = 127.0.0.1 and ::1; PORT 0 picks a free port); repeatable")
    start.add_argument("--config", type=Path, metavar="FILE", help="TOML config file (see docs/configuration.md)")
    start.add_argument("--provision", action="store_true",
                       help="first provision the registry (and a kind cluster) on the Docker host and keep "
                            "reconciling them: the same as `kci-tunneld up`, whose options it takes")
    start.add_argument("--allow-non-loopback", action="store_true",
                       help="allow BIND addresses other than loopback (exposes the far side to the network)")
    start.add_argument("-i", dest="identity_files", action="append", default=[], metavar="FILE",
                       help="ssh transport: private key file; repeatable")
    start.add_argument("--auto", action="store_true",
                       help="discover kind API servers and registries the remote Docker publishes and forward "
                            "each on the same port number here; follow them as they come, go and move "
                            "(config: [auto] enabled = true)")
    start.add_argument("--metrics-port", type=int, metavar="PORT",
                       help="serve Prometheus metrics on http://127.0.0.1:PORT/metrics (config: [metrics] port)")

    status = sub.add_parser(
        "status", parents=[control], help="show the daemon's forwards and counters",
        description="Show each forward: state, listen address, target, connections, bytes, last probe.",
        epilog="examples:\n  kci-tunneld status\n  kci-tunneld status --json | jq '.forwards[].port'",
        formatter_class=formatter,
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")

    wait = sub.add_parser(
        "wait", parents=[control], help="wait until every forward is ready",
        description="Block until every forward is ready (listening, and a probe reached its target).",
        epilog="examples:\n  kci-tunneld wait --timeout 120 && skopeo copy ... docker://localhost:5000/app",
        formatter_class=formatter,
    )
    wait.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS", help="give up after this (default 60)")

    stop = sub.add_parser(
        "stop", parents=[control], help="stop the daemon gracefully",
        description="Stop accepting, let open connections finish (timeouts.drain), exit.",
        epilog="examples:\n  kci-tunneld stop\n  kci-tunneld stop --cleanup   # also remove the helper container",
        formatter_class=formatter,
    )
    stop.add_argument("--cleanup", action="store_true", help="also remove what the transport created remotely")
    stop.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="wait this long for exit")

    sub.add_parser(
        "reload", parents=[control], help="re-read the config file (as SIGHUP does)",
        description="Re-read the config; only changed forwards restart, unchanged ones keep their connections.",
        epilog="examples:\n  kci-tunneld reload", formatter_class=formatter,
    )
    provision_cli.add_subcommands(sub)  # up, down and the hidden serve: provision/cli.py
    return parser


CLIENT_COMMANDS = ("status", "wait", "reload", "stop")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["start"] and "--provision" in argv:
        # `start --provision` is `up` in the foreground: provision, forward, reconcile in the daemon.
        argv = ["up", *(a for a in argv[1:] if a != "--provision")]
    args = build_parser().parse_args(argv)
    args.control = args.control or default_control_path()
    try:
        if args.command == "start":
            return _start(args, argv)
        if args.command in CLIENT_COMMANDS:
            return loop.run(lambda: _client(args))
        return int(args.run(args))  # provision/cli.py's up, down, serve
    except TunneldError as e:
        print(f"kci-tunneld: {e}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)


def _config(args: argparse.Namespace) -> Config:
    base = load_config(args.config) if args.config else Config()
    overrides: dict[str, Any] = {}
    if args.helper_image:
        overrides["docker.helper_image"] = args.helper_image
    if args.identity_files:
        overrides["ssh.identity_files"] = tuple(args.identity_files)
    if args.auto:
        base = dataclasses.replace(base, auto=dataclasses.replace(base.auto, enabled=True))
    if args.metrics_port is not None:
        if not 0 <= args.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port: expected an integer 0..65535, got {args.metrics_port}")
        base = dataclasses.replace(base, metrics=dataclasses.replace(base.metrics, port=args.metrics_port))
    config = merge_cli(base, forwards=args.forwards, via=args.via,
                       allow_non_loopback=args.allow_non_loopback, overrides=overrides)
    if not config.forwards and not config.auto.enabled:
        raise ConfigError("nothing to forward: give -L [BIND:]PORT:HOST:HOSTPORT, --auto, "
                          "or a --config with [[forwards]]")
    return config


def _start(args: argparse.Namespace, argv: list[str]) -> int:
    config = _config(args)  # bad input fails here, before anything starts
    existing = loop.run(lambda: probe_existing(args.control))
    if existing is not None:
        if existing.get("fingerprint") != config.fingerprint():
            raise AlreadyRunningError(
                f"a daemon (pid {existing.get('pid')}) with a different config already runs on {args.control}; "
                "stop it first (`kci-tunneld stop`) or give this one its own --control PATH"
            )
        print(f"kci-tunneld: already running with this config (pid {existing.get('pid')})", file=sys.stderr)
        if not args.detach:
            return int(ExitCode.OK)
        return _await_ready(args, config, None, existing.get("log_file"))
    if args.detach:
        log_file = args.log_file or args.control.with_suffix(".log")
        child_argv = [a for a in argv if a != "--detach"]
        child_argv += ["--control", str(args.control), "--log-file", str(log_file)]
        return _await_ready(args, config, launch.spawn(child_argv, log_file), log_file)
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    """The daemon itself, in the foreground (also what ``--detach`` starts)."""
    # The engine and the daemon are imported here: the client commands never need them.
    from tunneld.daemon.lifecycle import Daemon
    from tunneld.daemon.notify import Notifier
    from tunneld.daemon.processes import first_error
    from tunneld.logs import setup_logging

    setup_logging(args.log_level, args.log_format, args.log_file)
    _raise_open_file_limit()
    daemon = Daemon(lambda: _config(args), control_path=args.control, notifier=Notifier(),
                    log_file=str(args.log_file) if args.log_file else None)
    try:
        return int(loop.run(daemon.run))
    except BaseExceptionGroup as group:
        raise first_error(group) from None


def _await_ready(args: argparse.Namespace, config: Config, started: launch.Started | None,
                 log_file: str | Path | None) -> int:
    timeout = args.ready_timeout or config.timeouts.ready
    reply = loop.run(functools.partial(launch.wait_ready, args.control, timeout, started=started,
                                       log_file=log_file))
    print("\n".join(launch.ready_lines(reply)))
    return int(ExitCode.OK)


def _raise_open_file_limit() -> None:
    """Lift the soft open-file limit to the hard one: every relayed connection holds two sockets,
    and the usual soft limit of 1024 would stop a forward near 500 connections (EMFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # the kernel's default nr_open
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        logger.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, e)


async def _client(args: argparse.Namespace) -> int:
    if args.command == "status":
        reply = await request(args.control, "status")
        print(json.dumps(reply, indent=2) if args.json else format_status(reply))
        return int(ExitCode.OK)
    if args.command == "wait":
        reply = await request(args.control, "wait", timeout=args.timeout)
        if not reply.get("ok"):
            raise NotReadyError(reply.get("error") or "not ready")
        print(format_status(reply))
        return int(ExitCode.OK)
    if args.command == "reload":
        reply = await request(args.control, "reload", io_timeout=30)
        if not reply.get("ok"):
            # Rejected (nothing changed) or applied with errors: the reply names the exit code.
            raise error_for(reply.get("exit_code"), reply.get("error") or "reload failed", ConfigError)
        print("kci-tunneld: reloaded")
        return int(ExitCode.OK)
    if args.command == "stop":
        pid = await launch.stop(args.control, cleanup=args.cleanup, timeout=args.timeout)
        print(f"kci-tunneld: stopped (pid {pid})")
        return int(ExitCode.OK)
    raise AssertionError(args.command)
