# Shared by scripts/run.sh and scripts/test.sh: system packages and the project's virtualenv.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${POLYDEV_VENV:-$ROOT/.venv}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# CI must run every test: the developers' switches that skip some (POLYDEV_SKIP_VM_TESTS=1,
# POLYDEV_SKIP_FULL_IMAGE=1, any POLYDEV_SKIP_*) are refused when CI=true, before anything is installed.
refuse_skips_in_ci() {
  case "${CI:-}" in true|1) ;; *) return 0 ;; esac
  local name set=()
  for name in $(compgen -v POLYDEV_SKIP_ || true); do
    [ -n "${!name}" ] && set+=("$name=${!name}")
  done
  [ ${#set[@]} -eq 0 ] && return 0
  die "CI=true: refusing ${set[*]}: CI runs every test, none may be skipped (unset them)"
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root to run: $*"; fi
}

# Install the Debian packages that are not installed yet (one apt-get run, only when needed).
apt_install() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing packages (${missing[*]}) and no apt-get to install them"
  say "installing Debian packages: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

find_python() {
  local py
  for py in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$py" ] && command -v "$py" >/dev/null || continue
    if "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then echo "$py"; return 0; fi
  done
  die "Polydev needs Python >= 3.11 (set PYTHON=/path/to/python3.11)"
}

# Create the virtualenv and install the project with the given extras; skipped when nothing changed.
ensure_venv() {
  local extras=$1 py stamp want
  py=$(find_python)
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV"
    if ! "$py" -m venv "$VENV" 2>/dev/null; then
      rm -rf "$VENV"
      apt_install python3-venv   # Debian splits venv/ensurepip out of python3
      "$py" -m venv "$VENV"
    fi
  fi
  stamp="$VENV/.polydev-installed"
  want="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)-$extras"
  have=$(cat "$stamp" 2>/dev/null || true)
  # A runtime-only install is satisfied by any install of the same pyproject (extras are a superset).
  if [ "$have" != "$want" ] && { [ -n "$extras" ] || [ "${have%%-*}" != "${want%%-*}" ]; }; then
    say "installing Polydev and its Python dependencies (${extras:-runtime})"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q -e "$ROOT${extras:+[$extras]}"
    echo "$want" > "$stamp"
  fi
}
