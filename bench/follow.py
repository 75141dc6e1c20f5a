"""Follow mode (``--auto=all``): from a container's start event to its forward being ready here.

Run from the repository root with the lab up (``python3 -m tests.lab up``), as root:

    python3 bench/follow.py                    # every row: 30 single starts + a burst of 50 each
    python3 bench/follow.py --rows docker      # just the docker transport with its default helper
    python3 bench/follow.py --restart-dockerd  # also: restart the lab's dockerd, time until every forward is back

Rows, one after another: ``docker`` (``--via docker`` over the lab's TCP+TLS, the default
helper image alpine/socat), ``docker-python`` (the same with the lab's python3 image as the
helper), ``ssh`` (``--via ssh://kcilab``: forwards over SSH, containers still followed over
DOCKER_HOST). For each row, a real daemon, ``python3 -m tunneld start --detach --auto=all
--auto-label kcibench.follow=<unique> --control DIR/c.sock`` with the lab's DOCKER_HOST
(TCP+TLS) in its environment; the label makes it follow only this run's containers (other
people's daemons and containers on the lab are left alone). Its helper container gets a name of
its own (``--config`` sets ``[transport.docker] helper_name``) and ``stop --cleanup`` removes it
at the end.

The containers: the lab's busybox image running ``nc -ll -p 8000 -e cat`` (an echo server;
``--server http``: the lab's python image running ``python3 -m http.server 8000``), published as
``-p 127.0.0.1::8000`` (a random port, which the daemon forwards on the same number here). They
are created through the Engine API (not timed), then started through it: one after another
(``--count``, each once the previous one's forward is ready) and then ``--burst`` at once (one
HTTPS request each, sent from as many threads, released together, as docker compose does).

Latency = the forward's first ``starting -> ready`` transition in ``status`` (its ``history``: the
forward listens here AND its first probe reached the container's port through the transport)
minus the engine's ``start`` event's ``timeNano``, collected by a ``docker events`` subprocess.
The daemon logs in JSON (``--log-format json``, millisecond timestamps), which splits the latency:
event delivered to the daemon, container inspected (the forward is worked out), listening, ready.
A container whose forward cannot bind its port here (another socket on this host has that
number: the daemon reports it as ``failed`` and retries) is left out of the figures and listed,
with what ``ss`` shows on the port. At the end every other container's port must answer here (an
echo round trip, or an HTTP GET) and match the port ``docker inspect`` shows.

``--restart-dockerd`` (off by default: it restarts the lab's dockerd, which other people may be
using) runs ``--restart-count`` containers with ``--restart always``, restarts dockerd
(``tests.lab.lab.restart_dockerd()``) and measures from dockerd answering ``/_ping`` again to every
forward being back (ready, on the container's port after the restart, which may have changed).

Every container the bench created (label ``kcibench.run=<unique>``) is removed at the end, and
the daemons it started are stopped, on errors and Ctrl-C too. It prints a markdown table and writes
it to bench/results/follow.md. A benchmark, not a test: nothing here gates anything.
"""

from __future__ import annotations

import argparse
import calendar
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.procstat import cpu_seconds  # noqa: E402
from bench.proxies import tunneld_argv  # noqa: E402
from bench.report import machine  # noqa: E402
from tests.lab.lab import LabInfo  # noqa: E402
from tests.lab.lab import info as lab_info  # noqa: E402

LABEL = "kcibench.follow"  # the daemon's selector: one value per row
RUN_LABEL = "kcibench.run"  # every container of this run, for the clean-up
PORT = 8000  # the port inside the containers
GOAL_P50, GOAL_P99, GOAL_RESTART = 0.100, 0.300, 1.0  # seconds, issue 15
READY_TIMEOUT = 30.0

# ---------------------------------------------------------------- the Engine, over TLS


class Engine:
    """The few Engine API calls the bench makes itself, each on its own HTTPS connection (threads)."""

    def __init__(self, lab: LabInfo) -> None:
        host, _, port = lab.docker_host_tcp.removeprefix("tcp://").partition(":")
        self.host, self.port = host, int(port)
        certs = lab.client_cert_dir
        self.ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        self.ctx.load_cert_chain(str(certs / "cert.pem"), str(certs / "key.pem"))

    def connect(self, timeout: float = 30) -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=timeout)
        conn.connect()  # the TLS handshake, before any timing
        return conn

    def call(self, method: str, path: str, body: Any = None, conn: http.client.HTTPSConnection | None = None,
             timeout: float = 30) -> Any:
        own = conn is None
        c = conn or self.connect(timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            c.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            resp = c.getresponse()
            raw = resp.read()
            if resp.status >= 400:
                raise RuntimeError(f"{method} {path}: {resp.status} {raw.decode(errors='replace').strip()}")
            return json.loads(raw) if raw.strip() else None
        finally:
            if own:
                c.close()

    def ping(self, timeout: float = 1.0) -> bool:
        try:
            c = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=timeout)
            try:
                c.request("GET", "/_ping")
                return c.getresponse().status == 200
            finally:
                c.close()
        except (OSError, http.client.HTTPException):
            return False

    def create(self, name: str, image: str, cmd: list[str], labels: dict[str, str], restart: bool = False) -> str:
        body = {"Image": image, "Cmd": cmd, "Labels": labels, "ExposedPorts": {f"{PORT}/tcp": {}},
                "HostConfig": {"PortBindings": {f"{PORT}/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]},
                               "RestartPolicy": {"Name": "always" if restart else "no"}}}
        return str(self.call("POST", f"/containers/create?name={quote(name)}", body)["Id"])

    def start(self, cid: str, conn: http.client.HTTPSConnection | None = None) -> None:
        self.call("POST", f"/containers/{cid}/start", conn=conn)

    def published_port(self, cid: str) -> int | None:
        ports = (self.call("GET", f"/containers/{cid}/json").get("NetworkSettings") or {}).get("Ports") or {}
        bindings = ports.get(f"{PORT}/tcp") or []
        return int(bindings[0]["HostPort"]) if bindings else None

    def remove_labelled(self, label: str) -> int:
        """Remove (force) every container carrying ``label`` (KEY=VALUE); returns how many."""
        filters = quote(json.dumps({"label": [label]}))
        ids = [c["Id"] for c in self.call("GET", f"/containers/json?all=1&filters={filters}") or []]

        def rm(cid: str) -> None:
            try:
                self.call("DELETE", f"/containers/{cid}?force=1&v=1", timeout=60)
            except (RuntimeError, OSError, http.client.HTTPException) as e:
                print(f"# could not remove {cid[:12]}: {e}", file=sys.stderr)

        threaded(rm, ids, workers=8)
        return len(ids)


def threaded(fn: Callable[[Any], Any], items: list[Any], workers: int) -> list[Any]:
    """``fn`` over ``items`` on ``workers`` threads; results in order; the first error is raised."""
    out: list[Any] = [None] * len(items)
    errors: list[BaseException] = []
    lock = threading.Lock()
    todo = list(enumerate(items))

    def work() -> None:
        while True:
            with lock:
                if not todo or errors:
                    return
                i, item = todo.pop(0)
            try:
                out[i] = fn(item)
            except BaseException as e:  # re-raised below, in the caller's thread
                with lock:
                    errors.append(e)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(max(1, min(workers, len(items))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


# ---------------------------------------------------------------- the start events


class Events:
    """``docker events`` for this run's container starts, in a subprocess: container id -> the
    seconds (epoch) of each ``start`` event's ``timeNano``. Restarted (with the same ``--since``)
    when the stream ends, as it does when dockerd restarts."""

    def __init__(self, env: dict[str, str], label: str) -> None:
        self.env, self.label = env, label
        self.since = f"{time.time() - 1:.3f}"
        self.starts: dict[str, list[float]] = {}
        self.cond = threading.Condition()
        self.proc: subprocess.Popen[str] | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.closed:
            self.proc = subprocess.Popen(
                ["docker", "events", "--since", self.since, "--filter", "type=container", "--filter", "event=start",
                 "--filter", f"label={self.label}", "--format", "{{json .}}"],
                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                at = int(ev.get("timeNano") or 0) / 1e9
                with self.cond:
                    seen = self.starts.setdefault(str(ev.get("id") or ev.get("ID") or ""), [])
                    if at not in seen:  # a restarted stream replays from --since
                        seen.append(at)
                    self.cond.notify_all()
            self.proc.wait()
            if not self.closed:
                time.sleep(0.2)

    def wait(self, cid: str, count: int = 1, timeout: float = 10.0) -> list[float]:
        """The first ``count`` start times of ``cid`` (raises if they do not come)."""
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.starts.get(cid, ())) >= count, timeout):
                raise RuntimeError(f"no start event for container {cid[:12]} within {timeout:g}s")
            return sorted(self.starts[cid])

    def close(self) -> None:
        self.closed = True
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.thread.join(10)


# ---------------------------------------------------------------- the daemon


@dataclass
class Daemon:
    row: str
    control: Path
    log: Path
    env: dict[str, str]
    pid: int = 0

    def status(self) -> dict[str, Any]:
        """``status --json``'s reply, straight from the control socket (one JSON line each way):
        a ``python3 -m tunneld status`` process per poll would cost ~0.1 s of CPU, on the cores the
        daemon is measured on."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(self.control))
            s.sendall(b'{"cmd": "status"}\n')
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                buf += chunk
        return dict(json.loads(buf))

    def status_cli(self) -> dict[str, Any]:
        out = subprocess.run([*tunneld_argv(), "status", "--json", "--control", str(self.control)], env=self.env,
                             cwd=ROOT, capture_output=True, timeout=30)
        return dict(json.loads(out.stdout))


ROWS = {  # key -> (label in the table, --via, helper image (None: the daemon's default))
    "docker": ("docker over TCP+TLS", None, None),
    "docker-python": ("docker over TCP+TLS, python3 helper", None, "python"),
    "ssh": ("ssh (`--via ssh://kcilab`)", "ssh", None),
}


@contextmanager
def daemon(lab: LabInfo, row: str, selector: str, workdir: Path, env: dict[str, str],
           log_level: str = "info") -> Iterator[Daemon]:
    """``kci-tunneld start --detach --auto=all --auto-label SELECTOR``; ``stop --cleanup`` after."""
    _, via, helper = ROWS[row]
    d = workdir / row
    d.mkdir()
    toml = d / "bench.toml"
    image = lab.python_image if helper == "python" else lab.socat_image
    toml.write_text(f'[transport.docker]\nhelper_name = "kci-bench-follow-{uuid.uuid4().hex[:8]}"\n'
                    f'helper_image = "{image}"\n'
                    f'[transport.ssh]\nconfig_file = "{lab.ssh_config}"\n')
    dm = Daemon(row, d / "c.sock", d / "tunneld.log", env)
    argv = [*tunneld_argv(), "start", "--detach", "--auto=all", "--auto-label", selector, "--config", str(toml),
            "--control", str(dm.control), "--log-format", "json", "--log-file", str(dm.log), "--log-level", log_level]
    if via == "ssh":
        argv += ["--via", f"ssh://{lab.ssh_alias}"]
    out = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if out.returncode:
        raise RuntimeError(f"start failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    try:
        dm.pid = int(dm.status()["pid"])
        yield dm
    finally:
        subprocess.run([*tunneld_argv(), "stop", "--cleanup", "--now", "--control", str(dm.control)], env=env,
                       cwd=ROOT, timeout=120, stdout=subprocess.DEVNULL)


# ---------------------------------------------------------------- one container's figures


@dataclass
class Sample:
    name: str
    cid: str
    event_at: float = 0.0  # the engine's start event (epoch s)
    ready_at: float = 0.0  # the forward's first starting -> ready (epoch s)
    port: int = 0
    stages: dict[str, float] = field(default_factory=dict)  # from the daemon's log: stage -> epoch s
    failed: str = ""  # the forward failed instead (its port taken here): why, and who held the port

    @property
    def latency(self) -> float:
        return self.ready_at - self.event_at


def forwards_by_container(status: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for f in status.get("forwards") or []:
        out.setdefault(str(f.get("container") or ""), []).append(f)
    return out


def ready_at(fwd: dict[str, Any], after: float = 0.0) -> float | None:
    """When ``fwd`` first went to ready (after ``after``), from its history."""
    for h in fwd.get("history") or []:
        if h.get("to") == "ready" and float(h["at"]) >= after:
            return float(h["at"])
    if fwd.get("state") == "ready" and float(fwd.get("state_since") or 0) >= after:
        return float(fwd["state_since"])
    return None


def wait_ready(dm: Daemon, samples: list[Sample], first_poll: float, every: float,
               timeout: float = READY_TIMEOUT) -> dict[str, Any]:
    """Poll status until each sample's container has a ready forward; fill ``ready_at``/``port``."""
    time.sleep(first_poll)
    deadline = time.monotonic() + timeout
    while True:
        status = dm.status()
        by = forwards_by_container(status)
        pending = []
        for s in samples:
            if s.ready_at:
                continue
            for f in by.get(s.name, []):
                at = ready_at(f)
                if at is not None:
                    s.ready_at, s.port = at, int(f["port"])
                    break
                if f.get("state") == "failed":  # its port is taken here (the daemon retries the bind)
                    s.port, s.failed = int(f["port"]), f"{f.get('last_error')}; {holders(int(f['port']))}"
                    break
            else:
                pending.append(s)
        if not pending:
            return status
        if time.monotonic() > deadline:
            auto = status.get("auto") or {}
            raise RuntimeError(f"{len(pending)} forward(s) not ready after {timeout:g}s, e.g. {pending[0].name}: "
                               f"forwards {by.get(pending[0].name)}; conflicts {auto.get('conflicts')}; "
                               f"recent events {(auto.get('events') or [])[-5:]}")
        time.sleep(every)


def holders(port: int) -> str:
    """Who has ``port`` on this host's loopback now (ss), for a forward that could not bind it."""
    out = subprocess.run(["ss", "-Htanp", f"sport = :{port}"], capture_output=True, text=True, timeout=10).stdout
    lines = [" ".join(line.split()) for line in out.splitlines()]
    return "ss: " + (" | ".join(lines[:4]) if lines else "nothing holds it any more")


STAGES = ("delivered", "inspected", "listening", "ready")


def log_stages(log: Path, samples: list[Sample]) -> None:
    """Each sample's stage times from the daemon's JSON log: the event delivered ("auto: container
    NAME started"), inspected and worked out ("auto: found container NAME publishing"), the
    forward listening, its first probe through ("state starting -> ready")."""
    by_name = {s.name: s for s in samples}
    by_fwd = {f"{s.name}:{s.port}": s for s in samples}
    for line in log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
            ts = rec["ts"]
            # the log truncates to the millisecond: +0.5 ms is the middle of the interval
            at = calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + int(ts[20:23]) / 1000 + 0.0005
        except (ValueError, KeyError, TypeError):
            continue
        msg = str(rec.get("msg") or "")
        if msg.startswith("auto: container ") and msg.endswith(" started"):
            s = by_name.get(msg[len("auto: container "):-len(" started")])
            if s:
                s.stages.setdefault("delivered", at)
        elif msg.startswith("auto: found container "):
            s = by_name.get(msg[len("auto: found container "):].split(" ", 1)[0])
            if s:
                s.stages.setdefault("inspected", at)
        elif (s := by_fwd.get(str(rec.get("forward") or ""))) is not None:
            if msg.startswith("listening on"):
                s.stages.setdefault("listening", at)
            elif msg == "state starting -> ready":
                s.stages.setdefault("ready", at)


def answers(port: int, server: str) -> str | None:
    """None when localhost:PORT answers like the container's server does; else what went wrong."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.settimeout(10)
            if server == "http":
                s.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
                head = s.recv(64)
                return None if head.startswith(b"HTTP/1.0 200") else f"answered {head[:30]!r}"
            s.sendall(b"kcibench\n")
            got = b""
            while len(got) < 9:
                chunk = s.recv(64)
                if not chunk:
                    break
                got += chunk
            return None if got == b"kcibench\n" else f"echoed {got!r}"
    except OSError as e:
        return str(e)


# ---------------------------------------------------------------- the runs


@dataclass
class RowResult:
    row: str
    single: list[Sample] = field(default_factory=list)
    burst: list[Sample] = field(default_factory=list)
    restart: float | None = None  # seconds from /_ping answering again to every forward back
    restart_note: str = ""
    problems: list[str] = field(default_factory=list)
    collided: list[Sample] = field(default_factory=list)  # not measured: the port was taken here
    cpu: dict[str, float] = field(default_factory=dict)  # "single"/"burst" -> the daemon's CPU s in that phase


def container_cmd(lab: LabInfo, server: str) -> tuple[str, list[str]]:
    if server == "http":
        return lab.python_image, ["python3", "-m", "http.server", str(PORT)]
    return lab.busybox_image, ["nc", "-ll", "-p", str(PORT), "-e", "cat"]


def run_row(lab: LabInfo, engine: Engine, row: str, run_id: str, args: argparse.Namespace, workdir: Path,
            env: dict[str, str]) -> RowResult:
    selector = f"{LABEL}={run_id}-{row}"
    labels = {LABEL: f"{run_id}-{row}", RUN_LABEL: run_id}
    image, cmd = container_cmd(lab, args.server)
    res = RowResult(row)
    events = Events(env, selector)
    prefix = f"kcibench-{run_id}-{row}"
    try:
        with daemon(lab, row, selector, workdir, env, args.log_level) as dm:
            def say(text: str) -> None:
                print(f"# {row}: {text}", file=sys.stderr, flush=True)

            def make(names: list[str], restart: bool = False) -> list[Sample]:
                ids = threaded(lambda n: engine.create(n, image, cmd, labels, restart), names, workers=4)
                return [Sample(n, cid) for n, cid in zip(names, ids, strict=True)]

            # ---- single starts, one after another
            say(f"{args.count} single starts")
            singles = make([f"{prefix}-s{i}" for i in range(args.count)])
            cpu0 = cpu_seconds([dm.pid])
            for s in singles:
                time.sleep(args.gap)  # the previous container's start-up (its process, runc) is over
                engine.start(s.cid)
                wait_ready(dm, [s], first_poll=0.05, every=0.025)
                s.event_at = events.wait(s.cid)[0]
            res.cpu["single"] = cpu_seconds([dm.pid]) - cpu0
            res.single = [s for s in singles if not s.failed]
            res.collided += [s for s in singles if s.failed]

            # ---- a burst: every start request sent at once
            if args.burst:
                say(f"a burst of {args.burst}")
                burst = make([f"{prefix}-b{i}" for i in range(args.burst)])
                time.sleep(max(args.gap, 1.0))
                conns = threaded(lambda _: engine.connect(), list(range(len(burst))), workers=8)
                barrier = threading.Barrier(len(burst))
                cpu0 = cpu_seconds([dm.pid])

                def go(i: int) -> None:
                    barrier.wait()
                    engine.start(burst[i].cid, conn=conns[i])

                try:
                    threaded(go, list(range(len(burst))), workers=len(burst))
                finally:
                    for c in conns:
                        c.close()
                wait_ready(dm, burst, first_poll=0.1, every=0.1)
                res.cpu["burst"] = cpu_seconds([dm.pid]) - cpu0
                for s in burst:
                    s.event_at = events.wait(s.cid)[0]
                res.burst = [s for s in burst if not s.failed]
                res.collided += [s for s in burst if s.failed]

            # ---- the set answers here, on the ports docker shows
            everyone = res.single + res.burst
            say(f"checking that the {len(everyone)} ports answer here")
            for s in everyone:
                want = engine.published_port(s.cid)
                if want != s.port:
                    res.problems.append(f"{s.name}: forwarded on {s.port}, docker publishes it on {want}")
                why = answers(s.port, args.server)
                if why:
                    res.problems.append(f"{s.name}: localhost:{s.port} does not answer: {why}")
            status = dm.status_cli()  # the CLI's view too, once
            if len([f for f in status.get("forwards") or [] if f.get("state") == "ready"]) < len(everyone):
                res.problems.append("`status --json` shows fewer ready forwards than containers")
            log_stages(dm.log, everyone)

            if args.restart_dockerd:
                say("restarting the lab's dockerd")
                engine.remove_labelled(f"{LABEL}={run_id}-{row}")
                time.sleep(1)
                res.restart, res.restart_note = restart_dockerd(lab, engine, dm, events, make, prefix, args)
    finally:
        events.close()
        if args.keep_logs:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            log = workdir / row / "tunneld.log"
            if log.exists():
                shutil.copy(log, args.keep_logs / f"follow-{run_id}-{row}.log")
        removed = engine.remove_labelled(f"{RUN_LABEL}={run_id}")
        print(f"# {row}: removed {removed} container(s)", file=sys.stderr, flush=True)
    return res


def restart_dockerd(lab: LabInfo, engine: Engine, dm: Daemon, events: Events,
                    make: Callable[..., list[Sample]], prefix: str, args: argparse.Namespace) -> tuple[float, str]:
    """Containers with ``--restart always``, dockerd restarted: seconds from ``/_ping`` answering again
    until every forward is back: ready, on the port docker shows for the container once it runs
    again (its second ``start`` event), and no earlier than that start."""
    from tests.lab import lab as lab_module

    kept = make([f"{prefix}-r{i}" for i in range(args.restart_count)], restart=True)
    for s in kept:
        engine.start(s.cid)
    wait_ready(dm, kept, first_poll=0.1, every=0.1)
    taken = [f"{s.name} before the restart: {s.failed}" for s in kept if s.failed]  # left out
    kept = [s for s in kept if not s.failed]
    if not kept:
        raise RuntimeError("every kept container's port is taken here: " + "; ".join(taken))
    before = {s.name: s.port for s in kept}
    done = threading.Event()
    failure: list[BaseException] = []

    def restart() -> None:
        try:
            lab_module.restart_dockerd()
        except BaseException as e:  # reported by the caller
            failure.append(e)
        finally:
            done.set()

    threading.Thread(target=restart, daemon=True).start()
    deadline = time.monotonic() + 120
    while engine.ping(0.5) and not done.is_set():  # until it is down
        if time.monotonic() > deadline:
            raise RuntimeError("dockerd still answers /_ping 120 s after the restart began")
        time.sleep(0.01)  # a new TLS connection each: 10 ms apart is plenty against a 1 s goal
    down_at = time.time()
    while not engine.ping(0.5):
        if time.monotonic() > deadline:
            raise RuntimeError("dockerd did not answer /_ping again within 120 s")
        time.sleep(0.01)  # a new TLS connection each: 10 ms apart is plenty against a 1 s goal
    ping_at = time.time()
    # each container runs again (restart=always: its second start event), on the port docker shows now
    want: dict[str, int] = {}
    started: dict[str, float] = {}
    for s in kept:
        started[s.name] = events.wait(s.cid, 2, timeout=max(1.0, deadline - time.monotonic()))[1]
        port = engine.published_port(s.cid)
        if not port:
            raise RuntimeError(f"{s.name} runs again but publishes no port")
        want[s.name] = port
    back: dict[str, float] = {}
    while len(back) < len(kept):
        by = forwards_by_container(dm.status())
        for s in kept:
            if s.name in back:
                continue
            for f in by.get(s.name, []):
                if int(f["port"]) == want[s.name] and f.get("state") == "failed":  # the new port is taken here
                    taken.append(f"{s.name} after the restart: {f.get('last_error')}; {holders(want[s.name])}")
                    back[s.name] = float("nan")
                    break
                if int(f["port"]) != want[s.name] or f.get("state") != "ready":
                    continue
                # a new port: a new forward; the same port: the forward lingered, maybe went degraded
                # while the container was down and ready again: the last time it became ready counts
                readies = [float(h["at"]) for h in f.get("history") or [] if h.get("to") == "ready"
                           and float(h["at"]) >= down_at]
                back[s.name] = max([started[s.name], *readies[-1:]])
        if len(back) < len(kept):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(back)} of {len(kept)} forwards back within 120 s of the restart")
            time.sleep(0.02)
    done.wait(120)
    if failure:
        raise RuntimeError(f"restart_dockerd failed: {failure[0]}")
    moved = sum(want[n] != before[n] for n in want)
    back = {n: at for n, at in back.items() if at == at}  # not NaN: not taken here
    if not back:
        raise RuntimeError("every kept container's port is taken here: " + "; ".join(taken))
    bad = [f"{s.name}: {why}" for s in kept if s.name in back and (why := answers(want[s.name], args.server))]
    slowest = max(back, key=lambda n: back[n])
    note = (f"{len(back)} containers with --restart always counted ({len(taken)} left out, their port taken "
            f"here: {'; '.join(taken) or '-'}), {moved} on a new port after; dockerd down "
            f"{ms(ping_at - down_at)} ms; containers running again {ms(min(started.values()) - ping_at)} to "
            f"{ms(max(started.values()) - ping_at)} ms after /_ping answered; the last forward back: {slowest} "
            f"(+{ms(back[slowest] - ping_at)} ms); "
            + (f"NOT answering: {'; '.join(bad)}" if bad else "all answer here after"))
    return back[slowest] - ping_at, note


# ---------------------------------------------------------------- report


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q / 100))]


def ms(x: float) -> str:
    return f"{x * 1000:.1f}" if abs(x) < 1 else f"{x * 1000:.0f}"


def stage_split(samples: list[Sample]) -> str:
    """Medians of each stage's share, from the log (ms resolution): event -> delivered -> inspected ->
    listening -> ready."""
    full = [s for s in samples if all(k in s.stages for k in STAGES)]
    if not full:
        return "no split (the log lines were not found)"
    parts = []
    names = {"delivered": "event delivered", "inspected": "inspect + work out", "listening": "bind",
             "ready": "first probe"}
    prev: str | None = None
    for k in STAGES:
        took = [s.stages[k] - (s.stages[prev] if prev else s.event_at) for s in full]
        parts.append(f"{names[k]} {ms(statistics.median(took))}")
        prev = k
    return " + ".join(parts) + f" (medians, ms, {len(full)} samples)"


def table(results: list[RowResult], n_single: int, n_burst: int) -> str:
    lines = ["| start event -> forward ready (ms) | " + " | ".join(ROWS[r.row][0] for r in results) + " |",
             "|---|" + "---:|" * len(results)]

    def add(label: str, get: Callable[[RowResult], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(get(r) for r in results) + " |")

    def stat(which: str, fn: Callable[[list[float]], float]) -> Callable[[RowResult], str]:
        return lambda r: ms(fn([s.latency for s in getattr(r, which)])) if getattr(r, which) else "-"

    add(f"single starts ({n_single}), p50", stat("single", statistics.median))
    add(f"single starts ({n_single}), p99", stat("single", lambda x: pct(x, 99)))
    add(f"single starts ({n_single}), max", stat("single", max))
    if n_burst:
        add(f"burst of {n_burst}, p50", stat("burst", statistics.median))
        add(f"burst of {n_burst}, p99", stat("burst", lambda x: pct(x, 99)))
        add(f"burst of {n_burst}, max", stat("burst", max))
        add(f"burst of {n_burst}, first start event -> last forward ready",
            lambda r: ms(max(s.ready_at for s in r.burst) - min(s.event_at for s in r.burst)) if r.burst else "-")
    add("containers left out: their port was taken here (see below)", lambda r: str(len(r.collided)))
    if any(r.restart is not None for r in results):
        add("dockerd restarted: /_ping answers -> every forward back",
            lambda r: ms(r.restart) if r.restart is not None else "-")
    return "\n".join(lines)


def goal_lines(results: list[RowResult]) -> list[str]:
    out: list[str] = []
    for r in results:
        name = ROWS[r.row][0]
        left = [s.name.rsplit("-", 1)[-1][0] for s in r.collided]  # "s3": a single start, "b7": the burst's
        for which, samples, missing in (("single starts", r.single, left.count("s")),
                                        ("burst of {}", r.burst, left.count("b"))):
            if not samples:
                continue
            which = which.format(len(samples) + missing) + (f" ({len(samples)} measured)" if missing else "")
            lat = [s.latency for s in samples]
            for what, got, want in (("p50", statistics.median(lat), GOAL_P50), ("p99", pct(lat, 99), GOAL_P99)):
                out.append(f"- {name}: {'met' if got <= want else 'NOT met'}: {which}, {what} <= "
                           f"{want * 1000:.0f} ms (measured {ms(got)} ms)")
        if r.restart is not None:
            out.append(f"- {name}: {'met' if r.restart <= GOAL_RESTART else 'NOT met'}: back within "
                       f"{GOAL_RESTART:g} s of dockerd answering after a restart (measured {ms(r.restart)} ms)")
    return out


def environment() -> str:
    load = os.getloadavg()
    return f"{machine()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"comma-separated, run one after another (default: {','.join(ROWS)})")
    p.add_argument("--count", type=int, default=30, help="single starts, one after another (default 30)")
    p.add_argument("--burst", type=int, default=50, help="containers started at once (default 50; 0: none)")
    p.add_argument("--gap", type=float, default=0.3, help="seconds of quiet before each single start (default 0.3)")
    p.add_argument("--server", choices=("nc", "http"), default="nc",
                   help="what the containers run: nc (busybox `nc -ll -e cat`, default) or http (python3 -m "
                   "http.server, in the lab's python image)")
    p.add_argument("--restart-dockerd", action="store_true",
                   help="also restart the LAB'S dockerd (everyone's!), once per row; time until the forwards are back")
    p.add_argument("--restart-count", type=int, default=10, help="containers kept across the restart (default 10)")
    p.add_argument("--log-level", choices=("debug", "info"), default="info",
                   help="the daemons' log level (default info, which has every line the split needs)")
    p.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy each daemon's JSON log into DIR")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/results/follow.md alone")
    args = p.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    if not rows or set(rows) - set(ROWS):
        p.error(f"--rows: a comma-separated list of {', '.join(ROWS)}")
    lab = lab_info()
    if not (Path(lab.netns_path).exists() and Path(lab.docker_sock).exists()):
        print("the lab is not up: run `python3 -m tests.lab up` first", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env.update(lab.docker_env(tls=True))
    env["PYTHONPATH"] = str(ROOT)
    engine = Engine(lab)
    run_id = uuid.uuid4().hex[:8]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    before = environment()
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM cleans up as Ctrl-C does
    results: list[RowResult] = []
    with tempfile.TemporaryDirectory(prefix="kci-bench-follow-") as tmp:
        env["DOCKER_CONFIG"] = str(Path(tmp) / "docker-config")  # no stray contexts
        try:
            for row in rows:
                results.append(run_row(lab, engine, row, run_id, args, Path(tmp), env))
        except KeyboardInterrupt:
            print("# interrupted; cleaned up", file=sys.stderr)
            return 130
        finally:
            engine.remove_labelled(f"{RUN_LABEL}={run_id}")
    argv_text = " ".join(["python3 bench/follow.py", *(argv if argv is not None else sys.argv[1:])])
    what = ("busybox `nc -ll -p 8000 -e cat`" if args.server == "nc" else "python3 -m http.server 8000") + \
        " published as `-p 127.0.0.1::8000`"
    report = [
        table(results, args.count, args.burst), "",
        *goal_lines(results), "",
        *[f"- {ROWS[r.row][0]}, where the time goes, single starts: {stage_split(r.single)}" for r in results],
        *[f"- {ROWS[r.row][0]}, where the time goes, burst: {stage_split(r.burst)}" for r in results if r.burst],
        *[f"- {ROWS[r.row][0]}, the daemon's CPU (user+system, its status answers to the bench's polls "
          f"included): " + ", ".join(f"{ms(r.cpu[k] / n)} ms per container in the {k} phase" for k, n in
                                     (("single", args.count), ("burst", args.burst)) if k in r.cpu and n)
          for r in results if r.cpu],
        *[f"- {ROWS[r.row][0]}, dockerd restart: {r.restart_note}" for r in results if r.restart_note],
        *[f"- {ROWS[r.row][0]}: PROBLEM: {x}" for r in results for x in r.problems],
        *[f"- {ROWS[r.row][0]}: not measured, {s.name} (port {s.port}): the forward failed: {s.failed}"
          for r in results for s in r.collided],
        *[f"- {ROWS[r.row][0]}, slowest single starts: " + ", ".join(
            f"{ms(s.latency)} ms ({', '.join(f'{k} +{ms(s.stages[k] - s.event_at)}' for k in STAGES if k in s.stages)})"
            for s in sorted(r.single, key=lambda s: -s.latency)[:3]) for r in results if r.single],
        "",
        f"Measured {started} with `{argv_text}`: containers of the lab's images ({what}), started through the "
        f"Engine API over TLS: {args.count} one after another ({args.gap:g} s apart, each once the previous "
        f"forward was ready), then {args.burst} at once; latency = the forward's first `starting -> ready` in "
        "`status` (listening here, first probe through the transport reached the port) minus the `start` event's "
        "`timeNano`. Split: the daemon's JSON log lines (ms timestamps).",
        f"Before: {before}.", f"After: {environment()}.",
    ]
    text = "\n".join(report)
    print(text)
    if not args.no_write:
        out = ROOT / "bench" / "results" / "follow.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("# follow mode: start event -> forward ready\n\n" + text + "\n")
        print(f"# written to {out.relative_to(ROOT)}", file=sys.stderr)
    return 0 if not any(r.problems for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
