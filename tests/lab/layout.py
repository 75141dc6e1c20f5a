"""Where everything in the lab lives: names, addresses, paths, deadlines, and `LabInfo`.

One place, so the daemons' flags, the generated configs and the tests cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NETNS = "kcilab"
NETNS_PATH = Path("/var/run/netns") / NETNS
HOST_VETH, NS_VETH = "kcilab0", "kcilab1"
# A /30 used by nothing but this lab; the namespace address is the "remote host".
HOST_IP, NS_IP, PREFIX_LEN = "10.213.77.1", "10.213.77.2", 30
# The namespace's ephemeral ports, where its dockerd picks random published ports: below this
# machine's (32768-60999), so follow mode's same-number forwards never meet a client socket here.
NS_EPHEMERAL = "20000 29999"

RUN_DIR = Path("/run/kcilab")  # sockets, pids, logs, keys: nothing that must survive a reboot
STATE_DIR = Path("/var/lib/kcilab")  # the image store: kept by `down`, removed by --purge
LOCK_FILE = RUN_DIR / "lock"
# Downloads `up` may reuse: socat 1.8 (tests/lab/socat18.py). Kept by `down`, removed by --purge.
CACHE_DIR = Path("/var/cache/kcilab")
SOCAT18_DIR = CACHE_DIR / "socat18"

DATA_ROOT = STATE_DIR / "docker"
EXEC_ROOT = RUN_DIR / "exec"  # dockerd's own containerd keeps its socket and state here
DOCKER_SOCK = RUN_DIR / "docker.sock"
DOCKERD_PID = RUN_DIR / "dockerd.pid"
DOCKERD_LOG = RUN_DIR / "dockerd.log"
DAEMON_JSON = RUN_DIR / "daemon.json"
DOCKER_TCP_PORT = 2376
CERT_DIR = RUN_DIR / "certs"

REGISTRY_CONTAINER = "kcilab-registry"
REGISTRY_PORT = 5000

ECHO_SCRIPT = Path(__file__).with_name("echo.py")
ECHO_PORT = 7007
ECHO_PID = RUN_DIR / "echo.pid"
ECHO_LOG = RUN_DIR / "echo.log"

SSH_DIR = RUN_DIR / "ssh"
SSH_PORT = 22
SSH_ALIAS = "kcilab"
SSHD_CONFIG = SSH_DIR / "sshd_config"
SSHD_HOST_KEY = SSH_DIR / "ssh_host_ed25519_key"
SSH_CLIENT_KEY = SSH_DIR / "id_ed25519"
SSH_AUTHORIZED_KEYS = SSH_DIR / "authorized_keys"
SSH_KNOWN_HOSTS = SSH_DIR / "known_hosts"
SSH_CLIENT_CONFIG = SSH_DIR / "config"
SSHD_PID = RUN_DIR / "sshd.pid"
SSHD_LOG = RUN_DIR / "sshd.log"

# Every wait has a deadline; they all live here.
DOCKERD_START_TIMEOUT = 60.0
DOCKERD_STOP_TIMEOUT = 30.0  # dockerd stops its containers first
SERVICE_START_TIMEOUT = 30.0
PROCESS_STOP_TIMEOUT = 10.0
PROBE_TIMEOUT = 5.0
CLI_TIMEOUT = 120.0
DOWNLOAD_TIMEOUT = 300.0  # each apt-get call fetching socat 1.8's packages


class LabError(RuntimeError):
    """The lab could not be brought to the requested state; the message says why and what to do."""


@dataclass(frozen=True)
class LabInfo:
    """Every address and path a test needs to use the lab."""

    netns: str
    netns_path: Path
    host_veth: str
    ns_veth: str
    host_ip: str  # this (CI) side of the veth
    ns_ip: str  # the "remote host" address: Docker TCP and SSH listen here
    run_dir: Path
    state_dir: Path
    docker_sock: Path
    docker_host_unix: str  # DOCKER_HOST value for the unix socket
    docker_host_tcp: str  # DOCKER_HOST value for TCP+TLS
    docker_tcp_port: int
    cert_dir: Path
    ca_cert: Path
    client_cert_dir: Path  # a DOCKER_CERT_PATH the daemon accepts
    wrong_client_cert_dir: Path  # lab CA + a client cert from an unrelated CA: refused
    registry_container: str
    registry_addr: str  # host:port inside the namespace only: the gap to bridge
    registry_port: int
    registry_image: str
    socat_image: str  # socat 1.7 (this machine's), as alpine/socat:latest
    socat18_image: str  # socat 1.8 from the next Debian release, with its own libc (tests/lab/socat18.py)
    socat18_dir: Path  # where `up` keeps socat 1.8's packages, unpacked
    busybox_image: str
    python_image: str  # busybox and python3: the docker transport's python relays
    # The same image under the name that starts tunneld.config's DEFAULT_HELPER_IMAGES, so that a daemon
    # with the default helper list finds it on the lab's Docker host (offline) and runs the mux relay.
    python_default_image: str
    echo_host: str  # inside the namespace only
    echo_host6: str
    echo_port: int
    ssh_alias: str  # Host alias defined in ssh_config
    ssh_host: str
    ssh_port: int
    ssh_user: str
    ssh_key: Path
    ssh_known_hosts: Path
    ssh_config: Path
    dockerd_pidfile: Path
    dockerd_log: Path
    sshd_log: Path

    def docker_env(self, tls: bool = False) -> dict[str, str]:
        """Environment variables that point a Docker client at the lab."""
        if tls:
            return {
                "DOCKER_HOST": self.docker_host_tcp,
                "DOCKER_TLS_VERIFY": "1",
                "DOCKER_CERT_PATH": str(self.client_cert_dir),
            }
        return {"DOCKER_HOST": self.docker_host_unix}


INFO = LabInfo(
    netns=NETNS,
    netns_path=NETNS_PATH,
    host_veth=HOST_VETH,
    ns_veth=NS_VETH,
    host_ip=HOST_IP,
    ns_ip=NS_IP,
    run_dir=RUN_DIR,
    state_dir=STATE_DIR,
    docker_sock=DOCKER_SOCK,
    docker_host_unix=f"unix://{DOCKER_SOCK}",
    docker_host_tcp=f"tcp://{NS_IP}:{DOCKER_TCP_PORT}",
    docker_tcp_port=DOCKER_TCP_PORT,
    cert_dir=CERT_DIR,
    ca_cert=CERT_DIR / "ca.pem",
    client_cert_dir=CERT_DIR / "client",
    wrong_client_cert_dir=CERT_DIR / "wrong-client",
    registry_container=REGISTRY_CONTAINER,
    registry_addr=f"127.0.0.1:{REGISTRY_PORT}",
    registry_port=REGISTRY_PORT,
    registry_image="registry:2",
    socat_image="alpine/socat:latest",
    socat18_image="kcilab/socat18:latest",
    socat18_dir=SOCAT18_DIR,
    busybox_image="kcilab/busybox:latest",
    python_image="kcilab/python:latest",
    python_default_image="python:3.13-alpine",
    echo_host="127.0.0.1",
    echo_host6="::1",
    echo_port=ECHO_PORT,
    ssh_alias=SSH_ALIAS,
    ssh_host=NS_IP,
    ssh_port=SSH_PORT,
    ssh_user="root",
    ssh_key=SSH_CLIENT_KEY,
    ssh_known_hosts=SSH_KNOWN_HOSTS,
    ssh_config=SSH_CLIENT_CONFIG,
    dockerd_pidfile=DOCKERD_PID,
    dockerd_log=DOCKERD_LOG,
    sshd_log=SSHD_LOG,
)
