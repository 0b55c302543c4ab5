#!/usr/bin/env bash
# Create or reuse the virtual environment .venv/ at the repo root with the pinned CPU stack:
# torch 2.14.1, megatron-core, and SGLang 0.5.23 without its CUDA-only requirements, in one
# environment (the colocated SGLang backend runs the trainer and the engine in one process).
# Sourced by scripts/test.sh and scripts/bench.sh; run directly to only set up the environment:
#   bash scripts/venv.sh
# Reinstalls only when setup.py, the requirement files or this script change (a stamp in
# .venv/); concurrent callers (e.g. parallel benchmark runs) wait on a lock instead of racing pip.
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
want="$(cat "$TRB_ROOT/setup.py" "$TRB_ROOT/scripts/constraints-cpu.txt" \
  "$TRB_ROOT/scripts/requirements-sglang-cpu.txt" "$TRB_ROOT/scripts/venv.sh" \
  | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[venv] installing the CPU stack into $TRB_ROOT/.venv (first run: about 5 minutes, ~7 GB)" >&2
  pins=(-c "$TRB_ROOT/scripts/constraints-cpu.txt")
  "$TRB_PYTHON" -m pip install --quiet --upgrade pip
  # torch first, pinned, so nothing below can pull another build.
  "$TRB_PYTHON" -m pip install --quiet "${pins[@]}" torch torchvision
  # sglang without its requirements, then the CPU-installable ones (the list says why).
  "$TRB_PYTHON" -m pip install --quiet "${pins[@]}" --no-deps sglang
  "$TRB_PYTHON" -m pip install --quiet "${pins[@]}" \
    -r "$TRB_ROOT/scripts/requirements-sglang-cpu.txt" -e "${TRB_ROOT}[dev]"
  echo "$want" > "$stamp"
fi
flock -u "$trb_venv_lock"
exec {trb_venv_lock}>&-
export TRB_ROOT TRB_PYTHON
