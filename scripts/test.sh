#!/usr/bin/env bash
# Install everything the tests need (PostgreSQL and Redis servers, nftables and iproute2 for the network
# slot tests, QEMU and debootstrap for the VM image, npm for the real CLIs, from Debian packages; Python deps)
# and run the whole suite. The tests start their own PostgreSQL and Redis on free loopback ports.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
. "$(dirname "$0")/lib.sh"
refuse_skips_in_ci
apt_install postgresql redis-server nftables iproute2 procps
# The VM image build and the VM tests: QEMU, debootstrap, mkfs.ext4 -d, the guest kernel; socat relays
# VM_GUEST_FORWARDS connections.
apt_install qemu-system-x86 qemu-utils debootstrap e2fsprogs kmod linux-image-cloud-amd64 socat
# The dashboard test drives Debian's Chromium through Playwright (which downloads no browser of its own).
apt_install chromium
# mkfs.xfs: the reflink clone test makes an XFS image to prove a clone's cost does not grow with the image.
apt_install xfsprogs
# The egress namespace tests drive real upstream proxies: tinyproxy (HTTP CONNECT) and dante (SOCKS5).
apt_install tinyproxy dante-server
# npm fetches Node and the CLIs from the npm registry; a machine with its own Node already has it.
command -v npm >/dev/null || apt_install npm
ensure_venv test
# The dashboard's noVNC and xterm.js, from their npm packages (pinned, integrity-checked), into the cache the
# server serves.
"$VENV/bin/polydev" web vendor
cd "$ROOT"
# Server-backed tests fail instead of skipping when their server cannot start.
export POLYDEV_REQUIRE_SERVERS=1
exec "$VENV/bin/python" -m pytest "$@"
