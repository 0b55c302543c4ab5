#!/usr/bin/env bash
# The test suite, at both ends of the supported megatron-core range (scripts/venv.sh):
#   bash scripts/test.sh [pytest args]
# 1. main  (.venv: Python 3.11, megatron-core 0.16.1, SGLang): every test: unit, distributed on
#    gloo processes, gpu tier skipped without CUDA.
# 2. py312 (.venv312: Python 3.12, megatron-core 0.19.2, no SGLang): the tests marked `megatron`
#    (pytest.ini: every test that runs megatron-core), with the same pytest args.
# TRB_TEST_ENVS="main" (or "py312") runs one environment only. Prints each environment's counts
# and time, then the total; exits non-zero if either run failed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$TRB_ROOT"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0 summary=() passed=0 failed=0 skipped=0
for env in ${TRB_TEST_ENVS:-main py312}; do
  trb_venv "$env"
  selection=()
  [ "$env" = main ] || selection=(-m megatron)
  versions="$("$TRB_PYTHON" -c 'import importlib.metadata as m, platform
print("Python", platform.python_version() + ", megatron-core", m.version("megatron-core"))')"
  echo "[test] $env ($versions): pytest ${selection[*]} $*"
  start=$SECONDS
  set +e
  "$TRB_PYTHON" -m pytest "${selection[@]}" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  # pytest's closing line, e.g. "== 300 passed, 5 skipped, 2 warnings in 420.1s (0:07:00) ==";
  # not simply the last line: the interpreter may print warnings at exit after it.
  counts="$(grep -E ' in [0-9.]+s( \([0-9:]+\))?( =+)?$' "$log" | tail -n 1 \
    | grep -oE '[0-9]+ (passed|failed|skipped|errors?|xfailed|xpassed|deselected)' \
    | paste -sd, - | sed 's/,/, /g')"
  set -e
  summary+=("$env ($versions): ${counts:-no tests}, exit $rc, $((SECONDS - start)) s")
  for kind in passed failed skipped error; do
    n="$(grep -oE "[0-9]+ $kind" <<<"$counts" | cut -d' ' -f1 || true)"
    case $kind in
      passed) passed=$((passed + ${n:-0})) ;;
      skipped) skipped=$((skipped + ${n:-0})) ;;
      *) failed=$((failed + ${n:-0})) ;;
    esac
  done
  # exit 5 = nothing selected: fine for py312 when the args pick no Megatron test.
  if [ "$rc" -ne 0 ] && ! { [ "$rc" -eq 5 ] && [ "$env" != main ]; }; then
    status=$rc
  fi
done
echo "[test] summary"
printf '[test]   %s\n' "${summary[@]}"
echo "total: $passed passed, $failed failed, $skipped skipped"
exit "$status"
