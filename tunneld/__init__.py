"""kci-tunneld: forward a remote Docker host's loopback ports here, over Docker, SSH or TCP.

The names below are imported on first use (PEP 562): ``import tunneld`` and every CLI command
start without loading the engine, the daemon or a transport's foreign library until they are
asked for. Type checkers see them through the ``TYPE_CHECKING`` imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tunneld.version import __version__

if TYPE_CHECKING:
    from tunneld.api import ForwardEvent, ForwardHandle, ForwardSet, build_config, open_forward, open_forwards
    from tunneld.config import (
        AutoSettings,
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

# name -> the module that defines it
_EXPORTS = {
    "AutoSettings": "tunneld.config",
    "BindError": "tunneld.errors",
    "Config": "tunneld.config",
    "ConfigError": "tunneld.errors",
    "ExitCode": "tunneld.errors",
    "Forward": "tunneld.engine.forward",
    "ForwardEvent": "tunneld.api",
    "ForwardHandle": "tunneld.api",
    "ForwardSet": "tunneld.api",
    "ForwardSpec": "tunneld.config",
    "ForwardState": "tunneld.engine.forward",
    "NotReadyError": "tunneld.errors",
    "Timeouts": "tunneld.config",
    "TransportError": "tunneld.errors",
    "TransportSpec": "tunneld.config",
    "TunneldError": "tunneld.errors",
    "build_config": "tunneld.api",
    "load_config": "tunneld.config",
    "open_forward": "tunneld.api",
    "open_forwards": "tunneld.api",
    "parse_config": "tunneld.config",
    "parse_forward_arg": "tunneld.config",
}

__all__ = [
    "AutoSettings",
    "BindError",
    "Config",
    "ConfigError",
    "ExitCode",
    "Forward",
    "ForwardEvent",
    "ForwardHandle",
    "ForwardSet",
    "ForwardSpec",
    "ForwardState",
    "NotReadyError",
    "Timeouts",
    "TransportError",
    "TransportSpec",
    "TunneldError",
    "__version__",
    "build_config",
    "load_config",
    "open_forward",
    "open_forwards",
    "parse_config",
    "parse_forward_arg",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tunneld' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
