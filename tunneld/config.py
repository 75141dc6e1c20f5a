"""The configuration model: frozen dataclasses parsed by pure functions from TOML, -L and --via.

Parsing never logs, opens sockets or exits; every error names the key and what was expected,
e.g. ``forwards[2].port: expected an integer 0..65535, got 'abc'``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunneld.errors import ConfigError

TransportKind = Literal["direct", "docker", "ssh"]
ProbeKind = Literal["tcp", "http", "https"]
AutoMode = Literal["kind", "all"]
AUTO_MODES: tuple[AutoMode, ...] = ("kind", "all")

# Network defaults live here and nowhere else (seconds unless named otherwise).
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_PROBE_TIMEOUT = 5.0
DEFAULT_PROBE_INTERVAL = 10.0
DEFAULT_READY_TIMEOUT = 60.0
DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_RECONNECT_WAIT = 10.0
DEFAULT_MAX_CONNECTIONS = 1024
# The helper images, in order of preference (docs/docker-transport.md, "Which helper image", says why
# these): the official python image, pinned to a minor series, runs the multiplexed relay; alpine/socat
# (the shell relay) is used where only it is on the Docker host or the python image cannot be pulled.
DEFAULT_HELPER_IMAGES = ("python:3.13-alpine", "alpine/socat")
DEFAULT_HELPER_IMAGE = DEFAULT_HELPER_IMAGES[0]
DEFAULT_HELPER_NAME = "kci-tunneld-helper"
DEFAULT_AUTO_INTERVAL = 3.0
DEFAULT_AUTO_LINGER = 30.0


@dataclass(frozen=True)
class Timeouts:
    """Deadlines for every network wait."""

    connect: float = DEFAULT_CONNECT_TIMEOUT
    probe: float = DEFAULT_PROBE_TIMEOUT
    probe_interval: float = DEFAULT_PROBE_INTERVAL
    ready: float = DEFAULT_READY_TIMEOUT
    drain: float = DEFAULT_DRAIN_TIMEOUT
    reconnect_wait: float = DEFAULT_RECONNECT_WAIT


@dataclass(frozen=True)
class DockerSettings:
    """How to reach the Docker Engine and run the helper container; None means "as the docker CLI would"."""

    host: str | None = None
    tls_verify: bool | None = None
    cert_path: str | None = None
    context: str | None = None
    # In order of preference: the first already on the Docker host is used, else the first that pulls.
    # Its TOML key is the singular helper_image (a string or a list): metadata["toml"] says so.
    helper_images: tuple[str, ...] = field(default=DEFAULT_HELPER_IMAGES, metadata={"toml": "helper_image"})
    helper_name: str = DEFAULT_HELPER_NAME
    pool_size: int = 4
    # Execs of the multiplexed relay that carry every connection when the helper has python3; 0: a
    # pool of execs, one connection at a time each (as without python3).
    mux_execs: int = 2

    @property
    def helper_image(self) -> str:
        """The preferred helper image (the first of ``helper_images``)."""
        return self.helper_images[0]


@dataclass(frozen=True)
class SshSettings:
    """How to reach the SSH server that carries every forward."""

    host: str = ""
    user: str | None = None
    port: int | None = None
    identity_files: tuple[str, ...] = ()
    known_hosts: str | None = None
    check_host_key: bool = True
    config_file: str | None = None
    keepalive_interval: float = 5.0
    keepalive_count_max: int = 3
    reconnect_max_delay: float = 10.0


@dataclass(frozen=True)
class TransportSpec:
    """Which transport carries the forwards, with its settings."""

    kind: TransportKind = "direct"
    docker: DockerSettings = field(default_factory=DockerSettings)
    ssh: SshSettings = field(default_factory=SshSettings)


@dataclass(frozen=True)
class ForwardSpec:
    """One forward: listen on bind:port here, reach host:host_port on the far side."""

    name: str
    bind: str
    port: int
    host: str
    host_port: int
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    probe: ProbeKind = "tcp"
    probe_path: str = "/"

    @property
    def target(self) -> str:
        return f"{format_host(self.host)}:{self.host_port}"

    @property
    def listen(self) -> str:
        return f"{format_host(self.bind)}:{self.port}"


@dataclass(frozen=True)
class AutoSettings:
    """``--auto``: forward what the remote Docker publishes, kept current as containers come and go.

    ``mode`` "kind": the kind API servers and registries; "all" (follow mode, ``--auto=all``): every
    TCP port any container publishes. The selectors narrow either: a container counts when it
    matches each kind of selector given (any of its patterns) and no ``exclude`` pattern.
    """

    enabled: bool = False
    mode: AutoMode = "kind"
    interval: float = DEFAULT_AUTO_INTERVAL  # seconds between full looks at the remote Docker
    linger: float = DEFAULT_AUTO_LINGER  # keep a vanished container's forward this long (restarts)
    bind: str = "localhost"
    containers: tuple[str, ...] = ()  # shell-style name patterns to consider; empty: every container
    images: tuple[str, ...] = ()  # shell-style image patterns (postgres:*, */redis:7*)
    labels: tuple[str, ...] = ()  # KEY or KEY=VALUE; a container must carry every one
    projects: tuple[str, ...] = ()  # docker compose project names (the com.docker.compose.project label)
    exclude: tuple[str, ...] = ()  # shell-style patterns of names or images to leave out


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus text metrics over HTTP; off unless a port is given."""

    port: int | None = None
    bind: str = "127.0.0.1"


@dataclass(frozen=True)
class Config:
    """The whole daemon model: forwards, one transport, timeouts."""

    forwards: tuple[ForwardSpec, ...] = ()
    transport: TransportSpec = field(default_factory=TransportSpec)
    timeouts: Timeouts = field(default_factory=Timeouts)
    allow_non_loopback: bool = False
    auto: AutoSettings = field(default_factory=AutoSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    def fingerprint(self) -> str:
        """A stable digest of the model, used to tell whether a running daemon has this config."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def is_loopback(bind: str) -> bool:
    """True for addresses only this machine can reach (localhost, 127/8, ::1)."""
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False


# -L [BIND:]PORT:HOST:HOSTPORT, where BIND and HOST may be [bracketed] IPv6 addresses.
_HOSTPART = r"(?:\[[^\]]+\]|[^:\[\]]+)"
_FORWARD_RE = re.compile(rf"^(?:(?P<bind>{_HOSTPART}|):)?(?P<port>[^:]+):(?P<host>{_HOSTPART}):(?P<hport>[^:]+)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-\[\]]*$")


def parse_forward_arg(text: str, *, key: str = "-L") -> ForwardSpec:
    """Parse one OpenSSH-style ``[BIND:]PORT:HOST:HOSTPORT``.

    :raises ConfigError: naming the value and the expected shape.
    """
    m = _FORWARD_RE.match(text.strip())
    if not m:
        raise ConfigError(
            f"{key} {text!r}: expected [BIND:]PORT:HOST:HOSTPORT, e.g. 127.0.0.1:5000:127.0.0.1:5000 "
            "(bracket IPv6 addresses: [::1]:5000:[::1]:5000)"
        )
    bind = _unbracket(m["bind"] or "localhost")
    host = _unbracket(m["host"])
    port = _port(m["port"], f"{key} {text!r}: local PORT", allow_zero=True)
    host_port = _port(m["hport"], f"{key} {text!r}: HOSTPORT", allow_zero=False)
    return ForwardSpec(name=text.strip(), bind=bind, port=port, host=host, host_port=host_port)


def parse_via(text: str, *, key: str = "--via") -> TransportSpec:
    """Parse ``direct``, ``docker`` or ``ssh://[user@]host[:port]``.

    :raises ConfigError: naming the value and the accepted forms.
    """
    if text in ("direct", "docker"):
        return TransportSpec(kind=text)  # type: ignore[arg-type]
    if text.startswith("ssh://"):
        return TransportSpec(kind="ssh", ssh=_parse_ssh_url(text, key))
    raise ConfigError(f"{key}: expected direct, docker or ssh://[user@]host[:port], got {text!r}")


def _parse_ssh_url(text: str, key: str) -> SshSettings:
    rest = text[len("ssh://") :].rstrip("/")
    user: str | None = None
    if "@" in rest:
        user, rest = rest.rsplit("@", 1)
        if not user:
            raise ConfigError(f"{key}: empty user in {text!r}; write ssh://user@host or ssh://host")
    m = re.match(r"^(\[[^\]]+\]|[^:]+)(?::(.*))?$", rest)
    if not m or not m[1]:
        raise ConfigError(f"{key}: expected ssh://[user@]host[:port], got {text!r}")
    port = _port(m[2], f"{key} {text!r}: port", allow_zero=False) if m[2] is not None else None
    return SshSettings(host=_unbracket(m[1]), user=user, port=port)


def _unbracket(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _port(text: str, key: str, *, allow_zero: bool) -> int:
    """A port written as text (-L, --via, a URL); a TOML file's ports are integers (``_Table.port``)."""
    low = 0 if allow_zero else 1
    if not (text.isascii() and text.isdigit() and low <= int(text) <= 65535):
        raise ConfigError(f"{key}: expected an integer {low}..65535, got {text!r}")
    return int(text)


class _Table:
    """Typed reads from one TOML table; every error names the full key."""

    def __init__(self, data: object, key: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{key or 'config'}: expected a table, got {type(data).__name__}")
        self.data: Mapping[str, Any] = data
        self.key = key
        self.seen: set[str] = set()

    def path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def get(self, name: str) -> Any:
        self.seen.add(name)
        return self.data.get(name)

    def str_(self, name: str, default: str | None) -> str | None:
        v = self.get(name)
        if v is None:
            return default
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{self.path(name)}: expected a non-empty string, got {v!r}")
        return v

    def bool_(self, name: str, default: bool | None) -> bool | None:
        v = self.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ConfigError(f"{self.path(name)}: expected true or false, got {v!r}")
        return v

    def num(self, name: str, default: float, *, low: float = 0.0) -> float:
        v = self.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= low:
            raise ConfigError(f"{self.path(name)}: expected a number of seconds > {low:g}, got {v!r}")
        return float(v)

    def int_(self, name: str, default: int, *, low: int, high: int) -> int:
        v = self.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise ConfigError(f"{self.path(name)}: expected an integer {low}..{high}, got {v!r}")
        return v

    def port(self, name: str, default: int | None, *, allow_zero: bool) -> int | None:
        """A TOML integer port: ``"5000"`` (a string) is refused, as ``port = "abc"`` is."""
        v = self.get(name)
        if v is None:
            return default
        low = 0 if allow_zero else 1
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= 65535:
            quoted = isinstance(v, str) and v.strip().isdigit()
            hint = " (a string: drop the quotes)" if quoted else ""
            raise ConfigError(f"{self.path(name)}: expected an integer {low}..65535, got {v!r}{hint}")
        return v

    def strs(self, name: str) -> tuple[str, ...]:
        v = self.get(name)
        if v is None:
            return ()
        if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
            raise ConfigError(f"{self.path(name)}: expected a list of strings, got {v!r}")
        return tuple(v)

    def str_or_strs(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """One non-empty string, or a non-empty list of them (no repeats)."""
        v = self.get(name)
        if v is None:
            return default
        if isinstance(v, str) and v:
            return (v,)
        if not isinstance(v, list) or not v or not all(isinstance(s, str) and s for s in v):
            raise ConfigError(f"{self.path(name)}: expected a string or a non-empty list of strings, got {v!r}")
        if len(set(v)) != len(v):
            raise ConfigError(f"{self.path(name)}: {next(s for s in v if v.count(s) > 1)!r} is listed twice")
        return tuple(v)

    def choice(self, name: str, default: str, choices: Sequence[str]) -> str:
        v = self.get(name)
        if v is None:
            return default
        if v not in choices:
            raise ConfigError(f"{self.path(name)}: expected one of {', '.join(choices)}, got {v!r}")
        return str(v)

    def table(self, name: str) -> _Table:
        return _Table(self.get(name) or {}, self.path(name))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(f"{self.path(unknown[0])}: unknown key (known keys: {', '.join(sorted(self.seen))})")


def parse_config(data: Mapping[str, Any]) -> Config:
    """Build the model from a parsed TOML document.

    :raises ConfigError: naming the first bad key and what was expected.
    """
    top = _Table(data, "")
    transport = _parse_transport(top.table("transport"))
    timeouts = _parse_timeouts(top.table("timeouts"))
    allow = top.bool_("allow_non_loopback", False)
    raw_forwards = top.get("forwards") or []
    if not isinstance(raw_forwards, list):
        raise ConfigError(f"forwards: expected an array of tables ([[forwards]]), got {type(raw_forwards).__name__}")
    forwards = tuple(_parse_forward(_Table(f, f"forwards[{i}]")) for i, f in enumerate(raw_forwards))
    auto = _parse_auto(top.table("auto"))
    metrics = _parse_metrics(top.table("metrics"))
    top.done()
    return validate(Config(forwards=forwards, transport=transport, timeouts=timeouts, allow_non_loopback=bool(allow),
                           auto=auto, metrics=metrics), via_chosen=names_transport(data))


def names_transport(data: Mapping[str, Any]) -> bool:
    """True when a TOML document chooses its transport (``[transport] via``); else it is direct by
    default, and ``start --auto`` picks the Docker host for it."""
    transport = data.get("transport")
    return isinstance(transport, Mapping) and transport.get("via") is not None


def _parse_auto(t: _Table) -> AutoSettings:
    labels = t.strs("labels")
    for label in labels:
        if label.startswith("="):
            raise ConfigError(f"{t.path('labels')}: {label!r} has no key; write KEY or KEY=VALUE")
    out = AutoSettings(
        enabled=bool(t.bool_("enabled", False)),
        mode=t.choice("mode", "kind", AUTO_MODES),  # type: ignore[arg-type]
        interval=t.num("interval", DEFAULT_AUTO_INTERVAL),
        linger=t.num("linger", DEFAULT_AUTO_LINGER),
        bind=_unbracket(t.str_("bind", "localhost") or "localhost"),
        containers=t.strs("containers"),
        images=t.strs("images"),
        labels=labels,
        projects=t.strs("projects"),
        exclude=t.strs("exclude"),
    )
    t.done()
    return out


def _parse_metrics(t: _Table) -> MetricsSettings:
    out = MetricsSettings(port=t.port("port", None, allow_zero=True),
                          bind=_unbracket(t.str_("bind", "127.0.0.1") or "127.0.0.1"))
    t.done()
    return out


def _parse_forward(t: _Table) -> ForwardSpec:
    name = t.str_("name", None)
    if name is None:
        raise ConfigError(f"{t.path('name')}: missing; every forward needs a name, e.g. name = \"registry\"")
    if not _NAME_RE.match(name):
        raise ConfigError(f"{t.path('name')}: expected letters, digits and . _ - :, got {name!r}")
    host = t.str_("host", None)
    if host is None:
        raise ConfigError(f"{t.path('host')}: missing; the address to reach on the far side, e.g. \"127.0.0.1\"")
    host_port = t.port("host_port", None, allow_zero=False)
    if host_port is None:
        raise ConfigError(f"{t.path('host_port')}: missing; the port to reach on the far side, e.g. 5000")
    spec = ForwardSpec(
        name=name,
        bind=_unbracket(t.str_("bind", "localhost") or "localhost"),
        port=t.port("port", 0, allow_zero=True) or 0,
        host=_unbracket(host),
        host_port=host_port,
        max_connections=t.int_("max_connections", DEFAULT_MAX_CONNECTIONS, low=1, high=1_000_000),
        probe=t.choice("probe", "tcp", ("tcp", "http", "https")),  # type: ignore[arg-type]
        probe_path=t.str_("probe_path", "/") or "/",
    )
    t.done()
    return spec


def _parse_transport(t: _Table) -> TransportSpec:
    via = t.str_("via", "direct") or "direct"
    base = parse_via(via, key=t.path("via"))
    d = t.table("docker")
    docker = DockerSettings(
        host=d.str_("host", None),
        tls_verify=d.bool_("tls_verify", None),
        cert_path=d.str_("cert_path", None),
        context=d.str_("context", None),
        helper_images=d.str_or_strs("helper_image", DEFAULT_HELPER_IMAGES),
        helper_name=d.str_("helper_name", DEFAULT_HELPER_NAME) or DEFAULT_HELPER_NAME,
        pool_size=d.int_("pool_size", 4, low=0, high=256),
        mux_execs=d.int_("mux_execs", 2, low=0, high=16),
    )
    d.done()
    s = t.table("ssh")
    ssh = SshSettings(
        host=base.ssh.host,
        user=s.str_("user", base.ssh.user),
        port=s.port("port", base.ssh.port, allow_zero=False),
        identity_files=s.strs("identity_files"),
        known_hosts=s.str_("known_hosts", None),
        check_host_key=bool(s.bool_("check_host_key", True)),
        config_file=s.str_("config_file", None),
        keepalive_interval=s.num("keepalive_interval", 5.0),
        keepalive_count_max=s.int_("keepalive_count_max", 3, low=1, high=100),
        reconnect_max_delay=s.num("reconnect_max_delay", 10.0),
    )
    s.done()
    t.done()
    return TransportSpec(kind=base.kind, docker=docker, ssh=ssh)


def _parse_timeouts(t: _Table) -> Timeouts:
    out = Timeouts(**{f.name: t.num(f.name, f.default) for f in dataclasses.fields(Timeouts)})  # type: ignore[arg-type]
    t.done()
    return out


def validate(config: Config, *, cli_forwards: int = 0, via_chosen: bool = True) -> Config:
    """Check rules that span keys: unique names, unique listen addresses, loopback-only binds, no
    forward (nor ``--auto``) that would reach its own listener over the direct transport.

    The last ``cli_forwards`` forwards came from ``-L`` and are named as the command line gave them
    (``-L #2 '5000:127.0.0.1:5000'``), the others by their key (``forwards[1]``). ``via_chosen``
    False: the transport is the default one, not chosen, and the caller picks one for ``--auto``.

    :raises ConfigError: naming the offending forward.
    """
    first_cli = len(config.forwards) - cli_forwards

    def where(i: int, key: str = "") -> str:
        if i < first_cli:
            return f"forwards[{i}]{'.' + key if key else ''}"
        return f"-L #{i - first_cli + 1} {config.forwards[i].name!r}"

    names: dict[str, int] = {}
    listens: dict[tuple[str, int], int] = {}
    for i, f in enumerate(config.forwards):
        if f.name in names:
            j = names[f.name]
            if j >= first_cli:
                raise ConfigError(f"{where(i)}: the same forward as {where(j)}; give each -L once")
            raise ConfigError(f"{where(i, 'name')}: {f.name!r} is used twice"
                              + (f" (also by {where(j)})" if i >= first_cli else "") + "; names must be unique")
        names[f.name] = i
        if f.port and (f.bind, f.port) in listens:
            raise ConfigError(f"{where(i)}: {f.listen} is listened on twice (also by {where(listens[f.bind, f.port])})")
        listens[f.bind, f.port] = i
        if not config.allow_non_loopback and not is_loopback(f.bind):
            what = f"{where(i, 'bind')}: {f.bind!r}" if i < first_cli else f"{where(i)}: BIND {f.bind!r}"
            raise ConfigError(
                f"{what} is not a loopback address; binding it exposes the remote "
                "port to the network. Pass --allow-non-loopback (or allow_non_loopback = true) if you mean it"
            )
        if config.transport.kind == "direct" and _reaches_itself(f):
            name = f" ({f.name})" if i < first_cli else ""
            raise ConfigError(
                f"{where(i)}{name}: {f.listen} -> {f.target} would connect to its own listener over the "
                "direct transport (a loop). To reach a port on a remote Docker host, pass --via docker or "
                "--via ssh://HOST; for a local service, listen on another port"
            )
    for key, bind in (("auto.bind", config.auto.bind), ("metrics.bind", config.metrics.bind)):
        if not config.allow_non_loopback and not is_loopback(bind):
            raise ConfigError(f"{key}: {bind!r} is not a loopback address; pass --allow-non-loopback if you mean it")
    if config.auto.enabled and config.transport.kind == "direct" and via_chosen:
        raise ConfigError(
            "auto: --auto (auto.enabled) forwards every port it finds on the same port number here, so over the "
            "direct transport each forward would connect to its own listener (a loop). Pass --via docker or "
            "--via ssh://HOST (transport.via), or leave --via out to use the Docker host in DOCKER_HOST"
        )
    if config.transport.kind == "ssh" and not config.transport.ssh.host:
        raise ConfigError("transport.via: ssh needs a host, e.g. ssh://user@host:22")
    return config


def _reaches_itself(f: ForwardSpec) -> bool:
    """True when HOST:HOSTPORT, reached from this machine, is the forward's own listening address.

    Pure: names other than ``localhost`` are not resolved, so only addresses and localhost count.
    """
    if f.port == 0 or f.port != f.host_port:
        return False
    local = {"localhost": {"127.0.0.1", "::1"}}
    binds, hosts = local.get(f.bind, {f.bind}), local.get(f.host, {f.host})
    if binds & hosts:
        return True
    wildcard = {"0.0.0.0": False, "::": True}.get(f.bind)  # v6 wildcard: also takes v4 (dual-stack)
    if wildcard is None:
        return bool(hosts & {"0.0.0.0", "::"}) and f.bind in ("127.0.0.1", "::1", "localhost")
    return any(is_loopback(h) and (wildcard or ":" not in h) for h in hosts)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into plain data (not yet checked: ``parse_config`` does that).

    :raises ConfigError: when the file is missing, unreadable or not TOML, naming it.
    """
    p = Path(path)
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


def load_config(path: str | Path) -> Config:
    """Read and parse a TOML config file.

    :raises ConfigError: when the file is missing, not TOML, or has a bad key.
    """
    return config_from_toml(read_toml(path), path)


def config_from_toml(data: Mapping[str, Any], path: str | Path) -> Config:
    """``parse_config`` for the document ``read_toml(path)`` returned: errors name the file.

    :raises ConfigError: ``PATH: key: what is wrong``.
    """
    try:
        return parse_config(data)
    except ConfigError as e:
        raise ConfigError(f"{Path(path)}: {e}") from None


def merge_cli(
    base: Config,
    *,
    forwards: Sequence[str] = (),
    via: str | None = None,
    allow_non_loopback: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Apply the CLI shorthands (-L, --via, ...) onto a model from a file (or the default one).

    :raises ConfigError: for a malformed -L or --via, named as given (``-L #2 '...'``).
    """
    extra = tuple(parse_forward_arg(f) for f in forwards)
    transport = base.transport
    if via is not None:
        new = parse_via(via)
        transport = dataclasses.replace(transport, kind=new.kind)
        if new.kind == "ssh":
            transport = dataclasses.replace(
                transport,
                ssh=dataclasses.replace(
                    transport.ssh, host=new.ssh.host, user=new.ssh.user or transport.ssh.user,
                    port=new.ssh.port or transport.ssh.port,
                ),
            )
    if overrides:
        transport = _apply_overrides(transport, overrides)
    cfg = dataclasses.replace(
        base,
        forwards=base.forwards + extra,
        transport=transport,
        allow_non_loopback=base.allow_non_loopback or allow_non_loopback,
    )
    return validate(cfg, cli_forwards=len(extra))


def _apply_overrides(transport: TransportSpec, overrides: Mapping[str, Any]) -> TransportSpec:
    """Apply dotted overrides such as ``{"docker.helper_images": ("x",), "ssh.identity_files": (...)}``."""
    for dotted, value in overrides.items():
        section, _, name = dotted.partition(".")
        sub = getattr(transport, section)
        transport = dataclasses.replace(transport, **{section: dataclasses.replace(sub, **{name: value})})
    return transport
