"""Lossless self-speculation, modelled (issue #26): what drafts from early exits would buy at batch 1.

A cycle: the newest token runs its layers until a checkpoint >= min_layer whose drafting router fires;
that exit's logits propose the next token, which runs the same way, up to K drafts; a token whose router
fires nowhere (or the (K+1)-th) ends the cycle undrafted. One verify pass then runs every row of the
cycle from the shallowest exit on (rows join where they left; early K/V reused) and the first wrong
draft ends the accepted run; that row's full prediction is the next token.

Post hoc: a draft's context is exact (in serving, a draft deeper than an earlier one attends to that
one's provisional K/V), and the validation text is one stream. Costs are shares of one stock batch-1
step (a stock token costs 1.0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepCosts:
    """Shares of one stock batch-1 decode step. Defaults: the CPU step anatomy of docs/MEASUREMENTS.md
    (layers 0.82, LM head 0.12, the rest 0.06; a checkpoint 0.012; each extra verified row 0.04)."""
    layers: float = 0.82
    head: float = 0.12
    rest: float = 0.06
    draft_rest: float = 0.03       # a draft's own sampling and bookkeeping
    checkpoint: float = 0.012
    verify_row: float = 0.04
    draft_head: float | None = None   # None: the full LM head drafts


def first_exits(fire: dict[int, torch.Tensor], min_layer: int) -> list[int]:
    """Per token, the first checkpoint >= min_layer whose router fires, or -1."""
    layers = sorted(c for c in fire if c >= min_layer)
    n = len(next(iter(fire.values())))
    el = torch.full((n,), -1, dtype=torch.long)
    for c in layers:
        el[(el < 0) & fire[c]] = c
    return el.tolist()


def speedup(right: dict[int, torch.Tensor], fire: dict[int, torch.Tensor], num_layers: int, draft_tokens: int,
            min_layer: int, costs: StepCosts = StepCosts()) -> dict:
    """Modelled tokens per unit of stock cost (> 1: faster than stock), with the cycle figures behind it.

    right[c][t]: the draft from checkpoint c at token t equals the full model's top-1 there;
    fire[c][t]: the drafting router at c fires for token t."""
    layers = sorted(c for c in fire if c >= min_layer)
    if not layers:
        return {"speedup": 1.0, "drafted": 0.0, "acceptance": 0.0, "mean_accepted": 0.0}   # nothing drafts: stock
    last = layers[-1]
    el = first_exits(fire, min_layer)
    ok = {c: right[c].tolist() for c in layers}
    rank = {c: i + 1 for i, c in enumerate(layers)}        # checkpoints a token passes up to its exit
    hd = costs.head if costs.draft_head is None else costs.draft_head
    n, t, tokens, cost, drafted, accepted, cycles = len(el), 0, 0, 0.0, 0, 0, 0
    while t < n:
        rows = []
        while t + len(rows) < n:
            c = el[t + len(rows)] if len(rows) < draft_tokens else -1
            rows.append(c)
            if c < 0:
                break
        for c in rows:
            deep = last if c < 0 else c
            cost += (deep + 1) / num_layers * costs.layers + rank[deep] * costs.checkpoint
            if c >= 0:
                cost += hd + costs.draft_rest
        start = min(last if c < 0 else c for c in rows) + 1
        cost += (num_layers - start) / num_layers * costs.layers + costs.head + costs.rest
        cost += costs.verify_row * (len(rows) - 1)
        used = 0
        for i, c in enumerate(rows):
            used += 1
            if c >= 0:
                drafted += 1
                if not ok[c][t + i]:
                    break
                accepted += 1
        tokens += used
        t += used
        cycles += 1
    stock = costs.layers + costs.head + costs.rest
    return {"speedup": tokens / cost * stock, "drafted": drafted / max(tokens, 1),
            "acceptance": accepted / max(drafted, 1), "mean_accepted": accepted / max(cycles, 1)}
