#!/usr/bin/env bash
# Create or reuse the virtual environment .venv/ at the repo root with the pinned CPU stack.
# Sourced by scripts/test.sh and scripts/bench.sh; run directly to only set up the environment:
#   bash scripts/venv.sh
# Reinstalls only when setup.py, the constraints or this script change (a stamp in .venv/);
# concurrent callers (e.g. parallel benchmark runs) wait on a lock instead of racing pip.
set -euo pipefail
TRB_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TRB_PYTHON="$TRB_ROOT/.venv/bin/python"
exec {trb_venv_lock}>"$TRB_ROOT/.venv.lock"
flock "$trb_venv_lock"
if [ ! -x "$TRB_PYTHON" ]; then
  base="$(command -v python3.11 || command -v python3)"
  "$base" -c 'import sys; assert sys.version_info >= (3, 11), "trb_megatron needs Python >= 3.11"'
  "$base" -m venv "$TRB_ROOT/.venv"
fi
stamp="$TRB_ROOT/.venv/.trb-installed"
want="$(cat "$TRB_ROOT/setup.py" "$TRB_ROOT/scripts/constraints-cpu.txt" "$TRB_ROOT/scripts/venv.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[venv] installing the CPU stack into $TRB_ROOT/.venv (first run: a few minutes)" >&2
  "$TRB_PYTHON" -m pip install --quiet --upgrade pip
  # torch first, pinned to the local CPU wheel, so nothing below can pull a CUDA build.
  "$TRB_PYTHON" -m pip install --quiet torch==2.13.0
  "$TRB_PYTHON" -m pip install --quiet -c "$TRB_ROOT/scripts/constraints-cpu.txt" -e "${TRB_ROOT}[dev]"
  echo "$want" > "$stamp"
fi
flock -u "$trb_venv_lock"
exec {trb_venv_lock}>&-
export TRB_ROOT TRB_PYTHON
