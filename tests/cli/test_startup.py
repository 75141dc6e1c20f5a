"""Start-up stays light: ``--version``, the client commands (``status``, ``wait``, ``reload``,
``stop``, with and without a daemon) and a ``--via direct`` daemon never import the Docker, SSH or
Kubernetes client libraries; the client commands not PyYAML or importlib.metadata either.

Each case runs the command's own code (``tunneld.cli.main.main``) in a fresh interpreter, then
prints which of the watched modules it left loaded. asyncio imports ssl by itself, so ssl is not
watched. The last tests show the harness can fail: the docker transport's code path loads aiodocker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.cli.runner import Cli
from tests.servers import EchoServer

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("aiodocker", "aiohttp", "asyncssh", "kubernetes_asyncio")
CLIENT_LIGHT = (*HEAVY, "yaml", "importlib.metadata")

REPORT = """
import json as _json, sys as _sys
print("LOADED " + _json.dumps(sorted(m for m in WATCHED if m in _sys.modules)), flush=True)
"""


def loaded(code: str, *args: str, env: dict[str, str], watched: tuple[str, ...] = CLIENT_LIGHT,
           timeout: float = 60) -> tuple[str, set[str]]:
    """Run ``code`` (with ``args`` as sys.argv[1:]) in a fresh interpreter: its output, and which of
    ``watched`` it had imported when it ended."""
    script = f"WATCHED = {watched!r}\n" + textwrap.dedent(code) + REPORT
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout,
                            cwd=REPO, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("LOADED ")]
    assert lines, result.stdout + result.stderr
    return result.stdout, set(json.loads(lines[-1].removeprefix("LOADED ")))


def command(*argv: str) -> str:
    """Code that runs ``kci-tunneld ARGV`` in-process and prints its exit code."""
    return f"""
        from tunneld.cli.main import main
        try:
            code = main({list(argv)!r})
        except SystemExit as e:  # argparse's --version and --help
            code = e.code
        print("EXIT", code, flush=True)
    """


def test_version_loads_nothing_heavy(cli: Cli) -> None:
    out, found = loaded(command("--version"), env=cli.env)
    assert "kci-tunneld 0." in out and "EXIT 0" in out
    assert not found, found


def test_client_commands_without_a_daemon_load_nothing_heavy(cli: Cli) -> None:
    for args in (("status",), ("status", "--json"), ("wait", "--timeout", "1"), ("reload",), ("stop",)):
        out, found = loaded(command(*args, "--control", str(cli.control)), env=cli.env)
        assert "EXIT 7" in out, (args, out)
        assert not found, (args, found)


def test_client_commands_with_a_daemon_load_nothing_heavy(cli: Cli, echo_server: EchoServer) -> None:
    assert cli.start_detached("-L", f"127.0.0.1:0:127.0.0.1:{echo_server.port}").returncode == 0
    control = ("--control", str(cli.control))
    for args in (("status",), ("status", "--json"), ("wait", "--timeout", "10"), ("reload",), ("stop",)):
        out, found = loaded(command(*args, *control), env=cli.env)
        assert "EXIT 0" in out, (args, out)
        assert not found, (args, found)


def test_start_detach_waits_without_loading_anything_heavy(cli: Cli, echo_server: EchoServer) -> None:
    """The side of `start --detach` that spawns the daemon and waits for it (a CI step's own process)."""
    argv = ("start", "--detach", "-L", f"127.0.0.1:0:127.0.0.1:{echo_server.port}", "--control", str(cli.control))
    out, found = loaded(command(*argv), env=cli.env)
    cli.started.append(int(cli.status()["pid"]))
    assert "EXIT 0" in out and "kci-tunneld: ready" in out, out
    assert not found, found
    assert cli.run("stop").returncode == 0


# The daemon in the main thread, as `kci-tunneld start` runs it; a thread waits until the control
# socket says ready, sends one connection through the forward, then SIGTERMs the process: what the
# daemon loaded in its whole life is still in sys.modules when main() returns.
DAEMON = """
    import json, os, signal, socket, sys, threading, time
    from tunneld.cli.main import main

    control, forward = sys.argv[1], sys.argv[2]

    def stop_when_ready():
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.settimeout(15)
                        s.connect(control)
                        s.sendall(b'{"cmd": "wait", "timeout": 5}\\n')
                        reply = json.loads(s.makefile().readline())
                except OSError:
                    time.sleep(0.05)  # not listening yet
                    continue
                if reply.get("ok"):
                    with socket.create_connection(("127.0.0.1", reply["forwards"][0]["port"]), timeout=10) as c:
                        c.sendall(b"ping")
                        c.shutdown(socket.SHUT_WR)
                        print("ECHO", c.makefile("rb").read().decode(), flush=True)
                    break
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_ready, daemon=True).start()
    print("EXIT", main(["start", "-L", forward, "--control", control]), flush=True)
"""


def test_direct_daemon_loads_no_foreign_client_library(cli: Cli, echo_server: EchoServer) -> None:
    out, found = loaded(DAEMON, str(cli.control), f"127.0.0.1:0:127.0.0.1:{echo_server.port}", env=cli.env,
                        watched=HEAVY)
    assert "ECHO ping" in out and "EXIT 0" in out, out
    assert not found, found


def test_the_check_sees_a_heavy_import(cli: Cli) -> None:
    """The harness itself: the docker transport's code path does load aiodocker."""
    _, found = loaded("import tunneld.docker.api", env=cli.env)
    assert {"aiodocker", "aiohttp"} <= found
    chooser = """
        from tunneld.config import parse_config
        from tunneld.transports import create_transport

        config = parse_config({"transport": {"via": "docker"}})
        try:
            create_transport(config.transport, config.timeouts)
        except Exception as e:  # building it may want a Docker host: the import has happened by then
            print("create_transport:", e)
    """
    _, found = loaded(chooser, env=cli.env, watched=HEAVY)
    assert "aiodocker" in found, found
