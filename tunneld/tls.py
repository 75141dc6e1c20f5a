"""TLS helpers shared by the Docker adapter and the https probe."""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path


def load_client_cert(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
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
