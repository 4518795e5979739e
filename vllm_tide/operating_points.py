"""Choosing where routers exit: (threshold, minimum exit layer) points judged on quality and on the
layers they save net of the checkpoints they run, post hoc or with K/V propagation (vllm_tide.simulate)."""
from __future__ import annotations

import math

import torch

from .exit_labels import ExitMetrics, kl_and_nll
from .router import Router
from .simulate import ExitSimulator, Prefix, full_pass, on_model_device

# Router scores follow the labels, not the bar: a router trained on strict labels meets a loose bar
# well below 0.5 (the grid once stopped there, and the default model's `fast` preset sat on it; with
# --kl-bound 0.05 it sat on 0.1).
THRESHOLD_GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
# Named operating points stored in every checkpoint: (top-1 agreement, max perplexity increase or None).
# "default" takes the calibration's --target-agreement / --max-ppl-increase.
PRESETS = {"balanced": (0.95, None), "fast": (0.90, None)}


def simulate_exits(scores: dict[int, torch.Tensor], threshold: float, min_layer: int) -> torch.Tensor:
    """Exit layer per token (-1: never), exiting at the first checkpoint >= min_layer scoring > threshold."""
    n = len(next(iter(scores.values())))
    exit_at = torch.full((n,), -1)
    for c in sorted(scores):
        if c < min_layer:
            continue
        new = (exit_at < 0) & (scores[c] > threshold)
        exit_at[new] = c
    return exit_at


def exit_summary(exit_at: torch.Tensor, metrics: dict[int, ExitMetrics], num_layers: int) -> dict:
    """Post hoc (logits taken at the exit, no propagation): top-1 agreement, perplexity ratio and the
    fraction of token-layers after the exits, for the given exit layers."""
    wrong = torch.zeros(len(exit_at), dtype=torch.bool)
    skipped = torch.zeros(len(exit_at))
    any_m = next(iter(metrics.values()))
    dnll = torch.zeros(len(exit_at), dtype=torch.float64)
    for c, m in metrics.items():
        sel = exit_at == c
        wrong |= sel & ~m.agree
        skipped[sel] = num_layers - 1 - c
        dnll[sel] = (m.nll_exit[sel] - m.nll_final[sel]).double()
    has = ~torch.isnan(any_m.nll_final)
    return {"top1_agreement": 1.0 - wrong.float().mean().item(),
            "ppl_ratio": math.exp(dnll[has].mean().item()) if has.any() else float("nan"),
            "skipped_fraction": skipped.sum().item() / (len(exit_at) * num_layers)}


def checkpoints_run(layers: list[int], min_layer: int) -> int:
    """Every checkpoint from min_layer on runs for every token, whether or not it exits there."""
    return sum(c >= min_layer for c in layers)


def net_layers_saved(skipped_fraction: float, min_layer: int, layers: list[int], num_layers: int,
                     checkpoint_cost: float) -> float:
    """Decoder layers a point saves per token, less what its checkpoints cost."""
    return skipped_fraction * num_layers - checkpoint_cost * checkpoints_run(layers, min_layer)


def pays(net: float, checkpoint_cost: float) -> bool:
    """Whether a point's net saving justifies exits at all: one that saves no more than its checkpoints
    cost is slower than stock vLLM and, meeting its bar but not exactly, no better in quality, so exits
    off beats it on both counts. A checkpoint cost of 0 keeps every point (the rule before costs)."""
    return checkpoint_cost <= 0 or net > 0


def choose_post_hoc(scores, metrics, num_layers: int, target: float, max_ppl: float, min_layer: int | None,
                    checkpoint_cost: float):
    """The (threshold, min_layer) with the largest net saving, among those that pay, whose post-hoc
    fidelity meets the targets."""
    layers = sorted(scores)
    best, best_net = None, -math.inf
    for m in ([min_layer] if min_layer is not None else layers):
        for t in THRESHOLD_GRID:
            r = exit_summary(simulate_exits(scores, t, m), metrics, num_layers)
            net = net_layers_saved(r["skipped_fraction"], m, layers, num_layers, checkpoint_cost)
            if r["top1_agreement"] >= target and r["ppl_ratio"] <= 1 + max_ppl and pays(net, checkpoint_cost) \
                    and net > best_net:
                best, best_net = (t, m, r), net
    return best


class PostHocBound:
    """What post-hoc figures (exit logits taken at the exit, later tokens see the full model) say about a
    propagated search, from the validation scores alone (no model runs). Propagation only adds error
    (exited tokens' K/V come from their frozen state), so at a minimum depth no threshold below the
    lowest one meeting a bar post hoc is worth simulating, and a depth whose post-hoc saving there,
    with a margin, cannot beat the best point found so far need not be simulated at all."""

    # post-hoc skipping can undershoot the propagated one a little (different later exits): allow it
    MARGIN = 1.1

    def __init__(self, scores: dict[int, torch.Tensor], metrics: dict[int, ExitMetrics], num_layers: int):
        self.scores, self.metrics, self.num_layers = scores, metrics, num_layers
        self._cache: dict[tuple[float, int], dict] = {}

    def figures(self, threshold: float, min_layer: int) -> dict:
        key = (threshold, min_layer)
        if key not in self._cache:
            self._cache[key] = exit_summary(simulate_exits(self.scores, threshold, min_layer), self.metrics,
                                            self.num_layers)
        return self._cache[key]

    def start(self, ok, min_layer: int) -> int:
        """Index of the lowest grid threshold whose post-hoc figures meet ``ok`` (the grid's top if none)."""
        return next((i for i, t in enumerate(THRESHOLD_GRID) if ok(self.figures(t, min_layer))),
                    len(THRESHOLD_GRID) - 1)

    def max_skipped(self, start: int, min_layer: int) -> float:
        """An upper bound on the skipped fraction a propagated point at this depth can reach."""
        return min(1.0, self.MARGIN * self.figures(THRESHOLD_GRID[start], min_layer)["skipped_fraction"])


class PropagatedEval:
    """Fidelity and saving of an operating point measured with K/V propagation, against the full model
    computed the same way (so numerics cancel), on held-out text and, when given, on the model's own
    answers (vllm_tide.answers; only the answer tokens count). Every figure is the worse of the sets: a
    point must keep quality and pay for its checkpoints on both. (Judging the saving on the answers
    alone, where the model exits more, picked a two-checkpoint `fast` point on the default model that
    measured 7% slower than stock at batch-1 decode; see docs/MEASUREMENTS.md.)"""

    def __init__(self, model, seqs: list[list[int]], routers: dict[int, Router], projections: dict, num_layers: int,
                 answers: list[tuple[list[int], int]] = ()):
        self.model = model
        # on the model's device once, not for every point simulated
        self.routers, self.projections = on_model_device(model, routers, projections)
        self.num_layers = num_layers
        self.sets = {"text": [(seq, 0) for seq in seqs], **({"answers": list(answers)} if answers else {})}
        # per set, when first needed: the full model's pass over each sequence, its top-1 and NLLs
        self._full: dict[str, tuple[list[Prefix], torch.Tensor, torch.Tensor]] = {}
        self.measured: dict[tuple[str, float, int], dict] = {}

    @property
    def results(self) -> dict[tuple[float, int], dict]:
        """Every point measured on all sets, with its combined figures (remembered ones included)."""
        points = {(t, m) for _, t, m in self.measured}
        return {p: self._combine(*p) for p in sorted(points)
                if all((name, *p) in self.measured for name in self.sets)}

    def _full_model(self, name: str) -> tuple[list[Prefix], torch.Tensor, torch.Tensor]:
        """The full model's pass over each sequence of a set, run once when first needed, and the base
        figures it gives (top-1, NLL), which the points are compared with; each point's simulation
        starts from the pass at the point's first active checkpoint (the layers below are the full model's)."""
        if name not in self._full:
            starts = sorted(self.routers)
            passes, top1, nll = [], [], []
            for seq, first in self.sets[name]:
                prefix, logits = full_pass(self.model, seq, starts, self._from(first))
                passes.append(prefix)
                t, n, _ = self._counted(seq, first, logits, torch.full((len(seq),), -1))
                top1.append(t)
                nll.append(n)
            self._full[name] = passes, torch.cat(top1), torch.cat(nll).double()
        return self._full[name]

    @staticmethod
    def _from(first: int) -> int:
        """The first position whose prediction counts: the one before the first counted token."""
        return max(first - 1, 0)

    @classmethod
    def _counted(cls, seq: list[int], first: int, logits: torch.Tensor, exit_at: torch.Tensor):
        """Top-1, NLL of the next token and exit layer at the positions that predict the counted tokens,
        from logits of positions _from(first).. (computed where the logits are, returned on the CPU)."""
        s = cls._from(first)
        nxt = torch.tensor(seq[s + 1:], device=logits.device)[:, None]
        _, nll = kl_and_nll(None, logits[:-1], 1.0, nxt)
        return logits.argmax(-1)[:-1].cpu(), nll.cpu(), exit_at[s:-1].cpu()

    def _measure(self, name: str, sim: ExitSimulator, threshold: float, min_layer: int) -> dict:
        key = (name, threshold, min_layer)
        if key not in self.measured:
            passes, base_top1, base_nll = self._full_model(name)
            # the simulation starts at the point's first active checkpoint; with none, nothing exits
            start = min(sim.routers, default=None)
            if start is None:
                top1, nll, exit_at = base_top1, base_nll, torch.full((len(base_top1),), -1)
            else:
                runs = [self._counted(seq, first, *sim.run_from(prefix, start, self._from(first)))
                        for (seq, first), prefix in zip(self.sets[name], passes)]
                top1, nll, exit_at = (torch.cat(x) for x in zip(*runs))
                nll = nll.double()
            after = torch.where(exit_at >= 0, self.num_layers - 1 - exit_at, 0)
            self.measured[key] = {
                "top1_agreement": (top1 == base_top1).float().mean().item(),
                "ppl_ratio": math.exp((nll - base_nll).mean().item()),
                "skipped_fraction": after.sum().item() / (len(after) * self.num_layers)}
        return self.measured[key]

    def remember(self, r: dict) -> None:
        """Reuse a stored result: its per-set figures (a result without them was measured on text only)."""
        for name, m in r.get("by_set", {"text": r}).items():
            if name in self.sets:
                self.measured[(name, r["threshold"], r["min_layer"])] = \
                    {k: m[k] for k in ("top1_agreement", "ppl_ratio", "skipped_fraction")}

    def _combine(self, threshold: float, min_layer: int) -> dict:
        by = {name: self.measured[(name, threshold, min_layer)] for name in self.sets}
        return {"threshold": threshold, "min_layer": min_layer,
                "top1_agreement": min(m["top1_agreement"] for m in by.values()),
                "ppl_ratio": max(m["ppl_ratio"] for m in by.values()),
                "skipped_fraction": min(m["skipped_fraction"] for m in by.values()), "by_set": by}

    def __call__(self, threshold: float, min_layer: int) -> dict:
        if any((name, threshold, min_layer) not in self.measured for name in self.sets):
            sim = ExitSimulator(self.model, self.routers, self.projections, threshold, min_layer)
            for name in self.sets:
                self._measure(name, sim, threshold, min_layer)
        return self._combine(threshold, min_layer)


def choose_propagated(evaluate: PropagatedEval, layers: list[int], target: float, max_ppl: float | None,
                      min_layer: int | None, num_layers: int, checkpoint_cost: float,
                      bound: PostHocBound | None = None) -> dict | None:
    """For each minimum depth, the lowest threshold meeting the targets (fidelity rises with the
    threshold, so a binary search over the grid); then the point with the largest net saving. A deeper
    minimum runs fewer checkpoints, so it wins unless the shallower one skips more than they cost.

    With a post-hoc ``bound``, each depth's search starts at its lowest threshold meeting the targets
    post hoc, the depths most promising post hoc go first, and a depth whose bound on the net saving
    cannot beat the best point found is not simulated."""
    def ok(r):
        return r["top1_agreement"] >= target and (max_ppl is None or r["ppl_ratio"] <= 1 + max_ppl)

    def net(r):
        return net_layers_saved(r["skipped_fraction"], r["min_layer"], layers, num_layers, checkpoint_cost)
    depths = [min_layer] if min_layer is not None else layers
    starts = {m: 0 for m in depths}
    ceiling = {m: math.inf for m in depths}
    if bound is not None:
        for m in depths:
            starts[m] = bound.start(ok, m)
            ceiling[m] = net_layers_saved(bound.max_skipped(starts[m], m), m, layers, num_layers, checkpoint_cost)
        depths = sorted(depths, key=lambda m: -ceiling[m])
    best = None
    for m in depths:
        if best is not None and ceiling[m] <= net(best):
            continue
        # the lowest passing threshold in [start, top]: galloping up from the start (propagation usually
        # costs a step or two of threshold over post hoc), then bisecting the last gap
        lo, top, step = starts[m], len(THRESHOLD_GRID) - 1, 1
        hi = lo
        while hi < top and not ok(evaluate(THRESHOLD_GRID[hi], m)):
            lo, hi, step = hi + 1, min(hi + step, top), 2 * step
        while lo < hi:
            mid = (lo + hi) // 2
            if ok(evaluate(THRESHOLD_GRID[mid], m)):
                hi = mid
            else:
                lo = mid + 1
        r = evaluate(THRESHOLD_GRID[lo], m)
        if not ok(r):
            continue
        if best is None or net(r) > net(best):
            best = r
    return best


def choose_presets(evaluate, layers: list[int], target: float, max_ppl: float, min_layer: int | None,
                   num_layers: int, checkpoint_cost: float, bound: PostHocBound | None = None) -> tuple[dict, dict]:
    """The "default" point (the calibration's targets) and every named preset, sharing evaluations.

    Returns (presets, unpaid). A preset is only a point that pays(); one whose best point does not
    is None (exits off), and that point is kept in ``unpaid`` for the report to show.
    """
    choose = lambda agree, ppl: choose_propagated(evaluate, layers, agree, ppl, min_layer,  # noqa: E731
                                                  num_layers, checkpoint_cost, bound)
    best = {"default": choose(target, max_ppl), **{name: choose(*bar) for name, bar in PRESETS.items()}}
    paid = {name: p is not None and pays(net_layers_saved(p["skipped_fraction"], p["min_layer"], layers, num_layers,
                                                          checkpoint_cost), checkpoint_cost)
            for name, p in best.items()}
    return ({name: p if paid[name] else None for name, p in best.items()},
            {name: p for name, p in best.items() if p is not None and not paid[name]})


def suggestion(chosen: dict | None, layers: list[int], min_layer: int | None = None) -> tuple[float, int]:
    """The checkpoint's suggested (threshold, min_layer): the default preset's point, or exits off (1.0)
    when nothing meets the targets and pays for its checkpoints."""
    if chosen is None:
        return 1.0, (min_layer if min_layer is not None else layers[-1])
    return chosen["threshold"], chosen["min_layer"]
