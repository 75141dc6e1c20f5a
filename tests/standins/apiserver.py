"""A STAND-IN for a Kubernetes API server, for tests only: no real one can run here.

It speaks just enough of the API, over TLS with client certificates (like kind's API server and its
admin kubeconfig), for what provisioning and kubectl ask of it, and records every request:

- ``GET /readyz`` (500 for the first ``readyz_failures`` calls, then ``ok``), ``/livez``, ``/version``;
- ``GET /api/v1/namespaces/kube-public`` (404 for the first ``namespace_missing`` calls);
- ``GET /api/v1/nodes`` (``nodes`` NotReady for the first ``nodes_not_ready`` calls, then Ready);
- ``GET/POST/PUT/PATCH`` of ConfigMaps in kube-public, kept in memory with a resourceVersion; a
  POST of an existing name is 409, a PUT with a stale resourceVersion is 409, like the real thing.

Everything else is a 404 Status. A client without a certificate signed by its CA cannot connect.
It runs in a thread of the test process, on the lab's host-side address, where the stand-in kind's
control-plane container relays its port 6443 to.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.standins.kind import STATE_FILE

_NEWKEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
CM_PREFIX = "/api/v1/namespaces/kube-public/configmaps"


@dataclass
class Recorded:
    method: str
    path: str
    status: int
    body: Any = None  # the decoded JSON body of a write
    client: str = ""  # the client certificate's CN
    at: float = field(default_factory=time.monotonic)


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


def make_pki(d: Path, server_ips: list[str]) -> dict[str, Path]:
    """A CA, a server certificate for ``server_ips`` + localhost, and an admin client certificate."""
    ca, ca_key = d / "ca.pem", d / "ca-key.pem"
    _openssl("req", "-x509", *_NEWKEY, "-days", "2", "-subj", "/CN=standin-kubernetes-ca", "-keyout", str(ca_key),
             "-out", str(ca), "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    sans = ",".join(["DNS:localhost", "DNS:kubernetes"] + [f"IP:{ip}" for ip in server_ips])
    out = {"ca": ca}
    for name, subj, ext in (
        ("server", "/CN=kube-apiserver", f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n"),
        ("client", "/O=system:masters/CN=kubernetes-admin", "extendedKeyUsage=clientAuth\n"),
    ):
        key, csr, cert, extfile = (d / f"{name}-key.pem", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext")
        extfile.write_text(ext)
        _openssl("req", "-new", *_NEWKEY, "-subj", subj, "-keyout", str(key), "-out", str(csr))
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
                 "-CAserial", str(d / "ca.srl"), "-days", "2", "-extfile", str(extfile), "-out", str(cert))
        os.chmod(key, 0o600)
        out[name], out[f"{name}_key"] = cert, key
    return out


class StandinApiServer:
    """The stand-in API server; use as a context manager (it serves in a thread)."""

    def __init__(self, host: str, *, nodes: tuple[str, ...] = (), readyz_failures: int = 0,
                 namespace_missing: int = 0, nodes_not_ready: int = 0) -> None:
        self.host = host
        self.nodes = nodes
        self.readyz_failures = readyz_failures
        self.namespace_missing = namespace_missing
        self.nodes_not_ready = nodes_not_ready
        self.requests: list[Recorded] = []
        self.handshake_failures: list[str] = []
        self.configmaps: dict[str, dict[str, Any]] = {}
        self._version = 100
        self._lock = threading.Lock()
        self._tmp = tempfile.TemporaryDirectory(prefix="standin-apiserver-")
        self.pki = make_pki(Path(self._tmp.name), sorted({"127.0.0.1", host}))
        self._server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> StandinApiServer:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.pki["server"], self.pki["server_key"])
        ctx.load_verify_locations(self.pki["ca"])
        ctx.verify_mode = ssl.CERT_REQUIRED  # like kind's API server for the admin kubeconfig
        owner = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def finish_request(self, request: Any, client_address: Any) -> None:
                # The handshake in the connection's own thread: a silent client cannot stall the rest.
                request.settimeout(10)
                try:
                    tls = ctx.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    owner.handshake_failures.append(f"{client_address}: {e}")
                    return
                _Handler(tls, client_address, self)

        class _Handler(_ApiHandler):
            server_owner = owner

        self._server = Server((self.host, 0), _Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True, name="standin-apiserver").start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._tmp.cleanup()

    def write_kind_state(self, state_dir: Path, **extra: Any) -> None:
        """Tell the stand-in kind where this server is and which credentials its kubeconfig carries."""
        state_dir.mkdir(parents=True, exist_ok=True)
        state = {"apiserver": self.address, "ca_pem": self.pki["ca"].read_text(),
                 "client_cert_pem": self.pki["client"].read_text(),
                 "client_key_pem": self.pki["client_key"].read_text(), **extra}
        (state_dir / STATE_FILE).write_text(json.dumps(state))

    def seen(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path.split("?")[0] == path]

    # ---------------------------------------------------------------- the API, called from the handler

    def handle(self, method: str, path: str, body: Any, client: str) -> tuple[int, Any]:
        with self._lock:  # one request at a time: the record's order is the order they were served in
            status, reply = self._handle(method, path.split("?", 1)[0], body)
            self.requests.append(Recorded(method, path, status, body, client))
            return status, reply

    def _handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if method == "GET" and path == "/readyz":
            if self.readyz_failures > 0:
                self.readyz_failures -= 1
                return 500, "[-]etcd failed: reason withheld\nreadyz check failed"
            return 200, "ok"
        if method == "GET" and path in ("/livez", "/healthz"):
            return 200, "ok"
        if method == "GET" and path == "/version":
            return 200, {"major": "1", "minor": "30", "gitVersion": "v1.30.0-standin", "platform": "linux/amd64"}
        if method == "GET" and path == "/api/v1/namespaces/kube-public":
            if self.namespace_missing > 0:
                self.namespace_missing -= 1
                return _status(404, "NotFound", 'namespaces "kube-public" not found')
            return 200, {"kind": "Namespace", "apiVersion": "v1",
                         "metadata": {"name": "kube-public", "resourceVersion": "1"}, "status": {"phase": "Active"}}
        if method == "GET" and path == "/api/v1/nodes":
            ready = "False" if self.nodes_not_ready > 0 else "True"
            self.nodes_not_ready = max(0, self.nodes_not_ready - 1)
            items = [{"metadata": {"name": n, "resourceVersion": "1"},
                      "status": {"conditions": [{"type": "Ready", "status": ready, "reason": "KubeletReady"}]}}
                     for n in self.nodes]
            return 200, {"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}
        if path == CM_PREFIX and method == "POST":
            return self._create(body)
        if path.startswith(CM_PREFIX + "/"):
            return self._configmap(method, path[len(CM_PREFIX) + 1:], body)
        return _status(404, "NotFound", f"the server could not find the requested resource ({method} {path})")

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def _create(self, body: Any) -> tuple[int, Any]:
        problem = _check_configmap(body)
        if problem:
            return _status(422, "Invalid", problem)
        name = body["metadata"]["name"]
        if name in self.configmaps:
            return _status(409, "AlreadyExists", f'configmaps "{name}" already exists')
        stored = json.loads(json.dumps(body))
        stored["metadata"].update(namespace="kube-public", resourceVersion=self._next_version())
        self.configmaps[name] = stored
        return 201, stored

    def _configmap(self, method: str, name: str, body: Any) -> tuple[int, Any]:
        current = self.configmaps.get(name)
        if method == "GET":
            return (200, current) if current else _status(404, "NotFound", f'configmaps "{name}" not found')
        if current is None:
            return _status(404, "NotFound", f'configmaps "{name}" not found')
        if method == "PUT":
            problem = _check_configmap(body)
            if problem:
                return _status(422, "Invalid", problem)
            rv = body["metadata"].get("resourceVersion")
            if rv and rv != current["metadata"]["resourceVersion"]:
                return _status(409, "Conflict", "the object has been modified; please apply your changes to the "
                                                "latest version and try again")
            stored = json.loads(json.dumps(body))
            stored["metadata"].update(namespace="kube-public", resourceVersion=self._next_version())
            self.configmaps[name] = stored
            return 200, stored
        if method == "PATCH":
            current.setdefault("data", {}).update((body or {}).get("data") or {})
            current["metadata"]["resourceVersion"] = self._next_version()
            return 200, current
        return _status(405, "MethodNotAllowed", f"{method} is not supported by the stand-in")


def _check_configmap(body: Any) -> str | None:
    if not isinstance(body, dict) or body.get("kind") != "ConfigMap" or body.get("apiVersion") != "v1":
        return "expected a v1 ConfigMap"
    meta = body.get("metadata") or {}
    if not meta.get("name"):
        return "metadata.name: Required value"
    if meta.get("namespace") not in (None, "kube-public"):
        return "the namespace of the object does not match the namespace on the request"
    data = body.get("data") or {}
    if not all(isinstance(v, str) for v in data.values()):
        return "data: values must be strings"
    return None


def _status(code: int, reason: str, message: str) -> tuple[int, Any]:
    return code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                  "reason": reason, "code": code}


class _ApiHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Kubernetes clients expect
    server_owner: StandinApiServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the record is in .requests
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        cert = self.connection.getpeercert() or {}
        cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), "")
        status, reply = self.server_owner.handle(self.command, self.path, body, cn)
        data = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(reply, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve
