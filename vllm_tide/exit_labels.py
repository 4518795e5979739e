"""What exiting at each checkpoint would give, and the routers trained to predict it (calibration).

The frozen model's router inputs and final states are collected once; each checkpoint's exit
projection is fitted to the full model's output distribution; labels compare exactly what the plugin
computes at an exit (router input -> exit projection -> LM head) with the full model.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .projection import ExitProjection, fit_affine, fit_temperature
from .router import Router, router_input

TEMPERATURE_SAMPLE = 2048     # tokens per checkpoint for the temperature fit (one scalar)


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
                 with_kl: bool, with_nll: bool = True, chunk: int = 4096,
                 desc: str | None = None) -> dict[int, ExitMetrics]:
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
    # with ``desc``, a progress bar: full-vocabulary products at every checkpoint take minutes on a CPU
    for s in tqdm(range(0, n, chunk), desc=desc, unit="chunk", file=sys.stderr, disable=desc is None):
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
