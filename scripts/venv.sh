#!/usr/bin/env bash
# Create or reuse a pinned CPU environment at the repo root. There are two, the two ends of the
# supported megatron-core range (scripts/test.sh runs the Megatron tests in both), pinned in
# scripts/environments.txt:
#   main   .venv/     Python 3.11 with SGLang (without its CUDA-only requirements: the colocated
#                     SGLang backend runs the trainer and the engine in one process). The
#                     environment of everything but the tests.
#   py312  .venv312/  Python 3.12, the newest megatron-core; no SGLang.
# Both take every other version from scripts/constraints-cpu.txt. torch 2.14.1 is a CUDA build
# that runs on the CPU (it brings triton, which megatron-core >= 0.18 imports); for Python 3.11
# it lies on this machine's disk, for 3.12 pip downloads it (~4 minutes, ~6 GB installed).
#   bash scripts/venv.sh [main|py312]      set up one environment (default main)
#   source scripts/venv.sh                 set up main, export TRB_ROOT and TRB_PYTHON (its python)
#   trb_venv py312                         (after sourcing) the same for another environment
# An environment is reinstalled only when setup.py, the requirement files, the environments table
# or this script change (a stamp inside it); concurrent callers (e.g. parallel benchmark runs)
# wait on a lock instead of racing pip.
set -euo pipefail
TRB_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TRB_ROOT

trb_venv() {
  local name="$1" table="$TRB_ROOT/scripts/environments.txt" dir="" python mcore sglang
  read -r dir python mcore sglang < <(awk -v name="$name" '$1 == name { print $2, $3, $4, $5 }' \
    "$table") || true
  if [ -z "$dir" ]; then
    echo "scripts/venv.sh: unknown environment '$name' ($(awk '!/^#/ && NF { print $1 }' \
      "$table" | paste -sd, -): scripts/environments.txt)" >&2
    return 2
  fi
  local venv="$TRB_ROOT/$dir" lock
  TRB_PYTHON="$venv/bin/python"
  export TRB_PYTHON
  exec {lock}>"$TRB_ROOT/$dir.lock"
  flock "$lock"
  if [ ! -x "$TRB_PYTHON" ]; then
    # python3.X on PATH, else a pyenv-installed 3.X (a pyenv shim on PATH may only complain),
    # else python3 if it is 3.X.
    local base="" candidate
    for candidate in "python$python" "$(pyenv root 2>/dev/null)"/versions/"$python".*/bin/python \
        python3; do
      if [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" \
          = "$python" ]; then
        base="$candidate"
        break
      fi
    done
    if [ -z "$base" ]; then
      echo "scripts/venv.sh: environment '$name' needs Python $python (python$python on PATH," \
        "or installed by pyenv)" >&2
      return 1
    fi
    "$base" -m venv "$venv"
  fi
  local stamp="$venv/.trb-installed" want
  want="$(cat "$TRB_ROOT/setup.py" "$TRB_ROOT/scripts/constraints-cpu.txt" \
    "$TRB_ROOT/scripts/requirements-sglang-cpu.txt" "$table" "$TRB_ROOT/scripts/venv.sh" \
    | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[venv] installing the CPU stack into $venv ('$name': Python $python," \
      "megatron-core $mcore; first run: about 5 minutes, 5-7 GB)" >&2
    local pins=(-c "$TRB_ROOT/scripts/constraints-cpu.txt")
    # pip's own messages go to stderr: callers may capture stdout.
    "$TRB_PYTHON" -m pip install --quiet --upgrade pip >&2
    # torch first, pinned, so nothing below can pull another build.
    "$TRB_PYTHON" -m pip install --quiet "${pins[@]}" torch torchvision >&2
    local extra=()
    if [ "$sglang" = 1 ]; then
      # sglang without its requirements, then the CPU-installable ones (the list says why).
      "$TRB_PYTHON" -m pip install --quiet "${pins[@]}" --no-deps sglang >&2
      extra=(-r "$TRB_ROOT/scripts/requirements-sglang-cpu.txt")
    fi
    "$TRB_PYTHON" -m pip install --quiet "${pins[@]}" "${extra[@]}" \
      "megatron-core==$mcore" -e "${TRB_ROOT}[dev]" >&2
    echo "$want" > "$stamp"
  fi
  flock -u "$lock"
  exec {lock}>&-
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  trb_venv "${1:-main}"
else
  trb_venv main
fi
