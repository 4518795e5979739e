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

from .projection import ExitProjection, fit_affine, fit_temperature, row_blocks
from .router import Router, norm_weight_eps, router_input

TEMPERATURE_SAMPLE = 1024     # tokens per checkpoint for the temperature fit (one scalar)


@dataclass
class States:
    z: dict[int, torch.Tensor]     # checkpoint -> router inputs [N, D]
    final: torch.Tensor            # final normed state, what the LM head sees [N, D]
    top1: torch.Tensor | None      # full model's top-1 [N]; None: exit_outcomes computes it from ``final``
    target: torch.Tensor           # the next token in the text [N], -1 at the end of a sequence

    def __len__(self) -> int:
        return len(self.final)

    def rows(self, idx: torch.Tensor) -> "States":
        return States({c: z[idx] for c, z in self.z.items()}, self.final[idx],
                      None if self.top1 is None else self.top1[idx], self.target[idx])


@torch.no_grad()
def collect_states(model, seqs: list[list[int]], layers: list[int], device: str, desc: str) -> States:
    """Router inputs and final states for every token, from the decoder stack alone: the LM head is
    not run here (the full model's top-1 and distribution are computed where they are needed, on
    the rows that get labels)."""
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
    finals = []
    try:
        for seq in tqdm(seqs, desc=desc, unit="seq", file=sys.stderr):
            model.model(input_ids=torch.tensor([seq], device=device), use_cache=False)
            w, eps = norm_weight_eps(norm)
            for c in layers:
                z[c].append(router_input(captured[c][0], w, eps).cpu())
            finals.append(router_input(captured[len(decoder) - 1][0], w, eps).cpu())
    finally:
        for h in handles:
            h.remove()
    targets = torch.cat([torch.tensor(seq[1:] + [-1]) for seq in seqs])
    return States({c: torch.cat(v) for c, v in z.items()}, torch.cat(finals), None, targets)


# ----------------------------------------------------------------------------- projections and labels

def apply_projection(z: torch.Tensor, proj: ExitProjection | None) -> torch.Tensor:
    return z if proj is None else proj.apply(z).to(z.dtype)


def sample(n: int, k: int, seed: int) -> torch.Tensor:
    """k of n row indices, uniformly at random (seeded), in random order: any prefix is a sample too."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]


@torch.no_grad()
def fit_projection(kind: str, z: torch.Tensor, final: torch.Tensor, ridge: float,
                   rank: int | None) -> ExitProjection | None:
    """identity: None; temperature: T = 1 until exit_outcomes fits it; affine: least squares to the
    final state (its temperature is fitted the same way, on the exit logits the labels use)."""
    if kind == "identity":
        return None
    return fit_affine(z.float(), final.float(), ridge, rank) if kind == "affine" else ExitProjection()


@dataclass
class ExitMetrics:
    agree: torch.Tensor            # exit top-1 == full model top-1 [N]
    kl: torch.Tensor | None        # KL(final || exit) [N] (when asked for; labels only: inf where agree is False)
    nll_exit: torch.Tensor         # -log p_exit(next token) [N] (nan where there is no next token, or not asked for)
    nll_final: torch.Tensor        # -log p_final(next token) [N]


SHORTLIST_TOP = 2     # each row's most likely final tokens, pooled over a chunk: the exits' usual rivals
def kl_and_nll(final_logp: torch.Tensor | None, logits: torch.Tensor, b: float, safe: torch.Tensor | None):
    """Per row, KL(final || softmax(b * logits)) (with ``final_logp``) and the NLL of ``safe``'s tokens
    (with ``safe``), block by block; each KL term's difference is taken before the sum (exact in fp32)."""
    n = len(logits)
    kl = torch.empty(n, device=logits.device) if final_logp is not None else None
    nll = torch.empty(n, device=logits.device) if safe is not None else None
    for s, e in row_blocks(n, logits.device):
        block = logits[s:e]
        lq = torch.log_softmax(block * b if b != 1.0 else block, -1)
        if kl is not None:
            flp = final_logp[s:e]
            kl[s:e] = (flp.exp() * (flp - lq)).sum(-1)
        if nll is not None:
            nll[s:e] = -lq.gather(1, safe[s:e])[:, 0]
    return kl, nll


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(logits)
    for s, e in row_blocks(len(logits), logits.device):
        out[s:e] = torch.log_softmax(logits[s:e], -1)
    return out


@torch.no_grad()
def exit_outcomes(states: States, projections: dict[int, ExitProjection | None], lm_w: torch.Tensor,
                  with_kl: bool, with_nll: bool = True, fit_temperatures: bool = False, chunk: int = 1024,
                  desc: str | None = None) -> tuple[dict[int, ExitMetrics], dict[int, ExitProjection | None]]:
    """For every checkpoint and token, what exiting there would give; and, with ``fit_temperatures``,
    each projection's temperature, fitted by KL on the first TEMPERATURE_SAMPLE rows (pass the rows in
    random order, so those are a sample).

    One chunked pass: per chunk the full model's logits are computed once and shared by every checkpoint.
    Without NLLs (labels), a checkpoint's full-vocabulary product is only computed for the rows that may
    agree: its logits over a shortlist (every row's SHORTLIST_TOP final tokens, pooled over the chunk)
    already show most disagreeing rows, where another token beats the final top-1, and those need no
    KL either (a label needs both). Every other row gets its exact argmax and KL from the full product.
    Temperatures scale logits, so the argmax, the fit and the KL come from one product per row. It
    runs where ``lm_w`` is (the model's device); the states stay on the CPU and so do the results.
    """
    layers = sorted(projections)
    dev = {c: None if p is None else p.to(lm_w.device) for c, p in projections.items()}
    fitted = dict(projections)
    parts = {c: [] for c in layers}
    finals = []
    w = lm_w
    n = len(states)
    fit_rows = min(TEMPERATURE_SAMPLE, n) if fit_temperatures else 0
    starts = ([0] if fit_rows else []) + list(range(fit_rows, n, chunk))
    nan = lambda k: torch.full((k,), torch.nan)   # noqa: E731
    # with ``desc``, a progress bar: full-vocabulary products at every checkpoint take minutes on a CPU
    for k, s in enumerate(tqdm(starts, desc=desc, unit="chunk", file=sys.stderr, disable=desc is None)):
        e = starts[k + 1] if k + 1 < len(starts) else n
        fitting = bool(fit_rows) and s == 0

        def rows(t: torch.Tensor, s: int = s, e: int = e) -> torch.Tensor:   # this chunk's rows, on the LM head's device
            return t[s:e].to(w.device)
        tgt = rows(states.target)
        has = tgt >= 0
        safe = tgt.clamp(min=0)[:, None]
        final_logits = (rows(states.final).to(w.dtype) @ w.T).float()
        top1 = final_logits.argmax(-1) if states.top1 is None else rows(states.top1)
        final_logp = _log_softmax(final_logits) if with_kl or with_nll or fitting else None
        finals.append(torch.where(has, -final_logp.gather(1, safe)[:, 0], torch.nan).cpu() if with_nll
                      else nan(len(tgt)))
        shortlist = None
        if not (with_nll or fitting):
            shortlist = torch.unique(torch.cat([top1, final_logits.topk(SHORTLIST_TOP, -1).indices.flatten()]))
            top1_at = torch.searchsorted(shortlist, top1)          # the final top-1's column in the shortlist
            w_short = w[shortlist]
        del final_logits
        for c in layers:
            proj = dev[c]
            h = rows(states.z[c]).to(w.dtype)
            if proj is not None:       # the projection before its temperature
                h = dataclasses.replace(proj, temperature=1.0).apply(h).to(w.dtype)
            b = 1.0 if proj is None else 1.0 / proj.temperature
            if shortlist is not None:
                maybe = ((h @ w_short.T).argmax(-1) == top1_at).nonzero()[:, 0]   # no shortlisted token beats it
                agree = torch.zeros(len(h), dtype=torch.bool, device=w.device)
                kl = torch.full((len(h),), torch.inf, device=w.device) if with_kl else None
                if len(maybe):
                    logits = (h[maybe] @ w.T).float()
                    hit = logits.argmax(-1) == top1[maybe]
                    agree[maybe] = hit
                    if with_kl and hit.any():
                        sure = maybe[hit]
                        kl[sure] = kl_and_nll(final_logp[sure], logits[hit], b, None)[0]
                parts[c].append((agree.cpu(), None if kl is None else kl.cpu(), nan(len(h))))
                continue
            logits = (h @ w.T).float()
            if fitting and proj is not None:
                t = fit_temperature(logits, final_logp)
                dev[c] = proj = dataclasses.replace(proj, temperature=t)
                fitted[c] = dataclasses.replace(projections[c], temperature=t)
                b = 1.0 / t
            agree = (logits.argmax(-1) == top1).cpu()
            kl, nll = kl_and_nll(final_logp if with_kl else None, logits, b, safe if with_nll else None)
            if kl is not None:
                kl = kl.cpu()
                if not with_nll:         # labels: as the shortlisted chunks give them
                    kl[~agree] = torch.inf
            nll = torch.where(has, nll, torch.nan).cpu() if nll is not None else nan(len(h))
            parts[c].append((agree, kl, nll))
    nll_final = torch.cat(finals)
    metrics = {c: ExitMetrics(torch.cat([p[0] for p in parts[c]]),
                              torch.cat([p[1] for p in parts[c]]) if with_kl else None,
                              torch.cat([p[2] for p in parts[c]]), nll_final) for c in layers}
    return metrics, fitted


def exit_metrics(states: States, projections: dict[int, ExitProjection | None], lm_w: torch.Tensor,
                 with_kl: bool, with_nll: bool = True, chunk: int = 1024,
                 desc: str | None = None) -> dict[int, ExitMetrics]:
    """exit_outcomes' metrics for projections as they are (temperatures already fitted)."""
    return exit_outcomes(states, projections, lm_w, with_kl, with_nll, chunk=chunk, desc=desc)[0]


def kl_labels(m: ExitMetrics, bound: float) -> torch.Tensor:
    """Exit-safe: the distribution is kept (KL(final || exit) < bound) and so is the top-1."""
    return (m.kl < bound) & m.agree


@torch.no_grad()
def cosine_labels(z: torch.Tensor, proj, final: torch.Tensor, threshold: float) -> torch.Tensor:
    """The paper's rule in one consistent space: both sides after the final norm."""
    h = apply_projection(z.float(), proj)
    return torch.nn.functional.cosine_similarity(h, final.float(), dim=-1) > threshold


ROUTER_BATCH = 512
# Routers learn from a sample of the calibration tokens: at least this many optimiser steps, however few
# labels (on the default model, 65k labels at 4 epochs = 512 steps lost up to 0.013 AUC against 110k,
# at 1,024 steps at most 0.006; docs/CALIBRATION.md)
MIN_ROUTER_STEPS = 1024


def train_router(z: torch.Tensor, labels: torch.Tensor, bottleneck: int, epochs: int, seed: int) -> Router:
    """``epochs`` passes over the labels in shuffled 512-row batches, or more passes where that makes
    fewer than MIN_ROUTER_STEPS steps."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    router = Router(z.shape[1], bottleneck)
    opt = torch.optim.AdamW(router.parameters(), lr=2e-3, weight_decay=1e-4)
    y = labels.float()
    per_epoch = math.ceil(len(z) / ROUTER_BATCH)
    epochs = max(epochs, math.ceil(MIN_ROUTER_STEPS / per_epoch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * per_epoch)
    for _ in range(epochs):
        perm = torch.randperm(len(z), generator=g)
        for s in range(0, len(z), ROUTER_BATCH):
            idx = perm[s:s + ROUTER_BATCH]
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
