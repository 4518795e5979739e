"""Load and failure test of `vllm serve --plugin tide` on 127.0.0.1 with the default model.

    python benchmarks/load_test.py --router outputs/router.safetensors --requests 64

What it does, and fails on (exit status 1) if any check does not hold:
- starts the server with the documented command (engine in its default multiprocess mode), then
  deletes a copy of the router file it was started with: it was loaded once, so nothing changes;
- fires --requests concurrent completions, streaming and not, of mixed lengths, with per-request
  thresholds (the engine's, 0.7, 0.95, exits off) through the standard `vllm_xargs` request field;
- every request must complete with a well-formed answer of the asked length;
- requests with exits off must equal stock vLLM's greedy output (a separate offline run with the
  plugin unloaded);
- a request with an invalid TIDE parameter gets a 400 with a clear message, and the server goes on;
- /metrics carries the TIDE series, and their counts grow with the traffic;
- the server log has no error or traceback.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THRESHOLDS = [None, 0.7, 0.95, "off"]        # None: the engine's own threshold


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts_for(n: int, seed: int) -> list[dict]:
    with open(os.path.join(ROOT, "data", "gsm8k", "test.jsonl")) as f:
        questions = [json.loads(line)["question"] for line in f][: max(n, 8)]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = questions[i % len(questions)]
        words = q.split()
        q = " ".join(words[: rng.randint(4, len(words))])           # mixed prompt lengths
        out.append({"prompt": f"Question: {q}\nAnswer:", "max_tokens": rng.choice([4, 12, 24, 48]),
                    "threshold": THRESHOLDS[i % len(THRESHOLDS)], "stream": i % 2 == 1})
    return out


def xargs(threshold) -> dict | None:
    if threshold is None:
        return None
    return {"tide_enabled": False} if threshold == "off" else {"tide_threshold": threshold}


# ----------------------------------------------------------------------------- stock reference

def stock_worker(args) -> None:
    from vllm import LLM, SamplingParams
    reqs = json.loads(sys.stdin.read())
    # the server's execution mode (vLLM's default, compiled): exits-off answers must equal it exactly
    llm = LLM(model=args.model, dtype="float32", max_model_len=args.max_model_len, block_size=32, seed=0,
              gpu_memory_utilization=0.5)
    outs = llm.generate([r["prompt"] for r in reqs],
                        [SamplingParams(temperature=0, max_tokens=r["max_tokens"]) for r in reqs], use_tqdm=False)
    print("JSON" + json.dumps([o.outputs[0].text for o in outs]))


def stock_texts(args, reqs: list[dict]) -> list[str]:
    env = {**os.environ, "VLLM_PLUGINS": "none-stock", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    out = subprocess.run([sys.executable, __file__, "--stock-worker", "--model", args.model,
                          "--max-model-len", str(args.max_model_len)], input=json.dumps(reqs), env=env,
                         capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.split("JSON", 1)[1])


# ----------------------------------------------------------------------------- client

async def run_requests(base: str, model: str, reqs: list[dict]) -> list[dict]:
    import openai
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", timeout=600, max_retries=0)

    async def one(r):
        extra = {"vllm_xargs": xargs(r["threshold"])} if xargs(r["threshold"]) else None
        kw = dict(model=model, prompt=r["prompt"], max_tokens=r["max_tokens"], temperature=0, extra_body=extra)
        t0 = time.time()
        if r["stream"]:
            text, finish, chunks = "", None, 0
            stream = await client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
            usage = None
            async for chunk in stream:
                chunks += 1
                if chunk.choices:
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage:
                    usage = chunk.usage.completion_tokens
            return {"text": text, "finish": finish, "tokens": usage, "chunks": chunks, "seconds": time.time() - t0}
        out = await client.completions.create(**kw)
        return {"text": out.choices[0].text, "finish": out.choices[0].finish_reason,
                "tokens": out.usage.completion_tokens, "seconds": time.time() - t0}

    return await asyncio.gather(*(one(r) for r in reqs))


def http(url: str, body: dict | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_healthy(proc, base: str, log_path: str, timeout: float = 300) -> None:
    """Until the server at ``base`` answers /health; an error with the log's tail if it exits first."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + open(log_path).read()[-3000:])
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            return
        except OSError:
            if time.time() > deadline:
                raise RuntimeError(f"server did not answer /health within {timeout:.0f} s (a bound against hangs; "
                                   f"raise it on a slow machine); its log ends:\n" + open(log_path).read()[-3000:])
            time.sleep(1)


def tide_metrics(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(vllm:tide_[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            key = m.group(1) + (f"[{labels['layer']}]" if "layer" in labels else "")
            out[key] = float(m.group(3))
    return out


# ----------------------------------------------------------------------------- driver

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--router", default="outputs/router.safetensors")
    p.add_argument("--threshold", type=float, default=None, help="the engine's threshold (default: the router's)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--stock-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stock_worker:
        stock_worker(args)
        return 0

    from vllm_tide.checkpoint import RouterCheckpoint
    from vllm_tide.errors import exit_on_config_error
    from vllm_tide.settings import TideSettings
    with exit_on_config_error():     # a bad router is one sentence here, before the server starts
        want, _ = TideSettings(router=args.router, threshold=args.threshold).resolve(RouterCheckpoint.load(args.router))
    failures: list[str] = []
    check = lambda ok, what: ok or failures.append(what)  # noqa: E731
    tmp = tempfile.mkdtemp(prefix="tide-load-")
    router = os.path.join(tmp, "router.safetensors")
    shutil.copy(args.router, router)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)      # the server's default: the engine in its own process
    cmd = [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve", args.model, "--plugin", "tide",
           "--tide-router", router, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", str(args.max_model_len), "--block-size", "32"]
    if args.threshold is not None:
        cmd += ["--tide-threshold", str(args.threshold)]
    log_path = os.path.join(tmp, "server.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    reqs = prompts_for(args.requests, args.seed)
    report: dict = {"requests": args.requests, "command": " ".join(cmd)}
    try:
        wait_healthy(proc, base, log_path)
        os.remove(router)                      # loaded once at start-up: its absence must not matter
        before = tide_metrics(http(f"{base}/metrics")[1])
        check(abs(before.get("vllm:tide_threshold", -1) - want) < 1e-6,
              f"/metrics vllm:tide_threshold is {before.get('vllm:tide_threshold')}, the engine runs {want}")

        status, body = http(f"{base}/v1/completions", {"model": args.model, "prompt": "Hi", "max_tokens": 2,
                                                       "vllm_xargs": {"tide_threshold": 1.5}})
        check(status == 400 and "tide_threshold must be a number in (0, 1]" in body,
              f"invalid tide_threshold gave {status}: {body[:200]}")
        status, body = http(f"{base}/v1/completions", {"model": args.model, "prompt": "Hi", "max_tokens": 2,
                                                       "vllm_xargs": {"tide_enabled": "no"}})
        check(status == 400 and "tide_enabled must be true or false" in body, f"invalid tide_enabled gave {status}")

        t0 = time.time()
        answers = asyncio.run(run_requests(base, args.model, reqs))
        report["seconds"] = round(time.time() - t0, 1)
        after = tide_metrics(http(f"{base}/metrics")[1])
        status, _ = http(f"{base}/v1/completions", {"model": args.model, "prompt": "Hi", "max_tokens": 2})
        check(status == 200, f"the server did not serve after the load ({status})")
        log.flush()
        serving_log = open(log_path).read()      # read before shutdown, whose own messages are vLLM's
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    for r, a in zip(reqs, answers):
        full = a["finish"] == "length" and a["tokens"] == r["max_tokens"]
        eos = a["finish"] == "stop" and 1 <= a["tokens"] <= r["max_tokens"]
        check(isinstance(a["text"], str) and (full or eos), f"malformed answer {a} for {r}")
    off = [i for i, r in enumerate(reqs) if r["threshold"] == "off"]
    stock = stock_texts(args, [reqs[i] for i in off])
    same = sum(answers[i]["text"] == s for i, s in zip(off, stock))
    check(same == len(off), f"{len(off) - same} of {len(off)} exits-off requests differ from stock vLLM")
    grew = after.get("vllm:tide_tokens_total", 0) - before.get("vllm:tide_tokens_total", 0)
    exits = sum(v - before.get(k, 0) for k, v in after.items() if k.startswith("vllm:tide_exits_total["))
    check(grew > 0, "vllm:tide_tokens_total did not grow")
    check(0 <= exits <= grew, f"exits {exits} not within the {grew} tokens processed")
    check("TIDE early exit on" in serving_log, "the server log does not show TIDE active")
    bad = [line for line in serving_log.splitlines() if re.search(r"Traceback|\bERROR\b", line)]
    check(not bad, f"errors in the server log: {bad[:3]}")
    report.update({"exits_off_identical_to_stock": f"{same}/{len(off)}", "tokens_processed": grew, "exits": exits,
                   "latency_p50_s": sorted(a["seconds"] for a in answers)[len(answers) // 2],
                   "latency_max_s": max(a["seconds"] for a in answers), "failures": failures})
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
