#!/usr/bin/env bash
# One call on a GPU machine (no vLLM needed): build the CUDA ops, test them against the PyTorch twins,
# benchmark them at Llama-3-8B shapes, print a table. Results go to $OUT (or outputs/) as well.
#
# It does this twice: for the kernels on main, then for main + each patch in csrc/pending/ (applied to
# a copy in a temporary folder), so one device call says whether the pending rework is correct and faster.
# Then it runs the calibration tests that need a GPU (`--device cuda` against the CPU) and, last, the
# compiled-layer tests on CUDA (segments, scored and final segments and partial layers through dynamo and inductor).
#
# `bash scripts/gpu_check.sh --pending-only` checks only main + the pending patches (build, op tests,
# benchmark): for a second call in one session, when main's results are already in hand.
set -uo pipefail
PENDING_ONLY=0; [ "${1:-}" = "--pending-only" ] && PENDING_ONLY=1
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
ARCHS=${TIDE_CUDA_ARCHS:-90}
TORCH_PREFIX=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"

check() {   # check NAME SOURCE_ROOT: build, op tests, benchmark
  local name=$1 root=$2 bdir=$PWD/build/ops-$1
  echo "==== $name: build"
  cmake -S "$root" -B "$bdir" -DCMAKE_BUILD_TYPE=Release -DTIDE_CUDA_ARCHS="$ARCHS" \
    -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" >"$OUT/build_$name.log" 2>&1 \
    && cmake --build "$bdir" -j 16 >>"$OUT/build_$name.log" 2>&1 || { tail -40 "$OUT/build_$name.log"; return 1; }
  local lib; lib=$(ls "$bdir"/*tide_ops*.so) && echo "built $lib"
  echo "==== $name: op tests (CUDA kernels vs PyTorch twins)"
  (cd "$root" && TIDE_OPS_LIBRARY=$lib PYTHONPATH=. $PY -m pytest -q -p no:cacheprovider tests/test_ops.py -k cuda) \
    2>&1 | tee "$OUT/tests_$name.log" | tail -15
  echo "==== $name: benchmark"
  (cd "$root" && TIDE_OPS_LIBRARY=$lib PYTHONPATH=. $PY benchmarks/ops_bench.py --json "$OUT/ops_bench_$name.json") \
    2>&1 | tee "$OUT/bench_$name.log"
}

[ $PENDING_ONLY = 1 ] || check main "$PWD"
patches=(csrc/pending/*.patch)
if [ -e "${patches[0]}" ]; then
  src=$(mktemp -d)/src   # outside the repo, so git apply patches this copy and nothing else
  mkdir -p "$src" && cp -r CMakeLists.txt csrc vllm_tide tests benchmarks "$src"/
  for p in "${patches[@]}"; do
    (cd "$src" && { git apply "$OLDPWD/$p" 2>/dev/null || patch -s -p1 <"$OLDPWD/$p"; }) \
      || { echo "pending patch $p does not apply"; exit 1; }
  done
  check pending "$src"
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
