#!/usr/bin/env bash
"""":
# TRB on-policy distillation launcher: a bash script and a Python entry point in one file.
#
#   bash examples/run_trb_distill.sh [section.key=value ...]
#       starts torchrun itself; with no GPU and no CONFIG it runs the embedded toy default
#       (examples/configs/toy_cpu.yaml: 2 gloo processes, TP=2, SGLang rollouts, about 12 minutes
#       on 2 cores).
#   torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT \
#       examples/run_trb_distill.sh [overrides]       (torchrun runs this file with Python)
#   srun ... torchrun ... examples/run_trb_distill.sh  (see examples/slurm/)
#
# Environment: CONFIG (YAML, default toy_cpu.yaml without a GPU), NNODES (1), NODE_RANK (0),
# NPROC_PER_NODE (GPUs on this node, or 2 on CPU), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500),
# DRY_RUN=1 (validate the config and the layout for NNODES x NPROC_PER_NODE, print the plan,
# no GPU needed). Extra arguments are dotted config overrides, e.g. method.name=opd. Config errors
# and paths that do not exist exit with code 2 before torchrun starts (CHECK_ONLY=1 below).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
# An installed package with torch (e.g. the container) is used as is; the check runs outside the
# checkout so that the source tree itself does not count as installed.
if [ ! -d "$root/.venv" ] && (cd / && python3 -c "import torch, trb_megatron") 2>/dev/null; then
  py=python3
else
  source "$root/scripts/venv.sh"
  py="$TRB_PYTHON"
fi
if "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export NPROC_PER_NODE="${NPROC_PER_NODE:-$("$py" -c 'import torch; print(torch.cuda.device_count())')}"
else
  export CONFIG="${CONFIG:-$root/examples/configs/toy_cpu.yaml}"
  export NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  # one vector instruction set for every CPU machine: the same results everywhere (cpu_isa.py)
  eval "$(cd "$root" && "$py" -m trb_megatron.parallel.cpu_isa)"
fi
export NNODES="${NNODES:-1}" NODE_RANK="${NODE_RANK:-0}"
cd "$root"
if [ "${DRY_RUN:-0}" = "1" ]; then
  exec "$py" "$0" "$@"
fi
CHECK_ONLY=1 "$py" "$0" "$@"
exec "$py" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --nproc-per-node "$NPROC_PER_NODE" --master-addr "${MASTER_ADDR:-127.0.0.1}" \
  --master-port "${MASTER_PORT:-29500}" "$0" "$@"
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":
    from trb_megatron.cli import main

    sys.exit(main(sys.argv[1:]))
