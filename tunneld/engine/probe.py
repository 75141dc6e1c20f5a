"""End-to-end probes: each goes through the transport to the far side, as a client's bytes would.

- ``tcp``: the transport's connect() returned, i.e. the far side's TCP connection is established;
- ``http``: a GET of ``probe_path`` answered with any HTTP status below 500 (a registry's ``/v2/``
  answers 200, or 401 when it wants a login: both mean it serves);
- ``https``: a TLS handshake through the stream. When a kubeconfig names a server on this forward's
  local port (kind's ``https://127.0.0.1:PORT``), with that context's CA and client certificate or
  token, then a GET of ``/readyz`` (or ``probe_path``) that must answer 200. Without credentials
  the handshake alone is the probe: the server is not verified, and nothing is sent over it.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream

from tunneld.config import ForwardSpec, format_host
from tunneld.errors import TransportError
from tunneld.kubeconfig import ApiCredentials, KubeconfigError, credentials_for_port
from tunneld.tls import TlsMaterialError, client_context, ssl_reason
from tunneld.transports import Transport

_MAX_HEAD = 8192
_READYZ = "/readyz"
# After the check: how long, and how many bytes, to read while the far side finishes.
_LINGER = 1.0
_LINGER_BYTES = 256 * 1024


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    latency: float
    at: float
    error: str | None = None
    detail: str | None = None  # what was checked: "HTTP 200", "TLS handshake (no credentials)", ...

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "latency_ms": round(self.latency * 1000, 2), "at": self.at, "error": self.error,
                "detail": self.detail}


class ProbeFailed(Exception):
    """The far side answered, but not as a healthy service would; the message says how."""


async def probe(
    transport: Transport, spec: ForwardSpec, *, deadline: float, local_port: int | None = None
) -> ProbeResult:
    """Reach spec.host:spec.host_port through the transport and check it as ``spec.probe`` says,
    all within ``deadline`` seconds.

    ``local_port`` (the port the forward listens on) selects kubeconfig credentials for ``https``.
    Never raises for a failed probe: the result says what failed.
    """
    started = time.monotonic()
    latency: float | None = None
    detail: str | None = None
    try:
        with anyio.fail_after(deadline):
            stream: anyio.abc.ByteStream = await transport.connect(spec.host, spec.host_port)
            try:
                detail, outer = await _check(stream, spec, local_port or spec.port)
                latency = time.monotonic() - started
                await _linger(outer)
            finally:
                await stream.aclose()
    except TimeoutError:
        if latency is None:
            error = f"no answer from {spec.target} within {deadline:g}s"
    except TransportError as e:
        error = str(e)
    except ssl.SSLError as e:
        error = f"TLS handshake with {spec.target} failed: {ssl_reason(e)}"
    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as e:
        error = f"{spec.target} closed the connection during the probe ({_why(e)})"
    except (ProbeFailed, KubeconfigError) as e:
        error = str(e)
    if latency is not None:
        return ProbeResult(ok=True, latency=latency, at=time.time(), detail=detail)
    return ProbeResult(ok=False, latency=time.monotonic() - started, at=time.time(), error=error)


async def _check(stream: anyio.abc.ByteStream, spec: ForwardSpec, local_port: int) -> tuple[str, anyio.abc.ByteStream]:
    """Run the probe's check on a connected stream; return what was checked and the stream to linger on.

    Each check ends by letting the far side finish (half-close, or ``Connection: close``), so the
    probe leaves as politely as a good client: no reset, nothing for a relay to abandon.
    """
    if spec.probe == "http":
        status = await _http_get(stream, spec, spec.probe_path, host=f"{format_host(spec.host)}:{spec.host_port}")
        if status >= 500:
            raise ProbeFailed(f"GET {spec.probe_path} on {spec.target} answered HTTP {status}")
        return f"HTTP {status}", stream
    if spec.probe == "https":
        return await _https(stream, spec, local_port)
    await stream.send_eof()
    return "TCP connect", stream


async def _linger(stream: anyio.abc.ByteStream) -> None:
    """Read what the far side still sends until its EOF, briefly; the check has passed already."""
    received = 0
    with anyio.move_on_after(_LINGER):
        try:
            while received < _LINGER_BYTES:
                received += len(await stream.receive(65536))
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass


async def _http_get(stream: anyio.abc.ByteStream, spec: ForwardSpec, path: str, *, host: str,
                    token: str | None = None) -> int:
    """Send one GET and return the status code of the answer."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}User-Agent: kci-tunneld-probe\r\nConnection: close\r\n\r\n"
    await stream.send(request.encode())
    head = b""
    while b"\r\n" not in head and len(head) < _MAX_HEAD:
        head += await stream.receive(4096)
    line = head.split(b"\r\n", 1)[0]
    parts = line.split()
    if not line.startswith(b"HTTP/1.") or len(parts) < 2 or not parts[1].isdigit():
        raise ProbeFailed(f"{spec.target} answered, but not with HTTP: {head[:40]!r}")
    return int(parts[1])


async def _https(stream: anyio.abc.ByteStream, spec: ForwardSpec, local_port: int) -> tuple[str, anyio.abc.ByteStream]:
    """Handshake (and with credentials, GET /readyz) over ``stream``; the detail and the TLS stream."""
    creds = credentials_for_port(local_port)
    tls = await TLSStream.wrap(stream, server_side=False, hostname=creds.server_name if creds else None,
                               ssl_context=_tls_context(creds), standard_compatible=False)
    if creds is None or not creds.authenticates:
        await stream.send_eof()  # nothing to ask without credentials: the server sees EOF and closes
        return "TLS handshake (no kubeconfig credentials for this port)", tls
    path = spec.probe_path if spec.probe_path != "/" else _READYZ
    status = await _http_get(tls, spec, path, host=f"{format_host(creds.server_name)}:{local_port}",
                             token=creds.token)
    if status != 200:
        raise ProbeFailed(f"GET {path} on {spec.target} answered HTTP {status} (credentials from {creds.source})")
    return f"GET {path} HTTP 200 ({creds.source})", tls


# One context per set of credentials: building one reads certificates and keys.
_contexts: dict[ApiCredentials | None, ssl.SSLContext] = {}


def _tls_context(creds: ApiCredentials | None) -> ssl.SSLContext:
    ctx = _contexts.get(creds)
    if ctx is not None:
        return ctx
    if creds is None:
        # Handshake only: proves a TLS server answers; nothing secret is sent over it.
        ctx = client_context(verify=False)
    else:
        try:
            ctx = client_context(verify=not creds.insecure, ca=creds.ca, cert=creds.cert, key=creds.key)
        except TlsMaterialError as e:
            if e.part == "ca":
                raise KubeconfigError(f"{creds.source}: certificate-authority is not a PEM certificate") from None
            raise KubeconfigError(f"{creds.source}: client certificate/key cannot be loaded: {e.reason}") from None
    if len(_contexts) > 32:  # kubeconfigs rewritten many times: keep the cache small
        _contexts.clear()
    _contexts[creds] = ctx
    return ctx


def _why(e: BaseException) -> str:
    cause = e.__cause__
    if isinstance(cause, ssl.SSLError):
        return f"TLS: {ssl_reason(cause)}"
    return type(e).__name__
