"""Would fitted K/V propagation beat CALM-style copying? An experiment on the HF model, no vLLM.

    python benchmarks/propagation_maps.py --json benchmarks/results/propagation_maps.json   # ~10 min, 2 cores

TIDE (like CALM) computes an exited token's K/V at every deeper layer j from its frozen exit state x.
The full model would have used x_j, the token's residual stream at layer j's input. This fits, per
checkpoint c and deeper layer j > c + 1, a ridge map x -> x_j on calibration text (layer c + 1 takes
x itself, so no map), then simulates the router's operating points twice on validation text: with
copied states (what the plugin does) and with mapped ones (only the deeper layers' K/V change; the
exited token's own logits do not). For each it reports top-1 agreement with the full model, the
perplexity ratio, KL(full || exits), the exit rate, and where the disagreements are: at the exited
tokens themselves (router and exit projection) or at later tokens (propagation). With --search, it
also finds, for each minimum exit layer, the lowest threshold meeting the default bar both ways.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vllm_tide.simulate import ExitSimulator  # noqa: E402


def layer_inputs(model, seqs: list[list[int]], layers: list[int]) -> dict[int, torch.Tensor]:
    """Every sequence's residual stream at the input of each of ``layers`` ([N, D], fp64 on the CPU)."""
    out = {j: [] for j in layers}
    with torch.no_grad():
        for seq in seqs:
            hs = model(torch.tensor([seq]), output_hidden_states=True).hidden_states    # hs[j]: input of layer j
            for j in layers:
                out[j].append(hs[j][0].double())
    return {j: torch.cat(v) for j, v in out.items()}


def fit_maps(states: dict[int, torch.Tensor], checkpoints: list[int], num_layers: int,
             ridge: float) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """(c, j) -> (W, b) with x_j ~ x + x W + b, x the state after layer c: ridge on the centred update."""
    maps = {}
    for c in checkpoints:
        x = states[c + 1]
        mean = x.mean(0)
        xc = x - mean
        gram = xc.T @ xc / len(x)
        gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
        for j in range(c + 2, num_layers):
            delta = states[j] - x
            dmean = delta.mean(0)
            w = torch.linalg.solve(gram, xc.T @ (delta - dmean) / len(x))
            maps[(c, j)] = (w.float(), (dmean - mean @ w).float())
    return maps


class MappedExits(ExitSimulator):
    """ExitSimulator whose exited tokens enter each deeper layer j > c + 1 as their mapped state (maps
    None: copied, as the plugin does). The last layer's output stays the frozen state, so the exited
    token's own logits are the plugin's."""
    maps: dict | None = None

    def _hold_exited(self, h, layer, done, frozen, exit_at) -> None:
        super()._hold_exited(h, layer, done, frozen, exit_at)
        if self.maps is None or layer == len(self.hf.model.layers) - 1:
            return
        for c in exit_at[done].unique().tolist():
            if (c, layer + 1) in self.maps:
                rows = exit_at == c
                w, b = self.maps[(c, layer + 1)]
                h[rows] = frozen[rows] + frozen[rows] @ w.to(frozen) + b.to(frozen)


def evaluate(model, ckpt, passes, seqs, threshold: float, min_layer: int, maps) -> dict:
    from vllm_tide.operating_points import net_layers_saved
    sim = MappedExits.from_checkpoint(model, ckpt, threshold, min_layer)
    sim.maps = maps
    n_layers = ckpt.model.num_layers
    agree = n = exited = after = 0
    dnll = kl = 0.0
    wrong = {"exited": 0, "later": 0}
    with torch.no_grad():
        for seq, (prefix, base) in zip(seqs, passes):
            logits, exit_at = sim.run_from(prefix, min(sim.routers))
            nxt = torch.tensor(seq[1:])[:, None]
            lp, lq = torch.log_softmax(base[:-1], -1), torch.log_softmax(logits[:-1], -1)
            same = lq.argmax(-1) == lp.argmax(-1)
            own = exit_at[:-1] >= 0
            agree += same.sum().item()
            n += len(same)
            wrong["exited"] += (~same & own).sum().item()
            wrong["later"] += (~same & ~own).sum().item()
            exited += own.sum().item()
            after += torch.where(own, n_layers - 1 - exit_at[:-1], 0).sum().item()
            dnll += (lq.gather(1, nxt) - lp.gather(1, nxt)).neg().sum().item()
            kl += (lp.exp() * (lp - lq)).sum().item()
    skipped = after / (n * n_layers)
    return {"threshold": threshold, "min_layer": min_layer, "top1_agreement": agree / n,
            "ppl_ratio": math.exp(dnll / n), "kl": kl / n, "exit_rate": exited / n, "skipped_fraction": skipped,
            "net_layers_saved": net_layers_saved(skipped, min_layer, ckpt.layers, n_layers, 0.5),
            "disagreements": wrong, "tokens": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--router", default="outputs/router.safetensors")
    p.add_argument("--fit-tokens", type=int, default=16000)
    p.add_argument("--val-tokens", type=int, default=6000)
    p.add_argument("--ridge", type=float, default=1e-2, help="relative to the mean variance")
    p.add_argument("--points", nargs="*", default=["0.8:27", "0.5:27", "0.3:27", "0.9:23", "0.8:19"],
                   metavar="THRESHOLD:MIN_LAYER")
    p.add_argument("--search", nargs="*", type=int, default=[27, 23, 19], metavar="MIN_LAYER",
                   help="minimum exit layers to search for the lowest threshold meeting the bar")
    p.add_argument("--target-agreement", type=float, default=0.98)
    p.add_argument("--max-ppl-increase", type=float, default=0.02)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_tide import corpus
    from vllm_tide.calibrate import _spread, _token_chunks
    from vllm_tide.checkpoint import RouterCheckpoint
    from vllm_tide.fingerprint import model_identity
    from vllm_tide.simulate import full_pass

    started = time.time()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ckpt = RouterCheckpoint.load(args.router)
    ckpt.check_model(model_identity(args.model), args.router)
    n_layers = model.config.num_hidden_layers
    points = [(float(t), int(m)) for t, m in (s.split(":") for s in args.points)]
    first = min([m for _, m in points] + list(args.search))
    checkpoints = [c for c in ckpt.layers if c >= first]
    fit = _spread(_token_chunks(tok, corpus.split_texts("calibration"), 256), args.fit_tokens)
    val = _spread(_token_chunks(tok, corpus.split_texts("validation"), 256), args.val_tokens)
    states = layer_inputs(model, fit, sorted({j for c in checkpoints for j in range(c + 1, n_layers)}))
    maps = fit_maps(states, checkpoints, n_layers, args.ridge)
    del states
    passes = [full_pass(model, seq, checkpoints) for seq in val]
    out = {"args": vars(args), "points": [], "search": []}
    for t, m in points:
        row = {kind: evaluate(model, ckpt, passes, val, t, m, mp) for kind, mp in (("copy", None), ("mapped", maps))}
        out["points"].append(row)
        for kind, r in row.items():
            print(f"{t} / {m} {kind:6s}: agreement {r['top1_agreement']:.4f}  ppl {r['ppl_ratio']:.4f}  "
                  f"KL {r['kl']:.4f}  exit rate {r['exit_rate']:.3f}  disagreements {r['disagreements']}", flush=True)
    grid = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
    for m in args.search:
        for kind, mp in (("copy", None), ("mapped", maps)):
            best = None
            for t in grid:      # agreement falls as the threshold does: stop at the first miss
                r = evaluate(model, ckpt, passes, val, t, m, mp)
                if r["top1_agreement"] < args.target_agreement or r["ppl_ratio"] > 1 + args.max_ppl_increase:
                    break
                best = r
            out["search"].append({"min_layer": m, "kind": kind, "best": best})
            print(f"min layer {m} {kind:6s}: lowest threshold meeting the bar "
                  + ("none" if best is None else f"{best['threshold']} (agreement {best['top1_agreement']:.4f}, "
                     f"exit rate {best['exit_rate']:.3f}, layers saved per token net of checkpoints "
                     f"{best['net_layers_saved']:+.2f})"), flush=True)
    out["seconds"] = round(time.time() - started, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
