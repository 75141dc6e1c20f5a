"""A direct-tcpip channel of our own, wired to the client's socket from the moment it is accepted.

asyncssh's channel is built for every kind of session: per channel it makes a logger, futures, a
coroutine chain for the open, a session object and a receive buffer, and per packet it runs a
dispatch table and state checks. For a forward's connection that was most of the daemon's CPU per
new connection (docs/ssh-transport.md, "Performance"). Here one object is both the client socket's
Protocol and the SSH channel, registered in asyncssh's channel table: asyncssh's connection still
owns the keys, the packet stream, rekeys, keepalives and the channel numbers, and hands us our packets.

- **Opened early**: CHANNEL_OPEN leaves as soon as the client is accepted, and the client's socket
  is wired at once. What the client sends before the server confirms is kept and leaves with the
  confirmation, from the callback that receives it: no task wakes up between them.
- **Bytes**: the client's are read (this is a BufferedProtocol) into the SSH connection's read buffer
  and sealed there as data packets by the send lane (tunneld/ssh/wire.py, ``send_read``), no more than
  the server's window takes: while it is shut, reads pause and the rest waits in the socket. What
  cannot go at once (before the confirmation, during a key exchange) is copied to ``pending``, and
  reads pause past SEND_HIGH_WATER. The server's bytes come in from the receive lane (or asyncssh's
  parser) and go to ``transport.write``.
- **Flow control**: our window goes back to the server only while the client socket takes what we
  write (its ``pause_writing`` holds the window updates back), as ``ssh -L`` does.
- **Half-close**: EOF either way is passed on; CLOSE is sent once both directions are done.
- **A refusal** (CHANNEL_OPEN_FAILURE) gives the client a clean EOF, as a refused connect does, and
  ``wait`` raises TransportError for the forward to count and log.

The stream path (asyncssh's own channel, tunneld/ssh/client.py) stays for everything else: probes,
library users, unix sockets, exec channels, and any connection asyncssh did not build as we expect.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
from asyncssh import ProtocolError
from asyncssh.constants import (
    MSG_CHANNEL_CLOSE,
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_EOF,
    MSG_CHANNEL_EXTENDED_DATA,
    MSG_CHANNEL_FAILURE,
    MSG_CHANNEL_OPEN,
    MSG_CHANNEL_OPEN_CONFIRMATION,
    MSG_CHANNEL_REQUEST,
    MSG_CHANNEL_SUCCESS,
    MSG_CHANNEL_WINDOW_ADJUST,
    OPEN_ADMINISTRATIVELY_PROHIBITED,
)
from asyncssh.packet import SSHPacket, String, UInt32

from tunneld.config import format_host
from tunneld.engine.relay.common import Traffic, WiredClient
from tunneld.errors import TransportError
from tunneld.ssh.client import ChannelStream, SshConnection
from tunneld.ssh.wire import READ_SIZE, FastConnection

CHANNEL_WINDOW = 8 * 1024 * 1024  # what the server may send before we acknowledge (as client.py's)
CHANNEL_MAX_PKTSIZE = 128 * 1024
SEND_HIGH_WATER = 1024 * 1024  # the client's bytes waiting for the server's window: reads pause above
SEND_LOW_WATER = 256 * 1024
_PROHIBITED = (" (the server forbids forwarding: AllowTcpForwarding in sshd_config)")


class WiredChannel(WiredClient, asyncio.BufferedProtocol):
    """The client's socket (this Protocol) and a direct-tcpip channel to ``host:port`` (this channel)."""

    def __init__(self, conn: FastConnection, host: str, port: int, traffic: Traffic, what: str,
                 open_timeout: float) -> None:
        super().__init__()
        self.conn = conn
        self.open_timeout = open_timeout  # how long the server may take to confirm (timeouts.connect)
        self.open_timer: asyncio.TimerHandle | None = None
        self.host = host
        self.port = port
        self.traffic = traffic
        self.what = what  # "could not connect to {what}: ..."
        self.recv_chan = -1  # our number for the channel
        self.send_chan: int | None = None  # the server's, once it confirmed the open
        self.send_window = 0
        self.send_pktsize = 0
        self.recv_window = CHANNEL_WINDOW
        self.pending: deque[memoryview] = deque()  # the client's bytes waiting for the open or the window
        self.pending_size = 0
        self.reads_paused = False  # the client socket's reads, paused while the window is shut or too much is pending
        self.client_eof = False  # the client shut down its sending side
        self.eof_sent = False
        self.far_eof = False  # the server's EOF (or CLOSE) was passed on to the client
        self.client_paused = False  # the client socket's write buffer is full: no window updates
        self.close_sent = False
        self.close_received = False
        self.refusal: str | None = None

    # ------------------------------------------------------------ opening

    def open(self) -> None:
        """Take a channel number and send CHANNEL_OPEN (the confirmation arrives by callback).

        :raises OSError: when the connection is closed (asyncssh's ChannelOpenError is one).
        """
        conn = self.conn
        self.recv_chan = conn.add_channel(self)  # type: ignore[arg-type]  # duck-typed: see process_packet
        conn._update_recv_pktlen(CHANNEL_MAX_PKTSIZE)
        conn.send_packet(MSG_CHANNEL_OPEN, String(b"direct-tcpip"), UInt32(self.recv_chan),
                         UInt32(CHANNEL_WINDOW), UInt32(CHANNEL_MAX_PKTSIZE), String(self.host),
                         UInt32(self.port), String(""), UInt32(0))
        self.open_timer = asyncio.get_running_loop().call_later(self.open_timeout, self._no_answer)

    def _no_answer(self) -> None:
        self.open_timer = None
        if self.send_chan is None and not self.finished and self.refusal is None:
            # The number stays taken: a late confirmation gets our CLOSE, a late failure frees it.
            self._refused(f"no answer within {self.open_timeout:g}s")

    def _answered(self) -> None:
        if self.open_timer is not None:
            self.open_timer.cancel()
            self.open_timer = None

    # ------------------------------------------------------------ what asyncssh calls on a channel

    def process_open_confirmation(self, send_chan: int, send_window: int, send_pktsize: int,
                                  packet: SSHPacket | None) -> None:
        if self.send_chan is not None:
            raise ProtocolError("Channel already open")  # asyncssh disconnects with it
        self._answered()
        self.send_chan, self.send_window, self.send_pktsize = send_chan, send_window, send_pktsize
        if self.finished or self.refusal is not None:  # the client went meanwhile, or we gave up waiting
            self._send_close()
            return
        self._push()

    def process_open_failure(self, code: int, reason: str, lang: str) -> None:
        self._answered()
        self._forget()
        if self.refusal is None:
            self._refused(reason + (_PROHIBITED if code == OPEN_ADMINISTRATIVELY_PROHIBITED else ""))

    def process_connection_close(self, exc: Exception | None) -> None:
        self._answered()
        self._forget()
        self.close_received = True
        self.fail(anyio.BrokenResourceError(f"{self.what}: {exc or 'the SSH connection closed'}"), by_client=False)

    def close(self) -> None:
        """asyncssh's ``disconnect()`` closes every channel: the relay ends as if the server had gone."""
        self.fail(anyio.BrokenResourceError(f"{self.what}: the SSH connection is closing"), by_client=False)

    def log_received_packet(self, pkttype: int, pktid: int | None, packet: Any, note: str = "") -> None:
        return None  # asyncssh logs packets only at its debug level 3; ours carry client data anyway

    def process_packet(self, pkttype: int, pktid: int, packet: SSHPacket) -> bool:
        """One packet for this channel that the receive lane did not take; False: unknown to us (asyncssh
        answers it with UNIMPLEMENTED)."""
        if pkttype == MSG_CHANNEL_DATA:
            data = packet.get_string()
            packet.check_end()
            if len(data) > self.recv_window:
                raise ProtocolError("Window exceeded")  # asyncssh disconnects with it
            self.far_data(data)
        elif pkttype == MSG_CHANNEL_WINDOW_ADJUST:
            self.send_window += packet.get_uint32()
            packet.check_end()
            self._push()
        elif pkttype == MSG_CHANNEL_EOF:
            packet.check_end()
            self._far_end()
        elif pkttype == MSG_CHANNEL_CLOSE:
            packet.check_end()
            self._closed_by_server()
        elif pkttype == MSG_CHANNEL_EXTENDED_DATA:  # not sent on direct-tcpip; counted, dropped
            packet.get_uint32()
            self.recv_window -= len(packet.get_string())
            packet.check_end()
            self._grant()
        elif pkttype == MSG_CHANNEL_REQUEST:
            packet.get_string()
            if packet.get_boolean():
                self._send(MSG_CHANNEL_FAILURE)
        elif pkttype not in (MSG_CHANNEL_SUCCESS, MSG_CHANNEL_FAILURE):
            return False
        return True

    def take_packet(self, kind: int, body: bytes, end: int) -> bool:
        """A packet for this channel from the receive lane (tunneld/ssh/wire.py), opened: ``body[1]`` is its
        type, ``body[2:6]`` our number, its fields run to ``end``. False: asyncssh must parse it (anything
        unusual: a field out of place, more than our window), and says what is wrong."""
        if kind == MSG_CHANNEL_DATA:
            size = int.from_bytes(body[6:10], "big")
            if 10 + size != end or size > self.recv_window:
                return False
            if size:
                self.far_data(memoryview(body)[10:end])
        elif kind == MSG_CHANNEL_WINDOW_ADJUST and end == 10:
            self.send_window += int.from_bytes(body[6:10], "big")
            self._push()
        elif kind == MSG_CHANNEL_EOF and end == 6:
            self._far_end()
        elif kind == MSG_CHANNEL_CLOSE and end == 6:
            self._closed_by_server()
        elif kind == MSG_CHANNEL_OPEN_CONFIRMATION and end == 18 and self.send_chan is None \
                and int.from_bytes(body[14:18], "big"):
            self.process_open_confirmation(int.from_bytes(body[6:10], "big"), int.from_bytes(body[10:14], "big"),
                                           int.from_bytes(body[14:18], "big"), None)
        else:
            return False
        return True

    def _closed_by_server(self) -> None:
        self.close_received = True
        self._far_end()
        self._send_close()
        self._mind_reads()

    # ------------------------------------------------------------ the server's side

    def far_data(self, data: bytes | memoryview) -> None:
        size = len(data)
        self.recv_window -= size
        self.traffic.down += size
        if self.transport is not None and not self.finished:
            self.transport.write(data)
        self._grant()

    def _grant(self) -> None:
        """Our window back to full once it is half used, while the client keeps up (as asyncssh's)."""
        if self.recv_window < CHANNEL_WINDOW // 2 and not self.client_paused and not self.close_sent \
                and not self.close_received:
            self._send(MSG_CHANNEL_WINDOW_ADJUST, UInt32(CHANNEL_WINDOW - self.recv_window))
            self.recv_window = CHANNEL_WINDOW

    def _far_end(self) -> None:
        if self.far_eof:
            return
        self.far_eof = True
        self.write_eof_to_client()
        self._finish_if_done()

    # ------------------------------------------------------------ the client's socket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # The server's answer comes from a poll after our CHANNEL_OPEN left, so it should find the socket
        # wired; should it not, what it decided is applied to the socket now.
        if self.error is not None:
            self.fail(self.error, by_client=self.by_client)  # resets the socket
        elif self.refusal is not None:
            self._refused(self.refusal)

    def get_buffer(self, sizehint: int) -> memoryview:
        # The client's bytes are read into the connection's read buffer, where the send lane seals them
        # in place (FastConnection.send_read), and no more than the server's window takes: the rest waits
        # in the socket, as ``ssh -L`` leaves it (reads pause while the window is shut). What cannot go
        # at once (before the confirmation, during a key exchange) is copied out to ``pending``.
        window = self.send_window
        if 0 < window < READ_SIZE and not self.pending:
            return self.conn.read_buffer[:window]
        return self.conn.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.traffic.up += nbytes
        if self.finished or self.refusal is not None:
            return  # a refused client's bytes go nowhere; a finished relay takes none
        if self.close_received:  # the server closed without reading on: these bytes cannot arrive
            self.fail(anyio.BrokenResourceError(f"{self.what}: channel closed"), by_client=False)
            return
        sent = 0
        if not self.pending and self.send_chan is not None:
            sent = self.conn.send_read(self.send_chan, nbytes, self.send_window, self.send_pktsize)
            self.send_window -= sent
            if sent == nbytes:
                if not self.send_window:
                    self._mind_reads()
                return
        self.pending.append(memoryview(bytes(self.conn.read_buffer[sent:nbytes])))
        self.pending_size += nbytes - sent
        self._push()
        self._mind_reads()

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.refusal is not None:
            self.close_client()
        else:
            self._push()
            self._finish_if_done()
        return True  # keep our sending side open: half-close

    def pause_writing(self) -> None:
        self.client_paused = True

    def resume_writing(self) -> None:
        self.client_paused = False
        self._grant()

    # ------------------------------------------------------------ both

    def _push(self) -> None:
        """Send what is pending, as far as the server's window allows; then our EOF, once all went."""
        send_chan = self.send_chan
        if send_chan is None or self.close_sent or self.close_received:
            return
        pending = self.pending
        with self.conn.corked():
            while pending and self.send_window:
                piece = pending[0]
                take = min(len(piece), self.send_window, self.send_pktsize)
                sent = self.conn.send_data(send_chan, piece[:take], take, take)
                if not sent:  # the lane is closed (keys are being exchanged): asyncssh queues the packet
                    self._send(MSG_CHANNEL_DATA, String(bytes(piece[:take])))
                    sent = take
                self.send_window -= sent
                self.pending_size -= sent
                if sent == len(piece):
                    pending.popleft()
                else:
                    pending[0] = piece[sent:]
            if not pending and self.client_eof and not self.eof_sent:
                self.eof_sent = True
                self._send(MSG_CHANNEL_EOF)
        self._mind_reads()
        self._finish_if_done()

    def _mind_reads(self) -> None:
        """Pause the client's reads while the server's window is shut, or more than SEND_HIGH_WATER waits
        for it (before the confirmation, during a key exchange)."""
        if self.transport is None or self.refusal is not None:
            return
        if self.close_received:  # nothing more can be sent: read on, to see the client's EOF (or bytes: lost)
            hold = False
        else:
            shut = self.send_chan is not None and not self.send_window
            hold = shut or self.pending_size > (SEND_LOW_WATER if self.reads_paused else SEND_HIGH_WATER)
        if hold and not self.reads_paused:
            self.reads_paused = True
            self.transport.pause_reading()
        elif not hold and self.reads_paused and not self.finished:
            self.reads_paused = False
            self.transport.resume_reading()

    def _finish_if_done(self) -> None:
        if self.eof_sent and self.far_eof and not self.finished:
            self._send_close()
            self.close_client()
        elif self.far_eof and self.close_received and self.client_eof:
            self.close_client()  # closed by the server with our bytes unsent: as a clean end for the client

    def drop_far(self) -> None:
        self._answered()
        self.pending.clear()
        self.pending_size = 0
        if self.send_chan is not None:
            self._send_close()  # not yet confirmed: the confirmation sends it

    def _send(self, pkttype: int, *args: bytes) -> None:
        self.conn.send_packet(pkttype, UInt32(self.send_chan or 0), *args)

    def _send_close(self) -> None:
        if not self.close_sent and self.send_chan is not None:
            self.close_sent = True
            self._send(MSG_CHANNEL_CLOSE)
        if self.close_sent and self.close_received:
            self._forget()

    def _forget(self) -> None:
        """Give the channel number back (once: both CLOSEs went, the open failed or the connection is gone)."""
        if self.recv_chan >= 0 and self.conn._channels.get(self.recv_chan) is self:  # type: ignore[comparison-overlap]
            self.conn.remove_channel(self.recv_chan)
        self.recv_chan = -1

    def _refused(self, reason: str) -> None:
        """The server could not connect: a clean EOF for the client, as a failed connect gives it."""
        self.refusal = reason
        self.pending.clear()
        self.pending_size = 0
        if self.reads_paused and self.transport is not None and not self.finished:
            self.reads_paused = False
            self.transport.resume_reading()  # what it sends now is read and dropped
        self.refuse_client(self.client_eof)

    async def wait(self) -> None:
        """Relay until both directions are done (or one failed).

        :raises RelayBroken: when either side failed; both are closed by then.
        :raises TransportError: when the server could not connect (the client got a clean EOF).
        """
        await super().wait()
        if self.refusal is not None:
            raise TransportError(f"could not connect to {self.what}: {self.refusal}")


class EarlyTcp(anyio.abc.ByteStream):
    """What ``SshTransport.connect(early=True)`` returns: a connection to ``host:port`` not opened yet.

    Relayed to a client's socket (``relay_socket``, the forward's path), it opens a WiredChannel then and
    there. Used as a byte stream instead (``KCI_TUNNELD_RELAY=streams``), it opens asyncssh's channel on
    first use, as ``connect()`` without ``early`` does.
    """

    def __init__(self, conn: SshConnection, host: str, port: int, opened: Callable[[], None]) -> None:
        self._conn = conn
        self._host = host
        self._port = port
        self._opened = opened  # counts a channel opened (the transport's ``channels_opened``)
        self._stream: ChannelStream | None = None
        self._opening = anyio.Lock()  # the relay's two pump tasks both ask for the stream at once
        fast = conn.fast
        self._fast = fast
        self.relay_socket = self._relay_socket if fast is not None else None

    async def _relay_socket(self, client: socket.socket, traffic: Traffic) -> None:
        """Open the channel and relay between it and ``client`` with callbacks only.

        :raises RelayBroken: when either side failed; both are closed by then.
        :raises TransportError: when the server could not connect to the target (the client got a clean
            EOF), or the SSH connection closed just now.
        """
        assert self._fast is not None
        what = f"{format_host(self._host)}:{self._port} via ssh {self._conn.target}"
        chan = WiredChannel(self._fast, self._host, self._port, traffic, what, self._conn.open_timeout)
        try:
            chan.open()
        except OSError as e:
            with contextlib.suppress(OSError):
                client.close()
            raise TransportError(f"could not connect to {what}: the SSH connection is gone ({e})") from None
        self._opened()
        await chan.wire(client)
        await chan.wait()

    async def _open(self) -> ChannelStream:
        async with self._opening:
            if self._stream is None:
                self._stream = await self._conn.open_tcp(self._host, self._port)
                self._opened()
            return self._stream

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await (await self._open()).receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await (await self._open()).send(item)

    async def send_eof(self) -> None:
        await (await self._open()).send_eof()

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()


__all__ = ["CHANNEL_MAX_PKTSIZE", "CHANNEL_WINDOW", "EarlyTcp", "WiredChannel"]
