"""The SSH connection's packet path, made cheaper where asyncssh spends more than the protocol asks for.

asyncssh (2.24) writes every packet with its own ``transport.write()``, and before each packet
after the key exchange it sends an ``SSH_MSG_IGNORE``: RFC 4251 9.3.1's countermeasure for
CBC mode, whose next IV an attacker can predict. Counter and AEAD modes (chacha20-poly1305,
AES-GCM, AES-CTR) have no such IV; OpenSSH sends no such packets. So one 64-byte round trip cost
two encryptions and two ``write()`` calls (two TCP segments, two wake-ups of sshd) where one does.

``FastConnection`` changes exactly that, as a subclass the client callback installs on the
connection asyncssh built (``adopt``; asyncssh's ``connect`` has no hook for its connection class):

- no ``SSH_MSG_IGNORE`` unless the cipher in use for sending is a CBC one;
- ``corked()``: packets sent inside the block go out in one ``writelines()`` at its end (a
  256 KiB relay chunk is 8 channel packets of 32 KiB: one system call, not 8);
- chacha20-poly1305 with two cipher contexts per packet, not three, and AES-GCM with one ``AESGCM``
  per key, not one per packet (tunneld/ssh/ciphers.py);
- **the lanes**, once keys are exchanged and the user is authenticated, for those two ciphers:
  - *send*: a packet is padded, sealed and queued here in one join (asyncssh joins, copies and splits
    it five times over and logs it), and ``write_channel`` sends a client's bytes on a direct-tcpip
    channel as data packets straight from the peer's window, without asyncssh's send buffer;
  - *receive*: data packets for a channel wired to a client socket are opened from views of the input
    buffer and handed to the client, window accounting as asyncssh's (and our own channel,
    tunneld/ssh/channel.py, takes its window updates, EOF, CLOSE and confirmation the same way); any
    other packet (and any the lane is not sure of) goes to asyncssh, one at a time, in order;
- received bytes otherwise parsed in pieces of about one packet (``_recv_data``): asyncssh copies what
  is left of its input buffer after every packet;
- no formatting of a log line per packet that asyncssh's debug level (below 3) then drops: the
  connection's own packets and its TCP channels' (``create_tcp_channel``);
- the keepalive timer re-armed lazily (asyncssh replaces it for every batch received).

tests/ssh/test_asyncssh_seams.py pins the asyncssh behaviour this relies on, so an asyncssh that
changes it fails loudly there. The upstream changes (docs/ssh-transport.md) would be: one
condition in ``SSHConnection.send_packet`` (the IGNORE only for CBC ciphers), a vectored write of
the packets one channel write or one received batch produces, parsing the input buffer by offset,
one cipher context per chacha20 key, one AESGCM per AES-GCM key, and the debug-level check before
``_log_packet`` formats anything. The lanes have no single upstream change: they are what a packet layer
in C would be, written against asyncssh's state (sequence numbers, windows, channel states) and checked
against it by the same tests.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import asyncssh
import asyncssh.logging
from asyncssh.crypto.chacha import ChachaCipher
from asyncssh.crypto.cipher import GCMCipher
from asyncssh.encryption import ChachaEncryption, GCMEncryption

from tunneld.ssh import sodium
from tunneld.ssh.ciphers import TAG, FastChachaCipher, FastGCMCipher, LaneCipher

_MSG_IGNORE = 2
_MSG_USERAUTH_LAST = 79
_MSG_CHANNEL_WINDOW_ADJUST = 93
_MSG_CHANNEL_DATA = 94
# What the receive lane may hand to a channel itself: open confirmation, window update, data, EOF, CLOSE.
_LANE_KINDS = frozenset({91, _MSG_CHANNEL_WINDOW_ADJUST, _MSG_CHANNEL_DATA, 96, 97})
_SEQ_MASK = 0xFFFFFFFF
_CLOSING = frozenset({"close_pending", "closed"})
_PADLEN = [bytes((n,)) for n in range(256)]
_POOL = 4096  # random padding drawn from the kernel this many bytes at a time (asyncssh: one call per packet)
# OpenSSH's maximum packet for forwarded channels: what the far side accepts per channel packet. Another
# server's limit stays correct (asyncssh cuts further), only a little slower.
SEND_PIECE = 32 * 1024
_FEED = 34 * 1024  # one 32 KiB channel packet (OpenSSH's) and its header, padding and MAC
_MSG_KEX_LAST = 49  # packets above this (auth, connection protocol) get asyncssh's IGNORE
_MSG_DATA_BYTE = bytes((_MSG_CHANNEL_DATA,))
# The read buffer (``FastConnection.read_buffer``): a client's bytes are read to READ_HEAD on, leaving room
# before them for a data packet's length, padding length, type, channel and size (4 + 1 + 1 + 4 + 4), and
# after them for its padding (less than 256 bytes).
READ_HEAD = 14
READ_SIZE = 256 * 1024


class FastConnection(asyncssh.SSHClientConnection):
    """asyncssh's client connection, without per-packet IGNOREs for non-CBC ciphers and with corking.

    Never constructed: ``adopt`` turns the connection asyncssh made into one, so it adds no state
    of its own beyond what ``adopt`` sets.
    """

    _kci_inner: bool  # inside send_packet of a packet that asyncssh precedes with an IGNORE
    _kci_cork: list[bytes] | None  # packets held until the end of ``corked()``
    _kci_corker: _Cork
    _kci_send_enc: object  # the send encryption the fields below were worked out for
    _kci_cbc: bool
    _kci_send_lane: LaneCipher | None  # the send cipher, when the lane can seal packets with it
    _kci_recv_enc: object
    _kci_recv_lane: LaneCipher | None
    _kci_pool: bytes  # random bytes for padding, used from _kci_pool_at on
    _kci_pool_at: int
    lane_sent: int  # packets the send lane sealed, and data packets the receive lane handed over
    lane_received: int
    _kci_heard: float  # the loop's time when the server last sent us anything
    _kci_rbuf: bytearray  # where clients' bytes are read (send_read), shared by the connection's channels
    _kci_rwhole: memoryview
    read_buffer: memoryview  # _kci_rbuf from READ_HEAD on: what a channel's get_buffer hands out

    def _reset_keepalive_timer(self) -> None:
        # asyncssh cancels its keepalive timer and makes a new one for every batch received (two timer
        # operations per batch). The same rule, lazily: note when the server was heard from, and let
        # the timer, when it fires, wait out the rest of the interval since then instead of counting.
        if self._auth_complete:
            self._kci_heard = self._loop.time()
            if self._keepalive_timer is None:
                self._set_keepalive_timer()

    def _keepalive_timer_callback(self) -> None:
        quiet = self._loop.time() - self._kci_heard
        if quiet < self._keepalive_interval:
            self._keepalive_timer = self._loop.call_later(self._keepalive_interval - quiet,
                                                          self._keepalive_timer_callback)
            return
        super()._keepalive_timer_callback()

    def _kci_keys(self) -> None:
        """Upgrade the ciphers of new keys (at the start, and after every key exchange) in place."""
        enc = self._send_encryption
        if enc is not self._kci_send_enc:
            self._kci_send_enc = enc
            self._kci_cbc = _is_cbc(self)
            self._kci_send_lane = _lane_cipher(enc)
        enc = self._recv_encryption
        if enc is not self._kci_recv_enc:
            self._kci_recv_enc = enc
            self._kci_recv_lane = _lane_cipher(enc)

    def small_packets_by_libsodium(self) -> bool:
        """Does chacha20-poly1305 seal and open this connection's small packets through libsodium?"""
        return any(isinstance(lane, FastChachaCipher) and lane.by_libsodium
                   for lane in (self._kci_send_lane, self._kci_recv_lane))

    def _kci_lane_open(self) -> bool:
        """May packets skip asyncssh's send_packet? Not before keys and authentication, not while keys
        are being exchanged (asyncssh holds packets back then), not when a rekey is due (asyncssh starts
        it), not with compression, not when packets are logged."""
        return (self._kci_send_lane is not None and self._kex_complete and self._auth_complete
                and not self._compressor and self._rekey_bytes_sent < self._rekey_bytes
                and (not self._rekey_seconds or time.monotonic() < self._rekey_time)
                and self._transport is not None and not _packets_logged())

    def send_packet(self, pkttype: int, *args: bytes, handler: Any = None) -> None:
        # Keys are checked here and in _recv_data: uvloop calls the data_received it bound when the
        # connection was made, before ``adopt``, so an override there would never run.
        self._kci_keys()
        if pkttype > _MSG_KEX_LAST and self._kci_lane_open():
            self._kci_seal(_PADLEN[pkttype] + b"".join(args))
            return
        if pkttype == _MSG_IGNORE and self._kci_inner and not self._kci_cbc:
            return  # the IGNORE asyncssh inserts before every packet: nothing to hide for this cipher
        outer = self._kci_inner
        self._kci_inner = pkttype > _MSG_KEX_LAST
        try:
            super().send_packet(pkttype, *args, handler=handler)
        finally:
            self._kci_inner = outer

    def _recv_data(self) -> None:
        # Corked: what the packets received make us send (the channel data a window update lets out,
        # window updates, replies) leaves in one write.
        with self.corked():
            while self._inpbuf and self._transport is not None:
                nxt = self._kci_lane_receive()
                if nxt == _WAIT:
                    return
                if nxt == _NOT_LANE:
                    self._kci_feed()
                    return
                # The next packet (nxt bytes) is for asyncssh: it parses exactly that one.
                rest = self._inpbuf[nxt:]
                self._inpbuf = self._inpbuf[:nxt]
                super()._recv_data()
                self._inpbuf += rest

    def _kci_feed(self) -> None:
        # asyncssh parses packets off the front of its input buffer and copies what is left after
        # each one (twice: after the header and after the packet), so a 256 KiB read of 32 KiB
        # packets cost about seven copies of every byte. Fed in pieces of about one packet, the
        # copies stay small: the same as the kernel handing over smaller reads, which TCP may do anyway.
        data = self._inpbuf
        if len(data) <= _FEED:
            super()._recv_data()
            return
        self._inpbuf = b""
        for start in range(0, len(data), _FEED):
            if self._transport is None:  # closed while parsing (an error, a disconnect): stop, as asyncssh does
                return
            self._inpbuf += data[start:start + _FEED]
            super()._recv_data()

    def _kci_lane_receive(self) -> int:
        """Take the data packets at the front of the input buffer that the lane can hand over.

        Returns _WAIT when the next packet is not all here yet, _NOT_LANE when the lane does not apply
        now (asyncssh takes everything), or the size of the next packet, which is for asyncssh.
        """
        self._kci_keys()
        lane = self._kci_recv_lane
        if lane is None or not self._auth_complete or self._recv_handler != self._recv_pkthdr:
            return _NOT_LANE
        self._reset_keepalive_timer()  # as asyncssh's _recv_data does for every batch received
        buf = self._inpbuf
        view = memoryview(buf)
        end = len(buf)
        at = 0
        seq = self._recv_seq
        try:
            while True:
                if end - at < 4:
                    return _WAIT
                header = view[at:at + 4]
                size = lane.length(seq, header)
                if size > self._max_recv_pktlen:
                    return _NOT_LANE  # asyncssh says so and disconnects
                stop = at + 4 + size + TAG
                if stop > end:
                    return _WAIT
                body = lane.open(seq, header, view[at + 4:stop])
                if body is None or not self._kci_channel_packet(body):
                    lane.rewind()  # a bad tag is asyncssh's to report, like any packet it handles
                    return stop - at
                at = stop
                seq = self._recv_seq = (seq + 1) & _SEQ_MASK
                self.lane_received += 1
                if self._transport is None:  # the client's handling closed the connection
                    return _WAIT
        except asyncssh.DisconnectError as exc:
            self._send_disconnect(exc.code, exc.reason, exc.lang)
            self._force_close(exc)
            return _WAIT
        except Exception:  # as asyncssh's _recv_data: a bug in a handler ends the connection, not the loop
            self.internal_error()
            return _WAIT
        finally:
            if at:
                self._inpbuf = buf[at:]

    def _kci_channel_packet(self, body: bytes) -> bool:
        """Hand one channel packet to its channel as asyncssh would: our own channel (tunneld/ssh/channel.py)
        takes its data, window updates, EOF, CLOSE and open confirmation itself; asyncssh's TCP channels
        wired to a client socket take data packets (with asyncssh's window accounting). False: anything
        else, and anything unusual, which asyncssh must see."""
        kind = body[1]
        if kind not in _LANE_KINDS:
            return False
        chan = self._channels.get(int.from_bytes(body[2:6], "big"))
        if type(chan) is not _TCPChannel:
            take = getattr(chan, "take_packet", None)
            if take is None or not take(kind, body, len(body) - body[0]):
                return False
            self._auth_final = True
            return True
        if kind != _MSG_CHANNEL_DATA:
            return False
        size = int.from_bytes(body[6:10], "big")
        if 10 + size != len(body) - body[0]:
            return False  # malformed: asyncssh's parser says how
        if (size > chan._recv_window or chan._recv_state != "open" or chan._recv_paused or chan._recv_buf
                or chan._send_state in _CLOSING or chan._encoding):
            return False
        sink = getattr(chan._session, "sink", None)
        if sink is None:  # not wired to a client socket: the stream path takes it
            return False
        self._auth_final = True
        if not size:
            return True
        window = chan._recv_window - size
        if window < chan._init_recv_window / 2:  # as asyncssh's _deliver_data: back to the full window
            chan.send_packet(_MSG_CHANNEL_WINDOW_ADJUST, (chan._init_recv_window - window).to_bytes(4, "big"))
            window = chan._init_recv_window
        chan._recv_window = window
        sink.channel_data(memoryview(body)[10:10 + size])
        return True

    # ------------------------------------------------------------ the send lane

    def write_channel(self, chan: Any, data: bytes) -> None:
        """``chan.write(data)``: while the peer's window allows, as data packets sealed here; the rest
        is queued by asyncssh as usual (which pauses the writer at its high-water mark). One write.

        :raises OSError: as ``chan.write``, when the channel is not open for sending.
        """
        with self._kci_corker:
            if (type(chan) is _TCPChannel and chan._send_state == "open" and not chan._send_buf
                    and chan._send_window):
                assert chan._send_chan is not None  # open: the peer told us its number
                sent = self.send_data(chan._send_chan, data, chan._send_window, chan._send_pktsize)
                chan._send_window -= sent
                if sent == len(data):
                    return
                data = memoryview(data)[sent:]  # type: ignore[assignment]
            write_in_pieces(chan, data)

    def send_data(self, send_chan: int, data: bytes | memoryview, window: int, pktsize: int) -> int:
        """Send what of ``data`` the peer's ``window`` allows as data packets on its channel ``send_chan``,
        sealed by the lane; how many bytes went (0 while the lane is closed: asyncssh must send them)."""
        if not window or not self._kci_lane_open():
            return 0
        head = _PADLEN[_MSG_CHANNEL_DATA] + send_chan.to_bytes(4, "big")
        view = memoryview(data)
        end = len(data)
        at = 0
        with self._kci_corker:
            while at < end and window:
                take = min(end - at, pktsize, window)
                self._kci_seal(head + take.to_bytes(4, "big"), view[at:at + take])
                at += take
                window -= take
        return at

    def send_read(self, send_chan: int, nbytes: int, window: int, pktsize: int) -> int:
        """Send what of the ``nbytes`` just read into ``read_buffer`` the peer's ``window`` allows, as data
        packets on its channel ``send_chan``, each sealed where its bytes lie; how many bytes went (0 while
        the lane is closed: the caller keeps them).

        ``send_data`` joins a packet's header, bytes and padding into a new buffer to seal it; here each
        packet's header is written just before its bytes (over the previous packet's, already sealed)
        and its padding just after them (the next packet's first bytes are kept aside meanwhile), so a
        client's bytes are copied only by the kernel and the cipher. What is left stays in place.
        """
        if not window or not self._kci_lane_open():
            return 0
        chan = _MSG_DATA_BYTE + send_chan.to_bytes(4, "big")
        if nbytes <= pktsize and nbytes <= window:  # one packet (a round trip's): nothing to cork
            self._kci_seal_read(chan, READ_HEAD, nbytes, False)
            return nbytes
        at = READ_HEAD
        end = READ_HEAD + nbytes
        with self._kci_corker:
            while at < end and window:
                take = min(end - at, pktsize, window)
                self._kci_seal_read(chan, at, take, at + take < end)
                at += take
                window -= take
        return at - READ_HEAD

    def _kci_seal_read(self, chan: bytes, at: int, take: int, more: bool) -> None:
        """Seal the ``take`` bytes at ``at`` in the read buffer as one data packet (``chan``: its type and
        channel), its header over the 14 bytes before them; ``more``: bytes follow, put back after."""
        buf = self._kci_rbuf
        padlen = self._kci_padlen(9 + take)
        length = (10 + take + padlen).to_bytes(4, "big")
        buf[at - READ_HEAD:at] = length + _PADLEN[padlen] + chan + take.to_bytes(4, "big")
        tail = at + take
        kept = buf[tail:tail + padlen] if more else None
        buf[tail:tail + padlen] = self._kci_padding(padlen)
        self._kci_send_sealed(length, self._kci_rwhole[at - READ_HEAD + 4:tail + padlen])
        if kept is not None:
            buf[tail:tail + padlen] = kept

    def _kci_padlen(self, size: int) -> int:
        """How much padding a packet of ``size`` payload bytes gets (at least 4, to a whole block)."""
        padlen = -(self._send_enchdrlen + size) % self._send_blocksize
        return padlen + self._send_blocksize if padlen < 4 else padlen

    def _kci_padding(self, padlen: int) -> bytes:
        at = self._kci_pool_at
        if at + padlen > _POOL:
            self._kci_pool = os.urandom(_POOL)
            at = 0
        self._kci_pool_at = at + padlen
        return self._kci_pool[at:at + padlen]

    def _kci_seal(self, payload: bytes, data: bytes | memoryview = b"") -> None:
        """Pad, seal and send (or cork) one packet, as asyncssh's send_packet does after the key exchange."""
        size = len(payload) + len(data)
        padlen = self._kci_padlen(size)
        length = 1 + size + padlen
        body = b"".join((_PADLEN[padlen], payload, data, self._kci_padding(padlen)))
        self._kci_send_sealed(length.to_bytes(4, "big"), body)

    def _kci_send_sealed(self, length: bytes, body: bytes | memoryview) -> None:
        """Seal one padded packet (``length``: its length field; ``body``: the rest) and send or cork it."""
        seq = self._send_seq
        assert self._kci_send_lane is not None
        pieces = self._kci_send_lane.seal(seq, length, body)
        self._send_seq = (seq + 1) & _SEQ_MASK
        self._rekey_bytes_sent += len(body)
        self.lane_sent += 1
        cork = self._kci_cork
        if cork is not None:
            cork.extend(pieces)
        elif self._transport is not None:
            with contextlib.suppress(ConnectionError):
                self._transport.writelines(pieces)

    def log_sent_packet(self, pkttype: int, pktid: int | None, packet: Any, note: str = "") -> None:
        if _packets_logged():
            super().log_sent_packet(pkttype, pktid, packet, note)

    def log_received_packet(self, pkttype: int, pktid: int | None, packet: Any, note: str = "") -> None:
        if _packets_logged():
            super().log_received_packet(pkttype, pktid, packet, note)

    def create_tcp_channel(self, encoding: str | None = None, errors: str = "strict",
                           window: int = 2 * 1024 * 1024, max_pktsize: int = 32768) -> asyncssh.SSHTCPChannel[Any]:
        chan = super().create_tcp_channel(encoding, errors, window, max_pktsize)
        if type(chan) is asyncssh.SSHTCPChannel:  # the same object, minus the dropped log lines
            chan.__class__ = _TCPChannel
        return chan

    def _send(self, data: bytes) -> None:
        cork = self._kci_cork
        if cork is not None:
            cork.append(data)
        else:
            super()._send(data)

    def corked(self) -> _Cork:
        """A block whose packets are held, then written with one call, in order (nests)."""
        return self._kci_corker

    def _flush_cork(self, transport: Any) -> None:
        cork = self._kci_cork
        self._kci_cork = None
        # To the transport the block started with: a DISCONNECT sent just before asyncssh drops the
        # transport (it aborts it on the next loop turn) still goes out, as without the cork.
        if not cork or transport is None or transport.is_closing():
            return
        with contextlib.suppress(ConnectionError):
            if len(cork) == 1:
                transport.write(cork[0])
            else:
                transport.writelines(cork)


class _Cork:
    """``FastConnection.corked()``: a plain object, not a generator, since it runs for every channel write."""

    __slots__ = ("conn", "depth", "transport")

    def __init__(self, conn: FastConnection) -> None:
        self.conn = conn
        self.depth = 0
        self.transport: Any = None

    def __enter__(self) -> None:
        self.depth += 1
        if self.depth == 1:
            self.transport = self.conn._transport
            self.conn._kci_cork = []

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1
        if self.depth == 0:
            transport, self.transport = self.transport, None
            self.conn._flush_cork(transport)


class _TCPChannel(asyncssh.SSHTCPChannel[Any]):
    """asyncssh's direct-tcpip channel, formatting no packet log line that would be dropped."""

    def log_sent_packet(self, pkttype: int, pktid: int | None, packet: Any, note: str = "") -> None:
        if _packets_logged():
            super().log_sent_packet(pkttype, pktid, packet, note)

    def log_received_packet(self, pkttype: int, pktid: int | None, packet: Any, note: str = "") -> None:
        if _packets_logged():
            super().log_received_packet(pkttype, pktid, packet, note)


def _packets_logged() -> bool:
    # asyncssh logs packets only at its debug level 3 (asyncssh.set_debug_level); 1 by default.
    return asyncssh.logging.logger._debug_level >= 3


_WAIT = -1  # _kci_lane_receive: the next packet is not all here yet
_NOT_LANE = 0  # _kci_lane_receive: asyncssh takes everything


def write_in_pieces(chan: Any, data: bytes | memoryview) -> None:
    """``chan.write(data)``, handed over in packet-sized pieces.

    asyncssh cuts what it sends into packets by slicing its send buffer and deleting the front,
    which copies the rest each time (about 3.5 extra copies of a 256 KiB read); pieces of one packet
    each are sent whole.
    """
    if len(data) <= SEND_PIECE:
        chan.write(data)
        return
    view = memoryview(data)
    for start in range(0, len(data), SEND_PIECE):
        chan.write(view[start:start + SEND_PIECE])


def _lane_cipher(enc: object) -> LaneCipher | None:
    """Put our cipher in asyncssh's encryption object in place of its own; None for other ciphers."""
    if type(enc) is ChachaEncryption:
        chacha = enc._cipher
        if type(chacha) is ChachaCipher:
            fast_chacha = FastChachaCipher(chacha._key, chacha._adkey, sodium.load())
            enc._cipher = fast_chacha  # type: ignore[assignment]
            return fast_chacha
    elif type(enc) is GCMEncryption:
        gcm = enc._cipher
        if type(gcm) is GCMCipher:  # its IV is where its last packet left it: we go on from there
            fast_gcm = FastGCMCipher(gcm._key, gcm._iv)
            enc._cipher = fast_gcm  # type: ignore[assignment]
            return fast_gcm
    return None


def _is_cbc(conn: asyncssh.SSHClientConnection) -> bool:
    cipher = conn.get_extra_info("send_cipher") or ""
    return str(cipher).endswith("-cbc") or "cbc@" in str(cipher)


def adopt(conn: asyncssh.SSHClientConnection) -> FastConnection | None:
    """Make the connection asyncssh just built a ``FastConnection`` (called from connection_made).

    Returns None, leaving the connection as it is, when asyncssh built something other than its
    plain client connection (changing the class would then be unsafe); the seam test fails then.
    """
    if type(conn) is not asyncssh.SSHClientConnection:
        return None
    conn.__class__ = FastConnection
    fast: FastConnection = conn  # type: ignore[assignment]
    fast._kci_inner = False
    fast._kci_cork = None
    fast._kci_corker = _Cork(fast)
    fast._kci_send_enc = fast._kci_recv_enc = None
    fast._kci_send_lane = fast._kci_recv_lane = None
    fast._kci_cbc = False
    fast._kci_pool = b""
    fast._kci_pool_at = _POOL
    fast.lane_sent = fast.lane_received = 0
    fast._kci_rbuf = bytearray(READ_HEAD + READ_SIZE + 256)
    fast._kci_rwhole = memoryview(fast._kci_rbuf)
    fast.read_buffer = fast._kci_rwhole[READ_HEAD:READ_HEAD + READ_SIZE]
    fast._kci_heard = 0.0
    return fast


__all__ = ["READ_HEAD", "READ_SIZE", "SEND_PIECE", "FastConnection", "adopt", "write_in_pieces"]
