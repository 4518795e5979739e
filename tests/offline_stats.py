"""Offline generation with TIDE as a user runs it (vLLM's default: the engine in its own process), then
exit_stats / reset_exit_stats, printed as JSON.

usage: offline_stats.py MODEL ROUTER
"""
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main():
    from vllm import LLM, SamplingParams
    from vllm_tide import exit_stats, reset_exit_stats
    from vllm_tide.settings import EVERY_EXIT
    model, router = sys.argv[1:3]
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512,
              additional_config={"tide": {"router": router, "threshold": 0.5, "min_layer": 0, **EVERY_EXIT}})
    llm.generate(["The capital of France is", "Once upon a time"], SamplingParams(temperature=0, max_tokens=8),
                 use_tqdm=False)
    after_generate = exit_stats(llm)
    reset_exit_stats(llm)
    print("JSON" + json.dumps({"generate": after_generate, "reset": exit_stats(llm)}))


if __name__ == "__main__":
    main()
