"""Is it really serving? Probes for each lab component, all with short deadlines.

"Running" is not enough for the lab: a pid can be alive with the wrong flags, in a stale
namespace, or still starting. Each probe talks the component's own protocol.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

from . import procs
from .commands import ns_exec
from .layout import DOCKER_SOCK, DOCKER_TCP_PORT, INFO, NETNS_PATH, NS_IP, PROBE_TIMEOUT, SSH_PORT


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("docker", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def engine(method: str, path: str) -> tuple[int, bytes]:
    """One Engine API request over the lab's unix socket; (0, b"") if it cannot be reached."""
    conn = _UnixHTTPConnection(DOCKER_SOCK, PROBE_TIMEOUT)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        conn.close()


def engine_json(path: str) -> dict[str, Any] | None:
    """GET an Engine API object (image, container) as JSON; None unless it answers 200."""
    status, body = engine("GET", path)
    return json.loads(body) if status == 200 else None


def ping_unix() -> bool:
    """True if dockerd answers /_ping on the lab's unix socket."""
    return engine("GET", "/_ping") == (200, b"OK")


def ping_tls(cert_dir: Path | None = None) -> bool:
    """True if dockerd answers /_ping on tcp://NS_IP:2376 with the client certs in `cert_dir`."""
    cert_dir = cert_dir or INFO.client_cert_dir
    try:
        ctx = ssl.create_default_context(cafile=str(cert_dir / "ca.pem"))
        ctx.load_cert_chain(str(cert_dir / "cert.pem"), str(cert_dir / "key.pem"))
        conn = http.client.HTTPSConnection(NS_IP, DOCKER_TCP_PORT, context=ctx, timeout=PROBE_TIMEOUT)
        try:
            conn.request("GET", "/_ping")
            resp = conn.getresponse()
            return resp.status == 200 and resp.read() == b"OK"
        finally:
            conn.close()
    except (OSError, ssl.SSLError, http.client.HTTPException):
        return False


# Runs inside the namespace, whose loopback this process cannot reach: loops until the
# HTTP endpoint answers 200 or the deadline passes, printing the last failure.
_HTTP_PROBE = r"""
import socket, sys, time
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline, last = time.monotonic() + float(sys.argv[4]), "no attempt"
while True:
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        last = data.split(b"\r\n", 1)[0].decode(errors="replace") or "empty reply"
        if last.split()[1:2] == ["200"]:
            sys.exit(0)
    except OSError as e:
        last = repr(e)
    if time.monotonic() >= deadline:
        print(last)
        sys.exit(1)
    time.sleep(0.1)
"""


def ns_http_ok(port: int, path: str, timeout: float) -> tuple[bool, str]:
    """Wait up to `timeout` for http://127.0.0.1:port/path to answer 200 inside the namespace.

    Returns (ok, last status line or error).
    """
    argv = [sys.executable, "-c", _HTTP_PROBE, "127.0.0.1", str(port), path, str(timeout)]
    proc = ns_exec(argv, timeout=timeout + 10)
    return proc.returncode == 0, proc.stdout.decode(errors="replace").strip()


def ssh_banner() -> str | None:
    """The SSH identification string from NS_IP:22, or None if nothing answers like sshd."""
    try:
        with socket.create_connection((NS_IP, SSH_PORT), timeout=PROBE_TIMEOUT) as s:
            banner = s.recv(256).decode(errors="replace")
    except OSError:
        return None
    return banner.strip() if banner.startswith("SSH-") else None


def in_netns(pid: int) -> bool:
    """True if `pid` lives in the lab's network namespace (not a stale earlier one)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net") == f"net:[{procs.netns_inode(NETNS_PATH)}]"
    except OSError:
        return False
