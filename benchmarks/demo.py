"""The main job on the default model: TIDE early exit next to stock vLLM on the same prompts.

    python benchmarks/demo.py --router outputs/router.safetensors

Stock vLLM runs in a separate process with the plugin not loaded (VLLM_PLUGINS names no TIDE entry).
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


def generate(args, tide: dict | None) -> dict:
    from vllm import LLM, SamplingParams
    # vLLM's default execution (torch.compile) for both engines: what a user runs
    kw = dict(model=args.model, dtype=args.dtype, max_model_len=1024, block_size=32, seed=0)
    if tide is not None:
        kw["additional_config"] = {"tide": tide}
    llm = LLM(**kw)
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    chat = [[{"role": "user", "content": p}] for p in PROMPTS]     # an instruct model: its chat template
    llm.chat(chat[:1], SamplingParams(max_tokens=4), use_tqdm=False)   # warm-up
    out = {"texts": [], "seconds": 0.0, "tokens": 0}
    if tide is not None:
        from vllm_tide import reset_exit_stats
        reset_exit_stats(llm)
    for messages in chat:    # batch 1, the latency case
        t0 = time.perf_counter()
        o = llm.chat([messages], sp, use_tqdm=False)[0].outputs[0]
        out["seconds"] += time.perf_counter() - t0
        out["tokens"] += len(o.token_ids)
        out["texts"].append(o.text)
    if tide is not None:
        from vllm_tide import exit_stats
        out["stats"] = exit_stats(llm)
    return out


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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--router", default="outputs/router.safetensors")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--preset", default=None, help="default, balanced or fast (stored in the router)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--stock-json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stock_json:
        print("JSON" + json.dumps(generate(args, None)))
        return
    from vllm_tide.checkpoint import RouterCheckpoint
    from vllm_tide.errors import exit_on_config_error
    with exit_on_config_error():     # a bad router is one sentence here, before either engine starts
        ckpt = RouterCheckpoint.load(args.router)
    env = {**os.environ, "VLLM_PLUGINS": "none-stock"}
    proc = subprocess.run([sys.executable, __file__, "--stock-json", "--model", args.model, "--dtype", args.dtype,
                           "--max-tokens", str(args.max_tokens)], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"stock run failed:\n{proc.stderr[-3000:]}")
    stock = json.loads(proc.stdout.split("JSON", 1)[1])
    tide = {"router": args.router}
    if args.threshold is not None:
        tide["threshold"] = args.threshold
    if args.preset is not None:
        tide["preset"] = args.preset
    explain_exits_off(tide, ckpt)
    mine = generate(args, tide)
    same = 0
    for prompt, a, b in zip(PROMPTS, stock["texts"], mine["texts"]):
        same += a == b
        print(f"\n### {prompt}\n  stock: {a!r}\n  tide : {b!r}")
    s = mine["stats"]
    print(f"\nidentical continuations: {same}/{len(PROMPTS)}")
    print(f"exits per checkpoint: {s['exits_per_layer']} of {s['tokens']} tokens")
    print(f"token-layers skipped (K/V fill only): {s['skipped_layer_fraction']:.3f}; "
          f"partial (attention only): {s['partial_layer_fraction']:.3f}; "
          f"exits deferred (would have saved nothing in their step): {s['deferred_exits']}")
    print(f"batch-1 decode: stock {stock['tokens'] / stock['seconds']:.1f} tok/s, "
          f"tide {mine['tokens'] / mine['seconds']:.1f} tok/s (one run each, not a benchmark)")


if __name__ == "__main__":
    main()
