"""How the KL label bound (--kl-bound) changes what calibration finds, from one collection pass.

    python benchmarks/label_bound.py --bounds 0.05 0.1 0.2 0.4     # ~10 min a bound on 2 CPU cores

The "kl" criterion labels a token exit-safe at a checkpoint when KL(final || exit) < bound and the
top-1 is kept. A tight bound trains routers on few, very safe positives; a loose one on more, less
safe ones. Either way the operating point is then chosen with K/V propagation against the same bars,
so what differs is how well each router ranks tokens: the layers each preset saves at its bar.
Writes one checkpoint per bound (outputs/kl_bound/) and a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def summary(ckpt) -> dict:
    from vllm_tide.operating_points import net_layers_saved
    x = ckpt.extra
    n = ckpt.model.num_layers

    def point(p):
        if p is None:
            return None
        net = net_layers_saved(p["skipped_fraction"], p["min_layer"], ckpt.layers, n, x["checkpoint_cost"])
        return {k: p[k] for k in ("threshold", "min_layer", "top1_agreement", "ppl_ratio", "skipped_fraction")} | \
            {"net_layers_saved": net}
    return {"kl_bound": x["kl_bound"], "seconds": x["seconds"],
            "checkpoints": [{k: r[k] for k in ("layer", "positive_rate", "auc")} for r in x["validation"]],
            "presets": {name: point(p) for name, p in x["presets"].items()},
            "unpaid": {name: point(p) for name, p in x["unpaid"].items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--bounds", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    p.add_argument("--routers", default="outputs/kl_bound")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "kl_bound_sweep.json"))
    args = p.parse_args()
    from vllm_tide.calibrate import CalibrationConfig, calibrate, collect
    os.makedirs(args.routers, exist_ok=True)
    t0 = time.time()
    collected = collect(CalibrationConfig(model=args.model, output=""))
    rows = []
    for b in args.bounds:
        cfg = CalibrationConfig(model=args.model, output=os.path.join(args.routers, f"kl-{b}.safetensors"), kl_bound=b)
        rows.append(summary(calibrate(cfg, collected)))
        print(f"[label_bound] {b}: {json.dumps(rows[-1]['presets'])}", flush=True)
    out = {"model": args.model, "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
           f"{os.cpu_count()} CPUs", "collection_seconds": round(collected.seconds, 1),
           "total_seconds": round(time.time() - t0, 1), "rows": rows}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"[label_bound] wrote {args.json}")


if __name__ == "__main__":
    main()
