"""The STAND-IN for a Kubernetes API server, for tests only: no real one can run here.

It speaks just enough of the API, over TLS with client certificates (like kind's API server and its
admin kubeconfig), for what the https probe, provisioning and kubectl ask of it, and records every
request and handshake:

- ``GET /readyz`` (500 for the first ``readyz_failures`` calls, then ``ok``), ``/livez``, ``/version``;
- ``GET /api/v1/namespaces/kube-public`` (404 for the first ``namespace_missing`` calls);
- ``GET /api/v1/nodes`` (``nodes`` NotReady for the first ``nodes_not_ready`` calls, then Ready);
- ``GET/POST/PUT/PATCH`` of ConfigMaps in kube-public, kept in memory with a resourceVersion; a
  POST of an existing name is 409, a PUT with a stale resourceVersion is 409, like the real thing.

Everything else is a 404 Status. With ``require_client_cert`` (the default), a client without a
certificate signed by its CA cannot connect. It runs in a thread of the test process: on loopback
for the probe's tests, or on the lab's host-side address, where a kind-shaped container on the lab's
Docker host relays its port 6443 to it: one made by the stand-in kind (tests/standins/kind.py) for
provisioning, or by ``run_control_plane`` for ``--auto``. Either container has kind's labels and
publishes ``127.0.0.1:PORT->6443/tcp``; ``write_kubeconfig`` writes what ``kind get kubeconfig``
would for it. What none of it is: Kubernetes.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.lab.lab import docker
from tests.servers import free_local_port
from tests.standins.kind import STATE_FILE

_NEWKEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
CM_PREFIX = "/api/v1/namespaces/kube-public/configmaps"
CERTS_DIR = Path("/tmp/kci-tunneld-apiserver-standin")  # the loopback certificates, made once (ensure_certs)
LOOPBACK = ("127.0.0.1", "::1")
CLUSTER = "standin"  # the kind cluster name write_kubeconfig uses unless told another
IMAGE = "alpine/socat:latest"  # the lab's socat image: the control-plane container relays with it


@dataclass
class Recorded:
    method: str
    path: str
    status: int
    body: Any = None  # the decoded JSON body of a write
    client: str = ""  # the client certificate's CN
    line: str = ""  # the request line as sent: "GET /readyz HTTP/1.1"
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class ApiCerts:
    """A CA, a server certificate signed by it, an admin client certificate, and an unrelated CA."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # signed nothing here: a kubeconfig with it must fail verification


def _certs_in(d: Path) -> ApiCerts:
    return ApiCerts(d, d / "ca.pem", d / "server.pem", d / "server-key.pem", d / "client.pem", d / "client-key.pem",
                    d / "other-ca.pem")


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


def make_certs(d: Path, server_ips: Sequence[str]) -> ApiCerts:
    """Key material in ``d``: a server certificate for ``server_ips`` + localhost, an admin client one."""
    certs = _certs_in(d)
    for ca, key, cn in ((certs.ca, d / "ca-key.pem", "standin-kubernetes-ca"),
                        (certs.other_ca, d / "other-ca-key.pem", "unrelated-ca")):
        _openssl("req", "-x509", *_NEWKEY, "-days", "30", "-subj", f"/CN={cn}", "-keyout", str(key),
                 "-out", str(ca), "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        os.chmod(key, 0o600)
    sans = ",".join(["DNS:localhost", "DNS:kubernetes"] + [f"IP:{ip}" for ip in server_ips])
    for name, cert, key, subj, ext in (
        ("server", certs.server_cert, certs.server_key, "/CN=kube-apiserver",
         f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n"),
        ("client", certs.client_cert, certs.client_key, "/O=system:masters/CN=kubernetes-admin",
         "extendedKeyUsage=clientAuth\n"),
    ):
        csr, extfile = d / f"{name}.csr", d / f"{name}.ext"
        extfile.write_text(ext)
        _openssl("req", "-new", *_NEWKEY, "-subj", subj, "-keyout", str(key), "-out", str(csr))
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(certs.ca), "-CAkey", str(d / "ca-key.pem"),
                 "-CAcreateserial", "-CAserial", str(d / "ca.srl"), "-days", "30", "-extfile", str(extfile),
                 "-out", str(cert))
        os.chmod(key, 0o600)
    return certs


def ensure_certs(directory: Path = CERTS_DIR) -> ApiCerts:
    """Key material for a server on loopback, made once and reused while ``directory`` exists."""
    if not directory.exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        made = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        make_certs(made, LOOPBACK)
        try:
            made.rename(directory)  # all at once: another test process never sees half of it
        except OSError:  # another test process made it first
            shutil.rmtree(made, ignore_errors=True)
    return _certs_in(directory)


def write_kubeconfig(path: Path, port: int, certs: ApiCerts, *, ca: Path | None = None, inline: bool = True,
                     cluster: str = CLUSTER) -> Path:
    """A kubeconfig as ``kind get kubeconfig`` writes it (``inline=False``: file references instead)."""
    name = f"kind-{cluster}"
    ca_file = ca or certs.ca

    def entry(key: str, file: Path) -> str:
        if inline:
            return f"{key}-data: {base64.b64encode(file.read_bytes()).decode()}"
        return f"{key}: {file}"

    text = f"""apiVersion: v1
kind: Config
clusters:
- cluster:
    {entry("certificate-authority", ca_file)}
    server: https://127.0.0.1:{port}
  name: {name}
contexts:
- context:
    cluster: {name}
    user: {name}
  name: {name}
current-context: {name}
preferences: {{}}
users:
- name: {name}
  user:
    {entry("client-certificate", certs.client_cert)}
    {entry("client-key", certs.client_key)}
"""
    path.write_text(text)
    path.chmod(0o600)
    return path


class StandinApiServer:
    """The stand-in API server; use as a context manager (it serves in a thread).

    ``certs``: the key material to serve with (its server certificate must name ``host``); without,
    the server makes its own for ``host`` and 127.0.0.1.
    """

    def __init__(self, host: str = "127.0.0.1", *, certs: ApiCerts | None = None, require_client_cert: bool = True,
                 nodes: tuple[str, ...] = (), readyz_failures: int = 0, namespace_missing: int = 0,
                 nodes_not_ready: int = 0) -> None:
        self.host = host
        self.require_client_cert = require_client_cert
        self.nodes = nodes
        self.readyz_failures = readyz_failures
        self.namespace_missing = namespace_missing
        self.nodes_not_ready = nodes_not_ready
        self.requests: list[Recorded] = []
        self.handshake_failures: list[str] = []
        self.handshakes = 0
        self.handshaken = threading.Event()  # set at the first completed handshake
        self.configmaps: dict[str, dict[str, Any]] = {}
        self._version = 100
        self._lock = threading.Lock()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if certs is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="standin-apiserver-")
            certs = make_certs(Path(self._tmp.name), sorted({"127.0.0.1", host}))
        self.certs = certs
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
        ctx.load_cert_chain(self.certs.server_cert, self.certs.server_key)
        if self.require_client_cert:
            ctx.load_verify_locations(self.certs.ca)
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
                with owner._lock:
                    owner.handshakes += 1
                owner.handshaken.set()
                with tls:  # closed as soon as the handler is done with the connection
                    _Handler(tls, client_address, self)

        class _Handler(_ApiHandler):
            server_owner = owner

        self._server = Server((self.host, 0), _Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.1,), daemon=True,
                         name="standin-apiserver").start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def write_kind_state(self, state_dir: Path, **extra: Any) -> None:
        """Tell the stand-in kind where this server is and which credentials its kubeconfig carries."""
        state_dir.mkdir(parents=True, exist_ok=True)
        state = {"apiserver": self.address, "ca_pem": self.certs.ca.read_text(),
                 "client_cert_pem": self.certs.client_cert.read_text(),
                 "client_key_pem": self.certs.client_key.read_text(), **extra}
        (state_dir / STATE_FILE).write_text(json.dumps(state))

    def seen(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path.split("?")[0] == path]

    # ---------------------------------------------------------------- the API, called from the handler

    def handle(self, method: str, path: str, body: Any, client: str, line: str = "") -> tuple[int, Any]:
        with self._lock:  # one request at a time: the record's order is the order they were served in
            status, reply = self._handle(method, path.split("?", 1)[0], body)
            self.requests.append(Recorded(method, path, status, body, client, line))
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
        status, reply = self.server_owner.handle(self.command, self.path, body, cn, self.requestline)
        data = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(reply, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve


# ---------------------------------------------------------------- a kind control plane in the lab, for --auto


def run_control_plane(api: StandinApiServer, *, name: str, cluster: str = CLUSTER, host_port: int | None = None,
                      host_ip: str = "127.0.0.1", restart: str = "always") -> int:
    """(Re)create a container on the lab's Docker host that looks like kind's control plane (its labels,
    ``host_ip:PORT->6443/tcp``) and relays 6443 to ``api``; return the HostPort it publishes.

    ``api`` must listen where the lab's containers reach it (``lab.host_ip``).
    """
    docker("rm", "-f", name, check=False)
    port = host_port or free_local_port()
    publish = f"{host_ip}:{port}:6443" if ":" not in host_ip else f"[{host_ip}]:{port}:6443"
    docker(
        "run", "-d", "--name", name, "--restart", restart,
        "--label", f"io.x-k8s.kind.cluster={cluster}", "--label", "io.x-k8s.kind.role=control-plane",
        "-p", publish, IMAGE, "TCP-LISTEN:6443,fork,reuseaddr", f"TCP:{api.address}",
    )
    return published_port(name, "6443/tcp")


def published_port(name: str, container_port: str) -> int:
    """The HostPort a lab container publishes container_port on (HostPort is a string there)."""
    out = docker("inspect", "-f", "{{json .NetworkSettings.Ports}}", name).stdout
    return int(json.loads(out)[container_port][0]["HostPort"])


def remove(name: str) -> None:
    docker("rm", "-f", name, check=False)
