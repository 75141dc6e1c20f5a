"""Shared fixtures: both event loops, real TCP servers on loopback run in threads, the real CLI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.runner import Cli
from tests.servers import EchoServer


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    """The real CLI with a private control socket; whatever it started is stopped (gracefully,
    then by pid) at the end."""
    c = Cli(tmp_path)
    yield c
    if c.started:
        c.run("stop", "--timeout", "30", timeout=40)
    c.cleanup()
