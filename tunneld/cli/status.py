"""The human ``status`` table: a header with the daemon and its transport, one row per forward,
then what went wrong and what happened lately. ``status --json`` prints the reply as it is."""

from __future__ import annotations

import time
from typing import Any


def format_status(reply: dict[str, Any], now: float | None = None) -> str:
    """The human table `status` prints: a header, one row per forward, then what went wrong."""
    now = time.time() if now is None else now
    rows = [("NAME", "STATE", "SINCE", "LISTEN", "TARGET", "ACTIVE", "TOTAL", "UP", "DOWN", "ERRORS", "RECONN",
             "PROBE")]
    problems = []
    for f in reply.get("forwards", []):
        probe = f.get("last_probe") or {}
        if not probe:
            probe_text = "-"
        elif probe.get("ok"):
            probe_text = f"ok {probe['latency_ms']}ms" + (f" ({probe['detail']})" if probe.get("detail") else "")
        else:
            probe_text = f"failed after {probe['latency_ms']}ms"
        since = _ago(now, f.get("state_since"))
        name = f["name"] + (" (auto)" if f.get("source") == "auto" else "")
        rows.append((name, f["state"], since, ",".join(f["listen"]), f["target"], str(f["active"]), str(f["total"]),
                     _bytes(f["bytes_up"]), _bytes(f["bytes_down"]), str(f["errors"]), str(f.get("reconnects", 0)),
                     probe_text))
        if f.get("last_error") and (f["state"] != "ready" or not probe.get("ok")):
            problems.append(f"  {f['name']}: {f['last_error']}")
        elif f.get("last_error"):
            problems.append(f"  {f['name']} (earlier; ready again): {f['last_error']}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows]
    out = [_status_header(reply, now), *lines]
    if problems:
        out += ["last errors:", *problems]
    events = _recent_events(reply)
    if events:
        out += ["recent events:", *events]
    return "\n".join(out)


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
    auto = reply.get("auto") or {}
    if auto.get("enabled"):
        found = len(auto.get("found") or [])
        head += f"\nauto: {found} found, {auto.get('scans', 0)} scans, last {_ago(now, auto.get('last_scan'))} ago"
        if auto.get("last_error"):
            head += f"; cannot list containers: {auto['last_error']}"
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
