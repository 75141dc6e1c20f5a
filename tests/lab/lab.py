"""The "remote Docker host" lab: a network namespace with its own dockerd, registry and sshd.

It reproduces the topology kci-tunneld exists for (CircleCI's remote Docker): the CI side
(this machine's own network namespace) reaches the Docker API (unix socket, and
tcp://10.213.77.2:2376 with TLS client certs) and SSH on the remote host, but NOT the
ports that the remote host publishes on its own 127.0.0.1 (the registry on :5000, an echo
service on :7007):

    host netns                              netns "kcilab" (the remote host)
    kcilab0 10.213.77.1/30  <--- veth --->  kcilab1 10.213.77.2/30
    /run/kcilab/docker.sock  <------------  dockerd  (+ tcp 10.213.77.2:2376, TLS)
                                            sshd     10.213.77.2:22
                                            registry 127.0.0.1:5000 (container, -p)
                                            echo     127.0.0.1:7007, [::1]:7007

`up()` is idempotent and repairs what a killed earlier run left behind; `down()` stops
only what the lab started (by pid file, checked against the command line, or by
membership of the lab's namespace). Needs root. Stdlib only, so it runs before any
project dependency is installed.

Use from tests: the `lab` fixture (tests/lab/fixture.py) returns `LabInfo`; `ns_exec`,
`docker`, `restart_dockerd`, `stop_sshd`/`start_sshd` drive the lab in fault tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from . import images, keys, procs, socat18
from .commands import docker, ip, locked, ns_argv, ns_exec, run, spawn, wait_for
from .dockerd import (
    dockerd_pid,
    ensure_dockerd,
    ensure_images,
    ensure_registry,
    registry_ready,
    start_dockerd,
    stop_dockerd,
)
from .layout import (
    CACHE_DIR,
    CERT_DIR,
    DATA_ROOT,
    DOCKER_SOCK,
    DOCKERD_PID,
    ECHO_LOG,
    ECHO_PID,
    ECHO_PORT,
    ECHO_SCRIPT,
    EXEC_ROOT,
    HOST_IP,
    HOST_VETH,
    INFO,
    LOCK_FILE,
    NETNS,
    NETNS_PATH,
    NS_EPHEMERAL,
    NS_IP,
    NS_VETH,
    PREFIX_LEN,
    PROCESS_STOP_TIMEOUT,
    REGISTRY_CONTAINER,
    REGISTRY_PORT,
    RUN_DIR,
    SERVICE_START_TIMEOUT,
    SSH_PORT,
    SSHD_PID,
    STATE_DIR,
    LabError,
    LabInfo,
)
from .probes import engine_json, in_netns, ns_http_ok, ping_tls, ping_unix, ssh_banner
from .sshd import ensure_sshd, sshd_pid, start_sshd, stop_sshd

__all__ = [
    "INFO",
    "LabError",
    "LabInfo",
    "docker",
    "down",
    "env_exports",
    "info",
    "ns_argv",
    "ns_exec",
    "ping_tls",
    "ping_unix",
    "restart_dockerd",
    "start_dockerd",
    "start_echo",
    "start_sshd",
    "status",
    "stop_dockerd",
    "stop_echo",
    "stop_sshd",
    "up",
]

Progress = Callable[[str], None]

# What `up` runs, with the Debian package that ships each, for a message a person can act on.
_TOOLS = {
    "ip": "iproute2",
    "nsenter": "util-linux",
    "dockerd": "docker.io",
    "containerd": "docker.io (containerd)",
    "runc": "docker.io (runc)",
    "docker": "docker.io (or docker-ce-cli)",
    "openssl": "openssl",
    "ssh-keygen": "openssh-client",
    "ssh": "openssh-client",
    "ldd": "libc-bin",
}
_FILES = {
    Path("/usr/sbin/sshd"): "openssh-server",
    images.REGISTRY: "docker-registry",
    images.SOCAT: "socat",
    images.BUSYBOX: "busybox-static",
}


# ---------------------------------------------------------------- steps of `up`


def _preflight() -> str:
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    missing = [f"{t} not found: apt-get install {p}" for t, p in _TOOLS.items() if not shutil.which(t, path=path)]
    missing += [f"{f} not found: apt-get install {p}" for f, p in _FILES.items() if not f.exists()]
    if not missing and not images.is_static(images.BUSYBOX):
        missing.append(f"{images.BUSYBOX} is not statically linked: apt-get install busybox-static")
    if missing:
        raise LabError("; ".join(missing))
    return "tools present"


def _netns_ok() -> bool:
    return ip("-n", NETNS, "link", "show", "lo", check=False).returncode == 0


def _link_ok(name: str, in_ns: bool) -> bool:
    where = ["-n", NETNS] if in_ns else []
    return ip(*where, "link", "show", name, check=False).returncode == 0


def _ensure_network() -> str:
    done = []
    if not _netns_ok():
        # A fresh namespace: daemons still alive from an earlier one are in the wrong place.
        _stop_daemons()
        ip("netns", "del", NETNS, check=False)  # a stale mount point without a namespace
        ip("netns", "add", NETNS)
        done.append(f"created netns {NETNS}")
    if not (_link_ok(HOST_VETH, in_ns=False) and _link_ok(NS_VETH, in_ns=True)):
        # Deleting one end deletes its peer, wherever that ended up.
        ip("link", "del", HOST_VETH, check=False)
        ip("-n", NETNS, "link", "del", NS_VETH, check=False)
        ip("link", "add", HOST_VETH, "type", "veth", "peer", "name", NS_VETH, "netns", NETNS)
        done.append(f"created veth {HOST_VETH}<->{NS_VETH}")
    # `replace` and `set up` are idempotent: re-applied every time, they repair half-done set-ups.
    ip("addr", "replace", f"{HOST_IP}/{PREFIX_LEN}", "dev", HOST_VETH)
    ip("link", "set", HOST_VETH, "up")
    ip("-n", NETNS, "addr", "replace", f"{NS_IP}/{PREFIX_LEN}", "dev", NS_VETH)
    ip("-n", NETNS, "link", "set", NS_VETH, "up")
    ip("-n", NETNS, "link", "set", "lo", "up")
    # dockerd picks a `-P` / `-p 0` port from its namespace's ephemeral range, and follow mode
    # (--auto=all) forwards it on the same number here: below this machine's own ephemeral range
    # (32768+), a random published port cannot collide with a test's client socket by chance.
    ip("netns", "exec", NETNS, "sysctl", "-q", "-w", f"net.ipv4.ip_local_port_range={NS_EPHEMERAL}")
    return ", ".join(done) or f"reused {NETNS} ({HOST_IP} <-> {NS_IP})"


def _ensure_tls() -> str:
    existed = (CERT_DIR / "wrong-client" / "key.pem").exists()
    try:
        keys.ensure_tls(CERT_DIR, NS_IP)
    except keys.KeyMaterialError as exc:
        raise LabError(str(exc)) from exc
    return f"{'reused' if existed else 'made'} CA, server, client, wrong-client in {CERT_DIR}"


def _echo_pid() -> int | None:
    return procs.read_pidfile(ECHO_PID, str(ECHO_PID))


def start_echo() -> int:
    """Start the echo service inside the namespace unless it runs; return its pid.

    :raises LabError: if it is not listening in time.
    """
    pid = _echo_pid()
    if pid is not None and in_netns(pid):
        return pid
    if pid is not None:
        procs.terminate([pid], PROCESS_STOP_TIMEOUT)
    ECHO_PID.unlink(missing_ok=True)
    hosts = ["--host", INFO.echo_host, "--host", INFO.echo_host6]
    argv = [sys.executable, str(ECHO_SCRIPT), "--pidfile", str(ECHO_PID), "--port", str(ECHO_PORT), *hosts]
    proc = spawn(argv, ECHO_LOG)
    # echo.py writes its pid file only once both listeners are bound.
    wait_for("echo", lambda: _echo_pid() is not None, SERVICE_START_TIMEOUT, proc, ECHO_LOG)
    return proc.pid


def stop_echo() -> int | None:
    """Stop the echo service; return the pid it had."""
    return procs.stop_pidfile(ECHO_PID, str(ECHO_PID), PROCESS_STOP_TIMEOUT)


def _ensure_echo() -> str:
    before = _echo_pid()
    pid = start_echo()
    state = "running" if pid == before else "started"
    return f"{state} (pid {pid}), {INFO.echo_host}:{ECHO_PORT} and [{INFO.echo_host6}]:{ECHO_PORT} inside {NETNS}"


def _stop_daemons() -> None:
    stop_sshd()
    stop_echo()
    stop_dockerd()


def _unmount_below(*roots: Path) -> int:
    """Lazily unmount what dockerd left mounted under `roots`; return the count.

    dockerd leaves a bind mount of its data root and namespace files under exec-root/netns
    even after a clean stop, and overlay mounts after a SIGKILL; they would pin removed
    namespaces and make --purge fail with EBUSY.
    """
    targets = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].replace("\\040", " ")
            if any(mnt == str(r) or mnt.startswith(f"{r}/") for r in roots):
                targets.append(mnt)
    for mnt in sorted(targets, key=len, reverse=True):  # deepest first
        run(["umount", "-l", mnt], check=False, timeout=30)
    return len(targets)


# ---------------------------------------------------------------- public entry points


def info() -> LabInfo:
    """The lab's addresses and paths (without checking that anything runs)."""
    return INFO


def up(progress: Progress | None = None) -> LabInfo:
    """Bring every lab component up, reusing what already runs; report one line per step.

    :raises LabError: naming the failing step and the reason.
    """
    say = progress or (lambda line: None)
    if os.geteuid() != 0:
        raise LabError("preflight: the lab needs root (network namespaces, dockerd, sshd)")
    steps: list[tuple[str, Callable[[], str]]] = [
        ("preflight", _preflight),
        ("network", _ensure_network),
        ("tls", _ensure_tls),
        ("dockerd", ensure_dockerd),
        ("socat18", socat18.ensure),
        ("images", ensure_images),
        ("registry", ensure_registry),
        ("echo", _ensure_echo),
        ("sshd", ensure_sshd),
    ]
    t0 = time.monotonic()
    with locked():
        for name, step in steps:
            started = time.monotonic()
            try:
                detail = step()
            except LabError as exc:
                raise LabError(f"{name}: {exc}") from exc
            say(f"kcilab {name:<9} {detail} [{time.monotonic() - started:.2f}s]")
    say(f"kcilab up in {time.monotonic() - t0:.1f}s")
    return INFO


def restart_dockerd() -> int:
    """Stop and start the lab's dockerd; return its new pid once the registry answers again.

    :raises LabError: if dockerd or the registry do not come back in time.
    """
    with locked():
        stop_dockerd()
        pid = start_dockerd()
        registry_ready()  # restart=always brings the container back
        return pid


def down(purge: bool = False, progress: Progress | None = None) -> None:
    """Stop what the lab started and remove its namespace; `purge` also drops the image store and the
    downloads.

    :raises LabError: if not root.
    """
    say = progress or (lambda line: None)
    if os.geteuid() != 0:
        raise LabError("the lab needs root")
    with locked():
        _stop_daemons()
        say("kcilab stopped sshd, echo, dockerd")
        inode = procs.netns_inode(NETNS_PATH)
        if inode is not None and _netns_ok():
            # What still runs in the lab's namespace came through the lab (a containerd
            # shim orphaned by a killed dockerd, a test's helper). Container processes hang
            # below the shims, in namespaces of their own, so take descendants too.
            own = {os.getpid(), os.getppid()}
            roots = [p for p in procs.pids_in_netns(inode) if p not in own]
            leftovers = list(dict.fromkeys(procs.descendants(roots) + roots))
            if leftovers:
                names = sorted(
                    {Path(procs.cmdline(p).split(b"\0")[0].decode(errors="replace")).name for p in leftovers}
                )
                procs.terminate(leftovers, PROCESS_STOP_TIMEOUT)
                say(f"kcilab ended {len(leftovers)} leftover process(es) in {NETNS}: {', '.join(names)}")
        ip("link", "del", HOST_VETH, check=False)
        ip("netns", "del", NETNS, check=False)
        say(f"kcilab removed netns {NETNS} and veth {HOST_VETH}")
        unmounted = _unmount_below(EXEC_ROOT, DATA_ROOT)
        if unmounted:
            say(f"kcilab unmounted {unmounted} mount(s) dockerd left behind")
        for stale in (DOCKERD_PID, SSHD_PID, ECHO_PID, DOCKER_SOCK):
            stale.unlink(missing_ok=True)
        if purge:
            shutil.rmtree(STATE_DIR, ignore_errors=True)
            shutil.rmtree(CACHE_DIR, ignore_errors=True)
            for child in RUN_DIR.iterdir():
                if child == LOCK_FILE:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
            say(f"kcilab purged {STATE_DIR}, {CACHE_DIR} and {RUN_DIR}")


def status() -> list[tuple[str, bool, str]]:
    """(component, ok, detail) for each part of the lab, without changing anything."""
    rows: list[tuple[str, bool, str]] = []
    ns = _netns_ok()
    rows.append(("netns", ns, f"{NETNS} at {NETNS_PATH}" if ns else f"{NETNS} missing"))
    veth = ns and _link_ok(HOST_VETH, False) and _link_ok(NS_VETH, True)
    pair = f"{HOST_VETH} {HOST_IP}/{PREFIX_LEN} <-> {NS_VETH} {NS_IP}/{PREFIX_LEN}"
    rows.append(("veth", veth, pair if veth else "missing"))
    pid, unix, tls = dockerd_pid(), ping_unix(), ping_tls()
    detail = f"pid {pid}, unix {'ok' if unix else 'down'}, tls {'ok' if tls else 'down'}"
    rows.append(("dockerd", bool(pid and unix and tls), detail))
    if unix:
        for name in (INFO.registry_image, INFO.socat_image, INFO.socat18_image, INFO.busybox_image,
                     INFO.python_image, INFO.python_default_image):
            present = engine_json(f"/images/{name}/json") is not None
            rows.append(("image", present, f"{name} {'present' if present else 'missing'}"))
        container = engine_json(f"/containers/{REGISTRY_CONTAINER}/json")
        running = bool(container and container["State"]["Running"])
        answers = ns and running and ns_http_ok(REGISTRY_PORT, "/v2/", 1.0)[0]
        detail = (
            f"{REGISTRY_CONTAINER} {'running' if running else 'not running'}, "
            f"http://{INFO.registry_addr}/v2/ {'answers' if answers else 'silent'} inside {NETNS}"
        )
        rows.append(("registry", bool(answers), detail))
    epid = _echo_pid()
    rows.append(("echo", epid is not None, f"pid {epid}, port {ECHO_PORT} inside {NETNS}"))
    spid = sshd_pid()
    banner = ssh_banner() if spid else None
    rows.append(("sshd", bool(spid and banner), f"pid {spid}, {NS_IP}:{SSH_PORT} {banner}"))
    return rows


def env_exports(tls: bool = False) -> str:
    """Shell lines that point docker clients at the lab (for `eval "$(... env)"`)."""
    env = INFO.docker_env(tls)
    lines = [f"export {k}={v}" for k, v in env.items()]
    lines += [f"unset {k}" for k in ("DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH") if k not in env]
    lines.append("unset DOCKER_CONTEXT")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `python3 -m tests.lab up|down [--purge]|status|env [--tls]`; progress goes to stderr."""
    parser = argparse.ArgumentParser(prog="python3 -m tests.lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="set up, reusing what runs (idempotent)")
    p_down = sub.add_parser("down", help="stop what the lab started and remove the namespace")
    p_down.add_argument("--purge", action="store_true", help=f"also remove {STATE_DIR}, {CACHE_DIR} and {RUN_DIR}")
    sub.add_parser("status", help="one line per component; exit 3 unless all are up")
    p_env = sub.add_parser("env", help="shell exports for docker clients (unix socket)")
    p_env.add_argument("--tls", action="store_true", help="tcp://IP:2376 with the client certs instead")
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        if args.cmd == "up":
            up(say)
        elif args.cmd == "down":
            down(args.purge, say)
        elif args.cmd == "status":
            rows = status()
            for name, ok, detail in rows:
                print(f"{'ok  ' if ok else 'DOWN'} {name:<9} {detail}")
            return 0 if all(ok for _, ok, _ in rows) else 3
        else:
            print(env_exports(args.tls))
    except LabError as exc:
        say(f"kcilab: {exc}")
        return 1
    return 0
