"""Polling a remote state with a deadline: the one place provisioning waits."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio


async def poll_until(check: Callable[[], Awaitable[bool]], *, deadline: float, poll: float) -> float | None:
    """Call ``check`` every ``poll`` seconds until it returns True; the seconds it took, or None after ``deadline``.

    ``check`` keeps what it saw last (in a closure) for the caller's error message.
    """
    started = time.monotonic()
    with anyio.move_on_after(deadline):
        # Polling, not an event: the state lives on another host that cannot notify us.
        while not await check():  # noqa: ASYNC110
            await anyio.sleep(poll)
        return time.monotonic() - started
    return None
