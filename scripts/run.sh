#!/usr/bin/env bash
# Install Polydev and start it on its embedded default: SQLite and the in-process session store, with
# state in /var/lib/polydev (as root) or ~/.local/share/polydev, the QEMU backend, and the golden VM image
# built on first run (a few minutes) or reused from its cache. The first start prints an admin token.
#   POLYDEV_IMAGE_PROFILE=full|test   which image to build (default full: with the login browser)
#   POLYDEV_SKIP_IMAGE=1              start the API without building the image
set -euo pipefail
. "$(dirname "$0")/lib.sh"
profile=${POLYDEV_IMAGE_PROFILE:-full}
if [ "${POLYDEV_SKIP_IMAGE:-0}" != 1 ]; then
  apt_install qemu-system-x86 qemu-utils debootstrap e2fsprogs kmod linux-image-cloud-amd64 socat
fi
# npm fetches the CLIs for the image and the dashboard's noVNC and xterm.js.
command -v npm >/dev/null || apt_install npm
ensure_venv ""
# The dashboard's noVNC and xterm.js, pinned and integrity-checked; the API runs without them (the login view
# and the terminal panel say so).
"$VENV/bin/polydev" web vendor || say "warning: noVNC/xterm.js not installed: the dashboard cannot show the login browser or a workspace terminal"
if [ "${POLYDEV_SKIP_IMAGE:-0}" != 1 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    "$VENV/bin/polydev" image build --profile "$profile"
  else
    say "not root: skipping the VM image build (debootstrap needs root); VMs are unavailable"
  fi
fi
say "starting Polydev on ${HOST:-127.0.0.1}:${PORT:-4000}"
exec "$VENV/bin/polydev" serve "$@"
