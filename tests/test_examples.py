"""docs/examples run as a reader would run them: as subprocesses, and they exit 0."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab.layout import LabInfo

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    for name in ("KCI_REGISTRY_TARGET", "KCI_TUNNELD_VIA", "KCI_TUNNELD_CONFIG"):
        if env is None or name not in env:
            full_env.pop(name, None)  # the outer environment must not steer the default run
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{args} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def _pytest_example(env: dict[str, str] | None = None) -> str:
    result = _run(["-m", "pytest", str(EXAMPLES / "pytest_fixture.py"), "-q", "-p", "no:cacheprovider"], env)
    assert "2 passed" in result.stdout, result.stdout
    return result.stdout


@pytest.mark.timeout(150)
def test_embed_anyio_example_runs() -> None:
    result = _run([str(EXAMPLES / "embed_anyio.py")])
    assert "answered b'HELLO THROUGH KCI-TUNNELD'" in result.stdout
    assert result.stdout.rstrip().endswith(": stopped"), result.stdout  # the state watcher saw the end


@pytest.mark.timeout(150)
def test_pytest_fixture_example_runs_against_its_stand_in() -> None:
    _pytest_example()


@pytest.mark.lab
@pytest.mark.timeout(150)
def test_pytest_fixture_example_reaches_the_lab_registry_over_ssh(lab: LabInfo, tmp_path: Path) -> None:
    """The same fixture, configured by a TOML file, reaching the real registry that only the
    remote host's 127.0.0.1 publishes."""
    config = tmp_path / "transport.toml"
    config.write_text(
        f'[transport]\nvia = "ssh://{lab.ssh_user}@{lab.ssh_host}:{lab.ssh_port}"\n'
        f'[transport.ssh]\nidentity_files = ["{lab.ssh_key}"]\nknown_hosts = "{lab.ssh_known_hosts}"\n'
    )
    _pytest_example({"KCI_TUNNELD_CONFIG": str(config), "KCI_REGISTRY_TARGET": lab.registry_addr})


@pytest.mark.lab
@pytest.mark.timeout(150)
def test_pytest_fixture_example_reaches_the_lab_registry_over_docker(lab: LabInfo) -> None:
    if importlib.util.find_spec("tunneld.docker.transport") is None:
        pytest.skip("the docker transport (tunneld/docker/transport.py) is not in this tree yet")
    _pytest_example({"KCI_TUNNELD_VIA": "docker", "KCI_REGISTRY_TARGET": lab.registry_addr, **lab.docker_env()})
