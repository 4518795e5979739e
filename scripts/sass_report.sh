#!/usr/bin/env bash
# Compile csrc/tide_ops.cu for sm_90 with this machine's nvcc (no GPU needed) and count the SASS
# instructions of the kernels whose names match $1 (default: router_down_tc_kernel), e.g. HMMA against
# everything else. Uses the cuobjdump that Triton's wheel carries when the CUDA toolkit has none.
#   bash scripts/sass_report.sh [KERNEL_REGEX] [SOURCE]
set -euo pipefail
PAT=${1:-router_down_tc_kernel}
SRC=$(realpath "${2:-$(dirname "$0")/../csrc/tide_ops.cu}")
cd "$(dirname "$0")/.."
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

def opcode(ins):
    return re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0]

for block in text.split("Function : ")[1:]:
    name = block.split("\n", 1)[0].strip()
    if not pat.search(name):
        continue
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", block)]
    ops = collections.Counter(opcode(t) for _, t in ins)
    total, hmma = sum(ops.values()), ops.get("HMMA", 0)
    print(f"{name}\n  whole kernel: {total} instructions, {hmma} HMMA; top: "
          + ", ".join(f"{k} {v}" for k, v in ops.most_common(10)))
    # the innermost loop holding matrix instructions (a backward branch whose body has HMMA): what each
    # trip issues besides them is the overhead that decides a latency-bound kernel's speed
    loops = []
    for a, t in ins:
        m = re.search(r"BRA\b.*?0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a:
            body = [opcode(u) for b, u in ins if int(m.group(1), 16) <= b <= a]
            if "HMMA" in body:
                loops.append(body)
    if loops:
        body = min(loops, key=len)
        c = collections.Counter(body)
        print(f"  innermost HMMA loop: {len(body)} instructions, {c['HMMA']} HMMA "
              f"({len(body) / c['HMMA']:.1f} per HMMA); " + ", ".join(f"{k} {v}" for k, v in c.most_common(8)))
PYEOF
rm -rf "$tmp"
