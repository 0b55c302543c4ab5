#!/usr/bin/env bash
# Install the Debian packages named as arguments that are not installed yet (root; apt-get);
# arguments that start with "-" are apt-get install options.
# The package lists may be missing or stale on a fresh machine: when the install fails, update
# them once and install again. Used by scripts/local_slurm.sh and scripts/build_image.sh.
#
#   bash scripts/apt_install.sh [--no-install-recommends] PACKAGE...
set -euo pipefail
options=() missing=()
for p in "$@"; do
  [[ "$p" == -* ]] && { options+=("$p"); continue; }
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "[apt_install] installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${options[@]}" "${missing[@]}" >/dev/null 2>&1 || {
  apt-get update -q >/dev/null
  apt-get install -y -q "${options[@]}" "${missing[@]}" >/dev/null
}
