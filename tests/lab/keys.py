"""Key material for the lab: Docker TLS certificates (openssl) and SSH keys (ssh-keygen).

Everything is made once and reused while the files exist, so re-running `up` is cheap
and clients that cached a path keep working.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

# EC P-256 keys: instant to generate, accepted by Go's TLS (dockerd), curl and Python.
_NEWKEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_DAYS = "3650"


class KeyMaterialError(RuntimeError):
    """A key or certificate could not be made (the message names the command)."""


def _run(argv: list[str], cwd: Path | None = None) -> None:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise KeyMaterialError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")


def _make_ca(directory: Path, name: str, cn: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    _run(
        [
            "openssl",
            "req",
            "-x509",
            *_NEWKEY,
            "-days",
            _DAYS,
            "-subj",
            f"/CN={cn}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]
    )
    return cert, key


def _make_leaf(ca: tuple[Path, Path], out: Path, cn: str, extensions: str) -> None:
    """Write out/cert.pem and out/key.pem, signed by `ca`, with the given v3 extensions."""
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kcilab-cert-") as tmp:
        csr, ext = Path(tmp) / "req.csr", Path(tmp) / "ext.cnf"
        ext.write_text(extensions)
        _run(
            [
                "openssl",
                "req",
                "-new",
                *_NEWKEY,
                "-subj",
                f"/CN={cn}",
                "-keyout",
                str(out / "key.pem"),
                "-out",
                str(csr),
            ]
        )
        _run(
            [
                "openssl",
                "x509",
                "-req",
                "-in",
                str(csr),
                "-CA",
                str(ca[0]),
                "-CAkey",
                str(ca[1]),
                "-CAcreateserial",
                "-CAserial",
                str(Path(tmp) / "ca.srl"),
                "-days",
                _DAYS,
                "-extfile",
                str(ext),
                "-out",
                str(out / "cert.pem"),
            ]
        )
    os.chmod(out / "key.pem", 0o600)


def ensure_tls(cert_dir: Path, server_ip: str) -> None:
    """Make (or keep) the lab CA, the dockerd server cert and two client cert sets.

    Layout (each client dir is a complete DOCKER_CERT_PATH):
      ca.pem, ca-key.pem            lab CA
      server/{cert,key}.pem         dockerd, SAN IP:server_ip (+ 127.0.0.1, localhost)
      client/{ca,cert,key}.pem      accepted client
      wrong-ca.pem, wrong-ca-key.pem  an unrelated CA
      wrong-client/{ca,cert,key}.pem  client cert signed by the unrelated CA; its ca.pem is
                                    the *lab* CA on purpose, so the client trusts the server
                                    and a failure can only be the server refusing the cert.
    """
    done = [cert_dir / p for p in ("ca.pem", "server/cert.pem", "client/key.pem", "wrong-client/key.pem")]
    if all(p.exists() for p in done):
        return
    cert_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = _make_ca(cert_dir, "ca", "kcilab CA")
    _make_leaf(
        ca,
        cert_dir / "server",
        server_ip,
        f"subjectAltName=IP:{server_ip},IP:127.0.0.1,DNS:localhost\n"
        "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n",
    )
    _make_leaf(
        ca, cert_dir / "client", "kcilab-client", "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n"
    )
    (cert_dir / "client" / "ca.pem").write_bytes(ca[0].read_bytes())
    wrong = _make_ca(cert_dir, "wrong-ca", "kcilab unrelated CA")
    _make_leaf(
        wrong,
        cert_dir / "wrong-client",
        "kcilab-wrong-client",
        "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n",
    )
    (cert_dir / "wrong-client" / "ca.pem").write_bytes(ca[0].read_bytes())


def ensure_ssh_key(path: Path, comment: str) -> None:
    """Make an unencrypted ed25519 key pair at `path` (+ .pub) unless it exists."""
    if path.exists() and path.with_suffix(".pub").exists():
        return
    path.unlink(missing_ok=True)
    path.with_suffix(".pub").unlink(missing_ok=True)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
