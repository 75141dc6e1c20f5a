"""The two AEAD ciphers of the SSH transport, computed as OpenSSH does, for asyncssh and for the lean lanes.

asyncssh's shims pay per packet for things the protocol does not ask for:

- **chacha20-poly1305@openssh.com**: asyncssh's ``ChachaCipher`` builds a new ``cryptography`` cipher
  context for the length, another for the Poly1305 key (ChaCha20 block 0 of the payload key) and a
  third for the payload (from block 1 on), and joins header and payload into a new buffer just to
  compute the tag. With OpenSSL 3 every context costs an algorithm fetch, the largest single item
  after the system calls in a profile of small packets. Here one context for the payload key yields
  the Poly1305 key from its first 64 bytes and then runs on into block 1 for the payload, and the tag
  is computed over header and payload in place. Packets of up to 16 KiB (round trips, the channel
  protocol's own) go through libsodium instead when the host has it (tunneld/ssh/sodium.py): its calls
  take the nonce as an argument, so there is no context to build at all.
- **aes128-gcm / aes256-gcm@openssh.com**: asyncssh's ``GCMCipher`` makes a new ``AESGCM`` (a key
  schedule) per packet and copies the sealed packet twice to split off the tag, which asyncssh then
  joins back on. Here one ``AESGCM`` serves the key's life and ``seal`` returns what goes on the wire.

Each class keeps asyncssh's method names (so it can stand in for asyncssh's object inside its
``Encryption``) and adds the lanes' two: ``seal`` (the wire pieces of one packet, no joins) and
``open`` (one packet's plaintext from views of the input buffer, or None on a bad tag). Same wire
format, byte for byte: tests/ssh/test_asyncssh_seams.py checks both against asyncssh's own.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.ciphers.algorithms import ChaCha20
from cryptography.hazmat.primitives.poly1305 import Poly1305

from tunneld.ssh import sodium

_CTR_0 = bytes(8)  # cryptography's 16-byte ChaCha20 nonce: 64-bit little-endian block counter, then the nonce
_BLOCK_0 = bytes(64)
_MASK64 = (1 << 64) - 1
TAG = 16  # both ciphers' tag (MAC) size

Buffer = bytes | memoryview


class FastChachaCipher:
    """The methods ``asyncssh.encryption.ChachaEncryption`` calls on its cipher, computed as OpenSSH does."""

    def __init__(self, key: bytes, adkey: bytes, small: sodium.Sodium | None = None) -> None:
        """``small``: libsodium's calls, for the lanes' packets of up to ``sodium.SMALL`` bytes."""
        self._key = key  # payload key (K_2)
        self._adkey = adkey  # length key (K_1)
        self._small = sodium.SodiumChacha(small, key, adkey) if small is not None else None

    @property
    def by_libsodium(self) -> bool:
        """Do the lanes' small packets go through libsodium?"""
        return self._small is not None

    def _sealed(self, header: Buffer, data: Buffer, nonce: bytes) -> tuple[bytes, bytes, bytes]:
        header = Cipher(ChaCha20(self._adkey, _CTR_0 + nonce), mode=None).encryptor().update(header)
        stream = Cipher(ChaCha20(self._key, _CTR_0 + nonce), mode=None).encryptor()
        mac = Poly1305(stream.update(_BLOCK_0)[:32])
        data = stream.update(data)
        mac.update(header)
        mac.update(data)
        return header, data, mac.finalize()

    def encrypt_and_sign(self, header: bytes, data: bytes, nonce: bytes) -> tuple[bytes, bytes]:
        header, data, tag = self._sealed(header, data, nonce)
        return header + data, tag

    def decrypt_header(self, header: Buffer, nonce: bytes) -> bytes:
        return Cipher(ChaCha20(self._adkey, _CTR_0 + nonce), mode=None).encryptor().update(header)

    def verify_and_decrypt(self, header: Buffer, data: Buffer, nonce: bytes, tag: Buffer) -> bytes | None:
        stream = Cipher(ChaCha20(self._key, _CTR_0 + nonce), mode=None).encryptor()
        mac = Poly1305(stream.update(_BLOCK_0)[:32])
        mac.update(header)
        mac.update(data)
        try:
            mac.verify(bytes(tag))
        except InvalidSignature:
            return None
        return stream.update(data)

    # ------------------------------------------------------------ the lanes (tunneld/ssh/wire.py)

    def seal(self, seq: int, header: bytes, body: Buffer) -> tuple[bytes, ...]:
        """Packet ``seq`` on the wire: encrypted length, encrypted body, tag."""
        small = self._small
        if small is not None and len(body) <= sodium.SMALL:
            return (small.seal(seq, header, body),)
        return self._sealed(header, body, seq.to_bytes(8, "big"))

    def length(self, seq: int, header: Buffer) -> int:
        """The packet length in packet ``seq``'s first 4 bytes."""
        if self._small is not None:
            return self._small.length(seq, header)
        return int.from_bytes(self.decrypt_header(header, seq.to_bytes(8, "big")), "big")

    def open(self, seq: int, header: Buffer, sealed: Buffer) -> bytes | None:
        """Packet ``seq``'s body from its header and the rest (body and tag), or None if the tag is wrong."""
        cut = len(sealed) - TAG
        small = self._small
        if small is not None and cut <= sodium.SMALL:
            return small.open(seq, header, sealed)
        return self.verify_and_decrypt(header, sealed[:cut], seq.to_bytes(8, "big"), sealed[cut:])

    def rewind(self) -> None:
        """Nothing to undo: the nonce is the sequence number."""


class FastGCMCipher:
    """The methods ``asyncssh.encryption.GCMEncryption`` calls on its cipher, with one AESGCM per key.

    The nonce is a fixed 4-byte field and a 64-bit invocation counter, one step per packet (RFC 5647).
    """

    def __init__(self, key: bytes, iv: bytes) -> None:
        self._aead = AESGCM(key)
        self._fixed = iv[:4]
        self._invocation = int.from_bytes(iv[4:], "big")

    def _next_iv(self) -> bytes:
        iv = self._fixed + self._invocation.to_bytes(8, "big")
        self._invocation = (self._invocation + 1) & _MASK64
        return iv

    def encrypt_and_sign(self, header: bytes, data: bytes) -> tuple[bytes, bytes]:
        sealed = self._aead.encrypt(self._next_iv(), data, header)
        return header + sealed[:-TAG], sealed[-TAG:]

    def verify_and_decrypt(self, header: bytes, data: bytes, mac: bytes) -> bytes | None:
        try:
            return self._aead.decrypt(self._next_iv(), data + mac, header)
        except InvalidTag:
            return None

    # ------------------------------------------------------------ the lanes (tunneld/ssh/wire.py)

    def seal(self, seq: int, header: bytes, body: Buffer) -> tuple[bytes, ...]:
        """The next packet on the wire: the length in the clear, then body and tag."""
        return header, self._aead.encrypt(self._next_iv(), body, header)

    def length(self, seq: int, header: Buffer) -> int:
        """The packet length: GCM leaves it in the clear (as additional data)."""
        return int.from_bytes(header, "big")

    def open(self, seq: int, header: Buffer, sealed: Buffer) -> bytes | None:
        """The next packet's body from its header and the rest (body and tag), or None if the tag is wrong."""
        try:
            return self._aead.decrypt(self._next_iv(), sealed, header)
        except InvalidTag:
            return None

    def rewind(self) -> None:
        """Undo the last ``open``'s step: the packet is handed to asyncssh, which opens it again."""
        self._invocation = (self._invocation - 1) & _MASK64


LaneCipher = FastChachaCipher | FastGCMCipher

__all__ = ["TAG", "FastChachaCipher", "FastGCMCipher", "LaneCipher"]
