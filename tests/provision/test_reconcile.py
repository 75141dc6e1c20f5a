"""The reconciler on the lab: a registry container removed behind the daemon's back is recreated
within a bound, and the forward in front of it (a real one, through the docker transport) is ready again."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import anyio
import pytest

from provision.plan import Provisioner, forwards
from provision.reconcile import run_reconciler
from tests.lab.lab import LabInfo, docker
from tests.oci import build_layout, roundtrip
from tests.provision.support import free_port, inspect, removed_after, spec, unique
from tunneld.api import open_forwards
from tunneld.config import Config, Timeouts, TransportSpec

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

INTERVAL = 0.5
RECREATE_BOUND = 10.0  # seconds from `docker rm -f` until the registry answers through the forward again
FAST = Timeouts(connect=5.0, probe=3.0, probe_interval=0.2, ready=20.0, drain=2.0)


async def test_removed_registry_is_recreated_and_its_forward_ready_again(lab: LabInfo, tmp_path: Path) -> None:
    name, port = unique("rec"), free_port()
    s = spec(lab, name, port)
    changes: list[str] = []
    with removed_after(name):
        await Provisioner(s).up()
        config = Config(forwards=tuple(forwards(s)), timeouts=FAST,
                        transport=TransportSpec(kind="docker", docker=s.docker))
        async with open_forwards(config) as fset, anyio.create_task_group() as tg:
            await fset.wait_ready(20)
            await tg.start(lambda task_status: run_reconciler(s, interval=INTERVAL, on_change=changes.append,
                                                              task_status=task_status))
            assert changes == []  # everything was in place: the first pass changed nothing
            first = inspect(lab, name)
            handle = fset["registry"]

            removed_at = time.monotonic()
            docker("rm", "-f", name)
            with anyio.fail_after(RECREATE_BOUND):
                # The reconciler recreates it; a probe may or may not fall into the gap (it can be
                # shorter than the probe interval), so the proof of the outage is the change record.
                while not changes:
                    await anyio.sleep(0.05)
                await handle.wait_ready(RECREATE_BOUND)
            took = time.monotonic() - removed_at
            assert inspect(lab, name) not in (None, first)
            assert changes and changes[0].startswith(f"registry {name} created and answering again")
            print(f"registry recreated and its forward ready again {took:.2f}s after docker rm -f")

            # And it works as a registry through the forward: a real push and pull (in threads: the
            # forward runs on this event loop).
            layout = build_layout(tmp_path / "img", layer_sizes=(1 << 20, 256 << 10))
            await anyio.to_thread.run_sync(roundtrip, layout, f"127.0.0.1:{port}", "rec/img", tmp_path)
            tg.cancel_scope.cancel()


async def test_reconciler_survives_a_docker_host_it_cannot_reach(lab: LabInfo, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from tunneld.config import DockerSettings

    s = dataclasses.replace(spec(lab, unique("gone"), free_port()),
                            docker=DockerSettings(host=f"unix://{tmp_path}/no.sock"))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: run_reconciler(s, interval=0.1, task_status=task_status))
            await anyio.sleep(0.5)  # several failing passes
            tg.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.name == "provision.reconcile"]
    assert len(warnings) == 1 and "cannot reach the Docker host" in warnings[0]  # logged once, not per pass
