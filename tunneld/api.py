"""The library API: run forwards inside another async app, as async context managers.

    async with tunneld.open_forward("127.0.0.1:0:127.0.0.1:5000", via="docker") as fwd:
        await fwd.wait_ready(30)
        registry = fwd.address          # "127.0.0.1:41234"

The context owns everything it starts (one transport, one task group of forwards) and returns
only when all of it has stopped: leaving the block normally stops accepting, lets open
connections finish for ``grace`` seconds, then closes them; leaving it with an exception or
by cancellation closes them at once. Enter and exit in the same task (anyio's rule for task
groups); the context may itself run in any task of the caller's task group.

One module, though over 300 lines: it is the whole public surface for embedding apps (the two
openers, the two handles and the config builder they share), and each piece only translates between
the caller's world and the engine's; split, a reader would have to put the contract back together.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio
import anyio.abc

from tunneld.config import (
    AutoSettings,
    Config,
    ForwardSpec,
    Timeouts,
    TransportSpec,
    format_host,
    load_config,
    merge_cli,
    parse_forward_arg,
)
from tunneld.daemon.generation import Generation
from tunneld.engine.forward import Forward, ForwardState, ForwardStats
from tunneld.engine.probe import ProbeResult
from tunneld.errors import ConfigError, NotReadyError
from tunneld.transports import Transport, create_transport

# States after which a forward never becomes ready again. (``failed`` is not one: a port that
# could not be bound or a transport that gave up may come back, so waiting goes on until the deadline.)
_FINAL = frozenset({ForwardState.STOPPING, ForwardState.STOPPED})


class ForwardHandle:
    """A running forward as the embedding app sees it: where it listens, and its state."""

    def __init__(self, forward: Forward, ready_timeout: float) -> None:
        self._forward = forward
        self._ready_timeout = ready_timeout
        # Our own change event, set from the forward's on_change callback and swapped on each
        # change: a watcher takes the event BEFORE reading the state, so a change made between
        # the two (stopping -> stopped) cannot be missed.
        self._changed = anyio.Event()
        # Read while the listeners are open (the handle is made right after binding).
        sockets = forward.sockets
        self._host = str(sockets[0].getsockname()[0]) if sockets else forward.spec.bind

    def __repr__(self) -> str:
        return f"<ForwardHandle {self.name} {self.address} -> {self.target} {self.state}>"

    @property
    def name(self) -> str:
        return self._forward.spec.name

    @property
    def spec(self) -> ForwardSpec:
        return self._forward.spec

    @property
    def target(self) -> str:
        """host:port as the far side sees it."""
        return self._forward.spec.target

    @property
    def host(self) -> str:
        """The address clients should dial: the first bound one (127.0.0.1 for ``localhost``)."""
        return self._host

    @property
    def port(self) -> int:
        """The bound port (the one the kernel picked when the spec said 0)."""
        return self._forward.port

    @property
    def address(self) -> str:
        """``host:port`` to dial, IPv6 in brackets, e.g. ``127.0.0.1:41234``."""
        return f"{format_host(self.host)}:{self.port}"

    @property
    def addresses(self) -> list[str]:
        """Every bound ``host:port`` (``localhost`` binds both 127.0.0.1 and ::1)."""
        return self._forward.addresses

    @property
    def state(self) -> ForwardState:
        return self._forward.state

    @property
    def ready(self) -> bool:
        return self._forward.state == ForwardState.READY

    @property
    def last_error(self) -> str | None:
        """Why the last probe or connection through the transport failed, if one did."""
        return self._forward.last_error

    @property
    def last_probe(self) -> ProbeResult | None:
        return self._forward.last_probe

    @property
    def stats(self) -> ForwardStats:
        """Live counters: active and total connections, errors, bytes each way."""
        return self._forward.stats

    def snapshot(self) -> dict[str, object]:
        """Counters and state, as ``kci-tunneld status --json`` shows a forward."""
        return self._forward.snapshot()

    # A timeout argument rather than the caller's fail_after: on expiry the error says why
    # (state and last probe error), which a bare TimeoutError cannot.
    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the forward listens and a probe through the transport reached its target.

        :raises NotReadyError: after ``timeout`` seconds (default: timeouts.ready), or at once
            when the forward is stopping, naming its state and the last error.
        """
        limit = self._ready_timeout if timeout is None else timeout
        with anyio.move_on_after(limit):
            while True:
                changed = self._changed
                if self.state == ForwardState.READY:
                    return
                if self.state in _FINAL:
                    raise NotReadyError(f"{self.name} will not become ready: {self._why()}")
                await changed.wait()
        raise NotReadyError(f"{self.name} not ready after {limit:g}s: {self._why()}")

    async def states(self) -> AsyncIterator[ForwardState]:
        """Yield the current state, then each new one, ending after ``stopped``.

        Like a watch channel: a consumer slower than the changes sees the latest state, never a
        stale one twice.
        """
        last: ForwardState | None = None
        while True:
            changed = self._changed
            state = self.state
            if state != last:
                last = state
                yield state
            if state == ForwardState.STOPPED:
                return
            await changed.wait()

    def _why(self) -> str:
        return f"{self.state} ({self.last_error or 'no probe answer yet'})"

    def _state_changed(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()


@dataclass(frozen=True)
class ForwardEvent:
    """A forward ``--auto`` added or removed, as :meth:`ForwardSet.follow` reports it."""

    kind: Literal["added", "removed"]
    name: str
    port: int  # the same number here as on the Docker host
    container: str
    handle: ForwardHandle | None  # "added": the new forward (``wait_ready()`` it); "removed": None


class ForwardSet:
    """The forwards of one config, sharing one transport; index them by name."""

    def __init__(self, config: Config, transport: Transport) -> None:
        self.config = config
        self._transport = transport
        self._ready_timeout = config.timeouts.ready
        self._handles: dict[str, ForwardHandle] = {}
        self._changed = anyio.Event()
        self._followed: list[ForwardEvent] = []
        self._followed_changed = anyio.Event()

    def __getitem__(self, name: str) -> ForwardHandle:
        return self._handles[name]

    def __iter__(self) -> Iterator[ForwardHandle]:
        return iter(list(self._handles.values()))

    def __len__(self) -> int:
        return len(self._handles)

    @property
    def all_ready(self) -> bool:
        return all(h.ready for h in self._handles.values())

    def transport_info(self) -> dict[str, object]:
        """Facts about the transport (never secrets), as ``status`` shows them."""
        return self._transport.info()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every forward is ready.

        :raises NotReadyError: after ``timeout`` seconds (default: timeouts.ready), or at once
            when one is stopping, naming each forward that is not ready and why.
        """
        limit = self._ready_timeout if timeout is None else timeout
        with anyio.move_on_after(limit):
            while True:
                changed = self._changed
                if self.all_ready:
                    return
                if any(h.state in _FINAL for h in self._handles.values()):
                    raise NotReadyError(f"will not become ready: {self._why()}")
                await changed.wait()
        raise NotReadyError(f"not ready after {limit:g}s: {self._why()}")

    async def changes(self) -> AsyncIterator[tuple[ForwardHandle, ForwardState]]:
        """Yield ``(forward, state)`` for every forward's current state, then each change, until all stopped."""
        seen: dict[str, ForwardState] = {}
        while True:
            changed = self._changed  # taken before the scan: a change during a yield re-scans
            for name, handle in list(self._handles.items()):
                state = handle.state
                if seen.get(name) != state:
                    seen[name] = state
                    yield handle, state
            if all(s == ForwardState.STOPPED for s in seen.values()):
                return
            await changed.wait()

    async def follow(self) -> AsyncIterator[ForwardEvent]:
        """With ``auto`` enabled: yield each forward discovery added or removed, from the first
        (so a late reader misses nothing), then each as it happens, until the block ends."""
        index = 0
        while True:
            changed = self._followed_changed
            while index < len(self._followed):
                yield self._followed[index]
                index += 1
            await changed.wait()

    def _add(self, forward: Forward) -> ForwardHandle:
        handle = ForwardHandle(forward, self._ready_timeout)
        self._handles[forward.spec.name] = handle
        return handle

    def _followed_event(self, event: ForwardEvent) -> None:
        self._followed.append(event)
        self._followed_changed.set()
        self._followed_changed = anyio.Event()

    def _forward_changed(self, forward: Forward) -> None:
        handle = self._handles.get(forward.spec.name)
        if handle is not None:
            handle._state_changed()
        self._changed_now()

    def _changed_now(self) -> None:
        """Wake ``wait_ready`` and ``changes()`` readers (a forward changed, or discovery added or removed one)."""
        self._changed.set()
        self._changed = anyio.Event()

    def _why(self) -> str:
        return "; ".join(f"{h.name} ({h._why()})" for h in self._handles.values() if not h.ready)


@contextlib.asynccontextmanager
async def open_forwards(
    config: Config | str | os.PathLike[str], *, grace: float | None = None
) -> AsyncIterator[ForwardSet]:
    """Run every forward of ``config`` (a Config, or the path of a TOML file) for the block.

    Returns once each listener is bound; readiness (a probe through the transport) follows:
    ``await fset.wait_ready()``.

    :raises ConfigError: for a bad or empty config.
    :raises BindError: when a listener cannot be bound (nothing is left running).
    :raises TransportError: when the transport cannot be set up.
    """
    if not isinstance(config, Config):
        config = load_config(Path(config))
    if not config.forwards and not config.auto.enabled:
        raise ConfigError("forwards: nothing to forward; give at least one [[forwards]] entry, or enable auto")
    drain = config.timeouts.drain if grace is None else grace
    try:
        async with create_transport(config.transport, config.timeouts) as transport:
            fset = ForwardSet(config, transport)
            async with anyio.create_task_group() as tg:
                # The daemon's Generation binds and starts each forward the way `start` does.
                gen = Generation(config, transport, tg, fset._forward_changed)
                for spec in config.forwards:
                    fset._add(await gen.add(spec))
                following = anyio.CancelScope()
                if config.auto.enabled:
                    await tg.start(_follow, config, gen, fset, following)
                try:
                    yield fset
                finally:
                    # After a normal exit the forwards drain for `grace`; after an exception or a
                    # cancellation the task group cancels them right away.
                    following.cancel()
                    gen.stop(drain)
    except BaseExceptionGroup as group:
        single = _unwrap(group)
        if single is group:
            raise
    else:
        return
    # Raised outside the except block so Python does not chain the group onto it as __context__.
    raise single


async def _follow(config: Config, gen: Generation, fset: ForwardSet, scope: anyio.CancelScope, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Run ``--auto``'s discovery for ``open_forwards``: add and remove its forwards in ``gen``,
    and tell ``fset.follow()`` readers. Started once the first look at the Docker host is applied."""
    # Only auto needs the Docker API client (aiodocker): a direct or ssh-only app never loads it.
    from tunneld.docker.discovery import Found, held_ports
    from tunneld.docker.follower import Discovery

    static = {f.name for f in config.forwards}
    held: dict[str, Found] = {}

    async def apply(found: list[Found]) -> None:
        wanted = {f.spec.name: f for f in found if f.spec.name not in static}
        for name, old in list(held.items()):
            if name not in wanted or wanted[name].spec != old.spec:
                gen.remove(name, config.timeouts.drain)
                fset._handles.pop(name, None)
                del held[name]
                fset._followed_event(ForwardEvent("removed", name, old.spec.port, old.container, None))
        for name, f in wanted.items():
            if name not in held:
                handle = fset._add(await gen.add(f.spec, retry_bind=config.auto.interval))
                held[name] = f
                fset._followed_event(ForwardEvent("added", name, f.spec.port, f.container, handle))
        fset._changed_now()

    reserved = held_ports(config.forwards)
    discovery = Discovery(config.transport.docker, config.auto, config.timeouts, apply, reserved=lambda: reserved)
    with scope:
        async with anyio.create_task_group() as tg:
            await tg.start(discovery.run)
            task_status.started()


def open_forward(
    forward: str | ForwardSpec,
    *,
    via: str | TransportSpec = "direct",
    timeouts: Timeouts | None = None,
    allow_non_loopback: bool = False,
    grace: float | None = None,
) -> contextlib.AbstractAsyncContextManager[ForwardHandle]:
    """Run one forward for the block: ``"[BIND:]PORT:HOST:HOSTPORT"`` (as ``-L``) or a ForwardSpec.

    ``via`` is ``"direct"``, ``"docker"``, ``"ssh://[user@]host[:port]"`` (as ``--via``) or a
    TransportSpec with every setting.

    :raises ConfigError: for a malformed forward or ``via``.
    :raises BindError, TransportError: as :func:`open_forwards`.
    """
    config = build_config([forward], via=via, timeouts=timeouts, allow_non_loopback=allow_non_loopback)
    return _single(open_forwards(config, grace=grace))


def build_config(
    forwards: Sequence[str | ForwardSpec] = (),
    *,
    via: str | TransportSpec = "direct",
    timeouts: Timeouts | None = None,
    allow_non_loopback: bool = False,
    auto: AutoSettings | None = None,
) -> Config:
    """Build a validated Config from ``-L``-style strings or specs and a transport; ``auto``
    (``AutoSettings(enabled=True, mode="all")`` for follow mode) discovers forwards too.

    :raises ConfigError: naming the bad forward or ``via``.
    """
    specs = tuple(parse_forward_arg(f, key="forward") if isinstance(f, str) else f for f in forwards)
    transport = via if isinstance(via, TransportSpec) else TransportSpec()
    base = Config(forwards=specs, transport=transport, timeouts=timeouts or Timeouts(),
                  allow_non_loopback=allow_non_loopback, auto=auto or AutoSettings())
    # merge_cli applies a --via string exactly as the CLI does, and validates the whole model.
    return merge_cli(base, via=None if isinstance(via, TransportSpec) else via)


@contextlib.asynccontextmanager
async def _single(cm: contextlib.AbstractAsyncContextManager[ForwardSet]) -> AsyncIterator[ForwardHandle]:
    async with cm as fset:
        yield next(iter(fset))


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Give the caller the one error that matters rather than a task group's wrapper.

    A lone error comes back as itself: the block's own (so ``except ValueError`` around the
    ``async with`` keeps working) or the engine's (a BindError). Several stay grouped.
    """
    real = [e for e in _leaves(group) if not isinstance(e, anyio.get_cancelled_exc_class())]
    return real[0] if len(real) == 1 else group


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e
