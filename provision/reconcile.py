"""Keeping what ``up`` provisioned in place while the daemon runs (``start --provision``).

Every ``interval`` seconds: the registry container exists, matches the spec, runs, and is on the
kind network when the cluster exists. A removed registry is recreated (empty: its images went with
it) and the forward's own probe then finds it ready again. A vanished cluster is only reported:
recreating one takes minutes and a full ``kci-tunneld up``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
import anyio.abc

from provision.kind import nodes
from provision.registry import ensure_registry, wait_answering
from provision.remote import RemoteHost
from provision.spec import DEFAULT_RECONCILE_INTERVAL, KIND_NETWORK, ProvisionSpec
from tunneld.docker.api import DockerClient
from tunneld.docker.host import resolve_endpoint
from tunneld.errors import TunneldError

logger = logging.getLogger(__name__)

Report = Callable[[str], None]


async def reconcile_once(client: DockerClient, remote: RemoteHost, spec: ProvisionSpec, say: Report) -> list[str]:
    """One pass; returns what it changed (empty when all was in place).

    :raises TunneldError: when Docker or a step fails (the caller retries on the next pass).
    """
    changed: list[str] = []
    cluster = spec.cluster
    network = None
    if cluster is not None:
        if await nodes(client, cluster.name):
            network = KIND_NETWORK
        else:
            say(f"cluster {cluster.name} is gone from the Docker host; run `kci-tunneld up` to recreate it")
    reg = spec.registry
    action = await ensure_registry(client, reg, network=network, progress=say, deadline=spec.timeouts.pull)
    if action != "reused":
        took = await wait_answering(remote, reg, deadline=spec.timeouts.registry_ready, poll=spec.timeouts.poll)
        changed.append(f"registry {reg.name} {action} and answering again ({took:.1f}s)")
    return changed


async def run_reconciler(
    spec: ProvisionSpec, *, interval: float = DEFAULT_RECONCILE_INTERVAL, on_change: Report | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Reconcile until cancelled; ``task_status.started()`` after the first pass, whatever its outcome.

    Failures are logged once per distinct reason (a Docker host that is down must not flood the log)
    and retried on the next pass; this function only returns by cancellation.

    :raises TransportError: only when the Docker host setting itself is malformed.
    """
    endpoint = resolve_endpoint(spec.docker)
    last_problem: str | None = None
    reported: set[str] = set()

    def say(line: str) -> None:
        # Repeated lines (the same warning every pass) are logged once until something changes.
        if line in reported:
            return
        reported.add(line)
        level = logging.WARNING if line.startswith(("cluster ", "warning")) else logging.INFO
        logger.log(level, "reconcile: %s", line)

    async with DockerClient(endpoint, timeout=spec.timeouts.docker) as client:
        remote = RemoteHost(client, spec.helper_image, spec.timeouts)
        started = False
        while True:
            try:
                changed = await reconcile_once(client, remote, spec, say)
            except TunneldError as e:
                if str(e) != last_problem:
                    logger.warning("reconcile: %s (retrying every %gs)", e, interval)
                    last_problem = str(e)
            else:
                if last_problem is not None:
                    logger.info("reconcile: all in place again")
                    last_problem = None
                for line in changed:
                    logger.info("reconcile: %s", line)
                    reported.clear()
                    if on_change is not None:
                        on_change(line)
            if not started:
                started = True
                task_status.started()
            await anyio.sleep(interval)
