"""The OpenAI-compatible server with TIDE, end to end on 127.0.0.1, started by the documented command."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import DEFAULT_MODEL, requires_engine, run_stock
from helpers import synthetic_router

pytestmark = [pytest.mark.e2e, requires_engine]
VLLM = os.path.join(os.path.dirname(sys.executable), "vllm")
PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)     # the server's default: engine in its own process
    return env


def complete(port: int, prompt: str, n: int) -> dict:
    body = json.dumps({"model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_served_completions_with_tide(tmp_path):
    router = str(tmp_path / "r.safetensors")
    synthetic_router(DEFAULT_MODEL, router, {15: "all"})
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([VLLM, "serve", DEFAULT_MODEL, "--plugin", "tide", "--tide-router", router,
                             "--tide-threshold", "1.0", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                             "--max-model-len", "512", "--block-size", "32"], env=server_env(), stdout=log, stderr=log)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "server did not come up"
                time.sleep(1)
        answers = [complete(port, p, 16) for p in PROMPTS]
        log.flush()
        serving_log = (tmp_path / "server.log").read_text()   # before shutdown, whose own noise is vLLM's
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    assert "TIDE early exit on LlamaForCausalLM" in serving_log and "Traceback" not in serving_log
    # threshold 1.0: routers run, nothing exits, so answers are stock vLLM's greedy text
    stock = json.loads(run_stock(os.path.join(os.path.dirname(__file__), "stock_generate.py"), DEFAULT_MODEL, "16",
                                 *PROMPTS).split("JSON", 1)[1])
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    for a, ids in zip(answers, stock):
        assert a["choices"][0]["text"] == tok.decode(ids) and a["usage"]["completion_tokens"] == 16


def test_bad_router_fails_fast_with_one_line(tmp_path):
    out = subprocess.run([VLLM, "serve", DEFAULT_MODEL, "--plugin", "tide", "--tide-router",
                          str(tmp_path / "missing.safetensors"), "--port", str(free_port())],
                         env=server_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("vllm-tide error:")]
    assert len(errors) == 1 and "does not exist" in errors[0]
    out = subprocess.run([VLLM, "serve", DEFAULT_MODEL, "--tide-router", "x.safetensors"],
                         env=server_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "need `--plugin tide`" in out.stderr and "Traceback" not in out.stderr
