#!/usr/bin/env bash
# The TRB method benchmark (solver and loss on a Qwen3-sized vocabulary; a few minutes):
#   bash scripts/bench.sh [benchmarks/bench_trb.py args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$TRB_ROOT"
exec "$TRB_PYTHON" benchmarks/bench_trb.py "$@"
