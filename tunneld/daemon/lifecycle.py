"""The daemon: startup -> serve (signals, control requests, reloads) -> graceful shutdown.

Task tree: daemon -> generation (one transport and its forwards) -> forward -> listener /
connection. A reload that changes only forwards touches only those forwards; one that changes the
transport or timeouts starts a new generation while the old one drains. With ``--auto`` a discovery
task (tunneld/docker/discovery.py) adds and removes forwards in the current generation through the same
diff (``_sync``) a reload uses; an optional metrics server renders ``status`` for Prometheus.

A reload is a transaction (docs/architecture.md): the new generation's transport and listeners
come up (tunneld/daemon/generation.py hands listening sockets over) before anything running stops.

One module, though over 400 lines: the daemon's state (its config, its generation, what --auto
found, whether it is stopping or announced ready) is changed by start-up, signals, control
requests, reloads and discovery alike, and one class holding it is what keeps those changes in
order under one lock; the pieces that need none of it live beside it (generation.py, control.py,
notify.py, metrics.py).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from tunneld.config import Config, ForwardSpec
from tunneld.daemon.control import Request, serve_control
from tunneld.daemon.generation import Generation, close_unadopted, prebind
from tunneld.daemon.launch import unready
from tunneld.daemon.metrics import serve_metrics
from tunneld.daemon.notify import Notifier
from tunneld.engine.forward import Forward, ForwardState
from tunneld.errors import ExitCode, NotReadyError, TunneldError
from tunneld.transports import create_transport

if TYPE_CHECKING:
    from tunneld.docker.discovery import Found
    from tunneld.docker.follower import Discovery

logger = logging.getLogger(__name__)


class Daemon:
    """Runs forwards from a config, serves the control socket, handles signals and reloads."""

    def __init__(
        self,
        load: Callable[[], Config],
        *,
        control_path: Path,
        notifier: Notifier | None = None,
        log_file: str | None = None,
    ) -> None:
        self._load = load
        self.control_path = control_path
        self.notifier = notifier or Notifier()
        self.log_file = log_file
        self.config: Config = Config()
        self.generation: Generation | None = None
        self._stopping = anyio.Event()
        self._stop_now = False  # `stop --now`: no drain
        self._changed = anyio.Event()
        self._exit = ExitCode.OK
        self._announced_ready = False
        self._tg: anyio.abc.TaskGroup | None = None
        self.discovery: Discovery | None = None
        self._auto_settled = False  # the first discovery result has been applied
        self._services_up = False  # start-up's services (--auto, metrics) are running: ready may be said
        self._discovered: dict[str, Found] = {}
        self._services: dict[str, tuple[anyio.CancelScope, anyio.Event]] = {}  # "auto", "metrics"
        self.metrics_addresses: list[str] = []
        self._sync_lock = anyio.Lock()

    async def run(self) -> ExitCode:
        """Serve until SIGTERM/SIGINT or a `stop` request; return the exit code.

        :raises ConfigError, BindError, TransportError, AlreadyRunningError: on failed startup.
        """
        self.config = self._load()
        async with serve_control(self.control_path, self._handle), anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self._signals)
            tg.start_soon(self.notifier.watchdog)
            self.generation = await tg.start(self._generation, self.config)
            await self._start_services(self.config, None)
            self._services_up = True
            self._changed_now()
            tg.start_soon(self._report_ready)
            logger.info("started (pid %d); control socket %s", os.getpid(), self.control_path)
            await self._stopping.wait()
            self.notifier.stopping()
            if self._stop_now:
                logger.info("stopping now: no new connections; ending %d open connection(s)",
                            sum(f.stats.active for f in self.generation.forwards.values()))
            else:
                logger.info("stopping: no new connections; draining for up to %gs", self.config.timeouts.drain)
            await self._stop_generation(self.generation, cleanup=False)
            tg.cancel_scope.cancel()
        logger.info("stopped")
        return self._exit

    def request_stop(self, *, cleanup: bool = False, now: bool = False) -> None:
        """Begin a graceful shutdown (what SIGTERM does); ``now``: with a zero grace, ending open
        connections at once (also when a graceful one is already draining)."""
        if cleanup and self.generation is not None:
            self.generation.cleanup = True
        if now and not self._stop_now:
            self._stop_now = True
            if self._stopping.is_set() and self.generation is not None:
                logger.info("stop --now: ending the %d connection(s) still draining",
                            sum(f.stats.active for f in self.generation.forwards.values()))
                self.generation.stop(0, now=True)
        self._stopping.set()

    def all_ready(self) -> bool:
        if not self._services_up:
            # The forwards can be probed ready while the metrics server is still binding: a `wait` answered
            # then would leave the metrics address out of `start --detach`'s ready lines.
            return False
        gen = self.generation
        if self.discovery is not None and not self._auto_settled:
            return False  # --auto has not yet seen the Docker host: nothing is known to be forwarded
        return gen is not None and all(f.state == ForwardState.READY for f in gen.forwards.values())

    def _daemon_state(self) -> str:
        if self._stopping.is_set():
            return "stopping"
        if self.all_ready():
            return "ready"
        if not self._services_up:
            return "starting"
        forwards = self.generation.forwards.values() if self.generation else []
        if any(f.state != ForwardState.STARTING for f in forwards):
            return "degraded"
        return "starting"

    async def wait_ready(self, deadline: float) -> None:
        """Wait up to ``deadline`` seconds until every forward is ready.

        :raises NotReadyError: naming the forwards that are not, and why.
        """
        with anyio.move_on_after(deadline):
            while not self.all_ready():
                await self._changed.wait()
            return
        raise NotReadyError(self._not_ready_reason(deadline))

    def status(self) -> dict[str, Any]:
        gen = self.generation
        forwards = [f.snapshot() for f in gen.forwards.values()] if gen else []
        for f in forwards:
            found = self._discovered.get(str(f["name"]))
            f["source"] = "auto" if found is not None else "config"
            if found is not None:
                f["container"] = found.container
        return {
            "ok": True,
            "pid": os.getpid(),
            "fingerprint": self.config.fingerprint(),
            "state": self._daemon_state(),
            "control": str(self.control_path),
            "log_file": self.log_file,
            "transport": gen.transport.info() if gen else None,
            "auto": self.discovery.status() if self.discovery else {"enabled": False},
            "metrics": self.metrics_addresses,
            "tasks": len(anyio.get_running_tasks()),  # a leak shows as a count that keeps growing
            "forwards": forwards,
        }

    async def reload(self) -> dict[str, Any]:
        """Re-read the config and apply it as one transaction: the new transport and any new
        listeners come up before anything running stops; if any step fails, nothing running is
        touched and the reply says why (with the exit code that fits). Never raises a TunneldError.
        """
        self.notifier.reloading()
        reply: dict[str, Any] = {"ok": False}
        try:
            reply = await self._reload()
            return reply
        finally:
            if reply.get("applied"):
                # READY=1 once every forward is ready (_report_ready); until then STATUS= says what is pending.
                self._notify_status()
            else:
                # Rejected: what ran before runs on; systemd waits for READY=1 to end "reloading".
                self.notifier.ready(self._status_line())

    async def _reload(self) -> dict[str, Any]:
        try:
            new = self._load()
            old, gen = self.config, self.generation
            assert gen is not None and self._tg is not None
            core = (new.transport, new.timeouts, new.allow_non_loopback)
            if core != (old.transport, old.timeouts, old.allow_non_loopback):
                logger.info("reload: transport or timeouts changed; starting a new generation beside the running one")
                await self._replace_generation(new)
                errors = list(self.generation.errors) if self.generation else []
            else:
                errors = await self._apply_forwards(new)
        except TunneldError as e:
            logger.error("reload rejected, keeping the running config: %s", e)
            return {"ok": False, "error": f"reload rejected, keeping the running config: {e}",
                    "exit_code": int(e.exit_code)}
        try:
            await self._start_services(new, old)
        except TunneldError as e:  # the forwards are applied by now: say so, with what failed
            errors.append(str(e))
        self._announced_ready = False
        self._changed_now()
        logger.info("reload applied%s", f" with errors: {'; '.join(errors)}" if errors else "")
        return {"ok": not errors, "applied": True, "error": "; ".join(errors) or None,
                "exit_code": int(ExitCode.BIND) if errors else int(ExitCode.OK)}

    async def _replace_generation(self, new: Config) -> None:
        """Start a generation for ``new`` (its transport entered, its listeners bound or handed over)
        and only then stop the running one, whose connections drain.

        :raises TransportError: when the new transport cannot start; nothing running was touched.
        :raises BindError: when a new listener cannot be bound; likewise.
        """
        old_gen, old = self.generation, self.config
        assert old_gen is not None and self._tg is not None
        desired = self._desired(new)
        async with self._sync_lock:
            handed = prebind(desired, old_gen)
            try:
                new_gen = await self._tg.start(self._generation, new, desired, handed)
            finally:
                close_unadopted(handed)
            old_gen.stop(old.timeouts.drain)  # its listeners close now (the new forwards hold their own fds)
            self.config, self.generation = new, new_gen

    async def _apply_forwards(self, new: Config) -> list[str]:
        """A reload that changes only forwards: bind what is new first, then swap.

        :raises BindError: when a new listener cannot be bound; nothing running was touched.
        """
        gen = self.generation
        assert gen is not None
        desired = self._desired(new)
        changed = [(spec, retry) for spec, retry in desired if gen.forwards.get(spec.name, None) is None
                   or gen.forwards[spec.name].spec != spec]
        async with self._sync_lock:
            handed = prebind(changed, gen)
        try:
            gen.config = new
            self.config = new
            return await self._sync("reload", handed)
        finally:
            close_unadopted(handed)

    def _desired(self, config: Config | None = None) -> list[tuple[ForwardSpec, float | None]]:
        """Every forward that should run, with its bind retry: the config's, then the discovered ones."""
        config = config or self.config
        static = {f.name for f in config.forwards}
        out: list[tuple[ForwardSpec, float | None]] = [(f, None) for f in config.forwards]
        for name, found in self._discovered.items():
            if name in static:
                logger.warning("auto: %s (%s) not forwarded: the config has a forward with that name",
                               name, found.container)
                continue
            out.append((found.spec, config.auto.interval))
        return out

    async def _sync(self, why: str, handed: dict[str, list[socket.socket]] | None = None) -> list[str]:
        """Stop forwards that are no longer wanted or changed, start the missing ones (on the
        ``handed`` listeners where there are some); return errors."""
        errors: list[str] = []
        async with self._sync_lock:
            gen = self.generation
            assert gen is not None
            desired = self._desired()
            wanted = {spec.name: spec for spec, _ in desired}
            for name, forward in list(gen.forwards.items()):
                if wanted.get(name) != forward.spec:
                    logger.info("%s: stopping forward %s", why, name)
                    gen.remove(name, self.config.timeouts.drain)
            for spec, retry in desired:
                if spec.name not in gen.forwards:
                    logger.info("%s: starting forward %s", why, spec.name)
                    try:
                        await gen.add(spec, retry_bind=retry, listeners=(handed or {}).pop(spec.name, None))
                    except TunneldError as e:
                        logger.error("%s: forward %s not started: %s", why, spec.name, e)
                        errors.append(f"{spec.name}: {e}")
        self._announced_ready = False
        self._changed_now()
        return errors

    async def _start_services(self, config: Config, old: Config | None) -> None:
        """(Re)start discovery and the metrics server where ``config`` changed them (``old`` None: start).

        :raises TransportError: when --auto's Docker host settings are unusable.
        :raises BindError: when the metrics port cannot be bound.
        """
        if old is None or (config.auto, config.transport.docker) != (old.auto, old.transport.docker):
            await self._stop_service("auto")
            self.discovery, self._auto_settled = None, False
            if config.auto.enabled:
                # Only --auto needs the Docker API client (aiodocker): a --via direct daemon never loads it.
                from tunneld.docker.discovery import held_ports
                from tunneld.docker.follower import Discovery

                discovery = Discovery(config.transport.docker, config.auto, config.timeouts, self._apply_discovered,
                                      reserved=lambda: held_ports(self.config.forwards))
                self.discovery = discovery
                await self._start_service("auto", discovery.run)
            elif self._discovered:
                self._discovered = {}
                await self._sync("auto off")
        if old is None or config.metrics != old.metrics:
            await self._stop_service("metrics")  # and wait: a new server may want the same port
            self.metrics_addresses = []
            metrics = config.metrics
            if metrics.port is not None:
                self.metrics_addresses = await self._start_service(
                    "metrics",
                    lambda task_status: serve_metrics(metrics.bind, metrics.port or 0, self.status,
                                                      task_status=task_status))

    async def _start_service(self, name: str, run: Callable[..., Any]) -> Any:
        assert self._tg is not None
        scope, done = anyio.CancelScope(), anyio.Event()
        self._services[name] = (scope, done)
        return await self._tg.start(self._scoped, scope, done, run)

    async def _stop_service(self, name: str) -> None:
        held = self._services.pop(name, None)
        if held is not None:
            held[0].cancel()
            await held[1].wait()

    @staticmethod
    async def _scoped(scope: anyio.CancelScope, done: anyio.Event, run: Callable[..., Any], *,
                      task_status: anyio.abc.TaskStatus[Any] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await run(task_status=task_status)
        finally:
            done.set()

    async def _apply_discovered(self, found: list[Found]) -> None:
        self._discovered = {f.spec.name: f for f in found}
        await self._sync("auto")
        self._auto_settled = True
        self._changed_now()

    async def _generation(self, config: Config, desired: list[tuple[ForwardSpec, float | None]] | None = None,
                          handed: dict[str, list[socket.socket]] | None = None, *,
                          task_status: anyio.abc.TaskStatus[Generation] = anyio.TASK_STATUS_IGNORED) -> None:
        """One transport and its forwards, until stopped. At start-up (``handed`` None) a forward that
        cannot bind ends it; on a reload the static forwards' listeners are already ``handed`` over,
        and only a discovered forward can fail, which is logged and retried."""
        tolerant = handed is not None
        transport = create_transport(config.transport, config.timeouts)
        gen: Generation | None = None
        try:
            async with transport:
                async with anyio.create_task_group() as tg:
                    gen = Generation(config, transport, tg, self._forward_changed)
                    for spec, retry in desired if desired is not None else self._desired(config):
                        try:
                            await gen.add(spec, retry_bind=retry, listeners=(handed or {}).pop(spec.name, None))
                        except TunneldError as e:
                            if not tolerant:
                                raise
                            logger.error("forward %s not started: %s", spec.name, e)
                            gen.errors.append(f"{spec.name}: {e}")
                    task_status.started(gen)
                    await gen.stop_requested.wait()
                # Every forward has drained: now the far side may lose what they ran through.
                if gen is not None and gen.cleanup:
                    await transport.cleanup()
        finally:
            if gen is not None:
                gen.finished.set()

    async def _stop_generation(self, gen: Generation, cleanup: bool) -> None:
        gen.stop(self.config.timeouts.drain, cleanup=cleanup, now=self._stop_now)
        await gen.finished.wait()

    async def _signals(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    logger.info("SIGHUP: reloading the config")
                    await self.reload()
                elif self._stopping.is_set():
                    logger.warning("%s again: forcing exit", signal.Signals(signum).name)
                    self._exit = ExitCode.INTERRUPTED
                    assert self._tg is not None
                    self._tg.cancel_scope.cancel()
                else:
                    logger.info("%s: shutting down gracefully (send it again to force)", signal.Signals(signum).name)
                    self._stopping.set()

    async def _report_ready(self) -> None:
        while not self._stopping.is_set():  # after STOPPING=1, the status stays "stopping"
            if self.all_ready() and not self._announced_ready:
                self._announced_ready = True
                logger.info("all %d forward(s) ready", len(self.generation.forwards) if self.generation else 0)
                self.notifier.ready(self._status_line())
            else:
                self._notify_status()
            await self._changed.wait()

    async def _handle(self, req: Request) -> dict[str, Any]:
        """Answer one checked control request (tunneld/daemon/control.py parses it)."""
        if req.cmd == "status":
            return self.status()
        if req.cmd == "wait":
            try:
                await self.wait_ready(req.timeout or self.config.timeouts.ready)
            except NotReadyError as e:
                return {**self.status(), "ok": False, "error": str(e)}
            return self.status()
        if req.cmd == "stop":
            self.request_stop(cleanup=req.cleanup, now=req.now)
            return {"ok": True, "pid": os.getpid()}
        if req.cmd == "reload":
            logger.info("reload requested over the control socket")
            return await self.reload()
        if req.cmd == "tasks":
            names = Counter(t.name or "?" for t in anyio.get_running_tasks())
            return {"ok": True, "tasks": dict(names.most_common())}
        raise AssertionError(f"parse_request let {req.cmd!r} through")

    def _forward_changed(self, forward: Forward) -> None:
        self._changed_now()

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _status_line(self) -> str:
        """systemd's STATUS=: how many forwards are ready, and which are not (and why)."""
        gen = self.generation
        if gen is None:
            return "starting"
        ready = sum(f.state == ForwardState.READY for f in gen.forwards.values())
        line = f"{ready}/{len(gen.forwards)} forwards ready"
        pending = [f"{f.spec.name} ({f.state})" for f in gen.forwards.values() if f.state != ForwardState.READY]
        if pending:
            more = f" and {len(pending) - 5} more" if len(pending) > 5 else ""
            line += "; waiting for " + ", ".join(pending[:5]) + more
        return line

    def _notify_status(self) -> None:
        self.notifier.status(self._status_line())

    def _not_ready_reason(self, timeout: float) -> str:
        status = self.status()
        return not_ready_reason(status["forwards"], timeout, status["auto"])


def not_ready_reason(forwards: list[dict[str, Any]], timeout: float, auto: dict[str, Any] | None = None) -> str:
    """Say which forwards (as ``status`` shows them) are not ready, and why."""
    return f"not ready after {timeout:g}s: " + unready({"forwards": forwards, "auto": auto})
