"""Bad input fails before any daemon is spawned, with exit 2 (the command line) or 3 (a value), in
the words the user wrote it in; and `--auto` never runs over the direct transport."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.cli.runner import Cli
from tests.lab.lab import LabInfo
from tests.servers import EchoServer
from tunneld.errors import ExitCode

pytestmark = pytest.mark.timeout(90)


def nothing_started(cli: Cli) -> None:
    assert not cli.control.exists()
    assert not cli.control.with_suffix(".log").exists()  # no daemon was spawned to log there


@pytest.mark.parametrize("value", ["0", "-5", "abc", "nan", "inf"])
@pytest.mark.parametrize("args", [
    ("start", "--detach", "-L", "127.0.0.1:0:127.0.0.1:1", "--ready-timeout"),
    ("up", "--no-cluster", "--detach", "--ready-timeout"),
    ("up", "--no-cluster", "--reconcile-interval"),
    ("wait", "--timeout"),
    ("stop", "--timeout"),
])
def test_a_timeout_must_be_seconds_greater_than_zero(cli: Cli, args: tuple[str, ...], value: str) -> None:
    result = cli.run(*args, value, timeout=30)
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert f"expected a number of seconds greater than 0, got '{value}'" in result.stderr
    nothing_started(cli)


@pytest.mark.parametrize("args", [
    ("start", "-L", "127.0.0.1:0:127.0.0.1:1"),
    ("start", "--detach", "-L", "127.0.0.1:0:127.0.0.1:1"),
    ("up", "--no-cluster", "--detach"),
])
def test_a_control_path_too_long_for_a_socket_fails_before_the_daemon(tmp_path: Path, args: tuple[str, ...]) -> None:
    cli = Cli(tmp_path)
    cli.control = tmp_path / ("d" * 120) / "control.sock"
    try:
        result = cli.run(*args, timeout=30)
    finally:
        cli.cleanup()
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "a unix socket path has at most 107" in result.stderr and "Traceback" not in result.stderr
    assert not cli.control.parent.exists()  # nothing made, nothing spawned


def test_an_unsafe_control_directory_fails_before_detaching(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    cli = Cli(shared)
    try:
        result = cli.run("start", "--detach", "-L", "127.0.0.1:0:127.0.0.1:1", timeout=30)
    finally:
        cli.cleanup()
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "is writable by group or others" in result.stderr
    nothing_started(cli)


def test_the_same_l_twice_is_reported_in_l_words(cli: Cli) -> None:
    result = cli.run("start", "--detach", "--via", "docker", "-L", "5000:127.0.0.1:5000", "-L", "5000:127.0.0.1:5000")
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "-L #2 '5000:127.0.0.1:5000': the same forward as -L #1" in result.stderr
    assert "forwards[" not in result.stderr
    nothing_started(cli)


def test_a_quoted_port_in_a_config_file_is_refused(cli: Cli) -> None:
    config = cli.tmp / "c.toml"
    config.write_text('[[forwards]]\nname = "r"\nbind = "127.0.0.1"\nhost = "127.0.0.1"\nhost_port = "38773"\n')
    result = cli.run("start", "--detach", "--config", str(config))
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert (f"{config}: forwards[0].host_port: expected an integer 1..65535, got '38773' "
            "(a string: drop the quotes)") in result.stderr
    nothing_started(cli)


# ---------------------------------------------------------------- --auto and its transport


def no_docker_env(cli: Cli) -> dict[str, str]:
    """No Docker host anywhere: no DOCKER_HOST, no context, and this machine has no /var/run/docker.sock."""
    if os.path.exists("/var/run/docker.sock"):
        pytest.skip("this machine has a local Docker socket")
    env = {k: v for k, v in cli.env.items() if not k.startswith("DOCKER_")}
    return {**env, "DOCKER_CONFIG": str(cli.tmp)}


def test_auto_over_explicit_direct_is_refused(cli: Cli) -> None:
    result = cli.run("start", "--detach", "--auto", "--via", "direct")
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "auto: --auto (auto.enabled)" in result.stderr and "a loop" in result.stderr
    nothing_started(cli)


def test_auto_without_via_and_without_a_docker_host_says_what_to_pass(cli: Cli, echo_server: EchoServer) -> None:
    cli.env = no_docker_env(cli)
    for extra in ((), ("-L", f"127.0.0.1:0:127.0.0.1:{echo_server.port}")):
        result = cli.run("start", "--detach", "--auto", *extra)
        assert result.returncode == ExitCode.CONFIG, result.stderr
        assert "--auto without --via: there is no Docker host" in result.stderr
        assert "--via docker with DOCKER_HOST" in result.stderr and "--via ssh://HOST" in result.stderr
        nothing_started(cli)


def test_auto_in_a_config_without_via_goes_the_same_way(cli: Cli) -> None:
    cli.env = no_docker_env(cli)
    config = cli.tmp / "c.toml"
    config.write_text("[auto]\nenabled = true\n")
    result = cli.run("start", "--detach", "--config", str(config))
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "--auto without --via: there is no Docker host" in result.stderr


def test_auto_without_via_takes_the_docker_host_of_the_environment(cli: Cli) -> None:
    """A DOCKER_HOST nothing listens on: the daemon goes for it (exit 6) instead of running direct."""
    cli.env = {**no_docker_env(cli), "DOCKER_HOST": f"unix://{cli.tmp}/docker.sock"}
    result = cli.run("start", "--detach", "--auto", "--ready-timeout", "10")
    assert result.stderr.startswith(
        f"kci-tunneld: --auto without --via: using the Docker host at unix://{cli.tmp}/docker.sock (DOCKER_HOST)\n")
    assert result.returncode == ExitCode.TRANSPORT, result.stderr
    assert "cannot reach the Docker host" in result.stderr


@pytest.mark.timeout(120)
def test_auto_without_via_forwards_over_the_lab_docker_host(lab: LabInfo, tmp_path: Path) -> None:
    cli = Cli(tmp_path, env={**lab.docker_env(tls=True), "DOCKER_CONFIG": str(tmp_path)})
    config = tmp_path / "c.toml"
    config.write_text('[auto]\ncontainers = ["kcit-nothing-matches-*"]\n')
    try:
        result = cli.start_detached("--auto", "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert result.stderr.startswith(
            f"kci-tunneld: --auto without --via: using the Docker host at {lab.docker_host_tcp} (DOCKER_HOST)")
        status = cli.status()
        assert status["transport"]["kind"] == "docker" and status["auto"]["enabled"]
        again = cli.run("start", "--detach", "--auto", "--config", str(config))  # the same config: idempotent
        assert again.returncode == 0 and "already running with this config" in again.stderr, again.stderr
        assert cli.run("reload").returncode == 0  # the daemon re-reads its config with the transport chosen
        assert cli.status()["transport"]["kind"] == "docker"
    finally:
        cli.run("stop", timeout=30)
        cli.cleanup()
