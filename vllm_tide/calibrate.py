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

This module is the driver (settings, data, the run, the CLI); steps 1-3 live in vllm_tide.exit_labels,
step 4 in vllm_tide.operating_points, and the printed report in vllm_tide.calibration_report.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .calibration_report import print_report
from .drafting import answer_states, evaluate as evaluate_drafting, train_drafting_routers
from .checkpoint import CRITERIA, PROJECTIONS, RouterCheckpoint, checkpoint_layers
from .errors import TideConfigError, exit_on_config_error
from .exit_labels import (States, auc, collect_states, cosine_labels, exit_metrics, exit_outcomes, fit_projection,
                          kl_labels, sample, train_router)
from .fingerprint import model_identity
from .operating_points import (PostHocBound, PropagatedEval, choose_post_hoc, choose_presets, exit_summary,
                               simulate_exits, suggestion)
from .simulate import lm_head_weight


@dataclass
class CalibrationConfig:
    model: str
    output: str
    corpus: list[str] = field(default_factory=list)   # empty: the fixed calibration split
    # Tokens of the calibration pass: the affine exit maps are fitted on all of them, and routers are
    # trained on label_tokens of them, sampled (labels cost a full-vocabulary product per checkpoint and
    # token, more than the forward pass). Fewer calibrate faster but train weaker routers: on the
    # default model 65k tokens, all labelled, lost up to 0.014 AUC and 0.3 points of propagated
    # agreement against 110k (docs/CALIBRATION.md), so the defaults label all 110k; `make demo` uses
    # the quick setting.
    max_tokens: int = 110_000
    label_tokens: int = 110_000
    validation_tokens: int = 11_000  # the validation pass: router AUC, post-hoc figures, propagated text
    seq_len: int = 512
    interval: int = 4
    # defaults chosen from the frontier on development data (benchmarks/frontier.py, docs/MEASUREMENTS.md)
    criterion: str = "kl"
    exit_projection: str = "affine"
    device: str = "cpu"
    dtype: str = "auto"          # CPU: bfloat16 only where native and measured faster (cpu_dtype); CUDA: float32
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
        if self.label_tokens < 500:
            raise TideConfigError(f"--label-tokens must be at least 500 to train routers, got {self.label_tokens}.")
        if self.validation_tokens < 2 * 32:
            raise TideConfigError(f"--validation-tokens must be at least 64, got {self.validation_tokens}.")
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
        from .corpus import check_paths
        check_paths(self.corpus, "--corpus")
        if self.output:
            _check_output(self.output)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise TideConfigError("--device cuda needs a CUDA GPU and a CUDA build of torch, and this machine has "
                                  "neither usable; calibrate with --device cpu or on a GPU machine.")


def local_model_dir(model: str) -> str:
    """A model folder, or a Hugging Face model id found in the local hub cache (offline, as the plugin
    finds it): the folder it resolves to."""
    from .fingerprint import resolve_model_dir
    folder = resolve_model_dir(model)
    if folder is None:
        raise TideConfigError(f"--model {model!r} is neither a model folder nor a model id in the local Hugging Face "
                              f"cache (HF_HOME); download it first (e.g. `huggingface-cli download {model}`) or pass "
                              f"its folder.")
    return folder


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
    return _spread(train, cfg.max_tokens), _spread(val, cfg.validation_tokens), name


# ----------------------------------------------------------------------------- states
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
    dtype_reason: str
    seconds: float
    stages: dict[str, float]               # wall seconds per stage of the collection


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def calibration_dtype(cfg: CalibrationConfig, hidden_size: int) -> tuple[torch.dtype, str]:
    """(dtype, why): as asked, else float32 on CUDA (exact labels) and, on a CPU, bfloat16 only where
    it is native and measured faster (on an AVX2-only CPU it is emulated and ~6x slower)."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype], f"{cfg.dtype}: --dtype {cfg.dtype}"
    if cfg.device != "cpu":
        return torch.float32, "float32: the default on a GPU"
    from . import cpu_dtype
    return cpu_dtype.choose(hidden_size)


def _load_model(cfg: CalibrationConfig):
    """(tokenizer, frozen model in the calibration dtype, that dtype, why that dtype)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    config = AutoConfig.from_pretrained(cfg.model)
    dtype, why = calibration_dtype(cfg, getattr(config, "hidden_size", 1024))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(cfg.device).eval()
    return tokenizer, model, dtype, why


class Stages:
    """Wall seconds per calibration stage, for the report (what a user waits for, and where)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.time()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.time() - t0, 1)


def collect(cfg: CalibrationConfig) -> Collected:
    cfg.validate()
    cfg.model = local_model_dir(cfg.model)
    t0 = time.time()
    stage = Stages()
    torch.manual_seed(cfg.seed)
    with stage("load model"):
        identity = model_identity(cfg.model)
        tokenizer, model, dtype, why = _load_model(cfg)
    print(f"TIDE calibration dtype {why}", file=sys.stderr)
    num_layers = model.config.num_hidden_layers
    layers = checkpoint_layers(num_layers, cfg.interval)
    if cfg.min_layer is not None and not 0 <= cfg.min_layer < num_layers:
        raise TideConfigError(f"--min-layer must be in 0..{num_layers - 1}, got {cfg.min_layer}.")
    train_seqs, val_seqs, corpus_name = load_sequences(tokenizer, cfg)
    with stage("calibration pass"):
        train = collect_states(model, train_seqs, layers, cfg.device, "calibration pass")
    with stage("validation pass"):
        val = collect_states(model, val_seqs, layers, cfg.device, "validation pass")
    with stage("own answers"):
        answers = own_answers(model, tokenizer, val_seqs, cfg)
    lm_w = lm_head_weight(model)     # on the model's device, like the LM head (Granite's logits_scaling in it)
    return Collected(model, identity, num_layers, layers, train, val, val_seqs, answers, lm_w, corpus_name, dtype,
                     why, time.time() - t0, stage.seconds)


def own_answers(model, tokenizer, val_seqs: list[list[int]], cfg: CalibrationConfig) -> list[tuple[list[int], int]]:
    """The model's greedy answers to the --answer-prompts file's prompts, else to instructions about validation
    passages (none without a propagated choice)."""
    from . import answers
    own = answers.read_prompts(cfg.answer_prompts) if cfg.answer_prompts else None
    return answers.generate(model, tokenizer, val_seqs, cfg.answer_tokens if cfg.select_tokens > 0 else 0, own=own)


def _select_seqs(seqs: list[list[int]], tokens: int) -> list[list[int]]:
    return [seq for seq in _spread(seqs, tokens) if len(seq) >= 2]


def calibrate(cfg: CalibrationConfig, collected: Collected | None = None) -> RouterCheckpoint:
    if collected is not None:       # collect() validates the settings it is given
        cfg.validate()
    t0 = time.time()
    col = collected or collect(cfg)
    stage = Stages()
    train, val, lm_w, layers = col.train, col.val, col.lm_w, col.layers

    with stage("exit projections"):
        projections = {c: fit_projection(cfg.exit_projection, train.z[c], train.final, cfg.ridge, cfg.affine_rank)
                       for c in tqdm(layers, desc="exit projections", unit="ckpt", file=sys.stderr)}
    # routers learn from a random sample of the calibration tokens (in random order, so the first
    # chunk, which fits the temperatures, is a sample too)
    labelled = train.rows(sample(len(train), cfg.label_tokens, cfg.seed))
    with stage("labels"):
        train_m, projections = exit_outcomes(labelled, projections, lm_w, with_kl=cfg.criterion == "kl",
                                             with_nll=False, fit_temperatures=True, desc="exit outcomes (labels)")
        val_m = exit_metrics(val, projections, lm_w, with_kl=True, desc="exit outcomes (validation)")

    routers, report, val_scores, router_mods = {}, [], {}, {}
    with stage("routers"):
        for c in tqdm(layers, desc="routers", unit="ckpt", file=sys.stderr):
            if cfg.criterion == "top1":
                y, y_val = train_m[c].agree, val_m[c].agree
            elif cfg.criterion == "kl":
                y, y_val = kl_labels(train_m[c], cfg.kl_bound), kl_labels(val_m[c], cfg.kl_bound)
            else:
                y = cosine_labels(labelled.z[c], projections[c], labelled.final, cfg.cosine_threshold)
                y_val = cosine_labels(val.z[c], projections[c], val.final, cfg.cosine_threshold)
            router = train_router(labelled.z[c], y, cfg.bottleneck, cfg.epochs, cfg.seed + c)
            router_mods[c] = router
            routers[c] = {k: v.detach().clone() for k, v in router.state_dict().items()}
            with torch.no_grad():
                val_scores[c] = router(val.z[c].float())
            kl = val_m[c].kl
            report.append({"layer": c, "positive_rate": y_val.float().mean().item(), "auc": auc(val_scores[c], y_val),
                           "exit_top1_agreement": val_m[c].agree.float().mean().item(),
                           "exit_kl_median": kl.median().item(), "_labels": y_val})

    # Lossless mode's drafting routers: top-1 labels on the same rows (the full model verifies drafts)
    with stage("drafting routers"):
        drafters = train_drafting_routers(labelled, train_m, cfg.bottleneck, cfg.epochs, cfg.seed)
        own = answer_states(col.model, col.answers, layers, cfg.device)
        own_m = None if own is None else exit_metrics(own, projections, lm_w, with_kl=False, with_nll=False)
        lossless = evaluate_drafting(drafters, val, val_m, col.num_layers, answers=own, answers_m=own_m)

    # The operating point: with propagation on validation sequences (post hoc as a fallback).
    propagated, evaluations, presets, unpaid = None, [], {}, {}
    if cfg.select_tokens > 0:
        evaluate = PropagatedEval(col.model, _select_seqs(col.val_seqs, cfg.select_tokens), router_mods, projections,
                                  col.num_layers, col.answers)
        # post-hoc figures bound the propagated ones: where the search starts, and which depths it skips
        bound = PostHocBound(val_scores, val_m, col.num_layers)
        with stage("propagated choice"), tqdm(desc="propagated choice", unit="point", file=sys.stderr) as bar:
            inner = evaluate.__call__

            def counted(t, m):
                fresh = (t, m) not in evaluate.results
                r = inner(t, m)
                bar.update(int(fresh))
                return r
            presets, unpaid = choose_presets(counted, layers, cfg.target_agreement, cfg.max_ppl_increase,
                                             cfg.min_layer, col.num_layers, cfg.checkpoint_cost, bound)
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
        criterion=cfg.criterion, corpus=col.corpus_name, tokens=len(train), suggested_threshold=threshold,
        suggested_min_layer=min_layer,
        draft_routers={c: {k: v.detach().clone() for k, v in r.state_dict().items()} for c, r in drafters.items()},
        extra={"validation": report, "lossless": lossless, "validation_tokens": len(val), "label_tokens": len(labelled),
               "post_hoc": overall,
               "answer_tokens": sum(len(seq) - n for seq, n in col.answers),
               "answer_prompts": cfg.answer_prompts or "built-in instructions about validation passages",
               "propagated": chosen if cfg.select_tokens > 0 else None, "propagated_evaluations": evaluations,
               "presets": presets, "unpaid": unpaid,
               "targets": {"top1_agreement": cfg.target_agreement, "max_ppl_increase": cfg.max_ppl_increase},
               "checkpoint_cost": cfg.checkpoint_cost,
               "kl_bound": cfg.kl_bound if cfg.criterion == "kl" else None,
               "temperatures": {str(c): p.temperature for c, p in projections.items() if p is not None},
               "calibration_dtype": str(col.dtype).replace("torch.", ""), "calibration_dtype_reason": col.dtype_reason,
               # wall seconds per stage (the collection's only when this call made it)
               "stage_seconds": {**(col.stages if collected is None else {}), **stage.seconds},
               # this call's wall time: with its own collection (inside it) or on a shared one (without it)
               "seconds": round(time.time() - t0, 1)})
    ckpt.save(cfg.output)
    print_report(ckpt)
    return ckpt


def add_presets(cfg: CalibrationConfig, path: str) -> RouterCheckpoint:
    """Compute the named presets for an existing checkpoint (propagated, on the validation split),
    reusing the propagated measurements it already stores."""
    ckpt = RouterCheckpoint.load(path)
    tokenizer, model, _, _ = _load_model(cfg)
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


def parse_args(argv=None) -> CalibrationConfig:
    p = argparse.ArgumentParser(description="Calibrate TIDE routers for a Hugging Face causal LM.")
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--output", required=True, help="router checkpoint to write (.safetensors)")
    p.add_argument("--corpus", nargs="*", default=[], help="text files or folders (default: the fixed SOTU split)")
    p.add_argument("--max-tokens", type=int, default=CalibrationConfig.max_tokens,
                   help="tokens of the calibration pass (exit projections are fitted on all of them)")
    p.add_argument("--label-tokens", type=int, default=CalibrationConfig.label_tokens,
                   help="calibration tokens, sampled, that get exit labels and train the routers")
    p.add_argument("--validation-tokens", type=int, default=CalibrationConfig.validation_tokens,
                   help="tokens of held-out validation text (router AUC, post-hoc and propagated figures)")
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
                   help="your own prompts (e.g. from a request log), one per line or .jsonl, for the model's answers "
                        "instead of the built-in instructions about validation passages")
    p.add_argument("--checkpoint-cost", type=float, default=CalibrationConfig.checkpoint_cost,
                   help="cost of running one checkpoint, in decoder layers: a point must skip more than its "
                        "checkpoints cost, else the preset keeps exits off (0: every point meeting the bar "
                        "counts and the most skipping wins)")
    p.add_argument("--seed", type=int, default=CalibrationConfig.seed)
    a = p.parse_args(argv)
    return CalibrationConfig(**{k.replace("-", "_"): v for k, v in vars(a).items()})


def main(argv=None) -> int:
    with exit_on_config_error():
        calibrate(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
