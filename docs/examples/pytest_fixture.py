"""A pytest fixture that gives tests a registry on the remote Docker host, forwarded to localhost.

Copy the fixtures into your conftest.py; any test (sync or async) then takes `forwarded_registry`
and gets "127.0.0.1:PORT" to push to and pull from:

    def test_push(forwarded_registry: str) -> None:
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", "oci:build/app",
                        f"docker://{forwarded_registry}/app:test"], check=True)

The forward runs on its own event loop in a background thread (an anyio blocking portal), so
plain synchronous tests, subprocesses and HTTP clients can use it; it is opened once per session.

Configure it with the environment:
  KCI_REGISTRY_TARGET  host:port of the registry as the far side sees it, e.g. 127.0.0.1:5000 on
                       the remote Docker host. Unset: a tiny in-process HTTP server that answers
                       /v2/ like a registry stands in, so this file runs anywhere.
  KCI_TUNNELD_VIA      direct (default), docker, or ssh://[user@]host[:port].
  KCI_TUNNELD_CONFIG   a kci-tunneld TOML file whose [transport] and [timeouts] are used instead
                       (for SSH keys, Docker TLS settings, ...); its [[forwards]] are ignored.

Run this example on its own: `python -m pytest docs/examples/pytest_fixture.py`.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio.from_thread
import pytest

import tunneld


class _RegistryV2(BaseHTTPRequestHandler):
    """Answers the Docker Registry HTTP API v2 version check, and 404 for everything else."""

    def do_GET(self) -> None:
        if self.path == "/v2/":
            body = b"{}"
            self.send_response(200)
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        else:
            body = json.dumps({"errors": [{"code": "NAME_UNKNOWN", "message": self.path}]}).encode()
            self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output quiet


@pytest.fixture(scope="session")
def registry_target() -> Iterator[str]:
    """host:port of the registry as the far side sees it."""
    if target := os.environ.get("KCI_REGISTRY_TARGET"):
        yield target
        return
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RegistryV2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def forwarded_registry(registry_target: str) -> Iterator[str]:
    """host:port on this machine that reaches the registry through kci-tunneld."""
    via: str | tunneld.TransportSpec = os.environ.get("KCI_TUNNELD_VIA", "direct")
    timeouts = None
    if path := os.environ.get("KCI_TUNNELD_CONFIG"):
        config = tunneld.load_config(path)
        via, timeouts = config.transport, config.timeouts
    host, _, port = registry_target.rpartition(":")
    spec = tunneld.ForwardSpec(
        name="registry", bind="127.0.0.1", port=0, host=host.strip("[]"), host_port=int(port),
        probe="http", probe_path="/v2/",  # ready = something answers HTTP there, not just TCP
    )
    with anyio.from_thread.start_blocking_portal() as portal:
        # The portal enters and exits the context manager in one task, as anyio requires.
        # grace=2: at teardown a connection some test left open delays the end by 2 s, not 10.
        forward = tunneld.open_forward(spec, via=via, timeouts=timeouts, grace=2)
        with portal.wrap_async_context_manager(forward) as fwd:
            portal.call(fwd.wait_ready, 60)
            yield fwd.address


def test_registry_answers_v2(forwarded_registry: str) -> None:
    with urllib.request.urlopen(f"http://{forwarded_registry}/v2/", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_unknown_repository_is_404(forwarded_registry: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{forwarded_registry}/v2/no-such-repo/tags/list", timeout=10)
    info.value.close()
    assert info.value.code in (401, 404)  # 401 from registries that want a login first
