"""Where a TIDE decode step's time goes: per decoder layer, per router, K/V fill, and the rest.

    python benchmarks/profile_step.py --router outputs/router.safetensors --threshold 1.0

Runs one engine in this process (batch 1 by default; vLLM's default compiled execution unless
--execution eager), wraps the full-layer segments between checkpoints, the routers, the partial layers
and the K/V fill with wall-clock timers, decodes --tokens tokens, and prints milliseconds per step for
each part. Timers add a little overhead of their own; the split between parts, not the absolute total,
is the point.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def timed(store: dict, key: str, fn):
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        store[key] += time.perf_counter() - t0
        return out
    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--router", default="outputs/router.safetensors")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--min-layer", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--execution", default="compiled", choices=["compiled", "eager"])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from vllm import LLM, SamplingParams
    tide = {"router": args.router}
    if args.threshold is not None:
        tide["threshold"] = args.threshold
    if args.min_layer is not None:
        tide["min_layer"] = args.min_layer
    llm = LLM(model=args.model, dtype="float32", enforce_eager=args.execution == "eager", max_model_len=1024, block_size=32, seed=0,
              enable_prefix_caching=False, additional_config={"tide": tide})
    times: dict = defaultdict(float)

    def instrument(model):
        engine = model.tide
        engine._segment = timed(times, "full layers (segments between checkpoints)", engine._segment)
        engine._final_segment = timed(times, "full layers (segments between checkpoints)", engine._final_segment)
        engine._route = timed(times, "routers (exit decision, compaction, freeze)", engine._route)
        engine.run_layers.partial = timed(times, "partial layers (attention all rows, rest running rows)",
                                          engine.run_layers.partial)
        engine._fill_kv = timed(times, "K/V fill of skipped layers", engine._fill_kv)
        model.forward = timed(times, "model forward (total)", model.forward)
        return True

    llm.apply_model(instrument)
    prompts = ["The history of the United States"] * args.batch
    sp = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    llm.generate(prompts, sp, use_tqdm=False)                       # warm-up
    times.clear()
    from vllm_tide import exit_stats, reset_exit_stats
    reset_exit_stats(llm)
    t0 = time.perf_counter()
    llm.generate(prompts, sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    stats = exit_stats(llm)
    steps = args.tokens
    rows = {k: 1e3 * v / steps for k, v in times.items()}
    rows["outside the model (scheduler, sampling, ...)"] = 1e3 * wall / steps - rows["model forward (total)"]
    print(f"batch {args.batch}, {steps} decode steps, threshold {args.threshold}: {1e3 * wall / steps:.2f} ms/step; "
          f"skipped {stats['skipped_layer_fraction']:.3f}, partial {stats['partial_layer_fraction']:.3f}")
    for k, v in rows.items():
        print(f"  {k:<58} {v:8.3f} ms/step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "ms_per_step": rows, "wall_ms_per_step": 1e3 * wall / steps,
                       "stats": stats}, f, indent=1)


if __name__ == "__main__":
    main()
