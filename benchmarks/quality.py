"""TIDE quality against stock vLLM on held-out text and in generation, across exit thresholds.

    python benchmarks/quality.py --router outputs/router.safetensors --split test
    python benchmarks/quality.py --router outputs/router.safetensors --presets default balanced fast --chat
    python benchmarks/quality.py --router outputs/router.safetensors --thresholds 0.8 \
        --text my_docs/ --prompts my_prompts.txt --chat          # your own text and prompts

Teacher-forced, through vLLM's prompt_logprobs (so prefill exits and propagated K/V are measured):
top-1 agreement with stock at every position and the perplexity ratio TIDE/stock. In generation:
greedy continuations of GSM8K questions, the fraction identical to stock and the mean position of the
first differing token. One changed token changes the rest of a greedy continuation, so identity
compounds the per-token rate over the whole length; the per-token rate on the same distribution is
measured too: stock's own transcripts (prompt + its greedy continuation) teacher-forced through TIDE,
top-1 agreement at the continuation's positions. Stock runs in its own process with the plugin
unloaded; each threshold runs in a fresh process too. Pick settings on --split dev, report them on
--split test. --text and --prompts measure your own workload instead: text files (or folders of .txt, .md
and .jsonl files) for the teacher-forced part, and a file of prompts, one per line (a literal \\n is a newline; or
a .jsonl file of strings or objects with a "prompt", "question", ... field), for generation.

Every exit that fires is taken (split_min_rows 1, split_min_fraction 0), as for a single decode token:
the per-token behaviour calibration measures, and the worst case. By default TIDE defers exits that
would save nothing in their step (in a prefill chunk or a decode batch of which few rows exit), which
only keeps those tokens on the full model; --batched-exits measures that instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gsm8k_questions(n: int) -> list[str]:
    path = os.path.join(ROOT, "data", "gsm8k", "test.jsonl")
    with open(path) as f:
        return [json.loads(line)["question"] for line in f][:n]


def generation_prompts(tokenizer, n: int, chat: bool, prompts_file: str | None = None) -> list:
    """The --prompts file's first n prompts, else GSM8K questions (as "Question: ... Answer:"), as plain
    completion prompts, or through the model's chat template (what a chat-completions client of an
    instruct model sends)."""
    if prompts_file:
        from vllm_tide.answers import read_prompts
        questions = read_prompts(prompts_file, "--prompts")[:n]
        if not chat:
            return questions
    else:
        questions = gsm8k_questions(n)
        if not chat:
            return [f"Question: {q}\nAnswer:" for q in questions]
    return [{"prompt_token_ids": tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                               add_generation_prompt=True, tokenize=True,
                                                               return_dict=True)["input_ids"]}
            for q in questions]


def model_len(args, tokenizer, prompts: list) -> int:
    """max_model_len: a text chunk, or the longest prompt with its continuation (your own may be long)."""
    need = args.chunk + 8
    if args.prompts:
        lens = [len(p["prompt_token_ids"]) if isinstance(p, dict) else len(tokenizer(p)["input_ids"])
                for p in prompts]
        need = max(need, max(lens) + args.gen_tokens + 8)
    return need


def evaluate(args) -> dict:
    """Run inside a worker: teacher-forced logprobs over the split, then greedy generations."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm_tide.corpus import read_texts, split_texts
    from vllm_tide.settings import EVERY_EXIT
    tok = AutoTokenizer.from_pretrained(args.model)      # the tokenizer vLLM loads for the model
    prompts = generation_prompts(tok, args.gen_prompts, args.chat, args.prompts)
    kw = dict(model=args.model, dtype=args.dtype, enforce_eager=True, max_model_len=model_len(args, tok, prompts),
              block_size=32, seed=0, enable_prefix_caching=False)
    if args.worker_threshold is not None:
        tide = {"router": args.router, "threshold": args.worker_threshold}
        if not args.batched_exits:      # every exit taken, as for a single decode token
            tide.update(EVERY_EXIT)
        if args.min_layer is not None:
            tide["min_layer"] = args.min_layer
        kw["additional_config"] = {"tide": tide}
    llm = LLM(**kw)
    texts = read_texts(args.text) if args.text else split_texts(args.split)
    ids = tok("\n\n".join(texts), add_special_tokens=False)["input_ids"][: args.tokens]
    chunks = [{"prompt_token_ids": ids[s:s + args.chunk]} for s in range(0, len(ids), args.chunk)]
    if args.worker_threshold is not None:
        from vllm_tide import reset_exit_stats
        reset_exit_stats(llm)
    outs = llm.generate(chunks, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    logprob, top1 = [], []
    for chunk, o in zip(chunks, outs):
        for pos, entry in enumerate(o.prompt_logprobs[1:], start=1):
            logprob.append(entry[chunk["prompt_token_ids"][pos]].logprob)
            top1.append(next(t for t, lp in entry.items() if lp.rank == 1))
    result = {"logprob": logprob, "top1": top1}
    if args.worker_threshold is not None:
        from vllm_tide import exit_stats
        result["text_stats"] = exit_stats(llm)
        reset_exit_stats(llm)
    gen = llm.generate(prompts,
                       SamplingParams(temperature=0, max_tokens=args.gen_tokens), use_tqdm=False)
    result["generations"] = [list(o.outputs[0].token_ids) for o in gen]
    result["generation_prompt_tokens"] = [len(o.prompt_token_ids) for o in gen]
    if args.worker_threshold is not None:
        result["gen_stats"] = exit_stats(llm)
        reset_exit_stats(llm)
        with open(args.transcripts) as f:
            transcripts = json.load(f)
    else:   # stock: its own greedy transcripts, which every TIDE worker then reads
        transcripts = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in gen]
    result["transcripts"] = transcripts
    result["transcript_top1"] = continuation_top1(llm, transcripts, result["generation_prompt_tokens"])
    if args.worker_threshold is not None:
        result["transcript_stats"] = exit_stats(llm)
    return result


def continuation_top1(llm, transcripts: list[list[int]], prompt_lens: list[int]) -> list[list[int]]:
    """Teacher-forced top-1 prediction of each continuation token of each transcript."""
    from vllm import SamplingParams
    outs = llm.generate([{"prompt_token_ids": t} for t in transcripts],
                        SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    # prompt_logprobs[j] scores token j, predicted at position j - 1: keep the continuation's tokens
    return [[next(t for t, lp in entry.items() if lp.rank == 1) for entry in o.prompt_logprobs[plen:]]
            for o, plen in zip(outs, prompt_lens)]


def run_worker(args, threshold: float | None, min_layer: int | None = None, transcripts: str | None = None) -> dict:
    env = dict(os.environ)
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--router", args.router, "--split", args.split,
           "--tokens", str(args.tokens), "--chunk", str(args.chunk), "--dtype", args.dtype,
           "--gen-prompts", str(args.gen_prompts), "--gen-tokens", str(args.gen_tokens)]
    if args.chat:
        cmd.append("--chat")
    if args.text:
        cmd += ["--text", *args.text]
    if args.prompts:
        cmd += ["--prompts", args.prompts]
    if args.batched_exits:
        cmd.append("--batched-exits")
    if threshold is None:
        env["VLLM_PLUGINS"] = "none-stock"
    else:
        cmd += ["--worker-threshold", str(threshold), "--transcripts", transcripts]
    if min_layer is not None:
        cmd += ["--min-layer", str(min_layer)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.split("JSON", 1)[1])


def operating_points(args) -> list[dict]:
    """What to measure: the router's stored presets (each with its own threshold and minimum exit
    layer), or the given thresholds at one --min-layer."""
    if not args.presets:
        return [{"threshold": t, "min_layer": args.min_layer} for t in args.thresholds]
    from vllm_tide.checkpoint import RouterCheckpoint
    extra = RouterCheckpoint.load(args.router).extra
    stored, unpaid = extra.get("presets", {}), extra.get("unpaid") or {}
    points = []
    for name in args.presets:
        if name not in stored:
            sys.exit(f"The router {args.router} has no preset {name!r}; it has {sorted(stored)}.")
        point, off = stored[name], stored[name] is None
        if off:     # exits off: that is stock, so measure the best point that met its bar but did not pay
            point = unpaid.get(name)
            if point is None:
                print(f"preset {name}: none of the calibration's points met its bar (exits off); skipped")
                continue
            print(f"preset {name} keeps exits off (its best point does not pay for its checkpoints); "
                  f"measuring that point, {point['threshold']}/{point['min_layer']}")
        points.append({"preset": name, "threshold": point["threshold"], "min_layer": point["min_layer"],
                       "exits_off_by_default": off, "validation_propagated": point})
    return points


def first_divergence(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def compare(stock: dict, tide: dict) -> dict:
    n = len(stock["top1"])
    agree = sum(a == b for a, b in zip(stock["top1"], tide["top1"])) / n
    ppl = lambda lps: math.exp(-sum(lps) / len(lps))  # noqa: E731
    gens = list(zip(stock["generations"], tide["generations"]))
    t, g, c = tide["text_stats"], tide["gen_stats"], tide["transcript_stats"]
    return {"top1_agreement": agree, "ppl_stock": ppl(stock["logprob"]), "ppl_tide": ppl(tide["logprob"]),
            "ppl_ratio": ppl(tide["logprob"]) / ppl(stock["logprob"]),
            "gen_exact_match": sum(a == b for a, b in gens) / len(gens),
            "gen_mean_first_divergence": sum(first_divergence(a, b) for a, b in gens) / len(gens),
            "text_skipped_layer_fraction": t["skipped_layer_fraction"],
            "text_partial_layer_fraction": t["partial_layer_fraction"],
            "text_deferred_exits": t["deferred_exits"],
            "text_exits_per_layer": t["exits_per_layer"],
            "gen_skipped_layer_fraction": g["skipped_layer_fraction"],
            "gen_partial_layer_fraction": g["partial_layer_fraction"],
            "gen_deferred_exits": g["deferred_exits"],
            "gen_exits_per_layer": g["exits_per_layer"],
            "transcript_agreement": token_agreement(stock["transcript_top1"], tide["transcript_top1"]),
            "transcript_positions": sum(map(len, tide["transcript_top1"])),
            "transcript_partial_layer_fraction": c["partial_layer_fraction"],
            "transcript_deferred_exits": c["deferred_exits"],
            "transcript_exits_per_layer": c["exits_per_layer"], "tokens": n}


def token_agreement(xs: list[list[int]], ys: list[list[int]]) -> float:
    """The fraction of equal tokens, position by position, over paired token lists."""
    pairs = [(a, b) for x, y in zip(xs, ys) for a, b in zip(x, y)]
    return sum(a == b for a, b in pairs) / len(pairs)


def text_source(args) -> str:
    return f"text from {', '.join(args.text)}" if args.text else f"{args.split} split"


def check_inputs(args) -> None:
    """A bad router, text or prompts file fails here in one sentence, not inside an engine worker."""
    from vllm_tide.answers import read_prompts
    from vllm_tide.checkpoint import RouterCheckpoint
    from vllm_tide.corpus import check_paths, read_texts
    from vllm_tide.errors import TideConfigError, exit_on_config_error
    with exit_on_config_error():
        if args.prompts:
            read_prompts(args.prompts, "--prompts")
        if args.text:
            check_paths(args.text, "--text")
            if not any(t.strip() for t in read_texts(args.text)):
                raise TideConfigError(f"--text {' '.join(args.text)} holds no text; pass UTF-8 text files or "
                                      f"folders of .txt, .md or .jsonl files.")
        RouterCheckpoint.load(args.router)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--router", default="outputs/router.safetensors")
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0])
    p.add_argument("--min-layer", type=int, default=None)
    p.add_argument("--presets", nargs="+", default=None, metavar="NAME",
                   help="measure these presets stored in the router (e.g. default balanced fast) instead of --thresholds")
    p.add_argument("--split", default="test", choices=("dev", "test"))
    p.add_argument("--text", nargs="+", default=None, metavar="PATH",
                   help="your own text files or folders of .txt, .md or .jsonl files to teacher-force, instead of --split")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="your own generation prompts, one per line (or .jsonl), instead of GSM8K questions")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--gen-prompts", type=int, default=100)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="generate through the model's chat template")
    p.add_argument("--batched-exits", action="store_true",
                   help="the engine's default split rule (exits that save nothing in their step deferred) "
                        "instead of every exit taken")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-threshold", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--transcripts", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("JSON" + json.dumps(evaluate(args)))
        return
    check_inputs(args)
    t0 = time.time()
    stock = run_worker(args, None)
    transcripts = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    with transcripts:
        json.dump(stock["transcripts"], transcripts)
    rows = []
    print(f"{text_source(args)}, {len(stock['top1'])} teacher-forced tokens, "
          f"{len(stock['generations'])} {'prompts from ' + args.prompts if args.prompts else 'GSM8K prompts'}"
          f"{' (chat template)' if args.chat else ''} "
          f"x {args.gen_tokens} tokens; router {args.router}")
    print(f"{'threshold':>9} {'top1 agr':>8} {'ppl ratio':>9} {'gen exact':>9} {'1st diff':>8} {'transcr':>7} "
          f"{'skip(text)':>10} {'part(text)':>10} {'skip(gen)':>9} {'part(gen)':>9}")
    for point in operating_points(args):
        r = {**point, **compare(stock, run_worker(args, point["threshold"], point["min_layer"], transcripts.name))}
        rows.append(r)
        label = f"{point['threshold']}" if "preset" not in point else \
            f"{point['preset']}{'*' if point['exits_off_by_default'] else ''} {point['threshold']}/{point['min_layer']}"
        print(f"{label:>9} {r['top1_agreement']:>8.4f} {r['ppl_ratio']:>9.4f} {r['gen_exact_match']:>9.2f} "
              f"{r['gen_mean_first_divergence']:>8.1f} {r['transcript_agreement']:>7.4f} "
              f"{r['text_skipped_layer_fraction']:>10.4f} "
              f"{r['text_partial_layer_fraction']:>10.4f} {r['gen_skipped_layer_fraction']:>9.4f} "
              f"{r['gen_partial_layer_fraction']:>9.4f}", flush=True)
    os.unlink(transcripts.name)
    if any(r.get("exits_off_by_default") for r in rows):
        print("* the preset keeps exits off (stock's output): its best point, which does not pay for its checkpoints")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"split": None if args.text else args.split, "text": args.text, "prompts": args.prompts,
                       "chat": args.chat, "model": args.model, "router": args.router,
                       "generation_prompt_tokens": stock["generation_prompt_tokens"],
                       # stock's teacher-forced top-1 on its own transcripts against its greedy tokens: ~1
                       "stock_transcript_self_agreement": token_agreement(stock["generations"],
                                                                          stock["transcript_top1"]),
                       "min_layer": args.min_layer, "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - t0), "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
