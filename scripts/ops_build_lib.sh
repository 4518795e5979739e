# Sourced by scripts/gpu_check.sh and scripts/gpu_profile_router.sh (GPU machine, no vLLM): how a copy of
# the ops' sources with pending patches applied is made, and how the ops library is built from one.
# Expects PY (python with torch) and OUT (a log folder).

# The folders the pending patches may touch; tests/test_cuda_build.py copies the same (PATCHED_FOLDERS).
OPS_TREE=(CMakeLists.txt csrc vllm_tide tests benchmarks scripts)

# pending_tree DIR PATCH...: copy the ops' sources to DIR (outside the repo, so git apply patches that copy
# and nothing else) and apply the patches in order; fails, saying which, if one does not apply.
pending_tree() {
  local dir=$1 p; shift
  mkdir -p "$dir" && cp -r "${OPS_TREE[@]}" "$dir"/ || return 1
  for p in "$@"; do
    (cd "$dir" && git apply "$OLDPWD/$p") || { echo "pending patch $p does not apply"; return 1; }
  done
}

# build_ops NAME SOURCE_ROOT: build the library into build/ops-NAME (log: $OUT/build_NAME.log) and print
# its path; on failure print the log's tail to stderr and fail.
build_ops() {
  local bdir=$PWD/build/ops-$1
  cmake -S "$2" -B "$bdir" -DCMAKE_BUILD_TYPE=Release -DTIDE_CUDA_ARCHS="${TIDE_CUDA_ARCHS:-90}" \
    -DCMAKE_PREFIX_PATH="$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')" >"$OUT/build_$1.log" 2>&1 \
    && cmake --build "$bdir" -j 16 >>"$OUT/build_$1.log" 2>&1 \
    && ls "$bdir"/*tide_ops*.so 2>/dev/null || { tail -40 "$OUT/build_$1.log" >&2; return 1; }
}
