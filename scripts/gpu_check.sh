#!/usr/bin/env bash
# One call on a GPU machine (no vLLM needed): build the CUDA ops, test them against the PyTorch twins,
# benchmark them at Llama-3-8B shapes, print a table. Results go to $OUT (or outputs/) as well.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
echo "== build"
cmake -S . -B build/ops -DCMAKE_BUILD_TYPE=Release -DTIDE_CUDA_ARCHS="${TIDE_CUDA_ARCHS:-90}" \
  -DCMAKE_PREFIX_PATH="$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')" >"$OUT/build.log" 2>&1 \
  && cmake --build build/ops -j 16 >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "built $(ls build/ops/*.so)"
echo "== op tests (CUDA kernels vs PyTorch twins)"
PYTHONPATH=. $PY -m pytest -q -p no:cacheprovider tests/test_ops.py -k cuda 2>&1 | tee "$OUT/tests.log" | tail -15
echo "== benchmark"
PYTHONPATH=. $PY benchmarks/ops_bench.py --json "$OUT/ops_bench.json" 2>&1 | tee "$OUT/bench.log"
