"""End-to-end probes: each goes through the transport to the far side, as a client's bytes would."""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio

from tunneld.config import ForwardSpec, format_host
from tunneld.errors import TransportError
from tunneld.transports import Transport


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    latency: float
    at: float
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "latency_ms": round(self.latency * 1000, 2), "at": self.at, "error": self.error}


async def probe(transport: Transport, spec: ForwardSpec, *, timeout: float) -> ProbeResult:
    """Reach spec.host:spec.host_port through the transport; for ``http``, expect an HTTP status line."""
    started = time.monotonic()
    try:
        with anyio.fail_after(timeout):
            stream = await transport.connect(spec.host, spec.host_port)
            try:
                if spec.probe == "http":
                    await _http_get(stream, spec)
            finally:
                await stream.aclose()
    except TimeoutError:
        error = f"no answer from {spec.target} within {timeout:g}s"
    except TransportError as e:
        error = str(e)
    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as e:
        error = f"{spec.target} closed the connection during the probe ({type(e).__name__})"
    except ValueError as e:
        error = str(e)
    else:
        return ProbeResult(ok=True, latency=time.monotonic() - started, at=time.time())
    return ProbeResult(ok=False, latency=time.monotonic() - started, at=time.time(), error=error)


async def _http_get(stream: anyio.abc.ByteStream, spec: ForwardSpec) -> None:
    request = f"GET {spec.probe_path} HTTP/1.1\r\nHost: {format_host(spec.host)}:{spec.host_port}\r\nConnection: close\r\n\r\n"
    await stream.send(request.encode())
    head = b""
    while b"\r\n" not in head and len(head) < 4096:
        head += await stream.receive(4096)
    if not head.startswith(b"HTTP/1."):
        raise ValueError(f"{spec.target} answered, but not with HTTP: {head[:40]!r}")
