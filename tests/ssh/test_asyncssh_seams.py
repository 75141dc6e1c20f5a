"""asyncssh's behaviour and private parts that tunneld/ssh/wire.py and tunneld/ssh/ciphers.py rely on,
pinned against the lab's real sshd.

The SSH transport's speed-ups live at the adapter's seam (a subclass of asyncssh's client connection,
a faster chacha20-poly1305 shim). They depend on how asyncssh 2.x sends packets; each test below names
the behaviour and what the adapter uses it for, so that an asyncssh release that changes one fails
here, loudly, instead of silently losing the speed-up or, worse, the wire format. docs/ssh-transport.md
("asyncssh behaviour we rely on") lists the same seams and the upstream changes that would retire them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import asyncssh
import asyncssh.logging
import pytest
from asyncssh.crypto.chacha import ChachaCipher
from asyncssh.crypto.cipher import GCMCipher
from asyncssh.encryption import ChachaEncryption, GCMEncryption

from tests.helpers import stream_echo
from tests.lab.lab import LabInfo
from tests.ssh.test_transport import TIMEOUTS, settings
from tunneld.cli.status import _status_header
from tunneld.ssh import sodium
from tunneld.ssh.ciphers import FastChachaCipher, FastGCMCipher
from tunneld.ssh.client import SshConnection, open_connection
from tunneld.ssh.wire import FastConnection

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

CHACHA = "chacha20-poly1305@openssh.com"
GCM = "aes128-gcm@openssh.com"


def cipher_config(tmp_path: Path, lab: LabInfo, cipher: str) -> str:
    """An ssh config that pins ``cipher`` (the transport honours Ciphers), for the lab's host at whatever
    address it is reached."""
    path = tmp_path / f"ssh_config.{cipher}"
    path.write_text(f"Host *\n    Ciphers {cipher}\n")
    return str(path)


@asynccontextmanager
async def connected(lab: LabInfo, tmp_path: Path, cipher: str) -> AsyncIterator[SshConnection]:
    conn = await open_connection(settings(lab, config_file=cipher_config(tmp_path, lab, cipher)), TIMEOUTS)
    try:
        assert conn.describe()["cipher"] == cipher
        yield conn
    finally:
        await conn.aclose()


@asynccontextmanager
async def stock(lab: LabInfo, cipher: str) -> AsyncIterator[asyncssh.SSHClientConnection]:
    """A plain asyncssh connection (no adapter), for what asyncssh itself does."""
    known = asyncssh.import_known_hosts(Path(lab.ssh_known_hosts).read_text())
    async with asyncssh.connect(lab.ssh_host, port=lab.ssh_port, username=lab.ssh_user,
                                client_keys=[str(lab.ssh_key)], known_hosts=known, config=[],
                                encryption_algs=[cipher]) as conn:
        yield conn


async def _packets_for_one_write(conn: asyncssh.SSHClientConnection, lab: LabInfo) -> int:
    """How many packets asyncssh sends for one small channel write (read off its send sequence number)."""
    chan, _ = await conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", lab.echo_port)
    before = conn._send_seq
    chan.write(b"x" * 64)
    sent = conn._send_seq - before
    chan.close()
    return int(sent)


async def test_asyncssh_builds_its_own_connection_class_and_tells_the_client(lab: LabInfo, tmp_path: Path) -> None:
    """wire.adopt turns the connection into a FastConnection from SSHClient.connection_made: that needs
    asyncssh.connect to build exactly SSHClientConnection and to call connection_made with it."""
    async with connected(lab, tmp_path, GCM) as conn:
        assert type(conn._conn) is FastConnection
        assert await stream_echo(await conn.open_tcp("127.0.0.1", lab.echo_port), b"hello") == b"hello"


@pytest.mark.parametrize("cipher", [CHACHA, GCM])
async def test_stock_asyncssh_sends_an_ignore_before_every_packet_and_we_do_not(
        lab: LabInfo, tmp_path: Path, cipher: str) -> None:
    """FastConnection.send_packet drops the SSH_MSG_IGNORE that asyncssh's send_packet inserts (by
    calling self.send_packet(MSG_IGNORE, ...) first) before every packet after the key exchange."""
    async with stock(lab, cipher) as conn:
        assert await _packets_for_one_write(conn, lab) == 2  # IGNORE + CHANNEL_DATA
    async with connected(lab, tmp_path, cipher) as ours:
        assert await _packets_for_one_write(ours._conn, lab) == 1


async def test_cbc_ciphers_keep_the_ignore() -> None:
    """RFC 4251 9.3.1: the countermeasure matters for CBC only; the check reads asyncssh's cipher name."""
    from tunneld.ssh import wire

    class Named:
        def __init__(self, name: str) -> None:
            self.name = name

        def get_extra_info(self, key: str) -> str:
            assert key == "send_cipher"  # the name asyncssh records when new keys take effect
            return self.name

    assert wire._is_cbc(Named("aes128-cbc"))  # type: ignore[arg-type]
    assert wire._is_cbc(Named("rijndael-cbc@lysator.liu.se"))  # type: ignore[arg-type]
    assert not wire._is_cbc(Named(GCM))  # type: ignore[arg-type]
    assert not wire._is_cbc(Named("aes128-ctr"))  # type: ignore[arg-type]
    assert not wire._is_cbc(Named(CHACHA))  # type: ignore[arg-type]


async def test_corked_packets_leave_in_one_write_in_order(lab: LabInfo, tmp_path: Path) -> None:
    """corked() relies on asyncssh writing every packet through SSHConnection._send."""
    async with connected(lab, tmp_path, GCM) as conn:
        fast = conn._conn
        assert isinstance(fast, FastConnection)
        chan, _ = await fast.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", lab.echo_port)
        with fast.corked():
            chan.write(b"y" * 200_000)  # several channel packets (sshd's maximum packet is 32 KiB)
            held = len(fast._kci_cork or [])
        assert held >= 4
        assert fast._kci_cork is None
        chan.close()
        # The link still works: what went out corked was well-formed and in sequence.
        assert await stream_echo(await conn.open_tcp("127.0.0.1", lab.echo_port), b"z" * 300_000) == b"z" * 300_000


async def test_tcp_channels_are_created_through_create_tcp_channel(lab: LabInfo, tmp_path: Path) -> None:
    """The quiet packet logging of TCP channels needs asyncssh's create_connection to build its channel
    with self.create_tcp_channel() and to keep asyncssh.logging.logger._debug_level."""
    async with connected(lab, tmp_path, GCM) as conn:
        chan, _ = await conn._conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", lab.echo_port)
        assert type(chan).__name__ == "_TCPChannel" and isinstance(chan, asyncssh.SSHTCPChannel)
        chan.close()
    assert isinstance(asyncssh.logging.logger._debug_level, int)


@pytest.mark.parametrize(("cipher", "encryption", "ours"), [(CHACHA, ChachaEncryption, FastChachaCipher),
                                                           (GCM, GCMEncryption, FastGCMCipher)])
async def test_ciphers_are_replaced_in_place(lab: LabInfo, tmp_path: Path, cipher: str, encryption: type,
                                             ours: type) -> None:
    """wire._lane_cipher needs ChachaEncryption to keep its ChachaCipher in ``_cipher``, which keeps
    its two keys in ``_key`` and ``_adkey``; and GCMEncryption its GCMCipher, which keeps its key in
    ``_key`` and its next nonce in ``_iv``: our cipher goes on from there, whenever it takes over."""
    async with connected(lab, tmp_path, cipher) as conn:
        data = os.urandom(256 * 1024)
        assert await stream_echo(await conn.open_tcp("127.0.0.1", lab.echo_port), data) == data
        fast = conn._conn
        for enc in (fast._send_encryption, fast._recv_encryption):
            assert type(enc) is encryption
            assert type(enc._cipher) is ours
            if ours is FastChachaCipher:  # and its small packets went through libsodium, where there is one
                assert enc._cipher.by_libsodium == (sodium.load() is not None)
        assert ("libsodium" in conn.describe()) == (ours is FastChachaCipher and sodium.load() is not None)
        header = _status_header({"pid": 1, "state": "ready", "transport": {"kind": "ssh", **conn.describe()}}, 0)
        assert f"\nssh cipher {cipher}" in header
        assert header.endswith("through libsodium)") == ("libsodium" in conn.describe()), header


@pytest.mark.parametrize("size", [0, 1, 60, 4096, 32768, 131072])
def test_fast_chacha_matches_asyncssh_byte_for_byte(size: int) -> None:
    key = os.urandom(64)
    theirs = ChachaCipher(key)
    ours = FastChachaCipher(theirs._key, theirs._adkey)
    for seq in (0, 1, 2**32 + 5, 2**64 - 1):
        nonce = seq.to_bytes(8, "big")
        header, data = os.urandom(4), os.urandom(size)
        sealed = ours.encrypt_and_sign(header, data, nonce)
        assert sealed == theirs.encrypt_and_sign(header, data, nonce)
        packet, tag = sealed
        assert ours.decrypt_header(packet[:4], nonce) == theirs.decrypt_header(packet[:4], nonce) == header
        assert ours.verify_and_decrypt(packet[:4], packet[4:], nonce, tag) == data
        bad = bytes([tag[0] ^ 1]) + tag[1:]
        assert ours.verify_and_decrypt(packet[:4], packet[4:], nonce, bad) is None
        assert theirs.verify_and_decrypt(packet[:4], packet[4:], nonce, bad) is None
        # The lanes' methods (tunneld/ssh/wire.py): the same bytes, from and to views of one buffer.
        wire = memoryview(b"".join(ours.seal(seq, header, data)))
        assert wire == packet + tag
        assert ours.length(seq, wire[:4]) == int.from_bytes(header, "big")
        assert ours.open(seq, wire[:4], wire[4:]) == data
        assert ours.open(seq, wire[:4], memoryview(packet[4:] + bad)) is None


@pytest.mark.parametrize("size", [0, 1, 60, 4096, 32768, 131072])
@pytest.mark.parametrize("invocation", [0, 2**64 - 2])
def test_fast_gcm_matches_asyncssh_byte_for_byte(size: int, invocation: int) -> None:
    """One AESGCM per key, the nonce counter kept as an int (and wrapping at 2**64 as asyncssh's), the
    packet sealed and opened whole: the same bytes as asyncssh's GCMCipher, packet after packet."""
    key, iv = os.urandom(16), os.urandom(4) + invocation.to_bytes(8, "big")
    theirs = GCMCipher("aes128-gcm", key, iv)
    ours, lane, reader = FastGCMCipher(key, iv), FastGCMCipher(key, iv), FastGCMCipher(key, iv)
    for seq in range(4):
        header, data = (4 + size).to_bytes(4, "big"), os.urandom(size)
        sealed = theirs.encrypt_and_sign(header, data)
        assert ours.encrypt_and_sign(header, data) == sealed
        wire = memoryview(b"".join(lane.seal(seq, header, data)))
        assert wire == b"".join(sealed)
        assert reader.length(seq, wire[:4]) == 4 + size
        bad = bytes(wire[4:-1]) + bytes([wire[-1] ^ 1])
        assert reader.open(seq, wire[:4], bad) is None  # a bad tag still uses up its nonce, as asyncssh's
        reader.rewind()  # the lane hands such a packet to asyncssh, which opens it again with the same nonce
        assert reader.open(seq, wire[:4], wire[4:]) == data
    assert theirs._iv == ours._fixed + ours._invocation.to_bytes(8, "big")


@pytest.mark.parametrize("cipher", [CHACHA, GCM])
async def test_the_send_lane_keeps_asyncssh_s_sequence_and_rekey_count(lab: LabInfo, tmp_path: Path,
                                                                      cipher: str) -> None:
    """Packets the lane seals advance asyncssh's send sequence number and rekey byte count, which its own
    packets (and its decision to rekey) go on from; sshd would disconnect on a wrong sequence number."""
    async with connected(lab, tmp_path, cipher) as conn:
        fast = conn._conn
        assert isinstance(fast, FastConnection)
        stream = await conn.open_tcp("127.0.0.1", lab.echo_port)
        seq, sent, counted = fast._send_seq, fast.lane_sent, fast._rekey_bytes_sent
        await stream.send(b"q" * 100_000)  # 4 packets of at most 32 KiB, sealed by the lane
        assert fast.lane_sent - sent == fast._send_seq - seq == 4
        assert fast._rekey_bytes_sent - counted > 100_000
        fast.send_packet(asyncssh.constants.MSG_GLOBAL_REQUEST, asyncssh.packet.String("nothing@kci"),
                         asyncssh.packet.Boolean(False))  # asyncssh's kind of packet, between the lane's
        assert await stream_echo(stream, b"r" * 100_000) == b"q" * 100_000 + b"r" * 100_000


@pytest.mark.parametrize("cipher", [CHACHA, GCM])
async def test_the_send_lane_seals_a_read_where_it_lies(lab: LabInfo, tmp_path: Path, cipher: str) -> None:
    """``send_read`` seals packets in the read buffer itself: each header is written over the bytes
    before it, each padding over the bytes after it, which are put back. A read of 100,000 bytes with
    70,000 of window is three packets (32 KiB, 32 KiB, 4,464 bytes); the 30,000 bytes left are intact
    in the buffer, and sshd, which checks every tag and sequence number, delivers all of it in order."""
    async with connected(lab, tmp_path, cipher) as conn:
        fast = conn._conn
        assert isinstance(fast, FastConnection)
        stream = await conn.open_tcp("127.0.0.1", lab.echo_port)
        chan = stream._chan
        data = os.urandom(100_000)
        fast.read_buffer[:len(data)] = data
        seq, sent = fast._send_seq, fast.lane_sent
        assert fast.send_read(chan._send_chan, len(data), 70_000, 32768) == 70_000
        chan._send_window -= 70_000
        assert fast.lane_sent - sent == fast._send_seq - seq == 3
        assert bytes(fast.read_buffer[70_000:len(data)]) == data[70_000:]  # the padding's bytes put back
        await stream.send(data[70_000:])
        assert await stream_echo(stream, b"") == data


@pytest.mark.parametrize("cipher", [CHACHA, GCM])
async def test_speed_ups_survive_a_rekey(lab: LabInfo, tmp_path: Path, cipher: str) -> None:
    """New keys mean new encryption objects: both directions are upgraded again, data keeps flowing."""
    async with connected(lab, tmp_path, cipher) as conn:
        fast = conn._conn
        assert isinstance(fast, FastConnection)
        before = fast._send_encryption
        stream = await conn.open_tcp("127.0.0.1", lab.echo_port)
        data = os.urandom(64 * 1024)
        limit = fast._rekey_bytes
        fast._rekey_bytes = 0  # this send starts a key exchange, as after rekey_bytes; the data waits for it
        await stream.send(data)
        fast._rekey_bytes = limit
        with anyio.fail_after(10):
            assert await stream_echo(stream, b"") == data
            assert await stream_echo(await conn.open_tcp("127.0.0.1", lab.echo_port), data) == data
        assert fast._send_encryption is not before
        kind = FastChachaCipher if cipher == CHACHA else FastGCMCipher
        assert type(fast._send_encryption._cipher) is kind
        assert type(fast._recv_encryption._cipher) is kind


async def test_the_state_the_lanes_and_our_channel_share_with_asyncssh(lab: LabInfo, tmp_path: Path) -> None:
    """The lanes (tunneld/ssh/wire.py) and our own channel (tunneld/ssh/channel.py) read and write
    asyncssh's connection and channel state by name. Each name is checked here on a live connection
    and channel, with the type it must have, so that a rename fails here rather than on the wire."""
    async with connected(lab, tmp_path, GCM) as conn:
        fast = conn._conn
        assert isinstance(fast, FastConnection)
        for name, kind in [("_send_seq", int), ("_recv_seq", int), ("_rekey_bytes_sent", int), ("_rekey_bytes", int),
                           ("_rekey_seconds", (int, float)), ("_rekey_time", (int, float)), ("_kex_complete", bool),
                           ("_auth_complete", bool), ("_send_enchdrlen", int), ("_send_blocksize", int),
                           ("_max_recv_pktlen", int), ("_inpbuf", bytes), ("_channels", dict),
                           ("_auth_final", bool)]:
            assert isinstance(getattr(fast, name), kind), name
        assert fast._compressor is None  # no compression negotiated: the lanes require that
        assert fast._recv_handler == fast._recv_pkthdr  # between packets, asyncssh waits for a header
        for method in ("add_channel", "remove_channel", "_update_recv_pktlen", "_reset_keepalive_timer",
                       "_send_disconnect", "_force_close", "internal_error"):
            assert callable(getattr(fast, method)), method
        chan, session = await fast.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", lab.echo_port)
        for name, kind in [("_send_window", int), ("_send_pktsize", int), ("_send_chan", int), ("_send_buf", list),
                           ("_send_state", str), ("_recv_window", int), ("_init_recv_window", int),
                           ("_recv_state", str), ("_recv_buf", list), ("_recv_paused", (bool, str))]:
            assert isinstance(getattr(chan, name), kind), name
        assert chan._encoding is None and chan._session is session
        assert (chan._send_state, chan._recv_state) == ("open", "open")
        assert fast._channels[chan._recv_chan] is chan
        # What asyncssh calls on whatever sits in its channel table (our channel implements each).
        for method in ("process_packet", "log_received_packet", "process_open_confirmation",
                       "process_open_failure", "process_connection_close", "close"):
            assert callable(getattr(chan, method)), method
        chan.close()
