"""The command-line options that every command starting or talking to a daemon shares, declared
once: ``start`` (tunneld/cli/main.py) and ``up``/``down``/``serve`` (provision/cli.py) take them
as argparse parent parsers."""

from __future__ import annotations

import argparse
from pathlib import Path

from tunneld.daemon.control import CONTROL_ENV, default_control_path

# --via's values, each with what it means when that is not obvious
VIAS = (("direct", ""), ("docker", "the Docker host the docker CLI would use"), ("ssh://[user@]host[:port]", ""))


def control() -> argparse.ArgumentParser:
    """``--control PATH``: which daemon."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--control", type=Path, metavar="PATH",
                   help=f"control socket of the daemon (default: {default_control_path()}; env {CONTROL_ENV})")
    return p


def logging() -> argparse.ArgumentParser:
    """``--log-level`` and ``--log-format``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text lines, or one JSON object per line")
    return p


def log_file() -> argparse.ArgumentParser:
    """``--log-file FILE``: where the daemon logs."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--log-file", type=Path, metavar="FILE",
                   help="log here (default with --detach: next to the control socket)")
    return p


def launch(*, via_default: str) -> argparse.ArgumentParser:
    """What starting a daemon takes: ``--via`` (``via_default`` when not given), ``--helper-image``,
    ``--detach``, ``--ready-timeout``, ``--log-file``."""
    p = argparse.ArgumentParser(add_help=False, parents=[log_file()])
    p.add_argument("--via", metavar="TRANSPORT", help=_via_help(via_default))
    p.add_argument("--helper-image", metavar="IMAGE",
                   help="docker transport: helper image (default alpine/socat; one with python3, such as "
                        "python:3-alpine, sets up connections faster)")
    p.add_argument("--detach", action="store_true",
                   help="run in the background; return once every forward is ready")
    p.add_argument("--ready-timeout", type=float, metavar="SECONDS",
                   help="how long to wait for every forward to be ready (default: timeouts.ready, 60)")
    return p


def _via_help(default: str) -> str:
    parts = []
    for name, meaning in VIAS:
        notes = "; ".join(n for n in ("default" if name == default else "", meaning) if n)
        parts.append(f"{name} ({notes})" if notes else name)
    return ", ".join(parts[:-1]) + " or " + parts[-1]
