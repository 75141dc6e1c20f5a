"""kci-tunneld's command line: a thin shell that parses, loads config, sets up logging, calls the
library and maps its errors onto named exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from provision import cli as provision_cli
from tunneld import loop
from tunneld.config import Config, load_config, merge_cli
from tunneld.daemon.control import default_control_path, probe_existing, request
from tunneld.daemon.lifecycle import Daemon, not_ready_reason
from tunneld.daemon.notify import Notifier
from tunneld.daemon.processes import first_error, log_size, log_tail, pid_alive
from tunneld.errors import AlreadyRunningError, ConfigError, ExitCode, NotReadyError, NotRunningError, TunneldError
from tunneld.logs import setup_logging

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
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    control = argparse.ArgumentParser(add_help=False)
    control.add_argument(
        "--control", type=Path, metavar="PATH",
        help=f"control socket of the daemon (default: {default_control_path()}; env KCI_TUNNELD_CONTROL)",
    )
    logging_opts = argparse.ArgumentParser(add_help=False)
    logging_opts.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    logging_opts.add_argument("--log-format", default="text", choices=["text", "json"],
                              help="text lines, or one JSON object per line")

    start = sub.add_parser(
        "start", parents=[control, logging_opts], help="run the forwarding daemon",
        description="Run the daemon: listen here, reach HOST:HOSTPORT on the far side.",
        epilog=START_EXAMPLES + "\n\n" + EXIT_CODES, formatter_class=formatter,
    )
    start.add_argument("-L", dest="forwards", action="append", default=[], metavar="[BIND:]PORT:HOST:HOSTPORT",
                       help="forward BIND:PORT here to HOST:HOSTPORT as the far side sees it (BIND defaults to "
                            "localhost = 127.0.0.1 and ::1; PORT 0 picks a free port); repeatable")
    start.add_argument("--via", metavar="TRANSPORT",
                       help="direct (default), docker (the Docker host the docker CLI would use), "
                            "or ssh://[user@]host[:port]")
    start.add_argument("--config", type=Path, metavar="FILE", help="TOML config file (see docs/configuration.md)")
    start.add_argument("--provision", action="store_true",
                       help="first provision the registry (and a kind cluster) on the Docker host and keep "
                            "reconciling them: the same as `kci-tunneld up`, whose options it takes")
    start.add_argument("--detach", action="store_true",
                       help="run in the background; return once every forward is ready")
    start.add_argument("--log-file", type=Path, metavar="FILE",
                       help="log here (default with --detach: next to the control socket)")
    start.add_argument("--allow-non-loopback", action="store_true",
                       help="allow BIND addresses other than loopback (exposes the far side to the network)")
    start.add_argument("--helper-image", metavar="IMAGE",
                       help="docker transport: helper image (default alpine/socat; one with python3, such as "
                       "python:3-alpine, sets up connections faster)")
    start.add_argument("-i", dest="identity_files", action="append", default=[], metavar="FILE",
                       help="ssh transport: private key file; repeatable")
    start.add_argument("--ready-timeout", type=float, metavar="SECONDS",
                       help="with --detach, how long to wait for readiness (default: timeouts.ready, 60)")
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
    provision_cli.add_subcommands(sub, [control, logging_opts])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["start"] and "--provision" in argv:
        # `start --provision` is `up` in the foreground: provision, forward, reconcile in the daemon.
        argv = ["up", *(a for a in argv[1:] if a != "--provision")]
    args = build_parser().parse_args(argv)
    args.control = args.control or default_control_path()
    try:
        if args.command in ("up", "down", "serve"):
            return provision_cli.dispatch(args)
        if args.command == "start":
            return _start(args, argv)
        return loop.run(lambda: _client(args))
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
        return _await_ready(args, config, child=None, log_file=existing.get("log_file"))
    if args.detach:
        return _detach(args, argv, config)
    setup_logging(args.log_level, args.log_format, args.log_file)
    _raise_open_file_limit()
    daemon = Daemon(lambda: _config(args), control_path=args.control, notifier=Notifier(),
                    log_file=str(args.log_file) if args.log_file else None)
    try:
        return int(loop.run(daemon.run))
    except BaseExceptionGroup as group:
        raise first_error(group) from None


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

def _detach(args: argparse.Namespace, argv: list[str], config: Config) -> int:
    log_file = args.log_file or args.control.with_suffix(".log")
    log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    child_argv = [a for a in argv if a != "--detach"]
    child_argv += ["--control", str(args.control), "--log-file", str(log_file)]
    log_start = log_size(log_file)
    with open(log_file, "ab") as log:
        # A new session, and no inherited stdin/stdout/stderr: a CI step must never hang on us.
        child = subprocess.Popen(
            [sys.executable, "-m", "tunneld", *child_argv],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
        )
    return _await_ready(args, config, child=child, log_file=str(log_file), log_start=log_start)


def _await_ready(args: argparse.Namespace, config: Config, *, child: subprocess.Popen[bytes] | None,
                 log_file: str | None, log_start: int = 0) -> int:
    timeout = args.ready_timeout or config.timeouts.ready
    deadline = time.monotonic() + timeout
    reply: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            print(f"kci-tunneld: the daemon exited with code {child.returncode} before it was ready:", file=sys.stderr)
            print(log_tail(log_file, start=log_start), file=sys.stderr)
            return child.returncode or int(ExitCode.ERROR)
        try:
            step = min(1.0, max(0.05, deadline - time.monotonic()))
            reply = loop.run(functools.partial(request, args.control, "wait", timeout=step))
        except NotRunningError:
            time.sleep(0.05)  # the daemon is still binding its control socket
            continue
        if reply.get("ok"):
            _print_ready(reply)
            return int(ExitCode.OK)
    reason = not_ready_reason(reply["forwards"], timeout, reply.get("auto")) if reply else "the daemon did not answer"
    pid = child.pid if child is not None else (reply or {}).get("pid")
    print(f"kci-tunneld: {reason}\n  the daemon (pid {pid}) keeps running and retrying; log: {log_file}\n"
          "  keep waiting with `kci-tunneld wait`, or end it with `kci-tunneld stop`", file=sys.stderr)
    return int(ExitCode.NOT_READY)


def _print_ready(reply: dict[str, Any]) -> None:
    print(f"kci-tunneld: ready (pid {reply.get('pid')}); log: {reply.get('log_file')}")
    for f in reply.get("forwards", []):
        found = f" (found: {f['container']})" if f.get("container") else ""
        print(f"  {f['name']}: {', '.join(f['listen'])} -> {f['target']}{found}")
    if (reply.get("auto") or {}).get("enabled") and not reply.get("forwards"):
        print("  --auto found nothing to forward yet; it keeps looking (see `kci-tunneld status`)")


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
            raise ConfigError(reply.get("error") or "reload failed")
        print("kci-tunneld: reloaded")
        return int(ExitCode.OK)
    if args.command == "stop":
        reply = await request(args.control, "stop", cleanup=args.cleanup)
        pid = int(reply["pid"])
        with anyio.move_on_after(args.timeout):
            # Another process's exit has no event to await here (not our child): poll it.
            while pid_alive(pid):  # noqa: ASYNC110
                await anyio.sleep(0.05)
            print(f"kci-tunneld: stopped (pid {pid})")
            return int(ExitCode.OK)
        print(f"kci-tunneld: pid {pid} still running after {args.timeout:g}s", file=sys.stderr)
        return int(ExitCode.ERROR)
    raise AssertionError(args.command)


def format_status(reply: dict[str, Any], now: float | None = None) -> str:
    """The human table `status` prints: a header, one row per forward, then what went wrong."""
    now = time.time() if now is None else now
    rows = [("NAME", "STATE", "SINCE", "LISTEN", "TARGET", "ACTIVE", "TOTAL", "UP", "DOWN", "ERRORS", "RECONN",
             "PROBE")]
    problems = []
    for f in reply.get("forwards", []):
        probe = f.get("last_probe") or {}
        if not probe:
            probe_text = "-"
        elif probe.get("ok"):
            probe_text = f"ok {probe['latency_ms']}ms" + (f" ({probe['detail']})" if probe.get("detail") else "")
        else:
            probe_text = f"failed after {probe['latency_ms']}ms"
        since = _ago(now, f.get("state_since"))
        name = f["name"] + (" (auto)" if f.get("source") == "auto" else "")
        rows.append((name, f["state"], since, ",".join(f["listen"]), f["target"], str(f["active"]), str(f["total"]),
                     _bytes(f["bytes_up"]), _bytes(f["bytes_down"]), str(f["errors"]), str(f.get("reconnects", 0)),
                     probe_text))
        if f.get("last_error") and (f["state"] != "ready" or not probe.get("ok")):
            problems.append(f"  {f['name']}: {f['last_error']}")
        elif f.get("last_error"):
            problems.append(f"  {f['name']} (earlier; ready again): {f['last_error']}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows]
    out = [_status_header(reply, now), *lines]
    if problems:
        out += ["last errors:", *problems]
    events = _recent_events(reply)
    if events:
        out += ["recent events:", *events]
    return "\n".join(out)


def _recent_events(reply: dict[str, Any], limit: int = 10) -> list[str]:
    """State changes of the forwards and what --auto found, newest last: what happened, and when."""
    rows: list[tuple[float, str]] = []
    for f in reply.get("forwards", []):
        for h in f.get("history") or []:
            if h["from"] == "starting" and h["to"] == "ready":
                continue  # every start looks like this: not news
            text = f"{f['name']}: {h['from']} -> {h['to']} after {h['after']:.1f}s"
            rows.append((h["at"], text + (f" ({h['reason']})" if h.get("reason") else "")))
    for e in (reply.get("auto") or {}).get("events") or []:
        rows.append((e["at"], f"auto: {e['event']}"))
    rows.sort(key=lambda r: r[0])
    return [f"  {time.strftime('%H:%M:%S', time.localtime(at))} {text}" for at, text in rows[-limit:]]


def _status_header(reply: dict[str, Any], now: float) -> str:
    transport = reply.get("transport") or {}
    head = f"kci-tunneld pid {reply.get('pid')} {reply.get('state')} via {transport.get('kind', '?')}"
    facts = [f"{k} {transport[k]}" for k in ("state", "relay", "reconnects") if transport.get(k) is not None]
    if transport.get("last_error") and transport.get("state") not in (None, "connected", "ready"):
        facts.append(f"last error: {transport['last_error']}")
    if facts:
        head += " (" + ", ".join(facts) + ")"
    auto = reply.get("auto") or {}
    if auto.get("enabled"):
        found = len(auto.get("found") or [])
        head += f"\nauto: {found} found, {auto.get('scans', 0)} scans, last {_ago(now, auto.get('last_scan'))} ago"
        if auto.get("last_error"):
            head += f"; cannot list containers: {auto['last_error']}"
    for address in reply.get("metrics") or []:
        head += f"\nmetrics: http://{address}/metrics"
        break
    return head


def _ago(now: float, then: object) -> str:
    if not isinstance(then, (int, float)):
        return "-"
    secs = max(0.0, now - then)
    if secs < 120:
        return f"{secs:.0f}s"
    if secs < 7200:
        return f"{secs / 60:.0f}m"
    return f"{secs / 3600:.1f}h"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kci-tunneld")
    except PackageNotFoundError:
        return "dev"
