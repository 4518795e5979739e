#!/usr/bin/env bash
# One GPU call: build main + the pending patches and profile tide::router_score with Nsight Compute
# (per-kernel duration, speed of light, occupancy, warp stalls, memory, hottest SASS): the CUDA-core
# kernel at 1 and 64 tokens, the cuBLAS path at 512 and 4,096 (D=4096, B=128, bf16). Text reports land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
src=$(mktemp -d)/src
mkdir -p "$src" && cp -r CMakeLists.txt csrc vllm_tide tests benchmarks scripts "$src"/
for p in csrc/pending/*.patch; do   # the patches touch tests/ too: copy it, and stop if one fails
  [ -e "$p" ] && { (cd "$src" && git apply "$OLDPWD/$p") || { echo "pending patch $p does not apply"; exit 1; }; }
done
cmake -S "$src" -B build/ops-prof -DCMAKE_BUILD_TYPE=Release -DTIDE_CUDA_ARCHS=90 \
  -DCMAKE_PREFIX_PATH="$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')" >"$OUT/prof_build.log" 2>&1 \
  && cmake --build build/ops-prof -j 16 >>"$OUT/prof_build.log" 2>&1 || { tail -30 "$OUT/prof_build.log"; exit 1; }
export TIDE_OPS_LIBRARY=$(ls "$PWD"/build/ops-prof/*tide_ops*.so) PYTHONPATH=$src
cat >/tmp/drive_router.py <<'PYEOF'
import sys, torch
import vllm_tide.ops as ops   # loads the library
n, path = int(sys.argv[1]), sys.argv[2]
ops.forced_router_kernel({"cc": "cuda_cores", "cublas": "cublas"}[path]).__enter__()
D, B, dev = 4096, 128, "cuda"
args = (torch.randn(n, D, device=dev, dtype=torch.bfloat16), torch.rand(D, device=dev) + 0.5, 1e-5,
        torch.randn(B, D, device=dev) / D ** 0.5, torch.randn(B, device=dev) * 0.1, torch.randn(B, device=dev) / B ** 0.5,
        torch.randn(1, device=dev), 0.5, torch.ones(n, dtype=torch.bool, device=dev))
for _ in range(3):
    torch.ops.tide.router_score(*args)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
torch.ops.tide.router_score(*args)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
PYEOF
echo "ncu: $NCU"
for case in "1 cc" "64 cc" "512 cublas" "4096 cublas"; do
  set -- $case
  echo "==== n=$1 path=$2"
  timeout 60 "$NCU" --clock-control none --profile-from-start off --target-processes all \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section SourceCounters \
    $PY /tmp/drive_router.py "$1" "$2" >"$OUT/ncu_router_n$1_$2.txt" 2>&1
  # each kernel's header line (", Context "), cuBLAS's too, then its key figures
  grep -E ", Context |Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Dynamic Shared" "$OUT/ncu_router_n$1_$2.txt" | head -40
done
