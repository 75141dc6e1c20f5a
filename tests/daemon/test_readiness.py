"""When the daemon may say "ready": every forward probed ready *and* start-up's services running.

A forward's first probe can succeed while the metrics server is still binding. A `wait` answered then
carried no metrics address, so `start --detach` left it out of its ready lines (1 run in 15 of
tests/cli/test_output.py::test_the_ready_line_names_the_metrics_url). Here the metrics server is held
back on purpose, so the window is as wide as the test wants and the outcome does not depend on timing.
The daemon runs in this process, with its real control socket and a real forward.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from tests.servers import EchoServer
from tunneld import build_config
from tunneld.config import MetricsSettings
from tunneld.daemon import lifecycle
from tunneld.daemon.control import request
from tunneld.daemon.lifecycle import Daemon
from tunneld.errors import NotRunningError

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def test_ready_waits_for_the_metrics_server(tmp_path: Path, echo_server: EchoServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    release = anyio.Event()
    bound = lifecycle.serve_metrics

    async def held_back(*args: Any, task_status: anyio.abc.TaskStatus[Any]) -> None:
        await release.wait()
        await bound(*args, task_status=task_status)

    monkeypatch.setattr(lifecycle, "serve_metrics", held_back)
    config = dataclasses.replace(build_config([f"127.0.0.1:0:127.0.0.1:{echo_server.port}"]),
                                 metrics=MetricsSettings(port=0))
    control = tmp_path / "c.sock"
    daemon = Daemon(lambda: config, control_path=control)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        with anyio.fail_after(20):
            while True:  # the forward's probe succeeded: before the fix this alone was "ready"
                try:
                    status = await request(control, "status")
                except NotRunningError:  # the control socket is not up yet
                    status = {}
                if status.get("forwards") and all(f["state"] == "ready" for f in status["forwards"]):
                    break
                await anyio.sleep(0.02)
        assert status["state"] == "starting" and status["metrics"] == [], status
        early = await request(control, "wait", timeout=0.3)
        assert early["ok"] is False and early["state"] == "starting", early

        release.set()
        ready = await request(control, "wait", timeout=10)
        assert ready["ok"] is True and ready["state"] == "ready", ready
        (address,) = ready["metrics"]
        assert address.startswith("127.0.0.1:")
        daemon.request_stop(now=True)
