"""A kind-shaped STAND-IN for a Kubernetes API server (no kind node image can be had here).

What it copies from kind: the container labels (``io.x-k8s.kind.cluster``, ``io.x-k8s.kind.role``),
the ``127.0.0.1:PORT->6443/tcp`` publishing, a TLS server on 6443 whose certificate carries
127.0.0.1/localhost and that requires a client certificate from its CA, ``GET /readyz`` -> 200,
and a kubeconfig naming ``https://127.0.0.1:PORT`` with base64 ``-data`` credentials, as
``kind get kubeconfig`` writes it. What it is not: Kubernetes. It is socat (OPENSSL-LISTEN) in the
lab's alpine/socat image answering every request from a busybox shell script.

``TlsApiServer`` is the same stand-in as a thread on this machine's loopback, for tests without
the lab.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.lab.lab import docker

STANDIN_DIR = Path("/tmp/kci-tunneld-kind-standin")
CLUSTER = "standin"
CONTAINER = f"kcilab-kind-{CLUSTER}-control-plane"
IMAGE = "alpine/socat:latest"
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

# One HTTP exchange on stdin/stdout (socat SYSTEM): read the request head, answer /readyz etc.
SERVE_SH = r"""#!/bin/sh
IFS= read -r line
while IFS= read -r h; do case "$h" in "$(printf '\r')"|"") break;; esac; done
path=$(echo "$line" | cut -d' ' -f2)
path=${path%%\?*}
case "$path" in
  /readyz|/livez|/healthz) body=ok; status="200 OK";;
  *) body='{"kind":"Status","code":404}'; status="404 Not Found";;
esac
printf 'HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' \
  "$status" "${#body}" "$body"
"""


@dataclass(frozen=True)
class ApiCerts:
    """A CA, a server certificate for 127.0.0.1/localhost/::1, a client certificate, and an unrelated CA."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    server_pem: Path  # cert + key, for socat
    client_cert: Path
    client_key: Path
    other_ca: Path  # signed nothing here: a kubeconfig with it must fail verification


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {proc.stderr.strip()}")


def ensure_certs(directory: Path = STANDIN_DIR) -> ApiCerts:
    """Make the key material once (reused while the files exist)."""
    d = directory
    certs = ApiCerts(d, d / "ca.pem", d / "server.crt", d / "server.key", d / "server.pem", d / "client.crt",
                     d / "client.key", d / "other-ca.pem")
    d.mkdir(parents=True, exist_ok=True, mode=0o755)
    (d / "serve.sh").write_text(SERVE_SH)  # always: a running stand-in picks up a fix at the next request
    (d / "serve.sh").chmod(0o755)
    if all(p.exists() for p in (certs.server_pem, certs.client_key, certs.other_ca)):
        return certs
    _openssl("req", "-x509", *_EC, "-keyout", "ca.key", "-out", "ca.pem", "-days", "30", "-subj", "/CN=standin-ca",
             cwd=d)
    _openssl("req", "-x509", *_EC, "-keyout", "other-ca.key", "-out", "other-ca.pem", "-days", "30",
             "-subj", "/CN=unrelated-ca", cwd=d)
    for name, subj, ext in (
        ("server", "/CN=kube-apiserver", "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:::1\n"),
        ("client", "/CN=kubernetes-admin/O=system:masters", "extendedKeyUsage=clientAuth\n"),
    ):
        (d / f"{name}.ext").write_text(ext)
        _openssl("req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subj, cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "30", "-extfile", f"{name}.ext", cwd=d)
    certs.server_pem.write_bytes(certs.server_cert.read_bytes() + certs.server_key.read_bytes())
    # The container's socat runs as root, but keep the keys private to root here too.
    for key in (certs.server_key, certs.client_key, certs.server_pem):
        key.chmod(0o600)
    return certs


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


def run_standin(certs: ApiCerts, *, name: str = CONTAINER, cluster: str = CLUSTER, host_port: int | None = None,
                host_ip: str = "127.0.0.1", restart: str = "always") -> int:
    """(Re)create the stand-in container in the lab; return the HostPort it publishes 6443 on."""
    docker("rm", "-f", name, check=False)
    port = host_port or free_local_port()
    publish = f"{host_ip}:{port}:6443" if ":" not in host_ip else f"[{host_ip}]:{port}:6443"
    docker(
        "run", "-d", "--name", name, "--restart", restart,
        "--label", f"io.x-k8s.kind.cluster={cluster}", "--label", "io.x-k8s.kind.role=control-plane",
        "-p", publish, "-v", f"{certs.dir}:/standin:ro", IMAGE,
        "OPENSSL-LISTEN:6443,fork,reuseaddr,cert=/standin/server.pem,cafile=/standin/ca.pem,verify=1",
        "SYSTEM:/standin/serve.sh",
    )
    return published_port(name, "6443/tcp")


def free_local_port() -> int:
    """A port free on this machine's 127.0.0.1 and ::1 right now, for a lab container to publish.

    Pick-then-release, on purpose: --auto forwards on the SAME port number the remote host
    publishes, so a test must pick one that is free here too (Docker's own choice starts at 32768,
    the bottom of this machine's ephemeral range, and collides with other tests' listeners).
    """
    with socket.socket() as v4:
        v4.bind(("127.0.0.1", 0))
        port: int = v4.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET6) as v6:
                v6.bind(("::1", port))
        except OSError:
            return free_local_port()
    return port


def published_port(name: str, container_port: str) -> int:
    """The HostPort a lab container publishes container_port on (HostPort is a string there)."""
    out = docker("inspect", "-f", "{{json .NetworkSettings.Ports}}", name).stdout
    return int(json.loads(out)[container_port][0]["HostPort"])


def remove(name: str = CONTAINER) -> None:
    docker("rm", "-f", name, check=False)


class TlsApiServer:
    """The stand-in on this machine: a TLS server on 127.0.0.1 (thread per connection) answering
    ``/readyz`` with ``status``; with ``require_client_cert``, clients without a certificate from
    the CA are refused."""

    def __init__(self, certs: ApiCerts, *, status: int = 200, require_client_cert: bool = True) -> None:
        self.status = status
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(certs.server_cert, certs.server_key)
        if require_client_cert:
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            self.ctx.load_verify_locations(certs.ca)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.requests: list[str] = []
        self.handshakes = 0
        self.handshaken = threading.Event()

    def __enter__(self) -> TlsApiServer:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                self.handshakes += 1
                self.handshaken.set()
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = tls.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                line = head.split(b"\r\n", 1)[0].decode()
                self.requests.append(line)
                body = b"ok"
                tls.sendall(f"HTTP/1.1 {self.status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                            .encode() + body)
        except (OSError, ssl.SSLError):
            pass
