"""The one place that chooses the event loop: uvloop when installed, unless told otherwise."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

T = TypeVar("T")

# KCI_TUNNELD_LOOP=asyncio forces the stock loop (the tests run on both).
LOOP_ENV = "KCI_TUNNELD_LOOP"


def use_uvloop() -> bool:
    choice = os.environ.get(LOOP_ENV, "auto")
    if choice == "asyncio":
        return False
    return importlib.util.find_spec("uvloop") is not None


def run(func: Callable[[], Awaitable[T]]) -> T:
    """Run ``func`` on asyncio, with uvloop when available."""
    return anyio.run(func, backend="asyncio", backend_options={"use_uvloop": use_uvloop()})
