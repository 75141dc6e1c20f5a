"""chacha20-poly1305@openssh.com through libsodium (tunneld/ssh/sodium.py): the same bytes as through
``cryptography`` and asyncssh's own shim, any size and sequence number, and no packet with a flipped bit
opened. The lab's sshd checks the same packets on the wire (tests/ssh/test_asyncssh_seams.py)."""

from __future__ import annotations

import os

import pytest
from asyncssh.crypto.chacha import ChachaCipher
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.lab.fixture import lab_required
from tunneld.ssh import sodium
from tunneld.ssh.ciphers import TAG, FastChachaCipher


def _calls() -> sodium.Sodium:
    calls = sodium.load()
    if calls is None:
        message = "libsodium is not installed (Debian: libsodium23): chacha20's small packets go through cryptography"
        if lab_required():  # scripts/install-deps.sh installs it: CI must test this path, not skip it
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return calls


def _pair() -> tuple[FastChachaCipher, FastChachaCipher, ChachaCipher]:
    """(ours with libsodium, ours with cryptography alone, asyncssh's) on the same fresh keys."""
    theirs = ChachaCipher(os.urandom(64))
    return (FastChachaCipher(theirs._key, theirs._adkey, _calls()), FastChachaCipher(theirs._key, theirs._adkey),
            theirs)


@pytest.mark.parametrize("size", [0, 1, 60, 4096, sodium.SMALL - 1, sodium.SMALL, sodium.SMALL + 1, 32768])
def test_the_same_packets_as_cryptography_and_asyncssh(size: int) -> None:
    """On each side of ``SMALL`` (libsodium up to it, cryptography beyond): the same wire bytes, each
    opened by the other, and a wrong tag refused by both."""
    fast, plain, theirs = _pair()
    for seq in (0, 1, 2**32 + 5, 2**64 - 1):
        header, body = os.urandom(4), os.urandom(size)
        wire = b"".join(fast.seal(seq, header, memoryview(bytearray(body))))
        packet, tag = theirs.encrypt_and_sign(header, body, seq.to_bytes(8, "big"))
        assert wire == b"".join(plain.seal(seq, header, body)) == packet + tag
        view = memoryview(wire)
        for reader in (fast, plain):
            assert reader.length(seq, view[:4]) == int.from_bytes(header, "big")
            assert reader.open(seq, view[:4], view[4:]) == body
            assert reader.open(seq, view[:4], wire[4:-1] + bytes([wire[-1] ^ 1])) is None


@settings(max_examples=300, deadline=None)
@given(size=st.integers(0, sodium.SMALL), seq=st.integers(0, 2**64 - 1), flip=st.integers(0, 2**31))
def test_a_packet_with_any_bit_flipped_is_refused(size: int, seq: int, flip: int) -> None:
    """The tag covers the encrypted length and body: a bit flipped anywhere in them, or in the tag, is
    refused, and the packet is opened by neither implementation; the untouched packet opens."""
    fast, plain, _ = _pair()
    body = os.urandom(size)
    wire = bytearray(fast.seal(seq, (size + 4).to_bytes(4, "big"), body)[0])
    assert fast.open(seq, wire[:4], wire[4:]) == plain.open(seq, wire[:4], wire[4:]) == body
    bit = flip % (len(wire) * 8)
    wire[bit // 8] ^= 1 << (bit % 8)
    assert fast.open(seq, wire[:4], wire[4:]) is None
    assert plain.open(seq, wire[:4], wire[4:]) is None
    assert len(wire) == 4 + size + TAG


def test_a_missing_or_wrong_library_is_none() -> None:
    """No libsodium, or a library of that name without its calls: None, so cryptography does it all."""
    assert sodium.open_library(("libkci-no-such-library.so.0",)) is None
    assert sodium.open_library(("libc.so.6",)) is None  # opens, but has no sodium_init


def test_the_lane_uses_libsodium_where_the_host_has_it() -> None:
    """tunneld/ssh/wire.py hands the library to every chacha20 lane; this host (CI) has it."""
    assert sodium.load() is _calls()
    assert FastChachaCipher(bytes(32), bytes(32), sodium.load()).by_libsodium


def test_a_packet_too_large_for_the_buffer_is_refused_not_written() -> None:
    """The calls write into a fixed buffer: a caller's mistake is a ValueError, never a write past it."""
    small = sodium.SodiumChacha(_calls(), os.urandom(32), os.urandom(32))
    with pytest.raises(ValueError, match="for cryptography"):
        small.seal(0, bytes(4), bytes(sodium.SMALL + 1))
    with pytest.raises(ValueError, match="for cryptography"):
        small.open(0, bytes(4), bytes(sodium.SMALL + 17))
    with pytest.raises(ValueError, match="for cryptography"):
        small.open(0, bytes(4), bytes(15))  # shorter than a tag
