"""chacha20-poly1305@openssh.com's small packets sealed and opened through libsodium, when the host has it.

With ``cryptography``, every chacha20 packet needs new cipher contexts (the nonce is the sequence
number, and a context cannot take a new one) and a new Poly1305 object: about 10 µs for a 64-byte
packet, against 0.7 µs for AES-GCM, whose ``AESGCM`` takes a nonce per call. A round trip pays it
twice, a new connection about eight times. libsodium's one-shot calls take the nonce as an argument:
the same packet costs about 3 µs here, most of it ``ctypes``' cost per call.

For large packets ``cryptography`` (OpenSSL) is the faster of the two (its Poly1305 is vectorised), so
``FastChachaCipher`` (tunneld/ssh/ciphers.py) sends only packets up to ``SMALL`` bytes this way. Both
compute the same bytes (tests/ssh/test_sodium.py checks them against each other and asyncssh's own,
tests/ssh/test_asyncssh_seams.py against sshd).

The library is optional: ``load()`` returns None when it cannot be opened, and everything goes through
``cryptography`` as before. Debian and Ubuntu ship it as ``libsodium23``, Alpine as ``libsodium``.
"""

from __future__ import annotations

import ctypes
import functools

# Measured (python3 -m bench.ciphers): libsodium is ahead up to about 16 KiB a packet, OpenSSL beyond.
SMALL = 16 * 1024
_TAG = 16
_POLY_KEY = 32
_BLOCK = bytes(64)  # one ChaCha20 block
# sonames, newest first: 1.0.19 moved to .26; .23 is 1.0.18 (Debian 12, Ubuntu 22.04/24.04).
_NAMES = ("libsodium.so.26", "libsodium.so.23", "libsodium.so", "libsodium.dylib")


class Sodium:
    """The four libsodium calls a chacha20-poly1305@openssh.com packet needs."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        ptr, size, u64 = ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_uint64
        self.xor_ic = lib.crypto_stream_chacha20_xor_ic  # (out, in, len, nonce[8], block counter, key)
        self.xor_ic.argtypes = [ptr, ptr, size, ctypes.c_char_p, u64, ctypes.c_char_p]
        self.stream = lib.crypto_stream_chacha20  # (out, len, nonce[8], key): keystream from block 0
        self.stream.argtypes = [ptr, size, ctypes.c_char_p, ctypes.c_char_p]
        self.poly1305 = lib.crypto_onetimeauth_poly1305  # (tag out, in, len, key)
        self.poly1305.argtypes = [ptr, ptr, size, ptr]
        self.poly1305_verify = lib.crypto_onetimeauth_poly1305_verify  # 0: the tag is right (constant time)
        self.poly1305_verify.argtypes = [ptr, ptr, size, ptr]
        for call in (self.xor_ic, self.stream, self.poly1305, self.poly1305_verify):
            call.restype = ctypes.c_int


@functools.cache
def load() -> Sodium | None:
    """libsodium's calls, or None when the host has no libsodium (looked for once)."""
    return open_library(_NAMES)


def open_library(names: tuple[str, ...]) -> Sodium | None:
    """The first of ``names`` that opens, as a ``Sodium``; None if none opens, or the one that does is
    not a libsodium that initialises."""
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.sodium_init() < 0:
                return None
            return Sodium(lib)
        except AttributeError:  # a library of that name without these calls
            return None
    return None


class SodiumChacha:
    """One direction's chacha20-poly1305@openssh.com packets of up to ``SMALL`` bytes, through libsodium.

    Each packet is copied into a buffer of its own (one per direction: the daemon's loop is one thread),
    worked on there in place and copied out once; the calls take addresses in it, so views of the
    caller's buffers need no conversion.
    """

    def __init__(self, sodium: Sodium, key: bytes, adkey: bytes) -> None:
        self._na = sodium
        self._key = key  # payload key (K_2)
        self._adkey = adkey  # length key (K_1)
        self._buf = ctypes.create_string_buffer(64 + SMALL + _TAG)
        self._view = memoryview(self._buf).cast("B")
        self._at = ctypes.addressof(self._buf)
        self._poly_key_buf = ctypes.create_string_buffer(_POLY_KEY)
        self._poly_key = ctypes.addressof(self._poly_key_buf)

    def seal(self, seq: int, header: bytes | memoryview, body: bytes | memoryview) -> bytes:
        """Packet ``seq`` on the wire (encrypted length, encrypted body, tag), for ``len(body) <= SMALL``."""
        # One pass of the payload key over 64 zero bytes and the body: block 0 is the Poly1305 key (its
        # first 32 bytes), the body is encrypted from block 1 on, as the protocol says. The length goes
        # over block 0's last 4 bytes, so length and body lie together for the tag.
        na, at, n = self._na, self._at, len(body)
        if n > SMALL:  # the calls below write into a buffer of fixed size: never past it
            raise ValueError(f"a packet of {n} bytes is for cryptography: libsodium takes up to {SMALL}")
        nonce = seq.to_bytes(8, "big")
        view = self._view
        view[0:64] = _BLOCK
        view[64:64 + n] = body
        na.xor_ic(at, at, 64 + n, nonce, 0, self._key)
        view[60:64] = header
        na.xor_ic(at + 60, at + 60, 4, nonce, 0, self._adkey)
        na.poly1305(at + 64 + n, at + 60, 4 + n, at)
        return view[60:80 + n].tobytes()

    def length(self, seq: int, header: bytes | memoryview) -> int:
        """The packet length in packet ``seq``'s first 4 bytes."""
        self._view[0:4] = header
        self._na.xor_ic(self._at, self._at, 4, seq.to_bytes(8, "big"), 0, self._adkey)
        return int.from_bytes(self._view[0:4], "big")

    def open(self, seq: int, header: bytes | memoryview, sealed: bytes | memoryview) -> bytes | None:
        """Packet ``seq``'s body from its header and the rest (body and tag, at most ``SMALL + 16``
        bytes), or None if the tag is wrong."""
        na, at, n = self._na, self._at, len(sealed) - _TAG
        if not 0 <= n <= SMALL:
            raise ValueError(f"a packet of {n} bytes is for cryptography: libsodium takes 0 to {SMALL}")
        nonce = seq.to_bytes(8, "big")
        view = self._view
        view[0:4] = header
        view[4:4 + n + _TAG] = sealed
        na.stream(self._poly_key, _POLY_KEY, nonce, self._key)
        if na.poly1305_verify(at + 4 + n, at, 4 + n, self._poly_key) != 0:
            return None
        na.xor_ic(at + 4, at + 4, n, nonce, 1, self._key)
        return view[4:4 + n].tobytes()


__all__ = ["SMALL", "Sodium", "SodiumChacha", "load", "open_library"]
