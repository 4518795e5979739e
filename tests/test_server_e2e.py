"""The OpenAI-compatible server with TIDE, end to end on 127.0.0.1, started by the documented command."""
import json
import os
import subprocess
import sys

import pytest

from conftest import DEFAULT_MODEL, ROOT, requires_engine
from helpers import make_tiny_model, synthetic_router

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from load_test import free_port, http, tide_metrics, wait_healthy  # noqa: E402  (the load test's own helpers)

pytestmark = [pytest.mark.e2e, requires_engine]
VLLM = os.path.join(os.path.dirname(sys.executable), "vllm")


def server_env() -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)     # the server's default: engine in its own process
    return env


def test_load_test_short(tmp_path):
    """The load test, short: 16 concurrent streaming and non-streaming requests with per-request
    thresholds against `vllm serve --plugin tide` (multiprocess engine), with its own checks: well-formed
    answers, exits-off == stock vLLM, 400 on bad TIDE parameters, router file deleted after start-up,
    /metrics TIDE series growing, no errors in the server log."""
    router = str(tmp_path / "r.safetensors")
    synthetic_router(DEFAULT_MODEL, router, {11: "some", 19: "some"}, seed=7, threshold=0.7)
    res = tmp_path / "load.json"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "load_test.py"), "--model", DEFAULT_MODEL,
                          "--router", router, "--requests", "16", "--json", str(res)], cwd=ROOT, env=server_env(),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(res.read_text())
    assert report["failures"] == [] and report["exits_off_identical_to_stock"] == "4/4"
    assert 0 < report["exits"] < report["tokens_processed"]


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


def test_data_parallel_serving_with_tide(tmp_path):
    """`--data-parallel-size 2`: two engines, and (vLLM's default then) two API-server processes. The
    extra API servers rebuild their engine args without the plugin's flags and vLLM serves /metrics from
    its multiprocess folder: each server must still take tide_* request parameters, and /metrics carry
    the TIDE series summed over both engines, whichever server answers."""
    model = make_tiny_model("llama", str(tmp_path / "model"), DEFAULT_MODEL)
    router = str(tmp_path / "r.safetensors")
    synthetic_router(model, router, {3: "some"}, seed=2)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    log = open(log_path, "w")
    server = subprocess.Popen([VLLM, "serve", model, "--plugin", "tide", "--tide-router", router, "--tide-threshold",
                               "0.5", "--tide-min-layer", "0", "--data-parallel-size", "2", "--port", str(port),
                               "--max-model-len", "512", "--dtype", "float32"], env=server_env(), stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        # two engines and two API servers on 2 cores: minutes on a slow CPU; the bound only guards a hang
        wait_healthy(server, base, log_path, timeout=1500)
        # several requests, so that both servers (the kernel spreads connections over them) and both
        # engines take some
        prompt_tokens = generated = 0
        for i in range(8):
            xargs = [{"tide_threshold": 0.95}, {"tide_enabled": 0}, {}, {"tide_threshold": 0.5}][i % 4]
            # the same fields at the top level of the body, where vLLM's own extras go, for half of them
            where = {"vllm_xargs": xargs} if i < 4 else xargs
            status, body = http(base + "/v1/completions", {"model": model, "prompt": f"Request number {i} says",
                                                           "max_tokens": 6, "temperature": 0, **where})
            assert status == 200, body
            out = json.loads(body)
            prompt_tokens += out["usage"]["prompt_tokens"]
            generated += out["usage"]["completion_tokens"]
        for bad in ({"vllm_xargs": {"tide_threshold": 7}}, {"tide_threshold": 7}):
            status, body = http(base + "/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 2, **bad})
            assert status == 400 and "tide_threshold must be a number in (0, 1]" in json.loads(body)["error"]["message"]
        status, body = http(base + "/v1/chat/completions", {"model": model, "max_tokens": 2, "tide_treshold": 0.5,
                                                            "messages": [{"role": "user", "content": "Hi"}]})
        assert status == 400 and "Unknown TIDE request parameter 'tide_treshold'" in body
        status, body = http(base + "/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 2,
                                                       "tide_enabled": False, "vllm_xargs": {"tide_enabled": 0}})
        assert status == 400 and "both at the top level" in body
        for _ in range(4):
            status, text = http(base + "/metrics")
            series = tide_metrics(text)
            # every prompt and every generated token but each request's last goes through a forward
            assert series["vllm:tide_tokens_total"] == prompt_tokens + generated - 8
            assert series["vllm:tide_exits_total[3]"] > 0 and series["vllm:tide_threshold"] == 0.5
        per_engine = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("vllm:prompt_tokens_total{")]
        assert len(per_engine) == 2 and min(per_engine) > 0      # both engines served requests
    finally:
        server.terminate()
        server.wait(120)
