#!/usr/bin/env bash
# The main job, end to end on a fresh machine (root): install, bring up the lab (a CircleCI-style
# remote Docker host in a network namespace), forward its registry over Docker-over-TLS with
# kci-tunneld, push and pull a 24 MiB image through the forward with skopeo, show status, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
python3 -m tests.lab up

# The CircleCI shape: DOCKER_HOST=tcp://IP:2376, DOCKER_TLS_VERIFY=1, DOCKER_CERT_PATH.
eval "$(python3 -m tests.lab env --tls)"
work=$(mktemp -d)
control="$work/control.sock"
trap 'kci-tunneld stop --cleanup --control "$control" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

echo "== the registry is on the remote host's 127.0.0.1:5000, unreachable from here:"
curl -s -m 2 -o /dev/null http://127.0.0.1:5000/v2/ && echo "  (unexpectedly reachable)" || echo "  not reachable (as expected)"

echo "== kci-tunneld start --detach --via docker -L 127.0.0.1:5001:127.0.0.1:5000"
kci-tunneld start --detach --via docker -L 127.0.0.1:5001:127.0.0.1:5000 --control "$control"

echo "== skopeo push and pull through the forward"
python3 - "$work" <<'PY'
import sys, time
from pathlib import Path
from tests import oci
work = Path(sys.argv[1])
image = oci.build_layout(work / "image", (12 << 20, 8 << 20, 4 << 20))
t0 = time.monotonic()
oci.push(image, "127.0.0.1:5001", "demo/app")
back = oci.pull("127.0.0.1:5001", "demo/app", image.tag, work / "back")
dt = time.monotonic() - t0
assert back.layer_digests == image.layer_digests, "layer digests differ"
print(f"  pushed and pulled {image.size >> 20} MiB in {dt:.2f}s; {len(image.layer_digests)} layer digests identical")
PY

echo "== kci-tunneld status"
kci-tunneld status --control "$control"
echo "== kci-tunneld stop --cleanup"
kci-tunneld stop --cleanup --control "$control"
trap 'rm -rf "$work"' EXIT
