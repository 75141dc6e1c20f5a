"""The mux path of the relay: one connection of a mux channel wired straight to the client's socket.

The generic relay (tunneld/engine/relay/generic.py) runs two pump tasks over byte streams; on a mux
stream every chunk then wakes a task each way, and each read of the client socket registers and
unregisters it with the loop. Here, as on the SSH path (tunneld/ssh/wired.py), the client socket is
an asyncio Protocol and the channel's frames reach it as calls (``MuxStream.sink``):

- bytes: the client's ``data_received`` -> ``D`` frames, as far as the stream's credit goes; the
  relay's ``D`` frames -> ``transport.write`` on the client socket;
- backpressure: out of credit, or the exec's own buffer over its high-water mark, the client
  socket's reads pause until a ``W`` frame or the drain; the client socket's ``pause_writing``
  holds back our grants, so the relay stops reading the target once the window is spent;
- half-close: EOF either way is passed on; the socket stays open until both directions are done;
- errors: a reset client resets the target (``K``); a broken far side resets the client; a
  cancelled relay does both.

A stream may be wired before the relay answered for it (``DockerTransport.connect(early=True)``):
the client's bytes ride behind the open, so a new connection costs one round trip through Docker,
not two. Until the relay answers, what was sent is kept: if the exec dies first, the connection is
opened again on another exec with those bytes (as ``connect`` retries); if the relay says the target
refused, the client gets a clean EOF, as a refused connect gives it, and ``wait`` raises
TransportError for the forward to count and log.
"""

from __future__ import annotations

import asyncio
from collections import deque

import anyio

from tunneld.docker.mux import GRANT_AT, MAX_FRAME, MuxStream
from tunneld.engine.relay.common import Traffic, WiredClient
from tunneld.errors import TransportError

RETRIES = 2  # opens again after the exec died before the relay answered (connect tries 3 in all)


class WiredMux(WiredClient, asyncio.Protocol):
    """The client's socket (this Protocol) and one mux stream, each writing to the other."""

    def __init__(self, stream: MuxStream, traffic: Traffic) -> None:
        super().__init__()
        self.stream = stream
        self.traffic = traffic
        self.pending: deque[memoryview] = deque()  # the client's bytes waiting for credit
        # What the client sent before the relay answered, to open the connection again with elsewhere.
        self.unanswered: list[memoryview] | None = None if stream.seen else [memoryview(stream.first)]
        self.retries = RETRIES
        self.client_eof = False  # the client shut down its sending side
        self.far_done = False  # the far side's EOF was passed on to the client
        self.client_paused = False  # the client socket's buffer is full: no grants
        self.owed = 0  # bytes written to the client and not yet granted back to the relay
        self.hold = 0  # reasons to keep the client's reads paused: bit 1 credit, 2 drain, 4 reopening
        self.refusal: str | None = None

    def drop_far(self) -> None:
        self.stream.abort_now()

    # ------------------------------------------------------------ the client's socket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._attach(self.stream)

    def data_received(self, data: bytes) -> None:
        self.traffic.up += len(data)
        if self.finished or self.refusal is not None:
            return  # a refused client's bytes go nowhere; a finished relay takes none
        stream = self.stream
        if not self.pending and not self.hold and self.unanswered is None and len(data) <= stream.up_credit \
                and len(data) <= MAX_FRAME and stream.broken is None:
            stream.send_now(data)  # the common case, in one frame: no queue
            self._mind_the_exec()
            return
        self.pending.append(memoryview(data))
        self._push()

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.refusal is not None:
            self.close_client()
            return True
        self._push()
        return True  # keep our sending side open: half-close

    def pause_writing(self) -> None:
        self.client_paused = True

    def resume_writing(self) -> None:
        self.client_paused = False
        self._grant_owed(0)

    # ------------------------------------------------------------ the stream (its MuxSink)

    def far_data(self, data: bytes | memoryview) -> None:
        self.traffic.down += len(data)
        if self.transport is not None and not self.finished:
            self.transport.write(data)
        self._grant_owed(len(data))

    def far_credit(self) -> None:
        self._push()

    def far_connected(self) -> None:
        self.unanswered = None  # answered: no retry elsewhere from now on

    def far_eof(self) -> None:
        if self.far_done:
            return
        self.far_done = True
        self.write_eof_to_client()
        self._finish_if_done()

    def far_failed(self, reason: str) -> None:
        stream = self.stream
        if not stream.seen and self.unanswered is not None and self.retries > 0 and not self.finished:
            self.retries -= 1
            self._hold(4, True)
            stream.channel.owner.spawn(self._reopen)
        elif stream.failure is not None and not stream.ok:
            self._refused(stream.failure)
        else:
            self.fail(anyio.BrokenResourceError(reason), by_client=False)

    # ------------------------------------------------------------ both

    def _attach(self, stream: MuxStream) -> None:
        """Take the stream's events from now on, after what it queued before."""
        self.stream = stream
        stream.sink = self
        queued, end = stream.take_queued()
        for data in queued:
            self.far_data(data)
        if stream.ok:
            self.far_connected()
        if isinstance(end, anyio.EndOfStream):
            self.far_eof()
        elif end is not None:
            self.far_failed(stream.broken or str(end))

    def _push(self) -> None:
        """Send the client's bytes as far as the credit goes, then its EOF; pause reads otherwise."""
        stream = self.stream
        if self.hold & 4 or stream.broken is not None:
            return
        while self.pending:
            view = self.pending[0]
            sent = stream.send_now(view)
            if sent == 0:
                break
            if self.unanswered is not None:
                self.unanswered.append(view[:sent])  # no copy: a view of the bytes the client gave
            if sent == len(view):
                self.pending.popleft()
            else:
                self.pending[0] = view[sent:]
        self._hold(1, bool(self.pending))
        if self.client_eof and not self.pending:
            stream.eof_now()
            self._finish_if_done()
        self._mind_the_exec()

    def _mind_the_exec(self) -> None:
        """Pause the client's reads while the exec has more than its high-water mark to take."""
        if not self.hold & 2 and self.stream.channel.over_high_water():
            self._hold(2, True)
            self.stream.channel.when_drained(lambda: self._hold(2, False))

    def _hold(self, reason: int, on: bool) -> None:
        before = self.hold
        self.hold = before | reason if on else before & ~reason
        if self.transport is None or self.finished or bool(before) == bool(self.hold):
            return
        if self.hold:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _grant_owed(self, size: int) -> None:
        # Granted once a quarter of the window went to the client, and only while the client socket
        # takes more: a client that stops reading stops its own connection at the relay, and no other.
        self.owed += size
        if self.owed >= GRANT_AT and not self.client_paused:
            self.stream.grant(self.owed)
            self.owed = 0

    async def _reopen(self) -> None:
        """Open the connection again on a live exec, with what the client sent so far."""
        old = self.stream
        first = b"".join(self.unanswered or ())
        try:
            with anyio.fail_after(old.channel.owner.timeouts.connect):
                stream = await old.channel.owner.reopen(old.host, old.port, first)
        except (TransportError, TimeoutError) as e:
            self.fail(anyio.BrokenResourceError(f"{old.target}: {old.broken}; then {e}"), by_client=False)
            return
        if self.finished:
            stream.abort_now()
            return
        self.unanswered = [memoryview(stream.first)]
        self._attach(stream)
        self._hold(4, False)
        self._push()

    def _refused(self, reason: str) -> None:
        """The far side refused: a clean EOF for the client, as a failed connect gives it."""
        self.refusal = reason
        self.pending.clear()
        self._hold(1, False)
        self.refuse_client(self.client_eof)

    def _finish_if_done(self) -> None:
        if self.client_eof and self.far_done and not self.pending and not self.finished:
            self.close_client()

    async def wait(self) -> None:
        """Relay until both directions are done (or one failed).

        :raises RelayBroken: when either side failed; both are closed by then.
        :raises TransportError: when the far side refused the connection (the client got a clean EOF).
        """
        await super().wait()
        if self.refusal is not None:
            owner = self.stream.channel.owner
            raise TransportError(f"could not connect to {self.stream.target} from {owner.helper_label}: {self.refusal}")
