"""Turn results into the markdown table, the goal check, the plot, and docs/performance.md's sections."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bench.metrics import Result

DIRECT = "kci-tunneld --via direct"
SOCAT = "socat"
NO_PROXY = "no proxy"
RSS_GOAL_MIB = 300.0

_COLUMNS: list[tuple[str, Callable[[Result], float | int | None], str]] = [
    ("1 stream GB/s", lambda r: r.gbps_1, "{:.2f}"),
    ("8 streams GB/s", lambda r: r.gbps_8, "{:.2f}"),
    ("RTT p50 µs", lambda r: r.rtt_p50_us, "{:.0f}"),
    ("RTT p99 µs", lambda r: r.rtt_p99_us, "{:.0f}"),
    ("conn/s, 1 client", lambda r: r.conns_1, "{:.0f}"),
    ("conn/s, 32 clients", lambda r: r.conns_32, "{:.0f}"),
    ("CPU s/GiB", lambda r: r.cpu_s_per_gib, "{:.2f}"),
    ("idle conns", lambda r: r.idle_open, "{:d}"),
    ("RSS MiB", lambda r: r.idle_rss_mib, "{:.0f}"),
    ("PSS MiB", lambda r: r.idle_pss_mib, "{:.0f}"),
]


def table(results: Sequence[Result]) -> str:
    """One row per proxy, one column per metric; '-' where not measured."""
    head = "| proxy | " + " | ".join(c[0] for c in _COLUMNS) + " | note |"
    sep = "|---|" + "---:|" * len(_COLUMNS) + "---|"
    lines = [head, sep]
    for r in results:
        cells = []
        for _, get, fmt in _COLUMNS:
            v = get(r)
            cells.append("-" if v is None else fmt.format(v))
        lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {r.note} |")
    return "\n".join(lines)


@dataclass
class Goal:
    text: str
    ratio: float | None  # what was measured, as the goal states it
    target: str
    met: bool | None  # None: not measured


def goals(results: Sequence[Result], idle_target: int) -> list[Goal]:
    """The direct path's goals (against socat and no proxy), each as a ratio measured in this one run."""
    by = {r.name: r for r in results}
    d, s, n = by.get(DIRECT), by.get(SOCAT), by.get(NO_PROXY)
    out: list[Goal] = []

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def check(text: str, value: float | None, target: str, ok: Callable[[float], bool]) -> None:
        out.append(Goal(text, value, target, None if value is None else ok(value)))

    if d is None:
        return out
    s = s or Result(SOCAT)
    n = n or Result(NO_PROXY)
    check("1-stream throughput vs socat", ratio(d.gbps_1, s.gbps_1), ">= 2x", lambda v: v >= 2)
    check("1-stream throughput vs no proxy", ratio(d.gbps_1, n.gbps_1), ">= 0.5x", lambda v: v >= 0.5)
    check("RTT p50 vs socat", ratio(d.rtt_p50_us, s.rtt_p50_us), "<= 1x", lambda v: v <= 1)
    check("new conn/s, 1 client, vs socat", ratio(d.conns_1, s.conns_1), ">= 2x", lambda v: v >= 2)
    check("new conn/s, 32 clients, vs socat", ratio(d.conns_32, s.conns_32), ">= 2x", lambda v: v >= 2)
    check("CPU per GiB vs socat", ratio(d.cpu_s_per_gib, s.cpu_s_per_gib), "<= 0.5x", lambda v: v <= 0.5)
    rss = d.idle_rss_mib
    if rss is not None and d.idle_open:
        # Scaled to the goal's 10,000 when the fd limit forced fewer (per-connection cost is linear).
        rss = d.idle_base_mib + (rss - d.idle_base_mib) * idle_target / d.idle_open if d.idle_base_mib else rss
    check(f"RSS with {idle_target:,} idle connections (MiB)", rss, f"<= {RSS_GOAL_MIB:.0f}",
          lambda v: v <= RSS_GOAL_MIB)
    return out


def goals_markdown(gs: Sequence[Goal]) -> str:
    lines = ["| goal (direct path) | measured | target | met |", "|---|---:|---|---|"]
    for g in gs:
        value = "-" if g.ratio is None else (f"{g.ratio:.0f}" if "MiB" in g.text else f"{g.ratio:.2f}x")
        met = "not measured" if g.met is None else ("yes" if g.met else "**no**")
        lines.append(f"| {g.text} | {value} | {g.target} | {met} |")
    return "\n".join(lines)


def machine() -> str:
    """Where the numbers came from: CPU model, cores, kernel, Python, uvloop."""
    model = "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        uv = version("uvloop")
    except PackageNotFoundError:
        uv = "not installed"
    return (f"{model}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
            f"uvloop {uv}")


def tool_versions() -> str:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return "?"
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "?"

    socat = next((line.strip() for line in _lines(["socat", "-V"]) if line.strip().startswith("socat version")), "?")
    return "; ".join([first_line(["iperf3", "--version"]), socat, first_line(["ssh", "-V"])])


def _lines(argv: list[str]) -> list[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []


def plot(results: Sequence[Result], path: Path) -> str | None:
    """Bar charts, one panel per metric. Returns why not, when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -r bench/requirements.txt): no plot"
    panels: list[tuple[str, Callable[[Result], float | None], bool]] = [
        ("1 stream, GB/s (higher is better)", lambda r: r.gbps_1, True),
        ("8 streams, GB/s", lambda r: r.gbps_8, True),
        ("64 B RTT p50, µs (lower is better)", lambda r: r.rtt_p50_us, False),
        ("new conn/s, 32 clients", lambda r: r.conns_32, True),
        ("proxy CPU s per GiB (lower is better)", lambda r: r.cpu_s_per_gib, False),
        ("PSS MiB, ~10,000 idle connections", lambda r: r.idle_pss_mib, False),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    names = [r.name for r in results]
    colors = ["#1f77b4" if n == DIRECT else "#7f7f7f" if n == NO_PROXY else "#ff7f0e" for n in names]
    for ax, (title, get, _) in zip(axes.flat, panels, strict=True):
        values = [get(r) or 0.0 for r in results]
        ax.barh(names, values, color=colors)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
        ax.tick_params(labelsize=8)
        for i, v in enumerate(values):
            if v:
                ax.text(v, i, f" {v:.2f}" if v < 10 else f" {v:.0f}", va="center", fontsize=7)
    fig.suptitle("kci-tunneld --via direct against no proxy, socat and OpenSSH -L (one run, one machine)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def replace_section(doc: str, name: str, body: str) -> str:
    """Put ``body`` between the ``<!-- bench:NAME -->`` markers, keeping everything else as written."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    block = f"{start}\n{body.strip()}\n{end}"
    if not pattern.search(doc):
        raise ValueError(f"docs/performance.md has no {start} ... {end} markers")
    return pattern.sub(lambda _: block, doc)
