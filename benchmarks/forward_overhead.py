"""TIDE's model forward against stock vLLM's, on the very same decode steps, in one process.

    python benchmarks/forward_overhead.py --threshold 1.0        # routers run, never fire: pure overhead

One engine with the plugin (vLLM's default compiled execution unless --execution eager). On every real
step, the TIDE model class runs both stock's compiled model forward (`model.model(...)`, the exact
forward stock vLLM runs) and TIDE's, in random order, timing each; TIDE's output drives generation.
Scheduler, sampling and detokenisation are outside both timers, so this isolates what TIDE adds to
(or saves from) the forward, with far less noise than two engines side by side (benchmarks/speed.py,
which measures whole requests and is what the README's speed ratios come from).

Both forwards write this step's K/V, so with exits on (threshold < 1) the cache holds whichever ran
last; the timings stay meaningful, the generated text does not. Use speed.py for end-to-end figures.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

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

    from vllm_tide.engine import _real_step

    tide = {"router": args.router, "threshold": args.threshold}
    if args.min_layer is not None:
        tide["min_layer"] = args.min_layer
    llm = LLM(model=args.model, dtype="float32", enforce_eager=args.execution == "eager", max_model_len=1024,
              block_size=32, seed=0, enable_prefix_caching=False, additional_config={"tide": tide})
    times: dict[str, list[float]] = {"stock": [], "tide": []}
    state = {"on": False}
    rng = random.Random(args.seed)

    def instrument(lm):
        engine = lm.tide

        def forward(input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
            if not state["on"] or not _real_step()[0]:
                return engine.forward(lm, input_ids, positions, inputs_embeds)
            runs = {"stock": lambda: lm.model(input_ids, positions, None, inputs_embeds),
                    "tide": lambda: engine.forward(lm, input_ids, positions, inputs_embeds)}
            order = list(runs)
            rng.shuffle(order)      # neither always first after the scheduler nor always second
            out = {}
            for name in order:
                t0 = time.perf_counter()
                out[name] = runs[name]()
                times[name].append(time.perf_counter() - t0)
            return out["tide"]

        lm.forward = forward
        return True

    llm.apply_model(instrument)
    # distinct prompts: identical rows would exit all together, so a batch would never see partial layers
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    sp = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    state["on"] = True
    llm.generate(prompts, sp, use_tqdm=False)            # warm-up
    for v in times.values():
        v.clear()
    for _ in range(args.repeats):
        llm.generate(prompts, sp, use_tqdm=False)
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
