"""The remote host's Docker: dockerd in the namespace, its images, and the registry container.

Quirks found while building this (dockerd 20.10.24, containerd 1.6, Debian 12):
- `--iptables` (the default) works inside the namespace with Debian's iptables-nft: the
  NAT/DOCKER chains are made in the namespace's own tables; nothing to turn off.
- dockerd starts its own containerd with its socket and state under --exec-root and its
  root under --data-root, so the lab never shares a containerd with another dockerd.
  Only the shims' sockets go to /run/containerd/s/<hash of our containerd address>.
- After SIGKILL of dockerd, its containerd is sometimes still alive for a moment; a new
  dockerd then adopts it through containerd.pid and gives up 15 s later with "timeout
  waiting for containerd to start". See `_clear_containerd`.
- Containers survive a SIGKILL of dockerd (their shims are not its children); the next
  dockerd re-attaches and restart=always restarts them.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import tempfile

from . import images, procs, socat18
from .commands import docker, env, spawn, wait_for, write_if_changed
from .layout import (
    CERT_DIR,
    CLI_TIMEOUT,
    DAEMON_JSON,
    DATA_ROOT,
    DOCKER_SOCK,
    DOCKERD_LOG,
    DOCKERD_PID,
    DOCKERD_START_TIMEOUT,
    DOCKERD_STOP_TIMEOUT,
    EXEC_ROOT,
    INFO,
    NETNS,
    PROCESS_STOP_TIMEOUT,
    REGISTRY_CONTAINER,
    REGISTRY_PORT,
    SERVICE_START_TIMEOUT,
    LabError,
)
from .probes import engine, engine_json, in_netns, ns_http_ok, ping_tls, ping_unix

logger = logging.getLogger(__name__)


def dockerd_pid() -> int | None:
    """Pid of the lab's dockerd if it is alive (whether or not it answers)."""
    return procs.read_pidfile(DOCKERD_PID, str(DOCKERD_PID))


def _clear_containerd() -> None:
    """Remove what a killed dockerd's containerd left, before a new dockerd starts one.

    dockerd adopts the containerd named in exec-root/containerd/containerd.pid if that pid
    is alive, then waits 15 s for its socket and fails. Seen here after a SIGKILL of
    dockerd: the old containerd was still shutting down, its socket already gone. The pid
    may also belong to an unrelated process by now. So stop our old containerd (known by
    its config path on its command line) and drop its files; the new one re-attaches to
    the running shims, so containers survive.
    """
    state = EXEC_ROOT / "containerd"
    procs.stop_pidfile(state / "containerd.pid", str(state / "containerd.toml"), PROCESS_STOP_TIMEOUT)
    for sock in state.glob("containerd*.sock*"):
        sock.unlink(missing_ok=True)


def _serving() -> bool:
    return ping_unix() and ping_tls()


def start_dockerd() -> int:
    """Start the lab's dockerd unless it serves already; wait for /_ping; return its pid.

    :raises LabError: if it does not answer on both the unix socket and TCP+TLS in time.
    """
    pid = dockerd_pid()
    if pid is not None and in_netns(pid):
        if ping_unix():
            if ping_tls():
                return pid
            # Answers, but not on TCP+TLS: started with other flags (an older lab), so it
            # is restarted below rather than waited for.
        else:
            # Ours and in the right place, maybe still starting (an `up` that was killed).
            with contextlib.suppress(LabError):
                wait_for("dockerd", _serving, 20.0)
                return pid
    if pid is not None:
        logger.warning("dockerd pid %d is unresponsive or in a stale namespace: stopping it", pid)
        procs.terminate([pid], DOCKERD_STOP_TIMEOUT)
    # Leftovers of a killed run: dockerd refuses to start while its pid file names a live
    # process, and a dead socket file makes clients fail with "connection refused".
    DOCKERD_PID.unlink(missing_ok=True)
    DOCKER_SOCK.unlink(missing_ok=True)
    _clear_containerd()
    for d in (EXEC_ROOT, DATA_ROOT):
        d.mkdir(mode=0o710, parents=True, exist_ok=True)
    # Its own (empty) config file, so a host /etc/docker/daemon.json cannot change the lab.
    write_if_changed(DAEMON_JSON, "{}\n")
    server = CERT_DIR / "server"
    flags = {
        "--config-file": DAEMON_JSON,
        "--data-root": DATA_ROOT,
        "--exec-root": EXEC_ROOT,
        "--pidfile": DOCKERD_PID,
        "--tlscacert": INFO.ca_cert,
        "--tlscert": server / "cert.pem",
        "--tlskey": server / "key.pem",
    }
    argv = ["dockerd", *(s for flag, path in flags.items() for s in (flag, str(path)))]
    argv += ["--tlsverify", "-H", INFO.docker_host_unix, "-H", INFO.docker_host_tcp]
    proc = spawn(argv, DOCKERD_LOG)
    wait_for("dockerd", _serving, DOCKERD_START_TIMEOUT, proc, DOCKERD_LOG)
    return proc.pid


def stop_dockerd() -> int | None:
    """Stop the lab's dockerd (it stops its containers first); return the pid it had."""
    pid = procs.stop_pidfile(DOCKERD_PID, str(DOCKERD_PID), DOCKERD_STOP_TIMEOUT)
    DOCKER_SOCK.unlink(missing_ok=True)
    return pid


def ensure_dockerd() -> str:
    """`up` step: dockerd serving; returns what was done."""
    before = dockerd_pid()
    pid = start_dockerd()
    state = "running" if pid == before else "started"
    return f"{state} (pid {pid}), {INFO.docker_host_unix} + {INFO.docker_host_tcp} (TLS)"


def _import_image(spec: images.ImageSpec) -> str:
    current = engine_json(f"/images/{spec.name}/json")
    if current is not None:
        labels = (current.get("Config") or {}).get("Labels") or {}
        if labels.get("kcilab.recipe") == spec.digest():
            return "kept"
    argv = ["docker", "import"]
    for change in spec.import_changes():
        argv += ["-c", change]
    argv += ["-", spec.name]
    # Output goes to a file: the CLI may write while we are still streaming its stdin.
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=out, env=env(**INFO.docker_env()))
        assert proc.stdin is not None
        try:
            images.write_rootfs(spec, proc.stdin)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # the CLI died early; its exit code and output say why
        try:
            proc.wait(timeout=CLI_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode != 0:
            out.seek(0)
            detail = out.read().decode(errors="replace").strip()
            raise LabError(f"docker import {spec.name} failed (exit {proc.returncode}): {detail}")
    if current is not None:
        # The replaced image is now untagged; drop it unless a container still uses it.
        engine("DELETE", f"/images/{current['Id']}")
    return "imported"


def ensure_images() -> str:
    """`up` step: the lab's images exist and match their recipes."""
    try:
        specs = [images.registry_spec(), images.socat_spec(), images.busybox_spec(), images.python_spec()]
        # Only when the socat18 step got it; that step has said why not.
        if socat18.version() is not None:
            specs.append(images.socat18_spec())
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        raise LabError(f"cannot assemble image root filesystems: {exc}") from exc
    done = ", ".join(f"{s.name} {_import_image(s)}" for s in specs)
    if socat18.version() is None:
        done += f", {INFO.socat18_image} NOT BUILT (no socat 1.8)"
    # The python stand-in also answers to the default helper list's first name (a tag: no copy).
    docker("tag", INFO.python_image, INFO.python_default_image)
    return f"{done}, {INFO.python_default_image} tagged"


def registry_ready(timeout: float = SERVICE_START_TIMEOUT) -> None:
    """Wait until the registry answers /v2/ on the namespace's loopback.

    :raises LabError: with the container's log if it does not.
    """
    ok, last = ns_http_ok(REGISTRY_PORT, "/v2/", timeout)
    if not ok:
        logs = docker("logs", "--tail", "15", REGISTRY_CONTAINER, check=False)
        raise LabError(
            f"registry not answering http://{INFO.registry_addr}/v2/ inside {NETNS} after "
            f"{timeout:.0f} s ({last}); container log:\n{logs.stdout}{logs.stderr}"
        )


def ensure_registry() -> str:
    """`up` step: the registry container runs (restart=always) and answers inside the namespace."""
    image = engine_json(f"/images/{INFO.registry_image}/json")
    if image is None:
        raise LabError(f"image {INFO.registry_image} missing")
    container = engine_json(f"/containers/{REGISTRY_CONTAINER}/json")
    action = "reused"
    if container is not None and container.get("Image") != image["Id"]:
        docker("rm", "-f", REGISTRY_CONTAINER)  # made from an older recipe
        container = None
    if container is not None and not container["State"]["Running"]:
        if docker("start", REGISTRY_CONTAINER, check=False).returncode == 0:
            action = "restarted"
        else:
            docker("rm", "-f", REGISTRY_CONTAINER)
            container = None
    if container is None:
        publish = f"127.0.0.1:{REGISTRY_PORT}:{REGISTRY_PORT}"
        docker("run", "-d", "--name", REGISTRY_CONTAINER, "--restart=always", "-p", publish, INFO.registry_image)
        action = "created"
    registry_ready()
    return f"{action} {REGISTRY_CONTAINER}, http://{INFO.registry_addr} inside {NETNS}"
