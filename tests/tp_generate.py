"""Greedy generation with TIDE at a given tensor-parallel size, printed as JSON (tokens, logprobs, exit stats).

usage: tp_generate.py MODEL ROUTER TP
"""
import json
import os
import sys


def main():
    from vllm import LLM, SamplingParams
    from vllm_tide.settings import EVERY_EXIT
    model, router, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512, block_size=32, seed=0,
              tensor_parallel_size=tp, gpu_memory_utilization=0.3,
              # every exit taken: which exits a step takes then depends on each token alone, not on
              # whether all rows of a step happen to fire (scores near the threshold differ in the last bits)
              additional_config={"tide": {"router": router, "threshold": 0.5, "min_layer": 0, **EVERY_EXIT}})
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a little"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, logprobs=0), use_tqdm=False)
    stats = llm.collective_rpc("tide_exit_stats")
    print("JSON" + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                               "logprobs": [[next(iter(d.values())).logprob for d in o.outputs[0].logprobs]
                                            for o in outs], "stats": stats}))


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    main()
