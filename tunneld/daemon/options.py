"""The command-line options that every command starting or talking to a daemon shares, declared
once: ``start`` (tunneld/cli/main.py) and ``up``/``down``/``serve`` (provision/cli.py) take them
as argparse parent parsers."""

from __future__ import annotations

import argparse
import math
import textwrap
from pathlib import Path

from tunneld.daemon.control import CONTROL_ENV, default_control_path

DEFAULT_LOG_LEVEL = "info"
DEFAULT_LOG_FORMAT = "text"

# --via's values, each with what it means when that is not obvious
VIAS = (("direct", ""), ("docker", "the Docker host the docker CLI would use"), ("ssh://[user@]host[:port]", ""))


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; option help wrapped at spaces only, so a path such as
    /tmp/kci-tunneld-0/control.sock is never split at its hyphen (argparse's default)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)


def seconds(text: str) -> float:
    """An argparse type: a number of seconds greater than 0 (``0``, ``-5``, ``soon``, ``nan`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds greater than 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds greater than 0, got {text!r}")
    return value


def control() -> argparse.ArgumentParser:
    """``--control PATH``: which daemon."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--control", type=Path, metavar="PATH",
                   help=f"control socket of the daemon (default: {default_control_path()}; env {CONTROL_ENV})")
    return p


def logging() -> argparse.ArgumentParser:
    """``--log-level`` and ``--log-format``; None when not given (``log_settings`` fills the defaults)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help=f"how much the daemon logs (default {DEFAULT_LOG_LEVEL}; debug: every connection); "
                        "a daemon keeps the level it started with")
    p.add_argument("--log-format", choices=["text", "json"],
                   help="text lines (default), or one JSON object per line")
    return p


def log_settings(args: argparse.Namespace) -> list[str]:
    """Fill in the log defaults; return the log options this command line gave (a running daemon
    keeps its own: the caller says so)."""
    given = [f"--{name.replace('_', '-')}" for name in ("log_level", "log_format", "log_file")
             if getattr(args, name, None) is not None]
    if hasattr(args, "log_level"):
        args.log_level = args.log_level or DEFAULT_LOG_LEVEL
        args.log_format = args.log_format or DEFAULT_LOG_FORMAT
    return given


def kept_log_settings(given: list[str], restart: str) -> str:
    """What to say when a daemon already runs and this command line gave log options it will not take."""
    return (f"it keeps the log settings it was started with ({', '.join(given)} "
            f"appl{'ies' if len(given) == 1 else 'y'} when a daemon starts); to change them, {restart}")


def log_file() -> argparse.ArgumentParser:
    """``--log-file FILE``: where the daemon logs."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--log-file", type=Path, metavar="FILE",
                   help="log here (default with --detach: next to the control socket)")
    return p


def launch(*, via_default: str, via_note: str = "") -> argparse.ArgumentParser:
    """What starting a daemon takes: ``--via`` (``via_default`` when not given; ``via_note`` says
    more), ``--helper-image``, ``--detach``, ``--ready-timeout``, ``--log-file``."""
    p = argparse.ArgumentParser(add_help=False, parents=[log_file()])
    p.add_argument("--via", metavar="TRANSPORT", help=_via_help(via_default) + via_note)
    p.add_argument("--helper-image", metavar="IMAGE", action="append",
                   help="docker transport: helper image (default python:3.13-alpine, then alpine/socat; one with "
                        "python3 carries every connection over a few execs, the fastest); repeat it for a list in "
                        "order of preference: the first already on the Docker host is used, else the first that pulls")
    p.add_argument("--detach", action="store_true",
                   help="run in the background; return once every forward is ready")
    p.add_argument("--ready-timeout", type=seconds, metavar="SECONDS",
                   help="how long to wait for every forward to be ready (default: timeouts.ready, 60)")
    return p


def _via_help(default: str) -> str:
    parts = []
    for name, meaning in VIAS:
        notes = "; ".join(n for n in ("default" if name == default else "", meaning) if n)
        parts.append(f"{name} ({notes})" if notes else name)
    return ", ".join(parts[:-1]) + " or " + parts[-1]
