"""Post-training router calibration on plain text (HF transformers, frozen model).

1. One streamed pass collects, for every calibration token, the router input at each checkpoint and
   the full model's final state and top-1.
2. Each checkpoint's exit projection is fitted to the full model's output distribution (temperature
   by KL; affine by least squares, then a temperature by KL).
3. Labels come from exactly what the plugin computes at inference: router input -> exit projection
   -> LM head, compared with the full model (top-1, cosine, or KL + top-1). Routers are trained on them.
4. The operating point (threshold, minimum exit depth) is chosen by simulating the exits with K/V
   propagation (vllm_tide.simulate), not post hoc, on held-out validation text and on the model's own
   greedy answers to instructions about it (vllm_tide.answers): a point must meet the bar and pay for
   its checkpoints on both.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .checkpoint import CRITERIA, PROJECTIONS, RouterCheckpoint, checkpoint_layers
from .errors import TideConfigError
from .fingerprint import model_identity
from .projection import ExitProjection, fit_affine, fit_temperature
from .router import Router, router_input
from .simulate import ExitSimulator, Prefix, full_pass, on_model_device

# Router scores follow the labels, not the bar: a router trained on strict labels meets a loose bar
# well below 0.5 (the grid once stopped there, and the default model's `fast` preset sat on it; with
# --kl-bound 0.05 it sat on 0.1).
THRESHOLD_GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
# Named operating points stored in every checkpoint: (top-1 agreement, max perplexity increase or None).
# "default" takes the calibration's --target-agreement / --max-ppl-increase.
PRESETS = {"balanced": (0.95, None), "fast": (0.90, None)}
TEMPERATURE_SAMPLE = 2048     # tokens per checkpoint for the temperature fit (one scalar)


@dataclass
class CalibrationConfig:
    model: str
    output: str
    corpus: list[str] = field(default_factory=list)   # empty: the fixed calibration split
    max_tokens: int = 110_000
    seq_len: int = 512
    interval: int = 4
    # defaults chosen from the frontier on development data (benchmarks/frontier.py, docs/MEASUREMENTS.md)
    criterion: str = "kl"
    exit_projection: str = "affine"
    device: str = "cpu"
    dtype: str = "auto"          # bfloat16 on CPU (2x faster forward and LM head), float32 on CUDA
    bottleneck: int = 128
    epochs: int = 4
    cosine_threshold: float = 0.98
    kl_bound: float = 0.1        # nats; "kl" labels: KL(final || exit) below this and the same top-1
    ridge: float = 1e-2
    affine_rank: int | None = None   # low-rank affine (W = I + UV) for large models
    target_agreement: float = 0.98
    max_ppl_increase: float = 0.02
    min_layer: int | None = None  # None: chosen on the validation slice
    select_tokens: int = 4096     # validation tokens for the propagated choice; 0: post-hoc choice only
    # tokens of the model's own greedy answers (vllm_tide.answers) the propagated choice also judges
    # points on; 0: validation text only
    answer_tokens: int = 2048
    answer_prompts: str | None = None   # a file of the user's own prompts, one per line (default: built-in)
    # What running one checkpoint costs (router, exit decision, host sync), in decoder layers: points
    # meeting a bar are compared by layers skipped per token less the checkpoints they run, and a
    # preset whose best point does not pay keeps exits off.
    checkpoint_cost: float = 0.5
    seed: int = 0

    def validate(self) -> None:
        if self.criterion not in CRITERIA:
            raise TideConfigError(f"Unknown label criterion {self.criterion!r}; use one of {', '.join(CRITERIA)}.")
        if self.exit_projection not in PROJECTIONS:
            raise TideConfigError(f"Unknown exit projection {self.exit_projection!r}; use one of {', '.join(PROJECTIONS)}.")
        if self.max_tokens < 1000:
            raise TideConfigError(f"--max-tokens must be at least 1000 to train routers, got {self.max_tokens}.")
        if not 0.5 <= self.target_agreement <= 1.0:
            raise TideConfigError(f"--target-agreement must be in [0.5, 1], got {self.target_agreement}.")
        if not self.kl_bound > 0:
            raise TideConfigError(f"--kl-bound must be a positive number of nats, got {self.kl_bound}.")
        if not self.max_ppl_increase >= 0:
            raise TideConfigError(f"--max-ppl-increase must be >= 0, got {self.max_ppl_increase}.")
        if self.answer_tokens < 0:
            raise TideConfigError(f"--answer-tokens must be >= 0, got {self.answer_tokens}.")
        if self.answer_prompts:
            from .answers import read_prompts
            read_prompts(self.answer_prompts)   # fail before the model loads
        if not self.checkpoint_cost >= 0:
            raise TideConfigError(f"--checkpoint-cost must be >= 0 decoder layers, got {self.checkpoint_cost}.")
        if self.affine_rank is not None and self.affine_rank < 1:
            raise TideConfigError(f"--affine-rank must be a positive rank, got {self.affine_rank}.")
        missing = [p for p in self.corpus if not os.path.exists(p)]
        if missing:
            raise TideConfigError(f"--corpus {missing[0]!r} does not exist; pass text files or folders of .txt files.")
        if self.output:
            _check_output(self.output)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise TideConfigError("--device cuda needs a CUDA GPU and a CUDA build of torch, and this machine has "
                                  "neither usable; calibrate with --device cpu or on a GPU machine.")


def _check_output(path: str) -> None:
    """Fail before the (long) run, not at the save: the output's folder is made, and must be writable."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        ok = os.access(folder, os.W_OK) and not os.path.isdir(path)
    except OSError:
        ok = False
    if not ok:
        raise TideConfigError(f"Cannot write the router checkpoint to {path!r}; pass an --output file path in a "
                              f"writable folder.")


# ----------------------------------------------------------------------------- data

def _token_chunks(tokenizer, docs: list[str], seq_len: int) -> list[list[int]]:
    chunks = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        chunks += [ids[s:s + seq_len] for s in range(0, len(ids), seq_len) if len(ids) - s >= 32]
    return chunks


def _spread(chunks: list[list[int]], max_tokens: int) -> list[list[int]]:
    """An evenly spaced subset of chunks holding at most max_tokens, so the whole corpus is sampled
    (the first 100k tokens of SOTU would all be from the 1790s)."""
    total = sum(map(len, chunks))
    frac = min(1.0, max_tokens / max(total, 1))
    picked, budget = [], max_tokens
    for i, c in enumerate(chunks):
        if math.floor((i + 1) * frac) > math.floor(i * frac) and budget > 0:
            picked.append(c[:budget])
            budget -= len(picked[-1])
    return picked


def load_sequences(tokenizer, cfg: CalibrationConfig) -> tuple[list[list[int]], list[list[int]], str]:
    from . import corpus
    if cfg.corpus:
        docs = corpus.read_texts(cfg.corpus)
        chunks = _token_chunks(tokenizer, docs, cfg.seq_len)
        train = [c for i, c in enumerate(chunks) if i % 10 != 9]
        val = [c for i, c in enumerate(chunks) if i % 10 == 9]
        name = ",".join(cfg.corpus)
    else:
        train = _token_chunks(tokenizer, corpus.split_texts("calibration"), cfg.seq_len)
        val = _token_chunks(tokenizer, corpus.split_texts("validation"), cfg.seq_len)
        name = "sotu<=2000 (fixed calibration split)"
    if not train or not val:
        raise TideConfigError("The calibration corpus is empty or too short (need at least ten 32-token "
                              "chunks); pass text files or folders with --corpus.")
    return _spread(train, cfg.max_tokens), _spread(val, max(cfg.max_tokens // 10, 2 * cfg.seq_len)), name


# ----------------------------------------------------------------------------- states

@dataclass
class States:
    z: dict[int, torch.Tensor]     # checkpoint -> router inputs [N, D]
    final: torch.Tensor            # final normed state, what the LM head sees [N, D]
    top1: torch.Tensor             # full model's top-1 [N]
    target: torch.Tensor           # the next token in the text [N], -1 at the end of a sequence


@torch.no_grad()
def collect_states(model, seqs: list[list[int]], layers: list[int], device: str, desc: str) -> States:
    decoder = model.model.layers
    norm = model.model.norm
    captured: dict[int, torch.Tensor] = {}
    watch = set(layers) | {len(decoder) - 1}

    def hook(idx):
        def fn(_mod, _inp, out):
            captured[idx] = out[0] if isinstance(out, tuple) else out
        return fn

    handles = [decoder[i].register_forward_hook(hook(i)) for i in sorted(watch)]
    z = {c: [] for c in layers}
    finals, tops = [], []
    try:
        for seq in tqdm(seqs, desc=desc, unit="seq", file=sys.stderr):
            ids = torch.tensor([seq], device=device)
            logits = model(input_ids=ids).logits[0]
            tops.append(logits.argmax(-1).cpu())
            eps = norm.variance_epsilon
            for c in layers:
                z[c].append(router_input(captured[c][0], norm.weight, eps).cpu())
            finals.append(router_input(captured[len(decoder) - 1][0], norm.weight, eps).cpu())
    finally:
        for h in handles:
            h.remove()
    targets = torch.cat([torch.tensor(seq[1:] + [-1]) for seq in seqs])
    return States({c: torch.cat(v) for c, v in z.items()}, torch.cat(finals), torch.cat(tops), targets)


# ----------------------------------------------------------------------------- projections and labels

def apply_projection(z: torch.Tensor, proj: ExitProjection | None) -> torch.Tensor:
    return z if proj is None else proj.apply(z).to(z.dtype)


def _sample(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


@torch.no_grad()
def fit_projection(kind: str, z: torch.Tensor, states: "States", lm_w: torch.Tensor, ridge: float,
                   rank: int | None, seed: int) -> ExitProjection | None:
    """identity: None; temperature: T by KL; affine: least squares to the final state, then T by KL."""
    if kind == "identity":
        return None
    proj = fit_affine(z.float(), states.final.float(), ridge, rank) if kind == "affine" else ExitProjection()
    idx = _sample(len(z), TEMPERATURE_SAMPLE, seed)
    w = lm_w.float()        # on the model's device, where the sample's logits are computed
    final_logp = torch.log_softmax(states.final[idx].to(w.device).float() @ w.T, -1)
    exit_logits = proj.to(w.device).apply(z[idx].to(w.device)) @ w.T
    return dataclasses.replace(proj, temperature=fit_temperature(exit_logits, final_logp))


@dataclass
class ExitMetrics:
    agree: torch.Tensor            # exit top-1 == full model top-1 [N]
    kl: torch.Tensor | None        # KL(final || exit) [N] (when asked for)
    nll_exit: torch.Tensor         # -log p_exit(next token) [N] (nan where there is no next token)
    nll_final: torch.Tensor        # -log p_final(next token) [N]


@torch.no_grad()
def exit_metrics(states: "States", projections: dict[int, ExitProjection | None], lm_w: torch.Tensor,
                 with_kl: bool, with_nll: bool = True, chunk: int = 4096) -> dict[int, ExitMetrics]:
    """For every checkpoint and token, what exiting there would give: one chunked pass in which the
    full model's distribution is computed once per chunk and compared with each checkpoint's exit.
    It runs where ``lm_w`` is (the model's device: on a GPU the LM-head products dominate calibration);
    the states stay on the CPU and so do the results."""
    layers = sorted(projections)
    projections = {c: None if p is None else p.to(lm_w.device) for c, p in projections.items()}
    parts = {c: [] for c in layers}
    finals = []
    w = lm_w
    n = len(states.top1)
    for s in range(0, n, chunk):
        def rows(t: torch.Tensor, s: int = s) -> torch.Tensor:     # this chunk's rows, on the LM head's device
            return t[s:s + chunk].to(w.device)
        tgt = rows(states.target)
        has = tgt >= 0
        safe = tgt.clamp(min=0)[:, None]
        need_logp = with_kl or with_nll
        if need_logp:
            final_logp = torch.log_softmax((rows(states.final).to(w.dtype) @ w.T).float(), -1)
            final_p = final_logp.exp() if with_kl else None
            finals.append(torch.where(has, -final_logp.gather(1, safe)[:, 0], torch.nan).cpu())
        else:
            finals.append(torch.full((len(tgt),), torch.nan))
        for c in layers:
            h = apply_projection(rows(states.z[c]).to(w.dtype), projections[c])
            logits = h @ w.T
            agree = (logits.argmax(-1) == rows(states.top1)).cpu()
            nll = kl = None
            if need_logp:
                lq = torch.log_softmax(logits.float(), -1)
                nll = torch.where(has, -lq.gather(1, safe)[:, 0], torch.nan).cpu()
                kl = (final_p * (final_logp - lq)).sum(-1).cpu() if with_kl else None
            else:
                nll = torch.full((len(tgt),), torch.nan)
            parts[c].append((agree, kl, nll))
    nll_final = torch.cat(finals)
    return {c: ExitMetrics(torch.cat([p[0] for p in parts[c]]),
                           torch.cat([p[1] for p in parts[c]]) if with_kl else None,
                           torch.cat([p[2] for p in parts[c]]), nll_final) for c in layers}


def kl_labels(m: ExitMetrics, bound: float) -> torch.Tensor:
    """Exit-safe: the distribution is kept (KL(final || exit) < bound) and so is the top-1."""
    return (m.kl < bound) & m.agree


@torch.no_grad()
def cosine_labels(z: torch.Tensor, proj, final: torch.Tensor, threshold: float) -> torch.Tensor:
    """The paper's rule in one consistent space: both sides after the final norm."""
    h = apply_projection(z.float(), proj)
    return torch.nn.functional.cosine_similarity(h, final.float(), dim=-1) > threshold


def train_router(z: torch.Tensor, labels: torch.Tensor, bottleneck: int, epochs: int, seed: int) -> Router:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    router = Router(z.shape[1], bottleneck)
    opt = torch.optim.AdamW(router.parameters(), lr=2e-3, weight_decay=1e-4)
    y = labels.float()
    steps = epochs * math.ceil(len(z) / 512)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in range(epochs):
        perm = torch.randperm(len(z), generator=g)
        for s in range(0, len(z), 512):
            idx = perm[s:s + 512]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(router.logits(z[idx].float()), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return router.eval()


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve via the rank-sum statistic (ties get average ranks)."""
    pos, n = int(labels.sum()), len(labels)
    if pos in (0, n):
        return float("nan")
    order = scores.double().argsort()
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(1, n + 1, dtype=torch.float64)
    s = scores.double()[order]
    # average the ranks of tied scores
    uniq, inv, counts = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    if len(uniq) < n:
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, ranks[order])
        ranks[order] = (sums / counts)[inv]
    return float((ranks[labels.bool()].sum() - pos * (pos + 1) / 2) / (pos * (n - pos)))


# ----------------------------------------------------------------------------- threshold choice

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
                prefix, logits = full_pass(self.model, seq, starts)
                passes.append(prefix)
                t, n, _ = self._counted(seq, first, logits, torch.full((len(seq),), -1))
                top1.append(t)
                nll.append(n)
            self._full[name] = passes, torch.cat(top1), torch.cat(nll).double()
        return self._full[name]

    @staticmethod
    def _counted(seq: list[int], first: int, logits: torch.Tensor, exit_at: torch.Tensor):
        """Top-1, NLL of the next token and exit layer at the positions that predict the counted tokens
        (computed where the logits are, returned on the CPU)."""
        s = max(first - 1, 0)
        nxt = torch.tensor(seq[s + 1:], device=logits.device)[:, None]
        nll = -torch.log_softmax(logits[s:-1], -1).gather(1, nxt)[:, 0]
        return logits.argmax(-1)[s:-1].cpu(), nll.cpu(), exit_at[s:-1].cpu()

    def _measure(self, name: str, sim: ExitSimulator, threshold: float, min_layer: int) -> dict:
        key = (name, threshold, min_layer)
        if key not in self.measured:
            passes, base_top1, base_nll = self._full_model(name)
            # the simulation starts at the point's first active checkpoint; with none, nothing exits
            start = min(sim.routers, default=None)
            if start is None:
                top1, nll, exit_at = base_top1, base_nll, torch.full((len(base_top1),), -1)
            else:
                runs = [self._counted(seq, first, *sim.run_from(prefix, start))
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
                      min_layer: int | None, num_layers: int, checkpoint_cost: float) -> dict | None:
    """For each minimum depth, the lowest threshold meeting the targets (fidelity rises with the
    threshold, so a binary search over the grid); then the point with the largest net saving. A deeper
    minimum runs fewer checkpoints, so it wins unless the shallower one skips more than they cost."""
    def ok(r):
        return r["top1_agreement"] >= target and (max_ppl is None or r["ppl_ratio"] <= 1 + max_ppl)

    def net(r):
        return net_layers_saved(r["skipped_fraction"], r["min_layer"], layers, num_layers, checkpoint_cost)
    best = None
    for m in ([min_layer] if min_layer is not None else layers):
        lo, hi = 0, len(THRESHOLD_GRID) - 1
        if not ok(evaluate(THRESHOLD_GRID[hi], m)):
            continue
        while lo < hi:
            mid = (lo + hi) // 2
            if ok(evaluate(THRESHOLD_GRID[mid], m)):
                hi = mid
            else:
                lo = mid + 1
        r = evaluate(THRESHOLD_GRID[lo], m)
        if best is None or net(r) > net(best):
            best = r
    return best


def choose_presets(evaluate, layers: list[int], target: float, max_ppl: float, min_layer: int | None,
                   num_layers: int, checkpoint_cost: float) -> tuple[dict, dict]:
    """The "default" point (the calibration's targets) and every named preset, sharing evaluations.

    Returns (presets, unpaid). A preset is only a point that pays(); one whose best point does not
    is None (exits off), and that point is kept in ``unpaid`` for the report to show.
    """
    choose = lambda agree, ppl: choose_propagated(evaluate, layers, agree, ppl, min_layer,  # noqa: E731
                                                  num_layers, checkpoint_cost)
    best = {"default": choose(target, max_ppl), **{name: choose(*bar) for name, bar in PRESETS.items()}}
    paid = {name: p is not None and pays(net_layers_saved(p["skipped_fraction"], p["min_layer"], layers, num_layers,
                                                          checkpoint_cost), checkpoint_cost)
            for name, p in best.items()}
    return ({name: p if paid[name] else None for name, p in best.items()},
            {name: p for name, p in best.items() if p is not None and not paid[name]})


# ----------------------------------------------------------------------------- driver

@dataclass
class Collected:
    """Everything calibration needs from the model, collected once (several variants can share it)."""
    model: object
    identity: object
    num_layers: int
    layers: list[int]
    train: States
    val: States
    val_seqs: list[list[int]]
    answers: list[tuple[list[int], int]]   # (prompt + the model's greedy answer, prompt length)
    lm_w: torch.Tensor                     # the LM head's weight, on the model's device
    corpus_name: str
    dtype: torch.dtype
    seconds: float


def _load_model(cfg: CalibrationConfig):
    """(tokenizer, frozen model in the calibration dtype, that dtype)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = {"auto": torch.bfloat16 if cfg.device == "cpu" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(cfg.device).eval()
    return tokenizer, model, dtype


def collect(cfg: CalibrationConfig) -> Collected:
    cfg.validate()
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    identity = model_identity(cfg.model)
    tokenizer, model, dtype = _load_model(cfg)
    num_layers = model.config.num_hidden_layers
    layers = checkpoint_layers(num_layers, cfg.interval)
    if cfg.min_layer is not None and not 0 <= cfg.min_layer < num_layers:
        raise TideConfigError(f"--min-layer must be in 0..{num_layers - 1}, got {cfg.min_layer}.")
    train_seqs, val_seqs, corpus_name = load_sequences(tokenizer, cfg)
    train = collect_states(model, train_seqs, layers, cfg.device, "calibration pass")
    val = collect_states(model, val_seqs, layers, cfg.device, "validation pass")
    answers = own_answers(model, tokenizer, val_seqs, cfg)
    lm_w = model.get_output_embeddings().weight.detach()     # on the model's device, like the LM head
    return Collected(model, identity, num_layers, layers, train, val, val_seqs, answers, lm_w, corpus_name, dtype,
                     time.time() - t0)


def own_answers(model, tokenizer, val_seqs: list[list[int]], cfg: CalibrationConfig) -> list[tuple[list[int], int]]:
    """The model's greedy answers to the --answer-prompts file's prompts, else to instructions about validation
    passages (none without a propagated choice)."""
    from . import answers
    own = answers.read_prompts(cfg.answer_prompts) if cfg.answer_prompts else None
    return answers.generate(model, tokenizer, val_seqs, cfg.answer_tokens if cfg.select_tokens > 0 else 0, own=own)


def suggestion(chosen: dict | None, layers: list[int], min_layer: int | None = None) -> tuple[float, int]:
    """The checkpoint's suggested (threshold, min_layer): the default preset's point, or exits off (1.0)
    when nothing meets the targets and pays for its checkpoints."""
    if chosen is None:
        return 1.0, (min_layer if min_layer is not None else layers[-1])
    return chosen["threshold"], chosen["min_layer"]


def _select_seqs(seqs: list[list[int]], tokens: int) -> list[list[int]]:
    return [seq for seq in _spread(seqs, tokens) if len(seq) >= 2]


def calibrate(cfg: CalibrationConfig, collected: Collected | None = None) -> RouterCheckpoint:
    if collected is not None:       # collect() validates the settings it is given
        cfg.validate()
    t0 = time.time()
    col = collected or collect(cfg)
    train, val, lm_w, layers = col.train, col.val, col.lm_w, col.layers

    projections = {c: fit_projection(cfg.exit_projection, train.z[c], train, lm_w, cfg.ridge, cfg.affine_rank,
                                     cfg.seed + c)
                   for c in tqdm(layers, desc="exit projections", unit="ckpt", file=sys.stderr)}
    train_m = exit_metrics(train, projections, lm_w, with_kl=cfg.criterion == "kl", with_nll=False)
    val_m = exit_metrics(val, projections, lm_w, with_kl=True)

    routers, report, val_scores, router_mods = {}, [], {}, {}
    for c in tqdm(layers, desc="routers", unit="ckpt", file=sys.stderr):
        if cfg.criterion == "top1":
            y, y_val = train_m[c].agree, val_m[c].agree
        elif cfg.criterion == "kl":
            y, y_val = kl_labels(train_m[c], cfg.kl_bound), kl_labels(val_m[c], cfg.kl_bound)
        else:
            y = cosine_labels(train.z[c], projections[c], train.final, cfg.cosine_threshold)
            y_val = cosine_labels(val.z[c], projections[c], val.final, cfg.cosine_threshold)
        router = train_router(train.z[c], y, cfg.bottleneck, cfg.epochs, cfg.seed + c)
        router_mods[c] = router
        routers[c] = {k: v.detach().clone() for k, v in router.state_dict().items()}
        with torch.no_grad():
            val_scores[c] = router(val.z[c].float())
        kl = val_m[c].kl
        report.append({"layer": c, "positive_rate": y_val.float().mean().item(), "auc": auc(val_scores[c], y_val),
                       "exit_top1_agreement": val_m[c].agree.float().mean().item(),
                       "exit_kl_median": kl.median().item(), "_labels": y_val})

    # The operating point: with propagation on validation sequences (post hoc as a fallback).
    propagated, evaluations, presets, unpaid = None, [], {}, {}
    if cfg.select_tokens > 0:
        evaluate = PropagatedEval(col.model, _select_seqs(col.val_seqs, cfg.select_tokens), router_mods, projections,
                                  col.num_layers, col.answers)
        with tqdm(desc="propagated choice", unit="point", file=sys.stderr) as bar:
            inner = evaluate.__call__

            def counted(t, m):
                fresh = (t, m) not in evaluate.results
                r = inner(t, m)
                bar.update(int(fresh))
                return r
            presets, unpaid = choose_presets(counted, layers, cfg.target_agreement, cfg.max_ppl_increase,
                                             cfg.min_layer, col.num_layers, cfg.checkpoint_cost)
            propagated = presets["default"]
        evaluations = list(evaluate.results.values())
        chosen = propagated
    else:
        post = choose_post_hoc(val_scores, val_m, col.num_layers, cfg.target_agreement, cfg.max_ppl_increase,
                               cfg.min_layer, cfg.checkpoint_cost)
        chosen = None if post is None else {"threshold": post[0], "min_layer": post[1], **post[2]}
    threshold, min_layer = suggestion(chosen, layers, cfg.min_layer)
    # the post-hoc report describes the suggestion or, when that is exits off, the default bar's
    # best point (at 1.0 every figure would read "nothing exits")
    shown = chosen or unpaid.get("default") or {"threshold": threshold, "min_layer": min_layer}

    for row in report:
        y_val = row.pop("_labels")
        c = row["layer"]
        fire = val_scores[c] > shown["threshold"]
        tp = (fire & y_val).sum().item()
        row["precision"] = tp / max(fire.sum().item(), 1)
        row["recall"] = tp / max(y_val.sum().item(), 1)
        # post hoc, as if only this checkpoint's router fired at that threshold
        only = torch.where(fire, c, -1)
        r = exit_summary(only, {c: val_m[c]}, col.num_layers)
        row["exit_rate"] = fire.float().mean().item()
        row["post_hoc_top1_agreement"] = r["top1_agreement"]
        row["post_hoc_ppl_ratio"] = r["ppl_ratio"]
    overall = {"threshold": shown["threshold"], "min_layer": shown["min_layer"],
               **exit_summary(simulate_exits(val_scores, shown["threshold"], shown["min_layer"]), val_m,
                              col.num_layers)}
    ckpt = RouterCheckpoint(
        model=col.identity, layers=layers, bottleneck=cfg.bottleneck, routers=routers,
        projection=cfg.exit_projection, projections={c: p for c, p in projections.items() if p is not None},
        criterion=cfg.criterion, corpus=col.corpus_name, tokens=len(train.top1), suggested_threshold=threshold,
        suggested_min_layer=min_layer,
        extra={"validation": report, "validation_tokens": len(val.top1), "post_hoc": overall,
               "answer_tokens": sum(len(seq) - n for seq, n in col.answers),
               "answer_prompts": cfg.answer_prompts or "built-in instructions about validation passages",
               "propagated": chosen if cfg.select_tokens > 0 else None, "propagated_evaluations": evaluations,
               "presets": presets, "unpaid": unpaid,
               "targets": {"top1_agreement": cfg.target_agreement, "max_ppl_increase": cfg.max_ppl_increase},
               "checkpoint_cost": cfg.checkpoint_cost,
               "kl_bound": cfg.kl_bound if cfg.criterion == "kl" else None,
               "temperatures": {str(c): p.temperature for c, p in projections.items() if p is not None},
               "calibration_dtype": str(col.dtype).replace("torch.", ""),
               # this call's wall time: with its own collection (inside it) or on a shared one (without it)
               "seconds": round(time.time() - t0, 1)})
    ckpt.save(cfg.output)
    print_report(ckpt)
    return ckpt


def add_presets(cfg: CalibrationConfig, path: str) -> RouterCheckpoint:
    """Compute the named presets for an existing checkpoint (propagated, on the validation split),
    reusing the propagated measurements it already stores."""
    ckpt = RouterCheckpoint.load(path)
    tokenizer, model, _ = _load_model(cfg)
    _, val_seqs, _ = load_sequences(tokenizer, cfg)
    routers = {c: ckpt.router_module(c).eval() for c in ckpt.layers}
    answers = own_answers(model, tokenizer, val_seqs, cfg)
    evaluate = PropagatedEval(model, _select_seqs(val_seqs, cfg.select_tokens), routers, ckpt.projections,
                              ckpt.model.num_layers, answers)
    for r in ckpt.extra.get("propagated_evaluations", []):
        evaluate.remember(r)
    targets = ckpt.extra.get("targets", {})
    ckpt.extra["presets"], ckpt.extra["unpaid"] = choose_presets(
        evaluate, ckpt.layers, targets.get("top1_agreement", cfg.target_agreement),
        targets.get("max_ppl_increase", cfg.max_ppl_increase), None, ckpt.model.num_layers, cfg.checkpoint_cost)
    ckpt.extra["checkpoint_cost"] = cfg.checkpoint_cost
    ckpt.extra["answer_tokens"] = sum(len(seq) - n for seq, n in answers)
    ckpt.extra["propagated_evaluations"] = list(evaluate.results.values())
    # the suggestion is the default preset, as calibrate() makes it; the post-hoc figures stay those
    # of the point they were measured at (they need the validation states)
    ckpt.extra["post_hoc"].setdefault("threshold", ckpt.suggested_threshold)
    ckpt.extra["post_hoc"].setdefault("min_layer", ckpt.suggested_min_layer)
    ckpt.extra["propagated"] = chosen = ckpt.extra["presets"]["default"]
    ckpt.suggested_threshold, ckpt.suggested_min_layer = suggestion(chosen, ckpt.layers)
    ckpt.save(path)
    print_report(ckpt)
    return ckpt


def print_report(ckpt: RouterCheckpoint) -> None:
    x = ckpt.extra
    print(f"\nTIDE calibration: {ckpt.tokens} tokens ({ckpt.corpus}), criterion={ckpt.criterion}, "
          f"exit projection={ckpt.projection}, {x['seconds']} s")
    ph = x["post_hoc"]
    at = (ph.get("threshold", ckpt.suggested_threshold), ph.get("min_layer", ckpt.suggested_min_layer))
    print(f"validation ({x['validation_tokens']} tokens); exit rate, precision, recall and post-hoc fidelity "
          f"at threshold {at[0]}:")
    print(f"{'layer':>5} {'pos.rate':>8} {'AUC':>6} {'T':>6} {'exit':>6} {'prec.':>6} {'recall':>6} "
          f"{'top1 agr':>8} {'ppl ratio':>9}")
    temps = x.get("temperatures", {})
    for r in x["validation"]:
        t = temps.get(str(r["layer"]))
        print(f"{r['layer']:>5} {r['positive_rate']:>8.3f} {r['auc']:>6.3f} {'-' if t is None else f'{t:.3f}':>6} "
              f"{r['exit_rate']:>6.3f} {r['precision']:>6.3f} {r['recall']:>6.3f} "
              f"{r['post_hoc_top1_agreement']:>8.4f} {r['post_hoc_ppl_ratio']:>9.4f}")
    pr, tg = x.get("propagated"), x["targets"]
    print(f"suggested threshold {ckpt.suggested_threshold}, min layer {ckpt.suggested_min_layer} "
          f"(targets: top-1 agreement >= {tg['top1_agreement']}, perplexity <= +{tg['max_ppl_increase']:.0%})")
    where = "" if at == (ckpt.suggested_threshold, ckpt.suggested_min_layer) else \
        f" (at threshold {at[0]}, min layer {at[1]})"
    print(f"  post hoc{where}:   {ph['skipped_fraction']:.3f} of token-layers after exits, top-1 agreement "
          f"{ph['top1_agreement']:.4f}, perplexity ratio {ph['ppl_ratio']:.4f}")
    if pr:
        print(f"  propagated: {pr['skipped_fraction']:.3f} of token-layers after exits, top-1 agreement "
              f"{pr['top1_agreement']:.4f}, perplexity ratio {pr['ppl_ratio']:.4f}")
    cost = x.get("checkpoint_cost")
    unpaid = x.get("unpaid") or {}
    presets = x.get("presets", {})
    for name in sorted(presets, key=lambda n: (n != "default", -PRESETS.get(n, (1.0,))[0])):
        p = presets[name]
        q = p if p is not None else unpaid.get(name)
        if q is None:
            print(f"  preset {name:<8}: none of the points met its target (exits off)")
            continue
        n_ckpt = checkpoints_run(ckpt.layers, q["min_layer"])
        head = "" if p is not None else "exits off; its best point, "
        point = f"  preset {name:<8}: {head}threshold {q['threshold']}, min layer {q['min_layer']} " \
                f"({n_ckpt} checkpoint{'' if n_ckpt == 1 else 's'})"
        sets = q.get("by_set", {})
        if len(sets) > 1:   # every figure of the point is the worse set's
            print(f"{point}, propagated:")
            for set_name, m in sorted(sets.items(), key=lambda kv: kv[0] != "text"):
                what = "validation text" if set_name == "text" else f"own answers ({x.get('answer_tokens')} tokens)"
                print(f"    {what + ':':<28} {m['skipped_fraction']:.3f} skipped, agreement {m['top1_agreement']:.4f}, "
                      f"perplexity ratio {m['ppl_ratio']:.4f}")
        else:
            print(f"{point}: {q['skipped_fraction']:.3f} skipped, agreement {q['top1_agreement']:.4f}, "
                  f"perplexity ratio {q['ppl_ratio']:.4f} (propagated)")
        if cost is not None:
            net = net_layers_saved(q["skipped_fraction"], q["min_layer"], ckpt.layers, ckpt.model.num_layers, cost)
            saved = q["skipped_fraction"] * ckpt.model.num_layers
            # from the choice itself: at cost 0 a kept point may net nothing
            verdict = "" if net > 0 else "; expected slower than stock vLLM" if p is not None else \
                ("; it would be slower than stock vLLM, so the preset keeps exits off "
                 f"(use it anyway with --tide-threshold {q['threshold']} --tide-min-layer {q['min_layer']})")
            on = " (the lesser set)" if len(sets) > 1 else ""
            print(f"    {saved:.2f} layers skipped per token{on} against {n_ckpt} x {cost} for its checkpoints: "
                  f"net {net:+.2f} layers{verdict}")
    if ckpt.suggested_threshold >= 1.0:
        print("  no operating point met the targets and paid for its checkpoints: the router's default keeps exits "
              "off (stock vLLM's forward); pass an explicit threshold to trade quality for speed")


def parse_args(argv=None) -> CalibrationConfig:
    p = argparse.ArgumentParser(description="Calibrate TIDE routers for a Hugging Face causal LM.")
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--output", required=True, help="router checkpoint to write (.safetensors)")
    p.add_argument("--corpus", nargs="*", default=[], help="text files or folders (default: the fixed SOTU split)")
    p.add_argument("--max-tokens", type=int, default=CalibrationConfig.max_tokens)
    p.add_argument("--seq-len", type=int, default=CalibrationConfig.seq_len)
    p.add_argument("--interval", type=int, default=CalibrationConfig.interval)
    p.add_argument("--criterion", default=CalibrationConfig.criterion, choices=CRITERIA)
    p.add_argument("--exit-projection", default=CalibrationConfig.exit_projection, choices=PROJECTIONS)
    p.add_argument("--device", default=CalibrationConfig.device, choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=CalibrationConfig.dtype, choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--bottleneck", type=int, default=CalibrationConfig.bottleneck)
    p.add_argument("--epochs", type=int, default=CalibrationConfig.epochs)
    p.add_argument("--kl-bound", type=float, default=CalibrationConfig.kl_bound, help="nats, for --criterion kl")
    p.add_argument("--affine-rank", type=int, default=None, help="low-rank affine projection (large models)")
    p.add_argument("--target-agreement", type=float, default=CalibrationConfig.target_agreement)
    p.add_argument("--max-ppl-increase", type=float, default=CalibrationConfig.max_ppl_increase)
    p.add_argument("--min-layer", type=int, default=None)
    p.add_argument("--select-tokens", type=int, default=CalibrationConfig.select_tokens,
                   help="validation tokens for the propagated choice of threshold and depth (0: post hoc)")
    p.add_argument("--answer-tokens", type=int, default=CalibrationConfig.answer_tokens,
                   help="tokens of the model's own greedy answers (to instructions about validation passages) "
                        "that points are also judged on: quality and saving must hold there too (0: text only)")
    p.add_argument("--answer-prompts", default=None, metavar="FILE",
                   help="your own prompts (e.g. from a request log), one per line, for the model's answers "
                        "instead of the built-in instructions about validation passages")
    p.add_argument("--checkpoint-cost", type=float, default=CalibrationConfig.checkpoint_cost,
                   help="cost of running one checkpoint, in decoder layers: a point must skip more than its "
                        "checkpoints cost, else the preset keeps exits off (0: every point meeting the bar "
                        "counts and the most skipping wins)")
    p.add_argument("--seed", type=int, default=CalibrationConfig.seed)
    a = p.parse_args(argv)
    return CalibrationConfig(**{k.replace("-", "_"): v for k, v in vars(a).items()})


def main(argv=None) -> int:
    try:
        calibrate(parse_args(argv))
    except TideConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
