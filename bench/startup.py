"""How long a short `kci-tunneld` command takes, as a whole process, next to importing anyio (what any
anyio program pays before it does anything).

    python3 -m bench.startup                  # 20 runs of each command: print the table
    python3 -m bench.startup --runs 50 --write   # and rewrite docs/performance.md's "Start-up" section

The commands take turns (A B C D A B C D ...), so background load on a shared machine hits them
alike; each figure is the wall-clock time of one process from spawn to exit, and the table gives
the median (with min and max) and the ratio to the anyio import, and the same for the CPU time
each process used. Every command runs under this
interpreter (sys.executable): `python3` on PATH may be a wrapper script (pyenv's shim) whose own
start-up would swamp what is measured. Goal: `status` with no daemon running within 4x the anyio
import. A benchmark, not a test: nothing gates CI.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import report

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "performance.md"
NO_DAEMON = "/tmp/nonexistent-dir/ctl.sock"  # a directory that does not exist: nothing can answer there
GOAL = 4.0  # status with no daemon, against the anyio import


@dataclass
class Row:
    label: str  # as a person would type it
    args: list[str]  # after the interpreter
    expect: int  # its exit code
    seconds: list[float] = field(default_factory=list)  # wall clock, spawn to exit
    cpu: list[float] = field(default_factory=list)  # the process's user + system time

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.seconds)

    @property
    def cpu_ms(self) -> float:
        return 1000 * statistics.median(self.cpu)


def rows() -> list[Row]:
    return [
        Row("python3 -c pass", ["-c", "pass"], 0),
        Row('python3 -c "import anyio"', ["-c", "import anyio"], 0),
        Row("python3 -m tunneld --version", ["-m", "tunneld", "--version"], 0),
        Row(f"python3 -m tunneld status --control {NO_DAEMON}", ["-m", "tunneld", "status", "--control", NO_DAEMON],
            7),
    ]


BASELINE = 1  # the anyio import
STATUS = 3


def run_once(row: Row, env: dict[str, str]) -> tuple[float, float]:
    """One run: (wall-clock seconds, CPU seconds)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *row.args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)  # like wait(), plus the child's own CPU time
    took = time.perf_counter() - started
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code != row.expect:
        raise SystemExit(f"{row.label}: exit code {code}, expected {row.expect}")
    return took, usage.ru_utime + usage.ru_stime


def child_env(pycache: str | None) -> dict[str, str]:
    """The commands' environment. With ``pycache``, Python may cache bytecode (there, not in the
    work tree), as an installed package has it; without, every run compiles tunneld's sources."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "PYTHONDONTWRITEBYTECODE")}
    if pycache is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        env["PYTHONPYCACHEPREFIX"] = pycache
    return env


def measure(runs: int, env: dict[str, str]) -> list[Row]:
    """``runs`` timed rounds, each command once per round, after one untimed round (file cache, bytecode)."""
    table = rows()
    for row in table:
        run_once(row, env)
    for _ in range(runs):
        for row in table:
            wall, cpu = run_once(row, env)
            row.seconds.append(wall)
            row.cpu.append(cpu)
    return table


def markdown(table: Sequence[Row]) -> str:
    base, base_cpu = table[BASELINE].median_ms, table[BASELINE].cpu_ms
    lines = ["| command | median ms | min ms | max ms | vs `import anyio` | CPU ms (median) | CPU vs `import anyio` |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in table:
        lines.append(f"| `{row.label}` | {row.median_ms:.0f} | {1000 * min(row.seconds):.0f} | "
                     f"{1000 * max(row.seconds):.0f} | {row.median_ms / base:.2f}x | {row.cpu_ms:.0f} | "
                     f"{row.cpu_ms / base_cpu:.2f}x |")
    return "\n".join(lines)


def goal_line(table: Sequence[Row]) -> str:
    ratio = table[STATUS].median_ms / table[BASELINE].median_ms
    met = "met" if ratio <= GOAL else "NOT met"
    return (f"Goal: `kci-tunneld status` with no daemon within {GOAL:g}x the anyio import (wall clock, medians): "
            f"{ratio:.2f}x, {met}.")


def section(table: Sequence[Row], runs: int, command: str, load: tuple[float, ...], cached: bool) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return "\n".join([
        markdown(table),
        "",
        goal_line(table),
        "",
        f"- Measured {when} on {report.machine()}; load average before: "
        f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}.",
        f"- {runs} interleaved runs of each command, whole processes from spawn to exit, after one untimed "
        "round; every command under the same interpreter. `status` exits 7 (no daemon answers). CPU: the "
        "process's user + system time (wait4), which other people's load disturbs less than the wall clock.",
        "- Bytecode: " + ("cached, as pip's install leaves it (here in a temporary PYTHONPYCACHEPREFIX)."
                          if cached else "not cached (PYTHONDONTWRITEBYTECODE=1): every run compiles tunneld's "
                          "sources, as in a development checkout run that way."),
        f"- Command, from the repository root: `{command}`",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="timed runs of each command (default 20)")
    p.add_argument("--no-bytecode-cache", action="store_true",
                   help="run the commands with PYTHONDONTWRITEBYTECODE=1 (compile every time)")
    p.add_argument("--write", action="store_true", help="rewrite docs/performance.md's Start-up section")
    args = p.parse_args(argv)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kci-startup-pyc-") as pycache:
        table = measure(args.runs, child_env(None if args.no_bytecode_cache else pycache))
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python3 -m bench.startup", *(a for a in given if a != "--write")])  # what measured
    body = section(table, args.runs, command, load, cached=not args.no_bytecode_cache)
    print(body)
    if args.write:
        DOCS.write_text(report.replace_section(DOCS.read_text(), "startup", body))
        print(f"\nwrote {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
