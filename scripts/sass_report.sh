#!/usr/bin/env bash
# Compile csrc/tide_ops.cu for sm_90 with this machine's nvcc (no GPU needed) and count the SASS
# instructions of the kernels whose names match $1 (default: router_down_tc_kernel), e.g. HMMA against
# everything else. Uses the cuobjdump that Triton's wheel carries when the CUDA toolkit has none.
#   bash scripts/sass_report.sh [KERNEL_REGEX] [SOURCE]
set -euo pipefail
cd "$(dirname "$0")/.."
PAT=${1:-router_down_tc_kernel}
SRC=${2:-csrc/tide_ops.cu}
PY=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d)
inc=$($PY -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')
mkdir -p "$tmp/inc/c10/cuda/impl" && echo '#pragma once' >"$tmp/inc/c10/cuda/impl/cuda_cmake_macros.h"  # absent from CPU wheels
nvcc -std=c++17 -c "$SRC" -o "$tmp/ops.o" -arch=sm_90 -I"$tmp/inc" -I"$inc" -I"$inc/torch/csrc/api/include" \
  --expt-relaxed-constexpr -Xcompiler -fPIC -Xptxas -v 2>"$tmp/ptxas.txt" >/dev/null
CUOBJ=$(command -v cuobjdump || $PY -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))')
"$CUOBJ" --dump-sass "$tmp/ops.o" >"$tmp/all.sass"
$PY - "$tmp/all.sass" "$PAT" <<'PYEOF'
import collections, re, sys
text, pat = open(sys.argv[1]).read(), re.compile(sys.argv[2])
for block in text.split("Function : ")[1:]:
    name = block.split("\n", 1)[0].strip()
    if not pat.search(name):
        continue
    ops = collections.Counter(m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", block))
    total, hmma = sum(ops.values()), ops.get("HMMA", 0)
    print(f"{name}\n  {total} instructions, {hmma} HMMA ({total / max(hmma, 1):.0f} per HMMA); top: "
          + ", ".join(f"{k} {v}" for k, v in ops.most_common(12)))
PYEOF
rm -rf "$tmp"
