"""The calibration report printed after a run (and by add_presets): per-checkpoint router quality,
the suggestion, and every preset's figures against what its checkpoints cost."""
from __future__ import annotations

from .checkpoint import RouterCheckpoint
from .operating_points import PRESETS, checkpoints_run, net_layers_saved


def print_report(ckpt: RouterCheckpoint) -> None:
    x = ckpt.extra
    print(f"\nTIDE calibration: {ckpt.tokens} tokens ({ckpt.corpus}), criterion={ckpt.criterion}, "
          f"exit projection={ckpt.projection}, {x['seconds']} s")
    if x.get("calibration_dtype_reason"):
        print(f"dtype {x['calibration_dtype_reason']}")
    if x.get("stage_seconds"):
        print("stages: " + ", ".join(f"{name} {sec:.1f} s" for name, sec in x["stage_seconds"].items()))
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
    lossless = x.get("lossless")
    if lossless:
        print_lossless(lossless)


def print_lossless(x: dict) -> None:
    """Lossless mode (drafts verified by the full model): the drafting routers against the oracle."""
    p, o = x["preset"], x["oracle"]
    print(f"lossless drafting ({x['basis']}); per checkpoint on the validation text at threshold {p['threshold']}: "
          f"how often its draft is right, and the drafting router's AUC, firing rate, precision and recall:")
    print(f"{'layer':>5} {'right':>6} {'AUC':>6} {'fires':>6} {'prec.':>6} {'recall':>6}")
    for r in x["checkpoints"]:
        print(f"{r['layer']:>5} {r['right']:>6.3f} {r['auc']:>6.3f} {r['fires']:>6.3f} {r['precision']:>6.3f} "
              f"{r['recall']:>6.3f}")
    print(f"  oracle: {x['oracle_drafts']:.3f} of tokens have a right draft at some checkpoint; drafting each at its "
          f"earliest, modelled {o['speedup']:.3f}x stock (min layer {o['min_layer']}, {o['draft_tokens']} draft{'' if o['draft_tokens'] == 1 else 's'} per step)")
    verdict = "pays" if p["pays"] else "does not pay: lossless mode stays off"
    print(f"  preset lossless: threshold {p['threshold']}, min layer {p['min_layer']}, {p['draft_tokens']} draft{'' if p['draft_tokens'] == 1 else 's'} per step: "
          f"{p['drafted']:.3f} of tokens drafted, acceptance {p['acceptance']:.3f}, {p['mean_accepted']:.2f} accepted "
          f"per step, modelled {p['speedup']:.3f}x stock ({verdict})")
    for name, r in sorted(p.get("by_set", {}).items()) if len(p.get("by_set", {})) > 1 else ():
        what = "validation text" if name == "text" else "own answers"
        print(f"    {what + ':':<18} {r['drafted']:.3f} drafted, acceptance {r['acceptance']:.3f}, "
              f"modelled {r['speedup']:.3f}x")
