"""docs/configuration.md cannot drift from the config model: every key the model has is
documented, every documented key is accepted, and the complete example parses."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from tunneld.config import (
    AutoSettings,
    Config,
    DockerSettings,
    ForwardSpec,
    MetricsSettings,
    SshSettings,
    Timeouts,
    parse_config,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

pytestmark = pytest.mark.timeout(10)


def model_keys() -> set[str]:
    """Every TOML key the model can take, spelled as the reference spells it."""
    keys = {f"forwards[].{f.name}" for f in dataclasses.fields(ForwardSpec)}
    # A field read from a TOML key of another spelling names it in its metadata (helper_images: helper_image).
    keys |= {f"transport.docker.{f.metadata.get('toml', f.name)}" for f in dataclasses.fields(DockerSettings)}
    # The SSH host only ever comes from transport.via = "ssh://...".
    keys |= {f"transport.ssh.{f.name}" for f in dataclasses.fields(SshSettings) if f.name != "host"}
    keys |= {f"timeouts.{f.name}" for f in dataclasses.fields(Timeouts)}
    keys |= {f"auto.{f.name}" for f in dataclasses.fields(AutoSettings)}
    keys |= {f"metrics.{f.name}" for f in dataclasses.fields(MetricsSettings)}
    keys |= {"transport.via"}
    tables = ("forwards", "transport", "timeouts", "auto", "metrics")
    keys |= {f.name for f in dataclasses.fields(Config) if f.name not in tables}
    return keys


def documented_keys() -> set[str]:
    return set(re.findall(r"^\| `([a-z_\[\].]+)` \|", DOC.read_text(), flags=re.MULTILINE))


def test_every_model_key_is_documented() -> None:
    missing = model_keys() - documented_keys()
    assert not missing, f"add these keys to docs/configuration.md: {sorted(missing)}"


def test_every_documented_key_exists() -> None:
    stale = documented_keys() - model_keys()
    assert not stale, f"docs/configuration.md documents keys the model lacks: {sorted(stale)}"


def test_complete_example_parses() -> None:
    block = re.search(r"## A complete example\n\n```toml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert block is not None
    config = parse_config(tomllib.loads(block.group(1)))
    assert [f.name for f in config.forwards] == ["registry", "kind-api"]
    assert config.transport.kind == "docker"
