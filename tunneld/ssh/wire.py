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
- chacha20-poly1305 with two cipher contexts per packet, not three (tunneld/ssh/chacha.py);
- received bytes parsed in pieces of about one packet (``_recv_data``): asyncssh copies what is
  left of its input buffer after every packet;
- no formatting of a log line per packet that asyncssh's debug level (below 3) then drops: the
  connection's own packets and its TCP channels' (``create_tcp_channel``).

tests/ssh/test_asyncssh_seams.py pins the asyncssh behaviour this relies on, so an asyncssh that
changes it fails loudly there. The upstream changes (docs/ssh-transport.md) would be: one
condition in ``SSHConnection.send_packet`` (the IGNORE only for CBC ciphers), a vectored write of
the packets one channel write or one received batch produces, parsing the input buffer by offset,
one cipher context per chacha20 key, and the debug-level check before ``_log_packet`` formats anything.
"""

from __future__ import annotations

import contextlib
from typing import Any

import asyncssh
import asyncssh.logging
from asyncssh.crypto.chacha import ChachaCipher
from asyncssh.encryption import ChachaEncryption

from tunneld.ssh.chacha import FastChachaCipher

_MSG_IGNORE = 2
_FEED = 34 * 1024  # one 32 KiB channel packet (OpenSSH's) and its header, padding and MAC
_MSG_KEX_LAST = 49  # packets above this (auth, connection protocol) get asyncssh's IGNORE


class FastConnection(asyncssh.SSHClientConnection):
    """asyncssh's client connection, without per-packet IGNOREs for non-CBC ciphers and with corking.

    Never constructed: ``adopt`` turns the connection asyncssh made into one, so it adds no state
    of its own beyond what ``adopt`` sets.
    """

    _kci_inner: bool  # inside send_packet of a packet that asyncssh precedes with an IGNORE
    _kci_cork: list[bytes] | None  # packets held until the end of ``corked()``
    _kci_corker: _Cork
    _kci_send_enc: object  # the send encryption the two fields below were worked out for
    _kci_cbc: bool
    _kci_recv_enc: object

    def send_packet(self, pkttype: int, *args: bytes, handler: Any = None) -> None:
        enc = self._send_encryption
        if enc is not self._kci_send_enc:  # new keys: a new cipher (object) for sending
            self._kci_send_enc = enc
            self._kci_cbc = _is_cbc(self)
            _faster_chacha(enc)
        # The receiving side is upgraded here too: uvloop calls the data_received it bound when the
        # connection was made, before ``adopt``, so an override there would never run. We send within
        # a packet or two of any key change (new keys, window updates, the relay's own data).
        enc = self._recv_encryption
        if enc is not self._kci_recv_enc:
            self._kci_recv_enc = enc
            _faster_chacha(enc)
        if pkttype == _MSG_IGNORE and self._kci_inner and not self._kci_cbc:
            return  # the IGNORE asyncssh inserts before every packet: nothing to hide for this cipher
        outer = self._kci_inner
        self._kci_inner = pkttype > _MSG_KEX_LAST
        try:
            super().send_packet(pkttype, *args, handler=handler)
        finally:
            self._kci_inner = outer

    def _recv_data(self) -> None:
        # asyncssh parses packets off the front of its input buffer and copies what is left after
        # each one (twice: after the header and after the packet), so a 256 KiB read of 32 KiB
        # packets cost about seven copies of every byte. Fed in pieces of about one packet, the
        # copies stay small: the same as the kernel handing over smaller reads, which TCP may do anyway.
        # Corked: what the packets received make us send (the channel data a window update lets out,
        # replies) leaves in one write.
        with self.corked():
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


def _faster_chacha(enc: object) -> None:
    if type(enc) is ChachaEncryption:
        cipher = enc._cipher
        if type(cipher) is ChachaCipher:
            enc._cipher = FastChachaCipher(cipher._key, cipher._adkey)  # type: ignore[assignment]


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
    fast._kci_cbc = False
    return fast


__all__ = ["FastConnection", "adopt"]
