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
source scripts/ops_build_lib.sh   # pending_tree, build_ops
src=$(mktemp -d)/src
shopt -s nullglob   # no pending patch: profile main
pending_tree "$src" csrc/pending/*.patch && lib=$(build_ops prof "$src") || exit 1
export TIDE_OPS_LIBRARY=$lib PYTHONPATH=$src
cat >/tmp/drive_router.py <<'PYEOF'
import sys, torch
import vllm_tide.ops as ops   # loads the library
n, kernel = int(sys.argv[1]), sys.argv[2]
ops.forced_router_kernel(kernel).__enter__()
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
for case in "1 cuda_cores" "64 cuda_cores" "512 cublas" "4096 cublas"; do
  set -- $case
  echo "==== n=$1 kernel=$2"
  timeout 60 "$NCU" --clock-control none --profile-from-start off --target-processes all \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section SourceCounters \
    $PY /tmp/drive_router.py "$1" "$2" >"$OUT/ncu_router_n$1_$2.txt" 2>&1
  # each kernel's header line (", Context "), cuBLAS's too, then its key figures
  grep -E ", Context |Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Dynamic Shared" "$OUT/ncu_router_n$1_$2.txt" | head -40
done
