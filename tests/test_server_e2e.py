"""The OpenAI-compatible server with TIDE, end to end on 127.0.0.1, started by the documented command."""
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import DEFAULT_MODEL, ROOT, requires_engine
from helpers import synthetic_router

pytestmark = [pytest.mark.e2e, requires_engine]
VLLM = os.path.join(os.path.dirname(sys.executable), "vllm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
