"""A generation: one transport and the forwards it carries, and the hand-over of listening
sockets from one generation (or forward) to the next, which makes a reload a transaction."""

from __future__ import annotations

import socket
from collections.abc import Callable

import anyio
import anyio.abc

from tunneld.config import Config, ForwardSpec
from tunneld.engine.forward import Forward
from tunneld.engine.listener import bind_listeners
from tunneld.transports import Transport


class Generation:
    """One transport and the forwards it carries."""

    def __init__(self, config: Config, transport: Transport, tg: anyio.abc.TaskGroup,
                 on_change: Callable[[Forward], None]) -> None:
        self.config = config
        self.transport = transport
        self.forwards: dict[str, Forward] = {}
        self._tg = tg
        self._on_change = on_change
        self.stop_requested = anyio.Event()
        self.finished = anyio.Event()
        self.cleanup = False
        self.errors: list[str] = []

    async def add(self, spec: ForwardSpec, *, retry_bind: float | None = None,
                  listeners: list[socket.socket] | None = None) -> Forward:
        """Bind (or adopt ``listeners``) and start one forward (with ``retry_bind``, a port in use
        makes it ``failed``, retried).

        :raises BindError: when its listener cannot be bound and ``retry_bind`` is None.
        """
        forward = Forward(spec, self.transport, self.config.timeouts, on_change=self._on_change,
                          retry_bind=retry_bind, listeners=listeners)
        await self._tg.start(forward.run)
        self.forwards[spec.name] = forward
        return forward

    def remove(self, name: str, grace: float) -> None:
        self.forwards.pop(name).stop(grace)

    def stop(self, grace: float, *, cleanup: bool = False, now: bool = False) -> None:
        """Stop every forward, their connections draining for ``grace`` seconds (``now``: ended at
        once, a drain already under way too)."""
        self.cleanup = self.cleanup or cleanup
        for f in self.forwards.values():
            f.stop(0 if now else grace)
        self.stop_requested.set()
        if now:
            self._tg.cancel_scope.cancel()  # cuts a running drain short; each forward still closes its sockets


def prebind(desired: list[tuple[ForwardSpec, float | None]], gen: Generation) -> dict[str, list[socket.socket]]:
    """Listening sockets for the forwards about to start: a running forward's own (duplicated, so the
    port never closes) where one listens on the same address (the same name and bind/port setting,
    or any forward bound to that port: a renamed forward keeps its port), else newly bound.
    Forwards that retry binding (``--auto``'s) bind for themselves when nothing is handed over.

    :raises BindError: when a static forward's address cannot be bound (what was bound is closed).
    """
    def listening(f: Forward) -> bool:
        return bool(f.sockets) and all(s.fileno() != -1 for s in f.sockets)

    by_address = {(f.spec.bind, f.port): f for f in gen.forwards.values() if listening(f)}
    handed: dict[str, list[socket.socket]] = {}
    try:
        for spec, retry in desired:
            running = gen.forwards.get(spec.name)
            if running is None or (running.spec.bind, running.spec.port) != (spec.bind, spec.port):
                running = by_address.get((spec.bind, spec.port)) if spec.port else None
            if running is not None and listening(running):
                handed[spec.name] = [s.dup() for s in running.sockets]
            elif retry is None:
                handed[spec.name] = bind_listeners(spec.bind, spec.port)
    except BaseException:
        close_unadopted(handed)
        raise
    return handed


def close_unadopted(handed: dict[str, list[socket.socket]]) -> None:
    """Close the listeners no forward took (a failed reload, or forwards not started after all)."""
    for sockets in handed.values():
        for s in sockets:
            s.close()
    handed.clear()
