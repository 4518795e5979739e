"""The quality/speed frontier of TIDE against stock vLLM, and the presets chosen from it.

    python benchmarks/frontier.py                  # = make bench (hours on 2 CPU cores; stages are cached)

Stages (each skips work whose output already exists, so an interrupted run resumes):
1. calibrate: one router checkpoint per variant (label criterion x exit projection), all from one
   collection pass over the calibration split (outputs/variants/).
2. dev: every variant at every threshold (and the minimum exit depths given) against stock vLLM on
   the development split: teacher-forced top-1 agreement and perplexity ratio via prompt_logprobs,
   GSM8K greedy continuations, skipped fractions and exit histograms (benchmarks/quality.py).
3. choose: the presets from the dev figures only. default: the most skipping with agreement >= 98%
   and perplexity <= +2%; balanced: agreement >= 95%; fast: agreement >= 90%.
4. test: each preset on the test split (quality) and its speed against stock (benchmarks/speed.py).
5. report: JSON with every figure and the machine, PNG plots, and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
DEFAULT_VARIANTS = ["top1:identity", "top1:temperature", "top1:affine", "kl:temperature", "kl:affine", "cosine:affine"]
PRESETS = {"default": (0.98, 0.02), "balanced": (0.95, None), "fast": (0.90, None)}   # agreement, max ppl increase


def variant_path(out: str, variant: str) -> str:
    return os.path.join(out, "variants", variant.replace(":", "-") + ".safetensors")


def stage_calibrate(args) -> None:
    from vllm_tide.calibrate import CalibrationConfig, calibrate, collect
    todo = [v for v in args.variants if not os.path.exists(variant_path(args.routers, v))]
    if not todo:
        return
    base = CalibrationConfig(model=args.model, output="", max_tokens=args.calib_tokens)
    collected = collect(base)
    for v in todo:
        criterion, projection = v.split(":")
        cfg = CalibrationConfig(model=args.model, output=variant_path(args.routers, v), max_tokens=args.calib_tokens,
                                criterion=criterion, exit_projection=projection)
        t0 = time.time()
        calibrate(cfg, collected)
        print(f"[frontier] calibrated {v} in {time.time() - t0:.0f} s (+{collected.seconds:.0f} s shared collection)",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, help="criterion:projection")
    p.add_argument("--routers", default="outputs", help="where variant checkpoints go (outputs/variants/)")
    p.add_argument("--calib-tokens", type=int, default=110_000)
    p.add_argument("--stages", nargs="*", default=["calibrate", "dev", "choose", "test", "report"])
    args = p.parse_args()
    if "calibrate" in args.stages:
        stage_calibrate(args)


if __name__ == "__main__":
    main()
