"""The main job on the default model: TIDE early exit next to stock vLLM on the same prompts.

    python benchmarks/demo.py --router outputs/router.safetensors

1. Stock vLLM, in a separate process with the plugin not loaded (VLLM_PLUGINS names no TIDE entry),
   writes greedy answers to a few chat prompts.
2. TIDE writes the same answers with exits on (quality: identical answers, exits taken).
3. Speed, in the TIDE engine itself: the same requests alternate between exits off (`tide_enabled:
   false`, which runs stock vLLM's own forward) and exits on, timed step for step in one process, so
   the engine process's own speed (which differs by 10-50% between processes on this machine) cancels.
4. A table and one PNG (quality and speed against stock); the PNG's path is printed last.
"""
import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in two sentences.",
    "List three uses of a paperclip:",
]


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def _engine(args, tide: dict | None):
    from vllm import LLM, SamplingParams
    # vLLM's default execution (torch.compile) for both engines: what a user runs
    kw = dict(model=args.model, dtype=args.dtype, max_model_len=1024, block_size=32, seed=0)
    if tide is not None:
        kw["additional_config"] = {"tide": tide}
    llm = LLM(**kw)
    llm.chat([[{"role": "user", "content": PROMPTS[0]}]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    return llm


def answer(llm, extra: dict | None, max_tokens: int, ignore_eos: bool = False) -> tuple[list[str], int, float]:
    """Greedy answers to PROMPTS one at a time (batch 1, the latency case): (texts, tokens, seconds).
    Timed with ``ignore_eos``, every answer is max_tokens long, so every setting does the same work."""
    from vllm import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, extra_args=extra, ignore_eos=ignore_eos)
    texts, tokens, seconds = [], 0, 0.0
    for p in PROMPTS:
        t0 = time.perf_counter()
        o = llm.chat([[{"role": "user", "content": p}]], sp, use_tqdm=False)[0].outputs[0]
        seconds += time.perf_counter() - t0
        tokens += len(o.token_ids)
        texts.append(o.text)
    return texts, tokens, seconds


def stock(args) -> dict:
    llm = _engine(args, None)
    texts, _, _ = answer(llm, None, args.max_tokens)
    _, tokens, seconds = answer(llm, None, args.max_tokens, ignore_eos=True)    # timed as the TIDE engine is
    return {"texts": texts, "tokens_per_s": tokens / seconds}


def explain_exits_off(tide: dict, ckpt) -> None:
    """When the router's setting keeps exits off (calibration found no point that meets its bar and
    pays for its checkpoints), say so, and show that best point anyway: a demo of early exit that
    exits nothing would show nothing."""
    from vllm_tide.checkpoint import OFF
    from vllm_tide.settings import TideSettings
    threshold, _ = TideSettings.parse(tide).resolve(ckpt)
    if threshold < OFF:
        return
    name = tide.get("preset", "default")
    point = (ckpt.extra.get("unpaid") or {}).get(name)
    print(f"The router's {name} setting keeps exits off on this model: calibration found no operating point "
          f"that meets its quality bar and saves more than its checkpoints cost, so `vllm serve --plugin tide` "
          f"runs stock vLLM's forward by default.")
    if point is not None:
        tide.update(threshold=point["threshold"], min_layer=point["min_layer"])
        print(f"Shown below anyway at the best point meeting the bar (threshold {point['threshold']}, min layer "
              f"{point['min_layer']}; {point['skipped_fraction']:.3f} of token-layers skipped on validation), "
              f"which the calibration report expects to be slower than stock.")


def same_engine_speed(llm, rounds: int, max_tokens: int) -> dict:
    """Decode tokens/s with exits off (stock's forward), on, and off again (an A/A control: how far two
    identical settings differ here, the noise floor of the ratio), request by request in one engine, the
    order rotating each round: medians over the rounds."""
    from statistics import median

    from tqdm import tqdm
    arms = ("off", "on", "off_again")
    rates = {k: [] for k in arms}
    for r in tqdm(range(rounds), desc="same-engine timing", unit="round", file=sys.stdout):
        for which in arms[r % 3:] + arms[:r % 3]:
            _, tokens, seconds = answer(llm, None if which == "on" else {"tide_enabled": False}, max_tokens,
                                        ignore_eos=True)
            rates[which].append(tokens / seconds)
    return {k: median(v) for k, v in rates.items()}


def plot(path: str, same: dict, identical: int, skipped: float, tokens_total: int, point: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    # the same engine for both bars: another process's speed differs by 10-50% on its own
    bars = a.bar(["stock vLLM's\nforward (exits off)", "the same again\n(A/A control)", f"TIDE exits on\n{point}"],
                 [same["off"], same["off_again"], same["on"]], color=["#4c72b0", "#8da0cb", "#dd8452"])
    a.bar_label(bars, fmt="%.1f")
    a.set_ylabel("tokens/s, batch 1, one engine")
    a.set_title(f"TIDE / stock forward {same['on'] / same['off']:.3f}x; A/A {same['off_again'] / same['off']:.3f}x",
                fontsize=10)
    n = len(PROMPTS)
    bars = b.bar(["identical greedy\nanswers (%)", "token-layers\nskipped (%)"], [100 * identical / n, 100 * skipped],
                 color=["#55a868", "#dd8452"])
    b.bar_label(bars, fmt="%.1f")
    b.set_ylim(0, 105)
    b.set_title(f"quality and work: {identical}/{n} answers as stock, {tokens_total} tokens")
    fig.suptitle("vllm-tide on the default model against stock vLLM (one run; benchmarks/speed.py for figures)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--router", default="outputs/router.safetensors")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--preset", default=None, help="default, balanced or fast (stored in the router)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3, help="same-engine timing rounds (each: every prompt, off, on and off again)")
    p.add_argument("--png", default="outputs/demo.png")
    p.add_argument("--stock-json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stock_json:
        print("JSON" + json.dumps(stock(args)))
        return
    from vllm_tide.checkpoint import RouterCheckpoint
    from vllm_tide.errors import exit_on_config_error
    with exit_on_config_error():     # a bad router is one sentence here, before either engine starts
        ckpt = RouterCheckpoint.load(args.router)
    step("1/3 stock vLLM (a separate process without the plugin): greedy answers")
    env = {**os.environ, "VLLM_PLUGINS": "none-stock"}
    proc = subprocess.run([sys.executable, __file__, "--stock-json", "--model", args.model, "--dtype", args.dtype,
                           "--max-tokens", str(args.max_tokens)], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"stock run failed:\n{proc.stderr[-3000:]}")
    ref = json.loads(proc.stdout.split("JSON", 1)[1])
    tide = {"router": args.router}
    if args.threshold is not None:
        tide["threshold"] = args.threshold
    if args.preset is not None:
        tide["preset"] = args.preset
    step("2/3 TIDE: the same answers with exits on")
    explain_exits_off(tide, ckpt)
    from vllm_tide import exit_stats, reset_exit_stats
    from vllm_tide.settings import TideSettings
    threshold, min_layer = TideSettings.parse(tide).resolve(ckpt)
    llm = _engine(args, tide)
    reset_exit_stats(llm)
    texts, _, _ = answer(llm, None, args.max_tokens)
    s = exit_stats(llm)
    identical = sum(a == b for a, b in zip(ref["texts"], texts))
    for prompt, a, b in zip(PROMPTS, ref["texts"], texts):
        print(f"\n### {prompt}\n  stock: {a!r}\n  tide : {b!r}")
    step(f"3/3 speed in the TIDE engine: exits off (stock's forward), on, and off again (A/A), {args.rounds} rounds")
    same = same_engine_speed(llm, args.rounds, args.max_tokens)
    point = f"{threshold} / {min_layer}"
    rows = [("identical greedy answers", "(reference)", f"{identical}/{len(PROMPTS)}"),
            ("exits taken (checkpoint: count)", "-", ", ".join(f"{k}: {v}" for k, v in s["exits_per_layer"].items()
                                                             if v) or "none"),
            ("token-layers skipped (K/V fill only)", "0", f"{s['skipped_layer_fraction']:.3f}"),
            ("decode tokens/s, batch 1, same engine", f"{same['off']:.1f} (exits off)", f"{same['on']:.1f}"),
            ("  ratio to stock's forward", "1.000", f"{same['on'] / same['off']:.3f}"),
            ("  A/A control: exits off again / off", f"{same['off_again'] / same['off']:.3f}", "-"),
            ("decode tokens/s, stock vLLM's own process", f"{ref['tokens_per_s']:.1f}", "-")]
    print(f"\nTIDE at threshold / min layer {point} on {args.model} ({args.dtype}), {s['tokens']} tokens:")
    print(f"| {'':<40} | {'stock':<20} | {'TIDE':<20} |\n|{'-' * 42}|{'-' * 22}|{'-' * 22}|")
    for name, a, b in rows:
        print(f"| {name:<40} | {a:<20} | {b:<20} |")
    print("(one run; engine processes differ in speed by 10-50%, so the same-engine ratio is the speed figure, and "
          "a ratio within the A/A control's distance from 1.000 is noise; benchmarks/speed.py measures it properly)")
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    plot(args.png, same, identical, s["skipped_layer_fraction"], s["tokens"], point)
    print(f"\nplot: {os.path.abspath(args.png)}")


if __name__ == "__main__":
    main()
