"""Lossless mode's calibration side: the modelled speed of drafts and the drafting routers' figures."""
import torch

from vllm_tide.drafting import evaluate
from vllm_tide.lossless_model import StepCosts, first_exits, speedup

# layers cost 1.0 in all, nothing else: a cycle's cost is the layer-fractions its rows run
LAYERS_ONLY = StepCosts(layers=1.0, head=0.0, rest=0.0, draft_rest=0.0, checkpoint=0.0, verify_row=0.0, draft_head=0.0)


def test_cycle_costs_and_tokens_by_hand():
    """4 layers, one checkpoint at layer 1, one draft per step, every router firing. A cycle: the first row
    runs layers 0-1 and drafts (0.5), the second runs 0-1 unfired (0.5), the verify pass runs layers 2-3
    once (0.5): 1.5 per cycle. Right drafts give 2 tokens per cycle, wrong ones 1."""
    n = 10
    fire = {1: torch.ones(n, dtype=torch.bool)}
    right = speedup({1: torch.ones(n, dtype=torch.bool)}, fire, 4, 1, 0, LAYERS_ONLY)
    assert abs(right["speedup"] - 2 / 1.5) < 1e-9 and right["acceptance"] == 1.0 and right["mean_accepted"] == 1.0
    wrong = speedup({1: torch.zeros(n, dtype=torch.bool)}, fire, 4, 1, 0, LAYERS_ONLY)
    # one token per cycle; the last cycle (token 9) has no row after its draft: 0.5 + 0.5
    assert abs(wrong["speedup"] - 10 / (9 * 1.5 + 1.0)) < 1e-9 and wrong["acceptance"] == 0.0
    # no router fires: every token runs layers 0-1 unfired, then 2-3: exactly stock
    none = speedup({1: torch.ones(n, dtype=torch.bool)}, {1: torch.zeros(n, dtype=torch.bool)}, 4, 1, 0, LAYERS_ONLY)
    assert abs(none["speedup"] - 1.0) < 1e-9 and none["drafted"] == 0.0
    # every checkpoint a token passes costs it: checkpoints at 1 and 2 of 4, none fires: 1 + 2 x 0.1 per token;
    # from min layer 2 only one is run
    costly = StepCosts(layers=1.0, head=0.0, rest=0.0, checkpoint=0.1, verify_row=0.0)
    on = {c: torch.ones(n, dtype=torch.bool) for c in (1, 2)}
    off = {c: torch.zeros(n, dtype=torch.bool) for c in (1, 2)}
    assert abs(speedup(on, off, 4, 1, 0, costly)["speedup"] - 1 / 1.2) < 1e-9
    assert abs(speedup(on, off, 4, 1, 2, costly)["speedup"] - 1 / 1.1) < 1e-9


def test_drafts_stop_at_k_and_at_the_first_wrong_one():
    """K = 3 drafts at layer 1 of 4, all fire; token 2's draft is wrong. Cycle 1: rows 0,1,2 drafted, 0 and 1
    right, 2 wrong, and row 3 (the (K+1)-th, undrafted) computed for nothing: 3 tokens (2 accepted + the
    correction). Cycle 2 starts at token 3: rows 3,4,5 drafted and right, row 6 undrafted: 4 tokens."""
    n = 7
    r = torch.ones(n, dtype=torch.bool)
    r[2] = False
    out = speedup({1: r}, {1: torch.ones(n, dtype=torch.bool)}, 4, 3, 0, LAYERS_ONLY)
    # each cycle: 4 rows x 0.5 (layers 0-1) + 0.5 (the verify pass over layers 2-3) -> 7 tokens for 5.0
    assert abs(out["speedup"] - 7 / 5.0) < 1e-9
    assert out["mean_accepted"] == 2.5 and abs(out["acceptance"] - 5 / 6) < 1e-9


def test_first_exits_respect_the_minimum_layer():
    fire = {1: torch.tensor([True, False, True]), 3: torch.tensor([True, True, False])}
    assert first_exits(fire, 0) == [1, 3, 1]
    assert first_exits(fire, 2) == [3, 3, -1]


def test_drafting_figures_of_a_perfect_router_equal_the_oracle():
    """A 'router' scoring 1 exactly where the draft is right is the oracle: precision and recall 1, and the
    preset's modelled speed equals the oracle's."""
    g = torch.Generator().manual_seed(0)
    n, layers = 400, [3, 7]
    right = {c: torch.rand(n, generator=g) < p for c, p in zip(layers, (0.4, 0.7))}

    class Perfect(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, z):
            return right[self.c].float()

    class Val:
        z = {c: torch.zeros(n, 4) for c in layers}

    class M:
        def __init__(self, agree):
            self.agree = agree
    out = evaluate({c: Perfect(c) for c in layers}, Val(), {c: M(right[c]) for c in layers}, 12)
    for row in out["checkpoints"]:
        assert row["precision"] == 1.0 and row["recall"] == 1.0 and row["auc"] == 1.0
    assert abs(out["preset"]["speedup"] - out["oracle"]["speedup"]) < 1e-9
    assert out["preset"]["acceptance"] == 1.0
    either = int((right[3] | right[7]).sum()) / n
    assert abs(out["oracle_drafts"] - either) < 1e-9
