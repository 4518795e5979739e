"""How many labelled tokens do routers need? Router AUC against label tokens (docs/CALIBRATION.md).

One calibration pass over --max-tokens tokens and the validation slice; the exit projections are fitted on
every calibration token and labels computed for all of them (the reference: every token labelled). Each
row then trains the routers on the first N labels of a random order (a uniform sample, as calibration
draws it) and prints each checkpoint's validation AUC, next to the reference.

    python benchmarks/label_budget.py --model models/smollm2-135m-instruct --dtype float32
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vllm_tide import exit_labels  # noqa: E402
from vllm_tide.calibrate import CalibrationConfig, collect  # noqa: E402
from vllm_tide.exit_labels import auc, exit_metrics, exit_outcomes, fit_projection, kl_labels, sample, train_router  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-tokens", type=int, default=CalibrationConfig.max_tokens)
    p.add_argument("--labels", default="16384,32768,49152,65536", help="label-token counts to try")
    p.add_argument("--min-steps", default="0,1024", help="MIN_ROUTER_STEPS values to try (0: epochs only)")
    p.add_argument("--save", help="a folder to keep the states and labels in (benchmarks/drafting_features.py reads them)")
    args = p.parse_args()
    cfg = CalibrationConfig(model=args.model, output="", max_tokens=args.max_tokens, label_tokens=args.max_tokens,
                            select_tokens=0, dtype=args.dtype)
    col = collect(cfg)
    train, val, lm_w, layers = col.train, col.val, col.lm_w, col.layers
    projections = {c: fit_projection(cfg.exit_projection, train.z[c], train.final, cfg.ridge, None) for c in layers}
    labelled_idx = sample(len(train), len(train), cfg.seed)
    labelled = train.rows(labelled_idx)
    t0 = time.time()
    train_m, projections = exit_outcomes(labelled, projections, lm_w, with_kl=True, with_nll=False,
                                         fit_temperatures=True, desc="labels (every token)")
    val_m = exit_metrics(val, projections, lm_w, with_kl=True, desc="labels (validation)")
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        torch.save({"train": train, "val": val, "lm_w": lm_w, "layers": layers}, os.path.join(args.save, "states.pt"))
        torch.save({"idx": labelled_idx, "agree": {c: train_m[c].agree for c in layers},
                    "vagree": {c: val_m[c].agree for c in layers}, "proj": projections},
                   os.path.join(args.save, "labels.pt"))
    print(f"{len(train)} calibration tokens labelled in {time.time() - t0:.0f} s; {len(val)} validation tokens; "
          f"dtype {col.dtype_reason}")
    print("labels | min steps | AUC per checkpoint " + " ".join(map(str, layers)))
    counts = [int(n) for n in args.labels.split(",") if int(n) < len(train)] + [len(train)]
    for n in counts:
        for steps in [int(s) for s in args.min_steps.split(",")]:
            exit_labels.MIN_ROUTER_STEPS = steps
            aucs = []
            for c in layers:
                router = train_router(labelled.z[c][:n], kl_labels(train_m[c], cfg.kl_bound)[:n], cfg.bottleneck,
                                      cfg.epochs, cfg.seed + c)
                with torch.no_grad():
                    aucs.append(auc(router(val.z[c].float()), kl_labels(val_m[c], cfg.kl_bound)))
            print(f"{n} | {steps} | " + " ".join(f"{a:.3f}" for a in aucs), flush=True)


if __name__ == "__main__":
    main()
