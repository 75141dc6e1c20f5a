"""Observability: Prometheus text metrics, `status` (table and JSON) and JSON-lines logs, on a real daemon."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.cli.runner import Cli
from tests.servers import EchoServer, free_port_holder
from tunneld.cli.status import format_status
from tunneld.daemon.metrics import render

pytestmark = pytest.mark.timeout(60)


def sample_status() -> dict[str, object]:
    forward = {
        "name": 'odd"name\\x', "listen": ["127.0.0.1:5000"], "port": 5000, "target": "127.0.0.1:5000",
        "state": "degraded", "active": 2, "total": 7, "bytes_up": 1024, "bytes_down": 4096, "errors": 1,
        "reconnects": 3, "probe": "http", "state_since": 1000.0, "last_ok": 990.0,
        "last_probe": {"ok": False, "latency_ms": 12.5, "at": 1001.0, "error": "refused", "detail": None},
        "last_error": "could not connect to 127.0.0.1:5000: Connection refused", "source": "auto",
        "history": [{"at": 900.0, "from": "starting", "to": "ready", "after": 0.1, "reason": None},
                    {"at": 1000.0, "from": "ready", "to": "degraded", "after": 100.0, "reason": "refused"}],
    }
    return {"pid": 1, "state": "degraded", "forwards": [forward],
            "transport": {"kind": "ssh", "state": "reconnecting", "reconnects": 4, "last_error": "connection lost"},
            "auto": {"enabled": True, "scans": 9, "last_scan": 1000.0, "last_error": None, "found": [{}],
                     "events": [{"at": 899.0, "event": "found registry r publishing 5000: forwarding it as r"}]},
            "metrics": ["127.0.0.1:9464"]}


def test_render_is_prometheus_text() -> None:
    text = render(sample_status())
    assert text.endswith("\n")
    label = 'forward="odd\\"name\\\\x"'
    for line in (
        f"kci_tunneld_forward_up{{{label}}} 0",
        f'kci_tunneld_forward_state{{{label},state="degraded"}} 1',
        f'kci_tunneld_forward_state{{{label},state="ready"}} 0',
        f"kci_tunneld_forward_connections_active{{{label}}} 2",
        f'kci_tunneld_forward_bytes_total{{{label},direction="up"}} 1024',
        f'kci_tunneld_forward_bytes_total{{{label},direction="down"}} 4096',
        f"kci_tunneld_forward_errors_total{{{label}}} 1",
        f"kci_tunneld_forward_reconnects_total{{{label}}} 3",
        f"kci_tunneld_forward_probe_latency_seconds{{{label}}} 0.0125",
        'kci_tunneld_transport_up{transport="ssh"} 0',
        'kci_tunneld_transport_reconnects_total{transport="ssh"} 4',
        "kci_tunneld_auto_scans_total 9",
    ):
        assert line in text.splitlines(), line
    # Every sample belongs to a family announced with HELP and TYPE.
    families = set(re.findall(r"^# TYPE (\S+) (?:gauge|counter)$", text, flags=re.MULTILINE))
    for sample in (ln for ln in text.splitlines() if not ln.startswith("#")):
        assert re.match(r"^[a-z_]+(\{.*\})? -?[0-9.e+-]+$", sample), sample
        assert sample.split("{")[0].split(" ")[0] in families


def test_status_table_shows_state_probe_reconnects_and_the_last_error() -> None:
    table = format_status(sample_status(), now=1010.0)
    lines = table.splitlines()
    assert lines[0] == ("kci-tunneld pid 1 degraded via ssh "
                        "(state reconnecting, reconnects 4, last error: connection lost)")
    assert lines[1].startswith("auto: 1 found, 9 scans, last 10s ago")
    assert lines[2] == "metrics: http://127.0.0.1:9464/metrics"
    header, row = lines[3].split(), lines[4].split()
    assert header[:3] == ["NAME", "STATE", "SINCE"] and "RECONN" in header and "PROBE" in header
    assert row[:4] == ['odd"name\\x', "(auto)", "degraded", "10s"] and "failed after 12.5ms" in lines[4]
    at = lines.index("last errors:")
    assert lines[at + 1] == '  odd"name\\x: could not connect to 127.0.0.1:5000: Connection refused'
    def hms(t: float) -> str:
        return time.strftime("%H:%M:%S", time.localtime(t))

    assert lines[at + 2:] == [
        "recent events:",
        f"  {hms(899)} auto: found registry r publishing 5000: forwarding it as r",
        f"  {hms(1000)} odd\"name\\x: ready -> degraded after 100.0s (refused)",
    ]


def scrape(address: str, path: str = "/metrics") -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def test_metrics_port_serves_what_status_shows(cli: Cli, echo_server: EchoServer) -> None:
    result = cli.start_detached("-L", f"127.0.0.1:0:127.0.0.1:{echo_server.port}", "--metrics-port", "0")
    assert result.returncode == 0, result.stderr
    status = cli.status()
    (address,) = status["metrics"]
    assert address.startswith("127.0.0.1:")  # loopback only, by default
    port = status["forwards"][0]["port"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"x" * 1000)
        got = b""
        while len(got) < 1000:
            got += s.recv(4096)
    code, ctype, text = scrape(address)
    assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
    name = f'forward="127.0.0.1:0:127.0.0.1:{echo_server.port}"'
    assert f"kci_tunneld_forward_up{{{name}}} 1" in text
    assert f'kci_tunneld_forward_bytes_total{{{name},direction="up"}} 1000' in text
    assert f'kci_tunneld_forward_bytes_total{{{name},direction="down"}} 1000' in text
    assert f"kci_tunneld_forward_connections_total{{{name}}} 1" in text
    assert scrape(address, "/other")[0] == 404
    table = cli.run("status").stdout
    assert f"metrics: http://{address}/metrics" in table


def test_metrics_port_in_use_is_a_bind_error(cli: Cli, echo_server: EchoServer) -> None:
    holder = free_port_holder()
    port = holder.getsockname()[1]
    try:
        result = cli.run("start", "-L", f"127.0.0.1:0:127.0.0.1:{echo_server.port}", "--metrics-port", str(port),
                         timeout=30)
    finally:
        holder.close()
    assert result.returncode == 5, result.stderr
    assert f"cannot listen for metrics on 127.0.0.1:{port}" in result.stderr


def test_json_log_lines(cli: Cli, echo_server: EchoServer, tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    result = cli.start_detached("-L", f"127.0.0.1:0:127.0.0.1:{echo_server.port}", "--log-format", "json",
                                "--log-file", str(log))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert any(r["logger"] == "tunneld.engine.forward" and "state starting -> ready" in r["msg"] for r in records)
