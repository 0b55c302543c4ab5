#!/usr/bin/env bash
# The test suite (unit, distributed on gloo processes, gpu tier skipped without CUDA):
#   bash scripts/test.sh [pytest args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$TRB_ROOT"
exec "$TRB_PYTHON" -m pytest "$@"
