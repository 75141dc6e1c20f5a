"""The human ``status`` table: a header with the daemon and its transport, one row per forward,
then what went wrong and what happened lately. ``status --json`` prints the reply as it is."""

from __future__ import annotations

import textwrap
import time
from typing import Any

COLUMNS = ("NAME", "STATE", "SINCE", "LISTEN", "TARGET", "ACTIVE", "TOTAL", "UP", "DOWN", "ERRORS", "RECONN", "PROBE")
# How a narrow terminal gets the table: each step in turn until it fits. A column named here is
# dropped; "probe", "listen" and "name" shorten theirs. NAME, STATE, LISTEN, TARGET, PROBE stay.
NARROWER = ("probe", "RECONN", "TOTAL", "listen", "UP", "DOWN", "SINCE", "ERRORS", "name", "ACTIVE")
NAME_SHORT = 16  # a long name (an -L forward is named by its whole spec) is cut to this, ending in "..."


def format_status(reply: dict[str, Any], now: float | None = None, width: int | None = None) -> str:
    """The human table `status` prints: a header, one row per forward, then what went wrong.

    ``width``: the terminal's columns; the table leaves out low-value columns, and long lines wrap,
    until it fits (None: everything, as wide as it takes).
    """
    now = time.time() if now is None else now
    rows: list[dict[str, str]] = []
    problems = []
    for f in reply.get("forwards", []):
        probe = f.get("last_probe") or {}
        if not probe:
            probe_full = probe_short = "-"
        elif probe.get("ok"):
            probe_short = f"ok {probe['latency_ms']}ms"
            probe_full = probe_short + (f" ({probe['detail']})" if probe.get("detail") else "")
        else:
            probe_short, probe_full = "failed", f"failed after {probe['latency_ms']}ms"
        auto = " (auto)" if f.get("source") == "auto" else ""
        name = f["name"] + auto
        listen = f["listen"]
        rows.append({
            "NAME": name, "STATE": f["state"], "SINCE": _ago(now, f.get("state_since")), "LISTEN": ",".join(listen),
            "TARGET": f["target"], "ACTIVE": str(f["active"]), "TOTAL": str(f["total"]), "UP": _bytes(f["bytes_up"]),
            "DOWN": _bytes(f["bytes_down"]), "ERRORS": str(f["errors"]), "RECONN": str(f.get("reconnects", 0)),
            "PROBE": probe_full, "probe": probe_short,
            "listen": listen[0] + (f" +{len(listen) - 1}" if len(listen) > 1 else ""),
            "name": (f["name"] if len(f["name"]) <= NAME_SHORT else f["name"][:NAME_SHORT - 3] + "...") + auto,
        })
        if f.get("last_error") and (f["state"] != "ready" or not probe.get("ok")):
            problems.append(f"  {f['name']}: {f['last_error']}")
        elif f.get("last_error"):
            problems.append(f"  {f['name']} (earlier; ready again): {f['last_error']}")
    tail = []
    if problems:
        tail += ["last errors:", *problems]
    events = _recent_events(reply)
    if events:
        tail += ["recent events:", *events]
    head = _status_header(reply, now).splitlines()
    if width is not None:
        head, tail = [_wrap(line, width) for line in head], [_wrap(line, width) for line in tail]
    return "\n".join([*head, *_table(rows, width), *tail])


def _table(rows: list[dict[str, str]], width: int | None) -> list[str]:
    """The rows under their headings, in as few of the columns as ``width`` needs."""
    columns = list(COLUMNS)
    shown = {c: c for c in columns}  # heading -> the row key its text comes from
    lines = _render(rows, columns, shown)
    for step in NARROWER:
        if width is None or max(len(line) for line in lines) <= width:
            break
        if step.islower():
            shown[step.upper()] = step
        else:
            columns.remove(step)
        lines = _render(rows, columns, shown)
    return lines


def _render(rows: list[dict[str, str]], columns: list[str], shown: dict[str, str]) -> list[str]:
    table = [columns, *([row[shown[c]] for c in columns] for row in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in table]


def _wrap(line: str, width: int) -> str:
    """A long free-text line (an error, an event) wrapped to ``width``, continued indented."""
    if len(line) <= width:
        return line
    indent = " " * (len(line) - len(line.lstrip()) + 4)
    return "\n".join(textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False)) or line


def _recent_events(reply: dict[str, Any], limit: int = 10) -> list[str]:
    """State changes of the forwards and what --auto found, newest last: what happened, and when."""
    rows: list[tuple[float, str]] = []
    for f in reply.get("forwards", []):
        for h in f.get("history") or []:
            if h["from"] == "starting" and h["to"] == "ready":
                continue  # every start looks like this: not news
            text = f"{f['name']}: {h['from']} -> {h['to']} after {h['after']:.1f}s"
            rows.append((h["at"], text + (f" ({h['reason']})" if h.get("reason") else "")))
    for e in (reply.get("auto") or {}).get("events") or []:
        rows.append((e["at"], f"auto: {e['event']}"))
    rows.sort(key=lambda r: r[0])
    return [f"  {time.strftime('%H:%M:%S', time.localtime(at))} {text}" for at, text in rows[-limit:]]


def _status_header(reply: dict[str, Any], now: float) -> str:
    transport = reply.get("transport") or {}
    head = f"kci-tunneld pid {reply.get('pid')} {reply.get('state')} via {transport.get('kind', '?')}"
    facts = [f"{k} {transport[k]}" for k in ("state", "relay", "reconnects") if transport.get(k) is not None]
    if transport.get("last_error") and transport.get("state") not in (None, "connected", "ready"):
        facts.append(f"last error: {transport['last_error']}")
    if facts:
        head += " (" + ", ".join(facts) + ")"
    if transport.get("helper_image_why"):
        head += f"\nhelper image {transport['helper_image']} ({transport['helper_image_why']})"
        if transport.get("relay_why"):
            head += f", relay {transport['relay']} ({transport['relay_why']})"
    if transport.get("cipher"):
        head += f"\nssh cipher {transport['cipher']}"
        if transport.get("libsodium"):
            head += f" ({transport['libsodium']} through libsodium)"
    auto = reply.get("auto") or {}
    if auto.get("enabled"):
        found = len(auto.get("found") or [])
        mode = " (follow mode: every published port)" if auto.get("mode") == "all" else ""
        head += (f"\nauto{mode}: {found} found, {auto.get('scans', 0)} scans, "
                 f"last {_ago(now, auto.get('last_scan'))} ago")
        if auto.get("last_error"):
            head += f"; cannot list containers: {auto['last_error']}"
        for conflict in auto.get("conflicts") or []:
            head += (f"\nauto: NOT forwarded: port {conflict['port']} of container {conflict['container']} "
                     f"(already {conflict['holder']}'s)")
    for address in reply.get("metrics") or []:
        head += f"\nmetrics: http://{address}/metrics"
        break
    return head


def _ago(now: float, then: object) -> str:
    if not isinstance(then, (int, float)):
        return "-"
    secs = max(0.0, now - then)
    if secs < 120:
        return f"{secs:.0f}s"
    if secs < 7200:
        return f"{secs / 60:.0f}m"
    return f"{secs / 3600:.1f}h"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
