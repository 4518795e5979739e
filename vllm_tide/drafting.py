"""Drafting routers for lossless mode (issue #26), calibrated beside the exit routers.

A drafting router at checkpoint c scores whether c's exit (projection, then the LM head) proposes the
full model's next token: top-1 labels, not the KL bound, since the full model verifies every draft. The
validation figures compare it with the oracle (a router that fires exactly where the draft is right),
and the lossless preset is the (threshold, minimum layer, drafts per step) with the best modelled speed
(vllm_tide.lossless_model), post hoc on the validation text.
"""
from __future__ import annotations

from .exit_labels import auc, train_router
from .lossless_model import StepCosts, first_exits, speedup

THRESHOLDS = (0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
DRAFT_TOKENS = (1, 2, 4, 8)


def train_drafting_routers(labelled, train_m, bottleneck: int, epochs: int, seed: int) -> dict:
    """checkpoint -> Router trained on whether its exit's top-1 is the full model's."""
    return {c: train_router(labelled.z[c], m.agree, bottleneck, epochs, seed + 1000 + c) for c, m in train_m.items()}


def evaluate(routers: dict, val, val_m, num_layers: int, costs: StepCosts = StepCosts()) -> dict:
    """The report's drafting figures on validation, and the lossless preset."""
    import torch
    layers = sorted(routers)
    with torch.no_grad():
        scores = {c: routers[c](val.z[c].float()) for c in layers}
    right = {c: val_m[c].agree for c in layers}
    best = None
    for m in layers:
        for thr in THRESHOLDS:
            fire = {c: scores[c] > thr for c in layers}
            for k in DRAFT_TOKENS:
                r = speedup(right, fire, num_layers, k, m, costs)
                if best is None or r["speedup"] > best["speedup"]:
                    best = {"threshold": thr, "min_layer": m, "draft_tokens": k, **r}
    oracle = max(({"min_layer": m, "draft_tokens": k, **speedup(right, right, num_layers, k, m, costs)}
                  for m in layers for k in DRAFT_TOKENS), key=lambda r: r["speedup"])
    # per checkpoint at the preset's threshold: the router alone against the oracle (its right drafts)
    per = []
    for c in layers:
        fire, y = scores[c] > best["threshold"], right[c]
        tp = int((fire & y).sum())
        per.append({"layer": c, "right": float(y.float().mean()), "auc": auc(scores[c], y),
                    "fires": float(fire.float().mean()), "precision": tp / max(int(fire.sum()), 1),
                    "recall": tp / max(int(y.sum()), 1)})
    earliest = first_exits(right, layers[0])
    return {"preset": {**best, "pays": best["speedup"] > 1.0}, "oracle": oracle, "checkpoints": per,
            "oracle_drafts": sum(c >= 0 for c in earliest) / max(len(earliest), 1),
            "costs": {k: v for k, v in vars(costs).items()}, "basis": "post hoc on the validation text"}
