"""TLS client contexts (tunneld/tls.py): the one builder, and the words each caller puts on its
refusals (the Docker adapter's TransportError, the https probe's kubeconfig error). No lab needed."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from tests.servers import EchoServer
from tests.standins.apiserver import ApiCerts, ensure_certs
from tunneld.config import ForwardSpec, Timeouts, TransportSpec
from tunneld.docker.host import TlsSettings, ssl_context
from tunneld.engine.probe import probe
from tunneld.errors import TransportError
from tunneld.tls import TlsMaterialError, client_context
from tunneld.transports.direct import DirectTransport

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def certs() -> ApiCerts:
    return ensure_certs()


def test_verifying_context_checks_the_server_against_the_ca_and_carries_the_client_cert(certs: ApiCerts) -> None:
    ctx = client_context(verify=True, ca=certs.ca.read_bytes(), cert=certs.client_cert.read_bytes(),
                         key=certs.client_key.read_bytes())
    assert (ctx.verify_mode, ctx.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "standin-kubernetes-ca"),),)]


def test_unverified_context_accepts_any_server() -> None:
    ctx = client_context(verify=False)
    assert (ctx.verify_mode, ctx.check_hostname) == (ssl.CERT_NONE, False)


@pytest.mark.parametrize(("ca", "reason"), [(b"", "Empty certificate data"), (b"not pem", "no start line"),
                                            (b"\xe9", "codec can't decode")])
def test_a_ca_that_is_not_pem_is_refused_as_the_ca(ca: bytes, reason: str) -> None:
    with pytest.raises(TlsMaterialError) as caught:
        client_context(verify=True, ca=ca)
    assert caught.value.part == "ca" and reason in caught.value.reason


def test_a_client_key_that_does_not_match_is_refused_as_the_client_cert(certs: ApiCerts) -> None:
    with pytest.raises(TlsMaterialError) as caught:
        client_context(verify=False, cert=certs.client_cert.read_bytes(), key=certs.server_key.read_bytes())
    assert caught.value.part == "client" and "key values mismatch" in caught.value.reason


def test_docker_names_the_cert_dir_in_its_refusals(certs: ApiCerts) -> None:
    # Verification without a ca.pem (a context's TLS files with only cert.pem and key.pem) is refused.
    with pytest.raises(TransportError, match=r"^/d/ca\.pem is not a PEM certificate: Empty certificate data$"):
        ssl_context(TlsSettings(verify=True, cert_dir="/d"))
    mismatched = TlsSettings(verify=False, cert_dir="/d", cert=certs.client_cert.read_bytes(),
                             key=certs.server_key.read_bytes())
    with pytest.raises(TransportError, match=r"^the client certificate in /d \(cert\.pem, key\.pem\) cannot be "
                                             r"loaded: key values mismatch$"):
        ssl_context(mismatched)


@pytest.mark.anyio
async def test_the_probe_names_the_kubeconfig_entry_in_its_refusal(
        echo_server: EchoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = echo_server.port
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(  # "bm90IHBlbQ==": base64 of "not pem"
        f"clusters:\n- name: c\n  cluster: {{server: 'https://127.0.0.1:{port}', certificate-authority-data: "
        "'bm90IHBlbQ=='}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\nusers:\n- name: u\n"
        "  user: {token: t}\n")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    spec = ForwardSpec(name="p", bind="127.0.0.1", port=0, host="127.0.0.1", host_port=port, probe="https")
    result = await probe(DirectTransport(TransportSpec(), Timeouts()), spec, deadline=5, local_port=port)
    assert not result.ok
    assert result.error == f"kubeconfig {kubeconfig}, context x: certificate-authority is not a PEM certificate"

