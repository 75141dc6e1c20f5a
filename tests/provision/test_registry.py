"""The registry on the lab's real dockerd (over TCP+TLS, as on CircleCI): provisioning, reuse,
recreation, pre-flight refusals, and teardown that removes only what kci-tunneld made."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from provision.errors import PreflightError
from provision.plan import Plan, Provisioner
from provision.spec import PROVISION_HELPER_NAME, ClusterSpec
from tests.docker.support import forget_image, push_lab_image, push_to_lab_registry
from tests.lab.lab import LabInfo, docker, ns_exec
from tests.oci import build_layout
from tests.provision.support import free_port, inspect, removed_after, spec, unique
from tests.servers import free_port_holder
from tests.standins import kind as standin_kind
from tunneld.config import DockerSettings
from tunneld.docker.progress import PullPrinter
from tunneld.errors import TransportError

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]


def answers_inside(lab: LabInfo, port: int) -> bool:
    """GET /v2/ on the remote's own 127.0.0.1:PORT (the only place it is published)."""
    r = ns_exec(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/v2/"], timeout=10)
    return r.stdout == b"200"


async def test_registry_is_created_shaped_like_ctlptl_and_kind_expect(lab: LabInfo) -> None:
    name, port = unique("reg"), free_port()
    lines: list[str] = []
    with removed_after(name):
        done = await Provisioner(spec(lab, name, port), progress=lines.append).up()
        assert done.registry == "created"
        info = json.loads(inspect(lab, name, "{{json .}}") or "{}")
        labels = info["Config"]["Labels"]
        assert labels["io.kci-tunneld.role"] == "registry"
        assert labels["dev.tilt.ctlptl.role"] == "registry"  # ctlptl (and Tilt) find it by this label
        assert info["HostConfig"]["PortBindings"] == {"5000/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
        assert info["HostConfig"]["RestartPolicy"]["Name"] == "always"
        assert "REGISTRY_STORAGE_DELETE_ENABLED=true" in info["Config"]["Env"]
        assert info["Config"]["Hostname"] == name and info["Config"]["Image"] == "registry:2"
        assert answers_inside(lab, port)
        assert any(line.startswith(f"registry answering on the Docker host's 127.0.0.1:{port}/v2/") for line in lines)


@pytest.mark.parametrize("terminal", [False, True], ids=["log", "terminal"])
async def test_the_registry_image_pull_is_shown_as_it_goes(lab: LabInfo, terminal: bool) -> None:
    # The lab's registry image under a name only the lab's registry has: pre-flight must pull it.
    name, port = unique("pull"), free_port()
    ref = push_lab_image(lab, lab.registry_image, f"kcit/{name}")
    s = spec(lab, name, port)
    s = dataclasses.replace(s, registry=dataclasses.replace(s.registry, image=ref))
    lines: list[str] = []
    written: list[str] = []
    pulls = PullPrinter(lines.append, write=written.append, prefix="up: ") if terminal else None
    try:
        with removed_after(name):
            assert (await Provisioner(s, progress=lines.append, pulls=pulls).up()).registry == "created"
            assert answers_inside(lab, port)
    finally:
        forget_image(ref)
    summary = f"pulled {ref} in "
    ok = next(i for i, line in enumerate(lines) if line.startswith("pre-flight ok"))
    if terminal:
        # One line, rewritten, then ended by the summary; the step lines go on below it.
        assert written[0] == f"\rup: pulling {ref}" and written[-1].startswith(f"\rup: {summary}")
        assert written[-1].endswith(")\n") and all("\n" not in text for text in written[:-1])
        assert not any(line.startswith(("pulling ", "pulled ")) for line in lines)
    else:
        assert lines.index(f"pulling {ref}") < ok
        assert next(i for i, line in enumerate(lines) if line.startswith(summary)) < ok


async def test_a_node_image_is_pulled_in_preflight_as_it_goes(lab: LabInfo, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """kind would pull --node-image silently: pre-flight pulls it, shown as it goes, or names it when it cannot."""
    exe = standin_kind.install(tmp_path / "bin")
    (tmp_path / "state").mkdir()
    monkeypatch.setenv(standin_kind.STATE_ENV, str(tmp_path / "state"))
    name = unique("node")
    ref = push_to_lab_registry(lab, build_layout(tmp_path / "oci", (2 << 20, 64 << 10)), f"kcit/{name}")

    class Stop(Exception):
        pass

    def stop(plan: Plan) -> None:
        raise Stop  # after pre-flight, before anything is made

    lines: list[str] = []
    try:
        cluster = ClusterSpec(name=name, kind_path=str(exe), node_image=ref)
        with pytest.raises(Stop):
            await Provisioner(spec(lab, name, free_port(), cluster=cluster), progress=lines.append).up(stop)
        assert docker("image", "inspect", ref, check=False).returncode == 0
    finally:
        forget_image(ref)
    assert lines.index(f"pulling {ref}") < next(i for i, line in enumerate(lines) if line.startswith("pre-flight ok"))
    assert any(re.fullmatch(rf"pulled {re.escape(ref)} in \d+\.\ds \(2 layers, 2\.1 MiB\)", line) for line in lines)
    missing = ClusterSpec(name=name, kind_path=str(exe), node_image=f"{lab.registry_addr}/kcit/no-such-node:1")
    with pytest.raises(PreflightError, match=rf"image {re.escape(missing.node_image or '')} is not on the Docker "
                                             r"host and pulling it failed: .*manifest unknown.* \(the node image, see "
                                             r"--node-image\)"):
        await Provisioner(spec(lab, name, free_port(), cluster=missing)).up()
    assert inspect(lab, name) is None and inspect(lab, f"{name}-control-plane") is None


async def test_registry_is_reused_then_recreated_when_gone_or_different(lab: LabInfo) -> None:
    name, port = unique("reuse"), free_port()
    s = spec(lab, name, port)
    with removed_after(name):
        await Provisioner(s).up()
        first = inspect(lab, name)
        assert (await Provisioner(s).up()).registry == "reused" and inspect(lab, name) == first
        docker("stop", name)
        assert (await Provisioner(s).up()).registry == "started" and inspect(lab, name) == first
        docker("rm", "-f", name)
        assert (await Provisioner(s).up()).registry == "created" and inspect(lab, name) not in (None, first)
        # Ours but no longer what is asked for (another port): recreated, and it says why.
        second, other = inspect(lab, name), free_port()
        lines: list[str] = []
        moved = dataclasses.replace(s, registry=dataclasses.replace(s.registry, port=other))
        assert (await Provisioner(moved, progress=lines.append).up()).registry == "recreated"
        assert inspect(lab, name) != second and answers_inside(lab, other)
        assert any(f"want 127.0.0.1:{other}->5000/tcp" in line for line in lines)


async def test_teardown_removes_ours_and_leaves_a_stranger_alone(lab: LabInfo) -> None:
    ours, theirs, port = unique("ours"), unique("theirs"), free_port()
    with removed_after(ours, theirs):
        await Provisioner(spec(lab, ours, port)).up()
        docker("run", "-d", "--name", theirs, "--entrypoint", "/bin/sh", lab.socat_image, "-c", "sleep 300")
        lines: list[str] = []
        await Provisioner(spec(lab, ours, port), progress=lines.append).down()
        assert inspect(lab, ours) is None and f"registry {ours}: removed" in lines
        await Provisioner(spec(lab, theirs, port), progress=lines.append).down()
        assert inspect(lab, theirs) is not None
        assert any(line.startswith(f"registry {theirs}: left alone, not created by kci-tunneld") for line in lines)
        await Provisioner(spec(lab, unique("never"), port), progress=lines.append).down()  # nothing there: fine


async def test_preflight_refuses_a_name_held_by_another_container(lab: LabInfo) -> None:
    name = unique("clash")
    with removed_after(name):
        docker("run", "-d", "--name", name, "--label", "dev.tilt.ctlptl.role=registry", "--entrypoint", "/bin/sh",
               lab.socat_image, "-c", "sleep 300")
        with pytest.raises(PreflightError, match=f"a container named {name} exists .* not created by kci-tunneld"
                                                 ".* It looks like a ctlptl registry") as err:
            await Provisioner(spec(lab, name, free_port())).up()
        assert "nothing was created" in str(err.value)
        assert inspect(lab, name, "{{.Config.Image}}") == lab.socat_image  # untouched


async def test_preflight_refuses_a_port_taken_on_the_remote(lab: LabInfo) -> None:
    name = unique("port")
    helper_before = inspect(lab, PROVISION_HELPER_NAME)
    with pytest.raises(PreflightError, match=f"port {lab.registry_port} on the Docker host is taken by container "
                                             f"{lab.registry_container}"):
        await Provisioner(spec(lab, name, lab.registry_port)).up()
    assert inspect(lab, name) is None
    if helper_before is None:  # pre-flight made the helper only to look: it is gone again
        assert inspect(lab, PROVISION_HELPER_NAME) is None


async def test_preflight_refuses_a_port_taken_here(lab: LabInfo) -> None:
    holder = free_port_holder()
    port = int(holder.getsockname()[1])
    name = unique("here")
    try:
        with pytest.raises(PreflightError, match=f"port {port} is taken on this machine"):
            await Provisioner(spec(lab, name, port)).up()
    finally:
        holder.close()
    assert inspect(lab, name) is None


async def test_preflight_refuses_an_unreachable_docker(lab: LabInfo, tmp_path: Path) -> None:
    s = dataclasses.replace(spec(lab, unique("nodocker"), free_port()),
                            docker=DockerSettings(host=f"unix://{tmp_path}/no-such.sock"))
    with pytest.raises(TransportError, match=r"pre-flight: Docker is unreachable: .*no such socket"):
        await Provisioner(s).up()


async def test_preflight_refuses_missing_or_old_kind(lab: LabInfo, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique("nokind")
    missing = spec(lab, name, free_port(), cluster=ClusterSpec(name=name, kind_path=f"{tmp_path}/kind"))
    with pytest.raises(PreflightError, match=r"kind not found at .*: not an executable file"):
        await Provisioner(missing).up()
    monkeypatch.setenv("PATH", str(tmp_path))  # and none on PATH either
    no_path = dataclasses.replace(missing, cluster=ClusterSpec(name=name))
    with pytest.raises(PreflightError, match=r"kind not found on PATH: install kind >= 0\.20\.0"):
        await Provisioner(no_path).up()
    monkeypatch.undo()
    exe = standin_kind.install(tmp_path / "bin")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / standin_kind.STATE_FILE).write_text(json.dumps({"version": "0.19.1"}))
    monkeypatch.setenv(standin_kind.STATE_ENV, str(tmp_path / "state"))
    old = dataclasses.replace(missing, cluster=ClusterSpec(name=name, kind_path=str(exe)))
    with pytest.raises(PreflightError, match=r"kind 0\.19\.1 .* is too old: kci-tunneld needs kind >= 0\.20\.0"):
        await Provisioner(old).up()
    assert inspect(lab, name) is None


async def test_preflight_refuses_an_image_the_host_cannot_have(lab: LabInfo) -> None:
    s = spec(lab, unique("img"), free_port())
    s = dataclasses.replace(s, registry=dataclasses.replace(s.registry, image="kcit-no-such/registry:9"))
    with pytest.raises(PreflightError, match=r"image kcit-no-such/registry:9 is not on the Docker host and pulling "
                                             r"it failed: .* \(the registry image, see --registry-image\)"):
        await Provisioner(s).up()
    assert inspect(lab, s.registry.name) is None
