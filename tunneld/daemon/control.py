"""The control socket: one JSON request line in, one JSON reply line out, over a 0600 unix socket.

Nothing a client sends can end the daemon. A request is at most ``MAX_REQUEST`` bytes, must
arrive within ``READ_DEADLINE`` seconds, and is checked by one pure function (``parse_request``)
before anything acts on it: a JSON object, a known ``cmd``, every field of its type and range,
no field the command does not take. Every failure is answered (``{"ok": false, "error": ...}``)
and contained to its connection; an exception the handler did not expect is logged with its
traceback as a bug and answered too. At most ``MAX_CLIENTS`` requests are served at once; more
are answered "busy" at once, so a flood of slow clients cannot hold the daemon's memory.

The socket and its directory follow OpenSSH's StrictModes: the directory must belong to this user
and be writable by nobody else, the socket is born 0600, and a socket file is removed only when it
is provably stale (connection refused: nothing listens) and is ours.

One module, though over 300 lines: the protocol (what a request may say), its server and its client
are one contract; each is short, and apart they could drift.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from tunneld.errors import AccessError, AlreadyRunningError, ConfigError, NotRunningError, TunneldError

logger = logging.getLogger(__name__)

CONTROL_ENV = "KCI_TUNNELD_CONTROL"
MAX_REQUEST = 64 * 1024  # bytes in one request line
READ_DEADLINE = 10.0  # seconds for a client to send its whole request
MAX_CLIENTS = 32  # requests served at once
MAX_WAIT = 24 * 3600.0  # the longest `wait` a request may ask for, seconds
# sun_path is 108 bytes on Linux, with the terminating NUL: the longest path a unix socket can have.
MAX_SOCKET_PATH = 107

Handler = Callable[["Request"], Awaitable[dict[str, Any]]]


class BadRequest(TunneldError):
    """A control request that is not well-formed; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One checked control request."""

    cmd: str
    timeout: float | None = None  # wait: seconds (None: the config's timeouts.ready)
    cleanup: bool = False  # stop: also remove what the transport created remotely
    now: bool = False  # stop: end open connections at once instead of letting them drain


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{name}: expected a number of seconds, got {type(value).__name__} {_short(value)}")
    if not math.isfinite(value) or not 0 < value <= MAX_WAIT:
        raise BadRequest(f"{name}: expected seconds greater than 0 and at most {MAX_WAIT:g}, got {value!r}")
    return float(value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{name}: expected true or false, got {type(value).__name__} {_short(value)}")
    return value


# cmd -> {field: checker}: the whole protocol.
_COMMANDS: dict[str, dict[str, Callable[[str, object], object]]] = {
    "status": {},
    "wait": {"timeout": _seconds},
    "stop": {"cleanup": _flag, "now": _flag},
    "reload": {},
    "tasks": {},  # for leak hunts: how many tasks of each name are alive
}


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _no_constants(name: str) -> object:
    raise BadRequest(f"{name} is not a number JSON allows")


def parse_request(line: bytes) -> Request:
    """Check one request line (without its newline) and build the ``Request`` it asks for.

    :raises BadRequest: naming what is wrong; nothing else, whatever the bytes.
    """
    if len(line) > MAX_REQUEST:
        raise BadRequest(f"request of {len(line)} bytes; the limit is {MAX_REQUEST}")
    try:
        data = json.loads(line, parse_constant=_no_constants)
    except BadRequest:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise BadRequest(f"not a JSON request line: {str(e)[:80]}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"expected a JSON object, got {type(data).__name__}")
    cmd = data.get("cmd")
    if not isinstance(cmd, str) or cmd not in _COMMANDS:
        raise BadRequest(f"cmd: expected one of {', '.join(_COMMANDS)}, got {_short(cmd)}")
    fields = _COMMANDS[cmd]
    args: dict[str, Any] = {}
    for key, value in data.items():
        if key == "cmd":
            continue
        check = fields.get(key)
        if check is None:
            takes = ", ".join(fields) or "no fields"
            raise BadRequest(f"{_short(key)}: not a field of {cmd!r} (it takes {takes})")
        if value is not None:
            args[key] = check(key, value)
    return Request(cmd, **args)


def default_control_path() -> Path:
    """$KCI_TUNNELD_CONTROL, else $XDG_RUNTIME_DIR/kci-tunneld/control.sock, else root's
    /run/kci-tunneld/control.sock, else /tmp/kci-tunneld-UID/control.sock (created 0700, refused if
    someone else made it first)."""
    if env := os.environ.get(CONTROL_ENV):
        return Path(env)
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / "kci-tunneld" / "control.sock"
    if os.geteuid() == 0:
        return Path("/run/kci-tunneld/control.sock")
    return Path(f"/tmp/kci-tunneld-{os.geteuid()}/control.sock")


def check_control_path(path: Path) -> None:
    """Fail early on a control path no unix socket can have.

    :raises ConfigError: naming the path, its length and the limit.
    """
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise ConfigError(f"--control {path}: {size} bytes, but a unix socket path has at most {MAX_SOCKET_PATH}; "
                          "choose a shorter path")


def check_control_dir(d: Path) -> None:
    """StrictModes for an existing control directory: ours, and writable by nobody else.

    :raises ConfigError: naming the directory, what is wrong and the fix.
    """
    try:
        st = d.stat()
    except FileNotFoundError:
        return
    except PermissionError:
        raise AccessError(f"control directory {d}: permission denied; it is another user's: give yours its own "
                          "--control PATH") from None
    except OSError as e:
        raise ConfigError(f"control directory {d}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"control directory {d} is not a directory; choose another --control PATH")
    mine = st.st_uid == os.geteuid()
    problems = []
    if not mine:
        problems.append(f"belongs to uid {st.st_uid}, not to you (uid {os.geteuid()})")
    if st.st_mode & 0o022:
        problems.append(f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})")
    if problems:
        fix = f"`chmod go-w {d}`" if mine else f"`chown {os.geteuid()} {d}` and `chmod go-w {d}`"
        raise ConfigError(f"control directory {d} {' and '.join(problems)}: whoever can write there can replace "
                          "the control socket. Use a directory of your own (`mkdir -m 700 DIR`, then --control "
                          f"DIR/control.sock), or fix this one ({fix})")


class _Stale(NotRunningError):
    """Nothing listens on the socket file (connection refused)."""


async def _connect(path: Path, io_timeout: float) -> anyio.abc.SocketStream:
    try:
        with anyio.fail_after(io_timeout):
            return await anyio.connect_unix(path)
    except FileNotFoundError:
        raise NotRunningError(f"no kci-tunneld daemon answers on {path}; start one with `kci-tunneld start`") from None
    except ConnectionRefusedError:
        raise _Stale(f"no kci-tunneld daemon answers on {path} (a leftover socket file); "
                     "start one with `kci-tunneld start`") from None
    except PermissionError:
        owner = _owner(path)
        raise AccessError(f"permission denied on the control socket {path}{owner}: it is another user's daemon; "
                          "run this as that user, or give yours its own --control PATH") from None
    except TimeoutError:
        raise NotRunningError(f"the daemon on {path} did not accept within {io_timeout:g}s") from None
    except OSError as e:
        raise NotRunningError(f"cannot reach the daemon on {path}: {e.strerror or e}") from None


def _owner(path: Path) -> str:
    for p in (path, path.parent):
        with contextlib.suppress(OSError):
            return f" (owned by uid {p.stat().st_uid})"
    return ""


async def request(path: Path, cmd: str, *, io_timeout: float = 5.0, **args: Any) -> dict[str, Any]:
    """Send one command (with ``args``) to the daemon and return its reply.

    :raises NotRunningError: when nothing answers on ``path``.
    :raises AccessError: when the socket is another user's.
    """
    stream = await _connect(path, io_timeout)
    async with stream:
        try:
            await stream.send(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            # Accepted, then closed before reading (a daemon exiting: `start` asks while its child
            # fails to bind): as not running, so the caller looks at why.
            raise NotRunningError(f"the daemon on {path} closed the control connection") from None
        buf = b""
        # Replies to `wait` may take as long as the caller allows, plus a margin for the answer.
        try:
            with anyio.fail_after(io_timeout + float(args.get("timeout") or 0)):
                while not buf.endswith(b"\n"):
                    buf += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            if not buf:
                raise NotRunningError(f"the daemon on {path} closed the control connection") from None
        except TimeoutError:
            raise NotRunningError(f"the daemon on {path} did not answer {cmd!r} in time") from None
    try:
        reply = json.loads(buf)
    except ValueError:
        raise TunneldError(f"the daemon on {path} answered {cmd!r} with something that is not JSON") from None
    if not isinstance(reply, dict):
        raise TunneldError(f"the daemon on {path} answered {cmd!r} with {type(reply).__name__}, not an object")
    return reply


async def probe_existing(path: Path) -> dict[str, Any] | None:
    """Return the running daemon's status, or None when none runs there (removing the socket file
    only when it is provably stale and ours).

    :raises AccessError: when the socket, or a stale one, is another user's: never "cleaned up".
    """
    try:
        return await request(path, "status", io_timeout=2.0)
    except _Stale:
        st = path.lstat()
        if not stat.S_ISSOCK(st.st_mode):
            return None
        if st.st_uid != os.geteuid():
            raise AccessError(f"{path} is a leftover socket of uid {st.st_uid}, not yours; it is left alone: "
                              "its owner can remove it, or give yours its own --control PATH") from None
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            logger.info("removed stale control socket %s", path)
        return None
    except NotRunningError:
        return None


@contextlib.asynccontextmanager
async def serve_control(path: Path, handler: Handler) -> AsyncIterator[None]:
    """Serve the control socket at ``path`` (mode 0600) for the lifetime of the context.

    :raises AlreadyRunningError: when a live daemon already answers there.
    :raises ConfigError: when the path is too long or its directory is unsafe.
    :raises AccessError: when another user's socket is there.
    """
    check_control_path(path)
    check_control_dir(path.parent)
    if await probe_existing(path) is not None:
        raise AlreadyRunningError(f"another kci-tunneld already answers on {path}")
    _make_private_dir(path.parent)
    old = os.umask(0o177)  # the socket is born 0600: no window where others may connect
    try:
        listener = await anyio.create_unix_listener(path)
    except OSError as e:
        raise TunneldError(f"cannot create control socket {path}: {e.strerror or e}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    inode = path.stat().st_ino
    limiter = anyio.CapacityLimiter(MAX_CLIENTS)
    try:
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, lambda s: _serve_one(s, handler, limiter))
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
    finally:
        # Only remove our own socket: a successor may already have replaced it.
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_ino == inode:
                path.unlink()


def _make_private_dir(d: Path) -> None:
    if not d.exists():
        d.mkdir(parents=True, mode=0o700)
        check_control_dir(d)  # a umask can only take bits away, but say so if mkdir raced someone


async def _read_line(stream: anyio.abc.SocketStream) -> bytes:
    """One request line, without its newline.

    :raises BadRequest: over the size limit, past the deadline, or cut short.
    """
    buf = bytearray()
    try:
        with anyio.fail_after(READ_DEADLINE):
            while True:
                chunk = await stream.receive(MAX_REQUEST + 1)
                end = chunk.find(b"\n")
                buf += chunk if end < 0 else chunk[:end]
                if len(buf) > MAX_REQUEST:
                    raise BadRequest(f"request over {MAX_REQUEST} bytes")
                if end >= 0:
                    return bytes(buf)
    except TimeoutError:
        raise BadRequest(f"no whole request line within {READ_DEADLINE:g}s") from None
    except anyio.EndOfStream:
        raise BadRequest("the request ended before its newline") from None


async def _serve_one(stream: anyio.abc.SocketStream, handler: Handler, limiter: anyio.CapacityLimiter) -> None:
    async with stream:
        try:
            limiter.acquire_nowait()
        except anyio.WouldBlock:
            await _reply(stream, {"ok": False, "error": f"busy: {MAX_CLIENTS} control requests in progress; try again"})
            return
        try:
            await _answer(stream, handler)
        finally:
            limiter.release()


async def _answer(stream: anyio.abc.SocketStream, handler: Handler) -> None:
    try:
        req = parse_request(await _read_line(stream))
        reply = await handler(req)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        return  # the client went away
    except TunneldError as e:
        reply = {"ok": False, "error": str(e)}
    except Exception as e:  # a bug in a handler: contained to this request, with the traceback in the log
        logger.exception("control request failed (a bug; please report it with this traceback)")
        reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
    await _reply(stream, reply)


async def _reply(stream: anyio.abc.SocketStream, reply: dict[str, Any]) -> None:
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        await stream.send(json.dumps(reply).encode() + b"\n")
