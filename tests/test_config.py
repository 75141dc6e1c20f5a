"""The config model: good input parses to the model, bad input names the key and what was expected."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tunneld.config import (
    DEFAULT_HELPER_IMAGES,
    ForwardSpec,
    load_config,
    merge_cli,
    parse_config,
    parse_forward_arg,
    parse_via,
)
from tunneld.daemon import options
from tunneld.errors import ConfigError

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("5000:127.0.0.1:5000", ("localhost", 5000, "127.0.0.1", 5000)),
        ("127.0.0.1:0:10.0.0.5:6443", ("127.0.0.1", 0, "10.0.0.5", 6443)),
        ("[::1]:5000:[::1]:5001", ("::1", 5000, "::1", 5001)),
        ("localhost:8080:registry:5000", ("localhost", 8080, "registry", 5000)),
        (":5000:127.0.0.1:5000", ("localhost", 5000, "127.0.0.1", 5000)),
    ],
)
def test_forward_arg_parses(arg: str, expected: tuple[str, int, str, int]) -> None:
    spec = parse_forward_arg(arg)
    assert (spec.bind, spec.port, spec.host, spec.host_port) == expected
    assert spec.name == arg


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("5000", "expected [BIND:]PORT:HOST:HOSTPORT"),
        ("5000:127.0.0.1", "expected [BIND:]PORT:HOST:HOSTPORT"),
        ("abc:127.0.0.1:5000", "local PORT: expected an integer 0..65535, got 'abc'"),
        ("5000:127.0.0.1:0", "HOSTPORT: expected an integer 1..65535, got '0'"),
        ("5000:127.0.0.1:70000", "HOSTPORT: expected an integer 1..65535, got '70000'"),
        ("1:2:3:4:5", "expected [BIND:]PORT:HOST:HOSTPORT"),
        ("::1:5000:h:1", "bracket IPv6 addresses"),
    ],
)
def test_bad_forward_arg_names_the_problem(arg: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^-L") as e:
        parse_forward_arg(arg)
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("via", "kind", "host", "user", "port"),
    [
        ("direct", "direct", "", None, None),
        ("docker", "docker", "", None, None),
        ("ssh://remote-docker", "ssh", "remote-docker", None, None),
        ("ssh://ci@10.0.0.2:2222", "ssh", "10.0.0.2", "ci", 2222),
        ("ssh://[::1]:22", "ssh", "::1", None, 22),
    ],
)
def test_via_parses(via: str, kind: str, host: str, user: str | None, port: int | None) -> None:
    spec = parse_via(via)
    assert spec.kind == kind
    assert (spec.ssh.host, spec.ssh.user, spec.ssh.port) == (host, user, port)


@pytest.mark.parametrize(
    ("via", "message"),
    [
        ("tcp", "--via: expected direct, docker or ssh://[user@]host[:port], got 'tcp'"),
        ("ssh://", "--via: expected ssh://[user@]host[:port], got 'ssh://'"),
        ("ssh://@host", "--via: empty user"),
        ("ssh://host:port", "port: expected an integer 1..65535, got 'port'"),
    ],
)
def test_bad_via_names_the_problem(via: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_via(via)
    assert message in str(e.value)


GOOD = """
allow_non_loopback = false
[transport]
via = "docker"
[transport.docker]
helper_image = "alpine/socat:1.8"
pool_size = 8
[timeouts]
connect = 5
drain = 2.5
[[forwards]]
name = "registry"
port = 5000
host = "127.0.0.1"
host_port = 5000
probe = "http"
probe_path = "/v2/"
[[forwards]]
name = "api"
bind = "127.0.0.1"
host = "127.0.0.1"
host_port = 6443
max_connections = 64
"""


def test_good_config_parses_to_the_model() -> None:
    config = parse_config(tomllib.loads(GOOD))
    assert config.transport.kind == "docker"
    assert config.transport.docker.helper_image == "alpine/socat:1.8"
    assert config.transport.docker.pool_size == 8
    assert config.timeouts.connect == 5.0 and config.timeouts.drain == 2.5
    assert config.forwards == (
        ForwardSpec(name="registry", bind="localhost", port=5000, host="127.0.0.1", host_port=5000,
                    probe="http", probe_path="/v2/"),
        ForwardSpec(name="api", bind="127.0.0.1", port=0, host="127.0.0.1", host_port=6443, max_connections=64),
    )
    assert config.fingerprint() == parse_config(tomllib.loads(GOOD)).fingerprint()


FORWARD = '[[forwards]]\nname = "r"\nhost = "127.0.0.1"\nhost_port = 5000\n'


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[forwards]]\nhost = "h"\nhost_port = 1\n', "forwards[0].name: missing"),
        ('[[forwards]]\nname = "r"\nhost_port = 1\n', "forwards[0].host: missing"),
        ('[[forwards]]\nname = "r"\nhost = "h"\n', "forwards[0].host_port: missing"),
        (FORWARD + "port = 'abc'\n", "forwards[0].port: expected an integer 0..65535, got 'abc'"),
        (FORWARD + "port = 70000\n", "forwards[0].port: expected an integer 0..65535, got 70000"),
        (FORWARD + "port = true\n", "forwards[0].port: expected an integer 0..65535, got True"),
        (FORWARD + "max_connections = 0\n", "forwards[0].max_connections: expected an integer 1..1000000, got 0"),
        (FORWARD + "probe = 'icmp'\n", "forwards[0].probe: expected one of tcp, http, https, got 'icmp'"),
        (FORWARD + "colour = 'blue'\n", "forwards[0].colour: unknown key"),
        (FORWARD + FORWARD, "forwards[1].name: 'r' is used twice"),
        (FORWARD + "bind = '0.0.0.0'\n", "forwards[0].bind: '0.0.0.0' is not a loopback address"),
        ('[[forwards]]\nname = "bad name"\nhost = "h"\nhost_port = 1\n', "forwards[0].name: expected letters"),
        ("forwards = 3\n", "forwards: expected an array of tables"),
        ("[transport]\nvia = 'ftp'\n", "transport.via: expected direct, docker or ssh://"),
        ("[transport]\nvia = 'ssh://h'\n[transport.ssh]\nidentity_files = 'k'\n",
         "transport.ssh.identity_files: expected a list of strings, got 'k'"),
        ("[transport.docker]\nhelper_image = []\n",
         "transport.docker.helper_image: expected a string or a non-empty list of strings, got []"),
        ("[transport.docker]\nhelper_image = ['a', 3]\n",
         "transport.docker.helper_image: expected a string or a non-empty list of strings, got ['a', 3]"),
        ("[transport.docker]\nhelper_image = ['a', 'b', 'a']\n", "transport.docker.helper_image: 'a' is listed twice"),
        ("[transport.docker]\npool_size = -1\n", "transport.docker.pool_size: expected an integer 0..256, got -1"),
        ("[transport.docker]\ntls_verify = 'yes'\n", "transport.docker.tls_verify: expected true or false, got 'yes'"),
        ("[timeouts]\nconnect = 0\n", "timeouts.connect: expected a number of seconds > 0, got 0"),
        ("[timeouts]\nready = 'soon'\n", "timeouts.ready: expected a number of seconds > 0, got 'soon'"),
        ("[timeouts]\nlinger = 1\n", "timeouts.linger: unknown key"),
        ("transport = 1\n", "transport: expected a table, got int"),
        ("verbose = true\n", "verbose: unknown key"),
    ],
)
def test_bad_config_names_the_key(toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(tomllib.loads(toml))
    assert message in str(e.value)


def test_helper_image_is_one_image_or_a_list_in_order() -> None:
    assert parse_config({}).transport.docker.helper_images == DEFAULT_HELPER_IMAGES == ("python:3.13-alpine",
                                                                                         "alpine/socat")
    one = parse_config(tomllib.loads('[transport.docker]\nhelper_image = "busybox"\n'))
    assert one.transport.docker.helper_images == ("busybox",)
    two = parse_config(tomllib.loads('[transport.docker]\nhelper_image = ["python:3-alpine", "alpine/socat"]\n'))
    assert two.transport.docker.helper_images == ("python:3-alpine", "alpine/socat")
    assert two.transport.docker.helper_image == "python:3-alpine"  # the preferred one


def test_repeated_helper_image_flags_make_the_list() -> None:
    args = options.launch(via_default="direct").parse_args(
        ["--helper-image", "python:3-alpine", "--helper-image", "alpine/socat"])
    assert args.helper_image == ["python:3-alpine", "alpine/socat"]
    config = merge_cli(parse_config({}), overrides={"docker.helper_images": tuple(args.helper_image)})
    assert config.transport.docker.helper_images == ("python:3-alpine", "alpine/socat")


def test_non_loopback_needs_explicit_option() -> None:
    config = merge_cli(parse_config({}), forwards=["0.0.0.0:5000:127.0.0.1:5001"], allow_non_loopback=True)
    assert config.forwards[0].bind == "0.0.0.0"
    with pytest.raises(ConfigError, match="--allow-non-loopback"):
        merge_cli(parse_config({}), forwards=["0.0.0.0:5000:127.0.0.1:5001"])


def test_cli_shorthands_land_on_the_same_model() -> None:
    from_file = parse_config(tomllib.loads(
        '[transport]\nvia = "ssh://ci@h:2222"\n[[forwards]]\nname = "5000:127.0.0.1:5000"\n'
        'port = 5000\nhost = "127.0.0.1"\nhost_port = 5000\n'
    ))
    from_flags = merge_cli(parse_config({}), forwards=["5000:127.0.0.1:5000"], via="ssh://ci@h:2222")
    assert from_file == from_flags
    assert from_file.fingerprint() == from_flags.fingerprint()


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[forwards]\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid TOML"):
        load_config(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[timeouts]\nconnect = -1\n")
    with pytest.raises(ConfigError, match=f"{wrong}: timeouts.connect"):
        load_config(wrong)


@pytest.mark.parametrize("arg", [
    "5000:127.0.0.1:5000", "5000:localhost:5000", "127.0.0.1:5000:localhost:5000", "[::1]:5000:[::1]:5000",
    "localhost:5000:[::1]:5000", "127.0.0.1:5000:0.0.0.0:5000",
])
def test_a_direct_forward_to_its_own_listener_is_refused(arg: str) -> None:
    with pytest.raises(ConfigError) as e:
        merge_cli(parse_config({}), forwards=[arg])
    assert f"-L #1 {arg!r}:" in str(e.value)
    assert "would connect to its own listener over the direct transport (a loop)" in str(e.value)
    assert "--via docker" in str(e.value)


@pytest.mark.parametrize(("arg", "via"), [
    ("5000:127.0.0.1:5000", "docker"),  # the far side's 127.0.0.1: another host
    ("5000:127.0.0.1:5000", "ssh://h"),
    ("5000:127.0.0.1:5001", None),
    ("127.0.0.1:5000:127.0.0.2:5000", None),  # another loopback address: not our listener
    ("127.0.0.1:5000:[::1]:5000", None),  # listening on v4 only
    ("0:127.0.0.1:5000", None),
    ("5000:registry.example:5000", None),  # a name: not resolved while parsing
])
def test_forwards_that_do_not_loop_are_accepted(arg: str, via: str | None) -> None:
    assert merge_cli(parse_config({}), forwards=[arg], via=via).forwards[0].name == arg


def test_a_loop_in_a_config_file_names_the_forward() -> None:
    with pytest.raises(ConfigError, match=r"forwards\[1\] \(self\): 127.0.0.1:7000 -> 127.0.0.1:7000 would connect"):
        parse_config(tomllib.loads(
            '[[forwards]]\nname = "ok"\nport = 7001\nhost = "10.0.0.5"\nhost_port = 7000\n'
            '[[forwards]]\nname = "self"\nbind = "127.0.0.1"\nport = 7000\nhost = "127.0.0.1"\nhost_port = 7000\n'
        ))


# ---------------------------------------------------------------- ports are TOML integers


@pytest.mark.parametrize(("toml", "message"), [
    (FORWARD.replace("5000", '"38773"'),
     "forwards[0].host_port: expected an integer 1..65535, got '38773' (a string: drop the quotes)"),
    (FORWARD + 'port = "5000"\n', "forwards[0].port: expected an integer 0..65535, got '5000' (a string: drop"),
    (FORWARD + "port = 5000.0\n", "forwards[0].port: expected an integer 0..65535, got 5000.0"),
    ('[metrics]\nport = "9464"\n', "metrics.port: expected an integer 0..65535, got '9464' (a string: drop"),
    ('[transport]\nvia = "ssh://h"\n[transport.ssh]\nport = "22"\n',
     "transport.ssh.port: expected an integer 1..65535, got '22' (a string: drop the quotes)"),
])
def test_a_quoted_port_in_toml_is_refused_like_any_other_string(toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(tomllib.loads(toml))
    assert message in str(e.value)


def test_a_port_in_text_is_still_read_as_text() -> None:
    assert parse_forward_arg("5000:127.0.0.1:38773").host_port == 38773
    assert parse_via("ssh://h:2222").ssh.port == 2222
    assert parse_config(tomllib.loads('[transport]\nvia = "ssh://h:2222"\n')).transport.ssh.port == 2222
    for bad in ("5_000:h:1", "+5000:h:1", " 5000:h:1x"):
        with pytest.raises(ConfigError, match="expected an integer"):
            parse_forward_arg(bad)


# ---------------------------------------------------------------- -L mistakes in -L words


def test_the_same_l_twice_is_named_as_given() -> None:
    with pytest.raises(ConfigError) as e:
        merge_cli(parse_config({}), forwards=["5001:127.0.0.1:5000", "5000:127.0.0.1:5000", "5000:127.0.0.1:5000"],
                  via="docker")
    assert str(e.value).startswith("-L #3 '5000:127.0.0.1:5000': the same forward as -L #2")
    assert "forwards[" not in str(e.value)


def test_two_l_on_one_port_name_both() -> None:
    with pytest.raises(ConfigError) as e:
        merge_cli(parse_config({}), forwards=["127.0.0.1:5000:h:1", "127.0.0.1:5000:h:2"])
    assert str(e.value) == ("-L #2 '127.0.0.1:5000:h:2': 127.0.0.1:5000 is listened on twice "
                            "(also by -L #1 '127.0.0.1:5000:h:1')")


def test_an_l_beside_a_file_forward_names_each_in_its_own_words() -> None:
    base = parse_config(tomllib.loads('[[forwards]]\nname = "r"\nbind = "127.0.0.1"\nport = 5000\n'
                                      'host = "h"\nhost_port = 1\n'))
    with pytest.raises(ConfigError) as e:
        merge_cli(base, forwards=["127.0.0.1:5000:h:2"])
    assert str(e.value) == "-L #1 '127.0.0.1:5000:h:2': 127.0.0.1:5000 is listened on twice (also by forwards[0])"
    with pytest.raises(ConfigError, match=r"^-L #1 '0\.0\.0\.0:5000:h:1': BIND '0\.0\.0\.0' is not a loopback"):
        merge_cli(base, forwards=["0.0.0.0:5000:h:1"])


# ---------------------------------------------------------------- --auto never over direct


def test_auto_over_an_explicit_direct_transport_is_refused() -> None:
    auto = parse_config({"auto": {"enabled": True}})  # no via: the caller (the CLI) chooses one
    assert auto.auto.enabled and auto.transport.kind == "direct"
    with pytest.raises(ConfigError) as e:
        merge_cli(auto, via="direct")
    assert str(e.value).startswith("auto: --auto (auto.enabled) forwards every port it finds on the same port number")
    assert "--via docker" in str(e.value) and "a loop" in str(e.value)
    with pytest.raises(ConfigError, match=r"^auto: --auto"):
        parse_config({"transport": {"via": "direct"}, "auto": {"enabled": True}})
    assert merge_cli(auto, via="docker").transport.kind == "docker"
    assert merge_cli(auto, via="ssh://h").transport.kind == "ssh"
