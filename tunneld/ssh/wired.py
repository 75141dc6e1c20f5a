"""The SSH path of the relay: one channel wired straight to the client's socket, no tasks.

The generic relay (tunneld/engine/relay/generic.py) runs two pump tasks over byte streams: per chunk
a future is woken, a task resumes, and ``sock_recv`` registers and unregisters the socket with the
loop (two ``epoll_ctl`` calls). For a 64-byte round trip through an SSH channel that was most of the
daemon's own CPU (docs/performance.md, "## SSH"). Here the client socket is an asyncio Protocol and
the channel's session callbacks feed it directly, as asyncssh's own forwarder does:

- bytes: client ``data_received`` -> ``write(chan, data)`` (tunneld/ssh/wire.py's send lane: one
  system call per chunk); channel data -> ``transport.write`` on the client socket, no intermediate buffer;
- backpressure, crosswise: the client socket's ``pause_writing`` pauses reads on the channel (and
  so its window updates); the channel's ``pause_writing`` (send buffer over its high-water mark)
  pauses reads on the client socket;
- half-close: EOF either way is passed on; both stay open until both directions saw EOF;
- errors: a failed side makes the other fail too (the client socket is reset, the channel closed);
  ``RelayBroken.by_client`` says whose side failed; cancellation does the same.

What the channel received before the relay started (early bytes, an EOF) is handed over first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import anyio

from tunneld.engine.relay.common import Traffic, WiredClient


class Wired(WiredClient, asyncio.Protocol):
    """The client's socket (this Protocol) and one SSH channel (``chan``), each writing to the other."""

    def __init__(self, chan: Any, write: Callable[[Any, bytes], None], traffic: Traffic, what: str) -> None:
        super().__init__()
        self.chan = chan
        self.write = write  # chan.write, as tunneld/ssh/wire.py sends it
        self.traffic = traffic
        self.what = what
        self.client_eof = False  # the client shut down its sending side (or the socket closed)
        self.chan_eof = False  # the far side's EOF (or the channel closed) was passed to the client
        self.chan_gone = False  # the channel closed: nothing more can be sent on it
        self.client_paused = False  # the client socket's write buffer is full: channel reads paused

    def drop_far(self) -> None:
        self.chan.close()

    # ------------------------------------------------------------ the client's socket

    def data_received(self, data: bytes) -> None:
        self.traffic.up += len(data)
        if self.chan_gone:  # the far side closed without reading on: these bytes cannot arrive
            self.fail(anyio.BrokenResourceError(f"{self.what}: channel closed"), by_client=False)
            return
        try:
            self.write(self.chan, data)
        except OSError as e:
            self.fail(e, by_client=False)

    def eof_received(self) -> bool:
        self.client_eof = True
        if not self.chan_gone:
            with contextlib.suppress(OSError):
                self.chan.write_eof()  # queued behind unsent data: the peer sees every byte, then EOF
        self.finish_if_done()
        return True  # keep our sending side open: half-close

    def pause_writing(self) -> None:
        self.client_paused = True
        self.chan.pause_reading()  # no window updates either: the far side slows down

    def resume_writing(self) -> None:
        self.client_paused = False
        self.chan.resume_reading()

    # ------------------------------------------------------------ the channel (called by its session)

    def channel_data(self, data: bytes | memoryview) -> None:
        self.traffic.down += len(data)
        if self.transport is not None and not self.finished:
            self.transport.write(data)

    def channel_eof(self) -> None:
        if self.chan_eof:
            return
        self.chan_eof = True
        self.write_eof_to_client()
        self.finish_if_done()

    def channel_pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def channel_resume_writing(self) -> None:
        if self.transport is not None and not self.finished:
            self.transport.resume_reading()

    def channel_lost(self, exc: Exception | None) -> None:
        self.chan_gone = True
        if exc is not None:
            self.fail(anyio.BrokenResourceError(f"{self.what}: {exc}"), by_client=False)
        else:
            self.channel_eof()  # closed by the far side: an end, like EOF, for the client

    # ------------------------------------------------------------ both

    def finish_if_done(self) -> None:
        if self.client_eof and self.chan_eof and not self.finished:
            self.finished = True
            self.chan.close()  # flushes what is queued (and our EOF), then CLOSE
            if self.transport is not None:
                self.transport.close()  # flushes, then connection_lost(None) sets done


__all__ = ["Wired"]
