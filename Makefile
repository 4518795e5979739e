# vllm-tide: every target sets up what it needs first (idempotent and cached).
PY := .venv/bin/python
MODEL := models/smollm2-135m-instruct
ROUTER := outputs/router.safetensors
# make demo's own router: a quick calibration (24k tokens, 16k labelled; minutes), not the full default
DEMO_ROUTER := outputs/router_demo.safetensors
QUICK := --max-tokens 24576 --label-tokens 16384 --validation-tokens 4096
export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE := 1
CUDA_ARCHS ?= native

.PHONY: setup test test-fast demo calibrate bench load-test ops gpu-check clean

setup:
	bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q -rs -p no:cacheprovider tests

test-fast: setup
	$(PY) -m pytest -q -m "not e2e" tests

$(ROUTER):
	$(MAKE) setup
	$(PY) calibration/calibrate.py --model $(MODEL) --output $(ROUTER)

calibrate: setup
	$(PY) calibration/calibrate.py --model $(MODEL) --output $(ROUTER)

$(DEMO_ROUTER):
	$(MAKE) setup
	$(PY) calibration/calibrate.py --model $(MODEL) --output $(DEMO_ROUTER) $(QUICK)

demo: setup $(DEMO_ROUTER)
	$(PY) benchmarks/demo.py --model $(MODEL) --router $(DEMO_ROUTER)

# The quality/speed frontier against stock vLLM (hours on 2 cores; resumable, results in benchmarks/results/)
bench: setup
	$(PY) benchmarks/frontier.py --model $(MODEL)

# 64 concurrent requests against `vllm serve --plugin tide` with per-request thresholds
load-test: setup $(ROUTER)
	$(PY) benchmarks/load_test.py --model $(MODEL) --router $(ROUTER) --requests 64

# CUDA ops (needs nvcc and a CUDA build of torch); the CPU path never needs this.
ops:
	cmake -S . -B build/ops -DCMAKE_BUILD_TYPE=Release -DTIDE_CUDA_ARCHS=$(CUDA_ARCHS) \
	  -DCMAKE_PREFIX_PATH="$$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/ops -j

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build outputs
