"""TIDE's model forward against stock vLLM's, on the very same decode steps, in one process.

    python benchmarks/forward_overhead.py --threshold 1.0        # routers run, never fire: pure overhead

One engine with the plugin (vLLM's default compiled execution unless --execution eager). On every real
step, stock's compiled model forward and TIDE's run in random order, each timed (same_steps.py), so
this isolates what TIDE adds to (or saves from) the forward, with far less noise than two engines
side by side (benchmarks/speed.py, which measures whole requests and is what the README's speed
ratios come from).

Both forwards write this step's K/V, so with exits on (threshold < 1) the cache holds whichever ran
last; the timings stay meaningful, the generated text does not. Use speed.py for end-to-end figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


PROMPTS = ["The history of the United States", "A recipe for bread starts with", "The theory of relativity says",
           "Once upon a time in a small village", "To install Python on Linux, first", "The best way to learn a language",
           "In the ocean, whales", "My favourite book is"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--router", default="outputs/router.safetensors")
    p.add_argument("--threshold", type=float, default=1.0)
    p.add_argument("--min-layer", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per repeat (one forward each, prefill included)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--execution", default="compiled", choices=["compiled", "eager"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from vllm import LLM, SamplingParams

    from same_steps import SameSteps

    tide = {"router": args.router, "threshold": args.threshold}
    if args.min_layer is not None:
        tide["min_layer"] = args.min_layer
    llm = LLM(model=args.model, dtype="float32", enforce_eager=args.execution == "eager", max_model_len=1024,
              block_size=32, seed=0, enable_prefix_caching=False, additional_config={"tide": tide})
    steps = SameSteps(llm, {"tide": None}, seed=args.seed)
    # distinct prompts: identical rows would exit all together, so a batch would never see partial layers
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    sp = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    steps.on = True
    llm.generate(prompts, sp, use_tqdm=False)            # warm-up
    steps.clear()
    for _ in range(args.repeats):
        llm.generate(prompts, sp, use_tqdm=False)
    times = steps.times
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    quartiles = {k: [1e3 * q for q in statistics.quantiles(v, n=4)] for k, v in times.items()}
    ratio = ms["stock"] / ms["tide"]
    print(f"{len(times['tide'])} steps at batch {args.batch}, threshold {args.threshold}, {args.execution}: "
          f"stock forward {ms['stock']:.2f} ms, TIDE forward {ms['tide']:.2f} ms (medians); "
          f"TIDE adds {ms['tide'] - ms['stock']:+.2f} ms, speed ratio {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_ms": ms, "quartiles_ms": quartiles,
                       "speed_ratio_stock_over_tide": ratio, "steps": len(times["tide"])}, f, indent=1)


if __name__ == "__main__":
    main()
