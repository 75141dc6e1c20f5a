"""kci-tunneld's command line: a thin shell that parses, loads config, sets up logging, calls the
library and maps its errors onto named exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import resource
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from provision import cli as provision_cli
from tunneld import loop
from tunneld.cli.status import format_status
from tunneld.config import AUTO_MODES, Config, config_from_toml, load_config, merge_cli, names_transport, read_toml
from tunneld.daemon import launch, options
from tunneld.daemon.control import check_control_dir, check_control_path, default_control_path, probe_existing
from tunneld.errors import AlreadyRunningError, ConfigError, ExitCode, TunneldError, error_for
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

  # follow mode: every port any container publishes, forwarded as containers come and go, so
  # Testcontainers and docker compose work against a remote Docker host (docs/testcontainers.md)
  export TESTCONTAINERS_HOST_OVERRIDE=localhost TESTCONTAINERS_RYUK_DISABLED=true
  kci-tunneld start --detach --auto=all

  # follow mode narrowed to one compose project, leaving its database out
  kci-tunneld start --detach --auto=all --auto-project shop --auto-exclude 'postgres:*'

--detach returns 0 only once every forward listens AND a probe through the transport reached its
target; the daemon keeps running in the background and logs to the file it prints."""

# What each exit code means, for --help (docs/troubleshooting.md says what to do about each).
EXIT_MEANINGS = {
    ExitCode.OK: "done; status: every forward is ready",
    ExitCode.ERROR: "a bug: the log has the traceback, please report it",
    ExitCode.USAGE: "the command line does not parse",
    ExitCode.CONFIG: "a -L, --via, --control or config-file value is wrong; the message names it",
    ExitCode.NOT_READY: "a forward is not ready (yet: the daemon retries), or stop timed out (stop --now)",
    ExitCode.BIND: "a local port cannot be listened on",
    ExitCode.TRANSPORT: "the far side (Docker, SSH, TCP) cannot be reached",
    ExitCode.NOT_RUNNING: "no daemon answers on the control socket (none runs, or it is stuck)",
    ExitCode.ALREADY_RUNNING: "a daemon with another config holds the control socket",
    ExitCode.PROVISION: "up/down: a pre-flight check or provisioning failed",
    ExitCode.ACCESS: "the control socket belongs to another user",
    ExitCode.INTERRUPTED: "forced exit after a second SIGINT",
}
EXIT_CODES = "exit codes:\n" + "\n".join(
    f"  {c.value:<4}{c.name.lower().replace('_', ' ')}: {EXIT_MEANINGS[c]}" for c in ExitCode)


def build_parser() -> argparse.ArgumentParser:
    formatter = options.Formatter
    parser = argparse.ArgumentParser(
        prog="kci-tunneld", description=DESCRIPTION, epilog=EXIT_CODES, formatter_class=formatter
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    control = options.control()
    launch_options = options.launch(via_default="direct", via_note="; with --auto: docker, never direct")
    start = sub.add_parser(
        "start", parents=[control, options.logging(), launch_options],
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
    start.add_argument("--auto", nargs="?", const="kind", choices=AUTO_MODES, metavar="all",
                       help="discover kind API servers and registries the remote Docker publishes and forward "
                            "each on the same port number here; follow them as they come, go and move "
                            "(config: [auto] enabled = true). --auto=all (follow mode): every TCP port any "
                            "container publishes, within milliseconds of its start, for Testcontainers and "
                            "compose stacks (config: [auto] mode = \"all\"). Without --via: over the Docker "
                            "host in DOCKER_HOST (else the local /var/run/docker.sock); never over direct")
    follow = start.add_argument_group(
        "--auto selectors", "narrow what --auto forwards; repeatable; each replaces the config's list.\n"
                            "A container counts when it matches each kind given (any of its patterns)\n"
                            "and no --auto-exclude.")
    follow.add_argument("--auto-container", dest="auto_containers", action="append", metavar="GLOB",
                        help="container names (config: [auto] containers)")
    follow.add_argument("--auto-image", dest="auto_images", action="append", metavar="GLOB",
                        help="image names, e.g. 'postgres:*' (config: [auto] images)")
    follow.add_argument("--auto-label", dest="auto_labels", action="append", metavar="KEY[=VALUE]",
                        help="a label every container must carry (config: [auto] labels)")
    follow.add_argument("--auto-project", dest="auto_projects", action="append", metavar="NAME",
                        help="a docker compose project (config: [auto] projects)")
    follow.add_argument("--auto-exclude", dest="auto_exclude", action="append", metavar="GLOB",
                        help="leave out containers whose name or image matches (config: [auto] exclude)")
    start.add_argument("--metrics-port", type=int, metavar="PORT",
                       help="serve Prometheus metrics on http://127.0.0.1:PORT/metrics (config: [metrics] port)")

    status = sub.add_parser(
        "status", parents=[control], help="show the daemon's forwards and counters",
        description="Show each forward: state, listen address, target, connections, bytes, last probe.\n"
                    "The table fits the terminal (a narrow one gets fewer columns); --json has everything.",
        epilog="examples:\n  kci-tunneld status\n  kci-tunneld status --json | jq '.forwards[].port'\n\n"
               "exit codes (for scripts): 0 every forward is ready; 4 one is not (the table or the JSON is\n"
               "printed all the same); 7 no daemon answers",
        formatter_class=formatter,
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")

    wait = sub.add_parser(
        "wait", parents=[control], help="wait until every forward is ready",
        description="Block until every forward is ready (listening, and a probe reached its target).",
        epilog="examples:\n  kci-tunneld wait --timeout 120 && skopeo copy ... docker://localhost:5000/app",
        formatter_class=formatter,
    )
    wait.add_argument("--timeout", type=options.seconds, default=60.0, metavar="SECONDS",
                      help="give up after this (default 60); says what it waits for every 5s")

    stop = sub.add_parser(
        "stop", parents=[control], help="stop the daemon gracefully",
        description="Stop accepting, let open connections finish (timeouts.drain), exit.",
        epilog="examples:\n  kci-tunneld stop\n  kci-tunneld stop --cleanup   # also remove the helper container\n"
               "  kci-tunneld stop --now       # end open connections at once\n\n"
               "exit codes: 0 stopped, 4 still running after --timeout (it says whether it drains), 7 none runs",
        formatter_class=formatter,
    )
    stop.add_argument("--cleanup", action="store_true", help="also remove what the transport created remotely")
    stop.add_argument("--now", action="store_true",
                      help="end open connections at once instead of letting them drain (also cuts short a stop "
                           "that is draining)")
    stop.add_argument("--timeout", type=options.seconds, default=30.0, metavar="SECONDS",
                      help="wait this long for the daemon to exit (default 30)")

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
    args.log_given = options.log_settings(args)
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
    if args.helper_image:  # repeated: a list in order of preference
        if "" in args.helper_image:
            raise ConfigError("--helper-image: expected an image name, got ''")
        overrides["docker.helper_images"] = tuple(dict.fromkeys(args.helper_image))
    if args.identity_files:
        overrides["ssh.identity_files"] = tuple(args.identity_files)
    auto = base.auto
    if args.auto:
        auto = dataclasses.replace(auto, enabled=True, mode=args.auto)
    selectors: dict[str, Any] = {}
    for key, flag in (("containers", "container"), ("images", "image"), ("labels", "label"),
                      ("projects", "project"), ("exclude", "exclude")):
        given = getattr(args, f"auto_{key}")
        if given is not None:
            bad = [g for g in given if not g or (key == "labels" and g.startswith("="))]
            if bad:
                wanted = "KEY or KEY=VALUE" if key == "labels" else "a name pattern"
                raise ConfigError(f"--auto-{flag}: expected {wanted}, got {bad[0]!r}")
            selectors[key] = tuple(dict.fromkeys(given))
    auto = dataclasses.replace(auto, **selectors)
    if auto != base.auto:
        if not auto.enabled:
            raise ConfigError("--auto-*: selectors narrow --auto; add --auto (or --auto=all)")
        base = dataclasses.replace(base, auto=auto)
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


def _auto_via(args: argparse.Namespace) -> bool:
    """``--auto`` with no transport chosen (no --via, no ``[transport] via``) goes over the Docker host
    the environment names, never over direct (every found port is forwarded on its own number: over
    direct each would reach its own listener). Sets ``args.via`` and says so; True when it did.

    :raises ConfigError: when the environment names no Docker host.
    :raises TransportError: when it names one that is malformed (DOCKER_HOST, a context).
    """
    if args.via is not None:
        return False
    data = read_toml(args.config) if args.config else {}
    base = config_from_toml(data, args.config) if args.config else Config()
    if names_transport(data) or not (args.auto or base.auto.enabled):
        return False
    # Only --auto needs to know the Docker host here: tunneld.docker.host reads files, opens no socket.
    from tunneld.docker.host import DEFAULT_UNIX_SOCKET, resolve_endpoint

    endpoint = resolve_endpoint(base.transport.docker)
    if endpoint.source == "default" and not os.path.exists(DEFAULT_UNIX_SOCKET):
        raise ConfigError(
            f"--auto without --via: there is no Docker host to list containers on (no DOCKER_HOST, no docker "
            f"context, no {DEFAULT_UNIX_SOCKET}). Pass --via docker with DOCKER_HOST=tcp://HOST:2376 "
            "(and DOCKER_TLS_VERIFY=1, DOCKER_CERT_PATH), or --via ssh://HOST"
        )
    print(f"kci-tunneld: --auto without --via: using the Docker host at {endpoint.host} ({endpoint.source})",
          file=sys.stderr)
    args.via = "docker"
    return True


def _start(args: argparse.Namespace, argv: list[str]) -> int:
    # Bad input fails here, before anything starts.
    check_control_path(args.control)
    chose_via = _auto_via(args)
    config = _config(args)
    existing = loop.run(lambda: probe_existing(args.control))  # another user's socket: AccessError
    if existing is None:
        check_control_dir(args.control.parent)  # where the daemon would put its socket
    else:
        if existing.get("fingerprint") != config.fingerprint():
            raise AlreadyRunningError(
                f"a daemon (pid {existing.get('pid')}) with a different config already runs on {args.control}; "
                "stop it first (`kci-tunneld stop`) or give this one its own --control PATH"
            )
        print(f"kci-tunneld: already running with this config (pid {existing.get('pid')})", file=sys.stderr)
        if args.log_given:
            restart = "`kci-tunneld stop`, then start it again"
            print(f"kci-tunneld: {options.kept_log_settings(args.log_given, restart)}", file=sys.stderr)
        if not args.detach:
            return int(ExitCode.OK)
        return _await_ready(args, config, None, existing.get("log_file"))
    if args.detach:
        log_file = args.log_file or args.control.with_suffix(".log")
        child_argv = [a for a in argv if a != "--detach"]
        child_argv += ["--control", str(args.control), "--log-file", str(log_file)]
        if chose_via:
            child_argv += ["--via", args.via]  # the daemon's reloads keep the transport chosen here
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
    timeout = args.ready_timeout if args.ready_timeout is not None else config.timeouts.ready
    reply = loop.run(functools.partial(launch.wait_ready, args.control, timeout, started=started,
                                       log_file=log_file, progress=_progress))
    print("\n".join(launch.ready_lines(reply)))
    return int(ExitCode.OK)


def _progress(line: str) -> None:
    print(f"kci-tunneld: {line}", file=sys.stderr, flush=True)


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
        reply = await launch.ask(args.control, "status")
        if args.json:
            print(json.dumps(reply, indent=2))
        else:
            print(format_status(reply, width=shutil.get_terminal_size((0, 0)).columns or None))
        # Scripts may rely on it: 0 every forward is ready, 4 one is not (7: no daemon, raised above).
        return int(ExitCode.OK if reply.get("state") == "ready" else ExitCode.NOT_READY)
    if args.command == "wait":
        reply = await launch.wait_ready(args.control, args.timeout, progress=_progress)
        print(format_status(reply, width=shutil.get_terminal_size((0, 0)).columns or None))
        return int(ExitCode.OK)
    if args.command == "reload":
        reply = await launch.ask(args.control, "reload", within=30)
        if not reply.get("ok"):
            # Rejected (nothing changed) or applied with errors: the reply names the exit code.
            raise error_for(reply.get("exit_code"), reply.get("error") or "reload failed", ConfigError)
        print("kci-tunneld: reloaded")
        return int(ExitCode.OK)
    if args.command == "stop":
        pid = await launch.stop(args.control, cleanup=args.cleanup, timeout=args.timeout, now=args.now)
        print(f"kci-tunneld: stopped (pid {pid})")
        return int(ExitCode.OK)
    raise AssertionError(args.command)
