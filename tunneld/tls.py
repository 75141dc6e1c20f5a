"""TLS client contexts, built here for both the Docker adapter and the https probe; short reasons for TLS failures."""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path
from typing import Literal


class TlsMaterialError(Exception):
    """A CA or a client certificate and key cannot be loaded into a TLS context.

    ``part`` says which ("ca" or "client"); ``reason`` says why. Callers name the file or the
    kubeconfig entry the material came from, in their own error.
    """

    def __init__(self, part: Literal["ca", "client"], reason: str) -> None:
        super().__init__(f"{part}: {reason}")
        self.part = part
        self.reason = reason


def client_context(*, verify: bool, ca: bytes | None = None, cert: bytes | None = None,
                   key: bytes | None = None) -> ssl.SSLContext:
    """A TLS >= 1.2 client context.

    With ``verify``, the server's certificate and name are checked against ``ca`` (PEM; None: the
    system trust store); without, any server is accepted, so a handshake proves only that TLS
    answers. The client certificate is loaded when both ``cert`` and ``key`` are given.

    :raises TlsMaterialError: when ``ca`` is not a PEM certificate ("ca", the ssl module's words), or
        ``cert`` and ``key`` are not a matching PEM pair ("client", ``ssl_reason``'s words).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # checks the certificate and the host name unless told not to
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif ca is None:
        ctx.load_default_certs()
    else:
        try:
            ctx.load_verify_locations(cadata=ca.decode("ascii"))
        except (ssl.SSLError, ValueError) as e:  # ValueError: empty, or not ASCII (UnicodeDecodeError)
            raise TlsMaterialError("ca", str(e)) from None
    if cert is not None and key is not None:
        try:
            _load_client_cert(ctx, cert, key)
        except ssl.SSLError as e:
            raise TlsMaterialError("client", ssl_reason(e)) from None
    return ctx


def _load_client_cert(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """Load a client certificate and key given as PEM bytes into ``ctx``.

    ssl loads a chain only from files: they go to a private directory (the key 0600), removed at once.

    :raises ssl.SSLError: when they are not a matching PEM certificate and key.
    """
    with tempfile.TemporaryDirectory(prefix="kci-tunneld-tls-") as d:
        cert_path, key_path = Path(d, "cert.pem"), Path(d, "key.pem")
        cert_path.write_bytes(cert)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        ctx.load_cert_chain(certfile=str(cert_path), keyfile=str(key_path))


def ssl_reason(e: ssl.SSLError) -> str:
    """A short, human reason for a TLS failure ("certificate verify failed: ...")."""
    verify = getattr(e, "verify_message", None)
    if verify:
        return f"certificate verify failed: {verify}"
    reason = getattr(e, "reason", None)
    return str(reason).replace("_", " ").lower() if reason else str(e)
