"""Logging: the set-up for the CLI (text or JSON lines, to stderr or a file), and the context a
message is about (``[forward=registry conn=17]``). The library only logs."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

# The LogRecord attribute holding a ContextLog's fields (a name no logging or library attribute uses).
CONTEXT_ATTR = "kci_context"


def context_prefix(fields: dict[str, object]) -> str:
    """``{"forward": "registry", "conn": 17}`` -> ``[forward=registry conn=17]``."""
    return "[" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]"


class ContextLog(logging.LoggerAdapter[logging.Logger]):
    """A logger for one thing (a forward, one of its connections): text lines start with its context,
    ``[forward=registry conn=17] ...``; JSON lines carry it as fields, ``"forward": "registry", "conn": 17``."""

    def __init__(self, logger: logging.Logger, **fields: object) -> None:
        super().__init__(logger, {CONTEXT_ATTR: fields})
        self.fields = fields
        self._prefix: str | None = None  # built at the first message: most connections log nothing

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        if self._prefix is None:
            self._prefix = context_prefix(self.fields)
        kwargs["extra"] = {**(kwargs.get("extra") or {}), CONTEXT_ATTR: self.fields}
        return f"{self._prefix} {msg}", kwargs


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and exc when there is one), plus the fields of
    the message's context (``forward``, ``conn``), which then leaves ``msg``."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": msg,
        }
        fields = getattr(record, CONTEXT_ATTR, None)
        if isinstance(fields, dict) and fields:
            prefix = context_prefix(fields) + " "
            if msg.startswith(prefix):
                out["msg"] = msg[len(prefix):]
            for key, value in fields.items():
                out.setdefault(str(key), value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def make_private(file: Path) -> None:
    """Create ``file`` (and its directory) readable by this user only, or make an existing one so:
    a log names hosts, ports and containers, and nobody else needs them."""
    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def setup_logging(level: str = "info", fmt: str = "text", file: Path | None = None) -> None:
    if file:
        make_private(file)
    handler: logging.Handler = logging.FileHandler(file) if file else logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Foreign libraries are chatty at info; their warnings still show.
    for name in ("asyncssh", "aiohttp", "aiodocker"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
