"""chacha20-poly1305@openssh.com with two cipher contexts per packet instead of asyncssh's three.

asyncssh's ``ChachaCipher`` builds a new ``cryptography`` cipher context for the length, another for
the Poly1305 key (ChaCha20 block 0 of the payload key) and a third for the payload (from block 1 on),
and joins header and payload into a new buffer just to compute the tag. With OpenSSL 3 every context
costs an algorithm fetch, which showed as the largest single item after the system calls in a
profile of small packets. Here one context for the payload key yields the Poly1305 key from its
first 64 bytes and then runs on into block 1 for the payload, and the tag is computed over header
and payload in place. Same wire format, byte for byte: tests/ssh/test_asyncssh_seams.py checks it
against asyncssh's own implementation.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.algorithms import ChaCha20
from cryptography.hazmat.primitives.poly1305 import Poly1305

_CTR_0 = bytes(8)  # cryptography's 16-byte ChaCha20 nonce: 64-bit little-endian block counter, then the nonce
_BLOCK_0 = bytes(64)


class FastChachaCipher:
    """The methods ``asyncssh.encryption.ChachaEncryption`` calls on its cipher, computed as OpenSSH does."""

    def __init__(self, key: bytes, adkey: bytes) -> None:
        self._key = key  # payload key (K_2)
        self._adkey = adkey  # length key (K_1)

    def encrypt_and_sign(self, header: bytes, data: bytes, nonce: bytes) -> tuple[bytes, bytes]:
        header = Cipher(ChaCha20(self._adkey, _CTR_0 + nonce), mode=None).encryptor().update(header)
        stream = Cipher(ChaCha20(self._key, _CTR_0 + nonce), mode=None).encryptor()
        mac = Poly1305(stream.update(_BLOCK_0)[:32])
        data = stream.update(data)
        mac.update(header)
        mac.update(data)
        return header + data, mac.finalize()

    def decrypt_header(self, header: bytes, nonce: bytes) -> bytes:
        return Cipher(ChaCha20(self._adkey, _CTR_0 + nonce), mode=None).encryptor().update(header)

    def verify_and_decrypt(self, header: bytes, data: bytes, nonce: bytes, tag: bytes) -> bytes | None:
        stream = Cipher(ChaCha20(self._key, _CTR_0 + nonce), mode=None).encryptor()
        mac = Poly1305(stream.update(_BLOCK_0)[:32])
        mac.update(header)
        mac.update(data)
        try:
            mac.verify(tag)
        except InvalidSignature:
            return None
        return stream.update(data)


__all__ = ["FastChachaCipher"]
