#!/usr/bin/env bash
# Install Polydev and start it on its embedded default: SQLite and the in-process session store, with
# state in /var/lib/polydev (as root) or ~/.local/share/polydev. The first start prints an admin token.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ensure_venv ""
say "starting Polydev on ${HOST:-127.0.0.1}:${PORT:-4000}"
exec "$VENV/bin/polydev" serve "$@"
