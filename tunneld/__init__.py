"""kci-tunneld: forward a remote Docker host's loopback ports here, over Docker, SSH or TCP."""

from __future__ import annotations

from tunneld.config import Config, ForwardSpec, TransportSpec, load_config, parse_config, parse_forward_arg
from tunneld.errors import ExitCode, TunneldError
from tunneld.forward import Forward, ForwardState

__all__ = [
    "Config",
    "ExitCode",
    "Forward",
    "ForwardSpec",
    "ForwardState",
    "TransportSpec",
    "TunneldError",
    "load_config",
    "parse_config",
    "parse_forward_arg",
]
