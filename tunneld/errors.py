"""Errors kci-tunneld raises, each named for what went wrong and mapped to an exit code."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes; the CLI maps every error onto one of these."""

    OK = 0
    ERROR = 1  # unexpected failure (a bug): the log has the traceback
    USAGE = 2  # bad command line (argparse's own code)
    CONFIG = 3  # the config file or a -L/--via value is malformed
    NOT_READY = 4  # a forward did not become ready before the deadline
    BIND = 5  # a local listener could not be bound
    TRANSPORT = 6  # the far side (Docker, SSH, TCP) could not be reached
    NOT_RUNNING = 7  # no daemon answers on the control socket
    ALREADY_RUNNING = 8  # a daemon with another config holds the control socket
    PROVISION = 9  # provisioning (registry, kind cluster) was refused by a pre-flight check or failed
    ACCESS = 10  # the control socket belongs to another user (permission denied)
    INTERRUPTED = 130  # forced exit after a second SIGINT


class TunneldError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = ExitCode.ERROR


class ConfigError(TunneldError):
    """The configuration is malformed; the message names the key and what was expected."""

    exit_code = ExitCode.CONFIG


class BindError(TunneldError):
    """A listener could not be bound; the message names the address."""

    exit_code = ExitCode.BIND


class TransportError(TunneldError):
    """The transport could not open a stream to the far side."""

    exit_code = ExitCode.TRANSPORT


class NotReadyError(TunneldError):
    """Forwards did not become ready before a deadline."""

    exit_code = ExitCode.NOT_READY


class NotRunningError(TunneldError):
    """No daemon answers on the control socket."""

    exit_code = ExitCode.NOT_RUNNING


class AlreadyRunningError(TunneldError):
    """A daemon with a different configuration already runs on the control socket."""

    exit_code = ExitCode.ALREADY_RUNNING


class AccessError(TunneldError):
    """The control socket exists but this user may not use it (it belongs to another user)."""

    exit_code = ExitCode.ACCESS


def error_for(code: object, message: str, default: type[TunneldError] = TunneldError) -> TunneldError:
    """The error a daemon's reply names by its exit code (``reload``'s ``exit_code``), so a client
    exits as the daemon would have; ``default`` when the reply names none this package knows."""
    for kind in (ConfigError, BindError, TransportError, NotReadyError, NotRunningError, AlreadyRunningError,
                 AccessError):
        if code == kind.exit_code:
            return kind(message)
    return default(message)
