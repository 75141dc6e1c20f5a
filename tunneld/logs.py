"""Logging set-up for the CLI: text or JSON lines, to stderr or a file. The library only logs."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and exc when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


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
