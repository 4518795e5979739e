#!/usr/bin/env bash
# One call on a GPU machine (no vLLM needed): build the CUDA ops, test them against the PyTorch twins,
# benchmark them at Llama-3-8B shapes, print a table. Results go to $OUT (or outputs/) as well.
#
# It does this for the kernels on main, then for main + the patches in csrc/pending/ (applied in name
# order to copies in a temporary folder), so one device call says whether the pending rework is correct and
# faster; if the whole stack fails to build or test, the stack without its last patch is checked, and so on.
# Then it runs the calibration tests that need a GPU (`--device cuda` against the CPU) and, last, the
# compiled-layer tests on CUDA (segments, scored and final segments and partial layers through dynamo and inductor).
#
# `bash scripts/gpu_check.sh --pending-only` checks only main + the pending patches (build, op tests,
# benchmark, then the compiled-layer tests with the stack that passed): when main's results are in hand.
set -uo pipefail
PENDING_ONLY=0; [ "${1:-}" = "--pending-only" ] && PENDING_ONLY=1
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
source scripts/ops_build_lib.sh   # pending_tree, build_ops

check() {   # check NAME SOURCE_ROOT (built): op tests, then the benchmark if they pass
  local name=$1 root=$2 lib
  lib=$(ls "$PWD/build/ops-$name"/*tide_ops*.so 2>/dev/null) || { echo "==== $name: build failed"; tail -40 "$OUT/build_$name.log"; return 1; }
  echo "==== $name: op tests (CUDA kernels vs PyTorch twins), $lib"
  (cd "$root" && TIDE_OPS_LIBRARY=$lib PYTHONPATH=. $PY -m pytest -q -p no:cacheprovider tests/test_ops.py -k cuda) \
    2>&1 | tee "$OUT/tests_$name.log" | tail -15
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "==== $name: op tests failed"; return 1; }
  echo "==== $name: benchmark"
  (cd "$root" && TIDE_OPS_LIBRARY=$lib PYTHONPATH=. $PY benchmarks/ops_bench.py --json "$OUT/ops_bench_$name.json") \
    2>&1 | tee "$OUT/bench_$name.log"
}

[ $PENDING_ONLY = 1 ] || { build_ops main "$PWD" >/dev/null 2>&1; check main "$PWD"; }
patches=(csrc/pending/*.patch)
if [ -e "${patches[0]}" ]; then
  # main + the first k patches, for every k, each in its own copy (outside the repo, so git apply patches
  # that copy and nothing else); all built at once, then checked from the whole stack down: a patch that
  # breaks the build or the tests still leaves the ones before it measured.
  base=$(mktemp -d); roots=()
  for k in $(seq 1 ${#patches[@]}); do
    roots+=("$base/pending-$k")
    pending_tree "${roots[k-1]}" "${patches[@]:0:k}" || exit 1
  done
  echo "==== building main + pending patches 1..k for k = 1..${#patches[@]}: ${patches[*]}"
  for k in $(seq 1 ${#patches[@]}); do   # quietly: check() prints a failed build's log
    build_ops pending-$k "${roots[k-1]}" >/dev/null 2>&1 &
  done
  wait
  for k in $(seq ${#patches[@]} -1 1); do
    if check pending-$k "${roots[k-1]}"; then good=$k; break; fi
  done
  if [ -n "${good:-}" ]; then
    echo "==== pending-$good passed (patches: ${patches[*]:0:good}); compiled layers on CUDA with it"
    (cd "${roots[good-1]}" && TIDE_OPS_LIBRARY=$(ls "$OLDPWD/build/ops-pending-$good"/*tide_ops*.so) PYTHONPATH=. \
      $PY -m pytest -q -p no:cacheprovider tests/test_compiled_layers.py -k cuda -rs) 2>&1 \
      | tee "$OUT/tests_compiled_layers_pending.log" | tail -8
  fi
fi
[ $PENDING_ONLY = 1 ] && exit 0

# Calibration with --device cuda (tiny models built here, no vLLM): simulations and LM-head products
# on the GPU against the same run on the CPU.
echo "==== calibration on CUDA vs CPU"
PYTHONPATH=. $PY -m pytest -q -p no:cacheprovider tests/test_calibration.py -k cuda 2>&1 \
  | tee "$OUT/tests_calibration_cuda.log" | tail -15

# Last (inductor compiles for CUDA take a while; everything above is done by then):
echo "==== compiled layers on CUDA vs CPU (the router kernel of the main build in the scored graph)"
TIDE_OPS_LIBRARY=$(ls "$PWD"/build/ops-main/*tide_ops*.so 2>/dev/null | head -1) PYTHONPATH=. \
  $PY -m pytest -q -p no:cacheprovider tests/test_compiled_layers.py -k cuda -rs 2>&1 \
  | tee "$OUT/tests_compiled_layers_cuda.log" | tail -15
