#!/usr/bin/env bash
# Install everything the tests need (PostgreSQL and Redis servers, nftables and iproute2 for the network
# slot tests, npm for the real CLIs, from Debian packages; Python deps)
# and run the whole suite. The tests start their own PostgreSQL and Redis on free loopback ports.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
. "$(dirname "$0")/lib.sh"
apt_install postgresql redis-server nftables iproute2 procps npm
ensure_venv test
cd "$ROOT"
# Server-backed tests fail instead of skipping when their server cannot start.
export POLYDEV_REQUIRE_SERVERS=1
exec "$VENV/bin/python" -m pytest "$@"
