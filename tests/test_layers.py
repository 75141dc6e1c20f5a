"""The architecture, checked: imports go down the layers and never up, so no package imports one
that imports it back (docs/architecture.md draws the same layers).

Every ``import`` and ``from ... import`` counts, at module level or inside a function (a lazy
import is still a dependency). The transport table names its implementations by string
(``tunneld/transports/__init__.py``): that is a lookup by name, like uvicorn's loop table, and the
implementations never import the table back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module belongs to the layer of the longest prefix that names it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("tunneld.errors", "tunneld.config", "tunneld.sockets", "tunneld.tls", "tunneld.loop", "tunneld.logs",
              "tunneld.kubeconfig", "tunneld.backoff", "tunneld.labels", "tunneld.version")),
    ("transport seam", ("tunneld.transports",)),
    ("engine", ("tunneld.engine",)),
    ("ssh", ("tunneld.ssh",)),
    ("docker", ("tunneld.docker",)),
    ("daemon", ("tunneld.daemon",)),
    ("library api", ("tunneld.api",)),
    ("provision", ("provision",)),
    ("cli", ("tunneld.cli", "tunneld.__main__")),
]
# The package's face only re-exports (lazily): it sits above everything it names.
FACE = "tunneld"


def _modules() -> dict[str, Path]:
    out = {}
    for package in ("tunneld", "provision"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def layer_of(module: str) -> int:
    best, best_len = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)")
    return best


def imports_of(module: str, path: Path) -> set[str]:
    """The project modules ``module`` imports, anywhere in its code."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports pkg.mod when that is a module
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        if module != FACE:
            layer_of(module)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != FACE))
def test_imports_only_go_down(module: str) -> None:
    mine = layer_of(module)
    upward = sorted(
        f"{name} ({LAYERS[layer_of(name)][0]})"
        for name in imports_of(module, MODULES[module])
        if name != FACE and layer_of(name) > mine
    )
    assert not upward, f"{module} ({LAYERS[mine][0]}) imports a higher layer: {', '.join(upward)}"


def test_nothing_below_the_face_imports_it() -> None:
    """``import tunneld`` is for library users; modules name the module they need, so the face can
    stay lazy and nothing inside depends on what it happens to re-export."""
    offenders = sorted(m for m, p in MODULES.items() if m != FACE and FACE in imports_of(m, p))
    assert not offenders, offenders


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a base module that imported the daemon would be caught."""
    bad = tmp_path / "config.py"
    bad.write_text("from tunneld.daemon.lifecycle import Daemon\n\ndef f():\n    import provision.cli\n")
    found = imports_of("tunneld.config", bad)
    assert found == {"tunneld.daemon.lifecycle", "provision.cli"}
    assert all(layer_of(n) > layer_of("tunneld.config") for n in found)
