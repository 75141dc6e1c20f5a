"""Drive the real `kci-tunneld` CLI as a subprocess, as a CI step would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


class Cli:
    """Runs ``python -m tunneld`` with a private control socket under ``tmp``."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.control = tmp / "control.sock"
        self.env = {**os.environ, **(env or {})}
        self.env.pop("NOTIFY_SOCKET", None)
        self.started: list[int] = []
        self.foreground: list[subprocess.Popen[str]] = []  # popen()'s: reaped, their pipes closed at cleanup

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tunneld", *args, "--control", str(self.control)],
            capture_output=True, text=True, timeout=timeout, env=self.env, stdin=subprocess.DEVNULL,
        )

    def start_detached(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = self.run("start", "--detach", *args, timeout=timeout)
        if result.returncode == 0:
            self.started.append(int(self.status()["pid"]))
        return result

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """A foreground daemon, for signal tests."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "tunneld", "start", *args, "--control", str(self.control)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env, stdin=subprocess.DEVNULL,
        )
        self.started.append(proc.pid)
        self.foreground.append(proc)
        return proc

    def status(self) -> dict[str, Any]:
        """The daemon's status; ready (exit 0) or not (4)."""
        result = self.run("status", "--json")
        assert result.returncode in (0, 4), result.stderr
        reply: dict[str, Any] = json.loads(result.stdout)
        return reply

    def wait_ready(self, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.run("wait", "--timeout", "1")
            if result.returncode == 0:
                return self.status()
            time.sleep(0.05)
        raise TimeoutError(f"daemon on {self.control} not ready in {timeout}s")

    def cleanup(self) -> None:
        """Stop what this test started, by pid."""
        for pid in self.started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.foreground:
            proc.wait(10)  # killed just above if it still ran
            if proc.stdout is not None:
                proc.stdout.close()
