"""Prometheus text metrics (exposition format 0.0.4) over a tiny HTTP server on a loopback port.

The numbers are the ones ``status`` shows, rendered from the same snapshot, so the two never
disagree. Counters restart from 0 when a forward is re-created (a discovered container moved).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import anyio
import anyio.abc

from tunneld.config import format_host
from tunneld.errors import BindError

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_STATES = ("starting", "ready", "degraded", "reconnecting", "failed", "stopping", "stopped")
_MAX_REQUEST = 8192
_IO_TIMEOUT = 5.0

StatusSource = Callable[[], Mapping[str, Any]]


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Mapping[str, object]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class _Family:
    def __init__(self, name: str, kind: str, help_: str) -> None:
        self.name, self.kind, self.help = name, kind, help_
        self.samples: list[tuple[dict[str, object], float]] = []

    def add(self, value: float | int | bool, **labels: object) -> None:
        self.samples.append((labels, float(value)))

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, value in self.samples:
            text = repr(value) if value != int(value) else str(int(value))
            yield f"{self.name}{_labels(labels)} {text}"


def render(status: Mapping[str, Any]) -> str:
    """The metrics text for one ``status`` snapshot."""
    p = "kci_tunneld_"
    fams = {
        "up": _Family(f"{p}forward_up", "gauge",
                      "1 when the forward listens and its last probe through the transport succeeded"),
        "state": _Family(f"{p}forward_state", "gauge", "1 for the forward's current state"),
        "active": _Family(f"{p}forward_connections_active", "gauge", "Client connections open now"),
        "total": _Family(f"{p}forward_connections_total", "counter", "Client connections accepted"),
        "bytes": _Family(f"{p}forward_bytes_total", "counter",
                         "Bytes relayed; direction up is client to far side, down is far side to client"),
        "errors": _Family(f"{p}forward_errors_total", "counter",
                          "Connections that could not reach the far side or whose far side broke mid-stream"),
        "reconnects": _Family(f"{p}forward_reconnects_total", "counter",
                              "Times the forward became ready again after losing readiness"),
        "probe_ok": _Family(f"{p}forward_probe_success", "gauge", "1 when the last probe succeeded"),
        "latency": _Family(f"{p}forward_probe_latency_seconds", "gauge", "Duration of the last probe"),
        "probe_at": _Family(f"{p}forward_last_probe_timestamp_seconds", "gauge", "When the last probe ran"),
    }
    for f in status.get("forwards") or []:
        name = f["name"]
        fams["up"].add(f["state"] == "ready", forward=name)
        for state in _STATES:
            fams["state"].add(f["state"] == state, forward=name, state=state)
        fams["active"].add(f["active"], forward=name)
        fams["total"].add(f["total"], forward=name)
        fams["bytes"].add(f["bytes_up"], forward=name, direction="up")
        fams["bytes"].add(f["bytes_down"], forward=name, direction="down")
        fams["errors"].add(f["errors"], forward=name)
        fams["reconnects"].add(f.get("reconnects", 0), forward=name)
        probe = f.get("last_probe")
        if probe:
            fams["probe_ok"].add(bool(probe["ok"]), forward=name)
            fams["latency"].add(probe["latency_ms"] / 1000, forward=name)
            fams["probe_at"].add(probe["at"], forward=name)
    transport = status.get("transport") or {}
    kind = transport.get("kind", "unknown")
    tfam = _Family(f"{p}transport_up", "gauge", "0 while the transport reports it is reconnecting or failed")
    tfam.add(transport.get("state") not in ("reconnecting", "failed"), transport=kind)
    out = [line for fam in [*fams.values(), tfam] for line in fam.lines()]
    if isinstance(transport.get("reconnects"), int):
        rfam = _Family(f"{p}transport_reconnects_total", "counter", "Times the transport re-established its connection")
        rfam.add(transport["reconnects"], transport=kind)
        out += rfam.lines()
    auto = status.get("auto") or {}
    if auto.get("enabled"):
        afam = _Family(f"{p}auto_scan_ok", "gauge", "1 when the last look at the remote Docker succeeded")
        afam.add(auto.get("last_error") is None and bool(auto.get("scans")))
        sfam = _Family(f"{p}auto_scans_total", "counter", "Successful looks at the remote Docker")
        sfam.add(auto.get("scans", 0))
        ffam = _Family(f"{p}auto_forwards", "gauge", "Forwards --auto currently wants")
        ffam.add(len(auto.get("found") or []))
        out += [*afam.lines(), *sfam.lines(), *ffam.lines()]
    return "\n".join(out) + "\n"


async def serve_metrics(bind: str, port: int, source: StatusSource, *,
                        task_status: anyio.abc.TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve ``GET /metrics`` on bind:port until cancelled; ``started`` with the bound addresses.

    :raises BindError: naming the address when it cannot be bound.
    """
    try:
        listener = await anyio.create_tcp_listener(local_host=bind, local_port=port, reuse_port=False)
    except OSError as e:
        raise BindError(f"cannot listen for metrics on {format_host(bind)}:{port}: {e.strerror or e}") from None
    async with listener:
        addresses = []
        for sub in getattr(listener, "listeners", [listener]):
            host, bound = sub.extra(anyio.abc.SocketAttribute.local_address)[:2]
            addresses.append(f"{format_host(str(host))}:{bound}")
        logger.info("metrics on http://%s/metrics", addresses[0])
        task_status.started(addresses)
        await listener.serve(lambda stream: _serve_one(stream, source))


async def _serve_one(stream: anyio.abc.SocketStream, source: StatusSource) -> None:
    async with stream:
        head = b""
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, TimeoutError):
            with anyio.fail_after(_IO_TIMEOUT):
                while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) < _MAX_REQUEST:
                    head += await stream.receive(4096)
                parts = head.split(b"\r\n", 1)[0].split()
                if len(parts) >= 2 and parts[0] in (b"GET", b"HEAD") and parts[1].split(b"?")[0] == b"/metrics":
                    body = render(source()).encode()
                    status, ctype = "200 OK", CONTENT_TYPE
                else:
                    body = b"kci-tunneld: metrics are at /metrics\n"
                    status, ctype = "404 Not Found", "text/plain; charset=utf-8"
                head_out = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                            "Connection: close\r\n\r\n").encode()
                await stream.send(head_out + (body if parts[:1] != [b"HEAD"] else b""))
