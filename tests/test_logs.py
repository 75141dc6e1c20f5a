"""The log's context: a forward's and a connection's messages start with ``[forward=NAME conn=N]`` in
text, and carry ``"forward"`` and ``"conn"`` as fields of their JSON object (``msg`` without the
prefix), in a real daemon's log file; and the formatter on its own."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from tests.cli.runner import Cli
from tests.servers import EchoServer, echo_through
from tunneld.logs import ContextLog, JsonFormatter

pytestmark = pytest.mark.timeout(90)


def run_daemon(cli: Cli, echo_server: EchoServer, log: Path, fmt: str) -> str:
    """A daemon with one forward to the echo server; one connection through it, then stopped (so every
    line of that connection is in the log); returns the forward's name."""
    result = cli.start_detached("-L", f"127.0.0.1:0:127.0.0.1:{echo_server.port}", "--log-format", fmt,
                                "--log-level", "debug", "--log-file", str(log))
    assert result.returncode == 0, result.stderr
    (forward,) = cli.status()["forwards"]
    assert echo_through(forward["port"], b"logged", timeout=10) == b"logged"
    assert cli.run("stop", timeout=30).returncode == 0
    return str(forward["name"])


def test_json_lines_carry_the_forward_and_the_connection_as_fields(cli: Cli, echo_server: EchoServer,
                                                                  tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    name = run_daemon(cli, echo_server, log, "json")
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    ours = [r for r in records if r.get("forward") == name]
    # The forward's own lines: the field, and no prefix left in the message.
    listening = next(r for r in ours if r["msg"].startswith("listening on 127.0.0.1:"))
    assert "conn" not in listening and listening["level"] == "info" and listening["logger"] == "tunneld.engine.forward"
    # The connection's lines (at debug): both fields, conn a number, the same for its every line.
    conns = [r for r in ours if "conn" in r]
    assert conns and all(type(r["conn"]) is int for r in conns)
    (conn,) = {r["conn"] for r in conns}
    msgs = [r["msg"] for r in conns]
    assert re.fullmatch(r"accepted from \('127\.0\.0\.1', \d+\)", msgs[0]) and msgs[-1] == "closed"
    assert not any(r["msg"].startswith("[") for r in records), "a context prefix was left in a JSON message"
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert conn >= 1


def test_text_lines_keep_the_context_prefix(cli: Cli, echo_server: EchoServer, tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    name = run_daemon(cli, echo_server, log, "text")
    text, forward = log.read_text(), re.escape(name)
    assert re.search(rf" INFO    tunneld\.engine\.forward: \[forward={forward}\] listening on 127\.0\.0\.1:", text)
    assert re.search(rf" DEBUG   tunneld\.engine\.forward: \[forward={forward} conn=\d+\] accepted from ", text)


def test_the_formatter_keeps_its_own_fields_and_anything_json_cannot_say() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("tests.test_logs.formatter")
    logger.addHandler(Keep())
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    ContextLog(logger, forward="registry", conn=17, msg="not mine", odd=object()).info("closed after %d bytes", 5)
    ContextLog(logger, forward="registry").warning("probe failed: %s", "refused")
    logging.getLogger("tests.test_logs.formatter").info("[forward=x] written by hand")
    first, second, third = (json.loads(JsonFormatter().format(r)) for r in records)
    assert first["msg"] == "closed after 5 bytes" and first["forward"] == "registry" and first["conn"] == 17
    assert first["odd"].startswith("<object object at ")  # not serialisable: as text, never an error
    assert second == {**second, "msg": "probe failed: refused", "forward": "registry", "level": "warning"}
    assert "conn" not in second
    assert third["msg"] == "[forward=x] written by hand" and "forward" not in third  # no context: left as it is
    assert records[0].getMessage().startswith("[forward=registry conn=17 msg=not mine odd=<object object at ")
