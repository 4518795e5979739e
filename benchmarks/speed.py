"""TIDE against stock vLLM, side by side in the same run: decode tokens/s at batch 1 and 8, prefill tokens/s.

    python benchmarks/speed.py --router outputs/router.safetensors --threshold 1.0      # router overhead
    python benchmarks/speed.py --router outputs/router.safetensors                     # suggested threshold

Two resident engines in two processes: stock (the plugin not loaded) and TIDE, with the same
execution mode (--execution: vLLM's default, compiled, or eager). On this project's 2-core machine an
engine process keeps its own speed for its whole life, up to 10-50% away from an identical one, and
the engine started second was usually the faster, so the run has halves (--halves, default 2, an
even number) with fresh engines each: stock started first, then TIDE started first, and so on. In each
half, after a warm-up, --repeats pairs alternate their order (A B, then B A), and the half's ratio is
the median of its per-pair ratios; the reported ratio is the geometric mean of the halves', which
cancels a start-order factor. Each process's own factor only averages down with more halves (run
--control, stock against stock, to see what is left). Results are written as JSON with the machine
description, every half's ratio and every run's seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

MODES = {"decode_b1": (1, 16, 64), "decode_b8": (8, 16, 64), "prefill": (4, 480, 1)}  # batch, prompt, new tokens


def worker(args) -> None:
    """Hold one engine; answer each stdin line (a mode) with one JSON line."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # Two engines stay resident side by side: without a fixed KV-cache size, vLLM on CPU reserves
    # 92% of memory for the first and the second cannot start.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    kw = dict(model=args.model, dtype=args.dtype, enforce_eager=args.execution == "eager", max_model_len=1024, block_size=32, seed=0,
              enable_prefix_caching=False)
    if args.worker == "tide":
        tide = {"router": args.router}
        if args.threshold is not None:
            tide["threshold"] = args.threshold
        if args.min_layer is not None:
            tide["min_layer"] = args.min_layer
        kw["additional_config"] = {"tide": tide}
    llm = LLM(**kw)
    # real text (the development split), cut into the same token prompts in both processes
    from vllm_tide.corpus import split_texts
    text_ids = llm.get_tokenizer()("\n".join(split_texts("dev"))[:200_000])["input_ids"]
    print("READY", flush=True)
    for line in sys.stdin:
        mode = line.strip()
        batch, plen, new = MODES[mode]
        prompts = [{"prompt_token_ids": text_ids[5000 * (b + 1): 5000 * (b + 1) + plen]} for b in range(batch)]
        sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        if args.worker == "tide":
            from vllm_tide import reset_exit_stats
            reset_exit_stats(llm)
        t0 = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        out = {"seconds": dt, "tokens": batch * (new if mode != "prefill" else plen)}
        if args.worker == "tide":
            from vllm_tide import exit_stats
            s = exit_stats(llm)
            out.update(skipped=s["skipped_layer_fraction"], partial=s["partial_layer_fraction"],
                       exits=sum(s["exits_per_layer"].values()), deferred=s["deferred_exits"])
        print("JSON" + json.dumps(out), flush=True)


class Engine:
    def __init__(self, kind: str, args, execution: str):
        env = dict(os.environ)
        if kind == "stock":
            env["VLLM_PLUGINS"] = "none-stock"       # stock vLLM: the TIDE plugin is not loaded
        cmd = [sys.executable, __file__, "--worker", kind, "--model", args.model, "--dtype", args.dtype,
               "--router", args.router, "--execution", execution]
        if args.threshold is not None:
            cmd += ["--threshold", str(args.threshold)]
        if args.min_layer is not None:
            cmd += ["--min-layer", str(args.min_layer)]
        self.log = tempfile.TemporaryFile("w+")     # the engine's log, shown if it fails
        self.p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.log, text=True)
        for line in self.p.stdout:
            if line.startswith("READY"):
                return
        self.log.seek(0)
        raise RuntimeError(f"{kind} engine failed to start:\n{self.log.read()[-3000:]}")

    def run(self, mode: str) -> dict:
        time.sleep(0.5)   # let the other engine's OpenMP threads stop spinning before timing this one
        self.p.stdin.write(mode + "\n")
        self.p.stdin.flush()
        for line in self.p.stdout:
            if line.startswith("JSON"):
                return json.loads(line[4:])
        raise RuntimeError("engine died")

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=60)
        self.log.close()


# the two kinds of half, by the order in which their engines start (also a pair's two run orders)
START_ORDERS = {"stock_first": ("stock", "tide"), "tide_first": ("tide", "stock")}


def half_names(halves: int) -> list[str]:
    """The run's halves in order: stock_first, tide_first, stock_first_2, tide_first_2, ..."""
    return [order + ("" if k == 0 else f"_{k + 1}") for k in range(halves // 2) for order in START_ORDERS]


def start_order(half: str) -> tuple[str, str]:
    return START_ORDERS["stock_first" if half.startswith("stock_first") else "tide_first"]


def _gmean(xs) -> float:
    xs = list(xs)
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _pair_ratio(runs: dict) -> tuple[float, list[float]]:
    """(median, all) of the stock/TIDE time ratios of a half's interleaved pairs (> 1: TIDE faster)."""
    ratios = [s["seconds"] / t["seconds"] for s, t in zip(runs["stock"], runs["tide"])]
    return statistics.median(ratios), ratios


def summarize(halves: dict) -> dict:
    """One mode's result from its halves (as many started stock first as TIDE first): the start-order
    factor cancels in the geometric mean of their medians, and each engine process's own averages down."""
    pairs = {h: _pair_ratio(r) for h, r in halves.items()}
    med = {h: m for h, (m, _) in pairs.items()}
    by_order = {o: [m for h, m in med.items() if start_order(h) == START_ORDERS[o]] for o in START_ORDERS}
    every = sorted(x for _, ratios in pairs.values() for x in ratios)
    tide = [r for h in halves.values() for r in h["tide"]]
    rate = {k: statistics.median(r["tokens"] / r["seconds"] for h in halves.values() for r in h[k])
            for k in ("stock", "tide")}
    return {"stock_tok_s": rate["stock"], "tide_tok_s": rate["tide"],
            "ratio": _gmean(med.values()), "ratio_per_half": med,
            "ratio_stock_first": _gmean(by_order["stock_first"]), "ratio_tide_first": _gmean(by_order["tide_first"]),
            "ratio_min": every[0], "ratio_max": every[-1],
            "skipped_layer_fraction": statistics.median(r.get("skipped", 0.0) for r in tide),
            "partial_layer_fraction": statistics.median(r.get("partial", 0.0) for r in tide),
            "exits": statistics.median(r.get("exits", 0) for r in tide),
            "deferred_exits": statistics.median(r.get("deferred", 0) for r in tide),
            "seconds": {h: {k: [r["seconds"] for r in v] for k, v in r.items()} for h, r in halves.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--router", default="outputs/router.safetensors")
    p.add_argument("--threshold", type=float, default=None, help="default: the checkpoint's suggestion")
    p.add_argument("--min-layer", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=4, help="interleaved pairs per half")
    p.add_argument("--halves", type=int, default=2,
                   help="engine starts per side, alternating which side starts first (even; more average "
                        "down each process's own speed, ~4 min per half on 2 cores)")
    p.add_argument("--execution", default="compiled", choices=["compiled", "eager"],
                   help="compiled: vLLM's default (torch.compile); eager: enforce_eager=True, for both engines")
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--control", action="store_true",
                   help="A/A control: run stock in both slots to measure the noise floor of the ratio")
    p.add_argument("--control-eager", action="store_true",
                   help="stock (--execution) against stock with enforce_eager=True: what eager execution costs")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.halves < 2 or args.halves % 2:
        p.error(f"--halves must be an even number of at least 2 (got {args.halves}), so that as many halves "
                "start stock's engine first as TIDE's")
    second = ("stock", "eager") if args.control_eager else ("stock" if args.control else "tide", args.execution)
    slots = {"stock": ("stock", args.execution), "tide": second}
    results = {"control": args.control, "control_eager": args.control_eager, "model": args.model, "router": args.router, "threshold": args.threshold, "min_layer": args.min_layer,
               "dtype": args.dtype, "execution": args.execution, "repeats": args.repeats, "halves": args.halves,
               "date": time.strftime("%Y-%m-%d"),
               "protocol": "halves with fresh engines, alternately stock started first and TIDE started first, "
                           "pairs alternating A B / B A; ratio = geometric mean of the halves' median per-pair ratios",
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "python": platform.python_version()}, "modes": {}}
    halves = half_names(args.halves)
    runs = {mode: {half: {"stock": [], "tide": []} for half in halves} for mode in args.modes}
    for half in halves:
        engines = {}
        try:
            for slot in start_order(half):
                kind, execution = slots[slot]
                engines[slot] = Engine(kind, args, execution)
            for mode in args.modes:
                for e in engines.values():          # warm-up
                    e.run(mode)
                for i in range(args.repeats):
                    for slot in START_ORDERS["stock_first" if i % 2 == 0 else "tide_first"]:
                        runs[mode][half][slot].append(engines[slot].run(mode))
                print(f"{mode:>10} ({half.replace('_', ' ')}): ratio {_pair_ratio(runs[mode][half])[0]:.3f}", flush=True)
        finally:
            for e in engines.values():
                e.close()
    for mode in args.modes:
        results["modes"][mode] = m = summarize(runs[mode])
        print(f"{mode:>10}: stock {m['stock_tok_s']:8.1f} tok/s  tide {m['tide_tok_s']:8.1f} tok/s  "
              f"ratio {m['ratio']:.3f} [{m['ratio_min']:.3f}-{m['ratio_max']:.3f}] (stock first "
              f"{m['ratio_stock_first']:.3f}, TIDE first {m['ratio_tide_first']:.3f})  skipped {m['skipped_layer_fraction']:.3f}  "
              f"partial {m['partial_layer_fraction']:.3f}  exits {m['exits']:.0f} (deferred {m['deferred_exits']:.0f})", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
