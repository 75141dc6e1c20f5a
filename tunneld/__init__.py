"""kci-tunneld: forward a remote Docker host's loopback ports here, over Docker, SSH or TCP."""

from __future__ import annotations

from tunneld.api import ForwardHandle, ForwardSet, build_config, open_forward, open_forwards
from tunneld.config import (
    Config,
    ForwardSpec,
    Timeouts,
    TransportSpec,
    load_config,
    parse_config,
    parse_forward_arg,
)
from tunneld.engine.forward import Forward, ForwardState
from tunneld.errors import BindError, ConfigError, ExitCode, NotReadyError, TransportError, TunneldError

__all__ = [
    "BindError",
    "Config",
    "ConfigError",
    "ExitCode",
    "Forward",
    "ForwardHandle",
    "ForwardSet",
    "ForwardSpec",
    "ForwardState",
    "NotReadyError",
    "Timeouts",
    "TransportError",
    "TransportSpec",
    "TunneldError",
    "build_config",
    "load_config",
    "open_forward",
    "open_forwards",
    "parse_config",
    "parse_forward_arg",
]
