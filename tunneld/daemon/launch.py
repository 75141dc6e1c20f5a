"""Start a daemon in the background and wait until it is ready; stop one and wait until it is gone;
ask one something, with a deadline of our own.

``start --detach``, ``status``, ``wait`` and ``stop`` (tunneld/cli/main.py), ``up --detach`` and
``down`` (provision/cli.py) all go through here. Nothing here prints: the callers say what happened
(``progress`` is how a long wait says what it still waits for).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from tunneld.daemon.control import request
from tunneld.daemon.processes import log_size, log_tail, pid_alive
from tunneld.errors import ExitCode, NotReadyError, NotRunningError, TunneldError
from tunneld.logs import make_private

POLL = 0.05  # seconds between looks at what has no event to await: a socket being bound, another process's exit
STEP = 1.0  # the longest single `wait` request, so a daemon that exits meanwhile is noticed this soon
PROGRESS_EVERY = 5.0  # seconds between the lines that say what a wait is still waiting for
ANSWER_WITHIN = 5.0  # seconds a daemon has to answer a request (on top of what the request waits for)
STOP_HINT = "end it with `kci-tunneld stop`"


class StillRunningError(TunneldError):
    """``stop`` gave up waiting: the daemon still drains its open connections (or does not exit)."""

    exit_code = ExitCode.NOT_READY


async def ask(control: Path, cmd: str, *, within: float = ANSWER_WITHIN, **args: Any) -> dict[str, Any]:
    """Send one request and return the reply, or give up after ``within`` seconds (plus what a
    ``wait`` request's ``timeout`` asks for): a daemon that does not answer counts as not running.

    :raises NotRunningError: when nothing answers on ``control``, not in time, or not as a daemon does.
    :raises AccessError: when the socket is another user's.
    """
    limit = within + float(args.get("timeout") or 0)
    with anyio.move_on_after(limit):
        try:
            # request()'s own deadlines are longer: this one is the one that fires.
            return await request(control, cmd, io_timeout=within + 1, **args)
        except TunneldError as e:
            if type(e) is not TunneldError:  # NotRunningError, AccessError: as they are
                raise
            # The reply is not one a daemon sends (not JSON, not an object): not a bug of ours.
            raise NotRunningError(f"{e}: what listens there is not a kci-tunneld daemon") from None
    raise NotRunningError(f"the daemon on {control} did not answer {cmd!r} within {limit:g}s: it is stuck (its "
                          "log says more), or what listens there is not kci-tunneld")


class DaemonExitedError(TunneldError):
    """The daemon this process started exited before it was ready; its exit code is passed on."""

    def __init__(self, message: str, code: int | None) -> None:
        super().__init__(message)
        self.exit_code = _exit_code(code)


def _exit_code(code: int | None) -> ExitCode:
    try:
        return ExitCode(code) if code else ExitCode.ERROR  # 0 before ready is no success
    except ValueError:  # a signal (negative), or a code that is not ours
        return ExitCode.ERROR


@dataclass(frozen=True)
class Started:
    """A daemon this process started in the background."""

    process: subprocess.Popen[bytes]
    log_file: Path
    log_start: int  # where this start's lines begin: the log is appended to by every daemon that used it

    @property
    def pid(self) -> int:
        return self.process.pid


def spawn(argv: Sequence[str], log_file: Path, *, env: Mapping[str, str] | None = None) -> Started:
    """Start ``kci-tunneld ARGV`` detached, its output appended to ``log_file``.

    :raises TunneldError: when the log file or the process cannot be created.
    """
    try:
        make_private(log_file)  # 0600 from the first byte, before the daemon's own logging opens it
        log_start = log_size(log_file)
        with open(log_file, "ab") as log:
            # A new session, and no inherited stdin/stdout/stderr: a CI step must never hang on us.
            process = subprocess.Popen(
                [sys.executable, "-m", "tunneld", *argv], env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
            )
    except OSError as e:
        raise TunneldError(f"cannot start the daemon (log {log_file}): {e.strerror or e}") from None
    return Started(process, log_file, log_start)


async def wait_ready(control: Path, timeout: float, *, started: Started | None = None,
                     log_file: str | os.PathLike[str] | None = None, stop_hint: str = STOP_HINT,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The status of the daemon on ``control`` once every forward is ready.

    ``started`` is the daemon this process spawned (None: one that already runs), watched so that its
    exit ends the wait at once; ``log_file`` is named in the errors when there is no ``started``.
    ``progress`` is told, every ``PROGRESS_EVERY`` seconds of waiting, what is not ready yet and why.

    :raises DaemonExitedError: when ``started`` exited first, with its code and its log's lines from this start.
    :raises NotRunningError: when no daemon answers and none was ``started``.
    :raises NotReadyError: naming what is not ready after ``timeout``; the daemon keeps running and retrying.
    """
    log = started.log_file if started is not None else log_file
    begun = anyio.current_time()
    deadline, next_report = begun + timeout, begun + PROGRESS_EVERY
    reply: dict[str, Any] | None = None
    while (left := deadline - anyio.current_time()) > 0:
        if started is not None and started.process.poll() is not None:
            code = started.process.returncode
            raise DaemonExitedError(f"the daemon exited with code {code} before it was ready:\n"
                                    + log_tail(str(started.log_file), start=started.log_start), code)
        try:
            reply = await ask(control, "wait", timeout=min(STEP, max(POLL, left)))
        except NotRunningError:
            if started is None:
                raise
            await anyio.sleep(POLL)  # the daemon is still binding its control socket
            reply = None
        if reply is not None and reply.get("ok"):
            return reply
        if progress is not None and (now := anyio.current_time()) >= next_report:
            progress(f"waiting {now - begun:.0f}s: {unready(reply) if reply else 'the daemon has not answered yet'}")
            next_report = now + PROGRESS_EVERY
    reason = f"not ready after {timeout:g}s: {unready(reply)}" if reply else "the daemon did not answer"
    pid = started.pid if started is not None else (reply or {}).get("pid")
    raise NotReadyError(f"{reason}\n  the daemon (pid {pid}) keeps running and retrying; log: {log}\n"
                        f"  keep waiting with `kci-tunneld wait`, or {stop_hint}")


def unready(status: Mapping[str, Any]) -> str:
    """What a daemon's status (or ``wait`` reply) says is not ready, and why: each forward that is
    not, with its state and last error, and ``--auto`` when it has not yet listed the containers."""
    parts = [f"{f['name']} ({f['state']}: {f.get('last_error') or 'no probe answer yet'})"
             for f in status.get("forwards") or [] if f.get("state") != "ready"]
    auto = status.get("auto") or {}
    if auto.get("enabled") and not auto.get("scans"):
        parts.insert(0, f"--auto has not listed the remote containers yet ({auto.get('last_error') or 'trying'})")
    return "; ".join(parts) or str(status.get("state") or "not ready")


def ready_headline(reply: Mapping[str, Any]) -> str:
    """The first line a detached start says once ready: the daemon's pid and its log."""
    log = f"; log: {reply['log_file']}" if reply.get("log_file") else ""
    return f"kci-tunneld: ready (pid {reply.get('pid')}){log}"


def ready_lines(reply: Mapping[str, Any]) -> list[str]:
    """What ``start --detach`` says once ready: the headline, then each forward's listen -> target."""
    lines = [ready_headline(reply)]
    for f in reply.get("forwards", []):
        found = f" (found: {f['container']})" if f.get("container") else ""
        lines.append(f"  {f['name']}: {', '.join(f['listen'])} -> {f['target']}{found}")
    if (reply.get("auto") or {}).get("enabled") and not reply.get("forwards"):
        lines.append("  --auto found nothing to forward yet; it keeps looking (see `kci-tunneld status`)")
    lines += [f"  metrics: http://{address}/metrics" for address in reply.get("metrics") or []]
    return lines


async def stop(control: Path, *, cleanup: bool = False, timeout: float = 30.0, now: bool = False) -> int:
    """Ask the daemon on ``control`` to stop (``cleanup``: and remove what its transport made
    remotely; ``now``: end open connections at once instead of letting them drain) and return its
    pid once its process is gone.

    :raises NotRunningError: when no daemon answers on ``control``.
    :raises StillRunningError: when it still runs ``timeout`` seconds later, saying whether it drains.
    :raises TunneldError: when it refuses.
    """
    reply = await ask(control, "stop", cleanup=cleanup, **({"now": True} if now else {}))
    if not reply.get("ok"):
        raise TunneldError(f"the daemon on {control} refused to stop: {reply.get('error')}")
    pid = int(reply["pid"])
    with anyio.move_on_after(timeout):
        # Another process's exit has no event to await here (not our child): poll it.
        while pid_alive(pid):  # noqa: ASYNC110
            await anyio.sleep(POLL)
        return pid
    try:
        status = await ask(control, "status", within=2.0)
    except TunneldError:
        status = {}
    if not pid_alive(pid):
        return pid  # it just made it
    active = sum(int(f.get("active") or 0) for f in status.get("forwards") or [])
    if active:
        raise StillRunningError(f"the daemon (pid {pid}) on {control} is still draining {active} connection(s) "
                                f"after {timeout:g}s; `kci-tunneld stop --now` ends them")
    raise StillRunningError(f"the daemon (pid {pid}) on {control} did not stop within {timeout:g}s; "
                            f"`kci-tunneld stop --now` ends what it still holds open, `kill {pid}` ends it")
