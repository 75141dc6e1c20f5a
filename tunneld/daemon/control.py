"""The control socket: one JSON request line in, one JSON reply line out, over a 0600 unix socket."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from tunneld.errors import AlreadyRunningError, NotRunningError, TunneldError

logger = logging.getLogger(__name__)

CONTROL_ENV = "KCI_TUNNELD_CONTROL"
_MAX_REQUEST = 64 * 1024

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def default_control_path() -> Path:
    """$KCI_TUNNELD_CONTROL, else $XDG_RUNTIME_DIR/kci-tunneld/control.sock, else a per-user dir."""
    if env := os.environ.get(CONTROL_ENV):
        return Path(env)
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / "kci-tunneld" / "control.sock"
    if os.geteuid() == 0:
        return Path("/run/kci-tunneld/control.sock")
    return Path(f"/tmp/kci-tunneld-{os.geteuid()}/control.sock")


async def request(path: Path, cmd: str, *, io_timeout: float = 5.0, **args: Any) -> dict[str, Any]:
    """Send one command (with ``args``) to the daemon and return its reply.

    :raises NotRunningError: when nothing answers on ``path``.
    """
    try:
        with anyio.fail_after(io_timeout):
            stream = await anyio.connect_unix(path)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotRunningError(f"no kci-tunneld daemon answers on {path}; start one with `kci-tunneld start`") from None
    except TimeoutError:
        raise NotRunningError(f"the daemon on {path} did not accept within {io_timeout:g}s") from None
    except OSError as e:
        raise NotRunningError(f"cannot reach the daemon on {path}: {e.strerror or e}") from None
    async with stream:
        await stream.send(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
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
            raise TunneldError(f"the daemon on {path} did not answer {cmd!r} in time") from None
    reply: dict[str, Any] = json.loads(buf)
    return reply


async def probe_existing(path: Path) -> dict[str, Any] | None:
    """Return the running daemon's status, or None (removing a stale socket file) if none runs."""
    try:
        return await request(path, "status", io_timeout=2.0)
    except NotRunningError:
        if path.is_socket():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                logger.info("removed stale control socket %s", path)
        return None


@contextlib.asynccontextmanager
async def serve_control(path: Path, handler: Handler) -> AsyncIterator[None]:
    """Serve the control socket at ``path`` (mode 0600) for the lifetime of the context.

    :raises AlreadyRunningError: when a live daemon already answers there.
    """
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
    try:
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, lambda s: _serve_one(s, handler))
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


async def _serve_one(stream: anyio.abc.SocketStream, handler: Handler) -> None:
    async with stream:
        buf = b""
        try:
            with anyio.fail_after(10):
                while not buf.endswith(b"\n"):
                    buf += await stream.receive()
                    if len(buf) > _MAX_REQUEST:
                        return
            req = json.loads(buf)
            if not isinstance(req, dict):
                raise ValueError("request is not an object")
        except (anyio.EndOfStream, anyio.BrokenResourceError, TimeoutError, ValueError):
            return
        try:
            reply = await handler(req)
        except TunneldError as e:
            reply = {"ok": False, "error": str(e)}
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await stream.send(json.dumps(reply).encode() + b"\n")

