"""Drafting routers for lossless mode (issue #26), calibrated beside the exit routers.

A drafting router at checkpoint c scores whether c's exit (projection, then the LM head) proposes the
full model's next token: top-1 labels, not the KL bound, since the full model verifies every draft. The
validation figures compare it with the oracle (a router that fires exactly where the draft is right),
and the lossless preset is the (threshold, minimum layer, drafts per step) with the best modelled speed
(vllm_tide.lossless_model), post hoc on the validation text and the model's own answers.
"""
from __future__ import annotations

import torch

from .exit_labels import auc, collect_states, train_router
from .lossless_model import StepCosts, first_exits, speedup

THRESHOLDS = (0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
DRAFT_TOKENS = (1, 2, 4, 8)


def train_drafting_routers(labelled, train_m, bottleneck: int, epochs: int, seed: int) -> dict:
    """checkpoint -> Router trained on whether its exit's top-1 is the full model's."""
    return {c: train_router(labelled.z[c], m.agree, bottleneck, epochs, seed + 1000 + c) for c, m in train_m.items()}


def answer_states(model, answers: list[tuple[list[int], int]], layers: list[int], device: str):
    """Router inputs at the positions that predict the model's own answer tokens (prompts excluded)."""
    if not answers:
        return None
    st = collect_states(model, [seq for seq, _ in answers], layers, device, "drafting: own answers")
    keep, start = [], 0
    for seq, n in answers:
        keep += range(start + max(n - 1, 0), start + len(seq) - 1)
        start += len(seq)
    return st.rows(torch.tensor(keep, dtype=torch.long))


def evaluate(routers: dict, val, val_m, num_layers: int, costs: StepCosts = StepCosts(),
             answers=None, answers_m=None) -> dict:
    """The report's drafting figures on validation, and the lossless preset. With the model's own answers
    (states and exit metrics), a preset is judged on both sets and its modelled speed is the lesser."""
    layers = sorted(routers)
    sets = {"text": (val, val_m), **({"answers": (answers, answers_m)} if answers is not None and len(answers) else {})}
    with torch.no_grad():
        scores = {k: {c: routers[c](st.z[c].float()) for c in layers} for k, (st, _) in sets.items()}
    right = {k: {c: m[c].agree for c in layers} for k, (_, m) in sets.items()}

    def judged(fire_of, k, m):
        by_set = {name: speedup(right[name], fire_of(name), num_layers, k, m, costs) for name in sets}
        worst = min(by_set.values(), key=lambda r: r["speedup"])
        return {**worst, "by_set": by_set}
    best = None
    for m in layers:
        for thr in THRESHOLDS:
            for k in DRAFT_TOKENS:
                r = judged(lambda name, thr=thr: {c: scores[name][c] > thr for c in layers}, k, m)
                if best is None or r["speedup"] > best["speedup"]:
                    best = {"threshold": thr, "min_layer": m, "draft_tokens": k, **r}
    oracle = max(({"min_layer": m, "draft_tokens": k, **judged(lambda name: right[name], k, m)}
                  for m in layers for k in DRAFT_TOKENS), key=lambda r: r["speedup"])
    # per checkpoint at the preset's threshold, on the validation text: the router alone against the oracle
    per = []
    for c in layers:
        fire, y = scores["text"][c] > best["threshold"], right["text"][c]
        tp = int((fire & y).sum())
        per.append({"layer": c, "right": float(y.float().mean()), "auc": auc(scores["text"][c], y),
                    "fires": float(fire.float().mean()), "precision": tp / max(int(fire.sum()), 1),
                    "recall": tp / max(int(y.sum()), 1)})
    earliest = first_exits(right["text"], layers[0])
    basis = "post hoc; points judged on the validation text" + (" and the model's own answers, the lesser"
                                                                  if len(sets) > 1 else "")
    return {"preset": {**best, "pays": best["speedup"] > 1.0}, "oracle": oracle, "checkpoints": per,
            "oracle_drafts": sum(c >= 0 for c in earliest) / max(len(earliest), 1),
            "costs": {k: v for k, v in vars(costs).items()}, "basis": basis}
