"""Post-training router calibration on plain text (HF transformers, frozen model).

One streamed pass collects, for every calibration token, the router input at each checkpoint and
the full model's final state and top-1; labels, optional exit projections and the routers are then
fitted from those stored states. Labels are computed from exactly what the plugin will see at
inference: the router input, projected by the checkpoint's exit projection, through the LM head.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .checkpoint import CRITERIA, PROJECTIONS, RouterCheckpoint, checkpoint_layers
from .errors import TideConfigError
from .fingerprint import model_identity
from .router import Router, router_input

THRESHOLD_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)


@dataclass
class CalibrationConfig:
    model: str
    output: str
    corpus: list[str] = field(default_factory=list)   # empty: the fixed calibration split
    max_tokens: int = 110_000
    seq_len: int = 512
    interval: int = 4
    criterion: str = "top1"
    exit_projection: str = "identity"
    device: str = "cpu"
    dtype: str = "auto"          # bfloat16 on CPU (2x faster forward and LM head), float32 on CUDA
    bottleneck: int = 128
    epochs: int = 4
    cosine_threshold: float = 0.98
    ridge: float = 1e-2
    target_agreement: float = 0.98
    min_layer: int | None = None  # None: chosen on the validation slice
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
    return States({c: torch.cat(v) for c, v in z.items()}, torch.cat(finals), torch.cat(tops))


# ----------------------------------------------------------------------------- projections and labels

def fit_affine(z: torch.Tensor, target: torch.Tensor, ridge: float) -> dict[str, torch.Tensor]:
    """Least-squares map from the router input to the final normed state (tuned-lens style)."""
    x = torch.cat([z.double(), torch.ones(len(z), 1, dtype=torch.float64)], 1)
    a = x.T @ x + ridge * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(a, x.T @ target.double())          # [D+1, D]
    return {"weight": w[:-1].T.float().contiguous(), "bias": w[-1].float().contiguous()}


def apply_projection(z: torch.Tensor, proj: dict[str, torch.Tensor] | None) -> torch.Tensor:
    if proj is None:
        return z
    return torch.nn.functional.linear(z, proj["weight"].to(z.dtype), proj["bias"].to(z.dtype))


@torch.no_grad()
def top1_labels(z: torch.Tensor, proj, lm_head_weight: torch.Tensor, final_top1: torch.Tensor,
                chunk: int = 4096) -> torch.Tensor:
    """Does the exit's top-1 (router input -> exit projection -> LM head) equal the full model's?"""
    out = []
    w = lm_head_weight
    for s in range(0, len(z), chunk):
        h = apply_projection(z[s:s + chunk].to(w.dtype), proj)
        out.append((h @ w.T).argmax(-1) == final_top1[s:s + chunk])
    return torch.cat(out)


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


def exit_summary(exit_at: torch.Tensor, correct: dict[int, torch.Tensor], num_layers: int) -> tuple[float, float]:
    """(post-hoc top-1 agreement, fraction of token-layers skipped) for the given exits."""
    wrong = torch.zeros(len(exit_at), dtype=torch.bool)
    skipped = torch.zeros(len(exit_at))
    for c, ok in correct.items():
        sel = exit_at == c
        wrong |= sel & ~ok
        skipped[sel] = num_layers - 1 - c
    return 1.0 - wrong.float().mean().item(), skipped.sum().item() / (len(exit_at) * num_layers)


def choose_operating_point(scores, correct, num_layers: int, target: float, min_layer: int | None):
    """The (threshold, min_layer) with the most skipping whose post-hoc agreement meets the target."""
    layers = sorted(scores)
    candidates = [min_layer] if min_layer is not None else layers
    best = None
    for m in candidates:
        for t in THRESHOLD_GRID:
            agree, skipped = exit_summary(simulate_exits(scores, t, m), correct, num_layers)
            if agree >= target and (best is None or skipped > best[2]):
                best = (t, m, skipped, agree)
    if best is None:
        return 1.0, (min_layer if min_layer is not None else layers[-1]), 0.0, 1.0
    return best


# ----------------------------------------------------------------------------- driver

def calibrate(cfg: CalibrationConfig) -> RouterCheckpoint:
    cfg.validate()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    identity = model_identity(cfg.model)
    dtype = {"auto": torch.bfloat16 if cfg.device == "cpu" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(cfg.device).eval()
    num_layers = model.config.num_hidden_layers
    layers = checkpoint_layers(num_layers, cfg.interval)
    if cfg.min_layer is not None and not 0 <= cfg.min_layer < num_layers:
        raise TideConfigError(f"--min-layer must be in 0..{num_layers - 1}, got {cfg.min_layer}.")

    train_seqs, val_seqs, corpus_name = load_sequences(tokenizer, cfg)
    train = collect_states(model, train_seqs, layers, cfg.device, "calibration pass")
    val = collect_states(model, val_seqs, layers, cfg.device, "validation pass")
    lm_w = model.get_output_embeddings().weight.detach().cpu()

    routers, projections, report = {}, {}, []
    val_scores, val_correct = {}, {}
    for c in tqdm(layers, desc="labels + routers", unit="ckpt", file=sys.stderr):
        proj = fit_affine(train.z[c].float(), train.final.float(), cfg.ridge) if cfg.exit_projection == "affine" else None
        if proj is not None:
            projections[c] = proj
        if cfg.criterion == "top1":
            y = top1_labels(train.z[c], proj, lm_w, train.top1)
            y_val = top1_labels(val.z[c], proj, lm_w, val.top1)
        else:
            y = cosine_labels(train.z[c], proj, train.final, cfg.cosine_threshold)
            y_val = cosine_labels(val.z[c], proj, val.final, cfg.cosine_threshold)
        router = train_router(train.z[c], y, cfg.bottleneck, cfg.epochs, cfg.seed + c)
        routers[c] = {k: v.detach().clone() for k, v in router.state_dict().items()}
        with torch.no_grad():
            val_scores[c] = router(val.z[c].float())
        # Agreement is always judged on top-1, whatever the label criterion.
        val_correct[c] = y_val if cfg.criterion == "top1" else top1_labels(val.z[c], proj, lm_w, val.top1)
        report.append({"layer": c, "positive_rate": y_val.float().mean().item(),
                       "auc": auc(val_scores[c], y_val), "_labels": y_val})

    threshold, min_layer, skipped, agree = choose_operating_point(
        val_scores, val_correct, num_layers, cfg.target_agreement, cfg.min_layer)
    for row in report:
        y_val = row.pop("_labels")
        fire = val_scores[row["layer"]] > threshold
        tp = (fire & y_val).sum().item()
        row["precision"] = tp / max(fire.sum().item(), 1)
        row["recall"] = tp / max(y_val.sum().item(), 1)
    elapsed = time.time() - t0
    ckpt = RouterCheckpoint(
        model=identity, layers=layers, bottleneck=cfg.bottleneck, routers=routers,
        projection=cfg.exit_projection, projections=projections, criterion=cfg.criterion,
        corpus=corpus_name, tokens=len(train.top1), suggested_threshold=threshold, suggested_min_layer=min_layer,
        extra={"validation": report, "validation_tokens": len(val.top1), "estimated_skipped_fraction": skipped,
               "estimated_top1_agreement": agree, "target_agreement": cfg.target_agreement,
               "calibration_dtype": str(dtype).replace("torch.", ""), "seconds": round(elapsed, 1)})
    ckpt.save(cfg.output)
    print_report(ckpt)
    return ckpt


def print_report(ckpt: RouterCheckpoint) -> None:
    x = ckpt.extra
    print(f"\nTIDE calibration: {ckpt.tokens} tokens ({ckpt.corpus}), criterion={ckpt.criterion}, "
          f"exit projection={ckpt.projection}, {x['seconds']} s")
    print(f"validation ({x['validation_tokens']} tokens), at the suggested threshold {ckpt.suggested_threshold}:")
    print(f"{'layer':>5} {'pos.rate':>9} {'AUC':>6} {'precision':>9} {'recall':>7}")
    for r in x["validation"]:
        print(f"{r['layer']:>5} {r['positive_rate']:>9.3f} {r['auc']:>6.3f} {r['precision']:>9.3f} {r['recall']:>7.3f}")
    print(f"suggested threshold {ckpt.suggested_threshold}, min layer {ckpt.suggested_min_layer}: post-hoc "
          f"estimate {x['estimated_skipped_fraction']:.3f} of token-layers skipped at "
          f"{x['estimated_top1_agreement']:.3f} top-1 agreement (target {x['target_agreement']})")


def parse_args(argv=None) -> CalibrationConfig:
    p = argparse.ArgumentParser(description="Calibrate TIDE routers for a Hugging Face causal LM.")
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--output", required=True, help="router checkpoint to write (.safetensors)")
    p.add_argument("--corpus", nargs="*", default=[], help="text files or folders (default: the fixed SOTU split)")
    p.add_argument("--max-tokens", type=int, default=110_000)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--interval", type=int, default=4)
    p.add_argument("--criterion", default="top1", choices=CRITERIA)
    p.add_argument("--exit-projection", default="identity", choices=PROJECTIONS)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--bottleneck", type=int, default=128)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--target-agreement", type=float, default=0.98)
    p.add_argument("--min-layer", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
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
