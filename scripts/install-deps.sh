#!/usr/bin/env bash
# Install everything the tests, the lab and the demo need (Debian packages + the project with
# its test and lint extras). Idempotent; needs root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

# docker.io: dockerd for the lab's "remote host"; docker-registry: the registry binary the lab
# imports as registry:2; busybox-static + socat: the helper images; skopeo/curl: real clients;
# openssh-*: the lab's sshd and the ssh -L baseline; iperf3: benchmarks; systemd: systemd-analyze;
# python3.11: Debian's interpreter and stdlib, copied into the lab's python helper image;
# debian-archive-keyring: checks the next release's packages the lab fetches socat 1.8 from (tests/lab/socat18.py).
# libsodium23: chacha20-poly1305's small SSH packets (tunneld/ssh/sodium.py; optional at run time, tested here).
packages=(docker.io docker-registry busybox-static socat skopeo curl openssh-server openssh-client
          iproute2 openssl iperf3 procps systemd python3.11 debian-archive-keyring libsodium23)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "== apt-get install ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "== pip install -e .[test,lint]"
python3 -m pip install -q --disable-pip-version-check -e ".[test,lint]"
