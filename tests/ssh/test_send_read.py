"""The send lane's in-place sealing (``FastConnection.send_read``, tunneld/ssh/wire.py), as a property.

For any read size, window and packet size, with either cipher (chacha20's small packets through libsodium
or not, opened by the other): the packets written open, with the
peer's cipher and in order, to data packets on the right channel carrying exactly the bytes read,
each no larger than the packet size, no more in all than the window, padded as the protocol asks; and
the bytes not sent are left intact in the read buffer, where the caller copies them from.

The connection here is a bare ``FastConnection`` holding only the state the send lane reads, with a
transport that keeps what is written; the ciphers are the real ones. The lab's sshd checks the same
packets on the wire in tests/ssh/test_asyncssh_seams.py and tests/ssh/test_wired.py.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.ssh import sodium
from tunneld.ssh.ciphers import TAG, FastChachaCipher, FastGCMCipher
from tunneld.ssh.wire import READ_HEAD, READ_SIZE, FastConnection, _Cork

_MSG_CHANNEL_DATA = 94
_POOL = 4096


class _Kept:
    """A transport that keeps every byte written, as the kernel would send them."""

    def __init__(self) -> None:
        self.wire = bytearray()

    def write(self, data: Any) -> None:
        self.wire += data

    def writelines(self, pieces: Any) -> None:
        for piece in pieces:
            self.wire += piece

    def is_closing(self) -> bool:
        return False


def _pair(cipher: str) -> tuple[Any, Any, int]:
    """(our cipher, the peer's copy of it, the block size asyncssh pads to)."""
    if cipher == "gcm":
        key, iv = os.urandom(16), os.urandom(12)
        return FastGCMCipher(key, iv), FastGCMCipher(key, iv), 16
    key, adkey = os.urandom(32), os.urandom(32)
    if cipher == "chacha+libsodium":  # sealed through libsodium, opened through cryptography alone
        return FastChachaCipher(key, adkey, sodium.load()), FastChachaCipher(key, adkey), 8
    return FastChachaCipher(key, adkey), FastChachaCipher(key, adkey), 8


def _connection(lane: Any, blocksize: int, transport: _Kept) -> FastConnection:
    conn = FastConnection.__new__(FastConnection)  # the state adopt() and asyncssh would have set
    conn._kci_cork = None
    conn._kci_corker = _Cork(conn)
    conn._transport = transport
    conn._kci_send_lane = lane
    conn._send_seq = 0
    conn._send_blocksize = blocksize
    conn._send_enchdrlen = 1  # AEAD ciphers: asyncssh's value for encrypt-then-MAC
    conn._rekey_bytes_sent = 0
    conn._rekey_bytes = 1 << 40
    conn._rekey_seconds = 0
    conn._kex_complete = conn._auth_complete = True
    conn._compressor = None
    conn.lane_sent = 0
    conn._kci_pool = b""
    conn._kci_pool_at = _POOL
    conn._kci_rbuf = bytearray(READ_HEAD + READ_SIZE + 256)
    conn._kci_rwhole = memoryview(conn._kci_rbuf)
    conn.read_buffer = conn._kci_rwhole[READ_HEAD:READ_HEAD + READ_SIZE]
    return conn


def _opened(wire: bytes, peer: Any, count: int) -> list[bytes]:
    """The bodies of ``count`` packets on ``wire``, opened by the peer in order (nothing may be left)."""
    bodies, at = [], 0
    for seq in range(count):
        header = wire[at:at + 4]
        length = peer.length(seq, header)
        body = peer.open(seq, header, wire[at + 4:at + 4 + length + TAG])
        assert body is not None, f"packet {seq}: the tag does not match"
        bodies.append(body)
        at += 4 + length + TAG
    assert at == len(wire), "bytes written beyond the packets counted"
    return bodies


@settings(max_examples=300, deadline=None)
# tests/ssh/test_sodium.py fails in CI when libsodium is missing, so the variant is never silently absent there.
@given(cipher=st.sampled_from(["gcm", "chacha"] + (["chacha+libsodium"] if sodium.load() else [])),
       nbytes=st.integers(1, READ_SIZE),
       window=st.integers(1, 2 * READ_SIZE),
       pktsize=st.one_of(st.integers(1, 64), st.integers(1, 70_000), st.just(32768)),
       channel=st.integers(0, 2**32 - 1))
def test_sealed_in_place_opens_to_the_bytes_read(cipher: str, nbytes: int, window: int, pktsize: int,
                                                  channel: int) -> None:
    lane, peer, blocksize = _pair(cipher)
    transport = _Kept()
    conn = _connection(lane, blocksize, transport)
    data = os.urandom(nbytes)
    conn.read_buffer[:nbytes] = data

    sent = conn.send_read(channel, nbytes, window, pktsize)

    assert sent == min(nbytes, window)
    packets = conn._send_seq
    assert packets == conn.lane_sent == -(-sent // pktsize)
    got = bytearray()
    for body in _opened(bytes(transport.wire), peer, packets):
        padlen = body[0]
        assert padlen >= 4 and (len(body) % blocksize) == 0, (padlen, len(body))
        payload = body[1:len(body) - padlen]
        assert payload[0] == _MSG_CHANNEL_DATA
        assert int.from_bytes(payload[1:5], "big") == channel
        size = int.from_bytes(payload[5:9], "big")
        assert size == len(payload) - 9 and 0 < size <= pktsize
        got += payload[9:]
    assert bytes(got) == data[:sent]
    assert bytes(conn.read_buffer[sent:nbytes]) == data[sent:]  # what is left, as read
    assert conn._rekey_bytes_sent == len(transport.wire) - packets * (4 + TAG)
