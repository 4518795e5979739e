"""Greedy generation in this process, printed as JSON: run with the TIDE plugin unloaded, it is stock vLLM.

usage: stock_generate.py MODEL MAX_TOKENS PROMPT [PROMPT ...]
"""
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main():
    from vllm import LLM, SamplingParams
    model, max_tokens, prompts = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    llm = LLM(model=model, dtype=os.environ.get("TIDE_TEST_DTYPE", "float32"), enforce_eager=os.environ.get("TIDE_TEST_EAGER", "1") == "1",
              max_model_len=1024, block_size=32, seed=0)
    assert not any("Tide" in name for name in llm.apply_model(lambda m: type(m).__name__))
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    print("JSON" + json.dumps([list(o.outputs[0].token_ids) for o in outs]))


if __name__ == "__main__":
    main()
