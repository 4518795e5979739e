"""Which exits a step should take, timed on the very same prefill steps against stock vLLM's forward,
in one process.

    python benchmarks/split_rule.py --threshold 0.3 --min-layer 11
    python benchmarks/split_rule.py --threshold 0.05 --min-layer 15     # many exits

An exit that leaves other rows of its step running splits the step: each deeper layer runs attention
over every row and the rest over the running rows only ("partial" layers, one call per layer with row
gathers). That saves the exited rows' MLP but costs calls, so the engine takes such exits only once at
least ``split_min_rows`` rows and ``split_min_fraction`` of the step have exited (engine._take; the
settings of those names, or ``--tide-split-min-rows`` and ``--tide-split-min-fraction`` when serving),
and defers the others (those tokens run on as without exits). This times, on every real step, stock's
compiled forward and TIDE's under three rules, in random order (same_steps.py): the default rule,
exits taken only when no row is left running, and every exit taken; ``--rule ROWS FRACTION`` adds a
rule of your own, e.g. to find the break-even on a GPU. The rules differ in which exits they take, so
they differ in output too (deferring keeps tokens on the full model). Decode steps (small batches) are
what benchmarks/forward_overhead.py measures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

from vllm_tide.settings import EVERY_EXIT

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

RULES = {"engine rule (16 rows and 25%)": None, "only when no row is left running": (10**9, 1.0),
         "every exit taken": (EVERY_EXIT["split_min_rows"], EVERY_EXIT["split_min_fraction"])}


def _rule(min_rows: int, min_fraction: float):
    def configure(engine) -> None:
        engine.split_min_rows, engine.split_min_fraction = min_rows, min_fraction
    return configure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--router", default="outputs/router.safetensors")
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--min-layer", type=int, default=11)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="prompts per step")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--execution", default="compiled", choices=["compiled", "eager"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rule", nargs=2, action="append", default=[], metavar=("ROWS", "FRACTION"),
                   help="also time this split rule (split_min_rows, split_min_fraction); repeatable")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rules = dict(RULES)
    for rows, fraction in args.rule:
        rules[f"split at {rows} rows and {float(fraction):.0%}"] = (int(rows), float(fraction))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from same_steps import SameSteps

    from vllm_tide import exit_stats
    from vllm_tide.corpus import split_texts

    rows = args.prompt_tokens * args.batch
    llm = LLM(model=args.model, dtype="float32", enforce_eager=args.execution == "eager",
              max_model_len=max(2048, args.prompt_tokens + 16), block_size=32, seed=0,
              max_num_batched_tokens=max(8192, rows), enable_prefix_caching=False,
              additional_config={"tide": {"router": args.router, "threshold": args.threshold,
                                          "min_layer": args.min_layer}})
    ids = llm.get_tokenizer()(" ".join(split_texts("dev")))["input_ids"]
    n = args.prompt_tokens
    prompts = [TokensPrompt(prompt_token_ids=ids[i * n:(i + 1) * n]) for i in range(args.batch * (args.repeats + 1))]
    steps = SameSteps(llm, {name: None if rule is None else _rule(*rule) for name, rule in rules.items()},
                      seed=args.seed)
    sp = SamplingParams(temperature=0, max_tokens=1)
    llm.generate(prompts[:args.batch], sp, use_tqdm=False)             # warm-up
    steps.on = True
    for r in range(1, args.repeats + 1):
        llm.generate(prompts[r * args.batch:(r + 1) * args.batch], sp, use_tqdm=False)
    times = steps.times
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    stats = exit_stats(llm)
    exited = {layer: round(count / stats["tokens"], 4) for layer, count in stats["exits_per_layer"].items()}
    print(f"{len(times['stock'])} prefill steps of {rows} tokens at threshold {args.threshold}, min layer "
          f"{args.min_layer}; fraction of tokens exiting at each checkpoint {exited}")
    for name, v in ms.items():
        print(f"  {name:<30} {v:8.2f} ms   ({v / ms['stock']:.3f}x stock's time)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_ms": ms, "steps": len(times["stock"]),
                       "exit_fraction_per_layer": exited}, f, indent=1)


if __name__ == "__main__":
    main()
